"""Unstructured and N:M semi-structured sparsity: magnitude and Wanda masks, reports, sensitivity sweeps.

Masks zero individual weights of ``nn.Linear`` (and transformers' ``Conv1D``) layers; shapes never change.
They are attached with :mod:`torch.nn.utils.prune` (``weight_orig`` * ``weight_mask``), so they can be
inspected, stacked and made permanent the usual way.

Scores, always compared in the ``[out, in]`` view of a weight (``Conv1D`` stores ``[in, out]``):

* ``magnitude``: ``|W_ij|``; the lowest ``round(sparsity * numel)`` of each layer (``scope="layer"``) or of
  all selected layers together (``scope="global"``, one threshold) are zeroed.
* ``wanda`` (Sun et al. 2023): ``|W_ij| * ||X_j||_2``, where ``||X_j||_2`` is the L2 norm of input feature
  ``j`` over every calibration token (one forward pass, no weight update). Scores are compared within each
  output row: every row loses its ``round(sparsity * in_features)`` lowest-scoring weights.
* ``"N:M"`` patterns: in every group of ``M`` consecutive input weights of each output row the ``N``
  lowest-scoring weights are zeroed (with either score), so the sparsity is exactly ``N / M``.

Ties are broken by position (stable sort), so every result is deterministic.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune
from tqdm.auto import tqdm

from . import calibration
from .errors import CalibrationError

try:  # transformers is a dependency, but keep the module importable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None  # type: ignore[assignment,misc]

__all__ = [
    "LayerSparsity",
    "MaskPruning",
    "SensitivityResult",
    "SparsityReport",
    "StorageReport",
    "StorageRow",
    "check_n_m",
    "is_masked",
    "make_permanent",
    "sensitivity",
    "sparsify",
    "storage_report",
]

_PRUNABLE: tuple[type[nn.Module], ...] = (nn.Linear,) if Conv1D is None else (nn.Linear, Conv1D)
_METHODS = ("magnitude", "wanda")
_SCOPES = ("layer", "global")
_PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")

Calib = torch.Tensor | Sequence[torch.Tensor]


# --------------------------------------------------------------------------------------------------
# torch.nn.utils.prune integration


class MaskPruning(prune.BasePruningMethod):
    """Attach a precomputed 0/1 mask through ``torch.nn.utils.prune``.

    ``PRUNING_TYPE = "global"`` makes a ``PruningContainer`` hand us the whole tensor when a module is
    masked a second time, so the new mask is combined elementwise with the old one (zeros stay zero).
    """

    PRUNING_TYPE = "global"

    def __init__(self, mask: torch.Tensor | None) -> None:
        self.mask = mask

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            raise RuntimeError("MaskPruning has no mask to compute; it is only used by MaskPruning.apply")
        if self.mask.shape != default_mask.shape:
            raise ValueError(
                f"mask shape {tuple(self.mask.shape)} != weight shape {tuple(default_mask.shape)}"
            )
        return default_mask * self.mask.to(device=default_mask.device, dtype=default_mask.dtype)

    @classmethod
    def apply(cls, module: nn.Module, name: str, mask: torch.Tensor) -> MaskPruning:  # type: ignore[override]
        """Mask ``module.<name>`` with ``mask`` (same shape, 1 = keep)."""
        # no_grad: the cached ``module.<name>`` is then a leaf, so ``copy.deepcopy`` of a freshly masked
        # model works (the forward hook recomputes it with autograd whenever grad is enabled).
        with torch.no_grad():
            method = super().apply(module, name, mask=mask)
        # The hook lives as long as the mask; drop our copy (the module keeps ``<name>_mask``).
        last = method._pruning_methods[-1] if isinstance(method, prune.PruningContainer) else method
        last.mask = None
        return method


def is_masked(module: nn.Module) -> bool:
    """True when ``module.weight`` carries a mask attached by this module (:class:`MaskPruning`)."""
    for hook in module._forward_pre_hooks.values():
        if getattr(hook, "_tensor_name", None) != "weight":
            continue
        if isinstance(hook, MaskPruning):
            return True
        if isinstance(hook, prune.PruningContainer) and any(
            isinstance(m, MaskPruning) for m in hook._pruning_methods
        ):
            return True
    return False


def make_permanent(model: nn.Module) -> list[str]:
    """``prune.remove`` every mask this module attached: zeros move into ``weight``; returns the names.

    A masked weight that is shared with another module (an ``lm_head`` tied to the input embedding) is
    untied first: the masked model that was evaluated used the mask on this module only, so writing the
    zeros into the shared tensor would zero the embedding too and change the logits. The model's config
    then records ``tie_word_embeddings=False`` so that saving and reloading keeps the two apart.
    """
    names = [name for name, module in model.named_modules() if is_masked(module)]
    modules = dict(model.named_modules())
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    untied = []
    for name in names:
        module = modules[name]
        orig = module.weight_orig
        if uses.get(id(orig), 0) > 1:
            module.weight_orig = nn.Parameter(orig.detach().clone(), requires_grad=orig.requires_grad)
            untied.append(module)
        prune.remove(module, "weight")
    get_output = getattr(model, "get_output_embeddings", None)
    if untied and callable(get_output) and get_output() in untied:
        _untie_config(model)
    return names


def _untie_config(model: nn.Module) -> None:
    """Record in every config of ``model`` (and its text config) that the output embedding is its own."""
    config = getattr(model, "config", None)
    configs = [config] if config is not None else []
    if config is not None and hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    for c in configs:
        if getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False


# --------------------------------------------------------------------------------------------------
# layer selection and argument checking


def _in_out_view(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The ``[out, in]`` view of a weight: ``Conv1D`` stores ``[in, out]``."""
    return weight.t() if Conv1D is not None and isinstance(module, Conv1D) else weight


