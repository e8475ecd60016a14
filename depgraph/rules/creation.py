"""Tensors created from nothing (constants, ranges, masks): fresh neurons, no coupling.

A range is positional: ``arange(n)`` is rebuilt as ``arange(n - k)`` after a cut, which is
not ``arange(n)`` with ``k`` entries removed. Channels that meet a range (ALiBi slopes,
sinusoidal tables computed in ``forward``) are therefore frozen; constant fills are safe.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .context import RuleContext, shape_of
from .registry import register

aten = torch.ops.aten


@register(aten.arange, aten.ones, aten.zeros, aten.full, aten.empty, aten.scalar_tensor, aten.new_ones,
          aten.new_zeros, aten.new_full, aten.new_empty, aten.zeros_like, aten.ones_like, aten.full_like,
          aten.empty_like, aten.rand, aten.randn, aten.rand_like, aten.randn_like, aten.linspace,
          aten.tensor, aten.eye, aten.logspace, aten.tril, aten.triu, aten.randint, aten.empty_strided, aten.new_empty_strided)
def created(ctx: RuleContext, node: fx.Node):
    shape = shape_of(node)
    if shape is None:
        return None
    if node.target in (aten.tril.default, aten.triu.default):
        src = ctx.tensor_axes(node.args[0])
        if src is not None:
            return [ctx.same(a, node, j) for j, a in enumerate(src)]
    out = [ctx.fresh(node, j, s) for j, s in enumerate(shape)]
    if node.target.overloadpacket in (aten.arange, aten.linspace, aten.logspace):
        for axis in out:
            ctx.freeze(axis, f"positional values of {node.target} at {ctx.where()}")
    return out
