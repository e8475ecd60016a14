"""Per-op dependency rules. Add a rule for a new op with :func:`register` in the module for
its kind (pointwise, shape, indexing, contraction, normalization, creation, sequence); one rule per op
(a second registration raises :class:`~depgraph.errors.RuleError`); see docs/adding-rules.md."""

from . import contraction, creation, indexing, normalization, pointwise, sequence, shape  # noqa: F401
from .context import Axis, ParamUse, Relation, RuleContext, module_path, shape_of
from .registry import RULES, apply_rule, lookup, register, unregister

__all__ = ["Axis", "ParamUse", "Relation", "RuleContext", "RULES", "apply_rule", "lookup", "register", "unregister",
           "module_path", "shape_of"]
