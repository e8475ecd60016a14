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

from .checkpoint import BASE_CONFIG_ATTR
from .errors import PruneError
from .groups import Group, GroupKind
from .layers import (
    HEAD_ATTRS,
    HEAD_CONFIG,
    HIDDEN_ATTRS,
    HIDDEN_CONFIG,
    LAYER_RULES,
    MLP_ATTRS,
    MLP_CONFIG,
    Edit,
    layer_edits,
    rank_names_layer,
    rank_stem,
)

Plan = Mapping[Group, Iterable[int]]


@dataclass
class PruneReport:
    """What a cut did: parameter counts, new shapes, attribute edits, units removed per group."""

    params_before: int
    params_after: int
    units_removed: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    edits: list[tuple[str, str, object, object]] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Fraction of parameters removed."""
        return 1.0 - self.params_after / max(self.params_before, 1)

    def __str__(self) -> str:
        return (f"pruned {sum(self.units_removed.values())} units in {len(self.units_removed)} groups: "
                f"{self.params_before:,} -> {self.params_after:,} parameters ({self.ratio:.1%} removed)")


def count_parameters(model: nn.Module) -> int:
    """Parameters counted once each (tied weights once)."""
    return sum(p.numel() for p in model.parameters())


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


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    return tensors


def _scope_modules(model: nn.Module, scope: str) -> list[tuple[str, nn.Module]]:
    if not scope:
        return []
    return [(n, m) for n, m in model.named_modules() if n == scope or n.startswith(scope + ".")]


def _scaled(value, before: int, after: int):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % before:
        return None
    return value // before * after


def _config_of(model: nn.Module):
    return getattr(model, "config", None)


def zero_mask(graph, plan: Plan) -> None:
    """Reference for the cut: zero the consumer slices (role "in") of the planned units in place.

    For MLP neurons and heads, a model masked this way computes exactly what the cut model does.
    """
    checked = validate_plan(graph, plan)
    tensors = _tensors(graph.model)
    with torch.no_grad():
        for group, units in checked.items():
            for m in group.members:
                if m.role == "in":
                    idx = torch.as_tensor(m.indices(units), dtype=torch.long)
                    tensors[m.param].index_fill_(m.dim, idx.to(tensors[m.param].device), 0)


class _Transaction:
    """Staged tensor and attribute changes with rollback."""

    def __init__(self):
        self.undo: list[tuple[str, object, str, object]] = []

    def set_data(self, tensor: torch.Tensor, new: torch.Tensor) -> None:
        self.undo.append(("data", tensor, "data", tensor.data))
        tensor.data = new
        if isinstance(tensor, nn.Parameter) and tensor.grad is not None:
            self.undo.append(("attr", tensor, "grad", tensor.grad))
            tensor.grad = None

    def cut_data(self, tensor: torch.Tensor, cuts: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """Replace ``tensor.data`` by its ``keep`` slices along each ``(dim, keep, drop)`` of ``cuts``.

        The undo record keeps only the dropped slices (not the whole old tensor), so the old storage is
        freed as soon as the new one is in place: a cut's peak memory is the model plus what it removes,
        not twice the model. Rollback puts the kept and dropped slices back into a tensor of the old
        shape (bit-identical values). A view into a larger storage or a non-contiguous tensor keeps the
        old tensor.
        """
        old = tensor.data
        own = old.storage_offset() == 0 and old.untyped_storage().nbytes() == old.numel() * old.element_size()
        if not own or not old.is_contiguous() or old.device.type == "meta":
            data = old
            for dim, keep, _ in cuts:
                data = data.index_select(dim, keep)
            self.set_data(tensor, data.contiguous())
            return
        stages = []  # (dim, keep, drop, shape before, dropped slices)
        data = old
        for dim, keep, drop in cuts:
            stages.append((dim, keep, drop, tuple(data.shape), data.index_select(dim, drop)))
            data = data.index_select(dim, keep)
        self.undo.append(("cut", tensor, "data", stages))
        del old
        tensor.data = data.contiguous()
        if isinstance(tensor, nn.Parameter) and tensor.grad is not None:
            self.undo.append(("attr", tensor, "grad", tensor.grad))
            tensor.grad = None

    @staticmethod
    def _uncut(tensor: torch.Tensor, stages) -> torch.Tensor:
        data = tensor.data
        for i in range(len(stages) - 1, -1, -1):
            dim, keep, drop, before, dropped = stages[i]
            full = torch.empty(before, dtype=data.dtype, device=data.device)
            full.index_copy_(dim, keep, data)
            full.index_copy_(dim, drop, dropped)
            data = full
        return data

    def set_attr(self, obj, name: str, value) -> None:
        missing = not hasattr(obj, name)
        self.undo.append(("del" if missing else "attr", obj, name, None if missing else getattr(obj, name)))
        setattr(obj, name, value)

    def rollback(self) -> None:
        for kind, obj, name, old in reversed(self.undo):
            if kind == "data":
                obj.data = old
            elif kind == "cut":
                with torch.no_grad():
                    obj.data = self._uncut(obj, old)
            elif kind == "del":
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        self.undo.clear()


def prune(graph, plan: Plan, *, verify: bool = True) -> PruneReport:
    """Cut the units of ``plan`` ({group: unit ids}) from ``graph.model`` in place, atomically.

    Raises :class:`PruneError` (model unchanged) for an invalid plan, a stale graph, a layer
    that cannot be resized, or a cut model that no longer runs (``verify``).
    """
    model = graph.model
    checked = validate_plan(graph, plan)
    tensors = _tensors(model)
    for name, shape in graph.param_shapes.items():
        if name not in tensors:
            raise PruneError(f"parameter {name} no longer exists (layers removed or renamed since tracing): "
                             "the graph is stale; re-trace the model")
        if tuple(tensors[name].shape) != tuple(shape):
            raise PruneError(f"parameter {name} changed shape since tracing ({shape} -> "
                             f"{tuple(tensors[name].shape)}): the graph is stale; re-trace the model")
    before = count_parameters(model)
    if not checked:
        return PruneReport(before, before)

    # 1. indices to remove along every parameter dim
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

    # 3. stage attribute edits
    # 3. the reference for exact groups: the same units zero-masked in the model as it is now
    reference = _masked_reference(graph, checked, tensors) if verify else None

    # 4. stage attribute edits and commit; the first attempt also rescales attention sizes that
    #    are named like the hidden size ("embed_dim" == heads x head_dim), the second does not
    transaction = _Transaction()
    failure: Exception | None = None
    for guess_inner in (True, False):
        edits = _module_edits(model, new_shapes) + _group_edits(graph, checked, guess_inner=guess_inner)
        transaction = _Transaction()
        config = _config_of(model)
        if config is not None and hasattr(config, "to_dict") and not hasattr(model, BASE_CONFIG_ATTR):
            # remember the unpruned config: checkpoints describe per-layer sizes relative to it
            transaction.set_attr(model, BASE_CONFIG_ATTR, copy.deepcopy(config))
        try:
            with torch.no_grad():
                for param, cuts in staged.items():
                    transaction.cut_data(tensors[param], cuts)
            for obj, name, value in edits:
                old = getattr(obj, name, None)
                if old is not value and not (isinstance(value, (int, float, str, tuple)) and old == value):
                    transaction.set_attr(obj, name, value)
            if verify:
                out = _check_forward(graph)
                if reference is not None:
                    _check_exact(out, reference, checked)
            failure = None
            break
        except Exception as exc:  # any failure leaves the model as it was
            transaction.rollback()
            failure = exc
    if failure is not None:
        if isinstance(failure, PruneError):
            raise failure
        raise PruneError(f"the cut could not be applied ({type(failure).__name__}: {str(failure)[:300]}); "
                         "the model was left unchanged") from failure

    report = PruneReport(before, count_parameters(model))
    report.units_removed = {g.name: int(u.size) for g, u in checked.items()}
    report.shapes = {p: (tuple(graph.param_shapes[p]), s) for p, s in new_shapes.items()}
    names = {id(m): n for n, m in model.named_modules()}
    for kind, obj, name, old in transaction.undo:
        if kind not in ("data", "cut"):
            report.edits.append((names.get(id(obj), type(obj).__name__), name, old, getattr(obj, name, None)))
    _update_graph(graph, checked, keep_masks, new_shapes)
    return report


def _module_edits(model: nn.Module, new_shapes: dict[str, tuple[int, ...]]) -> list[Edit]:
    owners = {name.rsplit(".", 1)[0] if "." in name else "" for name in new_shapes}
    edits: list[Edit] = []
    for name, module in model.named_modules():
        if name in owners:
            edits.extend(layer_edits(module, new_shapes, name))
    return edits


def _group_edits(graph, checked: dict[Group, np.ndarray], guess_inner: bool = True) -> list[Edit]:
    """Head counts, MLP widths and hidden sizes stored on modules and in the config."""
    model = graph.model
    config = _config_of(model)
    edits: list[Edit] = []
    pinned_head_dim = False
    local_configs: dict[int, object] = {}
    per_layer_updates: dict[int, tuple[object, dict[int, dict[str, int]]]] = {}  # id(spec) -> (spec, {layer: })
    # latent ranks (MLA's q/kv latent, A groups flagged by groups.mark_latent) set rank attributes
    # (kv_lora_rank), never the MLP width: they get their own pass with the same config handling
    for kind, attrs, fields, latent in ((GroupKind.A, MLP_ATTRS, MLP_CONFIG, False), (GroupKind.A, (), (), True),
                                        (GroupKind.B, HEAD_ATTRS, HEAD_CONFIG, False)):
        targets: dict[str, list] = defaultdict(list)  # config field -> [(scope modules, new value)]
        for group in graph.groups(kind):
            if bool(group.extra.get("latent")) is not latent:
                continue
            units = checked.get(group)
            after = group.size - (0 if units is None else units.size)
            modules = _scope_modules(model, _scope_name(graph.groups(), group))
            if latent or kind is GroupKind.B:
                modules = _member_scope(modules, group)
            if latent:
                scope_config = next((m.config for _, m in modules if getattr(m, "config", None) is not None),
                                    config)
                for owner, name in _rank_fields(group, modules, scope_config, units is not None):
                    if owner is scope_config:
                        targets[name].append((modules, after, units is not None))
                    elif units is not None:
                        edits.append((owner, name, after))
                continue
            if units is not None:
                # inside attention, "hidden_size"/"embed_dim" equal to heads x head_dim mean the inner size
                inner = max((len(m.indices()) for m in group.members if m.role == "in"), default=-1)
                owned = _member_tensors(_tensors(model), group)
                for _, module in modules:
                    if _foreign(module, owned):
                        continue
                    for attr in attrs + (HIDDEN_ATTRS if kind is GroupKind.B and guess_inner else ()):
                        value = getattr(module, attr, None)
                        if attr in HIDDEN_ATTRS and attr not in attrs and value != inner:
                            continue
                        new = _scaled(value, group.size, after)
                        if new is not None and attr in vars(module):
                            edits.append((module, attr, new))
                    if kind is GroupKind.B:
                        edits.extend(_shared_kv_repeats(module, group.size, after))
            scope_config = next((m.config for _, m in modules if getattr(m, "config", None) is not None), config)
            per_layer = _per_layer_attributes(scope_config)
            for name in fields:
                if name in per_layer:  # heterogeneous config: the layer's own value is in per_layer_config
                    if units is not None:
                        _per_layer_update(per_layer_updates, scope_config, group, modules, name, after)
                    continue
                value = _safe_get(scope_config, name) if scope_config is not None else None
                new = _scaled(value, group.size, after)
                if new is not None:
                    targets[name].append((modules, new, units is not None))
        if config is None:
            continue
        if kind is GroupKind.B and targets and any(cut for v in targets.values() for *_, cut in v):
            pinned_head_dim |= _pin_head_dim(config, edits)
        for name, values in targets.items():
            if not any(cut for *_, cut in values):
                continue
            if len({v for _, v, _ in values}) == 1:
                edits.append((config, name, values[0][1]))  # uniform: the config can say it
                for modules, new, _ in values:
                    for _, module in modules:
                        if getattr(module, "config", None) is not None and module.config is not config:
                            edits.append((module.config, name, new))
            else:  # per-layer sizes: give the scope's modules their own config copy
                for modules, new, cut in values:
                    if not cut:
                        continue
                    for _, module in modules:
                        if getattr(module, "config", None) is None:
                            continue
                        if module.config is config:
                            if id(module) not in local_configs:
                                local_configs[id(module)] = copy.copy(config)
                                edits.append((module, "config", local_configs[id(module)]))
                            edits.append((local_configs[id(module)], name, new))
                        else:
                            edits.append((module.config, name, new))
    hidden = [g for g in graph.groups(GroupKind.C) if g in checked]
    for group in hidden:
        after = group.size - checked[group].size
        if config is not None and not pinned_head_dim:
            pinned_head_dim = _pin_head_dim(config, edits)
        attention = _attention_scopes(model, graph)
        owned = _member_tensors(_tensors(model), group)
        for path, module in model.named_modules():
            if (path + ".").startswith(attention):
                continue  # there these names mean heads x head_dim (handled with the B groups)
            if _foreign(module, owned):
                continue  # weights, but none of these channels': its sizes are another structure's
            shape = getattr(module, "normalized_shape", None)
            if (not any(True for _ in module.parameters(recurse=False)) and isinstance(shape, tuple)
                    and shape == (group.size,)):
                edits.append((module, "normalized_shape", (after,)))  # a norm without weights
            for attr in HIDDEN_ATTRS:
                if attr in vars(module) and getattr(module, attr) == group.size:
                    edits.append((module, attr, after))
        if config is not None:
            for name in HIDDEN_CONFIG:
                if _safe_get(config, name) == group.size:
                    edits.append((config, name, after))
    edits.extend(_per_layer_edits(model, config, per_layer_updates, local_configs))
    return edits


# ---- heterogeneous configs (transformers' per_layer_config, e.g. Gemma-4's per-layer head_dim / KV heads) ----

def _per_layer_attributes(config) -> set[str]:
    """Attributes that vary per layer: reading them on the global config raises, they live in
    ``config.per_layer_config[i]``."""
    try:
        return set(getattr(config, "per_layer_attributes", None) or ())
    except Exception:
        return set()


def _layer_index(config, modules: list[tuple[str, nn.Module]]) -> int | None:
    """Decoder layer index of a group's scope: a module's ``layer_idx``, else the first index in its path."""
    n_layers = _safe_get(config, "num_hidden_layers")
    for _, module in modules:
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and not isinstance(idx, bool):
            return idx
    for path, _ in modules:
        for part in path.split("."):
            if part.isdigit() and (not isinstance(n_layers, int) or int(part) < n_layers):
                return int(part)
    return None


def _per_layer_update(updates: dict, config, group: Group, modules, name: str, after: int) -> None:
    """Stage ``name`` (a per-layer size) of the group's layer, scaled from ``group.size`` to ``after`` units."""
    spec = config.__dict__.get("_heterogeneity_spec")
    idx = _layer_index(config, modules)
    if spec is None or idx is None:
        raise PruneError(f"group {group.name}: {name} is a per-layer config attribute, but the layer of "
                         f"{group.name} is unknown, so the config cannot be updated; the model is unchanged")
    value = _safe_get(config.per_layer_config[idx], name)
    new = _scaled(value, group.size, after)
    if new is None:
        return
    _, layers = updates.setdefault(id(spec), (spec, {}))
    layers.setdefault(idx, {})[name] = new


