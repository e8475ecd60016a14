"""Normalisations and reductions.

A norm's weight and bias are the same neurons as the normalised channels. Norms and
reductions *mix* the channels they reduce over (pruning one changes the statistic), which
is why hidden-channel (Type C) cuts are approximate while MLP-neuron and head cuts are exact.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .context import RuleContext, shape_of
from .pointwise import pointwise
from .registry import register

aten = torch.ops.aten


def _normalise(ctx: RuleContext, node: fx.Node, weight, bias, n_dims: int):
    xa = ctx.tensor_axes(node.args[0])
    if xa is None:
        return NotImplemented
    for param, role in ((weight, "scale"), (bias, "bias")):
        pa = ctx.tensor_axes(param)
        if pa is None:
            continue
        for j in range(1, n_dims + 1):
            ctx.couple(xa[-j], pa[-j], "norm weight")
            ctx.use(param, len(pa) - j, role)
    return [ctx.same(a, node, j) for j, a in enumerate(xa)]


def _arg(node: fx.Node, i: int, name: str):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


@register(aten.layer_norm)
def layer_norm(ctx: RuleContext, node: fx.Node):
    return _normalise(ctx, node, _arg(node, 2, "weight"), _arg(node, 3, "bias"), len(node.args[1]))


@register(aten.rms_norm)
def rms_norm(ctx: RuleContext, node: fx.Node):
    return _normalise(ctx, node, _arg(node, 2, "weight"), None, len(node.args[1]))


@register(aten.native_layer_norm)
def native_layer_norm(ctx: RuleContext, node: fx.Node):
    out = _normalise(ctx, node, _arg(node, 2, "weight"), _arg(node, 3, "bias"), len(node.args[1]))
    stats = [[ctx.fresh(node, j, s) for j, s in enumerate(v.shape)] for v in node.meta["val"][1:]]
    return [out, *stats]


@register(aten.mean, aten.sum, aten.amax, aten.amin, aten.var, aten.std, aten.norm, aten.linalg_vector_norm,
          aten.logsumexp, aten.prod, aten.any, aten.all, aten.count_nonzero, aten.var_mean)
def reduce(ctx: RuleContext, node: fx.Node):
    xa = ctx.tensor_axes(node.args[0])
    shape = shape_of(node)
    if xa is None or shape is None:
        return NotImplemented
    dims = None
    for arg in list(node.args[1:]) + [node.kwargs.get("dim")]:
        if isinstance(arg, int) and not isinstance(arg, bool):
            dims = [arg]
            break
        if isinstance(arg, (list, tuple)) and all(isinstance(d, int) for d in arg):
            dims = list(arg)
            break
    nd = len(xa)
    reduced = set(range(nd)) if not dims else {d % nd for d in dims}
    keep = len(shape) == nd
    out = []
    for j, a in enumerate(xa):
        if j in reduced:
            if keep:
                out.append(ctx.fresh(node, j, 1))
        else:
            out.append(ctx.same(a, node, len(out)))
    return out


@register(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, aten.cumsum, aten.cumprod,
          aten._safe_softmax)
def along_dim(ctx: RuleContext, node: fx.Node):
    # shape-preserving ops that mix values along one dimension: the neurons stay in place
    xa = ctx.tensor_axes(node.args[0])
    if xa is None:
        return NotImplemented
    return [ctx.same(a, node, j) for j, a in enumerate(xa)]


@register(aten.max, aten.min, aten.sort, aten.topk, aten.kthvalue, aten.median, aten.mode)
def reduce_with_indices(ctx: RuleContext, node: fx.Node):
    # values/indices pairs along a dimension: indices name positions, so that axis is frozen
    xa = ctx.tensor_axes(node.args[0])
    val = node.meta.get("val")
    if xa is None:
        return NotImplemented
    if not isinstance(val, (tuple, list)):  # max.other / min.other / max() without a dim
        if len(node.args) > 1 and isinstance(node.args[1], fx.Node):
            return pointwise(ctx, node)
        return reduce(ctx, node)
    dim = node.args[1] if len(node.args) > 1 and isinstance(node.args[1], int) else -1
    if node.target in (aten.topk.default,):
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
    dim = dim % len(xa)
    ctx.freeze(xa[dim], f"{node.target} indices at {ctx.where()}")
    outs = []
    for v in val:
        outs.append([ctx.fresh(node, j, s) for j, s in enumerate(v.shape)])
        for axis in outs[-1]:
            ctx.freeze(axis, "positions")
    return outs
