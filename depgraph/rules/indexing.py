"""Data-dependent indexing: gather/scatter along one dimension, advanced indexing.

The indexed dimension's positions are chosen by data, so its neurons are frozen; every other
dimension passes through unchanged. This keeps MoE token dispatch (``hidden[token_idx]``,
``out.index_add_(0, token_idx, ...)``) from freezing the hidden channels it carries.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .context import Axis, RuleContext, shape_of
from .pointwise import broadcast
from .registry import register

aten = torch.ops.aten


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


@register(aten.index)
def index(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    indices = list(node.args[1])
    shape = shape_of(node)
    if src is None or shape is None:
        return NotImplemented
    positions = [i for i, t in enumerate(indices) if t is not None]
    index_axes = [ctx.tensor_axes(indices[i]) for i in positions]
    if not positions or any(a is None for a in index_axes):
        return NotImplemented
    for i in positions:
        ctx.freeze(src[i], f"indexed by data at {ctx.where()}")
    rest = [a for i, a in enumerate(src) if i not in positions]
    n_index = len(shape) - len(rest)
    contiguous = positions == list(range(positions[0], positions[-1] + 1))
    lead = positions[0] if contiguous else 0
    index_shape = shape[lead:lead + n_index]
    middle = broadcast(ctx, node, index_axes, index_shape)
    for j, axis in enumerate(middle):  # renumber to the output position
        middle[j] = Axis(f"{node.name}:{lead + j}", axis.ids)
    before = [ctx.same(a, node, j) for j, a in enumerate(src[:lead])] if contiguous else []
    after_src = src[positions[-1] + 1:] if contiguous else rest
    start = lead + n_index
    after = [ctx.same(a, node, start + j) for j, a in enumerate(after_src)]
    out = before + middle + after
    return out if len(out) == len(shape) else NotImplemented


@register(aten.index_select)
def index_select(ctx: RuleContext, node: fx.Node):
    src, idx = ctx.tensor_axes(node.args[0]), ctx.tensor_axes(node.args[2])
    dim = _dim(node.args[1], len(src))
    ctx.freeze(src[dim], f"index_select at {ctx.where()}")
    return [ctx.same(idx[0] if j == dim else a, node, j) for j, a in enumerate(src)]


@register(aten.index_add, aten.index_copy, aten.index_fill)
def index_add(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    dim = _dim(node.args[1], len(src))
    ctx.freeze(src[dim], f"{node.target} at {ctx.where()}")
    other = ctx.tensor_axes(node.args[3]) if len(node.args) > 3 else None
    if other is not None and len(other) == len(src):
        for j, (a, b) in enumerate(zip(src, other)):
            if j != dim and a.size == b.size:
                ctx.couple(a, b, str(node.target))
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
    src, idx = ctx.tensor_axes(node.args[0]), ctx.tensor_axes(node.args[2])
    dim = _dim(node.args[1], len(src))
    ctx.freeze(src[dim], f"gather at {ctx.where()}")
    out = []
    for j, (a, b) in enumerate(zip(src, idx)):
        if j != dim and a.size == b.size:
            ctx.couple(a, b, "gather")
        out.append(ctx.same(b, node, j))
    return out


@register(aten.scatter, aten.scatter_add, aten.scatter_reduce)
def scatter(ctx: RuleContext, node: fx.Node):
    src = ctx.tensor_axes(node.args[0])
    dim = _dim(node.args[1], len(src))
    ctx.freeze(src[dim], f"scatter at {ctx.where()}")
    values = ctx.tensor_axes(node.args[3]) if len(node.args) > 3 else None
    if values is not None and len(values) == len(src):
        for j, (a, b) in enumerate(zip(src, values)):
            if j != dim and a.size == b.size:
                ctx.couple(a, b, "scatter")
    return [ctx.same(a, node, j) for j, a in enumerate(src)]
