"""Calibration reconstruction of the layers a cut changes, and the OBS criterion that matches it.

A cut removes units; every layer that *reads* them (the group's ``in`` members: ``down_proj`` for MLP
neurons, ``o_proj`` for heads, every ``nn.Linear`` / ``Conv1D`` column a hidden channel feeds) loses
input columns. :func:`reconstruct` cuts a plan and, in the same atomic step, refits the kept columns
of each such consumer so that its output on calibration data changes as little as possible.

For a consumer ``y = W x (+ b)`` with input ``x`` of width ``n``, removed columns ``R`` and kept
columns ``K``, the calibration inputs give ``H = sum_t x_t x_tᵀ`` (accumulated in float64 by forward
pre-hooks, one ``[n, n]`` matrix per consumer: activations are never stored). Then:

* ``method="lsq"`` solves the ridge least squares problem
  ``min_V ||W X - V X_K||² + λ ||V - W_K||²``, i.e.
  ``V = (W H[:, K] + λ W_K) (H[K, K] + λ I)⁻¹`` with ``λ = damp · mean(diag H[K, K])``
  (``damp=0.01`` by default). The ridge term pulls towards the original weights rather than towards
  zero: then the calibration error of the result is never larger than that of the plain cut (the plain
  cut ``V = W_K`` is a candidate with zero penalty), and ``H[K, K] + λI`` is invertible even when ``H``
  is singular (constant or duplicated inputs, fewer tokens than columns). When the layer has a bias, the
  constant input 1 is one more kept column, so the bias is refitted with the weights.
* ``method="bias"`` (FLAP's bias compensation) keeps ``W_K`` and adds the mean contribution of the
  removed inputs to the bias: ``b += W_R · mean_t(x_t[R])``. Only layers that already have a bias get it
  (GPT-2, OPT, Phi, BERT, Falcon with bias, Qwen2's q/k/v); a bias is never added to a layer without one
  (Llama, Mistral, Qwen, Gemma, Phi-3), so those layers are left as the plain cut leaves them.

Every new weight is computed before anything is committed; the cut itself is :meth:`graph.prune`. On
any failure (KeyboardInterrupt included) every weight is restored, so the model is as it was.

``sequential=True`` processes decoder layers in order (SparseGPT-style): the statistics of layer ``i``'s
consumers are collected with layers ``< i`` already reconstructed and their removed inputs zeroed (for
A and B groups that is exactly what the cut computes), so errors do not accumulate. Memory: one layer's
``H`` matrices at a time (the forward stops once that layer's consumers have seen their input). The
non-sequential mode collects every consumer's ``H`` in one calibration pass.

Criterion ``"obs"`` (needs calibration data) scores each ``in`` member with the structured Optimal
Brain Surgeon cost of removing a unit from that consumer given ``H``: for the unit's columns ``S``,
``cost = tr(W_S [(H + λI)⁻¹]_SS⁻¹ W_Sᵀ)`` (a head's columns together), greedily: the cheapest batch of
units (``obs_batch``, default 1/16 of the group) is removed, the remaining weights and the inverse are
updated as OBS prescribes, and the costs are recomputed (SlimGPT). A unit's score is its cost when it
was removed, made increasing in removal order, so the ``n`` lowest scores are the greedy's first ``n``.
This is the same objective ``method="lsq"`` minimises.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import calibration, importance
from .cut import PruneReport, validate_plan, zero_mask
from .errors import DepGraphError, PruneError
from .groups import Group, Member
from .transaction import Transaction, output_tensor

__all__ = ["DEFAULT_DAMP", "METHODS", "Consumer", "ConsumerFit", "Hessian", "ReconstructionReport", "collect_hessians",
           "consumers", "fit", "obs_scores", "obs_select", "outlier_ratios", "plan_errors", "reconstruct"]

METHODS = ("lsq", "bias")
DEFAULT_DAMP = 0.01
_LAYER = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


@dataclass
class Consumer:
    """A layer that reads units a plan removes: ``removed`` input indices of ``module``'s weight."""

    name: str
    module: nn.Module
    removed: np.ndarray
    layer: int | None

    @property
    def in_dim(self) -> int:
        return importance.input_dim(self.module)

    @property
    def width(self) -> int:
        return int(self.module.weight.shape[self.in_dim])