def _per_layer_edits(model: nn.Module, config, updates: dict, local_configs: dict[int, object]) -> list[Edit]:
    """One new heterogeneity spec per staged spec, set on every config that shares it (the model's, the
    modules' own copies), so ``per_layer_config[i]`` states the cut sizes and rollback restores the old spec."""
    edits: list[Edit] = []
    holders = [config, *local_configs.values()]
    holders += [m.config for m in model.modules() if getattr(m, "config", None) is not None]
    for spec, layers in updates.values():
        new_spec = copy.deepcopy(spec)
        for idx, values in layers.items():
            new_spec.per_layer_overrides.setdefault(idx, {}).update(values)
            new_spec.per_layer_attributes.update(values)
        seen: set[int] = set()
        for holder in holders:
            if id(holder) not in seen and getattr(holder, "__dict__", {}).get("_heterogeneity_spec") is spec:
                seen.add(id(holder))
                edits.append((holder, "_heterogeneity_spec", new_spec))
    return edits


def _member_tensors(tensors: Mapping[str, torch.Tensor], group: Group) -> set[int]:
    """ids of the tensors ``group`` cuts (identity, so tied / shared weights count under any name)."""
    return {id(tensors[m.param]) for m in group.members if m.param in tensors}


def _foreign(module: nn.Module, owned: set[int]) -> bool:
    """``module`` has weights but none the group cuts: its sizes are not the group's (a Mamba mixer
    beside the block's MLP keeps its ``intermediate_size``)."""
    params = [id(p) for p in module.parameters()]
    return bool(params) and not any(p in owned for p in params)


