"""Pruning strategies: which units to cut, how many, where and in how many steps.

:class:`Pruner` scores the selected groups (:mod:`depgraph.importance`), turns a ratio into unit counts
and cuts the lowest-scoring units with :meth:`DependencyGraph.prune`. The graph stays valid after each
cut, so iterative pruning (``steps=k``) re-scores the smaller model without re-tracing.

How many units each group loses:

* ``target="units"``: ``scope="local"`` removes ``round(ratio * size)`` units from every group;
  ``scope="global"`` ranks all units of one kind (A, B or C) together and removes ``round(ratio *
  units of that kind)`` of them, the lowest first. Global scores are normalised per group first
  (``normalize="mean"`` unless given: each unit's score divided by its group's mean), so groups whose
  raw scores differ in scale (wider layers, deeper layers) compete on their relative importance.
* ``target="params"``: unit counts are chosen so that the fraction of the model's parameters removed is
  ``ratio`` to within one unit's worth of parameters (``round_to`` units with rounding). Candidate cuts
  are ordered (local: every group advances at the same fraction of its units; global: by normalised
  score within each kind, kinds advancing at the same fraction), and the prefix whose *exact*
  parameter count (from the shapes every parameter would have after the cut, so a C and an A cut that
  share ``down_proj`` elements count them once) is closest to the target is taken.

Every group keeps at least one unit (``round_to`` units with rounding); with ``round_to`` the number of
units a group keeps is a multiple of ``round_to`` (for attention groups a unit is one KV head with its
query heads, so it counts heads, not channels). ``skip_first``/``skip_last`` leave the first/last
decoder layers alone (C groups have no layer and are never skipped). Ties in scores are broken by unit
and group order, so a pruner is deterministic given its seed.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import importance
from . import reconstruct as reconstruction
from .cut import PruneReport, count_parameters
from .errors import PruneError
from .graph import DependencyGraph, trace
from .groups import Group, GroupKind

__all__ = ["Pruner", "TargetReport", "layer_index", "simulate_params"]

STRUCTURES = {"block": ("A", "B"), "channel": ("C",), "all": ("A", "B", "C")}
_INT = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


@dataclass
class TargetReport:
    """What a pruner aimed for and what it reached (fractions of the model at construction)."""

    metric: str  # "units" (of the selected groups) or "params" (of the whole model)
    requested: float
    achieved: float
    tolerance: float  # one unit's (or one round_to chunk's) worth, as a fraction
    steps: int = 1

    @property
    def reached(self) -> bool:
        return abs(self.achieved - self.requested) <= self.tolerance + 1e-12

    def __str__(self) -> str:
        return (f"target {self.metric}: requested {self.requested:.2%}, achieved {self.achieved:.2%} "
                f"(tolerance {self.tolerance:.2%}, {'reached' if self.reached else 'NOT reached'})")


def layer_index(group: Group) -> int | None:
    """Decoder-layer index of an A/B group (first integer path component of its name); None for C."""
    if group.kind is GroupKind.C:
        return None
    for name in [group.name] + [m.param for m in group.members]:
        hit = _INT.search(name)
        if hit:
            return int(hit.group(1))
    return None


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def _chunks(size: int, round_to: int | None) -> list[int]:
    """Sizes of the successive cuts a group allows: after each one it keeps a multiple of ``round_to``
    (first chunk: ``size % round_to``) and never fewer than ``max(1, round_to)`` units."""
    r = max(int(round_to or 1), 1)
    keep_min = r
    sizes, kept = [], size
    if size % r:
        if size - size % r < keep_min:
            return []
        sizes.append(size % r)
        kept -= size % r
    while kept - r >= keep_min:
        sizes.append(r)
        kept -= r
    return sizes


def _closest_prefix(sizes: list[int], want: float) -> int:
    """Number of leading chunks whose total is closest to ``want`` (ties: fewer)."""
    best, best_err, total = 0, abs(want), 0
    for i, s in enumerate(sizes):
        total += s
        err = abs(total - want)
        if err < best_err - 1e-9:
            best, best_err = i + 1, err
        if total > want:
            break
    return best


def simulate_params(graph: DependencyGraph, plan: Mapping[Group, Any]) -> int:
    """Exact parameter count of ``graph.model`` after cutting ``plan`` ({group: unit ids}), without cutting.

    Every parameter's new shape is derived from the indices the plan removes along each of its dims, so
    elements shared by two cut groups (a hidden channel and an MLP neuron both hit ``down_proj``) count once.
    """
    removed: dict[tuple[str, int], int] = defaultdict(int)
    for group, units in plan.items():
        units = list(units)
        if not units:
            continue
        for m in group.members:
            if not m.is_buffer:
                removed[(m.param, m.dim)] += int(m.indices(units).size)
    return count_parameters(graph.model) - _params_removed(graph.param_shapes, removed)


def _params_removed(shapes: Mapping[str, tuple[int, ...]], removed: Mapping[tuple[str, int], int]) -> int:
    new_shapes: dict[str, list[int]] = {}
    for (param, dim), n in removed.items():
        new_shapes.setdefault(param, list(shapes[param]))[dim] -= n
    return sum(math.prod(shapes[p]) - math.prod(s) for p, s in new_shapes.items())


class _ParamCounter:
    """Exact parameters removed when each group loses its ``n`` lowest-ranked units (fast, repeated)."""

    def __init__(self, graph: DependencyGraph, groups: list[Group], orders: list[np.ndarray]):
        self.shapes = graph.param_shapes
        self.entries: list[tuple[str, int, int, np.ndarray]] = []
        for gi, (group, order) in enumerate(zip(groups, orders)):
            for m in group.members:
                if m.is_buffer:
                    continue
                own = m.unit_of_index[m.unit_of_index >= 0]
                per_unit = np.bincount(own, minlength=group.size)
                cum = np.concatenate([[0], np.cumsum(per_unit[order])])
                self.entries.append((m.param, m.dim, gi, cum))

    def removed(self, counts: np.ndarray) -> int:
        rem: dict[tuple[str, int], int] = defaultdict(int)
        for param, dim, gi, cum in self.entries:
            if counts[gi]:
                rem[(param, dim)] += int(cum[int(counts[gi])])
        return _params_removed(self.shapes, rem)


class Pruner:
    """Score, select and cut units of a model's coupled groups, in one or several steps.

    ``criterion``: an :mod:`importance` name, a callable ``fn(graph, group) -> Tensor``, or fixed scores
    ``{group: Tensor}`` (then only the groups it covers are pruned). ``aggregate``/``normalize``/``calib``/``loss_fn``/``seed`` are passed to
    :func:`depgraph.importance.score` (``normalize="auto"``: ``"mean"`` for global scope, none for local,
    where a per-group rescale changes nothing). ``ratio`` is the final fraction removed (of units of the
    selected groups, or of all model parameters for ``target="params"``), reached linearly over ``steps``
    cuts, each re-scoring the pruned model. ``structure``: ``"block"`` (A + B: MLP neurons and heads,
    LLM-Pruner's default), ``"channel"`` (C: hidden channels) or ``"all"``; ``kinds`` overrides it.
    Extra keyword ``options`` go to the criterion (e.g. ``grad_budget``).

    ``reconstruct``: ``"lsq"`` or ``"bias"`` refits the layers reading the cut units on ``calib`` in the
    same atomic cut (:func:`depgraph.reconstruct.reconstruct`; ``damp`` is its ridge term, also used by
    ``criterion="obs"``); ``sequential=True`` does it decoder layer by decoder layer, and with
    ``criterion="obs"`` re-chooses each layer's units (same counts) from the already pruned layers' outputs.
    """

    def __init__(self, model_or_graph: nn.Module | DependencyGraph,
                 criterion: str | Callable | Mapping[Group, torch.Tensor] = "taylor_first", aggregate: str = "sum",
                 ratio: float = 0.2, target: str = "units", scope: str = "local", structure: str = "block",
                 kinds=None, skip_first: int = 0, skip_last: int = 0, round_to: int | None = None, steps: int = 1,
                 calib=None, seed: int = 0, progress: bool = True, normalize: str | None = "auto",
                 loss_fn: Callable | None = None, example_inputs=None, reconstruct: str | None = None,
                 sequential: bool = False, damp: float = reconstruction.DEFAULT_DAMP, **options):
        if isinstance(model_or_graph, DependencyGraph):
            self.graph = model_or_graph
        else:
            self.graph = trace(model_or_graph, example_inputs)
        self.model = self.graph.model
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {ratio}")
        if target not in ("units", "params"):
            raise ValueError(f"target must be 'units' or 'params', got {target!r}")
        if scope not in ("local", "global"):
            raise ValueError(f"scope must be 'local' or 'global', got {scope!r}")
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {sorted(STRUCTURES)}, got {structure!r}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if round_to is not None and round_to < 1:
            raise ValueError(f"round_to must be a positive int or None, got {round_to}")
        if aggregate not in importance.AGGREGATIONS:
            raise ValueError(f"aggregate must be one of {importance.AGGREGATIONS}, got {aggregate!r}")
        if normalize != "auto" and normalize not in importance.NORMALIZATIONS:
            raise ValueError(f"normalize must be 'auto' or one of {importance.NORMALIZATIONS}, got {normalize!r}")
        if isinstance(criterion, str):
            if criterion not in importance.CRITERIA:
                raise ValueError(f"unknown criterion {criterion!r}; registered: {sorted(importance.CRITERIA)}")
            if importance.CRITERIA[criterion].needs_calib and calib is None:
                raise ValueError(f"criterion {criterion!r} needs calib= (token ids [N, L] or a list of batches)")
        if reconstruct is not None and reconstruct not in reconstruction.METHODS:
            raise PruneError(f"reconstruct must be None or one of {reconstruction.METHODS}, got {reconstruct!r}")
        if reconstruct is not None and calib is None:
            raise PruneError(f"reconstruct={reconstruct!r} needs calib= (token ids [N, L] or a list of batches)")
        if sequential and reconstruct is None:
            raise PruneError("sequential=True reconstructs layer by layer: pass reconstruct='lsq' (or 'bias')")
        if not (isinstance(damp, (int, float)) and damp > 0):
            raise PruneError(f"damp must be a positive number, got {damp!r}")
        self.reconstruct, self.sequential, self.damp = reconstruct, bool(sequential), float(damp)
        if criterion == "obs":
            options.setdefault("damp", self.damp)
        self.criterion = dict(criterion) if isinstance(criterion, Mapping) else criterion
        self.aggregate, self.ratio, self.target, self.scope = aggregate, float(ratio), target, scope
        self.normalize = ("mean" if scope == "global" else None) if normalize == "auto" else normalize
        self.round_to, self.steps, self.calib, self.seed = round_to, int(steps), calib, int(seed)
        self.progress, self.loss_fn, self.options = progress, loss_fn, options
        wanted = {GroupKind(str(k).upper()) for k in (kinds if kinds is not None else STRUCTURES[structure])}
        layers = [i for i in (layer_index(g) for g in self.graph.groups()) if i is not None]
        n_layers = max(layers) + 1 if layers else 0
        self.groups: list[Group] = []
        for g in self.graph.groups():
            i = layer_index(g)
            if g.kind not in wanted or (i is not None and (i < skip_first or i >= n_layers - skip_last)):
                continue
            if isinstance(self.criterion, dict) and g not in self.criterion:
                continue  # fixed scores: only the groups they cover are pruned
            self.groups.append(g)
        self.original_size = {id(g): g.size for g in self.groups}
        self.params_before = count_parameters(self.model)
        self.step_index = 0
        self.history: list[PruneReport] = []
        self._tolerance = 0.0

    # ---- scoring and selection ------------------------------------------------------------------
    def scores(self) -> dict[Group, torch.Tensor]:
        """Current (normalised) scores of the selected groups."""
        return importance.score(self.graph, self.criterion, self.aggregate, self.calib, self.normalize,
                                self.groups, self.seed + self.step_index, self.progress, self.loss_fn,
                                **self.options)

    def plan(self) -> dict[Group, list[int]]:
        """The units the next step cuts: ``{group: sorted unit ids}`` (lowest-scoring first chosen)."""
        goal = self.ratio * (self.step_index + 1) / self.steps
        groups = [g for g in self.groups if g.size > 0]
        scores = self.scores()
        orders = [importance.ranking(scores[g]) for g in groups]
        chunks = [_chunks(g.size, self.round_to) for g in groups]
        if self.target == "units":
            counts = self._units_counts(groups, scores, orders, chunks, goal)
        else:
            counts = self._params_counts(groups, scores, orders, chunks, goal)
        return {g: sorted(int(u) for u in order[:n]) for g, order, n in zip(groups, orders, counts) if n}

    def _removed_before(self, g: Group) -> int:
        return self.original_size[id(g)] - g.size

    def _units_counts(self, groups, scores, orders, chunks, goal) -> list[int]:
        counts = [0] * len(groups)
        tol = 0.0
        if self.scope == "local":
            for i, g in enumerate(groups):
                orig = self.original_size[id(g)]
                want = _round_half_up(goal * orig) - self._removed_before(g)
                k = _closest_prefix(chunks[i], want)
                counts[i] = sum(chunks[i][:k])
                tol = max(tol, (self.round_to or 1) / orig)
        else:
            for members in self._by_kind(groups).values():
                orig = sum(self.original_size[id(groups[i])] for i in members)
                done = sum(self._removed_before(groups[i]) for i in members)
                ordered = self._global_order(members, scores, orders, chunks, groups)
                k = _closest_prefix([size for _, size, _ in ordered], _round_half_up(goal * orig) - done)
                for gi, size, _ in ordered[:k]:
                    counts[gi] += size
                tol = max(tol, (self.round_to or 1) / orig)
        self._tolerance = tol
        return counts

    def _by_kind(self, groups) -> dict[GroupKind, list[int]]:
        out: dict[GroupKind, list[int]] = defaultdict(list)
        for i, g in enumerate(groups):
            out[g.kind].append(i)
        return out

    @staticmethod
    def _global_order(members, scores, orders, chunks, groups) -> list[tuple[int, int, float]]:
        """Chunks of one kind's groups ordered by their mean normalised score (ties: group, chunk order)."""
        rows = []
        for gi in members:
            s = scores[groups[gi]].double().numpy()[orders[gi]]
            start = 0
            for ci, size in enumerate(chunks[gi]):
                rows.append((float(s[start:start + size].mean()), gi, ci, size))
                start += size
        rows.sort(key=lambda r: (r[0], r[1], r[2]))
        return [(gi, size, sc) for sc, gi, _, size in rows]

    def _params_counts(self, groups, scores, orders, chunks, goal) -> list[int]:
        # candidate cuts with a key: the fraction of its scope's units removed once the cut is taken
        cands: list[tuple[float, int, int, int]] = []  # (key, tie, group index, size)
        if self.scope == "local":
            for gi, g in enumerate(groups):
                orig, done = self.original_size[id(g)], self._removed_before(g)
                for size in chunks[gi]:
                    done += size
                    cands.append((done / orig, gi, len(cands), size))
        else:
            for members in self._by_kind(groups).values():
                orig = sum(self.original_size[id(groups[i])] for i in members)
                done = sum(self._removed_before(groups[i]) for i in members)
                for gi, size, _ in self._global_order(members, scores, orders, chunks, groups):
                    done += size
                    cands.append((done / orig, gi, len(cands), size))
        cands.sort(key=lambda c: (c[0], c[2]))
        gidx = np.array([c[1] for c in cands], dtype=np.int64)
        sizes = np.array([c[3] for c in cands], dtype=np.int64)
        counter = _ParamCounter(self.graph, groups, orders)
        current = count_parameters(self.model)
        want = current - (1.0 - goal) * self.params_before  # parameters still to remove in this step

        def removed(k: int) -> int:
            return counter.removed(np.bincount(gidx[:k], weights=sizes[:k], minlength=len(groups)).astype(np.int64))

        lo, hi = 0, len(cands)  # largest k with removed(k) <= want (monotone in k)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if removed(mid) <= want:
                lo = mid
            else:
                hi = mid - 1
        k, at_k = lo, removed(lo)
        if k < len(cands):
            nxt = removed(k + 1)
            self._tolerance = (nxt - at_k) / self.params_before
            if abs(nxt - want) < abs(at_k - want):
                k = k + 1
        else:
            self._tolerance = (at_k - removed(k - 1)) / self.params_before if k else 0.0
            if want - at_k > 0.5 and goal > 0:
                warnings.warn(f"target of {goal:.1%} parameters removed is out of reach: every selected group "
                              "is already at its minimum size", stacklevel=3)
        return np.bincount(gidx[:k], weights=sizes[:k], minlength=len(groups)).astype(np.int64).tolist()

    # ---- cutting ----------------------------------------------------------------------------------
    def step(self, plan: Mapping[Group, list[int]] | None = None) -> PruneReport:
        """Score, plan and cut one step; returns the cut's report with ``report.target`` attached.

        ``plan``: cut this plan (e.g. the one :meth:`plan` returned and you inspected) instead of re-scoring.
        """
        if self.step_index >= self.steps:
            raise RuntimeError(f"all {self.steps} steps are done")
        plan = self.plan() if plan is None else plan
        if self.reconstruct is None:
            report = self.graph.prune(plan)
        else:
            select = None
            if self.sequential and self.criterion == "obs":
                select = reconstruction.obs_select(self.graph, {g: len(list(u)) for g, u in plan.items()}, self.damp,
                                                   float(self.options.get("obs_batch", 1 / 16)), self.aggregate)
            report = reconstruction.reconstruct(self.graph, plan, self.calib, self.reconstruct, damp=self.damp,
                                                sequential=self.sequential, progress=self.progress, select=select)
            plan = report.plan
        if isinstance(self.criterion, dict):  # fixed scores follow the surviving units
            for g, units in plan.items():
                if g in self.criterion:
                    keep = np.ones(self.criterion[g].numel(), dtype=bool)
                    keep[list(units)] = False
                    self.criterion[g] = self.criterion[g][torch.as_tensor(keep)]
        self.step_index += 1
        report.target = self._target_report()
        self.history.append(report)
        return report

    def prune(self) -> PruneReport:
        """Run every remaining step; returns one report from the first to the last cut."""
        for _ in tqdm(range(self.step_index, self.steps), desc="pruning steps", disable=not self.progress or self.steps == 1,
                      leave=False):
            self.step()
        return self._merged()

    def _target_report(self) -> TargetReport:
        goal = self.ratio * self.step_index / self.steps
        if self.target == "params":
            achieved = 1.0 - count_parameters(self.model) / max(self.params_before, 1)
        else:
            orig = sum(self.original_size.values())
            achieved = sum(self.original_size[id(g)] - g.size for g in self.groups) / max(orig, 1)
        return TargetReport(self.target, goal, achieved, self._tolerance, self.step_index)

    def _merged(self) -> PruneReport:
        if not self.history:
            return PruneReport(self.params_before, count_parameters(self.model))
        merged = PruneReport(self.history[0].params_before, self.history[-1].params_after)
        for r in self.history:
            for name, n in r.units_removed.items():
                merged.units_removed[name] = merged.units_removed.get(name, 0) + n
            for param, (old, new) in r.shapes.items():
                merged.shapes[param] = (merged.shapes.get(param, (old, new))[0], new)
            merged.edits.extend(r.edits)
        merged.target = self.history[-1].target
        merged.steps = list(self.history)
        return merged
