"""Size holders: which module attribute, config field or per-layer config holds each size, and how it changes.

One owner for the question "after this cut, what else must say the new size?". Weights are cut by
:mod:`depgraph.cut`; this module answers the rest, at trace time and at cut time alike:

- per layer type (a registry, ``@layer_rule(nn.Linear)``): the attributes a module's ``forward`` reads,
  re-derived from its (new) weight shapes (``in_features``, a norm's ``normalized_shape``);
- per group: the head counts, MLP widths and hidden sizes stored on the modules of the group's scope
  and in the model config (name vocabularies for what Hugging Face modules store: ``num_heads``,
  ``split_size``, ``intermediate_size`` ...), scaled in proportion to the units kept
  (:func:`group_edits`); per-layer sizes go to per-layer configs;
- at trace time, whether a length written in a module's code is one of those sizes, so a cut keeps it
  right (:func:`size_attribute`, :func:`head_count_updated`).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from .errors import PruneError
from .groups import Group, GroupKind

Edit = tuple[object, str, object]  # (object, attribute, new value)

LAYER_RULES: dict[type, Callable[[nn.Module], list[Edit]]] = {}


def layer_rule(*types: type):
    """Decorator: ``fn(module) -> edits`` re-derives a layer's size attributes from its weights."""

    def wrap(fn):
        for t in types:
            LAYER_RULES[t] = fn
        return fn

    return wrap


def shape_of(module: nn.Module, name: str, shapes: dict[str, tuple[int, ...]], prefix: str):
    key = f"{prefix}.{name}" if prefix else name
    if key in shapes:
        return shapes[key]
    tensor = getattr(module, name, None)
    return tuple(tensor.shape) if tensor is not None else None


@layer_rule(nn.Linear)
def _linear(module, shapes, prefix) -> list[Edit]:
    out, inp = shape_of(module, "weight", shapes, prefix)
    return [(module, "in_features", inp), (module, "out_features", out)]


@layer_rule(nn.Embedding)
def _embedding(module, shapes, prefix) -> list[Edit]:
    rows, cols = shape_of(module, "weight", shapes, prefix)
    return [(module, "num_embeddings", rows), (module, "embedding_dim", cols)]


@layer_rule(nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)
def _norm(module, shapes, prefix) -> list[Edit]:
    w = shape_of(module, "weight", shapes, prefix) or shape_of(module, "bias", shapes, prefix)
    if w is None or not hasattr(module, "normalized_shape"):
        return []
    return [(module, "normalized_shape", tuple(w))]


@layer_rule(nn.Conv1d)
def _torch_conv1d(module, shapes, prefix) -> list[Edit]:
    out, per_group, _ = shape_of(module, "weight", shapes, prefix)  # [out, in / groups, kernel]
    if module.groups == module.in_channels == module.out_channels:  # depthwise: one group per channel
        return [(module, "in_channels", out), (module, "out_channels", out), (module, "groups", out)]
    return [(module, "in_channels", per_group * module.groups), (module, "out_channels", out)]


def _conv1d_rule(module, shapes, prefix) -> list[Edit]:
    nx, nf = shape_of(module, "weight", shapes, prefix)  # Conv1D stores weight as [in, out]
    return [(module, "nx", nx), (module, "nf", nf)]


try:  # transformers' GPT-2 style Conv1D
    from transformers.pytorch_utils import Conv1D

    layer_rule(Conv1D)(_conv1d_rule)
except ImportError:  # pragma: no cover - transformers is a dependency
    pass


def generic_layer(module, shapes, prefix) -> list[Edit]:
    """Modules without a rule (e.g. a model's own RMSNorm): sizes named like a norm's."""
    edits = []
    weight = shape_of(module, "weight", shapes, prefix)
    if weight is not None and len(weight) == 1:
        for attr in ("hidden_size", "dim", "normalized_shape"):
            old = getattr(module, attr, None)
            if isinstance(old, int) and old != weight[0]:
                edits.append((module, attr, weight[0]))
            elif isinstance(old, tuple) and len(old) == 1 and old[0] != weight[0]:
                edits.append((module, attr, (weight[0],)))
    return edits