def _scope_name(groups: Iterable[Group], group: Group) -> str:
    """Module path whose modules hold ``group``'s sizes: its name without the ``#k`` that tells
    same-prefix groups apart (MLA's heads share ``self_attn`` with the q/kv latents), when no other
    group of its kind shares that prefix. Latent groups always use the prefix: their rank fields
    are told apart by name (:func:`_rank_fields`)."""
    base = group.name.split("#", 1)[0]
    if base == group.name or group.kind is GroupKind.C:
        return group.name
    if group.extra.get("latent"):
        return base
    if group.kind is not GroupKind.B:
        return group.name
    same = [g for g in groups if g.kind is group.kind and g.name.split("#", 1)[0] == base]
    return base if len(same) == 1 else group.name


def _member_scope(modules: list[tuple[str, nn.Module]], group: Group) -> list[tuple[str, nn.Module]]:
    """The scope's modules without sub-structures that are not the group's: a submodule whose
    parameters are all outside the group (DeepSeek-V3.2's indexer inside ``self_attn``, with its
    own ``n_heads``) keeps its sizes. The scope root and parameter-free submodules (a core
    attention module holding the head count) stay."""
    if not modules:
        return modules
    root = modules[0][0]
    params = {m.param for m in group.members}
    kept = []
    for name, module in modules:
        prefix = name + "."
        if name != root and any(True for _ in module.parameters()) \
                and not any(p.startswith(prefix) for p in params):
            continue
        kept.append((name, module))
    return kept


