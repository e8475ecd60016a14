"""Ops over the sequence axis of recurrent / state-space mixers: 1-D convolution and padding.

Mamba, gated-delta-net and RG-LRU blocks run a causal *depthwise* ``conv1d`` (``groups ==
channels``) over their projected channels: channel ``c`` of the output reads only channel ``c``
of the input and row ``c`` of the weight, so those are one neuron, and cutting it is exact.
Other groupings mix channels in blocks whose size the module hard-codes: they are left to the
conservative rule. The length axis (positions, shifted by the padding) is never a unit.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .context import Axis, RuleContext, op_arg, shape_of
from .registry import register

aten = torch.ops.aten


@register(aten.conv1d)
def conv1d(ctx: RuleContext, node: fx.Node):
    """``conv1d(x [N, C_in, L], w [C_out, C_in / groups, K], bias)``: depthwise or dense."""
    x, w, bias = node.args[0], node.args[1], op_arg(node, "bias")
    xa, wa = ctx.tensor_axes(x), ctx.tensor_axes(w)
    shape = shape_of(node)
    groups = op_arg(node, "groups", 1)
    if xa is None or wa is None or shape is None or len(wa) != 3 or len(xa) != len(shape) or len(xa) < 2:
        return NotImplemented
    c_in, c_out = xa[-2].size, wa[0].size
    if groups == 1:  # dense: like a linear layer over the channel axis, for every position
        ctx.couple(xa[-2], wa[1], "conv1d input channels")
        ctx.use(w, 1, "in")
        ctx.use(w, 0, "out")
    elif groups == c_in == c_out and wa[1].size == 1:  # depthwise: channel c only reads channel c
        ctx.couple(xa[-2], wa[0], "depthwise conv1d channels")
        ctx.use(w, 0, "scale")
        ctx.freeze(wa[1], f"conv1d channels per group at {ctx.where()}")
    else:  # grouped: blocks of channels whose size the module hard-codes
        return NotImplemented
    ctx.freeze(wa[2], f"conv1d kernel at {ctx.where()}")
    ba = ctx.tensor_axes(bias)
    if ba is not None:
        ctx.couple(wa[0], ba[-1], "conv1d bias")
        ctx.use(bias, len(ba) - 1, "bias")
    out = [ctx.same(a, node, j) for j, a in enumerate(xa[:-2])]
    out.append(ctx.same(wa[0], node, len(out)))
    # the kernel mixes neighbouring positions (and padding / stride shift them): never units
    ctx.freeze(xa[-1], f"conv1d positions at {ctx.where()}")
    out.append(ctx.fresh(node, len(out), shape[-1]))
    ctx.freeze(out[-1], f"conv1d positions at {ctx.where()}")
    return out


@register(aten.pad, aten.constant_pad_nd)
def pad(ctx: RuleContext, node: fx.Node):
    """``pad(x, [left_last, right_last, left_prev, ...])``: padded axes get new positions.

    A padded axis is frozen: the amount is often computed from its size (pad to a multiple of
    a chunk), so removing neurons would change the layout. Unpadded axes pass through.
    """
    xa = ctx.tensor_axes(node.args[0])
    amounts = op_arg(node, "pad")
    shape = shape_of(node)
    if xa is None or shape is None or not isinstance(amounts, (list, tuple)) or len(xa) != len(shape):
        return NotImplemented
    if not all(isinstance(p, int) for p in amounts):
        return NotImplemented
    padded = {len(xa) - 1 - k // 2 for k, p in enumerate(amounts) if p != 0}
    out: list[Axis] = []
    for j, axis in enumerate(xa):
        if j in padded or axis.size != shape[j]:
            ctx.freeze(axis, f"pad at {ctx.where()}")
            out.append(ctx.fresh(node, j, shape[j]))
            ctx.freeze(out[-1], f"pad at {ctx.where()}")
        else:
            out.append(ctx.same(axis, node, j))
    return out