def layer_edits(module: nn.Module, shapes: dict[str, tuple[int, ...]], prefix: str) -> list[Edit]:
    for cls in type(module).__mro__:
        if cls in LAYER_RULES:
            return LAYER_RULES[cls](module, shapes, prefix)
    return generic_layer(module, shapes, prefix)


# ---- attribute vocabularies: quantities proportional to a group's number of units -------------

# attention: head counts and head-count x head_dim sizes scale with the number of KV groups
HEAD_ATTRS = (
    "num_heads", "num_attention_heads", "n_head", "n_heads", "num_q_heads", "num_key_value_heads",
    "num_kv_heads", "n_kv_heads", "n_head_kv", "num_attention_heads_per_partition", "split_size",
    "all_head_size", "inner_dim", "q_size", "kv_size", "num_heads_per_partition", "query_pos",
    "n_groups",  # a grouped output projection whose groups are whole heads (DeepSeek-V4's o_a_proj)
)
HEAD_CONFIG = ("num_attention_heads", "n_head", "num_heads", "n_heads", "num_key_value_heads",
               "num_kv_heads", "n_head_kv", "multi_query_group_num", "o_groups")
# MLP width
MLP_ATTRS = ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "ffn_hidden_size", "hidden_dim_ffn")
MLP_CONFIG = ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "ffn_hidden_size")
# residual width ("input_size": the hidden size as MoE blocks name it, e.g. GraniteMoe, JetMoe)
HIDDEN_ATTRS = ("hidden_size", "embed_dim", "n_embd", "d_model", "model_dim", "hidden_dim", "dim_norm",
                "input_size")
HIDDEN_CONFIG = ("hidden_size", "n_embd", "d_model", "word_embed_proj_dim", "dim")

# low-rank bottlenecks inside attention (multi-head latent attention): q_lora_rank, kv_lora_rank
RANK_SUFFIXES = ("_lora_rank", "_rank")


def rank_stem(name: str) -> str | None:
    """``"kv"`` for ``kv_lora_rank``, ``""`` for a generic ``lora_rank`` / ``rank``; None if not a rank."""
    if name in ("lora_rank", "rank"):
        return ""
    for suffix in RANK_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def rank_names_layer(name: str, leaves: set[str]) -> bool:
    """Does rank field ``name`` name one of the layers ``leaves`` (``kv_lora_rank`` ~ ``kv_a_proj`` or
    ``wkv_a``)? A generic ``lora_rank`` names any."""
    stem = rank_stem(name)
    if stem is None:
        return False
    if not stem:
        return True
    return any(leaf.split("_", 1)[0] in (stem, "w" + stem) for leaf in leaves)


def size_attribute(module: nn.Module, size: int, kind: str, latent: bool, leaves: set[str],
                   units: int = 1) -> str | None:
    """The attribute of ``module`` holding ``size`` that a cut of a ``kind`` group rescales, if any.

    A length written in the code (``split(x, [self.q_size, self.kv_size, ...])``) stays right after a
    cut only when the cut rescales the attribute it reads: MLP widths for A groups, rank fields naming
    one of the group's layers (``leaves``: ``kv_lora_rank`` ~ ``kv_a_proj``) for latent A groups, head
    sizes (``q_size``, ``all_head_size``) for B, the hidden size for C. A Mamba ``time_step_rank`` or a
    gated-delta-net ``key_dim`` is none of these. The name must hold the length itself: a product
    (``num_heads * head_dim``) could equal it by coincidence while the code reads ``key_dim``. The cut
    rescales a size in proportion to the group's ``units``, so it must be a multiple of them.
    """
    for name, value in vars(module).items():
        if isinstance(value, bool) or not isinstance(value, int) or value != size or value % max(units, 1):
            continue
        if kind == "A":
            ok = rank_names_layer(name, leaves) if latent else name in MLP_ATTRS
        elif kind == "B":
            ok = name in HEAD_ATTRS
        else:
            ok = name in HIDDEN_ATTRS
        if ok:
            return name
    return None