def _effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight the next forward will use (``weight_orig * weight_mask`` when already masked)."""
    if hasattr(module, "weight_orig") and hasattr(module, "weight_mask"):
        return (module.weight_orig * module.weight_mask).detach()
    return module.weight.detach()


def _matches(name: str, entry: str) -> bool:
    """``entry`` names the module itself or one of its ancestors (``model.layers.0`` covers its linears)."""
    return name == entry or name.startswith(entry + ".")


def _skipped(name: str, skip: Iterable[str]) -> bool:
    """``skip`` entries are dotted sub-paths: ``lm_head`` or ``mlp.down_proj`` anywhere in the name."""
    dotted = f".{name}."
    return any(f".{s}." in dotted for s in skip)


def _candidates(model: nn.Module, skip: Iterable[str]) -> dict[str, nn.Module]:
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    return {
        name: module
        for name, module in model.named_modules()
        if name and isinstance(module, _PRUNABLE) and not _skipped(name, skip)
    }


def _select(
    model: nn.Module, layers: str | Iterable[str] | None, skip: Iterable[str]
) -> dict[str, nn.Module]:
    """Prunable modules (model order) named by ``layers`` (names or ancestor prefixes), minus ``skip``."""
    candidates = _candidates(model, skip)
    if layers is None:
        return candidates
    entries = [layers] if isinstance(layers, str) else list(layers)
    wanted: set[str] = set()
    for entry in entries:
        hits = [name for name in candidates if _matches(name, entry)]
        if not hits:
            raise ValueError(
                f"layers entry {entry!r} matches no nn.Linear/Conv1D module (after skip={tuple(skip)!r}); "
                f"examples of valid names: {list(candidates)[:4]}"
            )
        wanted.update(hits)
    return {name: module for name, module in candidates.items() if name in wanted}


def _parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None, ``"N:M"`` -> (N, M) with 1 <= N < M."""
    if not isinstance(pattern, str):
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' (e.g. '2:4'), got {pattern!r}")
    if pattern.strip().lower() == "unstructured":
        return None
    found = _PATTERN_RE.match(pattern)
    if found is None:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' (e.g. '2:4', '4:8'), got {pattern!r}")
    n, m = int(found.group(1)), int(found.group(2))
    if not 1 <= n < m:
        raise ValueError(f"pattern {pattern!r}: need 1 <= N < M (N zeros in every group of M weights)")
    return n, m