def _rank_fields(group: Group, modules, scope_config, cut: bool) -> list[tuple[object, str]]:
    """``(owner, name)`` of the rank attributes giving a latent group's width (``kv_lora_rank``).

    Candidates are the scope's module attributes and config fields named like a rank
    (:func:`depgraph.layers.rank_stem`) whose value is the group's width. Several layers may
    share one value (q_lora_rank == kv_lora_rank), so a field must name one of the group's layers
    (``kv_lora_rank`` -> ``kv_a_proj``, ``kv_b_proj``); a generic ``lora_rank`` fits any. A cut
    that cannot tell which field it changes is refused rather than guessed.
    """
    owners = [module for _, module in modules] + ([scope_config] if scope_config is not None else [])
    found: list[tuple[object, str]] = []
    for owner in owners:
        for name in list(vars(owner)):
            # read through getattr: a heterogeneous config refuses per-layer fields (then the module's own
            # attribute is the one that counts)
            value = _safe_get(owner, name) if rank_stem(name) is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value == group.size:
                found.append((owner, name))
    leaves = {m.param.rsplit(".", 2)[-2] if m.param.count(".") else "" for m in group.members}
    names = {name for _, name in found if rank_names_layer(name, leaves)}
    if len(names) > 1 and cut:
        raise PruneError(f"group {group.name} is a latent rank of attention, but its width could be any of "
                         f"{', '.join(sorted(names))}; cannot tell which to update, so nothing was cut")
    return [(owner, name) for owner, name in found if name in names]