# ---- per-layer configs: a layer's own sizes over the model's live config ----

class LayerConfig:
    """The config of one layer after a non-uniform cut: ``overrides`` for the sizes this layer changed,
    every other field read live from ``base`` (the model's config).

    A copy of the config would go stale: a later hidden-size cut, ``head_dim`` pinned on the model's
    config, or ``model.set_attn_implementation("eager")`` would not reach it. Field names go through the
    base's ``attribute_map`` (GPT-2's ``hidden_size`` is ``n_embd``). Pickles, copies and deep-copies
    (with the model, the base stays the model's config); ``to_dict()`` is the base's with the overrides.
    """

    def __init__(self, base, overrides: Mapping[str, object] | None = None) -> None:
        vars(self)["base"] = base
        vars(self)["overrides"] = {}
        for name, value in (overrides or {}).items():
            setattr(self, name, value)

    def _key(self, name: str) -> str:
        mapping = getattr(type(vars(self)["base"]), "attribute_map", None) or {}
        return mapping.get(name, name)

    def __getattr__(self, name: str):  # only for names not found on the proxy itself
        state = vars(self)
        if "base" not in state or name.startswith("__"):  # mid-unpickling, or a dunder probe
            raise AttributeError(name)
        overrides = state["overrides"]
        key = self._key(name)
        if key in overrides:
            return overrides[key]
        return getattr(state["base"], name)

    def __setattr__(self, name: str, value) -> None:
        self.overrides[self._key(name)] = value

    def __delattr__(self, name: str) -> None:
        key = self._key(name)
        if key not in self.overrides:
            raise AttributeError(name)
        del self.overrides[key]

    def holds(self, name: str) -> bool:
        """Does this layer override ``name`` (else it reads the base's)?"""
        return self._key(name) in self.overrides

    def field_names(self) -> list[str]:
        """The base's fields and the overrides."""
        return list(dict.fromkeys([*vars(self.base), *self.overrides]))

    def to_dict(self) -> dict:
        out = self.base.to_dict()
        out.update(self.overrides)
        return out

    def __getstate__(self) -> dict:
        return {"base": self.base, "overrides": dict(self.overrides)}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(base=state["base"], overrides=dict(state["overrides"]))

    def __copy__(self) -> LayerConfig:
        return LayerConfig(self.base, self.overrides)

    def __repr__(self) -> str:
        return f"LayerConfig({self.overrides} over {type(self.base).__name__})"


def layer_config(config) -> LayerConfig:
    """A new per-layer config over ``config`` (a :class:`LayerConfig`: a copy of it, over the same base)."""
    return copy.copy(config) if isinstance(config, LayerConfig) else LayerConfig(config)


def field_names(obj) -> list[str]:
    """Attribute names an object (a module, a config, a :class:`LayerConfig`) holds itself."""
    return obj.field_names() if isinstance(obj, LayerConfig) else list(vars(obj))


# ---- size holders of a group: which module attribute / config field holds its size, and its scope ----


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    return tensors


def _scope_modules(model: nn.Module, scope: str) -> list[tuple[str, nn.Module]]:
    if not scope:
        return []
    return [(n, m) for n, m in model.named_modules() if n == scope or n.startswith(scope + ".")]


def scaled(value, before: int, after: int):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % before:
        return None
    return value // before * after


def module_edits(model: nn.Module, new_shapes: dict[str, tuple[int, ...]]) -> list[Edit]:
    """The layer-rule edits of every module holding a cut tensor, found by identity, not by name: a tied
    ``lm_head`` holds the embedding's weight, which ``named_parameters`` lists under the embedding only."""
    tensors = model_tensors(model)
    cut = {id(tensors[name]): shape for name, shape in new_shapes.items() if name in tensors}
    edits: list[Edit] = []
    for path, module in model.named_modules():
        local = {}
        for store in (module._parameters, module._buffers):
            for key, tensor in store.items():
                if tensor is not None and id(tensor) in cut:
                    local[f"{path}.{key}" if path else key] = cut[id(tensor)]
        if local:
            edits.extend(layer_edits(module, local, path))
    return edits


