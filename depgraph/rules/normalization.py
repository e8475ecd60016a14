"""Normalisations and reductions.

A norm's weight and bias are the same neurons as the normalised channels. Norms and
reductions *mix* the channels they reduce over (pruning one changes the statistic), which
is why hidden-channel (Type C) cuts are approximate while MLP-neuron and head cuts are exact.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .context import RuleContext, op_arg
from .pointwise import pointwise
from .registry import register

aten = torch.ops.aten


def _normalise(ctx: RuleContext, node: fx.Node, weight, bias, n_dims: int):
    xa = ctx.tensor_axes(node.args[0])
    if xa is None:
        return NotImplemented
    for j in range(1, n_dims + 1):
        ctx.mix(xa[-j])
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


def _reduced_dims(node: fx.Node, ndim: int) -> set[int]:
    # read ``dim`` by name: positional scalars before it (norm's p, kthvalue's k) are not dims
    dims = op_arg(node, "dim")
    if dims is None:
        return set(range(ndim))
    dims = [dims] if isinstance(dims, int) else list(dims)
    return {d % ndim for d in dims} if dims else set(range(ndim))


@register(aten.mean, aten.sum, aten.amax, aten.amin, aten.var, aten.std, aten.norm, aten.linalg_vector_norm,
          aten.logsumexp, aten.prod, aten.any, aten.all, aten.count_nonzero, aten.var_mean, aten.std_mean,
          aten.aminmax)
def reduce(ctx: RuleContext, node: fx.Node):
    xa = ctx.tensor_axes(node.args[0])
    val = node.meta.get("val")
    if xa is None or val is None:
        return NotImplemented
    nd = len(xa)
    reduced = _reduced_dims(node, nd)
    for j in reduced:
        ctx.mix(xa[j])

    def one(shape) -> list:
        keep = len(shape) == nd
        out = []
        for j, a in enumerate(xa):
            if j in reduced:
                if keep:
                    out.append(ctx.fresh(node, j, 1))
            else:
                out.append(ctx.same(a, node, len(out)))
        return out

    if isinstance(val, (tuple, list)):  # var_mean / std_mean / aminmax: one result per statistic
        return [one(v.shape) for v in val]
    return one(val.shape)


@register(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, aten.cumsum, aten.cumprod,
          aten._safe_softmax)
def along_dim(ctx: RuleContext, node: fx.Node):
    # shape-preserving ops that mix values along one dimension: the neurons stay in place
    xa = ctx.tensor_axes(node.args[0])
    if xa is None:
        return NotImplemented
    dim = node.args[1] if len(node.args) > 1 and isinstance(node.args[1], int) else node.kwargs.get("dim")
    if isinstance(dim, int):
        ctx.mix(xa[dim % len(xa)])
    return [ctx.same(a, node, j) for j, a in enumerate(xa)]


@register(aten.max, aten.min, aten.sort, aten.topk, aten.kthvalue, aten.median, aten.mode, aten.cummax,
          aten.cummin)
def reduce_with_indices(ctx: RuleContext, node: fx.Node):
    """(values, indices) along ``dim``: that axis names positions, so it is frozen.

    The other axes are untouched by the op (a max over the sequence keeps every hidden
    channel in place): the values pass them through; the indices are data (fresh, frozen).
    """
    xa = ctx.tensor_axes(node.args[0])
    val = node.meta.get("val")
    if xa is None:
        return NotImplemented
    if not isinstance(val, (tuple, list)):  # max.other / min.other / max() without a dim
        if len(node.args) > 1 and isinstance(node.args[1], fx.Node):
            return pointwise(ctx, node)
        return reduce(ctx, node)
    dim = op_arg(node, "dim", -1) % len(xa)
    ctx.freeze(xa[dim], f"{node.target} indices at {ctx.where()}")
    values = []
    for j, a in enumerate(xa):
        if j == dim:
            if len(val[0].shape) == len(xa):  # keepdim, or sort/topk/cummax keep the axis
                values.append(ctx.fresh(node, len(values), int(val[0].shape[j])))
                ctx.freeze(values[-1], "positions")
        else:
            values.append(ctx.same(a, node, len(values)))
    outs = [values]
    for v in val[1:]:
        outs.append([ctx.fresh(node, j, s) for j, s in enumerate(v.shape)])
        for axis in outs[-1]:
            ctx.freeze(axis, "positions")
    return outs
