"""Whole-expert removal for mixture-of-experts models: find the routed expert sets, score them on
calibration data (routing frequency / gate mass), and remove experts atomically.

>>> sets = find_experts(model)                        # one ExpertSet per MoE block
>>> scores = expert_importance(model, calib)          # {block path: [E] gate mass}
>>> report = remove_least_important_experts(model, scores, ratio=0.25)

Removing experts deletes their router rows (weight, bias, ``e_score_correction_bias``) and their
slices of the expert weights, and updates every count that said ``E``. It equals routing with
those experts' router logits at ``-inf`` (they are never chosen; softmax / top-k renormalisation
over the rest are unchanged), exactly. Shared experts are not routed and never touched.

Removal changes parameter shapes (and, for per-expert module lists, parameter names): a
:class:`~depgraph.DependencyGraph` traced before it is stale and must be re-traced. That is why this
is a standalone step and not a :class:`~depgraph.Pruner` option (a pruner holds one traced graph):
remove experts first, then trace the smaller model for width pruning.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import calibration
from .depth import clean_ids, owner_config
from .errors import DepGraphError, PruneError
from .sizes import field_names, layer_config, safe_get
from .trace import default_inputs
from .transaction import EditReport, Transaction, check_forward, count_parameters

__all__ = ["ExpertRemovalReport", "ExpertSet", "ExpertSets", "expert_importance", "find_experts",
           "remove_experts", "remove_least_important_experts"]

log = logging.getLogger("depgraph")

METRICS = ("gate_mass", "frequency")
# attributes / config fields that count the routed experts (checked by value == E as well)
_COUNT = re.compile(r"^(?:num|n|moe_num)_(?:local_|routed_)?experts$")
# how many experts a token is routed to
TOPK_ATTRS = ("top_k", "num_experts_per_tok", "topk", "num_selected_experts", "moe_topk", "experts_per_token")
# group-limited routing (DeepSeek-V3): experts are split into equal contiguous groups
GROUP_ATTRS = ("n_group", "num_group", "num_expert_group", "n_expert_group")
TOPK_GROUP_ATTRS = ("topk_group", "top_k_group")


# ------------------------------------------------------------------------------------------- discovery


@dataclass
class ExpertSet:
    """The routed experts of one MoE block: what holds them and what counts them.

    ``router_tensors``/``expert_tensors``: qualified parameter/buffer names whose dim 0 is the expert
    (router rows and biases; fused 3-D expert weights). ``expert_lists``: per-expert containers
    (``nn.ModuleList`` / ``nn.ModuleDict`` keyed ``<prefix>0..E-1``) whose entries are whole experts.
    ``counts``: ``(module path, attribute)`` holding ``E``; ``config_counts``: fields of ``config``
    (the block's owner config) holding ``E``. ``n_group > 1``: group-limited routing.
    """

    path: str
    num_experts: int
    router: str
    router_tensors: tuple[str, ...]
    expert_tensors: tuple[str, ...]
    expert_lists: tuple[str, ...]
    counts: tuple[tuple[str, str], ...]
    config_counts: tuple[str, ...]
    top_k: int
    n_group: int = 1
    topk_group: int | None = None
    shared: tuple[str, ...] = ()  # other children with parameters (shared experts, gates): not routed
    config: object | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        layout = "per-expert modules" if self.expert_lists else "fused weights"
        return f"{self.path}: {self.num_experts} experts (top-{self.top_k}, {layout}, router {self.router})"


class ExpertSets(list):
    """``find_experts``'s result: a list of :class:`ExpertSet` with ``warnings`` for skipped blocks."""

    def __init__(self, sets: Iterable[ExpertSet] = (), warnings: Iterable[str] = ()):
        super().__init__(sets)
        self.warnings: list[str] = list(warnings)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _is_list_container(module: nn.Module) -> bool:
    if not isinstance(module, (nn.ModuleList, nn.ModuleDict)) or len(module) < 2:
        return False
    entries = list(module.children())
    cls = type(entries[0])
    if not all(type(e) is cls and any(True for _ in e.parameters()) for e in entries):
        return False
    # an entry holding its own containers or fused weights is a layer, not an expert
    return not any(isinstance(m, (nn.ModuleList, nn.ModuleDict)) or any(p.dim() >= 3 for p in m.parameters())
                   for e in entries for m in e.modules())


def _ordered_keys(container: nn.Module) -> bool:
    """ModuleDict keys ``<prefix>0 .. <prefix>E-1`` in order (forward looks them up by index)."""
    if isinstance(container, nn.ModuleList):
        return True
    keys = list(container.keys())
    stems = {re.sub(r"\d+$", "", k) for k in keys}
    return len(stems) == 1 and keys == [f"{next(iter(stems))}{i}" for i in range(len(keys))]


def _router_rows(module: nn.Module) -> tuple[int, list[str]] | None:
    """``(E, tensor names)`` if ``module`` looks like a router: one 2-D weight ``[E, H]`` plus ``[E]`` vectors."""
    if isinstance(module, (nn.Embedding, nn.ModuleList, nn.ModuleDict)):
        return None
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    mats = [(n, t) for n, t in tensors if t.dim() == 2]
    if len(mats) != 1 or any(t.dim() > 2 for _, t in tensors):
        return None
    rows = mats[0][1].shape[0]
    if any(t.dim() == 1 and t.shape[0] != rows for _, t in tensors) or any(t.dim() == 0 for _, t in tensors):
        return None
    if not any(isinstance(t, nn.Parameter) for _, t in mats):
        return None
    return rows, [n for n, _ in tensors]


def _router_width(module: nn.Module) -> int:
    return next(p.shape[1] for p in module.parameters() if p.dim() == 2)


def _find_int(objs: Iterable[object], names: Iterable[str]) -> int | None:
    for obj in objs:
        if obj is None:
            continue
        for name in names:
            try:
                value = getattr(obj, name, None)
            except Exception:  # per-layer attributes of heterogeneous configs raise on the global config
                continue
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _count_fields(obj, e: int) -> list[str]:
    """Attributes of ``obj`` (module or config) named like an expert count and equal to ``e``."""
    names = set(field_names(obj))
    aliases = getattr(obj, "attribute_map", None)
    if isinstance(aliases, Mapping):
        names |= {aliases[k] for k in aliases}  # num_local_experts -> n_routed_experts style aliases
    out = []
    for name in sorted(names):
        if name.startswith("_") or not _COUNT.match(name):
            continue
        value = safe_get(obj, name)
        if isinstance(value, int) and not isinstance(value, bool) and value == e:
            out.append(name)
    return out


def _inspect(model: nn.Module, path: str, block: nn.Module, found: set[str]) -> ExpertSet | str | None:
    """The expert set of ``block``, a reason it is not understood (str), or None (not an MoE block)."""
    children = dict(block.named_children())
    fused: dict[str, list[tuple[str, int]]] = {}
    lists: dict[str, int] = {}
    for name, child in children.items():
        sub = _join(path, name)
        if any(f == sub or f.startswith(sub + ".") for f in found):
            continue  # holds an MoE block already found: not an expert container
        if any(isinstance(m, nn.modules.conv._ConvNd) for m in child.modules()):
            continue  # a convolution's [C, 1, K] kernel is not a stack of experts (Mamba's conv1d)
        if _is_list_container(child):
            lists[name] = len(child)
        elif any(p.dim() >= 3 for p in child.parameters()):
            tensors = list(child.named_parameters()) + list(child.named_buffers())
            fused[name] = [(n, t.shape[0] if t.dim() else None) for n, t in tensors]
    if not fused and not lists:
        return None
    routers = {}
    for name, child in children.items():
        if name in fused or name in lists:
            continue
        hit = _router_rows(child)
        if hit is not None:
            routers[name] = hit
    sizes = set(lists.values()) | {p.shape[0] for n in fused for p in children[n].parameters() if p.dim() >= 3}
    # the router reads what the experts read: its input width is a dim of the experts' weights
    widths = {d for n in fused for p in children[n].parameters() if p.dim() >= 3 for d in p.shape[1:]}
    widths |= {d for n in lists for p in children[n].parameters() if p.dim() == 2 for d in p.shape}
    matched = {r: v for r, v in routers.items()
               if v[0] in sizes and _router_width(children[r]) in widths}
    if not matched:
        return None  # containers but no router with that many rows: not a routed MoE
    if len(matched) > 1:
        return f"{path}: several router candidates ({', '.join(sorted(matched))}) with one row per expert"
    router, (e, router_names) = next(iter(matched.items()))
    fused_names, list_names = [], []
    for name, tensors in fused.items():
        bad = [(n, d) for n, d in tensors if d != e]
        if bad:
            n, d = bad[0]
            return (f"{path}: {_join(name, n)} has {d} entries along dim 0 but the router {_join(path, router)} has "
                    f"{e} rows; expert layout not understood")
        fused_names += [_join(path, name, n) for n, _ in tensors]
    for name, n in lists.items():
        if n != e:
            return (f"{path}: {name} holds {n} modules but the router {_join(path, router)} has {e} rows; "
                    "layout not understood")
        if not _ordered_keys(children[name]):
            return f"{path}: {name} is keyed {list(children[name].keys())[:3]}..., not <prefix>0..{e - 1}"
        list_names.append(_join(path, name))
    config = owner_config(model, path) if path else getattr(model, "config", None)
    top_k = _find_int([children[router], block, config], TOPK_ATTRS)
    if top_k is None:
        return f"{path}: router {_join(path, router)} has {e} rows but no top-k attribute ({', '.join(TOPK_ATTRS[:3])}, ...)"
    n_group = _find_int([children[router], block, config], GROUP_ATTRS) or 1
    topk_group = _find_int([children[router], block, config], TOPK_GROUP_ATTRS)
    members = set(fused) | set(lists) | {router}
    counts = []
    for mname, module in block.named_modules():
        if any(mname == n or mname.startswith(n + ".") for n in lists) and mname not in lists:
            continue  # inside one expert
        if any(mname == n or mname.startswith(n + ".") for n in children if n not in members):
            continue  # shared experts and gates count their own things
        counts += [(_join(path, mname), a) for a in _count_fields(module, e)]
    config_counts = tuple(_count_fields(config, e)) if config is not None else ()
    shared = tuple(_join(path, n) for n, c in children.items()
                   if n not in members and any(True for _ in c.parameters()))
    return ExpertSet(path, e, _join(path, router), tuple(_join(path, router, n) for n in router_names),
                     tuple(fused_names), tuple(list_names), tuple(counts), config_counts, top_k, n_group,
                     topk_group, shared, config)


def find_experts(model: nn.Module) -> ExpertSets:
    """Every MoE block of ``model``: a module owning a router (one weight ``[E, H]``, optional ``[E]``
    bias / correction bias) and expert containers with ``E`` entries (fused tensors with dim 0 ``E``,
    or a module list of ``E`` experts). Found by structure, not class names; a block whose layout is
    not understood is skipped and named in ``result.warnings`` (also logged), never guessed.
    """
    found: set[str] = set()
    sets, warns = [], []
    for path, module in reversed(list(model.named_modules())):  # children first
        hit = _inspect(model, path, module, found)
        if isinstance(hit, ExpertSet):
            sets.append(hit)
            found.add(path)
        elif isinstance(hit, str):
            warns.append(hit)
            found.add(path)
    order = {p: i for i, (p, _) in enumerate(model.named_modules())}
    warns.sort(key=lambda w: order.get(w.split(":", 1)[0], 0))
    for w in warns:
        log.warning("find_experts: %s (skipped)", w)
    return ExpertSets(sorted(sets, key=lambda s: order[s.path]), warns)


# ----------------------------------------------------------------------------------------- importance


def _flat(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flat(v)]
    return []


class _RouteMeter:
    """Per-expert routing counts and gate mass of one block, filled by a forward hook on its router."""

    def __init__(self, s: ExpertSet):
        self.set = s
        self.freq = torch.zeros(s.num_experts, dtype=torch.float64)
        self.mass = torch.zeros(s.num_experts, dtype=torch.float64)
        self.tokens = 0
        self.mask: torch.Tensor | None = None  # [tokens] bool of the current batch (padding excluded)

    def hook(self, _module, _args, output):
        e, k = self.set.num_experts, self.set.top_k
        tensors = _flat(output)
        index = next((t for t in tensors if not t.is_floating_point() and t.dim() >= 2 and t.shape[-1] == k
                      and t.dtype != torch.bool), None)
        weight = next((t for t in tensors if index is not None and t.is_floating_point()
                       and t.shape == index.shape), None)
        if index is None or weight is None:
            # the router returns logits only: route them the softmax -> top-k way
            logits = next((t for t in tensors if t.is_floating_point() and t.shape[-1] == e), None)
            if logits is None:
                raise DepGraphError(f"router {self.set.router} returned no [tokens, {e}] logits and no top-{k} "
                                    "(indices, weights) pair; expert_importance cannot read its decisions")
            probs = torch.softmax(logits.detach().double().reshape(-1, e), dim=-1)
            weight, index = probs.topk(k, dim=-1)
        index = index.detach().reshape(-1, k).long().cpu()
        weight = weight.detach().reshape(-1, k).double().cpu()
        if self.mask is not None and self.mask.numel() == index.shape[0]:
            index, weight = index[self.mask], weight[self.mask]
        self.tokens += index.shape[0]
        self.freq += torch.bincount(index.flatten(), minlength=e)[:e].double()
        self.mass.index_add_(0, index.flatten(), weight.flatten())


def expert_importance(model: nn.Module, calib, sets: Iterable[ExpertSet] | None = None,
                      metric: str = "gate_mass", progress: bool = True) -> dict[str, torch.Tensor]:
    """Importance of every routed expert, ``{block path: [E] float32}``; higher = more important.

    ``gate_mass``: mean routing weight an expert receives per token (the router's top-k weights, or
    softmax probabilities of the top-k logits when the router returns logits only); ``frequency``: the
    fraction of tokens routed to it. ``calib`` as in :func:`depgraph.block_importance` (ids ``[N, L]``,
    or a list of batches / dicts of kwargs; ``attention_mask`` excludes padding). Eval mode, no
    gradients; hooks and training flags are restored afterwards.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown expert importance metric {metric!r}; choose one of {METRICS}")
    sets = list(find_experts(model) if sets is None else sets)
    if not sets:
        raise DepGraphError(f"{type(model).__name__} has no MoE block that find_experts understands")
    meters = [_RouteMeter(s) for s in sets]
    calibration.require_values(model, "expert_importance")
    batches = calibration.batches(calib, calibration.vocab_size(model), ids_only=True)
    handles = []
    try:
        for meter in meters:
            handles.append(model.get_submodule(meter.set.router).register_forward_hook(meter.hook))
        with torch.no_grad(), calibration.eval_mode(model):
            for batch in tqdm(batches, desc="expert importance", disable=not progress, leave=False):
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                for meter in meters:
                    meter.mask = mask.reshape(-1).bool().cpu() if isinstance(mask, torch.Tensor) else None
                calibration.forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    idle = [m.set.path for m in meters if m.tokens == 0]
    if idle:
        raise DepGraphError(f"MoE blocks {idle} never ran during calibration; expert importance needs them")
    return {m.set.path: ((m.mass if metric == "gate_mass" else m.freq) / m.tokens).float() for m in meters}


# -------------------------------------------------------------------------------------------- removal


@dataclass
class ExpertRemovalReport(EditReport):
    """What an expert removal did: experts removed / left per block, parameter counts, edits."""

    removed: dict[str, tuple[int, ...]]
    remaining: dict[str, int]
    params_before: int
    params_after: int
    edits: list[tuple[str, str, object, object]] = field(default_factory=list)  # (where, attr, old, new)

    def describe(self) -> str:
        return f"removed {sum(len(v) for v in self.removed.values())} experts in {len(self.removed)} MoE blocks"


def _validate_ids(s: ExpertSet, ids) -> tuple[int, ...]:
    where = f"MoE block {s.path!r}"
    clean = clean_ids(ids, s.num_experts, "expert", "id", "ids", where)
    left = s.num_experts - len(clean)
    if left < s.top_k:
        raise PruneError(f"{where}: removing {len(clean)} of {s.num_experts} experts leaves {left}, fewer than "
                         f"the {s.top_k} every token is routed to (top_k); the model is unchanged")
    if s.n_group > 1 and clean:
        size = s.num_experts // s.n_group
        per = [sum(1 for i in clean if i // size == g) for g in range(s.n_group)]
        kept = size - per[0]
        if s.num_experts % s.n_group or len(set(per)) > 1 or kept < 2 or kept * (s.topk_group or 1) < s.top_k:
            raise PruneError(
                f"{where}: group-limited routing ({s.n_group} groups of {size} experts, topk_group="
                f"{s.topk_group}) needs equal-sized groups of at least 2 experts: remove the same number from "
                f"every group (got {per} per group) so routing stays exact; the model is unchanged")
    return tuple(sorted(clean))


def _check_inputs(model: nn.Module, example_inputs) -> tuple[tuple, dict] | None:
    """``(args, kwargs)`` for the forward check: ``example_inputs``, else token ids from the config."""
    if example_inputs is None:
        if getattr(model, "config", None) is None:
            return None  # nothing to build inputs from; the caller's own forward will tell
        args, kwargs = default_inputs(model, batch=1, seq_len=4)
        if getattr(model.config, "is_encoder_decoder", False):
            kwargs["decoder_input_ids"] = args[0]
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    else:
        args, kwargs = tuple(example_inputs), {}
    return args, kwargs


def _config_holders(model: nn.Module) -> dict[int, list[str]]:
    """id(config object) -> paths of the modules holding it as ``.config``."""
    out: dict[int, list[str]] = {}
    for path, module in model.named_modules():
        config = vars(module).get("config")
        if config is not None and hasattr(config, "to_dict"):
            out.setdefault(id(config), []).append(path)
    return out


def remove_experts(model: nn.Module, plan: Mapping[str, Iterable[int]], example_inputs=None,
                   verify: bool = True) -> ExpertRemovalReport:
    """Delete the experts ``plan`` names (``{MoE block path: expert ids}``) from ``model`` in place, atomically.

    Router rows (and biases) and expert slices go (fused weights: ``index_select`` on the expert dim;
    per-expert module lists: rebuilt without them, renumbered); every count of ``E`` on the block's
    modules follows, and the config's count fields (edited in place when every MoE block sharing it
    ends up with the same number, else the block's modules get their own config copy). Then one forward
    pass runs on a small input (``example_inputs``, else token ids from the config; ``verify=False``
    skips it). Any failure rolls everything back (the model is bit-identical) and raises
    :class:`PruneError` naming the block. Refused: bad ids, fewer than ``top_k`` experts left, and
    group-limited routing unless every group loses the same number of experts.

    The result equals the original model with the removed experts' router logits at ``-inf``.
    Parameters stay the same ``nn.Parameter`` objects; a traced graph is stale afterwards: re-trace.
    """
    sets = {s.path: s for s in find_experts(model)}
    for path in plan:
        if path not in sets:
            known = ", ".join(repr(p) for p in sets) or "none"
            raise PruneError(f"{path!r} is not an MoE block find_experts understands (known: {known})")
    removed = {p: _validate_ids(sets[p], ids) for p, ids in plan.items()}
    removed = {p: ids for p, ids in removed.items() if ids}
    before = count_parameters(model)
    if not removed:
        return ExpertRemovalReport({}, {p: s.num_experts for p, s in sets.items()}, before, before)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    new_e = {p: s.num_experts - len(removed.get(p, ())) for p, s in sets.items()}

    # stage: new tensors, containers, attribute and config edits (nothing is modified yet)
    staged: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    edits: list[tuple[object, str, object, str]] = []  # (obj, attr, new value, where)
    holders = _config_holders(model)
    by_config: dict[int, list[str]] = {}
    for s in sets.values():
        if s.config is not None:
            by_config.setdefault(id(s.config), []).append(s.path)
    for path, ids in removed.items():
        s = sets[path]
        keep = [i for i in range(s.num_experts) if i not in set(ids)]
        try:
            with torch.no_grad():
                for name in s.router_tensors + s.expert_tensors:
                    t = tensors[name]
                    index = torch.as_tensor(keep, dtype=torch.long, device=t.device)
                    staged.append((f"{path}: {name}", t, t.data.index_select(0, index).contiguous()))
        except Exception as exc:
            raise PruneError(f"MoE block {path!r}: could not slice its expert tensors ({exc!r}); "
                             "the model is unchanged") from exc
        for lpath in s.expert_lists:
            container = model.get_submodule(lpath)
            entries = list(container._modules.values())
            if isinstance(container, nn.ModuleList):
                new = {str(j): entries[i] for j, i in enumerate(keep)}
            else:
                stem = re.sub(r"\d+$", "", next(iter(container._modules)))
                new = {f"{stem}{j}": entries[i] for j, i in enumerate(keep)}
            edits.append((container, "_modules", type(container._modules)(new), lpath))
        for mpath, attr in s.counts:
            edits.append((model.get_submodule(mpath), attr, new_e[path], mpath))
        # the config: in place when all its MoE blocks agree, else a copy for this block's modules
        config = s.config
        if config is None or not s.config_counts:
            continue
        users = by_config.get(id(config), [path])
        if len({new_e[u] for u in users}) == 1 and all(sets[u].num_experts == s.num_experts for u in users):
            if path == users[0]:
                edits += [(config, f, new_e[path], "config") for f in s.config_counts]
            continue
        inside = [m for m in holders.get(id(config), []) if m == path or m.startswith(path + ".")]
        if not inside:
            continue  # no module of this block reads the config: its attributes say it all
        local = layer_config(config)
        for f in s.config_counts:
            edits.append((local, f, new_e[path], f"{path} (config copy)"))
        edits += [(model.get_submodule(mpath), "config", local, mpath) for mpath in inside]
    # counts above the blocks (the CausalLM's num_experts for the aux loss) follow a uniform removal only
    olds, news = {s.num_experts for s in sets.values()}, set(new_e.values())
    if len(olds) == 1 and len(news) == 1:
        old_e, e_after = next(iter(olds)), next(iter(news))
        inside = tuple(p + "." for p in sets)
        for mpath, module in model.named_modules():
            if mpath in sets or mpath.startswith(inside):
                continue
            edits += [(module, a, e_after, mpath or "model") for a in _count_fields(module, old_e)]
    # module-local config copies (from earlier per-layer cuts) inside a changed block state its count too
    for path in removed:
        s = sets[path]
        for mpath, module in model.get_submodule(path).named_modules(prefix=path):
            local = vars(module).get("config")
            if local is None or local is s.config or not hasattr(local, "to_dict"):
                continue
            fields = _count_fields(local, s.num_experts)
            if not fields:
                continue
            if all(h == path or h.startswith(path + ".") for h in holders.get(id(local), [])):
                edits += [(local, f, new_e[path], f"{mpath}.config") for f in fields]
            else:  # shared with modules outside this block: give this one its own copy
                mine = layer_config(local)
                edits += [(mine, f, new_e[path], f"{mpath}.config") for f in fields]
                edits.append((module, "config", mine, mpath))

    transaction = Transaction()
    inputs = _check_inputs(model, example_inputs) if verify else None
    try:
        with transaction:  # any BaseException (Ctrl-C included) rolls back, then propagates
            for _, t, data in staged:
                transaction.set_data(t, data)
            for obj, attr, value, _ in edits:
                transaction.set_attr(obj, attr, value)
            if inputs is not None:
                check_forward(model, *inputs)
    except Exception as exc:
        blocks = ", ".join(repr(p) for p in removed)
        raise PruneError(f"removing experts from MoE block(s) {blocks} failed ({type(exc).__name__}: "
                         f"{str(exc)[:300]}); the model was left unchanged") from exc
    report_edits = []
    for obj, attr, value, where in edits:
        old = transaction.old_value(obj, attr)
        if attr == "_modules":
            report_edits.append((where, "experts", len(old) if old is not None else None, len(value)))
        elif attr != "config":
            report_edits.append((where, attr, old, value))
    return ExpertRemovalReport(removed, new_e, before, count_parameters(model), report_edits)


def remove_least_important_experts(model: nn.Module, scores: Mapping[str, torch.Tensor],
                                   ratio: float | None = None, n: int | None = None, example_inputs=None,
                                   verify: bool = True) -> ExpertRemovalReport:
    """Remove the lowest-scoring experts of every block in ``scores``: ``n`` per block, or ``round(ratio
    * E)`` (at most ``E - top_k``). Ties: the lower id goes first. Group-limited routing (``n_group >
    1``): the count is rounded down to a multiple of ``n_group`` and taken equally from every group.
    """
    if (ratio is None) == (n is None):
        raise PruneError("pass exactly one of ratio= or n=")
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise PruneError(f"ratio must be in [0, 1), got {ratio}")
    sets = {s.path: s for s in find_experts(model)}
    plan: dict[str, list[int]] = {}
    for path, values in scores.items():
        s = sets.get(path)
        if s is None:
            raise PruneError(f"{path!r} is not an MoE block find_experts understands (known: {list(sets)})")
        values = torch.as_tensor(values, dtype=torch.float64).flatten().cpu()
        if values.numel() != s.num_experts:
            raise PruneError(f"MoE block {path!r}: got {values.numel()} scores for {s.num_experts} experts")
        if not torch.isfinite(values).all():
            raise PruneError(f"MoE block {path!r}: scores contain NaN/inf; recompute them")
        count = n if n is not None else math.floor(ratio * s.num_experts + 0.5)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise PruneError(f"n must be a non-negative integer, got {n!r}")
        count = min(count, s.num_experts - s.top_k)
        if s.n_group > 1:
            size = s.num_experts // s.n_group
            per = min(count // s.n_group, size - 2)
            chosen = []
            for g in range(s.n_group):
                order = torch.sort(values[g * size:(g + 1) * size], stable=True).indices[:per]
                chosen += [g * size + int(i) for i in order]
            plan[path] = sorted(chosen)
        else:
            plan[path] = sorted(int(i) for i in torch.sort(values, stable=True).indices[:count])
    return remove_experts(model, plan, example_inputs, verify)
