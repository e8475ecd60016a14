"""Tensors created from nothing (constants, ranges, masks): fresh neurons, no coupling."""

from __future__ import annotations

import torch
import torch.fx as fx

from .context import RuleContext, shape_of
from .registry import register

aten = torch.ops.aten


@register(aten.arange, aten.ones, aten.zeros, aten.full, aten.empty, aten.scalar_tensor, aten.new_ones,
          aten.new_zeros, aten.new_full, aten.new_empty, aten.zeros_like, aten.ones_like, aten.full_like,
          aten.empty_like, aten.rand, aten.randn, aten.rand_like, aten.randn_like, aten.linspace,
          aten.tensor, aten.eye, aten.tril, aten.triu, aten.randint, aten.empty_strided, aten.new_empty_strided)
def created(ctx: RuleContext, node: fx.Node):
    shape = shape_of(node)
    if shape is None:
        return None
    if node.target in (aten.tril.default, aten.triu.default):
        src = ctx.tensor_axes(node.args[0])
        if src is not None:
            return [ctx.same(a, node, j) for j, a in enumerate(src)]
    return [ctx.fresh(node, j, s) for j, s in enumerate(shape)]