def _shared_kv_repeats(module: nn.Module, before: int, after: int) -> list[Edit]:
    """Multi-query attention repeats its one KV head for every query head (``num_key_value_groups``
    == ``num_heads``): when the units are query heads, the repeat count follows them. With several
    KV heads the repeat count is heads per KV head, which cutting whole KV groups leaves alone."""
    repeats = vars(module).get("num_key_value_groups")
    heads = next((vars(module)[a] for a in ("num_heads", "num_attention_heads") if a in vars(module)),
                 _safe_get(getattr(module, "config", None), "num_attention_heads"))
    if isinstance(repeats, int) and repeats == heads == before and after != before:
        return [(module, "num_key_value_groups", after)]
    return []


def _attention_scopes(model: nn.Module, graph) -> tuple[str, ...]:
    """Module paths (with a trailing dot) where hidden-size names mean heads x head_dim: for every
    parameter a head group cuts, the parent of a plain layer holding it (``self_attn`` for
    ``self_attn.q_proj.weight``), else the module holding it (a relative-position bias table).
    Per parameter, not the group's name: a head group coupled across layers (CpmAnt's shared
    position bias) is named after the whole model, whose norms still need the hidden cut."""
    modules = dict(model.named_modules())
    scopes: set[str] = set()
    for group in graph.groups(GroupKind.B):
        for m in group.members:
            owner = m.param.rsplit(".", 1)[0] if "." in m.param else ""
            module = modules.get(owner)
            if module is not None and any(isinstance(module, t) for t in LAYER_RULES) and owner:
                owner = owner.rsplit(".", 1)[0] if "." in owner else ""
            if owner:
                scopes.add(owner + ".")
    return tuple(sorted(scopes))


