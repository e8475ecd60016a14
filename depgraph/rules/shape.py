"""Views and data movement: reshape, transpose, slicing, concatenation, repetition.

Indexing by data (``index``, ``index_select``, gather/scatter) is in :mod:`depgraph.rules.indexing`.

Reshape is where channels become heads: ``[..., 64] -> [..., 4, 16]`` records that the
64 neurons are the row-major product of 4 heads and 16 head dims (:meth:`RuleContext.product`);
which factor becomes the prunable unit is decided once the whole graph is known
(:func:`depgraph.groups.resolve_products`).
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx

from .context import Axis, RuleContext, axis_key, is_multi, norm_dim, op_arg, shape_of, size_of
from .registry import register

aten = torch.ops.aten


def reshape_axes(ctx: RuleContext, node: fx.Node, src: list[Axis], out_shape,
                 inferred: frozenset[int] = frozenset()) -> list[Axis]:
    """Axes of ``src`` reshaped (row-major) to ``out_shape``.

    ``inferred``: output dims the code left to torch (``-1``). When a split has one, that factor is
    the only one whose size may change after a cut; the others' sizes are written in the code.
    """
    out: list[Axis | None] = [None] * len(out_shape)
    ins = [a for a in src if a.size != 1]
    outs = [(j, s) for j, s in enumerate(out_shape) if s != 1]
    for j, s in enumerate(out_shape):
        if s == 1:
            out[j] = ctx.fresh(node, j, 1)
    i = k = 0
    chunk = 0
    while i < len(ins) and k < len(outs):
        # grow the smaller side until both chunks hold the same number of elements
        gi, gk = [ins[i]], [outs[k]]
        pi, pk = ins[i].size, outs[k][1]
        i += 1
        k += 1
        while pi != pk:
            if pi < pk:
                gi.append(ins[i])
                pi *= ins[i].size
                i += 1
            else:
                gk.append(outs[k])
                pk *= outs[k][1]
                k += 1
        if len(gi) == 1 and len(gk) == 1:
            out[gk[0][0]] = ctx.same(gi[0], node, gk[0][0])
            continue
        if len(gi) == 1:
            # splitting back an axis an earlier reshape merged ([B, H] -> [B*H] -> [B, H]) gives
            # back the very same factors: the heads after the round trip are the heads before it
            again = ctx.merged_factors(gi[0], [s for _, s in gk])
            if again is not None:
                for (j, _), axis in zip(gk, again):
                    out[j] = ctx.same(axis, node, j)
                continue
        fresh = [ctx.fresh(node, j, s) for j, s in gk]
        for (j, _), axis in zip(gk, fresh):
            out[j] = axis
        if len(gi) == 1:
            free = [axis for (j, _), axis in zip(gk, fresh) if j in inferred]
            ctx.product(gi[0], fresh, preferred=free[0] if len(free) == 1 else None)
            for (j, size), axis in zip(gk, fresh):
                if j not in inferred:  # a factor the code sizes itself (not -1)
                    ctx.sized_by_code(axis, size, reshape=True, beside_inferred=bool(free))
        elif len(gk) == 1:
            ctx.product(fresh[0], gi)
            ctx.remember_merge(fresh[0], gi)
        else:  # a general regroup goes through one flat axis
            flat = Axis(axis_key(node.name, -1 - chunk), ctx.new_ids(pi))
            ctx.product(flat, gi)
            ctx.product(flat, fresh)
        chunk += 1
    return out  # type: ignore[return-value]


@register(aten.view, aten.reshape, aten._unsafe_view, aten.view_copy, aten.flatten, aten.unflatten,
          aten._reshape_alias)
def reshape(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    shape = shape_of(node)
    if src is None or shape is None:
        return NotImplemented
    requested = node.args[1] if len(node.args) > 1 and isinstance(node.args[1], (list, tuple)) else ()
    inferred = frozenset(j for j, size in enumerate(requested) if isinstance(size, int) and size == -1)
    return reshape_axes(ctx, node, src, shape, inferred)


def _reshape_to_other(ctx: RuleContext, node: fx.Node, why: str):
    """A reshape whose sizes are ``other``'s at run time: after a cut they must still match, so each
    output axis is coupled with ``other``'s."""
    src = ctx.tensor_axes(node.args[0])
    other = ctx.tensor_axes(node.args[1])
    shape = shape_of(node)
    if src is None or other is None or shape is None or [a.size for a in other] != list(shape):
        return NotImplemented
    out = reshape_axes(ctx, node, src, shape)
    for axis, ref in zip(out, other):
        ctx.couple(axis, ref, why)
    return out


