"""Depth pruning: score whole transformer blocks and remove the least important ones.

Block importance follows Minitron / ShortGPT: a block whose output hidden state points the same
way as its input (cosine similarity ~1) changes little and can be dropped.

>>> scores = block_importance(model, calib)            # [n_blocks], higher = more important
>>> report = remove_least_important(model, scores, 2)  # atomic; renumbers layer_idx, fixes the config
>>> depgraph.save_pretrained(model, "out/")            # from_pretrained(dir) rebuilds it

Removal changes parameter names (``layers.5`` becomes ``layers.3``): a
:class:`~depgraph.DependencyGraph` traced before it is stale and must be re-traced.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import calibration
from .checkpoint import BASE_CONFIG_ATTR
from .errors import DepGraphError, PruneError
from .transaction import EditReport, Transaction

__all__ = ["RemovalReport", "block_importance", "clean_ids", "find_blocks", "owner_config", "remove_layers",
           "remove_least_important"]

METRICS = ("cosine", "angular")
# config attributes that count the blocks (GPT-2 style names are aliases through attribute_map)
COUNT_ATTRS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# per-block integer attributes that index the cache / per-layer config lists
INDEX_ATTRS = ("layer_idx", "layer_id", "layer_number", "layer_index")
# config lists that hold block *indices* (not one entry per block): remapped, not sliced
INDEX_LISTS = ("mlp_only_layers",)


# --------------------------------------------------------------------------------------------- blocks


def _unique_numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _candidates(model: nn.Module) -> list[tuple[str, nn.ModuleList, int]]:
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        cls = type(module[0])
        if not all(type(child) is cls for child in module):
            continue
        if not all(any(True for _ in child.parameters()) for child in module):
            continue
        out.append((name, module, _unique_numel(module)))
    return out


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The model's block list as ``(dotted path, ModuleList)``, e.g. ``("model.layers", ...)``.

    Without ``path``: the ``nn.ModuleList`` holding the most parameters whose children are all the
    same class and all have parameters (so the decoder layers win over per-layer expert lists and
    over a smaller vision tower). Raises :class:`DepGraphError` if there is none, or if two lists
    tie (e.g. an encoder and a decoder of equal size): pass ``path`` then.
    """
    if path is not None:
        try:
            module = model.get_submodule(path)
        except AttributeError as exc:
            raise DepGraphError(f"{type(model).__name__} has no submodule {path!r}") from exc
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            raise DepGraphError(f"{path!r} is a {type(module).__name__}, not a non-empty nn.ModuleList of blocks")
        return path, module
    candidates = _candidates(model)
    if not candidates:
        raise DepGraphError(f"{type(model).__name__} has no nn.ModuleList of same-class blocks with parameters; "
                            "depth pruning needs the transformer layers in one ModuleList")
    best = max(c[2] for c in candidates)
    top = [c for c in candidates if c[2] == best]
    if len(top) > 1:
        names = ", ".join(repr(c[0]) for c in top)
        raise DepGraphError(f"several block lists of equal size ({names}); pass path= to choose one")
    return top[0][0], top[0][1]