def group_edits(graph, checked: dict[Group, np.ndarray], guess_inner: bool = True) -> list[Edit]:
    """Head counts, MLP widths and hidden sizes stored on modules and in the config."""
    model = graph.model
    config = getattr(model, "config", None)
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
            modules = _scope_modules(model, scope_name(graph.groups(), group))
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
                owned = member_tensors(model_tensors(model), group)
                for _, module in modules:
                    if foreign(module, owned):
                        continue
                    for attr in attrs + (HIDDEN_ATTRS if kind is GroupKind.B and guess_inner else ()):
                        value = getattr(module, attr, None)
                        if attr in HIDDEN_ATTRS and attr not in attrs and value != inner:
                            continue
                        new = scaled(value, group.size, after)
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
                value = safe_get(scope_config, name) if scope_config is not None else None
                new = scaled(value, group.size, after)
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
                        if module.config is config:  # its own sizes over the live config (not a copy)
                            if id(module) not in local_configs:
                                local_configs[id(module)] = layer_config(config)
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
        owned = member_tensors(model_tensors(model), group)
        for path, module in model.named_modules():
            if (path + ".").startswith(attention):
                continue  # there these names mean heads x head_dim (handled with the B groups)
            if foreign(module, owned):
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
                if safe_get(config, name) == group.size:
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
    n_layers = safe_get(config, "num_hidden_layers")
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
    value = safe_get(config.per_layer_config[idx], name)
    new = scaled(value, group.size, after)
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


def member_tensors(tensors: Mapping[str, torch.Tensor], group: Group) -> set[int]:
    """ids of the tensors ``group`` cuts (identity, so tied / shared weights count under any name)."""
    return {id(tensors[m.param]) for m in group.members if m.param in tensors}


def foreign(module: nn.Module, owned: set[int]) -> bool:
    """``module`` has weights but none the group cuts: its sizes are not the group's (a Mamba mixer
    beside the block's MLP keeps its ``intermediate_size``)."""
    params = [id(p) for p in module.parameters()]
    return bool(params) and not any(p in owned for p in params)


