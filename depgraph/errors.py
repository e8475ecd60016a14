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


class RuleError(DepGraphError):
    """An op rule was registered wrongly: a second rule for an op that already has one."""


class CalibrationError(DepGraphError, ValueError):
    """Calibration data or example inputs are unusable (type, dtype, rank, ids outside the vocabulary,
    no text or tokenizer); raised before any forward pass runs. Also a ``ValueError``."""


class DataNotFoundError(DepGraphError, FileNotFoundError):
    """No data where the caller pointed (or no data folder configured); names the path and the option."""


class PlanError(PruneError, ValueError):
    """A pruning argument or plan was rejected before anything was cut (names the accepted values)."""


class HealError(DepGraphError):
    """A healing (fine-tuning) request was rejected before training; the model was left as it was."""


class StreamError(DepGraphError):
    """Streaming pruning of a checkpoint directory (:func:`depgraph.prune_checkpoint`) was refused: a bad
    source directory, a criterion that needs the whole model (Taylor), or weights the model does not name.
    Raised before anything is written."""