def owner_config(model: nn.Module, path: str):
    """The config of the nearest module above the block list that has one (the text config in a VLM)."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        owner = model.get_submodule(".".join(parts[:cut])) if cut else model
        config = getattr(owner, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            return config
    return None


# ----------------------------------------------------------------------------------------- importance


class _CosineMeter:
    """Per-block sums of a per-token similarity, filled by hooks (inputs are cloned in the pre-hook
    because a block may update its input in place)."""

    def __init__(self, n: int, angular: bool) -> None:
        self.angular = angular
        self.sums = torch.zeros(n, dtype=torch.float64)
        self.counts = torch.zeros(n, dtype=torch.float64)
        self.pending: dict[int, list[torch.Tensor]] = {i: [] for i in range(n)}
        self.weights: torch.Tensor | None = None  # [B, L] attention mask of the current batch

    def pre_hook(self, i: int):
        def hook(_module, args, kwargs):
            x = calibration.first_tensor(args) if args else None
            if x is None:
                x = kwargs.get("hidden_states")
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise DepGraphError(f"block {i} got no hidden-state tensor as its first argument or as "
                                    "hidden_states=; block_importance cannot read its input")
            self.pending[i].append(x.detach().clone())
        return hook

    def post_hook(self, i: int):
        def hook(_module, _args, _kwargs, output):
            x = self.pending[i].pop()
            y = calibration.first_tensor(output)
            if y is None or y.shape != x.shape:
                got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(output).__name__
                raise DepGraphError(f"block {i} output {got} does not match its input {tuple(x.shape)}")
            # float64: an identity block must score ~1e-16, not float32 rounding noise
            value = F.cosine_similarity(x.double(), y.detach().double(), dim=-1)  # per token
            if self.angular:
                value = torch.arccos(value.clamp(-1.0, 1.0)) / math.pi
            w = self.weights
            if w is not None and w.shape == value.shape:
                w = w.to(value.device, torch.float64)
                self.sums[i] += float((value * w).sum())
                self.counts[i] += float(w.sum())
            else:
                self.sums[i] += float(value.sum())
                self.counts[i] += value.numel()
        return hook


def block_importance(model: nn.Module, calib, metric: str = "cosine", progress: bool = True,
                     path: str | None = None) -> torch.Tensor:
    """Importance of every block, ``[n_blocks]`` float32 on CPU; higher = more important.

    ``cosine`` (Minitron / ShortGPT block importance): ``1 - mean cos(x_in, x_out)`` over all calibration
    tokens (padding excluded when a batch dict carries ``attention_mask``). ``angular``: the mean
    angular distance ``arccos(cos) / pi`` instead. ``calib``: ids ``[N, L]`` (run one row at a time),
    or a list of ``[1, L]`` tensors or of dicts of model kwargs. Runs in eval mode without gradients;
    hooks and the training flag are restored afterwards, even on error.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown block importance metric {metric!r}; choose one of {METRICS}")
    _, blocks = find_blocks(model, path)
    calibration.require_values(model, "block_importance")
    batches = calibration.batches(calib, calibration.vocab_size(model), ids_only=True)
    meter = _CosineMeter(len(blocks), angular=metric == "angular")
    handles = []
    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(meter.pre_hook(i), with_kwargs=True))
            handles.append(block.register_forward_hook(meter.post_hook(i), with_kwargs=True))
        with torch.no_grad(), calibration.eval_mode(model):
            for batch in tqdm(batches, desc="block importance", disable=not progress, leave=False):
                meter.weights = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                calibration.forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    idle = [i for i in range(len(blocks)) if meter.counts[i] == 0]
    if idle:
        raise DepGraphError(f"blocks {idle} never ran during calibration (or saw only padding); "
                            "block importance needs every block in the forward pass")
    mean = meter.sums / meter.counts
    scores = mean if metric == "angular" else 1.0 - mean
    return scores.float()


# -------------------------------------------------------------------------------------------- removal


@dataclass
class RemovalReport(EditReport):
    """What a depth cut did: which blocks went, parameter counts, every attribute/config edit."""

    path: str
    removed: tuple[int, ...]
    kept: tuple[int, ...]
    params_before: int
    params_after: int
    edits: list[tuple[str, str, object, object]] = field(default_factory=list)  # (where, attr, old, new)

    def describe(self) -> str:
        return f"removed blocks {list(self.removed)} of {self.path} ({len(self.kept)} left)"


def clean_ids(ids, n: int, unit: str, index: str, indices: str, where: str = "") -> list[int]:
    """``ids`` as distinct ints in ``[0, n)``, else :class:`PruneError` naming the first problem.

    ``unit``/``index``/``indices`` name them in messages ("block indices [4] out of range");
    ``where`` prefixes every message (the MoE block a plan entry is for)."""
    one, many = f"{unit} {index}", f"{unit} {indices}"
    prefix = f"{where}: " if where else ""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise PruneError(f"{prefix}{many} must be a sequence of integers, got {type(ids).__name__}")
    raw = list(ids.flatten().tolist() if isinstance(ids, torch.Tensor) else ids)
    clean = []
    for i in raw:
        try:
            if isinstance(i, bool):
                raise TypeError
            clean.append(operator.index(i))  # ints and numpy ints; not floats or bools
        except TypeError:
            raise PruneError(f"{prefix}{one} {i!r} is not an integer") from None
    bad = [i for i in clean if not 0 <= i < n]
    if bad:
        raise PruneError(f"{prefix}{many} {bad} out of range: there are {n} {unit}s (0..{n - 1}; negative "
                         "indices are not accepted)")
    dup = sorted({i for i in clean if clean.count(i) > 1})
    if dup:
        raise PruneError(f"{prefix}{many} {dup} repeated; each {unit} can be removed once")
    return clean


def _validate(indices: Iterable[int], n: int) -> tuple[int, ...]:
    clean = clean_ids(indices, n, "block", "index", "indices")
    if len(set(clean)) >= n:
        raise PruneError(f"removing {len(clean)} of {n} blocks would leave none; keep at least one")
    return tuple(sorted(clean))