def _check_fraction(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")
    return float(value)


def _resolve_sparsity(
    sparsity: float | Mapping[str, float] | None,
    nm: tuple[int, int] | None,
    targets: Mapping[str, nn.Module],
) -> dict[str, float]:
    """Per-layer sparsity: a float for all, or a dict whose keys are names/prefixes (longest wins)."""
    implied = None if nm is None else nm[0] / nm[1]
    if sparsity is None:
        return dict.fromkeys(targets, 0.5 if implied is None else implied)
    if isinstance(sparsity, Mapping):
        if not sparsity:
            raise ValueError("sparsity dict is empty")
        values = {key: _check_fraction(v, f"sparsity[{key!r}]") for key, v in sparsity.items()}
        for key in values:
            if not any(_matches(name, key) for name in targets):
                raise ValueError(f"sparsity key {key!r} matches no selected nn.Linear/Conv1D module")
        plan = {}
        for name in targets:
            keys = [key for key in values if _matches(name, key)]
            if keys:
                plan[name] = values[max(keys, key=len)]
    else:
        plan = dict.fromkeys(targets, _check_fraction(sparsity, "sparsity"))
    if implied is not None:
        bad = {name: s for name, s in plan.items() if not math.isclose(s, implied, abs_tol=1e-9)}
        if bad:
            raise ValueError(
                f"pattern {nm[0]}:{nm[1]} implies sparsity {implied:g}, but sparsity={sparsity!r} was "
                "passed; leave sparsity=None for N:M patterns"
            )
    return plan


# --------------------------------------------------------------------------------------------------
# calibration (Wanda input norms)


def _input_norms(
    model: nn.Module, modules: Mapping[str, nn.Module], calib: Calib | None, progress: bool
) -> dict[str, torch.Tensor]:
    """``||X_j||_2`` per input feature of every module, over all calibration tokens (one pass)."""
    if calib is None:
        raise CalibrationError("method='wanda' needs calib: a LongTensor [batch, seq] of token ids or a list of such "
                            "tensors, e.g. depgraph.data.calibration_batches(text, tokenizer=tok)")
    batches = calibration.batches(calib, calibration.vocab_size(model), ids_only=True)
    sums: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Callable:
        def hook(_module, args, kwargs, _output) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            # float64 sums: deterministic enough and no overflow for long calibration sets.
            sq = x.detach().reshape(-1, x.shape[-1]).double().pow(2).sum(0)
            sums[name] = sq if name not in sums else sums[name] + sq

        return hook

    handles = [m.register_forward_hook(hook_for(n), with_kwargs=True) for n, m in modules.items()]
    try:
        with torch.no_grad(), calibration.eval_mode(model):
            for batch in tqdm(batches, desc="wanda calibration", disable=not progress):
                calibration.forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in modules if name not in sums]
    if missing:
        raise ValueError(f"these layers saw no input during the calib forward pass: {missing[:5]}")
    return {name: s.sqrt().float() for name, s in sums.items()}


# --------------------------------------------------------------------------------------------------
# masks


def _scores(
    module: nn.Module, weight: torch.Tensor, norms: Mapping[str, torch.Tensor] | None, name: str
) -> torch.Tensor:
    """Importance in the ``[out, in]`` view (float32)."""
    score = _in_out_view(module, weight).abs().float()
    if norms is not None:
        score = score * norms[name].to(score.device)[None, :]
    return score


