"""Views and data movement: reshape, transpose, slicing, concatenation, repetition.

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

from .context import Axis, RuleContext, axis_key, shape_of
from .registry import register

aten = torch.ops.aten


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def reshape_axes(ctx: RuleContext, node: fx.Node, src: list[Axis], out_shape) -> list[Axis]:
    """Axes of ``src`` reshaped (row-major) to ``out_shape``."""
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
        fresh = [ctx.fresh(node, j, s) for j, s in gk]
        for (j, _), axis in zip(gk, fresh):
            out[j] = axis
        if len(gi) == 1:
            ctx.product(gi[0], fresh)
        elif len(gk) == 1:
            ctx.product(fresh[0], gi)
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
    return reshape_axes(ctx, node, src, shape)


@register(aten.transpose, aten.swapaxes, aten.swapdims)
def transpose(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    nd = len(src)
    d0, d1 = _dim(node.args[1], nd), _dim(node.args[2], nd)
    order = list(range(nd))
    order[d0], order[d1] = order[d1], order[d0]
    return [ctx.same(src[o], node, j) for j, o in enumerate(order)]


@register(aten.permute)
def permute(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    order = [_dim(d, len(src)) for d in node.args[1]]
    return [ctx.same(src[o], node, j) for j, o in enumerate(order)]


@register(aten.t, aten.numpy_T)
def matrix_t(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    return [ctx.same(a, node, j) for j, a in enumerate(reversed(src))]


@register(aten.unsqueeze)
def unsqueeze(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    d = _dim(node.args[1], len(src) + 1)
    out = [ctx.same(a, node, j if j < d else j + 1) for j, a in enumerate(src)]
    out.insert(d, ctx.fresh(node, d, 1))
    return out


@register(aten.squeeze)
def squeeze(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    if len(node.args) > 1:
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        drop = {_dim(d, len(src)) for d in dims if src[_dim(d, len(src))].size == 1}
    else:
        drop = {j for j, a in enumerate(src) if a.size == 1}
    kept = [a for j, a in enumerate(src) if j not in drop]
    return [ctx.same(a, node, j) for j, a in enumerate(kept)]


@register(aten.expand, aten.expand_copy, aten.broadcast_to)
def expand(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    shape = shape_of(node)
    lead = len(shape) - len(src)
    out = [ctx.fresh(node, j, shape[j]) for j in range(lead)]
    for j, a in enumerate(src):
        size = shape[lead + j]
        out.append(ctx.same(a, node, lead + j) if a.size == size else ctx.fresh(node, lead + j, size))
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
    reps = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if src is None or not isinstance(reps, int) or dim is None:
        return NotImplemented
    dim = _dim(dim, len(src))
    return [ctx.same(a, node, j, np.repeat(a.ids, reps) if j == dim else None) for j, a in enumerate(src)]


@register(aten.slice)
def slice_(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    args = list(node.args) + [None] * 5
    dim = _dim(args[1] if args[1] is not None else 0, len(src))
    start = args[2] if args[2] is not None else 0
    end = args[3] if args[3] is not None else src[dim].size
    step = args[4] if args[4] is not None else 1
    sub = slice(*slice(start, end, step).indices(src[dim].size))
    return [ctx.same(a, node, j, a.ids[sub] if j == dim else None) for j, a in enumerate(src)]


@register(aten.narrow)
def narrow(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    dim = _dim(node.args[1], len(src))
    start, length = node.args[2], node.args[3]
    start = start + src[dim].size if start < 0 else start
    return [ctx.same(a, node, j, a.ids[start:start + length] if j == dim else None) for j, a in enumerate(src)]


@register(aten.select)
def select(ctx: RuleContext, node: fx.Node):
    # code that reads one fixed index would read another neuron after a cut: freeze the axis
    src = ctx.tensor_axes(node.args[0])
    dim = _dim(node.args[1], len(src))
    ctx.freeze(src[dim], f"select at {ctx.where()}")
    kept = [a for j, a in enumerate(src) if j != dim]
    return [ctx.same(a, node, j) for j, a in enumerate(kept)]


@register(aten.cat, aten.concat, aten.concatenate)
def cat(ctx: RuleContext, node: fx.Node):
    parts = [ctx.tensor_axes(t) for t in node.args[0]]
    shape = shape_of(node)
    parts = [p for p in parts if p is not None and len(p) == len(shape)]  # legacy 1-D empties
    dim = _dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), len(shape))
    out = []
    for j in range(len(shape)):
        if j == dim:
            out.append(Axis(axis_key(node.name, j), np.concatenate([p[j].ids for p in parts])))
            for p in parts:
                ctx.axis_edges.append((p[j].key, out[-1].key, "cat"))
        else:
            for p in parts[1:]:
                ctx.couple(parts[0][j], p[j], "cat")
            out.append(ctx.same(parts[0][j], node, j))
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


@register(aten.split, aten.split_with_sizes, aten.split_copy)
def split(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    dim = _dim(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), len(src))
    spec = node.args[1]
    total = src[dim].size
    sizes = list(spec) if isinstance(spec, (list, tuple)) else [min(spec, total - s) for s in range(0, total, spec)]
    return _pieces(ctx, node, src, dim, sizes)


@register(aten.chunk)
def chunk(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    dim = _dim(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), len(src))
    total = src[dim].size
    each = -(-total // node.args[1])
    sizes = [min(each, total - s) for s in range(0, total, each)]
    return _pieces(ctx, node, src, dim, sizes)


@register(aten.unbind)
def unbind(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    dim = _dim(node.args[1] if len(node.args) > 1 else 0, len(src))
    ctx.freeze(src[dim], f"unbind at {ctx.where()}")
    kept = [a for j, a in enumerate(src) if j != dim]
    return [[ctx.same(a, node, j) for j, a in enumerate(kept)] for _ in range(src[dim].size)]


@register(operator.getitem)
def getitem(ctx: RuleContext, node: fx.Node):
    source, index = node.args
    value = ctx.axes.get(source.name) if isinstance(source, fx.Node) else None
    if not value or not isinstance(value[0], list) or not isinstance(index, int):
        return None if shape_of(node) is None else NotImplemented
    return [ctx.same(a, node, j) for j, a in enumerate(value[index])]
