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
  ``ratio`` to within one cut's worth of parameters. Candidate cuts are ordered (local: every group
  advances at the same fraction of its units, and *identical blocks advance together*, so layers of the
  same shape keep the same width; global: by normalised score within each kind, kinds advancing at the
  same fraction), and the prefix whose *exact* parameter count (from the shapes every parameter would
  have after the cut, so a C and an A cut that share ``down_proj`` elements count them once) is closest
  to the target is taken.
* ``ratio={"A": 0.3, "B": 0.1}``: an explicit budget per kind (of that kind's units, or of the model's
  parameters removed through that kind for ``target="params"``); each kind is planned on its own.

Per-layer budgets (``allocation``, with ``target="params"`` and local scope): the same exact-parameter
prefix search, over candidate cuts ordered so that layers are cut at different rates. Every decoder layer
is then its own class (widths differ between layers, so the model needs depgraph's checkpoint format):

* ``"uniform"`` (default): every layer at the same fraction, identical blocks together (above).
* ``"increasing"``: SlimGPT's schedule: layer ``i`` of ``n`` is cut at a rate proportional to
  ``1 - s + 2 s · ln(1 + i) / ln(n)`` (``s = allocation_spread``, default 0.5: the last layer at three
  times the first layer's rate), so deeper layers lose more; the target fixes the absolute ratios.
* ``"outlier"``: OWL's outlier-weighted schedule: layer ``i``'s rate is ``1 - s · (D_i - mean D) / max|D -
  mean D|``, ``D_i`` its outlier ratio (:func:`depgraph.reconstruct.outlier_ratios`: the share of Wanda
  scores above 5x the layer mean, on ``calib``), so layers with more outliers are cut less.
* a sequence of positive per-layer weights: the same with your own rates.
* ``"sensitivity"``: measured. For each layer's group of each kind, the units the criterion ranks lowest
  are cut alone, at 0.25-3x the uniform plan's count for that group (7 sizes), on ``calib``, and the
  model's output error is recorded (:func:`depgraph.reconstruct.plan_errors`: KL divergence of the
  predicted distribution for LMs, relative squared error otherwise; the consumers refitted first when
  ``reconstruct`` is set, so the error is the one that cut would leave). Cuts are then taken in order of
  the error they add per parameter removed (piecewise-linear between the measured sizes): a greedy
  water-filling of the parameter budget that protects the layers (and kinds) where a cut costs most.
  Cost: one calibration pass per measured size (7 per layer and kind), plus one for the ``H`` of all
  consumers when reconstructing (all layers' ``H`` at once). ``pruner.sensitivity`` keeps the curves.

Every group keeps at least one unit. ``round_to`` rounds widths (A, C: the number of units a group keeps
is a multiple of it), ``head_round_to`` rounds heads (B: for attention groups a unit is one KV head with
its query heads). A rounding that leaves a kind with no cut at all is reported (``report.target.notes``
and a warning), never silent. ``skip_first``/``skip_last`` leave the first/last decoder layers alone (C
groups have no layer and are never skipped). Ties in scores are broken by unit and group order, so a
pruner is deterministic given its seed.

A target that cannot be reached (every selected group at its minimum size, or held there by rounding) is
refused with a :class:`~depgraph.errors.PruneError` stating the largest reachable fraction, before
anything is cut, unless ``allow_partial=True``. ``hf_loadable=True`` keeps the result loadable by plain
``from_pretrained``: uniform widths, and only sizes the config class accepts (e.g. a hidden size that is
a multiple of the head count); each step's report says whether the model still is, and if not why.
"""

from __future__ import annotations

import copy
import itertools
import math
import numbers
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import calibration, importance
from . import reconstruct as reconstruction
from .checkpoint import plain_hf_reason
from .cut import PruneReport, count_parameters, validate_plan
from .errors import PlanError, PruneError
from .graph import DependencyGraph, trace
from .groups import Group, GroupKind

__all__ = ["KindResult", "Pruner", "TargetReport", "layer_index", "meta_cut", "simulate_params"]

STRUCTURES = {"block": ("A", "B"), "channel": ("C",), "all": ("A", "B", "C")}
KINDS = ("A", "B", "C")
_MAX_HF_TRIES = 256  # plans looked at around the target when searching one plain from_pretrained accepts


@dataclass
class KindResult:
    """One kind's share of a pruner's result (units of the selected groups of that kind)."""

    units_before: int
    units_after: int
    params_removed: int  # through this kind's cuts (elements shared with another kind's cut count in both)
    params_before: int  # of the whole model, so params_removed / params_before is this kind's share
    requested: float | None = None  # the per-kind ratio, when ``ratio`` was given per kind

    @property
    def ratio(self) -> float:
        """Fraction of this kind's units removed."""
        return 1.0 - self.units_after / max(self.units_before, 1)

    @property
    def params_ratio(self) -> float:
        """Fraction of the model's parameters removed through this kind."""
        return self.params_removed / max(self.params_before, 1)


@dataclass
class TargetReport:
    """What a pruner aimed for and what it reached (fractions of the model at construction).

    ``reached`` is true only when the achieved fraction is within ``tolerance`` (one cut's worth) of the
    request and no group was held at its minimum size short of it (``limited``). ``kinds``: per-kind
    results; ``notes``: constraints that changed the plan (a kind left uncut by rounding, ...);
    ``hf_reason``: why plain ``from_pretrained`` cannot load the model now (None: it can).
    ``allocation``: how the budget was spread over the layers; ``layer_ratios``: per decoder layer, the
    fraction of each kind's units removed there (``{0: {"A": 0.1, "B": 0.25}, ...}``).
    """

    metric: str  # "units" (of the selected groups) or "params" (of the whole model)
    requested: float
    achieved: float
    tolerance: float  # one unit's (or one rounded cut's) worth, as a fraction
    steps: int = 1
    limited: bool = False
    kinds: dict[str, KindResult] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    hf_reason: str | None = None
    allocation: str = "uniform"
    layer_ratios: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def reached(self) -> bool:
        return not self.limited and abs(self.achieved - self.requested) <= self.tolerance + 1e-12

    @property
    def hf_loadable(self) -> bool:
        """Whether plain ``from_pretrained`` can load the model as it is now."""
        return self.hf_reason is None

    def kind_ratios(self) -> dict[str, float]:
        """Fraction of each kind's units removed: ``{"A": 0.2, "B": 0.25}``."""
        return {k: r.ratio for k, r in self.kinds.items()}

    def __str__(self) -> str:
        state = "reached" if self.reached else ("NOT reached: held at minimum sizes" if self.limited
                                                else "NOT reached")
        lines = [f"target {self.metric}: requested {self.requested:.2%}, achieved {self.achieved:.2%} "
                 f"(tolerance {self.tolerance:.2%}, {state})"]
        for k, r in self.kinds.items():
            want = f", requested {r.requested:.2%}" if r.requested is not None else ""
            lines.append(f"  {k}: {r.units_before} -> {r.units_after} units ({r.ratio:.2%} removed{want}), "
                         f"{r.params_ratio:.2%} of parameters")
        if self.allocation != "uniform" and self.layer_ratios:
            lines.append(f"  allocation {self.allocation}: " + "; ".join(
                f"layer {i} " + " ".join(f"{k} {r:.0%}" for k, r in sorted(by.items()))
                for i, by in sorted(self.layer_ratios.items())))
        lines += [f"  note: {n}" for n in self.notes]
        lines.append("  plain from_pretrained: " + ("yes" if self.hf_reason is None else
                                                   f"no, needs depgraph.load_pretrained: {self.hf_reason}"))
        return "\n".join(lines)


def layer_index(group: Group) -> int | None:
    """Decoder-layer index of an A/B group (first integer path component of its name); None for C."""
    if group.kind is GroupKind.C:
        return None
    for name in [group.name] + [m.param for m in group.members]:
        index = calibration.layer_index(name)
        if index is not None:
            return index
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


def _closest(options: list[int], want: float) -> int:
    """The option closest to ``want`` (ties: the smaller)."""
    return min(options, key=lambda o: (abs(o - want), o))


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


def meta_cut(graph: DependencyGraph, plan: Mapping[Group, Any]) -> nn.Module:
    """The model as ``plan`` would leave it, built on the ``meta`` device: shapes, module attributes and
    configs are cut, no weight is copied, and ``graph`` and its model are not touched."""
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(graph.model.parameters(), graph.model.buffers()):
        empty = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    copied = copy.deepcopy(graph, memo)
    index = {id(g): i for i, g in enumerate(graph.groups())}
    copied.prune({copied.groups()[index[id(g)]]: units for g, units in plan.items()}, verify=False)
    return copied.model


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

    def removed(self, counts, only: set[int] | None = None) -> int:
        """Parameters removed by ``counts`` (per group), counting only groups in ``only`` when given."""
        rem: dict[tuple[str, int], int] = defaultdict(int)
        for param, dim, gi, cum in self.entries:
            if counts[gi] and (only is None or gi in only):
                rem[(param, dim)] += int(cum[int(counts[gi])])
        return _params_removed(self.shapes, rem)


class _Running:
    """Parameters removed by growing per-group counts, updated incrementally (only touched tensors)."""

    def __init__(self, counter: _ParamCounter, counts: list[int]):
        self.shapes = counter.shapes
        self.by_group: dict[int, list[tuple[str, int, np.ndarray]]] = defaultdict(list)
        for param, dim, gi, cum in counter.entries:
            self.by_group[gi].append((param, dim, cum))
        self.counts = list(counts)
        self.rem: dict[tuple[str, int], int] = defaultdict(int)
        for gi, n in enumerate(self.counts):
            for param, dim, cum in self.by_group[gi]:
                self.rem[(param, dim)] += int(cum[n])
        self.start = _params_removed(self.shapes, self.rem)
        self.total, self.taken, self.last = 0, 0, 0

    def _removed_of(self, params: set[str], rem: Mapping[tuple[str, int], int]) -> int:
        out = 0
        for p in params:
            shape = list(self.shapes[p])
            for d in range(len(shape)):
                shape[d] -= rem.get((p, d), 0)
            out += math.prod(self.shapes[p]) - math.prod(shape)
        return out

    def _delta(self, gis, size) -> tuple[dict[tuple[str, int], int], set[str]]:
        new: dict[tuple[str, int], int] = {}
        for gi in gis:
            for param, dim, cum in self.by_group[gi]:
                key = (param, dim)
                new[key] = new.get(key, self.rem[key]) + int(cum[self.counts[gi] + size] - cum[self.counts[gi]])
        return new, {p for p, _ in new}

    def gain(self, gis, size) -> int:
        """Extra parameters removed if every group in ``gis`` loses ``size`` more units."""
        new, params = self._delta(gis, size)
        return self._removed_of(params, {**self.rem, **new}) - self._removed_of(params, self.rem)

    def take(self, gis, size) -> None:
        gain = self.gain(gis, size)
        new, _ = self._delta(gis, size)
        self.rem.update(new)
        for gi in gis:
            self.counts[gi] += size
        self.total += gain
        self.taken += 1
        self.last = gain


def _signature(group: Group, size: int) -> tuple:
    """Groups with equal signatures are the same structure in different layers ("identical blocks")."""
    members = sorted((re.sub(r"\d+", "#", m.param), m.dim, m.per_unit, m.role) for m in group.members)
    return group.kind.value, size, bool(group.extra.get("latent")), tuple(members)


@dataclass
class _Pool:
    """Groups that share one budget: local units (one group), a kind, or everything (params)."""

    members: list[int]  # indices into the plan's group list
    want: float  # units or parameters still to remove in this step
    kind: str | None = None  # per-kind budget


@dataclass
class _Outcome:
    counts: list[int]
    tolerance: float = 0.0  # units target: in units until _counts scales it
    limited: list[str] = field(default_factory=list)  # what held the plan short of its target
    reachable: dict[str, float] = field(default_factory=dict)  # pool label -> largest reachable fraction


def _fail(what: str, got, accepted: str) -> PlanError:
    return PlanError(f"Pruner: {what} must be {accepted}, got {got!r}; nothing was cut")


def _check_int(name: str, value, low: int, optional: bool = False) -> int | None:
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        accepted = f"an int >= {low}" + (" or None" if optional else "")
        raise _fail(name, value, accepted)
    return int(value)


def _check_ratio(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
        raise _fail(name, value, "a number in [0, 1) (a fraction, e.g. 0.2)")
    return float(value)


def _check_choice(name: str, value, choices) -> Any:
    if not isinstance(value, (str, type(None))) or value not in choices:
        raise _fail(name, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


PRUNER_KEYWORDS = ("criterion", "aggregate", "ratio", "target", "scope", "structure", "kinds", "skip_first",
                   "skip_last", "round_to", "head_round_to", "steps", "calib", "seed", "progress", "normalize",
                   "loss_fn", "example_inputs", "hf_loadable", "allow_partial", "reconstruct", "sequential",
                   "damp", "allocation", "allocation_spread")
ALLOCATIONS = ("uniform", "increasing", "outlier", "sensitivity")
# the cut sizes at which "sensitivity" measures a layer, as multiples of the uniform plan's count
_SENSITIVITY_POINTS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


class Pruner:
    """Score, select and cut units of a model's coupled groups, in one or several steps.

    ``criterion``: an :mod:`importance` name, a callable ``fn(graph, group) -> Tensor``, or fixed scores
    ``{group or group name: scores}`` (a tensor, array or list per group; only the groups it covers are
    pruned). ``aggregate``/``normalize``/``calib``/``loss_fn``/``seed`` are passed to
    :func:`depgraph.importance.score` (``normalize="auto"``: ``"mean"`` for global scope, none for local,
    where a per-group rescale changes nothing). ``ratio`` is the final fraction removed (of units of the
    selected groups, or of all model parameters for ``target="params"``), or a ``{kind: fraction}`` budget
    per kind; it is reached linearly over ``steps`` cuts, each re-scoring the pruned model. ``structure``:
    ``"block"`` (A + B: MLP neurons and heads, LLM-Pruner's default), ``"channel"`` (C: hidden channels) or
    ``"all"``; ``kinds`` overrides it. ``round_to`` rounds widths (A, C), ``head_round_to`` heads (B).
    ``allow_partial``: cut as far as possible when the target is out of reach instead of refusing.
    ``hf_loadable``: only plans whose result plain ``from_pretrained`` loads.
    ``reconstruct``: ``"lsq"`` or ``"bias"`` refits the layers reading the cut units on ``calib`` in the
    same atomic cut (:func:`depgraph.reconstruct.reconstruct`; ``damp`` is its ridge term, also used by
    ``criterion="obs"``); ``sequential=True`` does it decoder layer by decoder layer, and with
    ``criterion="obs"`` re-chooses each layer's units (same counts) from the already pruned layers' outputs.
    ``allocation``: ``"uniform"``, ``"increasing"`` (``allocation_spread`` in [0, 1) sets how steep),
    ``"outlier"`` (OWL; needs ``calib``), ``"sensitivity"`` (needs ``calib``) or per-layer weights: how
    the parameter budget is spread over the decoder layers (see the module docstring; needs
    ``target="params"``, local scope, no ``hf_loadable``). Extra keyword ``options`` go to the criterion;
    only those it declares (e.g. ``grad_budget`` for Taylor) are accepted.
    Every argument is checked here: a bad one raises :class:`~depgraph.errors.PlanError` (a ``PruneError``
    and ``ValueError``) naming the accepted values, before anything is traced or cut.
    """

    def __init__(self, model_or_graph: nn.Module | DependencyGraph,
                 criterion: str | Callable | Mapping[Group | str, Any] = "taylor_first", aggregate: str = "sum",
                 ratio: float | Mapping[str, float] = 0.2, target: str = "units", scope: str = "local",
                 structure: str = "block", kinds=None, skip_first: int = 0, skip_last: int = 0,
                 round_to: int | None = None, head_round_to: int | None = None, steps: int = 1, calib=None,
                 seed: int = 0, progress: bool = True, normalize: str | None = "auto",
                 loss_fn: Callable | None = None, example_inputs=None, hf_loadable: bool = False,
                 allow_partial: bool = False, reconstruct: str | None = None, sequential: bool = False,
                 damp: float = reconstruction.DEFAULT_DAMP, allocation: str | Sequence[float] = "uniform",
                 allocation_spread: float = 0.5, **options):
        # ---- every argument, before anything is traced or cut
        if not isinstance(model_or_graph, (nn.Module, DependencyGraph)):
            raise _fail("model_or_graph", type(model_or_graph).__name__, "a torch.nn.Module or a DependencyGraph")
        target = _check_choice("target", target, ("units", "params"))
        scope = _check_choice("scope", scope, ("local", "global"))
        structure = _check_choice("structure", structure, tuple(STRUCTURES))
        aggregate = _check_choice("aggregate", aggregate, importance.AGGREGATIONS)
        if normalize != "auto":
            normalize = _check_choice("normalize", normalize, importance.NORMALIZATIONS)
        steps = _check_int("steps", steps, 1)
        skip_first, skip_last = _check_int("skip_first", skip_first, 0), _check_int("skip_last", skip_last, 0)
        round_to = _check_int("round_to", round_to, 1, optional=True)
        head_round_to = _check_int("head_round_to", head_round_to, 1, optional=True)
        seed = _check_int("seed", seed, 0)
        for name, flag in (("progress", progress), ("hf_loadable", hf_loadable), ("allow_partial", allow_partial)):
            if not isinstance(flag, bool):
                raise _fail(name, flag, "True or False")
        if loss_fn is not None and not callable(loss_fn):
            raise _fail("loss_fn", loss_fn, "a callable fn(model, batch) -> loss, or None")
        if isinstance(ratio, Mapping):
            if not ratio:
                raise _fail("ratio", ratio, "a fraction or a non-empty {kind: fraction} mapping")
            per_kind = {}
            for k, v in ratio.items():
                key = str(k.value if isinstance(k, GroupKind) else k).upper()
                if key not in KINDS:
                    raise _fail("a ratio key", k, "a kind: 'A', 'B' or 'C'")
                per_kind[key] = _check_ratio(f"ratio[{key!r}]", v)
            if target == "params" and sum(per_kind.values()) >= 1.0:
                raise _fail("the per-kind parameter ratios' sum", sum(per_kind.values()), "below 1")
            if kinds is not None and {str(k).upper() for k in kinds} != set(per_kind):
                raise _fail("kinds", kinds, f"the kinds of the per-kind ratio ({sorted(per_kind)}) or None")
            kinds = sorted(per_kind)
            self.kind_ratio: dict[str, float] | None = per_kind
            self.ratio = sum(per_kind.values()) if target == "params" else None
        else:
            self.kind_ratio, self.ratio = None, _check_ratio("ratio", ratio)
        kind_names = list(kinds) if kinds is not None else list(STRUCTURES[structure])
        for k in kind_names:
            if not isinstance(k, (str, GroupKind)) or str(getattr(k, "value", k)).upper() not in KINDS:
                raise _fail("kinds", kinds, "kinds among 'A', 'B', 'C' (e.g. ['A'] or 'AB')")
        wanted = {GroupKind(str(getattr(k, "value", k)).upper()) for k in kind_names}
        if round_to is not None and not wanted & {GroupKind.A, GroupKind.C}:
            raise PlanError("Pruner: round_to rounds widths (A, C), and no width kind is selected; round heads "
                            "(B) with head_round_to=; nothing was cut")
        if head_round_to is not None and GroupKind.B not in wanted:
            raise PlanError("Pruner: head_round_to rounds heads (B), and kind B is not selected; round widths "
                            "(A, C) with round_to=; nothing was cut")
        if hf_loadable and scope == "global":
            raise PlanError("Pruner: hf_loadable=True needs scope='local': a global ranking gives layers "
                            "different widths, which a Hugging Face config cannot describe; nothing was cut")
        if hf_loadable and (skip_first or skip_last):
            raise PlanError("Pruner: hf_loadable=True cannot skip layers (skip_first/skip_last): skipped "
                            "layers keep their width, which a Hugging Face config cannot describe; "
                            "nothing was cut")
        if isinstance(criterion, str):
            if criterion not in importance.CRITERIA:
                raise _fail("criterion", criterion, "a registered criterion (" +
                            ", ".join(sorted(importance.CRITERIA)) + "), a callable or {group: scores}")
            if importance.CRITERIA[criterion].needs_calib and calib is None:
                raise PlanError(f"Pruner: criterion {criterion!r} needs calib= (token ids [N, L] or a list of "
                                "batches); nothing was cut")
            accepted = importance.CRITERIA[criterion].options
        elif callable(criterion) or isinstance(criterion, Mapping):
            accepted = ()
        else:
            raise _fail("criterion", type(criterion).__name__, "a criterion name, a callable or {group: scores}")
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            what = f"criterion {criterion!r} reads " + (", ".join(accepted) if accepted else "no option")
            if not isinstance(criterion, str):
                what = "fixed scores and callables read no option"
            raise PlanError(f"Pruner: unknown keyword(s) {', '.join(unknown)} ({what}); Pruner's own keywords: "
                            f"{', '.join(PRUNER_KEYWORDS)}; nothing was cut")
        if reconstruct is not None and reconstruct not in reconstruction.METHODS:
            raise _fail("reconstruct", reconstruct, f"None or one of {reconstruction.METHODS}")
        if reconstruct is not None and calib is None:
            raise PlanError(f"Pruner: reconstruct={reconstruct!r} needs calib= (token ids [N, L] or a list of "
                            "batches); nothing was cut")
        if not isinstance(sequential, bool):
            raise _fail("sequential", sequential, "True or False")
        if sequential and reconstruct is None:
            raise PlanError("Pruner: sequential=True reconstructs layer by layer: pass reconstruct='lsq' (or "
                            "'bias'); nothing was cut")
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp > 0:
            raise _fail("damp", damp, "a positive number (the ridge term relative to the mean diagonal)")
        allocation = self._check_allocation(allocation, allocation_spread, target, scope, hf_loadable, calib)
        if isinstance(model_or_graph, DependencyGraph) and example_inputs is not None:
            raise PlanError("Pruner: example_inputs is only used to trace a model; a DependencyGraph is already "
                            "traced (pass the model instead, or drop example_inputs); nothing was cut")

        # ---- the graph and the selected groups
        self.graph = model_or_graph if isinstance(model_or_graph, DependencyGraph) else trace(model_or_graph,
                                                                                               example_inputs)
        self.model = self.graph.model
        all_groups = self.graph.groups()
        fixed = self._fixed_scores(criterion, all_groups) if isinstance(criterion, Mapping) else None
        self.criterion = fixed if fixed is not None else criterion
        self.aggregate, self.target, self.scope = aggregate, target, scope
        self.normalize = ("mean" if scope == "global" else None) if normalize == "auto" else normalize
        self.round_to, self.head_round_to, self.steps, self.calib, self.seed = (round_to, head_round_to, steps,
                                                                                calib, seed)
        self.progress, self.loss_fn, self.options = progress, loss_fn, options
        self.hf_loadable, self.allow_partial = hf_loadable, allow_partial
        self.reconstruct, self.sequential, self.damp = reconstruct, sequential, float(damp)
        if criterion == "obs":
            self.options.setdefault("damp", self.damp)
        layers = [i for i in (layer_index(g) for g in all_groups) if i is not None]
        n_layers = max(layers) + 1 if layers else 0
        if not isinstance(allocation, str) and len(allocation) != n_layers:
            raise PlanError(f"Pruner: allocation has {len(allocation)} per-layer weight(s) but the model has "
                            f"{n_layers} decoder layer(s); give one positive weight per layer; nothing was cut")
        self.allocation, self.allocation_spread = allocation, float(allocation_spread)
        self.n_layers = n_layers
        self._alloc_keys: Callable[[list[int], int, int], float] | None = None  # (class, units before, after)
        # last measured: group -> [(fraction cut, output error)] ("sensitivity"), or the outlier ratios
        self.sensitivity: dict[str, list[tuple[float, float]]] = {}
        self.groups: list[Group] = []
        for g in all_groups:
            i = layer_index(g)
            if g.kind not in wanted or (i is not None and (i < skip_first or i >= n_layers - skip_last)):
                continue
            if fixed is not None and g not in fixed:
                continue  # fixed scores: only the groups they cover are pruned
            self.groups.append(g)
        if not self.groups and (self.ratio or any((self.kind_ratio or {}).values())):
            cover = f"; the scores cover {len(fixed)} group(s), none of them selected" if fixed is not None else ""
            raise PlanError(f"Pruner: no group to prune: kinds {sorted(k.value for k in wanted)} with "
                            f"skip_first={skip_first}, skip_last={skip_last} select none of {self.graph!r}"
                            f"{cover}; nothing was cut")
        self.kinds = sorted({g.kind.value for g in self.groups})
        self.original_size = {id(g): g.size for g in self.groups}
        self.params_before = count_parameters(self.model)
        self.step_index = 0
        self.history: list[PruneReport] = []
        self._tolerance, self._limited, self._notes, self._warn = 0.0, False, [], []
        self._kind_params: dict[str, int] = defaultdict(int)  # parameters removed through each kind so far
        self._planned_kind_params: dict[str, int] | None = None
        self._last_plan: dict | None = None

    @staticmethod
    def _check_allocation(allocation, spread, target: str, scope: str, hf_loadable: bool, calib):
        """``allocation``/``allocation_spread`` checked against each other and the other arguments."""
        if isinstance(allocation, str):
            _check_choice("allocation", allocation, ALLOCATIONS)
        elif isinstance(allocation, Sequence) and allocation and all(
                isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) and w > 0
                for w in allocation):
            allocation = tuple(float(w) for w in allocation)
        else:
            raise _fail("allocation", allocation, "one of " + ", ".join(repr(a) for a in ALLOCATIONS) +
                        " or a sequence of positive per-layer weights")
        if (isinstance(spread, bool) or not isinstance(spread, numbers.Real) or not math.isfinite(spread)
                or not 0.0 <= float(spread) < 1.0):
            raise _fail("allocation_spread", spread, "a number in [0, 1) (0: uniform)")
        if allocation == "uniform":
            return allocation
        if target != "params" or scope != "local":
            raise PlanError(f"Pruner: allocation={allocation!r} distributes a parameter budget over the layers: "
                            "it needs target='params' and scope='local' (scope='global' allocates by ranking "
                            "scores instead); nothing was cut")
        if hf_loadable:
            raise PlanError(f"Pruner: allocation={allocation!r} gives layers different widths, which a Hugging "
                            "Face config cannot describe; use hf_loadable=False (save with "
                            "depgraph.save_pretrained); nothing was cut")
        if allocation in ("sensitivity", "outlier") and calib is None:
            raise PlanError(f"Pruner: allocation={allocation!r} measures each layer on calib= (token ids [N, L] "
                            "or a list of batches); nothing was cut")
        return allocation

    @staticmethod
    def _fixed_scores(criterion: Mapping, all_groups: list[Group]) -> dict[Group, torch.Tensor]:
        """``{group or group name: scores}`` as ``{group: float64 tensor}``, checked against the graph."""
        by_id = {id(g): g for g in all_groups}
        by_name = {g.name: g for g in all_groups}
        out: dict[Group, torch.Tensor] = {}
        for key, value in criterion.items():
            if isinstance(key, Group):
                if id(key) not in by_id:
                    raise PlanError(f"Pruner: the scores name group {key.name}, which is not a group of this graph "
                                    "(traced from another model, or before a re-trace); key them by this graph's "
                                    "groups or by their names; nothing was cut")
                group = key
            elif isinstance(key, str):
                if key not in by_name:
                    names = ", ".join(list(by_name)[:6])
                    raise PlanError(f"Pruner: the scores name {key!r}, which is no group of this graph (group "
                                    f"names: {names}{', ...' if len(by_name) > 6 else ''}); nothing was cut")
                group = by_name[key]
            else:
                raise PlanError(f"Pruner: fixed scores must be keyed by Group or group name, got "
                                f"{type(key).__name__}; nothing was cut")
            if group in out:
                raise PlanError(f"Pruner: group {group.name} has scores twice (as a group and by name); "
                                "nothing was cut")
            try:
                data = value.detach().cpu() if isinstance(value, torch.Tensor) else value
                scores = torch.as_tensor(np.asarray(data, dtype=np.float64)).reshape(-1)
            except (TypeError, ValueError) as exc:
                raise PlanError(f"Pruner: the scores of group {group.name} are not numbers ({exc}); pass a "
                                "tensor, array or list of floats; nothing was cut") from exc
            if scores.numel() != group.size:
                raise PlanError(f"Pruner: group {group.name} has {group.size} units but {scores.numel()} scores; "
                                "nothing was cut")
            if not torch.isfinite(scores).all():
                raise PlanError(f"Pruner: the scores of group {group.name} are not all finite; nothing was cut")
            out[group] = scores
        return out

    # ---- scoring and selection ------------------------------------------------------------------
    def scores(self) -> dict[Group, torch.Tensor]:
        """Current (normalised) scores of the selected groups."""
        return importance.score(self.graph, self.criterion, self.aggregate, self.calib, self.normalize,
                                self.groups, self.seed + self.step_index, self.progress, self.loss_fn,
                                **self.options)

    def _goal(self, step: int, kind: str | None = None) -> float:
        ratio = self.kind_ratio[kind] if kind is not None and self.kind_ratio is not None else self.ratio
        return float(ratio or 0.0) * step / self.steps

    def _round(self, group: Group) -> int | None:
        return self.head_round_to if group.kind is GroupKind.B else self.round_to

    def plan(self) -> dict[Group, list[int]]:
        """The units the next step cuts: ``{group: sorted unit ids}`` (lowest-scoring first chosen).

        Raises :class:`~depgraph.errors.PruneError` (nothing cut) when the target is out of reach and
        ``allow_partial`` is off, or when ``hf_loadable`` is on and no plan near the target keeps the model
        loadable by plain ``from_pretrained``.
        """
        if self.step_index >= self.steps:
            raise RuntimeError(f"all {self.steps} steps are done")
        groups = [g for g in self.groups if g.size > 0]
        scores = self.scores()
        orders = [importance.ranking(scores[g]) for g in groups]
        chunks = [_chunks(g.size, self._round(g)) for g in groups]
        classes = self._classes(groups)
        hf = _LoadableSearch(self.graph, groups, classes, chunks) if self.hf_loadable else None
        self._alloc_keys = None  # uniform first: the reachability check, and sensitivity's reference plan
        if self.step_index == 0 and self.steps > 1:  # refuse an unreachable final target before the first cut
            self._refuse_unreachable(self._counts(groups, scores, orders, chunks, classes, hf, self.steps))
        outcome = self._counts(groups, scores, orders, chunks, classes, hf, self.step_index + 1)
        if self.allocation != "uniform" and not outcome.limited:
            self._alloc_keys = self._allocation_keys(groups, orders, chunks, classes, outcome.counts)
            outcome = self._counts(groups, scores, orders, chunks, classes, hf, self.step_index + 1)
        self._refuse_unreachable(outcome)
        plan = {g: sorted(int(u) for u in order[:n]) for g, order, n in zip(groups, orders, outcome.counts) if n}
        if hf is not None:
            reason = plain_hf_reason(meta_cut(self.graph, plan)) if plan else plain_hf_reason(self.model)
            if reason is not None:
                raise PlanError(f"Pruner(hf_loadable=True): the plan nearest the target would need depgraph's "
                                f"own format: {reason}. Use hf_loadable=False (save with depgraph.save_pretrained"
                                ", reload with depgraph.load_pretrained) or change the ratio/kinds; nothing was "
                                "cut")
        self._tolerance, self._limited = outcome.tolerance, bool(outcome.limited)
        self._warn = list(outcome.limited)
        self._notes = self._zero_notes(groups, chunks, outcome.counts, classes, hf) + outcome.limited
        counter = _ParamCounter(self.graph, groups, orders)
        self._planned_kind_params = {
            k: counter.removed(outcome.counts, {i for i, g in enumerate(groups) if g.kind.value == k})
            for k in self.kinds}
        self._last_plan = plan
        return plan

    def _classes(self, groups: list[Group]) -> list[list[int]]:
        """Indices of identical blocks (same structure, same size, same cuts so far): they advance together.
        A non-uniform allocation gives each layer its own budget, so there a class never spans layers."""
        out: dict[tuple, list[int]] = {}
        for i, g in enumerate(groups):
            key = (_signature(g, self.original_size[id(g)]), self._removed_before(g), self._round(g))
            if self.allocation != "uniform":
                key += (layer_index(g),)
            out.setdefault(key, []).append(i)
        return list(out.values())

    def _layer_weights(self) -> list[float]:
        """Relative rate at which each decoder layer is cut (``"increasing"``, ``"outlier"`` or weights)."""
        if not isinstance(self.allocation, str):
            return list(self.allocation)
        n, s = self.n_layers, self.allocation_spread
        if self.allocation == "outlier":  # OWL: more outliers, lower rate, linearly within 1 -/+ s
            ratios = reconstruction.outlier_ratios(self.model, self.calib, progress=self.progress)
            self.sensitivity = {f"layer {i} outlier ratio": [(0.0, r)] for i, r in ratios.items()}
            d = [ratios.get(i, 0.0) for i in range(n)]
            mean, span = sum(d) / max(n, 1), max((abs(x - sum(d) / max(n, 1)) for x in d), default=0.0)
            return [1.0 - s * (x - mean) / span if span > 0 else 1.0 for x in d]
        # SlimGPT's schedule: the ratio grows logarithmically with depth, here from 1 - s to 1 + s times the
        # rate of the middle; the exact parameter target then fixes the absolute ratios
        return [1.0 - s + 2.0 * s * (math.log1p(i) / math.log(n) if n > 1 else 0.5) for i in range(n)]

    def _allocation_keys(self, groups: list[Group], orders, chunks, classes, uniform: list[int]):
        """The order key of a class's cut from ``a`` to ``b`` units (this step): cuts are taken lowest key
        first, so the exact-parameter prefix search of :meth:`_take_params` spends the budget in that order."""
        if self.allocation != "sensitivity":
            weights = self._layer_weights()

            def by_weight(cls: list[int], a: int, b: int) -> float:
                g = groups[cls[0]]
                i = layer_index(g)
                w = weights[i] if i is not None and i < len(weights) else 1.0
                return (self._removed_before(g) + b) / self.original_size[id(g)] / w

            return by_weight
        # sensitivity: each class's output error at a few cut sizes around the uniform plan's (the units the
        # criterion ranks lowest, consumers refitted as this pruner will), then cuts ordered by the error
        # they add per parameter removed: a greedy water-filling of the budget over the layers
        counter = _ParamCounter(self.graph, groups, orders)
        plans, owners = [], []
        for cls in classes:
            sizes = np.cumsum(chunks[cls[0]]).tolist()
            if not sizes:
                continue
            ref = max(uniform[cls[0]], sizes[0])
            points = sorted({_closest(sizes, m * ref) for m in _SENSITIVITY_POINTS})
            for n in points:
                plans.append({groups[gi]: [int(u) for u in orders[gi][:n]] for gi in cls})
                owners.append((tuple(cls), n))
        errors = reconstruction.plan_errors(self.graph, plans, self.calib, self.reconstruct, damp=self.damp,
                                            progress=self.progress) if plans else []
        curves: dict[tuple[int, ...], list[tuple[int, float]]] = defaultdict(lambda: [(0, 0.0)])
        for (cls, n), e in zip(owners, errors):
            curves[cls].append((n, e))
        self.sensitivity = {groups[cls[0]].name + (f" (+{len(cls) - 1})" if len(cls) > 1 else ""):
                            [(n / groups[cls[0]].size, e) for n, e in pts[1:]] for cls, pts in curves.items()}
        per_unit = {}
        for cls, pts in curves.items():
            n_max = pts[-1][0]
            counts = [0] * len(groups)
            for gi in cls:
                counts[gi] = n_max
            per_unit[cls] = max(counter.removed(counts) / max(n_max, 1), 1.0)

        def error_at(cls: tuple[int, ...], n: int) -> float:
            pts = curves[cls]
            for (n0, e0), (n1, e1) in zip(pts, pts[1:]):
                if n <= n1:
                    return e0 + (e1 - e0) * (n - n0) / max(n1 - n0, 1)
            (n0, e0), (n1, e1) = pts[-2], pts[-1]  # beyond the last point: its slope, never decreasing
            return e1 + max(e1 - e0, 0.0) * (n - n1) / max(n1 - n0, 1)

        def by_error(cls: list[int], a: int, b: int) -> float:
            key = tuple(cls)
            if key not in curves:
                return math.inf
            return max(error_at(key, b) - error_at(key, a), 0.0) / (per_unit[key] * max(b - a, 1))

        return by_error

    def _removed_before(self, g: Group) -> int:
        return self.original_size[id(g)] - g.size

    def _pools(self, groups: list[Group], classes: list[list[int]], step: int) -> list[_Pool]:
        kinds: dict[str, list[int]] = defaultdict(list)
        for i, g in enumerate(groups):
            kinds[g.kind.value].append(i)
        if self.target == "units":
            if self.scope == "local":  # one pool per class of identical blocks: they get the same count
                pools = []
                for cls in classes:
                    g = groups[cls[0]]
                    want = _round_half_up(self._goal(step, g.kind.value) * self.original_size[id(g)])
                    pools.append(_Pool(cls, (want - self._removed_before(g)) * len(cls), g.kind.value))
                return pools
            pools = []
            for k, members in kinds.items():
                orig = sum(self.original_size[id(groups[i])] for i in members)
                done = sum(self._removed_before(groups[i]) for i in members)
                pools.append(_Pool(members, _round_half_up(self._goal(step, k) * orig) - done, k))
            return pools
        if self.kind_ratio is not None:
            return [_Pool(members, self._goal(step, k) * self.params_before - self._kind_params[k], k)
                    for k, members in kinds.items()]
        current = count_parameters(self.model)
        return [_Pool(list(range(len(groups))), current - (1.0 - self._goal(step)) * self.params_before)]

    def _counts(self, groups, scores, orders, chunks, classes, hf, step: int) -> _Outcome:
        out = _Outcome([0] * len(groups))
        counter = _ParamCounter(self.graph, groups, orders) if self.target == "params" else None
        pools = self._pools(groups, classes, step)
        for pool in pools:
            cands = self._candidates(pool, groups, scores, orders, chunks, classes, hf)
            if counter is not None:
                out.tolerance += self._take_params(pool, cands, counter, out, hf) / max(self.params_before, 1)
            else:
                out.tolerance += self._take_units(pool, cands, groups, out, hf)
        if counter is None:  # each pool is within half a cut of its target: the sum bounds the total error
            out.tolerance /= 2 * max(sum(self.original_size.values()), 1)
        return out

    def _candidates(self, pool, groups, scores, orders, chunks, classes, hf) -> list[tuple[Any, list[int], int]]:
        """Cuts in the order they are taken: ``(key, group indices, units each)``; local scope advances
        identical blocks together, global scope takes one kind's chunks by mean normalised score."""
        members = set(pool.members)
        cands: list[tuple[float, int, list[int], int]] = []
        if self.scope == "local":
            for cls in classes:
                cls = [i for i in cls if i in members]
                if not cls:
                    continue
                g = groups[cls[0]]
                orig, done = self.original_size[id(g)], self._removed_before(g)
                sizes = hf.class_steps(cls) if hf is not None else chunks[cls[0]]
                cut, last = 0, 0.0  # units of this step; the class's largest key so far
                for size in sizes:
                    done += size
                    key: Any = done / orig
                    if self._alloc_keys is not None:  # a class's later cuts never sort before its earlier ones
                        last = max(last, self._alloc_keys(cls, cut, cut + size))
                        key = (last, done / orig)
                    cut += size
                    cands.append((key, len(cands), cls, size))
        else:
            orig = sum(self.original_size[id(groups[i])] for i in pool.members)
            done = sum(self._removed_before(groups[i]) for i in pool.members)
            rows = []
            for gi in pool.members:
                s = scores[groups[gi]].double().numpy()[orders[gi]]
                start = 0
                for ci, size in enumerate(chunks[gi]):
                    rows.append((float(s[start:start + size].mean()), gi, ci, size))
                    start += size
            rows.sort(key=lambda r: (r[0], r[1], r[2]))
            for _, gi, _, size in rows:
                done += size
                cands.append((done / orig, len(cands), [gi], size))
        cands.sort(key=lambda c: (c[0], c[1]))
        return [(key, gis, size) for key, _, gis, size in cands]

    def _take_units(self, pool: _Pool, cands, groups, out: _Outcome, hf) -> int:
        totals = [0]
        for _, gis, size in cands:
            totals.append(totals[-1] + size * len(gis))
        options = list(range(len(totals)))
        if hf is not None:
            options = [k for k in options if hf.feasible(_apply(out.counts, cands[:k]))] or [0]
        k = min(options, key=lambda k: (abs(totals[k] - pool.want), k))
        for _, gis, size in cands[:k]:
            for gi in gis:
                out.counts[gi] += size
        step = max((size * len(gis) for _, gis, size in cands), default=len(pool.members))
        label = groups[pool.members[0]].name if self.scope == "local" else f"kind {pool.kind}"
        if self.scope == "local" and len(pool.members) > 1:
            label += f" (and {len(pool.members) - 1} identical block(s))"
        self._limit(out, label, pool.want, totals[k], totals[-1], k == len(cands), step, "units")
        return step

    def _take_params(self, pool: _Pool, cands, counter: _ParamCounter, out: _Outcome, hf) -> int:
        """Take cuts in candidate order while they fit the pool's budget; a cut that would overshoot (one
        head of a 4-head group) is skipped with the rest of its class, and the finer kinds take the rest.
        Then the overshooting cut is taken after all if that lands closer to the target."""
        base = list(out.counts)
        run = _Running(counter, base)
        blocked: dict[tuple[int, ...], int] = {}  # class -> index of its first skipped cut
        for idx, (_, gis, size) in enumerate(cands):
            cls = tuple(gis)
            if cls in blocked:
                continue
            gain = run.gain(gis, size)
            if run.total + gain <= pool.want:
                run.take(gis, size)
            else:
                blocked[cls] = idx
        nexts = [run.gain(cands[i][1], cands[i][2]) for i in blocked.values()]
        if nexts:
            best = min(range(len(nexts)), key=lambda i: abs(run.total + nexts[i] - pool.want))
            if abs(run.total + nexts[best] - pool.want) < abs(run.total - pool.want):
                idx = list(blocked.values())[best]
                run.take(cands[idx][1], cands[idx][2])
        counts, got = run.counts, run.total
        if hf is not None and not hf.feasible(counts):
            counts, got = self._feasible_prefix(pool, cands, counter, base, hf)
        out.counts[:] = counts
        step = min(nexts) if nexts else run.last
        label = f"kind {pool.kind}" if pool.kind else "the selected groups"
        most = counter.removed(_apply(base, cands)) - counter.removed(base)
        self._limit(out, label, pool.want, got, most, not blocked and run.taken == len(cands), step, "params")
        return step

    def _feasible_prefix(self, pool: _Pool, cands, counter: _ParamCounter, base: list[int], hf) -> tuple[list[int], int]:
        """The candidate prefix closest to the target whose counts plain ``from_pretrained`` accepts."""
        def removed(k: int) -> int:
            return counter.removed(_apply(base, cands[:k])) - counter.removed(base)

        lo, hi = 0, len(cands)  # largest k with removed(k) <= want (monotone in k)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if removed(mid) <= pool.want:
                lo = mid
            else:
                hi = mid - 1
        span = range(max(0, lo - _MAX_HF_TRIES // 2), min(len(cands), lo + _MAX_HF_TRIES // 2) + 1)
        ok = [k for k in span if hf.feasible(_apply(base, cands[:k]))] or [0]
        k = min(ok, key=lambda k: (abs(removed(k) - pool.want), k))
        return _apply(base, cands[:k]), removed(k)

    def _limit(self, out: _Outcome, label: str, want: float, got: float, most: float, all_taken: bool,
               step: float, metric: str) -> None:
        """Record that ``label`` was held short of its target (everything it allows is cut)."""
        if all_taken and want - got > max(step, 1) / 2 + 1e-9:
            unit = "parameters" if metric == "params" else "units"
            out.limited.append(f"{label}: wanted {want:,.0f} more {unit}, at most {most:,.0f} can go "
                               "(every group at its minimum size under the rounding)")

    def _refuse_unreachable(self, outcome: _Outcome) -> None:
        if not outcome.limited or self.allow_partial:
            return
        reach = self._largest_reachable()
        raise PruneError(f"Pruner: the target of {self._target_text()} is out of reach: {outcome.limited[0]}"
                         f"{' (and more)' if len(outcome.limited) > 1 else ''}. The largest reachable fraction "
                         f"with these settings is {reach}. Lower the ratio, lower round_to/head_round_to, select "
                         "more kinds, or pass allow_partial=True to cut as far as possible; nothing was cut")

    def _target_text(self) -> str:
        what = "of the model's parameters" if self.target == "params" else "of the selected units"
        if self.kind_ratio is not None:
            return ", ".join(f"{k} {r:.1%}" for k, r in self.kind_ratio.items()) + f" {what}"
        return f"{self.ratio:.1%} {what}"

    def _largest_reachable(self) -> str:
        """Every selected group cut to its minimum size (rounding included), as fractions per budget."""
        plan = {g: list(range(sum(_chunks(g.size, self._round(g))))) for g in self.groups}
        if self.target == "params":
            total = 1.0 - simulate_params(self.graph, plan) / max(self.params_before, 1)
            return f"{total:.2%} of the model's parameters"
        by_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for g, units in plan.items():
            by_kind[g.kind.value][0] += self._removed_before(g) + len(units)
            by_kind[g.kind.value][1] += self.original_size[id(g)]
        return ", ".join(f"{k} {a / max(b, 1):.2%}" for k, (a, b) in sorted(by_kind.items())) + " of the units"

    def _zero_notes(self, groups, chunks, counts, classes, hf) -> list[str]:
        """A kind with a non-zero budget that the rounding (or the plain-HF constraint) leaves uncut."""
        notes = []
        for k in self.kinds:
            idx = [i for i, g in enumerate(groups) if g.kind.value == k]
            if not idx or self._goal(self.step_index + 1, k) == 0 or any(counts[i] for i in idx):
                continue
            if any(self._removed_before(groups[i]) for i in idx):
                continue
            rnd = "head_round_to" if k == "B" else "round_to"
            if not any(chunks[i] for i in idx):
                why = (f"{rnd}={self._round(groups[idx[0]])} keeps at least that many of the "
                       f"{groups[idx[0]].size} units of each group" if self._round(groups[idx[0]]) else
                       "every group has one unit")
            elif hf is not None and not any(hf.class_steps(c) for c in classes if c[0] in idx):
                why = "plain from_pretrained needs sizes the config accepts (hf_loadable)"
            elif self.step_index + 1 == self.steps:  # plain rounding: worth a note, not a warning
                notes.append(f"kind {k}: no unit cut: the target is closer without cutting one "
                             f"(one unit is {1 / max(groups[idx[0]].size, 1):.0%} of a group)")
                continue
            else:
                continue
            notes.append(f"kind {k}: no unit cut: {why}")
            self._warn.append(notes[-1])
        return notes

    # ---- cutting ----------------------------------------------------------------------------------
    def step(self, plan: Mapping[Group, list[int]] | None = None) -> PruneReport:
        """Score, plan and cut one step; returns the cut's report with ``report.target`` attached.

        ``plan``: cut this plan (e.g. the one :meth:`plan` returned and you inspected) instead of re-scoring.
        """
        if self.step_index >= self.steps:
            raise RuntimeError(f"all {self.steps} steps are done")
        if plan is None:
            plan = self.plan()
        elif plan is not self._last_plan:  # the caller's own plan: the planner's notes do not apply
            self._notes, self._warn, self._limited, self._tolerance = [], [], False, 0.0
            self._planned_kind_params = None
        checked = validate_plan(self.graph, plan)  # before anything changes: the scores below follow it
        survivors = {}
        if isinstance(self.criterion, dict):  # fixed scores follow the surviving units
            for g, units in checked.items():
                if g in self.criterion:
                    keep = np.ones(self.criterion[g].numel(), dtype=bool)
                    keep[units] = False
                    survivors[g] = self.criterion[g][torch.as_tensor(keep)]
        kind_params = self._planned_kind_params
        if kind_params is None:
            groups = list(checked)
            counter = _ParamCounter(self.graph, groups, [np.concatenate([u, np.setdiff1d(np.arange(g.size), u)])
                                                          for g, u in checked.items()])
            counts = [len(u) for u in checked.values()]
            kind_params = {k: counter.removed(counts, {i for i, g in enumerate(groups) if g.kind.value == k})
                           for k in self.kinds}
        if self.reconstruct is None:
            report = self.graph.prune(checked)
        else:
            select = None
            if self.sequential and self.criterion == "obs":  # re-choose each layer's units, same counts
                select = reconstruction.obs_select(self.graph, {g: len(u) for g, u in checked.items()}, self.damp,
                                                   float(self.options.get("obs_batch", 1 / 16)), self.aggregate)
            report = reconstruction.reconstruct(self.graph, checked, self.calib, self.reconstruct, damp=self.damp,
                                                sequential=self.sequential, progress=self.progress, select=select)
        self.criterion = {**self.criterion, **survivors} if survivors else self.criterion
        for k, n in kind_params.items():
            self._kind_params[k] += n
        self.step_index += 1
        report.target = self._target_report()
        self.history.append(report)
        self._planned_kind_params, self._last_plan = None, None
        return report

    def prune(self) -> PruneReport:
        """Run every remaining step; returns one report from the first to the last cut."""
        for _ in tqdm(range(self.step_index, self.steps), desc="pruning steps",
                      disable=not self.progress or self.steps == 1, leave=False):
            self.step()
        return self._merged()

    def _target_report(self) -> TargetReport:
        goal = self._goal(self.step_index)
        if self.target == "params":
            achieved = 1.0 - count_parameters(self.model) / max(self.params_before, 1)
        else:
            orig = sum(self.original_size.values())
            achieved = sum(self.original_size[id(g)] - g.size for g in self.groups) / max(orig, 1)
            if self.kind_ratio is not None:  # per-kind unit budgets: the request in units of all selected
                goal = sum(self._goal(self.step_index, g.kind.value) * self.original_size[id(g)]
                           for g in self.groups) / max(orig, 1)
        kinds = {}
        for k in self.kinds:
            sel = [g for g in self.groups if g.kind.value == k]
            requested = self._goal(self.step_index, k) if self.kind_ratio is not None else None
            kinds[k] = KindResult(sum(self.original_size[id(g)] for g in sel), sum(g.size for g in sel),
                                  self._kind_params[k], self.params_before, requested)
        per_layer: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        for g in self.groups:
            i = layer_index(g)
            if i is not None:
                per_layer[i][g.kind.value][0] += self.original_size[id(g)] - g.size
                per_layer[i][g.kind.value][1] += self.original_size[id(g)]
        layer_ratios = {i: {k: a / max(b, 1) for k, (a, b) in by.items()} for i, by in sorted(per_layer.items())}
        allocation = self.allocation if isinstance(self.allocation, str) else "weights " + ", ".join(
            f"{w:g}" for w in self.allocation)
        report = TargetReport(self.target, goal, achieved, self._tolerance, self.step_index, self._limited,
                              kinds, list(self._notes), plain_hf_reason(self.model), allocation, layer_ratios)
        for note in self._warn:
            warnings.warn(f"Pruner: {note}", stacklevel=4)
        return report

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


def _apply(counts: list[int], cands) -> list[int]:
    """``counts`` after taking the candidate cuts ``cands`` (each ``(key, group indices, units each)``)."""
    out = list(counts)
    for _, gis, size in cands:
        for gi in gis:
            out[gi] += size
    return out


class _LoadableSearch:
    """Which unit counts keep a model loadable by plain ``from_pretrained`` (``Pruner(hf_loadable=True)``).

    One probe per class of identical blocks cuts one unit in each of them on a meta copy
    (:func:`meta_cut`) and records how the config's integer fields move; a plan's config is then
    predicted from its counts and checked with the config class's own validation, which is fast enough to
    search. The chosen plan is checked for real on a meta copy before it is cut.
    """

    def __init__(self, graph: DependencyGraph, groups: list[Group], classes: list[list[int]], chunks):
        self.config = getattr(graph.model, "config", None)
        if self.config is None or not hasattr(self.config, "to_dict"):
            raise PlanError(f"Pruner(hf_loadable=True): {type(graph.model).__name__} has no Hugging Face "
                            "config, so plain from_pretrained cannot load it anyway; use hf_loadable=False")
        before = self.config.to_dict()
        self.classes, self.chunks = classes, chunks
        self.moves: list[dict[str, int]] = []  # per class: config field -> change per unit cut
        self.of_group = {}
        for ci, cls in enumerate(classes):
            for gi in cls:
                self.of_group[gi] = ci
            if not chunks[cls[0]]:
                self.moves.append({})
                continue
            try:
                after = meta_cut(graph, {groups[gi]: [0] for gi in cls}).config.to_dict()
            except PruneError:  # a one-unit probe is refused (rounded layouts): the final check decides
                self.moves.append({})
                continue
            self.moves.append({k: after[k] - v for k, v in before.items()
                               if type(v) is int and type(after.get(k)) is int and after[k] != v})
        self._cache: dict[tuple, bool] = {}

    def _config_ok(self, per_class: tuple[int, ...]) -> bool:
        if per_class not in self._cache:
            config = copy.deepcopy(self.config)
            for ci, n in enumerate(per_class):
                for key, move in self.moves[ci].items():
                    setattr(config, key, getattr(config, key) + move * n)
            try:
                if hasattr(config, "validate"):
                    config.validate()
                ok = True
            except Exception:  # the config class refuses these sizes
                ok = False
            self._cache[per_class] = ok
        return self._cache[per_class]

    def feasible(self, counts: list[int]) -> bool:
        """Uniform within every class, and a config the class accepts."""
        per_class = []
        for cls in self.classes:
            n = {counts[gi] for gi in cls}
            if len(n) > 1:
                return False
            per_class.append(n.pop())
        return self._config_ok(tuple(per_class))

    def class_steps(self, cls: list[int]) -> list[int]:
        """The class's chunks merged so that every count it passes through is accepted on its own."""
        ci = self.of_group[cls[0]]
        steps, pending, total = [], 0, 0
        for size in self.chunks[cls[0]]:
            pending += size
            total += size
            alone = tuple(total if i == ci else 0 for i in range(len(self.classes)))
            if self._config_ok(alone):
                steps.append(pending)
                pending = 0
        return steps