def _lowest_k(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` lowest entries of a 1-D tensor; ties go to the earliest positions."""
    drop = torch.zeros_like(flat, dtype=torch.bool)
    if k <= 0:
        return drop
    # kthvalue + tie fill instead of a full argsort: no int64 index array the size of the weights.
    threshold = torch.kthvalue(flat, k).values
    drop |= flat < threshold
    need = k - int(drop.sum())
    if need > 0:
        ties = torch.nonzero(flat == threshold).flatten()[:need]
        drop[ties] = True
    return drop


def _keep_mask(
    score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, rowwise: bool
) -> torch.Tensor:
    """Boolean keep mask (True = keep) in the ``[out, in]`` view."""
    rows, cols = score.shape
    if nm is not None:
        n, m = nm
        groups = score.reshape(rows, cols // m, m)
        order = torch.argsort(groups, dim=-1, stable=True)[..., :n]
        keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, order, False)
        return keep.reshape(rows, cols)
    if rowwise:
        k = round(sparsity * cols)
        order = torch.argsort(score, dim=1, stable=True)[:, :k]
        return torch.ones_like(score, dtype=torch.bool).scatter_(1, order, False)
    return ~_lowest_k(score.flatten(), round(sparsity * score.numel())).reshape(rows, cols)


def _check_divisible(targets: Mapping[str, nn.Module], nm: tuple[int, int] | None) -> None:
    if nm is None:
        return
    for name, module in targets.items():
        in_features = _in_out_view(module, module.weight).shape[1]
        if in_features % nm[1]:
            raise ValueError(
                f"layer {name!r}: input dimension {in_features} is not divisible by M={nm[1]} "
                f"(pattern {nm[0]}:{nm[1]}); skip it with skip=(..., {name!r})"
            )


# --------------------------------------------------------------------------------------------------
# reports


@dataclass(frozen=True)
class LayerSparsity:
    """One masked layer: ``masked`` = entries the mask zeroes, ``zeros`` = zeros in the masked weight."""

    name: str
    shape: tuple[int, ...]
    numel: int
    masked: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass
class SparsityReport:
    """What :func:`sparsify` did: one row per layer plus the pattern/method used."""

    layers: list[LayerSparsity]
    pattern: str
    method: str
    scope: str

    @property
    def overall_sparsity(self) -> float:
        numel = sum(row.numel for row in self.layers)
        return sum(row.zeros for row in self.layers) / numel if numel else 0.0

    def table(self) -> str:
        """Markdown table: layer, shape, params, zeros, sparsity, and a total row."""
        lines = ["| layer | shape | params | zeros | sparsity |", "|---|---|---:|---:|---:|"]
        for row in self.layers:
            shape = "x".join(map(str, row.shape))
            lines.append(f"| {row.name} | {shape} | {row.numel} | {row.zeros} | {row.sparsity:.4f} |")
        total = sum(row.numel for row in self.layers)
        zeros = sum(row.zeros for row in self.layers)
        lines.append(
            f"| **total** ({self.method}, {self.pattern}) | | {total} | {zeros} "
            f"| {self.overall_sparsity:.4f} |"
        )
        return "\n".join(lines)

    def storage(self, model: nn.Module) -> StorageReport:
        """Dense vs CSR bytes of the layers in this report."""
        return storage_report(model, layers=[row.name for row in self.layers], skip=())


@dataclass(frozen=True)
class StorageRow:
    name: str
    shape: tuple[int, ...]
    nnz: int
    dense_bytes: int
    csr_bytes: int


@dataclass
class StorageReport:
    """Dense bytes vs CSR bytes (crow_indices + col_indices + values) per layer."""

    rows: list[StorageRow]

    @property
    def dense_bytes(self) -> int:
        return sum(row.dense_bytes for row in self.rows)

    @property
    def csr_bytes(self) -> int:
        return sum(row.csr_bytes for row in self.rows)

    def table(self) -> str:
        """Markdown table with a total row; ratio = CSR / dense (below 1 means CSR is smaller)."""
        lines = [
            "| layer | shape | nnz | dense bytes | CSR bytes | CSR/dense |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for row in [
            *self.rows,
            StorageRow("**total**", (), sum(r.nnz for r in self.rows), self.dense_bytes, self.csr_bytes),
        ]:
            shape = "x".join(map(str, row.shape))
            ratio = row.csr_bytes / row.dense_bytes if row.dense_bytes else float("nan")
            lines.append(
                f"| {row.name} | {shape} | {row.nnz} | {row.dense_bytes} | {row.csr_bytes} | {ratio:.3f} |"
            )
        return "\n".join(lines)


def storage_report(
    model: nn.Module, layers: str | Iterable[str] | None = None, skip: Iterable[str] = ("lm_head",)
) -> StorageReport:
    """Bytes of each selected weight stored dense vs as ``to_sparse_csr()`` (masks applied)."""
    rows = []
    for name, module in _select(model, layers, skip).items():
        weight = _in_out_view(module, _effective_weight(module))
        with warnings.catch_warnings():  # "sparse CSR support is in beta" is noise for a byte count
            warnings.simplefilter("ignore", UserWarning)
            csr = weight.to_sparse_csr()
        csr_bytes = sum(
            t.numel() * t.element_size() for t in (csr.crow_indices(), csr.col_indices(), csr.values())
        )
        rows.append(
            StorageRow(
                name=name,
                shape=tuple(module.weight.shape),
                nnz=int(csr.values().numel()),
                dense_bytes=weight.numel() * weight.element_size(),
                csr_bytes=csr_bytes,
            )
        )
    return StorageReport(rows)


def check_n_m(weight: torch.Tensor, n: int, m: int, layout: str = "out_in") -> bool:
    """True when every group of ``m`` consecutive input weights of every output row has >= ``n`` zeros.

    ``layout="out_in"`` for ``nn.Linear`` weights, ``"in_out"`` for transformers' ``Conv1D``.
    """
    if layout not in ("out_in", "in_out"):
        raise ValueError(f"layout must be 'out_in' or 'in_out', got {layout!r}")
    if weight.dim() != 2:
        raise ValueError(f"check_n_m needs a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().t() if layout == "in_out" else weight.detach()
    if w.shape[1] % m:
        raise ValueError(f"input dimension {w.shape[1]} is not divisible by M={m}")
    zeros = (w.reshape(w.shape[0], -1, m) == 0).sum(-1)
    return bool((zeros >= n).all())


# --------------------------------------------------------------------------------------------------
# sparsify


def sparsify(
    model: nn.Module,
    method: str = "magnitude",
    sparsity: float | Mapping[str, float] | None = None,
    pattern: str = "unstructured",
    calib: Calib | None = None,
    scope: str = "layer",
    layers: str | Iterable[str] | None = None,
    skip: Iterable[str] = ("lm_head",),
    progress: bool = True,
) -> SparsityReport:
    """Mask the lowest-scoring weights of every selected ``nn.Linear``/``Conv1D``; returns a report.

    ``sparsity``: a float in [0, 1) for every layer, or a dict name/prefix -> float (longest prefix wins;
    layers matching no key are left alone), e.g. a :meth:`SensitivityResult.propose` result. Defaults to
    0.5, or ``N/M`` for an ``"N:M"`` pattern (an explicit value must then equal ``N/M``).
    ``layers``: module names or ancestor prefixes to restrict to; ``skip``: dotted sub-paths to exclude
    (``lm_head`` by default; pruning a tied head would untie it from the embedding).
    ``scope="global"`` (magnitude, unstructured, float sparsity only) uses one threshold over all layers.
    Masking a layer again combines masks: earlier zeros score 0 so are dropped first, and stay zero.
    """
    nm = _parse_pattern(pattern)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    calibration.require_values(model, "sparsify")
    if scope not in _SCOPES:
        raise ValueError(f"scope must be one of {_SCOPES}, got {scope!r}")
    targets = _select(model, layers, skip)
    if not targets:
        raise ValueError(f"no nn.Linear/Conv1D module selected (layers={layers!r}, skip={tuple(skip)!r})")
    plan = _resolve_sparsity(sparsity, nm, targets)
    if scope == "global" and (method != "magnitude" or nm is not None or isinstance(sparsity, Mapping)):
        raise ValueError(
            "scope='global' needs method='magnitude', pattern='unstructured' and one float sparsity "
            "(Wanda scores are only comparable within a row, N:M within a group)"
        )
    _check_divisible({name: targets[name] for name in plan}, nm)
    modules = {name: targets[name] for name in plan}
    norms = _input_norms(model, modules, calib, progress) if method == "wanda" else None

    def attach(name: str, keep_out_in: torch.Tensor) -> None:
        # The [out, in] view is its own inverse: it maps a mask back to the stored layout too.
        MaskPruning.apply(modules[name], "weight", _in_out_view(modules[name], keep_out_in).contiguous())

    if scope == "global":
        scores = {name: _scores(m, _effective_weight(m), None, name) for name, m in modules.items()}
        device = next(iter(scores.values())).device
        flat = torch.cat([s.flatten().to(device) for s in scores.values()])
        drop = _lowest_k(flat, round(next(iter(plan.values())) * flat.numel()))
        del flat
        start = 0
        for name, score in tqdm(scores.items(), desc="sparsify", disable=not progress):
            part = drop[start : start + score.numel()].reshape(score.shape).to(score.device)
            start += score.numel()
            attach(name, ~part)
    else:
        for name, module in tqdm(modules.items(), desc="sparsify", disable=not progress):
            score = _scores(module, _effective_weight(module), norms, name)
            attach(name, _keep_mask(score, plan[name], nm, rowwise=method == "wanda"))

    rows = []
    for name, module in modules.items():
        rows.append(
            LayerSparsity(
                name=name,
                shape=tuple(module.weight.shape),
                numel=module.weight.numel(),
                masked=int((module.weight_mask == 0).sum()),
                zeros=int((module.weight == 0).sum()),
            )
        )
    label = "unstructured" if nm is None else f"{nm[0]}:{nm[1]}"
    return SparsityReport(layers=rows, pattern=label, method=method, scope=scope)


# --------------------------------------------------------------------------------------------------
# sensitivity


@dataclass
class SensitivityResult:
    """``metrics[group][sparsity]`` = ``eval_fn`` with only that group sparsified; ``numels`` = its params."""

    baseline: float
    sparsities: tuple[float, ...]
    metrics: dict[str, dict[float, float]]
    numels: dict[str, int]
    method: str = "magnitude"
    higher_is_better: bool = False
    groups: dict[str, list[str]] = field(default_factory=dict)

    def table(self) -> str:
        """Markdown table: one row per group, one column per sparsity, plus the baseline."""
        head = "| layer | params | " + " | ".join(f"{s:g}" for s in self.sparsities) + " |"
        lines = [
            f"baseline: {self.baseline:.6g} ({self.method})",
            "",
            head,
            "|---|---:|" + "---:|" * len(self.sparsities),
        ]
        for group, row in self.metrics.items():
            cells = " | ".join(f"{row[s]:.6g}" for s in self.sparsities)
            lines.append(f"| {group} | {self.numels[group]} | {cells} |")
        return "\n".join(lines)

    def degradation(self, at: float) -> dict[str, float]:
        """Metric change vs the baseline at sparsity ``at`` (linear interpolation; worse = larger)."""
        xs = [0.0, *self.sparsities] if 0.0 not in self.sparsities else list(self.sparsities)
        out = {}
        for group, row in self.metrics.items():
            ys = [self.baseline if s == 0.0 and s not in row else row[s] for s in xs]
            ys = [math.inf if math.isnan(y) else y for y in ys]
            value = float(np.interp(at, xs, ys)) - self.baseline
            out[group] = -value if self.higher_is_better else value
        return {g: (math.inf if math.isnan(v) else v) for g, v in out.items()}

    def propose(
        self, target: float = 0.5, spread: float = 0.3, max_sparsity: float = 0.95
    ) -> dict[str, float]:
        """Per-group sparsities whose parameter-weighted mean is ``target``; sensitive groups get less.

        Rule: rank groups by :meth:`degradation` at ``target`` (least sensitive first, ties by name);
        assign sparsities linearly from ``target + spread/2`` (least sensitive) down to
        ``target - spread/2`` (most sensitive); then add one common shift ``c``, clipping each to
        ``[0, max_sparsity]``, with ``c`` found by bisection so the parameter-weighted mean is ``target``.
        """
        if not 0.0 <= target <= max_sparsity < 1.0:
            raise ValueError(
                f"need 0 <= target <= max_sparsity < 1, got target={target}, max_sparsity={max_sparsity}"
            )
        if spread < 0:
            raise ValueError(f"spread must be >= 0, got {spread}")
        degradation = self.degradation(target)
        order = sorted(degradation, key=lambda g: (degradation[g], g))
        count = len(order)
        raw = {
            g: target + spread / 2 - (spread * i / (count - 1) if count > 1 else spread / 2)
            for i, g in enumerate(order)
        }
        total = sum(self.numels[g] for g in order)

        def mean(shift: float) -> float:
            return sum(self.numels[g] * min(max(raw[g] + shift, 0.0), max_sparsity) for g in order) / total

        lo, hi = -1.0 - spread, 1.0 + spread  # mean(lo) = 0 <= target <= max_sparsity = mean(hi)
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if mean(mid) < target else (lo, mid)
        shift = (lo + hi) / 2
        return {g: min(max(raw[g] + shift, 0.0), max_sparsity) for g in self.metrics}


def sensitivity(
    model: nn.Module,
    eval_fn: Callable[[nn.Module], float],
    sparsities: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    method: str = "magnitude",
    calib: Calib | None = None,
    layers: str | Iterable[str] | None = None,
    skip: Iterable[str] = ("lm_head",),
    higher_is_better: bool = False,
    progress: bool = True,
) -> SensitivityResult:
    """Sparsify one layer/group at a time at each sparsity, call ``eval_fn(model)``, restore exactly.

    Groups: with ``layers=None`` every decoder block's linears (prefix up to the numeric index, e.g.
    ``model.layers.3``); otherwise each ``layers`` entry (a module name or prefix) is one group.
    Unstructured masks are multiplied into the weights in place (no prune hooks) and the saved copies
    written back after each evaluation, so the model ends bit-identical. ``eval_fn`` returns a loss-like
    number (lower is better) unless ``higher_is_better``.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    calibration.require_values(model, "sensitivity")
    sweep = tuple(sorted({_check_fraction(s, "each of sparsities") for s in sparsities}))
    if not sweep:
        raise ValueError("sparsities is empty")
    candidates = _candidates(model, skip)
    groups: dict[str, list[str]] = {}
    if layers is None:
        for name in candidates:
            groups.setdefault(calibration.layer_prefix(name) or name, []).append(name)
    else:
        for entry in [layers] if isinstance(layers, str) else list(layers):
            groups[entry] = list(_select(model, [entry], skip))
    if not groups:
        raise ValueError(f"no nn.Linear/Conv1D module selected (layers={layers!r})")
    members = {name: candidates[name] for names in groups.values() for name in names}
    norms = _input_norms(model, members, calib, progress) if method == "wanda" else None

    def param(module: nn.Module) -> torch.Tensor:
        # When already masked, the trainable tensor is weight_orig; the forward hook rebuilds weight.
        return module.weight_orig if hasattr(module, "weight_orig") else module.weight

    baseline = float(eval_fn(model))
    metrics: dict[str, dict[float, float]] = {}
    for group, names in tqdm(groups.items(), desc="sensitivity", disable=not progress):
        saved = {name: param(members[name]).detach().clone() for name in names}
        try:
            row = {}
            for s in sweep:
                with torch.no_grad():
                    for name in names:
                        module = members[name]
                        weight = saved[name]
                        if hasattr(module, "weight_mask"):
                            weight = weight * module.weight_mask
                        keep = _keep_mask(
                            _scores(module, weight, norms, name), s, None, rowwise=method == "wanda"
                        )
                        param(module).mul_(_in_out_view(module, keep).to(weight.dtype))
                row[s] = float(eval_fn(model))
                with torch.no_grad():
                    for name in names:
                        param(members[name]).copy_(saved[name])
            metrics[group] = row
        finally:
            with torch.no_grad():
                for name in names:
                    param(members[name]).copy_(saved[name])
    return SensitivityResult(
        baseline=baseline,
        sparsities=sweep,
        metrics=metrics,
        numels={g: sum(members[n].weight.numel() for n in names) for g, names in groups.items()},
        method=method,
        higher_is_better=higher_is_better,
        groups=groups,
    )