def _config_edits(config, n: int, removed: tuple[int, ...], kept: tuple[int, ...], where: str) -> list:
    """(obj, attr, old, new) edits that make ``config`` describe the kept blocks."""
    edits = []
    if config is None:
        return edits
    new_index = {old: new for new, old in enumerate(kept)}
    aliases = getattr(config, "attribute_map", {}) or {}
    counts = dict.fromkeys(aliases.get(name, name) for name in COUNT_ATTRS)  # GPT-2: num_hidden_layers -> n_layer
    for name in counts:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value == n:
            edits.append((config, name, value, len(kept), where))
    for name, value in list(vars(config).items()):
        if name.startswith("_") or not isinstance(value, (list, tuple)):
            continue
        if name in INDEX_LISTS:
            # block indices: keep those still present, renumbered
            new = type(value)(new_index[i] for i in value if isinstance(i, int) and i in new_index)
            edits.append((config, name, value, new, where))
        elif "layer" in name and len(value) == n:
            # one entry per block (layer_types, no_rope_layers, ...): drop the removed blocks' entries
            edits.append((config, name, value, type(value)(value[i] for i in kept), where))
    return edits


def _index_edits(blocks: nn.ModuleList, path: str, kept: tuple[int, ...]) -> list:
    """Renumber per-block index attributes (``layer_idx`` of the attention etc.) to the new positions;
    an attribute offset from the block position (Megatron's 1-based ``layer_number``) keeps its offset."""
    edits = []
    for new, old in enumerate(kept):
        if new == old:
            continue
        for sub_name, module in blocks[old].named_modules():
            for attr in INDEX_ATTRS:
                value = vars(module).get(attr)
                if isinstance(value, int) and not isinstance(value, bool):
                    where = ".".join(p for p in (path, str(new), sub_name) if p)
                    edits.append((module, attr, value, value - old + new, where))
    return edits


def remove_layers(model: nn.Module, indices: Iterable[int], path: str | None = None) -> RemovalReport:
    """Delete the blocks at ``indices`` (positions in the block list) from ``model`` in place, atomically.

    Kept blocks are renumbered (``layer_idx`` etc.) so KV caches index correctly; the config's block
    count and per-block lists (``layer_types``) follow, so ``save_pretrained`` + ``from_pretrained``
    rebuilds the model. Raises :class:`PruneError` (model unchanged) for indices out of range,
    repeated, or removing every block.
    """
    path, blocks = find_blocks(model, path)
    n = len(blocks)
    removed = _validate(indices, n)
    before = sum(p.numel() for p in model.parameters())
    kept = tuple(i for i in range(n) if i not in set(removed))
    if not removed:
        return RemovalReport(path, (), kept, before, before)

    # stage every edit first, so a failure applies nothing
    edits = _index_edits(blocks, path, kept)
    config = owner_config(model, path)
    edits += _config_edits(config, n, removed, kept, "config")
    base = getattr(model, BASE_CONFIG_ATTR, None)
    if base is not None and base is not config:
        # checkpoints describe per-layer sizes against the unpruned config: it must have the same depth
        edits += _config_edits(base, n, removed, kept, BASE_CONFIG_ATTR)
    try:
        with Transaction() as transaction:  # any BaseException (Ctrl-C included) rolls back, then propagates
            for obj, attr, _, new, _ in edits:
                transaction.set_attr(obj, attr, new)
            # deletion edits a copy of the ModuleList's dict (rollback restores the original); the list
            # object keeps its identity, and re-keys the rest 0..k-1
            transaction.set_attr(blocks, "_modules", type(blocks._modules)(blocks._modules))
            for i in reversed(removed):
                del blocks[i]
    except Exception as exc:
        raise PruneError(f"removing blocks {list(removed)} failed ({exc!r}); the model was left unchanged") from exc
    after = sum(p.numel() for p in model.parameters())
    report_edits = [(where, attr, old, new) for _, attr, old, new, where in edits]
    return RemovalReport(path, removed, kept, before, after, report_edits)


def remove_least_important(model: nn.Module, scores: torch.Tensor | Sequence[float], n: int,
                           path: str | None = None) -> RemovalReport:
    """Remove the ``n`` blocks with the lowest ``scores`` (ties: the earlier block goes first)."""
    _, blocks = find_blocks(model, path)
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten().cpu()
    if scores.numel() != len(blocks):
        raise PruneError(f"got {scores.numel()} scores for {len(blocks)} blocks")
    if not torch.isfinite(scores).all():
        raise PruneError("block scores contain NaN/inf; recompute them")
    try:
        count = operator.index(n) if not isinstance(n, bool) else -1
    except TypeError:
        count = -1
    if not 0 <= count < len(blocks):
        raise PruneError(f"n must be an integer in 0..{len(blocks) - 1} (at least one block stays), got {n!r}")
    order = torch.sort(scores, stable=True).indices
    return remove_layers(model, order[:count].tolist(), path)
