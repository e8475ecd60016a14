"""Named errors: every failure a user can cause says what failed and what to try."""

from __future__ import annotations


class DepGraphError(Exception):
    """Base class of every depgraph error."""


class TraceError(DepGraphError):
    """The model could not be traced into an FX graph (names the module/op and what to try)."""


class UnsupportedModelError(DepGraphError):
    """The model traced, but its structure cannot be analysed safely (names the op/module)."""


class PruneError(DepGraphError):
    """A pruning plan was rejected; the model was left exactly as it was."""


class HealError(DepGraphError):
    """A healing (fine-tuning) request was rejected before training; the model was left as it was."""
