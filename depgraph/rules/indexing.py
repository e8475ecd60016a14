"""Data-dependent indexing: gather/scatter along one dimension, index_select, advanced indexing.

Every index rule lives here. The indexed dimension's positions are chosen by data, so its neurons are
frozen; every other dimension passes through unchanged. This keeps MoE token dispatch
(``hidden[token_idx]``, ``out.index_add_(0, token_idx, ...)``) from freezing the hidden channels it
carries. An index fixed in the code (``x[..., [-2], :]``) keeps the rest of its axis prunable
(:func:`constant_values`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from .context import Axis, RuleContext, norm_dim, op_arg, shape_of
from .registry import register

aten = torch.ops.aten


def _couple_besides(ctx: RuleContext, src: list[Axis], other: list[Axis] | None, dim: int, why: str) -> None:
    """``other`` (the values an op writes into ``src``, or its index) runs along ``src`` on every dim but
    ``dim``: index ``i`` of each such dim is the same neuron in both. Where ``other`` is shorter, the op
    covers only a prefix of ``src``'s dim: cutting a neuron there would shift which one the rest reads."""
    if other is None or len(other) != len(src):
        return
    for j, (a, b) in enumerate(zip(src, other)):
        if j == dim:  # positions along ``dim`` are matched by data (or by the index's length): never cut
            ctx.freeze(b, f"{why} at {ctx.where()}")
            continue
        if a.size == b.size:
            ctx.couple(a, b, why)
        elif b.size > 1 or a.size > 1:
            ctx.freeze(a, f"{why}: covers part of the axis at {ctx.where()}")
            ctx.freeze(b, f"{why}: covers part of the axis at {ctx.where()}")


@register(aten.index_select)
def index_select(ctx: RuleContext, node: fx.Node):
    """Rows picked by data (like an embedding lookup): the indexed axis is frozen, the others pass.
    The picked axis has the index's length, which no cut changes: it is frozen too. A fixed index
    written in the code keeps the rest of the axis prunable (as for ``x[..., idx, ...]``)."""
    src = ctx.tensor_axes(node.args[0])
    index = op_arg(node, "index")
    shape = shape_of(node)
    if src is None or shape is None:
        return NotImplemented
    dim = norm_dim(op_arg(node, "dim"), len(src))
    fixed = constant_values(ctx, index)
    if fixed is not None and fixed.ndim == 1:
        return _constant_index(ctx, node, src, dim, fixed)
    ctx.freeze(src[dim], f"index_select at {ctx.where()}")
    idx = ctx.tensor_axes(index)
    if idx is not None and len(idx) == 1 and idx[0].size == shape[dim]:
        picked = ctx.same(idx[0], node, dim)
    else:
        picked = ctx.fresh(node, dim, shape[dim])
    ctx.freeze(picked, f"index_select at {ctx.where()}")
    return [picked if j == dim else ctx.same(a, node, j) for j, a in enumerate(src)]


@register(aten.index_add, aten.index_copy, aten.index_fill)
def index_add(ctx: RuleContext, node: fx.Node):
    """``self.index_add_(dim, index, source)``: rows of ``source`` land on data-chosen rows of ``self``."""
    src = ctx.tensor_axes(node.args[0])
    dim = norm_dim(op_arg(node, "dim"), len(src))
    ctx.freeze(src[dim], f"{node.target} at {ctx.where()}")
    source = op_arg(node, "source")
    _couple_besides(ctx, src, ctx.tensor_axes(source if source is not None else op_arg(node, "value")), dim,
                    str(node.target))
    return [ctx.same(a, node, j) for j, a in enumerate(src)]