@dataclass
class Hessian:
    """Calibration statistics of one layer's input: ``H = sum x xᵀ``, ``s = sum x``, token count."""

    H: torch.Tensor
    s: torch.Tensor
    tokens: int = 0


@dataclass
class ConsumerFit:
    """One consumer's reconstruction: calibration output error (``sum_t ||Δy_t||²``) of the plain cut
    and of the refitted layer, relative to ``sum_t ||y_t||²``; ``applied`` False when nothing was
    changed (no bias for ``method="bias"``, or the refit was no better)."""

    name: str
    removed: int
    error_cut: float
    error_fit: float
    applied: bool


@dataclass
class ReconstructionReport:
    """Attached to the cut's :class:`PruneReport` as ``report.reconstruction``."""

    method: str
    damp: float
    sequential: bool
    fits: list[ConsumerFit] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # consumers that could not be refitted, with why

    def __str__(self) -> str:
        done = [f for f in self.fits if f.applied]
        cut = sum(f.error_cut for f in self.fits) / max(len(self.fits), 1)
        fit = sum(f.error_fit for f in self.fits) / max(len(self.fits), 1)
        return (f"reconstruction ({self.method}, damp {self.damp:g}{', sequential' if self.sequential else ''}): "
                f"{len(done)}/{len(self.fits)} layers refitted, mean relative calibration error "
                f"{cut:.3g} -> {fit:.3g}" + (f"; skipped {len(self.skipped)}" if self.skipped else ""))


def _layer_of(name: str) -> int | None:
    hit = _LAYER.search(name)
    return int(hit.group(1)) if hit else None


def _module_of(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else ""


def consumers(graph, plan: Mapping[Group, Iterable[int]], skipped: list[str] | None = None) -> list[Consumer]:
    """The ``nn.Linear``/``Conv1D`` layers whose input columns ``plan`` removes (its groups' ``in``
    members), with the union of the removed columns per layer, in model order.

    A weight shared with another module (tied embeddings) is left out (and named in ``skipped``):
    refitting it would change the other module too.
    """
    model = graph.model
    modules = dict(model.named_modules())
    owners: dict[int, int] = defaultdict(int)
    for _, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners[id(p)] += 1
    removed: dict[str, set[int]] = defaultdict(set)
    for group, units in validate_plan(graph, plan).items():
        for m in group.members:
            if m.role != "in" or m.is_buffer:
                continue
            name = _module_of(m.param)
            module = modules.get(name)
            if (not isinstance(module, importance.MATMUL_LAYERS) or m.param != (f"{name}.weight" if name else "weight")
                    or m.dim != importance.input_dim(module)):
                if skipped is not None:
                    skipped.append(f"{m.param}: not the input columns of a Linear/Conv1D weight")
                continue
            if owners[id(module.weight)] > 1:
                if skipped is not None:
                    skipped.append(f"{m.param}: weight shared with another module (tied)")
                continue
            removed[name].update(m.indices(units).tolist())
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return [Consumer(n, modules[n], np.array(sorted(r), dtype=np.int64), _layer_of(n))
            for n, r in sorted(removed.items(), key=lambda kv: order[kv[0]]) if r]


class _Stop(Exception):
    """Raised by a hook to end a calibration forward once every wanted layer has seen its input."""


def collect_hessians(model: nn.Module, names: Iterable[str], batches: list, progress: bool = False,
                     stop_early: bool = False, diagonal: bool = False) -> dict[str, Hessian]:
    """``H = sum x xᵀ`` (float64) of the input of each named ``nn.Linear``/``Conv1D`` over ``batches``.

    ``diagonal=True`` keeps only ``diag(H) = sum x²`` (a vector, in ``Hessian.H``): what input norms need
    (Wanda, OWL's outlier ratios), at the memory of one row instead of the ``[n, n]`` matrix.

    ``stop_early``: end each forward as soon as every named layer has run once (the rest of the model
    is not needed); only right for layers that run once per forward. A batch given as a dict with an
    ``attention_mask`` ``[B, L]`` contributes only its unmasked positions (padding is not data).
    """
    modules = dict(model.named_modules())
    names = list(names)
    stats: dict[str, Hessian] = {}
    seen: set[str] = set()
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name: str):
        def fn(_module, args, kwargs) -> None:
            x = (args[0] if args else next(iter(kwargs.values()))).detach()
            mask = current["mask"]
            if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.to(x.device)]
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            st = stats.get(name)
            if st is None:
                n = x.shape[-1]
                st = stats[name] = Hessian(x.new_zeros(n) if diagonal else x.new_zeros(n, n), x.new_zeros(n))
            if diagonal:
                st.H.add_(x.square().sum(0))
            else:
                st.H.addmm_(x.T, x)
            st.s.add_(x.sum(0))
            st.tokens += x.shape[0]
            seen.add(name)
            if stop_early and len(seen) == len(names):
                raise _Stop

        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n), with_kwargs=True) for n in names]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="calibration", disable=not progress, leave=False):
                seen.clear()
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                current["mask"] = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
                try:
                    calibration.forward(model, batch, device)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats


