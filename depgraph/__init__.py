"""depgraph: find, score, cut and draw the coupled structures inside transformer models.

>>> graph = depgraph.trace(model)                 # trace -> rules -> graph -> groups
>>> a0 = graph.groups("A")[0]
>>> graph.prune({a0: [0, 5, 7]})                  # exact structural cut, atomic
>>> depgraph.save_pretrained(model, "out/")       # reload with depgraph.load_pretrained("out/")
"""

from .checkpoint import load_pretrained, save_pretrained
from .cut import PruneReport, prune, validate_plan, zero_mask
from .depth import RemovalReport, block_importance, find_blocks, remove_layers, remove_least_important
from .errors import (
    CalibrationError,
    DepGraphError,
    HealError,
    PlanError,
    PruneError,
    StreamError,
    TraceError,
    UnsupportedModelError,
)
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
from .optim import cut_optimizer_state
from .pruner import KindResult, Pruner, TargetReport, simulate_params
from .reconstruct import ReconstructionReport, reconstruct
from .sparsity import check_n_m, make_permanent, sensitivity, sparsify, storage_report
from .stream import prune_checkpoint
from .transaction import EditReport, Transaction, count_parameters

__version__ = "0.1.0"

from . import calibration, data, depth, experts, importance, optim, pruner, stream  # noqa: E402  (submodules as namespaces)

__all__ = [
    "RemovalReport", "block_importance", "depth", "find_blocks", "remove_layers", "remove_least_important",
    "ExpertRemovalReport", "ExpertSet", "expert_importance", "experts", "find_experts", "remove_experts",
    "remove_least_important_experts",
    "KindResult", "PlanError", "Pruner", "ReconstructionReport", "TargetReport", "criterion", "importance", "member_scores", "pruner",
    "score", "simulate_params",
    "CalibrationError", "calibration", "cut_optimizer_state", "data", "optim",
    "DepGraphError", "DependencyGraph", "EditReport", "Transaction", "Group", "GroupKind", "Member", "PruneError",
    "PruneReport",
    "TraceError", "UnsupportedModelError", "check_n_m", "count_parameters", "load_pretrained",
    "make_permanent", "prune", "reconstruct", "save_pretrained", "sensitivity", "sparsify", "storage_report", "trace",
    "validate_plan", "zero_mask",
    "HealError", "HealReport", "heal",
    "StreamError", "prune_checkpoint", "stream",
]