@register(aten.reshape_as)
def reshape_as(ctx: RuleContext, node: fx.Node):
    """``x.reshape_as(other)``: a reshape to ``other``'s shape at run time (see :func:`view_as`)."""
    return _reshape_to_other(ctx, node, "reshape_as")


@register(aten.sym_size.int)
def sym_size(ctx: RuleContext, node: fx.Node):
    """``x.size(d)`` read at run time (exported for data-dependent sizes): no channel flows into the
    integer, but code may size something by it, so the dimension read is frozen."""
    src = ctx.tensor_axes(node.args[0])
    d = op_arg(node, "dim")
    if src is None or not isinstance(d, int):
        return NotImplemented
    ctx.freeze(src[norm_dim(d, len(src))], f"size read at {ctx.where()}")
    return None


@register(aten.view_as)
def view_as(ctx: RuleContext, node: fx.Node):
    """``x.view_as(other)`` (Beam's per-head attention gate): a reshape whose sizes are ``other``'s at run
    time, so after a cut they must still match: each output axis is coupled with ``other``'s."""
    return _reshape_to_other(ctx, node, "view_as")


@register(aten.transpose, aten.swapaxes, aten.swapdims)
def transpose(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    nd = len(src)
    d0 = norm_dim(op_arg(node, "dim0", op_arg(node, "axis0")), nd)
    d1 = norm_dim(op_arg(node, "dim1", op_arg(node, "axis1")), nd)
    order = list(range(nd))
    order[d0], order[d1] = order[d1], order[d0]
    ctx.view_of_param(node.args[0], node, order)
    return [ctx.same(src[o], node, j) for j, o in enumerate(order)]


@register(aten.permute)
def permute(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    order = [norm_dim(d, len(src)) for d in op_arg(node, "dims")]
    return [ctx.same(src[o], node, j) for j, o in enumerate(order)]


@register(aten.t, aten.numpy_T)
def matrix_t(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    ctx.view_of_param(node.args[0], node, list(reversed(range(len(src)))))
    return [ctx.same(a, node, j) for j, a in enumerate(reversed(src))]


@register(aten.unsqueeze)
def unsqueeze(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    d = norm_dim(op_arg(node, "dim"), len(src) + 1)
    out = [ctx.same(a, node, j if j < d else j + 1) for j, a in enumerate(src)]
    out.insert(d, ctx.fresh(node, d, 1))
    return out


@register(aten.squeeze)
def squeeze(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    dims = op_arg(node, "dim")
    if dims is not None:
        dims = dims if isinstance(dims, (list, tuple)) else [dims]
        drop = {norm_dim(d, len(src)) for d in dims if src[norm_dim(d, len(src))].size == 1}
    else:
        drop = {j for j, a in enumerate(src) if a.size == 1}
    kept = [a for j, a in enumerate(src) if j not in drop]
    return [ctx.same(a, node, j) for j, a in enumerate(kept)]


@register(aten.view_as_complex, aten.view_as_real)
def view_as_complex(ctx: RuleContext, node: fx.Node):
    # complex rotary embeddings (DeepSeek-V2): ``[..., n, 2]`` real pairs <-> ``[..., n]`` complex. The pair
    # axis (real, imaginary) is layout, never a channel: frozen; every other axis passes through
    src = ctx.tensor_axes(node.args[0])
    shape = shape_of(node)
    if src is None or shape is None:
        return NotImplemented
    if node.target == aten.view_as_complex.default:
        if len(shape) != len(src) - 1:
            return NotImplemented
        ctx.freeze(src[-1], f"real/imaginary pair at {ctx.where()}")
        return [ctx.same(a, node, j) for j, a in enumerate(src[:-1])]
    if len(shape) != len(src) + 1:
        return NotImplemented
    pair = ctx.fresh(node, len(src), shape[-1])
    ctx.freeze(pair, f"real/imaginary pair at {ctx.where()}")
    return [ctx.same(a, node, j) for j, a in enumerate(src)] + [pair]


@register(aten.expand, aten.expand_copy, aten.broadcast_to)
def expand(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    shape = shape_of(node)
    lead = len(shape) - len(src)
    out = [ctx.fresh(node, j, shape[j]) for j in range(lead)]
    for j, a in enumerate(src):
        size = shape[lead + j]
        out.append(ctx.same(a, node, lead + j) if a.size == size else ctx.fresh(node, lead + j, size))
    for j, axis in enumerate(out):  # the new (broadcast) axes: each index a copy of the same values
        if j < lead or src[j - lead].size != axis.size:
            ctx.broadcasted(axis)
    return out


@register(aten.expand_as)
def expand_as(ctx: RuleContext, node: fx.Node):
    return expand(ctx, node)


@register(aten.repeat)
def repeat(ctx: RuleContext, node: fx.Node):
    # repeated copies are the same neurons: tile the ids (duplicate ids = one neuron)
    src = ctx.tensor_axes(node.args[0])
    reps = list(node.args[1])
    lead = len(reps) - len(src)
    out = [ctx.fresh(node, j, reps[j]) for j in range(lead)]
    for j, a in enumerate(src):
        r = reps[lead + j]
        out.append(ctx.same(a, node, lead + j, None if r == 1 else np.tile(a.ids, r)))
    return out


@register(aten.repeat_interleave)
def repeat_interleave(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    reps = op_arg(node, "repeats")
    dim = op_arg(node, "dim")
    if src is None or not isinstance(reps, int) or dim is None:
        return NotImplemented
    dim = norm_dim(dim, len(src))
    return [ctx.same(a, node, j, np.repeat(a.ids, reps) if j == dim else None) for j, a in enumerate(src)]


@register(aten.slice)
def slice_(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    dim = norm_dim(op_arg(node, "dim", 0), len(src))
    # None bounds and negative / past-the-end ints: python slice semantics, as torch does
    sub = slice(*slice(op_arg(node, "start"), op_arg(node, "end"), op_arg(node, "step", 1)).indices(src[dim].size))
    return [ctx.same(a, node, j, a.ids[sub] if j == dim else None) for j, a in enumerate(src)]


@register(aten.narrow)
def narrow(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    dim = norm_dim(op_arg(node, "dim"), len(src))
    start, length = op_arg(node, "start"), op_arg(node, "length")
    start = start + src[dim].size if start < 0 else start
    return [ctx.same(a, node, j, a.ids[start:start + length] if j == dim else None) for j, a in enumerate(src)]


@register(aten.select)
def select(ctx: RuleContext, node: fx.Node):
    # code that reads one fixed index would read another neuron after a cut: freeze the axis
    src = ctx.tensor_axes(node.args[0])
    dim = norm_dim(op_arg(node, "dim"), len(src))
    ctx.freeze(src[dim], f"select at {ctx.where()}")
    # one expert's slice of a stacked weight (JetMoE's ``self.weight[i]``) is still that weight: its
    # uses give the parameter's dims their roles ("in" columns are what zero_mask masks)
    ctx.view_of_param(node.args[0], node, [j for j in range(len(src)) if j != dim])
    kept = [a for j, a in enumerate(src) if j != dim]
    return [ctx.same(a, node, j) for j, a in enumerate(kept)]


@register(aten.cat, aten.concat, aten.concatenate)
def cat(ctx: RuleContext, node: fx.Node):
    parts = [ctx.tensor_axes(t) for t in node.args[0]]
    shape = shape_of(node)
    parts = [p for p in parts if p is not None and len(p) == len(shape)]  # legacy 1-D empties
    dim = norm_dim(op_arg(node, "dim", 0), len(shape))
    out = []
    for j in range(len(shape)):
        if j == dim:
            out.append(Axis(axis_key(node.name, j), np.concatenate([p[j].ids for p in parts])))
            for p in parts:
                ctx.axis_edges.append((p[j].key, out[-1].key, "cat"))
        else:
            out.append(ctx.same(parts[0][j], node, j))
            for p in parts[1:]:
                ctx.couple(parts[0][j].ids, p[j].ids, "cat")
                ctx.axis_edges.append((p[j].key, out[-1].key, "cat"))
    return out


def _pieces(ctx: RuleContext, node: fx.Node, src: list[Axis], dim: int, sizes: list[int]):
    outs = []
    start = 0
    for size in sizes:
        piece = [Axis(axis_key(f"{node.name}.{len(outs)}", j), a.ids[start:start + size] if j == dim else a.ids)
                 for j, a in enumerate(src)]
        for a, b in zip(src, piece):
            ctx.axis_edges.append((a.key, b.key, str(node.target)))
        outs.append(piece)
        start += size
    return outs


def _equal_pieces(ctx: RuleContext, node: fx.Node, src: list[Axis], dim: int, each: int):
    """Split into pieces of ``each`` (chunk / split by size): every piece must lose the same indices.

    The model splits by a count or a size derived from its config, so after a cut the pieces
    must still be equal: index ``i`` of every piece is coupled (GLU gate/up halves, fused
    q/k/v thirds). A ragged last piece cannot stay ragged-by-the-same-amount: freeze the axis.
    """
    total = src[dim].size
    sizes = [min(each, total - s) for s in range(0, total, each)]
    pieces = _pieces(ctx, node, src, dim, sizes)
    if len(set(sizes)) > 1:
        ctx.freeze(src[dim], f"uneven {node.target} at {ctx.where()}")
    else:
        for piece in pieces[1:]:
            ctx.couple(pieces[0][dim], piece[dim], f"{node.target} (equal pieces)")
    return pieces


@register(aten.split, aten.split_copy)
def split(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    dim = norm_dim(op_arg(node, "dim", 0), len(src))
    spec = op_arg(node, "split_size")
    if isinstance(spec, (list, tuple)):  # split.sizes
        return _sized_pieces(ctx, node, src, dim, list(spec))
    return _equal_pieces(ctx, node, src, dim, int(spec))


@register(aten.split_with_sizes, aten.split_with_sizes_copy)
def split_with_sizes(ctx: RuleContext, node: fx.Node):
    # explicit sizes (q/k/v of different widths): each piece follows its own structure
    src = ctx.tensor_axes(node.args[0])
    dim = norm_dim(op_arg(node, "dim", 0), len(src))
    sizes = list(op_arg(node, "split_sizes"))
    if not all(isinstance(size, int) for size in sizes):
        return _data_pieces(ctx, node, src, dim)
    return _sized_pieces(ctx, node, src, dim, sizes)


def _data_pieces(ctx: RuleContext, node: fx.Node, src: list[Axis], dim: int):
    """Split by sizes computed from data (JetMoE groups tokens by expert with ``expert_size.tolist()``):
    the split axis is data, frozen, and each piece gets its own (data-sized) axis there; the other
    axes pass through to every piece."""
    vals = node.meta.get("val")
    if not isinstance(vals, (list, tuple)):
        return NotImplemented
    ctx.freeze(src[dim], f"split by data at {ctx.where()}")
    pieces = []
    for k, val in enumerate(vals):
        piece = [Axis(axis_key(f"{node.name}.{k}", j), a.ids) for j, a in enumerate(src)]
        piece[dim] = Axis(axis_key(f"{node.name}.{k}", dim), ctx.new_ids(size_of(val.shape[dim])))
        ctx.freeze(piece[dim], f"split by data at {ctx.where()}")
        for a, b in zip(src, piece):
            ctx.axis_edges.append((a.key, b.key, str(node.target)))
        pieces.append(piece)
    return pieces


def _sized_pieces(ctx: RuleContext, node: fx.Node, src: list[Axis], dim: int, sizes: list[int]):
    """Pieces of explicit sizes: the module passes those sizes (``[self.intermediate_size,
    self.conv_dim, self.num_heads]``), so each piece's length is recorded as set by the code."""
    pieces = _pieces(ctx, node, src, dim, sizes)
    for piece, size in zip(pieces, sizes):
        ctx.sized_by_code(piece[dim], size)
    return pieces


@register(aten.chunk, aten.unsafe_chunk)
def chunk(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    dim = norm_dim(op_arg(node, "dim", 0), len(src))
    each = -(-src[dim].size // op_arg(node, "chunks"))
    return _equal_pieces(ctx, node, src, dim, each)


@register(aten.unbind)
def unbind(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    dim = norm_dim(op_arg(node, "dim", 0), len(src))
    ctx.freeze(src[dim], f"unbind at {ctx.where()}")
    kept = [a for j, a in enumerate(src) if j != dim]
    return [[ctx.same(a, node, j) for j, a in enumerate(kept)] for _ in range(src[dim].size)]


@register(aten.stack)
def stack(ctx: RuleContext, node: fx.Node):
    # unsqueeze every input at ``dim`` and concatenate: inputs are coupled dim by dim, the new
    # axis indexes the inputs (fresh, like the size-1 axes unsqueeze makes)
    parts = [ctx.tensor_axes(t) for t in node.args[0]]
    shape = shape_of(node)
    if shape is None or not parts or any(p is None or len(p) != len(shape) - 1 for p in parts):
        return NotImplemented
    dim = norm_dim(op_arg(node, "dim", 0), len(shape))
    out = []
    for j, axis in enumerate(parts[0]):
        out.append(ctx.same(axis, node, j if j < dim else j + 1))
        for p in parts[1:]:
            ctx.couple(axis.ids, p[j].ids, "stack")
            ctx.axis_edges.append((p[j].key, out[-1].key, "stack"))
    out.insert(dim, ctx.fresh(node, dim, len(parts)))
    return out


@register(operator.getitem)
def getitem(ctx: RuleContext, node: fx.Node):
    source, index = node.args
    value = ctx.axes.get(source.name) if isinstance(source, fx.Node) else None
    if not is_multi(value) or not isinstance(index, int):
        return None if shape_of(node) is None else NotImplemented
    if value[index] is None:
        return None if shape_of(node) is None else NotImplemented
    return [ctx.same(a, node, j) for j, a in enumerate(value[index])]