@register(aten.index_put, aten.index_put_)  # in place too (X-MOD writes the adapters' rows back)
def index_put(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    indices = list(node.args[1])
    values = ctx.tensor_axes(node.args[2])
    positions = [i for i, t in enumerate(indices) if t is not None]
    for i in positions:
        ctx.freeze(src[i], f"index_put at {ctx.where()}")
    trailing = src[positions[-1] + 1:] if positions else src
    if values is not None:
        for a, b in zip(reversed(trailing), reversed(values)):
            if a.size == b.size:
                ctx.couple(a, b, "index_put values")
    return [ctx.same(a, node, j) for j, a in enumerate(src)]


@register(aten.gather)
def gather(ctx: RuleContext, node: fx.Node):
    """``out[i][j] = src[index[i][j]][j]`` (dim 0): the output has the index's shape."""
    src, idx = ctx.tensor_axes(node.args[0]), ctx.tensor_axes(op_arg(node, "index"))
    if src is None or idx is None:
        return NotImplemented
    dim = norm_dim(op_arg(node, "dim"), len(src))
    ctx.freeze(src[dim], f"gather at {ctx.where()}")
    _couple_besides(ctx, src, idx, dim, "gather")
    return [ctx.same(b, node, j) for j, b in enumerate(idx)]


@register(aten.scatter, aten.scatter_add, aten.scatter_reduce)
def scatter(ctx: RuleContext, node: fx.Node):
    """``self[index[i][j]][j] = src[i][j]`` (dim 0): the index and the values run along ``self``."""
    src = ctx.tensor_axes(node.args[0])
    dim = norm_dim(op_arg(node, "dim"), len(src))
    ctx.freeze(src[dim], f"scatter at {ctx.where()}")
    _couple_besides(ctx, src, ctx.tensor_axes(op_arg(node, "index")), dim, "scatter index")
    _couple_besides(ctx, src, ctx.tensor_axes(op_arg(node, "src")), dim, "scatter")
    return [ctx.same(a, node, j) for j, a in enumerate(src)]


def _is_mask(arg) -> bool:
    val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
    return val is not None and val.dtype in (torch.bool, torch.uint8)


def _masked(ctx: RuleContext, node: fx.Node, src: list[Axis], shape, d: int, mask: fx.Node):
    """``x[:, mask]`` with a boolean mask over dims ``d .. d+k-1`` (X-MOD picks the rows of one language):
    those dims become one axis of the selected elements (data: frozen, like the masked dims); the
    dims before and after pass through, so the channels the rows carry stay prunable."""
    k = len(mask.meta["val"].shape)
    if len(shape) != len(src) - k + 1 or [a.size for a in src[d:d + k]] != list(shape_of(mask) or ()):
        return NotImplemented
    for axis in src[d:d + k]:
        ctx.freeze(axis, f"boolean mask at {ctx.where()}")
    picked = ctx.fresh(node, d, shape[d])
    ctx.freeze(picked, f"boolean mask at {ctx.where()}")
    before = [ctx.same(a, node, j) for j, a in enumerate(src[:d])]
    after = [ctx.same(a, node, d + 1 + j) for j, a in enumerate(src[d + k:])]
    return before + [picked] + after


@register(aten.index)
def index(ctx: RuleContext, node: fx.Node):
    """Advanced indexing ``x[..., idx, ...]``: indexed axes are frozen, the other axes pass through.

    The broadcast index dims go where numpy puts them: in place of the indexed dims when
    those are adjacent, first otherwise. One boolean mask: :func:`_masked`; other masks are not handled.
    """
    src = ctx.tensor_axes(node.args[0])
    shape = shape_of(node)
    indices = list(op_arg(node, "indices"))
    if src is None or shape is None:
        return NotImplemented
    where = [d for d, ix in enumerate(indices) if ix is not None]
    if len(where) == 1 and _is_mask(indices[where[0]]):
        return _masked(ctx, node, src, shape, where[0], indices[where[0]])
    idx_axes = []
    for d in where:
        val = indices[d].meta.get("val") if isinstance(indices[d], fx.Node) else None
        axes = ctx.tensor_axes(indices[d])
        if axes is None or val is None or val.dtype in (torch.bool, torch.uint8):
            return NotImplemented
        idx_axes.append(axes)
    if not where:
        return [ctx.same(a, node, j) for j, a in enumerate(src)]
    fixed = constant_values(ctx, indices[where[0]]) if len(where) == 1 else None
    if fixed is not None and fixed.ndim == 1 and len(shape) == len(src):
        return _constant_index(ctx, node, src, where[0], fixed)
    nb = max(len(a) for a in idx_axes)
    rest = [(d, a) for d, a in enumerate(src) if d not in where]
    adjacent = where == list(range(where[0], where[-1] + 1))
    pos = where[0] if adjacent else 0
    if len(rest) + nb != len(shape):
        return NotImplemented
    for d in where:
        ctx.freeze(src[d], f"index at {ctx.where()}")
    out: list[Axis] = []
    for j in range(len(shape)):
        if pos <= j < pos + nb:  # a broadcast index dim: index tensors aligned from the right
            aligned = [a[len(a) - nb + (j - pos)] for a in idx_axes if len(a) - nb + (j - pos) >= 0]
            aligned = [a for a in aligned if a.size == shape[j]]
            for other in aligned[1:]:
                ctx.couple(aligned[0], other, "index broadcast")
            if aligned:
                out.append(ctx.same(aligned[0], node, j))
            else:  # values picked by data, with a length no cut changes
                out.append(ctx.fresh(node, j, shape[j]))
                ctx.freeze(out[-1], f"index at {ctx.where()}")
        else:
            _, axis = rest[j if j < pos else j - nb]
            out.append(ctx.same(axis, node, j))
    return out


_CONSTANT_VIEWS = {aten.lift_fresh_copy.default, aten.clone.default, aten.detach.default,
                   aten._to_copy.default, aten.alias.default}


def constant_values(ctx: RuleContext, arg) -> np.ndarray | None:
    """Values of an integer tensor constant written in the model's code (``x[..., [-2], :]``), else None."""
    while isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target in _CONSTANT_VIEWS:
        arg = arg.args[0]
    value = ctx.constants.get(arg.name) if isinstance(arg, fx.Node) else None
    if value is None or value.dtype in (torch.bool, torch.uint8):
        return None
    return value.detach().cpu().numpy().astype(np.int64)


def _constant_index(ctx: RuleContext, node: fx.Node, src: list[Axis], dim: int, values: np.ndarray):
    """``x[..., idx, ...]`` with a fixed 1-D ``idx``: the picked neurons carry through.

    A fixed index keeps naming the same neuron after a cut only if nothing between it and the end
    it counts from is cut: index ``v >= 0`` needs positions ``0..v`` kept, ``v < 0`` positions
    ``n+v..n-1``. Those are frozen; the rest of the axis stays prunable (Falcon's fused
    ``[query heads.., k, v]`` axis: k and v picked by ``[-2]``/``[-1]``, the query heads cut).
    """
    n = src[dim].size
    if values.size and (values.max() >= n or values.min() < -n):
        return NotImplemented
    kept = np.zeros(n, dtype=bool)
    for v in values.tolist():
        if v >= 0:
            kept[:v + 1] = True
        else:
            kept[n + v:] = True
    ctx.freeze(src[dim].ids[kept], f"fixed index at {ctx.where()}")
    picked = src[dim].ids[values % n] if n else src[dim].ids
    return [ctx.same(a, node, j, picked if j == dim else None) for j, a in enumerate(src)]
