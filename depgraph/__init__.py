"""depgraph: find, score, cut and draw the coupled structures inside transformer models.

>>> graph = depgraph.trace(model)
>>> for g in graph.groups("A"): print(g.kind, g.name, g.size)
"""

from .errors import DepGraphError, PruneError, TraceError, UnsupportedModelError
from .graph import DependencyGraph, trace
from .groups import Group, GroupKind, Member

__version__ = "0.1.0"

__all__ = [
    "DepGraphError", "DependencyGraph", "Group", "GroupKind", "Member", "PruneError", "TraceError",
    "UnsupportedModelError", "trace",
]
