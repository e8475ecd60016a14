"""Elementwise ops: aligned dimensions (numpy broadcasting) are the same neurons.

A residual ``add`` couples the hidden channels of its two operands; a norm weight multiplying
the hidden state couples the weight with those channels; ``silu(gate) * up`` couples the
gate and up neurons. A dimension of size 1 broadcast against a larger one couples nothing.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .context import Axis, RuleContext, shape_of
from .registry import register

aten = torch.ops.aten

# Ops torch does not tag "pointwise" but that keep every element in place.
_PASSTHROUGH = (
    aten._to_copy, aten.alias, aten.clone, aten.contiguous, aten.detach, aten.dropout,
    aten.native_dropout, aten.lift_fresh_copy, aten.detach_, aten.masked_fill, aten.masked_fill_, aten.where, aten.clamp,
    aten.clamp_min, aten.clamp_max, aten.feature_dropout, aten.alpha_dropout, aten.copy,
    # in-place ``dst.copy_(src)`` (MLA fills a new_empty key's slices): dst and src are one set of
    # neurons; dst's ids are shared with the tensor it views, so that tensor carries them too
    aten.copy_,
    aten.polar,  # complex rotary tables (DeepSeek-V2): elementwise abs * e^(i angle)
    aten.relu, aten.gelu, aten.silu, aten.tanh, aten.sigmoid, aten.softplus, aten.hardtanh,
    aten.leaky_relu, aten.elu, aten.mish, aten.hardswish, aten.hardsigmoid, aten.celu, aten.selu,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
)


_LAYOUT_PRESERVING = {
    op for packet in (aten.to, aten._to_copy, aten.alias, aten.clone, aten.contiguous, aten.detach,
                      aten.lift_fresh_copy, aten.type_as)
    for op in (getattr(packet, name) for name in packet.overloads())
}


def tensor_inputs(ctx: RuleContext, node: fx.Node) -> list[list[Axis]]:
    """Axes of every tensor argument of ``node`` (positional and keyword, nested lists too)."""
    found: list[list[Axis]] = []

    def visit(arg) -> None:
        if isinstance(arg, fx.Node):
            axes = ctx.tensor_axes(arg)
            if axes is not None:
                found.append(axes)
        elif isinstance(arg, (list, tuple)):
            for item in arg:
                visit(item)

    for arg in list(node.args) + list(node.kwargs.values()):
        visit(arg)
    return found


def broadcast(ctx: RuleContext, node: fx.Node, inputs: list[list[Axis]], out_shape) -> list[Axis]:
    """Output axes of a broadcasting op; couples every non-broadcast input dimension."""
    ndim = len(out_shape)
    out: list[Axis] = []
    for d, size in enumerate(out_shape):
        aligned = []
        for axes in inputs:
            k = len(axes) - (ndim - d)
            if k >= 0 and axes[k].size == size:
                aligned.append(axes[k])
        if not aligned:
            out.append(ctx.fresh(node, d, size))
            continue
        out.append(ctx.same(aligned[0], node, d))
        for other in aligned[1:]:
            # the operands are one set of neurons; in the channel graph each flows into the result
            # (an edge between the operands would point from a norm weight into the activation)
            ctx.couple(aligned[0].ids, other.ids, f"{node.target} (elementwise)")
            ctx.axis_edges.append((other.key, out[-1].key, ctx.op_name()))
    return out


@register("pointwise", *_PASSTHROUGH)
def pointwise(ctx: RuleContext, node: fx.Node):
    shape = shape_of(node)
    if shape is None:
        return None
    inputs = tensor_inputs(ctx, node)
    for axes in inputs:
        if len(axes) > len(shape):  # not a broadcast: let the conservative rule handle it
            return NotImplemented
    out = broadcast(ctx, node, inputs, shape)
    if len(inputs) == 1 and len(inputs[0]) == len(shape) and node.target in _LAYOUT_PRESERVING:
        ctx.view_of_param(node.args[0], node)  # w.to(dtype), w.contiguous(): still the parameter
    name = str(getattr(node.target, "__name__", node.target))
    role = "scale" if ("mul" in name or "div" in name) else "bias" if ("add" in name or "sub" in name) else "other"
    for arg in node.args:
        if ctx.is_param(arg):
            for d in range(len(ctx.tensor_axes(arg))):
                ctx.use(arg, d, role)
    return out


@register(aten.type_as, aten.to)
def type_as(ctx: RuleContext, node: fx.Node):
    # ``x.type_as(other)`` / ``x.to(other)``: ``other`` only lends its dtype and device;
    # coupling it elementwise would tie unrelated channels (e.g. a norm weight's)
    src = ctx.tensor_axes(node.args[0])
    if src is None:
        return NotImplemented
    ctx.view_of_param(node.args[0], node)  # w.to(dtype): still the parameter
    return [ctx.same(a, node, j) for j, a in enumerate(src)]


@register(aten._assert_tensor_metadata, aten._assert_scalar, aten.sym_constrain_range_for_size,
          aten._assert_async)
def no_output(ctx: RuleContext, node: fx.Node):
    return None


@register(aten.item, operator.le, operator.lt, operator.ge, operator.gt, operator.eq, operator.ne)
def scalar(ctx: RuleContext, node: fx.Node):
    # a Python number (``t.item()``, a comparison of sizes): it carries no channels
    return None if shape_of(node) is None else NotImplemented
