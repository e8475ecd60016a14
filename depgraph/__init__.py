"""depgraph: find, score, cut and draw the coupled structures inside transformer models.

>>> graph = depgraph.trace(model)                 # trace -> rules -> graph -> groups
>>> a0 = graph.groups("A")[0]
>>> graph.prune({a0: [0, 5, 7]})                  # exact structural cut, atomic
>>> depgraph.save_pretrained(model, "out/")       # reload with depgraph.load_pretrained("out/")
"""

from .checkpoint import load_pretrained, save_pretrained
from .cut import PruneReport, count_parameters, prune, validate_plan, zero_mask
from .depth import RemovalReport, block_importance, find_blocks, remove_layers, remove_least_important
from .errors import DepGraphError, HealError, PruneError, TraceError, UnsupportedModelError
from .experts import (
    ExpertRemovalReport,
    ExpertSet,
    expert_importance,
    find_experts,
    remove_experts,
    remove_least_important_experts,
)
from .graph import DependencyGraph, trace
from .groups import Group, GroupKind, Member
from .heal import HealReport, heal
from .importance import criterion, member_scores, score
from .pruner import Pruner, TargetReport, simulate_params
from .sparsity import check_n_m, make_permanent, sensitivity, sparsify, storage_report

__version__ = "0.1.0"

from . import depth, experts, importance, pruner  # noqa: E402  (submodules as namespaces)

__all__ = [
    "RemovalReport", "block_importance", "depth", "find_blocks", "remove_layers", "remove_least_important",
    "ExpertRemovalReport", "ExpertSet", "expert_importance", "experts", "find_experts", "remove_experts",
    "remove_least_important_experts",
    "Pruner", "TargetReport", "criterion", "importance", "member_scores", "pruner", "score", "simulate_params",
    "DepGraphError", "DependencyGraph", "Group", "GroupKind", "Member", "PruneError", "PruneReport",
    "TraceError", "UnsupportedModelError", "check_n_m", "count_parameters", "load_pretrained",
    "make_permanent", "prune", "save_pretrained", "sensitivity", "sparsify", "storage_report", "trace",
    "validate_plan", "zero_mask",
    "HealError", "HealReport", "heal",
]
