"""Registry of per-op rules: one small function per op kind, looked up by target.

A rule is ``rule(ctx, node) -> axes``: it receives the :class:`RuleContext` and the FX node,
reads its inputs' axes with ``ctx.tensor_axes(arg)`` and returns the output axes (a list,
one :class:`Axis` per dimension; or a list of such lists for ops returning several tensors).

Lookup order: exact overload (``aten.add.Tensor``), then overload packet (``aten.add``), then the
packet's name (for custom ops registered after import, e.g. ``"transformers.grouped_mm_fallback"``),
then the ``pointwise`` tag torch puts on elementwise ops, then the conservative fallback.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .context import RuleContext

Rule = Callable[[RuleContext, torch.fx.Node], object]

RULES: dict[object, Rule] = {}


def register(*targets) -> Callable[[Rule], Rule]:
    """Decorator: use this rule for every op in ``targets`` (overloads or packets)."""

    def wrap(fn: Rule) -> Rule:
        for target in targets:
            RULES[target] = fn
        return fn

    return wrap


def lookup(target) -> Rule | None:
    """The rule for an FX ``call_function`` target, or None when no rule applies."""
    rule = RULES.get(target)
    if rule is not None:
        return rule
    packet = getattr(target, "overloadpacket", None)
    if packet is not None and packet in RULES:
        return RULES[packet]
    # ops of libraries that register them lazily are keyed by name ("transformers.grouped_mm_fallback")
    name = str(packet if packet is not None else target)
    if name in RULES:
        return RULES[name]
    tags = getattr(target, "tags", ())
    if torch.Tag.pointwise in tags:
        return RULES.get("pointwise")
    return None
