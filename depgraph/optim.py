"""Optimizer state that follows a structural cut.

A cut keeps every ``nn.Parameter`` object and swaps its data for a smaller tensor, so an optimizer created
before the cut still holds the parameters but its per-parameter state (AdamW's ``exp_avg`` /
``exp_avg_sq``, SGD's ``momentum_buffer``) keeps the old shapes and the next ``step()`` fails.
:func:`cut_optimizer_state` slices that state with the indices the cut kept, so training continues
exactly as if the removed units had never existed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .cut import PruneReport
from .errors import DepGraphError

__all__ = ["cut_optimizer_state"]


def _composed_kept(report: PruneReport) -> tuple[dict[str, dict[int, np.ndarray]], dict[str, tuple]]:
    """``{param: {dim: kept old indices}}`` and ``{param: (old shape, new shape)}`` over every step of
    ``report`` (a :class:`depgraph.Pruner` report of several steps lists them in ``report.steps``)."""
    steps = [r for r in getattr(report, "steps", None) or [report] if isinstance(r, PruneReport)]
    kept: dict[str, dict[int, np.ndarray]] = {}
    shapes: dict[str, tuple] = {}
    for step in steps:
        missing = sorted(set(step.shapes) - set(step.kept))
        if missing:
            raise DepGraphError(f"the report has no kept indices for {missing[:3]}: pass the PruneReport of "
                                "the cut itself (or of each step), not a summary")
        for name, dims in step.kept.items():
            mine = kept.setdefault(name, {})
            for dim, index in dims.items():
                index = np.asarray(index)
                mine[dim] = mine[dim][index] if dim in mine else index  # later steps index the earlier result
            old, new = step.shapes[name]
            shapes[name] = (shapes.get(name, (old, new))[0], new)
    return kept, shapes


def cut_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, report: PruneReport) -> list[str]:
    """Slice ``optimizer``'s state of every parameter ``report`` cut (``report.kept``); returns their names.

    ``report``: what :func:`depgraph.prune` / ``graph.prune`` or :class:`depgraph.Pruner` returned for
    the cuts made since the optimizer last stepped (a multi-step Pruner report is applied step by step).
    Every state tensor shaped like the parameter before the cut is sliced along each cut dim; scalars
    (``step``) are left alone. Anything else (a state already of the new shape, a factored state such
    as Adafactor's row/column statistics) raises :class:`DepGraphError` before any state is changed:
    recreate the optimizer after the cut instead.
    """
    if not isinstance(report, PruneReport):
        raise DepGraphError(f"report must be the PruneReport of the cut, got {type(report).__name__}")
    kept, shapes = _composed_kept(report)
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied weight under either name
    staged: list[tuple[dict, str, torch.Tensor]] = []
    names, seen = [], set()
    for name, dims in kept.items():
        param = params.get(name)
        if param is None or id(param) in seen or param not in optimizer.state:
            continue  # a buffer, or a parameter this optimizer does not train (or has not stepped yet)
        seen.add(id(param))
        old_shape, new_shape = shapes[name]
        state = optimizer.state[param]
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            if tuple(value.shape) != tuple(old_shape):
                hint = " (was it cut already?)" if tuple(value.shape) == tuple(new_shape) else ""
                raise DepGraphError(
                    f"optimizer state {key!r} of {name} has shape {tuple(value.shape)}, not the parameter's "
                    f"shape before the cut {tuple(old_shape)}{hint}: it cannot be sliced with the cut's indices. "
                    "Nothing was changed; recreate the optimizer after the cut instead.")
            for dim, index in dims.items():
                value = value.index_select(dim, torch.as_tensor(index, dtype=torch.long, device=value.device))
            staged.append((state, key, value.contiguous()))
        names.append(name)
    for state, key, value in staged:  # commit only once every state tensor was sliced
        state[key] = value
    return names