def scope_name(groups: Iterable[Group], group: Group) -> str:
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
    (:func:`rank_stem`) whose value is the group's width. Several layers may
    share one value (q_lora_rank == kv_lora_rank), so a field must name one of the group's layers
    (``kv_lora_rank`` -> ``kv_a_proj``, ``kv_b_proj``); a generic ``lora_rank`` fits any. A cut
    that cannot tell which field it changes is refused rather than guessed.
    """
    owners = [module for _, module in modules] + ([scope_config] if scope_config is not None else [])
    found: list[tuple[object, str]] = []
    for owner in owners:
        for name in field_names(owner):
            # read through getattr: a heterogeneous config refuses per-layer fields (then the module's own
            # attribute is the one that counts)
            value = safe_get(owner, name) if rank_stem(name) is not None else None
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
                 safe_get(getattr(module, "config", None), "num_attention_heads"))
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


def safe_get(obj, name: str):
    try:  # some configs raise more than AttributeError for per-layer attributes
        return getattr(obj, name, None)
    except Exception:
        return None


def _pin_head_dim(config, edits: list[Edit]) -> bool:
    """Keep ``head_dim`` explicit before head counts or hidden size change (it defaults to their ratio)."""
    heads = safe_get(config, "num_attention_heads")
    hidden = safe_get(config, "hidden_size")
    try:
        head_dim = getattr(config, "head_dim", None)
    except Exception:  # per-layer head_dim (Gemma-4): each layer's config already states it
        return True
    if head_dim is None and isinstance(heads, int) and isinstance(hidden, int) and heads:
        edits.append((config, "head_dim", hidden // heads))
    return True


def head_count_updated(module: nn.Module, path: str, size: int, group: Group, groups: list[Group],
                       tensors: Mapping[str, torch.Tensor]) -> bool:
    """Does a head cut of ``group`` rescale the head count ``size`` that ``module``'s code (at ``path``) reads?

    The same holders :func:`group_edits` updates: head-size attributes (``HEAD_ATTRS``) of the modules in
    the group's scope that are not another structure's, and head-count fields of the config (``HEAD_CONFIG``)."""
    scope = scope_name(groups, group)
    if not scope or not (path == scope or path.startswith(scope + ".")):
        return False
    if foreign(module, member_tensors(tensors, group)):
        return False  # the cut leaves this module's sizes alone
    if size_attribute(module, size, "B", False, set(), group.size) is not None:
        return True
    config = getattr(module, "config", None)
    values = (safe_get(config, name) for name in HEAD_CONFIG)
    # scaled: a positive int (not a bool) that the cut can rescale in proportion to the units
    return any(value == size and scaled(value, group.size, 1) is not None for value in values)


# ---- RMSNorm over hidden channels: a cut keeps the statistic of zero-masking ----

RMS_EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")


def rms_norm_eps(module: nn.Module) -> str | None:
    """The attribute holding ``eps`` if ``module`` computes ``x * rsqrt(mean(x**2) + eps) * weight`` over its
    last dim (checked on a probe input, not by class name: Gemma's ``1 + weight`` is not it); else None."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    name = next((a for a in RMS_EPS_ATTRS if isinstance(vars(module).get(a), float)), None)
    if name is None:
        return None
    gen = torch.Generator().manual_seed(0)
    if weight.device.type == "meta":  # shapes only: probe the formula on a copy holding stand-in values
        module = copy.deepcopy(module).to_empty(device="cpu")
        with torch.no_grad():
            module.weight.copy_(torch.rand(weight.shape, generator=gen) + 0.5)
        weight = module.weight
    x = torch.randn(3, weight.numel(), generator=gen, dtype=torch.float32)
    try:
        with torch.no_grad():
            out = module(x.to(device=weight.device, dtype=weight.dtype)).float().cpu()
    except Exception:  # a norm that needs more than a tensor: not the plain kind
        return None
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + getattr(module, name)) * weight.detach().float().cpu()
    return name if out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-3, atol=1e-5) else None


def rms_norm_edits(model: nn.Module, group: Group, after: int) -> tuple[dict[int, float], list[Edit]]:
    """For a C cut of ``group`` down to ``after`` channels: ``({id(norm weight): factor}, eps edits)``.

    An RMSNorm over ``d`` channels of which ``d - d'`` are zero-masked averages over ``d``; the cut one over
    ``d'``. Weight x sqrt(d/d') and eps x d/d' make them equal. ``config.rms_norm_eps`` follows when every
    module holding that eps is one of the rescaled norms (else the modules' own attributes state it)."""
    paths = group.extra.get("rms_norms")
    if not paths or after >= group.size:
        return {}, []
    ratio = group.size / after
    modules = dict(model.named_modules())
    scales: dict[int, float] = {}
    edits: list[Edit] = []
    for path in paths:
        module = modules[path]
        name = rms_norm_eps(module) or next(a for a in RMS_EPS_ATTRS if isinstance(vars(module).get(a), float))
        scales[id(module.weight)] = ratio ** 0.5
        edits.append((module, name, getattr(module, name) * ratio))
    config = getattr(model, "config", None)
    eps = safe_get(config, "rms_norm_eps")
    if isinstance(eps, float):
        holders = [m for m in model.modules() if any(vars(m).get(a) == eps for a in RMS_EPS_ATTRS)]
        if all(any(m is modules[p] for p in paths) for m in holders):
            edits.append((config, "rms_norm_eps", eps * ratio))
    return scales, edits
