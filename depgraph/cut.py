"""The structural cut: remove a plan's units from every parameter slice they couple.

``prune(graph, {group: unit_ids})`` is atomic. It validates the whole plan, stages every new
tensor and every attribute edit, commits them, then runs one forward pass to check the model
still works; on any failure everything is rolled back, so the model is bit-identical to
before. Parameters are cut in place (``param.data = ...``), which keeps tied weights tied
and optimizers' references valid.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .activation_mask import masked_activations
from .checkpoint import BASE_CONFIG_ATTR
from .errors import PruneError
from .groups import Group, GroupKind
from .sizes import group_edits, model_tensors, module_edits, rms_norm_edits
from .slicing import gather
from .transaction import EditReport, Transaction, check_forward, count_parameters, run_forward

Plan = Mapping[Group, Iterable[int]]


@dataclass
class PruneReport(EditReport):
    """What a cut did: parameter counts, new shapes, attribute edits, units removed per group."""

    params_before: int
    params_after: int
    units_removed: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    edits: list[tuple[str, str, object, object]] = field(default_factory=list)
    # parameter -> {dim: indices kept along it} (old positions, sorted), e.g. for cut_optimizer_state
    kept: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    verified: bool = True  # False: no forward check ran (verify=False, or meta weights have no values)
    plan: dict[Group, np.ndarray] | None = None  # the units cut (re-chosen ones for sequential OBS)
    target: object | None = None  # a Pruner step's TargetReport (requested / achieved, per kind)
    reconstruction: object | None = None  # depgraph.reconstruct's ReconstructionReport, when it refitted

    def describe(self) -> str:
        return (f"pruned {sum(self.units_removed.values())} units in {len(self.units_removed)} groups"
                + ("" if self.verified else " (shapes only, not verified by a forward pass)"))


def validate_plan(graph, plan: Plan) -> dict[Group, np.ndarray]:
    """Check a plan and return sorted unit-id arrays; raise :class:`PruneError` naming the problem."""
    if not isinstance(plan, Mapping):
        raise PruneError(f"a pruning plan must map Group -> unit ids, got {type(plan).__name__}")
    own = {id(g) for g in graph.groups()}
    checked: dict[Group, np.ndarray] = {}
    for group, units in plan.items():
        if not isinstance(group, Group):
            raise PruneError(f"plan key {group!r} is not a depgraph Group (use graph.groups())")
        if id(group) not in own:
            raise PruneError(f"group {group.name} is not a group of this graph (it comes from another "
                             "trace, or was dropped); take groups from the same graph you prune with")
        try:
            ids = np.asarray(list(units))
        except TypeError as exc:
            raise PruneError(f"group {group.name}: unit ids must be an iterable of ints ({exc})") from exc
        if ids.size == 0:
            continue
        if not np.issubdtype(ids.dtype, np.integer):
            raise PruneError(f"group {group.name}: unit ids must be integers, got {ids.dtype}")
        ids = ids.astype(np.int64)
        bad = ids[(ids < 0) | (ids >= group.size)]
        if bad.size:
            raise PruneError(f"group {group.name}: unit id {int(bad[0])} is out of range [0, {group.size})")
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise PruneError(f"group {group.name}: duplicate unit id {int(uniq[counts > 1][0])}")
        if uniq.size >= group.size:
            raise PruneError(f"group {group.name}: the plan removes all {group.size} units; keep at least one "
                             "(to drop a whole block use depgraph.remove_layers)")
        checked[group] = uniq
    return checked


def _config_of(model: nn.Module):
    return getattr(model, "config", None)


def check_current(graph) -> dict[str, torch.Tensor]:
    """The model's tensors by name, after checking the graph still describes them (same names and
    shapes as when traced); else :class:`PruneError`: the graph is stale (the model was cut through
    another graph, layers or experts were removed), and its unit ids would name the wrong channels."""
    tensors = model_tensors(graph.model)
    for name, shape in graph.param_shapes.items():
        if name not in tensors:
            raise PruneError(f"parameter {name} no longer exists (layers removed or renamed since tracing): "
                             "the graph is stale; re-trace the model")
        if tuple(tensors[name].shape) != tuple(shape):
            raise PruneError(f"parameter {name} changed shape since tracing ({shape} -> "
                             f"{tuple(tensors[name].shape)}): the graph is stale; re-trace the model")
    return tensors


def zero_mask(graph, plan: Plan) -> None:
    """Reference for the cut: zero the planned units in place, in the consumer slices (role "in"); for
    hidden channels (C) everywhere they live (embeddings, producers, biases, norm weights).

    For MLP neurons and heads, a model masked this way computes exactly what the cut model does; for
    hidden channels under RMSNorm too (``Group.exact``: the cut rescales the norms).
    """
    checked = validate_plan(graph, plan)
    tensors = check_current(graph)  # a stale graph's unit ids name other channels: refuse, like prune
    with torch.no_grad():
        for t, d, idx in _mask_slices(checked, tensors, everywhere=True):
            t.index_fill_(d, idx.to(t.device), 0)


def _mask_slices(checked: dict[Group, np.ndarray], tensors, *,
                 everywhere: bool) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """``(tensor, dim, indices)`` that zero-masking the plan zeroes: the consumer slices of A/B units; the
    slices of C channels, so the channel is zero in the residual stream (what a norm's statistic sees):
    every slice with ``everywhere``, else all but the consumers' input slices."""
    def zeroed(group: Group, role: str) -> bool:
        if group.kind is GroupKind.C:
            return everywhere or role != "in"
        return role == "in"

    return [(tensors[m.param], m.dim, torch.as_tensor(m.indices(u), dtype=torch.long))
            for g, u in checked.items() for m in g.members if zeroed(g, m.role)]


def prune(graph, plan: Plan, *, verify: bool = True) -> PruneReport:
    """Cut the units of ``plan`` ({group: unit ids}) from ``graph.model`` in place, atomically.

    Raises :class:`PruneError` (model unchanged) for an invalid plan, a stale graph, a layer
    that cannot be resized, or a cut model that no longer runs (``verify``).
    """
    model = graph.model
    checked = validate_plan(graph, plan)
    tensors = check_current(graph)
    before = count_parameters(model)
    if not checked:
        return PruneReport(before, before)
    # meta weights have no values: a forward "check" would verify nothing, so it is skipped and reported
    verify = verify and not any(t.device.type == "meta" for t in tensors.values())

    # 1. indices kept along every parameter dim, and the RMSNorm rescales of hidden cuts
    keep_masks, new_shapes, norm_scales, norm_edits = _layout(graph, checked, tensors)

    for param, shape in new_shapes.items():
        # fused expert weights [experts, a, b] go through grouped matmuls that need 16-byte strides
        if param in getattr(graph, "expert_params", ()) and param in tensors:
            item = tensors[param].element_size()
            bad = [d for d in (1, 2) if shape[d] * item % 16]
            if bad:
                owner = next(g for g in checked if any(m.param == param for m in g.members))
                raise PruneError(f"group {owner.name}: fused expert weight {param} would get shape {shape}; "
                                 f"grouped matmuls need dims 1-2 to be multiples of {16 // item} elements "
                                 f"({tensors[param].dtype}). Cut a multiple of {16 // item} units (Pruner "
                                 f"round_to={16 // item}). The model is unchanged.")

    # 2. stage the index sets of every cut (tensors are cut one at a time at commit, so at most one
    #    old parameter is alive beside the new ones)
    staged: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = defaultdict(list)
    for (param, dim), keep in keep_masks.items():
        device = tensors[param].device
        staged[param].append((dim, torch.as_tensor(np.flatnonzero(keep), dtype=torch.long, device=device),
                              torch.as_tensor(np.flatnonzero(~keep), dtype=torch.long, device=device)))

    # 3. the reference for exact groups: the same units zero-masked in the model as it is now (first
    #    only where their values are produced, see _masked_reference)
    reference = _masked_reference(graph, checked, tensors, everywhere=False) if verify else None
    everywhere = False

    # 4. stage attribute edits and commit; the first attempt also rescales attention sizes that
    #    are named like the hidden size ("embed_dim" == heads x head_dim), the second does not
    transaction = Transaction()
    failure: Exception | None = None
    attempts = [True, False]
    while attempts:
        guess_inner = attempts[0]
        edits = module_edits(model, new_shapes) + group_edits(graph, checked, guess_inner=guess_inner) + norm_edits
        transaction = Transaction()
        config = _config_of(model)
        try:
            # any BaseException (Ctrl-C included) rolls back inside the with; Exceptions then retry
            with transaction:
                if config is not None and hasattr(config, "to_dict") and not hasattr(model, BASE_CONFIG_ATTR):
                    # remember the unpruned config: checkpoints describe per-layer sizes relative to it
                    transaction.set_attr(model, BASE_CONFIG_ATTR, copy.deepcopy(config))
                with torch.no_grad():
                    for param, cuts in staged.items():
                        transaction.cut_data(tensors[param], cuts)
                    for param, scale in norm_scales.items():  # norm weights: small, kept whole for undo
                        transaction.set_data(tensors[param], tensors[param].data * scale)
                for obj, name, value in edits:
                    old = getattr(obj, name, None)
                    if old is not value and not (isinstance(value, (int, float, str, tuple)) and old == value):
                        transaction.set_attr(obj, name, value)
                if verify:
                    out = check_forward(model, *graph.example_inputs)
                    if reference is not None:
                        _check_exact(out, reference, checked)
            failure = None
            break
        except _Mismatch as exc:  # rolled back already: the model is as it was
            failure = exc
            if not everywhere:  # confirm against units zeroed in every slice before retrying or failing
                everywhere = True
                reference = _masked_reference(graph, checked, tensors, everywhere=True)
                if reference is None:  # no reference to confirm with: a mismatch stands, never an unchecked cut
                    break
                continue
            attempts.pop(0)
        except Exception as exc:  # rolled back already: the model is as it was
            failure = exc
            attempts.pop(0)
    if failure is not None:
        if isinstance(failure, PruneError):
            raise failure
        raise PruneError(f"the cut could not be applied ({type(failure).__name__}: {str(failure)[:300]}); "
                         "the model was left unchanged") from failure

    report = PruneReport(before, count_parameters(model), verified=verify)
    for (param, dim), keep in keep_masks.items():
        report.kept.setdefault(param, {})[dim] = np.flatnonzero(keep)
    report.plan = checked
    report.units_removed = {g.name: int(u.size) for g, u in checked.items()}
    report.shapes = {p: (tuple(graph.param_shapes[p]), s) for p, s in new_shapes.items()}
    names = {id(m): n for n, m in model.named_modules()}
    for obj, name, old in transaction.attribute_changes():
        report.edits.append((names.get(id(obj), type(obj).__name__), name, old, getattr(obj, name, None)))
    _update_graph(graph, checked, keep_masks, new_shapes)
    return report


def _layout(graph, checked: dict[Group, np.ndarray], tensors) -> tuple[
        dict[tuple[str, int], np.ndarray], dict[str, tuple[int, ...]], dict[str, float], list]:
    """What a cut does to every tensor: ``(keep masks per (param, dim), new shapes, RMSNorm weight factors
    per param, eps edits)``; the one computation :func:`prune` and :func:`tensor_cuts` share."""
    remove: dict[tuple[str, int], set[int]] = defaultdict(set)
    for group, units in checked.items():
        for m in group.members:
            remove[(m.param, m.dim)].update(m.indices(units).tolist())
    keep_masks: dict[tuple[str, int], np.ndarray] = {}
    new_shapes: dict[str, tuple[int, ...]] = {}
    for (param, dim), idx in remove.items():
        shape = graph.param_shapes[param]
        keep = np.ones(shape[dim], dtype=bool)
        keep[list(idx)] = False
        keep_masks[(param, dim)] = keep
        new = list(new_shapes.get(param, shape))
        new[dim] = int(keep.sum())
        new_shapes[param] = tuple(new)
    # hidden cuts under RMSNorm: rescale each norm's weight and eps so the cut equals zero-masking
    norm_edits: list = []
    norm_scales: dict[str, float] = {}
    cut_params = {p for p, _ in keep_masks}
    for group, units in checked.items():
        scales, eps_edits = rms_norm_edits(graph.model, group, group.size - int(units.size))
        norm_edits += eps_edits
        for param in cut_params:
            if id(tensors[param]) in scales:
                norm_scales[param] = norm_scales.get(param, 1.0) * scales[id(tensors[param])]
    return keep_masks, new_shapes, norm_scales, norm_edits


@dataclass
class TensorCut:
    """How a cut changes one tensor: keep ``kept[dim]`` (old positions, sorted) along each dim, then
    multiply by ``scale`` (RMSNorm weights under a hidden-channel cut; 1.0 otherwise)."""

    shape: tuple[int, ...]  # the shape after the cut
    kept: dict[int, np.ndarray] = field(default_factory=dict)
    scale: float = 1.0

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (the uncut values) cut exactly as :func:`prune` cuts the model's own tensor."""
        out = gather(tensor, [(dim, torch.as_tensor(keep, dtype=torch.long, device=tensor.device))
                              for dim, keep in self.kept.items()])
        if self.scale != 1.0:
            out = out * self.scale  # the dtype's own multiply, as prune applies it
        return out


def tensor_cuts(graph, plan: Plan) -> dict[str, TensorCut]:
    """``{tensor name: TensorCut}`` for every parameter or buffer ``plan`` changes, without changing anything.

    Applying each to the tensor's values gives what :func:`prune` leaves in the model (the streaming
    writer of :func:`depgraph.prune_checkpoint` cuts checkpoint tensors this way). Names are the
    model's ``named_parameters`` / ``named_buffers`` names (a tied weight under its first name).
    """
    checked = validate_plan(graph, plan)
    tensors = check_current(graph)
    keep_masks, new_shapes, norm_scales, _ = _layout(graph, checked, tensors)
    out = {param: TensorCut(shape) for param, shape in new_shapes.items()}
    for (param, dim), keep in keep_masks.items():
        out[param].kept[dim] = np.flatnonzero(keep)
    for param, scale in norm_scales.items():
        out[param].scale = float(scale)
    return out


def reference_output(graph, plan: Plan, *, everywhere: bool = False) -> torch.Tensor | None:
    """What the model cut by ``plan`` must compute on ``graph.example_inputs``: the output of the model as it is
    now with the plan's units zero-masked (the model is left as it was); None when a group of the plan is
    not exact (a cut of it is not equivalent to any masking) or the weights are on ``meta``.

    :func:`prune` checks every cut of exact groups against it. ``everywhere=True`` zeroes the slices of
    :func:`zero_mask` in the weights; the default masks fewer slices, mostly as features (see below), and
    gives the same output for correctly grouped models.
    """
    return _masked_reference(graph, validate_plan(graph, plan), check_current(graph), everywhere=everywhere)


def _masked_reference(graph, checked: dict[Group, np.ndarray], tensors, *, everywhere: bool) -> torch.Tensor | None:
    """Output of the model with the plan's units zero-masked (the model is left as it was).

    Only for plans of exact groups on real (non-meta) weights: then the cut model must
    reproduce it, which catches a module attribute the cut forgot or mis-scaled. With ``everywhere``
    the slices of :func:`zero_mask`, zeroed in the weights. Without, hidden channels are zeroed only where
    they are made (embeddings, producers, biases, norm weights), not in their consumers' input slices (a
    channel that is zero in the residual stream is zero in every consumer's input, so the output is the
    same), and slices of linear and embedding weights are masked as features by forward hooks rather than
    in the weights: no weight copies, which are most of the time and memory a check costs. Any failure of
    that way falls back to zeroing weights.
    """
    if not all(g.exact for g in checked):
        return None
    slices = _mask_slices(checked, tensors, everywhere=everywhere)
    if not slices or any(t.device.type == "meta" for t, _, _ in slices):
        return None
    if not everywhere:
        try:
            with masked_activations(graph.model, slices) as rest:
                return _zeroed_output(graph, rest)
        except Exception:  # noqa: BLE001 - hooks the model's code does not tolerate: zero the weights
            pass
    try:
        return _zeroed_output(graph, slices)
    except Exception:  # the model cannot run as traced: the forward check will say so
        return None


def _zeroed_output(graph, slices) -> torch.Tensor | None:
    """The model's output with ``slices`` zeroed in the weights (saved and restored, also on errors)."""
    saved = [(t, d, i, t.data.index_select(d, i.to(t.device))) for t, d, i in slices]  # already a copy
    try:
        with torch.no_grad():
            for t, d, i, _ in saved:
                t.data.index_fill_(d, i.to(t.device), 0)
        return run_forward(graph.model, *graph.example_inputs)
    finally:
        with torch.no_grad():
            for t, d, i, old in saved:
                t.data.index_copy_(d, i.to(t.device), old)


class _Mismatch(PruneError):
    """The cut model does not reproduce the zero-masked reference."""


def _check_exact(out: torch.Tensor | None, reference: torch.Tensor, checked) -> None:
    if out is None or out.shape != reference.shape:
        raise _Mismatch("the cut model's output shape changed; the cut was rolled back")
    tol = 1e-4 if out.dtype == torch.float32 or out.dtype == torch.float64 else 2e-2
    out, reference = out.float(), reference.float()
    gap = (out - reference).abs()
    gap[out.isnan() & reference.isnan()] = 0.0  # NaN where the reference has NaN agrees; elsewhere it does not
    diff = float(gap.nan_to_num(nan=float("inf")).max())
    scale = float(reference.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).abs().max()) or 1.0
    if not diff <= tol * max(1.0, scale):
        names = ", ".join(g.name for g in checked)
        raise _Mismatch(f"cutting {names} does not reproduce zero-masking the same units (max |diff| "
                         f"{diff:.3g}): a module reads a size the cut did not update. The cut was rolled "
                         "back and the model is unchanged; please report the model class.")


def _update_graph(graph, checked, keep_masks, new_shapes) -> None:
    """Keep the graph valid for further pruning: shrink members, renumber units."""
    for group in graph.groups():
        for m in group.members:
            keep = keep_masks.get((m.param, m.dim))
            if keep is not None:
                m.unit_of_index = m.unit_of_index[keep]
        units = checked.get(group)
        if units is not None:
            alive = np.ones(group.size, dtype=bool)
            alive[units] = False
            new_id = np.cumsum(alive) - 1
            for m in group.members:
                m.unit_of_index = np.where(m.unit_of_index >= 0, new_id[np.maximum(m.unit_of_index, 0)], -1)
            group.size -= int(units.size)
    for (param, dim), keep in keep_masks.items():
        graph._param_ids[(param, dim)] = graph._param_ids[(param, dim)][keep]
        node = f"param:{param}:{dim}"
        if node in graph.nx:
            graph.nx.nodes[node]["size"] = int(keep.sum())
    graph.param_shapes.update(new_shapes)
    graph._set_param_counts()