def _safe_get(obj, name: str):
    try:  # some configs raise more than AttributeError for per-layer attributes
        return getattr(obj, name, None)
    except Exception:
        return None


def _pin_head_dim(config, edits: list[Edit]) -> bool:
    """Keep ``head_dim`` explicit before head counts or hidden size change (it defaults to their ratio)."""
    heads = _safe_get(config, "num_attention_heads")
    hidden = _safe_get(config, "hidden_size")
    try:
        head_dim = getattr(config, "head_dim", None)
    except Exception:  # per-layer head_dim (Gemma-4): each layer's config already states it
        return True
    if head_dim is None and isinstance(heads, int) and isinstance(hidden, int) and heads:
        edits.append((config, "head_dim", hidden // heads))
    return True


def _output_tensor(out) -> torch.Tensor | None:
    """The main output of a forward: ``.logits``, ``last_hidden_state``, or the first tensor."""
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _forward(graph):
    args, kwargs = graph.example_inputs
    model = graph.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _output_tensor(model(*args, **kwargs))
    finally:
        model.train(was_training)


def _check_forward(graph) -> torch.Tensor | None:
    try:
        return _forward(graph)
    except Exception as exc:
        raise PruneError(f"the cut model no longer runs forward ({type(exc).__name__}: {str(exc)[:300]}); "
                         "the cut was rolled back and the model is unchanged") from exc


def _masked_reference(graph, checked: dict[Group, np.ndarray], tensors) -> torch.Tensor | None:
    """Output of the model with the plan's units zero-masked (restored afterwards).

    Only for plans of exact groups on real (non-meta) weights: then the cut model must
    reproduce it, which catches a module attribute the cut forgot or mis-scaled.
    """
    if not all(g.exact for g in checked):
        return None
    slices = [(tensors[m.param], m.dim, torch.as_tensor(m.indices(u), dtype=torch.long))
              for g, u in checked.items() for m in g.members if m.role == "in"]
    if not slices or any(t.device.type == "meta" for t, _, _ in slices):
        return None
    saved = [(t, d, i, t.data.index_select(d, i.to(t.device))) for t, d, i in slices]  # already a copy
    try:
        with torch.no_grad():
            for t, d, i, _ in saved:
                t.data.index_fill_(d, i.to(t.device), 0)
        try:
            return _forward(graph)
        except Exception:  # the model cannot run as traced: the forward check will say so
            return None
    finally:
        with torch.no_grad():
            for t, d, i, old in saved:
                t.data.index_copy_(d, i.to(t.device), old)


def _check_exact(out: torch.Tensor | None, reference: torch.Tensor, checked) -> None:
    if out is None or out.shape != reference.shape:
        raise PruneError("the cut model's output shape changed; the cut was rolled back")
    tol = 1e-4 if out.dtype == torch.float32 or out.dtype == torch.float64 else 2e-2
    diff = float((out.float() - reference.float()).abs().max())
    scale = float(reference.float().abs().max()) or 1.0
    if diff > tol * max(1.0, scale):
        names = ", ".join(g.name for g in checked)
        raise PruneError(f"cutting {names} does not reproduce zero-masking the same units (max |diff| "
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