def _as_rows(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` in float64 (``Conv1D`` stores ``[in, out]``)."""
    w = module.weight.detach().to(torch.float64)
    return w.T if importance.input_dim(module) == 0 else w


def _error(W: torch.Tensor, V: torch.Tensor, H: torch.Tensor, keep: torch.Tensor) -> float:
    """``sum_t ||W x_t - V x_t[keep]||²`` from ``H`` alone."""
    Hkk = H[keep][:, keep]
    total = (W @ H * W).sum() - 2 * (V @ H[keep] * W).sum() + (V @ Hkk * V).sum()
    return max(float(total), 0.0)


def fit(W: torch.Tensor, b: torch.Tensor | None, stats: Hessian, removed: np.ndarray, method: str = "lsq",
        damp: float = DEFAULT_DAMP) -> tuple[torch.Tensor, torch.Tensor | None, float, float]:
    """Refit one consumer: ``W`` ``[out, in]`` and bias ``b`` (or None), float64.

    Returns ``(W_new, b_new, error_cut, error_fit)``: ``W_new`` has the removed columns zeroed and the
    kept ones refitted, the errors are relative calibration output errors of the plain cut and of the
    fit. The fit is never worse than the plain cut on the calibration data (see the module docstring).
    """
    n = W.shape[1]
    keep_mask = np.ones(n, dtype=bool)
    keep_mask[removed] = False
    H, s, t = stats.H, stats.s, float(stats.tokens)
    if b is not None:  # the constant input 1 is column n
        H = torch.cat([torch.cat([H, s[:, None]], 1), torch.cat([s, s.new_tensor([t])])[None]], 0)
        W = torch.cat([W, b.to(W)[:, None]], 1)
        keep_mask = np.append(keep_mask, True)
    keep = torch.as_tensor(np.flatnonzero(keep_mask))
    gone = torch.as_tensor(np.flatnonzero(~keep_mask))
    scale = max(float((W @ H * W).sum()), 1e-30)
    plain = W[:, keep]
    error_cut = _error(W, plain, H, keep)
    if method == "bias":
        V = plain.clone()
        if b is not None and t > 0:
            V[:, -1] += W[:, gone] @ (s[gone] / t)
    else:
        Hkk = H[keep][:, keep]
        diag = float(Hkk.diagonal().mean())
        lam = damp * diag if diag > 0 else 1.0
        A = Hkk + lam * torch.eye(len(keep), dtype=H.dtype, device=H.device)
        R = W @ H[:, keep] + lam * plain
        L, info = torch.linalg.cholesky_ex(A)
        V = torch.cholesky_solve(R.T, L).T if int(info) == 0 else torch.linalg.lstsq(A, R.T).solution.T
    error_fit = _error(W, V, H, keep)
    if not math.isfinite(error_fit) or error_fit > error_cut:
        V, error_fit = plain, error_cut  # rounding made it no better: keep the plain cut
    out = torch.zeros_like(W)
    out[:, keep] = V
    if b is not None:
        return out[:, :-1], out[:, -1], error_cut / scale, error_fit / scale
    return out, None, error_cut / scale, error_fit / scale


def _check_calib(model: nn.Module, calib) -> list:
    """Calibration batches, checked before anything is changed."""
    if calib is None:
        raise PruneError("reconstruction needs calibration data: pass calib= token ids ([N, L] LongTensor or a "
                         "list of batches), e.g. depgraph.data.calibration_batches(tokenizer=tok); the model is "
                         "unchanged")
    try:  # the one calibration owner validates dtype, rank and the vocabulary range
        batches = calibration.batches(calib, calibration.vocab_size(model))
    except (DepGraphError, ValueError) as exc:
        raise PruneError(f"bad calibration data ({exc}); the model is unchanged") from exc
    if not batches:
        raise PruneError("calibration data is empty; pass at least one batch; the model is unchanged")
    return batches


def reconstruct(graph, plan: Mapping[Group, Iterable[int]], calib, method: str = "lsq", *,
                damp: float = DEFAULT_DAMP, sequential: bool = False, verify: bool = True, progress: bool = False,
                select: Callable[[list[Group], dict[str, Hessian]], Mapping[Group, Iterable[int]]] | None = None,
                ) -> PruneReport:
    """Cut ``plan`` ({group: unit ids}) and refit every layer reading the cut units on ``calib``.

    ``method``: ``"lsq"`` (ridge least squares of the kept columns, and the bias where the layer has one)
    or ``"bias"`` (FLAP's bias compensation); ``damp``: the ridge ``λ`` relative to the mean diagonal
    of ``H``; ``sequential``: decoder layer by decoder layer (see the module docstring). ``select``
    (sequential mode): ``fn(groups, hessians) -> {group: unit ids}`` re-chooses the units of the groups
    whose consumers are all in the current layer, from that layer's statistics (same unit counts as
    ``plan``); the returned plan is what is cut. Returns the cut's :class:`PruneReport` with
    ``report.reconstruction`` (:class:`ReconstructionReport`) and ``report.plan`` (the plan cut).
    Raises :class:`PruneError` with the model unchanged on bad input or any failure.
    """
    if method not in METHODS:
        raise PruneError(f"reconstruct method must be one of {METHODS}, got {method!r}")
    if not (isinstance(damp, (int, float)) and damp > 0 and math.isfinite(damp)):
        raise PruneError(f"damp must be a positive number (the ridge term relative to mean(diag H)), got {damp!r}")
    model = graph.model
    batches = _check_calib(model, calib)
    plan = {g: sorted(int(u) for u in units) for g, units in validate_plan(graph, plan).items()}
    report = ReconstructionReport(method, float(damp), bool(sequential))
    layers = consumers(graph, plan, report.skipped)
    if sequential:
        stages: dict[int | None, list[Consumer]] = defaultdict(list)
        for c in layers:
            stages[c.layer].append(c)
        order = sorted(stages, key=lambda k: (k is None, k if k is not None else 0))
        plan_stages = [stages[k] for k in order]
    else:
        plan_stages = [layers] if layers else []
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, original data) to restore on failure

    def put(param: torch.Tensor, value: torch.Tensor) -> None:
        saved.append((param, param.data))
        param.data = value.to(dtype=param.dtype, device=param.device).contiguous()

    try:
        for stage in tqdm(plan_stages, desc="reconstruct", disable=not progress or len(plan_stages) < 2, leave=False):
            stats = collect_hessians(model, [c.name for c in stage], batches, stop_early=sequential)
            if select is not None and sequential:
                stage, plan = _reselect(graph, plan, stage, stats, select, report.skipped)
            for c in stage:
                st = stats.get(c.name)
                W = _as_rows(c.module)
                if st is None or st.tokens == 0:
                    report.skipped.append(f"{c.name}: never ran on the calibration data")
                    W2, b2, applied = W.clone(), None, False
                    W2[:, torch.as_tensor(c.removed)] = 0
                else:
                    bias = getattr(c.module, "bias", None)
                    b = bias.detach().to(torch.float64) if isinstance(bias, torch.Tensor) else None
                    W2, b2, e_cut, e_fit = fit(W, b, st, c.removed, method, damp)
                    applied = e_fit < e_cut
                    report.fits.append(ConsumerFit(c.name, int(c.removed.size), e_cut, e_fit, applied))
                if applied or sequential:  # sequential: later layers must see this layer's inputs cut
                    put(c.module.weight, W2.T if c.in_dim == 0 else W2)
                    if applied and b2 is not None:
                        put(c.module.bias, b2)
        out = graph.prune(plan, verify=verify)
    except BaseException as exc:
        for param, data in reversed(saved):
            param.data = data
        if isinstance(exc, (PruneError, KeyboardInterrupt)) or not isinstance(exc, Exception):
            raise
        raise PruneError(f"reconstruction failed ({type(exc).__name__}: {str(exc)[:300]}); the model is "
                         "unchanged") from exc
    out.reconstruction = report
    out.plan = plan
    return out


def outlier_ratios(model: nn.Module, calib, threshold: float = 5.0, progress: bool = False) -> dict[int, float]:
    """OWL's layer-wise outlier ratio: per decoder layer, the fraction of weights whose Wanda score
    ``|W_ij| · ||x_j||`` (input norm over ``calib``) exceeds ``threshold`` times the mean score of its
    layer (``nn.Linear``/``Conv1D`` modules under ``...layers.<i>.``, pooled). Layers with more outliers
    matter more (Yin et al., 2024); ``Pruner(allocation="outlier")`` cuts them less. One calibration pass,
    input norms only (no ``[n, n]`` matrix)."""
    batches = _check_calib(model, calib)
    names = [n for n, m in model.named_modules() if isinstance(m, importance.MATMUL_LAYERS) and _layer_of(n) is not None]
    if not names:
        raise PruneError(f"outlier_ratios: {type(model).__name__} has no Linear/Conv1D layer inside numbered "
                         "decoder layers; the model is unchanged")
    stats = collect_hessians(model, names, batches, progress=progress, diagonal=True)
    modules = dict(model.named_modules())
    scores: dict[int, list[torch.Tensor]] = defaultdict(list)
    for name in names:
        st = stats.get(name)
        if st is None or st.tokens == 0:
            continue
        W = _as_rows(modules[name])
        scores[_layer_of(name)].append((W.abs() * st.H.sqrt()[None]).reshape(-1))
    out = {}
    for layer, parts in sorted(scores.items()):
        flat = torch.cat(parts)
        out[layer] = float((flat > threshold * flat.mean()).double().mean())
    return out


def plan_errors(graph, plans: list[Mapping[Group, Iterable[int]]], calib, method: str | None = None, *,
                damp: float = DEFAULT_DAMP, progress: bool = False) -> list[float]:
    """The model's output error on ``calib`` if each plan alone were cut, without cutting anything.

    Each plan is applied as the cut computes it (:func:`depgraph.cut.zero_mask`: the removed units' consumer
    slices zeroed, C channels zeroed everywhere), after refitting its consumers with ``method`` (``"lsq"``,
    ``"bias"``; None: the plain cut), and the main output on every calibration batch is compared with the
    unchanged model's: for ``.logits`` (LMs, classifiers) the mean KL divergence ``KL(p || p')`` of the
    predicted distributions per position; otherwise (a last hidden state, a first tensor) the relative
    squared error ``sum ||y' - y||² / sum ||y||²``. The
    consumers' ``H`` come from one calibration pass on the unchanged model (every consumer of every plan at
    once, as the non-sequential :func:`reconstruct`); the unchanged model's outputs on every calibration
    token are kept (float32 log-probabilities for LMs: tokens x vocabulary). Every plan is undone before the
    next one (a :class:`~depgraph.transaction.Transaction` rolled back, also on failure), so the model is
    unchanged.
    This is what ``Pruner(allocation="sensitivity")`` ranks layers by.
    """
    if method is not None and method not in METHODS:
        raise PruneError(f"plan_errors: method must be None or one of {METHODS}, got {method!r}")
    model = graph.model
    batches = _check_calib(model, calib)
    plans = [{g: sorted(int(u) for u in units) for g, units in validate_plan(graph, p).items()} for p in plans]
    with torch.no_grad(), calibration.eval_mode(model):
        outputs = [calibration.forward(model, b) for b in batches]
    reference = [output_tensor(o) for o in outputs]
    kl = all(isinstance(getattr(o, "logits", None), torch.Tensor) for o in outputs)
    del outputs
    if any(r is None for r in reference):
        raise PruneError(f"plan_errors: {type(model).__name__}'s forward returns no tensor (logits, last hidden "
                         "state or a first tensor) to compare; the model is unchanged")
    if kl:  # a distribution per position: compare what the model predicts, not the raw logits (kept in
        # float32: the reference of every calibration token is held, [tokens, vocab])
        reference = [torch.log_softmax(r.double(), -1).float() for r in reference]
    positions = sum(r[..., 0].numel() for r in reference)
    scale = float(positions) if kl else max(sum(float(r.double().pow(2).sum()) for r in reference), 1e-30)
    stats: dict[str, Hessian] = {}
    if method is not None:
        names = list(dict.fromkeys(c.name for p in plans for c in consumers(graph, p)))
        stats = collect_hessians(model, names, batches)
    # every name, tied ones included: a member may name the tied copy (lm_head.weight for the embedding)
    tensors = dict(itertools.chain(model.named_parameters(remove_duplicate=False),
                                   model.named_buffers(remove_duplicate=False)))
    errors = []
    for plan in tqdm(plans, desc="plan errors", disable=not progress, leave=False):
        with Transaction() as t:
            replaced: set[int] = set()  # tensors whose data is already a copy of this plan's own
            try:
                for c in consumers(graph, plan) if method is not None else []:
                    st = stats.get(c.name)
                    if st is None or st.tokens == 0:
                        continue
                    bias = getattr(c.module, "bias", None)
                    b = bias.detach().to(torch.float64) if isinstance(bias, torch.Tensor) else None
                    W2, b2, _, _ = fit(_as_rows(c.module), b, st, c.removed, method, damp)
                    t.set_data(c.module.weight, (W2.T if c.in_dim == 0 else W2).to(c.module.weight).contiguous())
                    replaced.add(id(c.module.weight))
                    if b2 is not None:
                        t.set_data(c.module.bias, b2.to(c.module.bias))
                for g in plan:  # zero_mask writes in place: give it copies (of every member, a superset of what
                    for m in g.members:  # it zeroes), the rollback restores the originals
                        tensor = tensors.get(m.param)
                        if tensor is None:
                            raise PruneError(f"plan_errors: {m.param} is not a tensor of the model (stale graph); "
                                             "re-trace it; the model is unchanged")
                        if id(tensor) not in replaced:
                            t.set_data(tensor, tensor.data.clone())
                            replaced.add(id(tensor))
                zero_mask(graph, plan)
                total = 0.0
                with torch.no_grad(), calibration.eval_mode(model):
                    for b, ref in zip(batches, reference):
                        out = output_tensor(calibration.forward(model, b)).double()
                        if kl:  # KL(reference || pruned), summed over positions
                            ref = ref.double()
                            total += float((ref.exp() * (ref - torch.log_softmax(out, -1))).sum())
                        else:
                            total += float((out - ref).pow(2).sum())
                errors.append(total / scale)
            finally:
                t.rollback()
    return errors


def _reselect(graph, plan: dict[Group, list[int]], stage: list[Consumer], stats: dict[str, Hessian],
              select: Callable, skipped: list[str]) -> tuple[list[Consumer], dict[Group, list[int]]]:
    """Let ``select`` re-choose the units of the plan's groups whose consumers all sit in this stage."""
    names = {c.name for c in stage}
    local = [g for g in plan if g.members and all(
        _module_of(m.param) in names for m in g.members if m.role == "in" and not m.is_buffer)
        and any(m.role == "in" for m in g.members)]
    if not local:
        return stage, plan
    chosen = select(local, stats)
    new_plan = dict(plan)
    for g in local:
        units = sorted(int(u) for u in chosen.get(g, plan[g]))
        if len(units) != len(plan[g]):
            raise PruneError(f"select changed the number of units of {g.name} ({len(plan[g])} -> {len(units)})")
        new_plan[g] = units
    sub = {g: new_plan[g] for g in plan if g in local or any(
        _module_of(m.param) in names for m in g.members if m.role == "in")}
    fresh = {c.name: c for c in consumers(graph, sub)}
    return [fresh.get(c.name, c) for c in stage], new_plan


# ---- OBS criterion --------------------------------------------------------------------------------


def obs_scores(W: torch.Tensor, H: torch.Tensor, unit_of_index: np.ndarray, size: int, damp: float = DEFAULT_DAMP,
               batch: float = 1 / 16) -> torch.Tensor:
    """Greedy structured-OBS removal scores of ``size`` units whose input columns of ``W`` ``[out, in]``
    are given by ``unit_of_index`` (``-1``: not a unit of this group), float64 ``H`` ``[in, in]``.

    Each round removes the ``ceil(batch · size)`` cheapest units and updates ``W`` and ``(H + λI)⁻¹``.
    Returns float32 scores, increasing in removal order (a unit with no columns scores 0).
    """
    W = W.to(torch.float64).clone()
    H = H.to(torch.float64)
    diag = float(H.diagonal().mean())
    lam = damp * diag if diag > 0 else 1.0
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H + lam * torch.eye(H.shape[0], dtype=H.dtype,
                                                                             device=H.device)))
    cols = [np.flatnonzero(unit_of_index == u) for u in range(size)]
    alive = [u for u in range(size) if cols[u].size]
    scores = torch.zeros(size, dtype=torch.float32)
    step = max(1, math.ceil(batch * size))
    last = torch.tensor(-math.inf, dtype=torch.float32)
    while alive:
        cost = torch.empty(len(alive), dtype=torch.float64)
        by_width: dict[int, list[int]] = defaultdict(list)
        for i, u in enumerate(alive):
            by_width[cols[u].size].append(i)
        for _, rows in by_width.items():
            idx = torch.as_tensor(np.stack([cols[alive[i]] for i in rows]))  # [u, d]
            Hs = Hinv[idx[:, :, None], idx[:, None, :]]  # [u, d, d]
            Ws = W[:, idx].permute(1, 2, 0)  # [u, d, out]
            sol = torch.linalg.solve(Hs, Ws)
            cost[rows] = (sol * Ws).sum((1, 2))
        pick = torch.argsort(cost, stable=True)[:step].tolist()
        S = torch.as_tensor(np.concatenate([cols[alive[i]] for i in pick]))
        M = torch.linalg.solve(Hinv[S][:, S], Hinv[S])  # [|S|, in]
        W -= W[:, S] @ M
        Hinv -= Hinv[:, S] @ M
        W[:, S] = 0
        Hinv[S] = 0
        Hinv[:, S] = 0
        Hinv[S, S] = 1.0  # removed columns: a harmless identity block, never read again
        for i in pick:
            value = torch.tensor(float(cost[i]), dtype=torch.float32)
            last = torch.maximum(value, torch.nextafter(last, torch.tensor(math.inf)))
            scores[alive[i]] = last
        gone = set(pick)
        alive = [u for j, u in enumerate(alive) if j not in gone]
    return scores


def _obs_collect(ctx: importance.ScoreContext) -> dict[str, Hessian]:
    names = set()
    for g in ctx.groups:
        for m in g.members:
            module = ctx.modules.get(_module_of(m.param))
            if m.role == "in" and isinstance(module, importance.MATMUL_LAYERS) and m.dim == importance.input_dim(
                    module) and m.param.endswith("weight"):
                names.add(_module_of(m.param))
    order = [n for n, _ in ctx.model.named_modules() if n in names]
    return collect_hessians(ctx.model, order, ctx.calib, progress=ctx.progress)


@importance.criterion("obs", collect=_obs_collect, needs_calib=True, options=("damp", "obs_batch"))
def _obs(ctx: importance.ScoreContext, group: Group, member: Member) -> torch.Tensor | None:
    stats: dict[str, Hessian] = ctx.stats["obs"]
    name = _module_of(member.param)
    module = ctx.modules.get(name)
    if member.role != "in" or name not in stats or not isinstance(module, importance.MATMUL_LAYERS):
        return None
    return obs_scores(_as_rows(module), stats[name].H, member.unit_of_index, group.size,
                      float(ctx.options.get("damp", DEFAULT_DAMP)), float(ctx.options.get("obs_batch", 1 / 16)))


def obs_select(graph, counts: Mapping[Group, int], damp: float = DEFAULT_DAMP, batch: float = 1 / 16,
               aggregate: str = "sum") -> Callable[[list[Group], dict[str, Hessian]], dict[Group, list[int]]]:
    """A ``select`` for :func:`reconstruct`: each group's ``counts[group]`` lowest OBS-cost units, from the
    statistics of the current (already reconstructed) layer."""
    modules = dict(graph.model.named_modules())

    def choose(groups: list[Group], stats: dict[str, Hessian]) -> dict[Group, list[int]]:
        out = {}
        for g in groups:
            per_member = {}
            for m in g.members:
                name = _module_of(m.param)
                if m.role == "in" and name in stats and not m.is_buffer:
                    per_member[m] = obs_scores(_as_rows(modules[name]), stats[name].H, m.unit_of_index, g.size,
                                               damp, batch)
            if per_member:
                s = importance.combine(per_member, aggregate)
                out[g] = sorted(int(u) for u in importance.ranking(s)[: counts[g]])
        return out

    return choose
