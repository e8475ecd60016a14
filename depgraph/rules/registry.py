"""Registry of per-op rules: one small function per op kind, looked up by target.

A rule is ``rule(ctx, node) -> axes``: it receives the :class:`RuleContext` and the FX node,
reads its inputs' axes with ``ctx.tensor_axes(arg)`` and returns the output axes (a list,
one :class:`Axis` per dimension; or a list of such lists for ops returning several tensors).

Lookup order: exact overload (``aten.add.Tensor``), then overload packet (``aten.add``), then the
packet's name (for custom ops registered after import, e.g. ``"transformers.grouped_mm_fallback"``),
then the ``pointwise`` tag torch puts on elementwise ops, then the conservative fallback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from ..errors import RuleError
from .context import RuleContext

Rule = Callable[[RuleContext, torch.fx.Node], object]

log = logging.getLogger("depgraph")

# what a rule raises when it meets a variant of its op it cannot read (an argument in another
# position, a data-dependent size): the op then gets the conservative rule, never a guess
FALLBACK_ERRORS = (TypeError, IndexError, ValueError, AttributeError, KeyError, GuardOnDataDependentSymNode)

RULES: dict[object, Rule] = {}


def _rule_name(fn: Rule) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def _overlap(target) -> object | None:
    """A registered key that names the same op as ``target`` (itself, its packet, or one of its overloads)."""
    if target in RULES:
        return target
    packet = getattr(target, "overloadpacket", None)
    if packet is not None and packet in RULES:
        return packet
    overloads = getattr(target, "overloads", None)
    if callable(overloads) and not isinstance(target, str):
        for name in overloads():
            overload = getattr(target, name, None)
            if overload is not None and overload in RULES:
                return overload
    return None


def register(*targets) -> Callable[[Rule], Rule]:
    """Decorator: use this rule for every op in ``targets`` (overloads, packets, or names).

    Each op has exactly one rule: registering a second one for an op (or for its packet / one of
    its overloads) raises :class:`~depgraph.errors.RuleError` before anything is registered, so a
    rule can never silently replace another depending on import order.
    """

    def wrap(fn: Rule) -> Rule:
        for k, target in enumerate(targets):
            taken = _overlap(target)
            if taken is None and target in targets[:k]:
                taken = target
            if taken is not None:
                owner = _rule_name(RULES[taken]) if taken in RULES else _rule_name(fn)
                raise RuleError(f"{target} already has a rule ({owner}, registered for {taken}); "
                                f"{_rule_name(fn)} would replace it depending on import order. Extend that "
                                f"rule instead (branch on node.target inside it), or unregister() it first.")
        for target in targets:
            RULES[target] = fn
        return fn

    return wrap


def unregister(*targets) -> None:
    """Remove the rules of ``targets`` (exact keys), e.g. to replace a built-in rule with your own."""
    missing = [t for t in targets if t not in RULES]
    if missing:
        raise RuleError(f"no rule is registered for {missing}; registered keys are exact overloads, packets or names")
    for target in targets:
        del RULES[target]


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


def apply_rule(ctx: RuleContext, node: torch.fx.Node):
    """Run ``node``'s rule: its output axes, or ``NotImplemented`` when no rule applies or the rule cannot
    read this variant of its op (the caller then applies the conservative rule: freeze what it touches)."""
    rule = lookup(node.target)
    if rule is None:
        return NotImplemented
    try:
        return rule(ctx, node)
    except FALLBACK_ERRORS as exc:
        log.debug("rule for %s failed on %s: %s", node.target, node.name, exc)
        return NotImplemented
