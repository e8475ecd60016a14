"""Per-layer bookkeeping after a cut: the attributes a module's ``forward`` reads.

Weights are cut by :mod:`depgraph.cut`; this module says what else must change so the
module still runs: ``nn.Linear.in_features``, a LayerNorm's ``normalized_shape``, an
attention module's head counts, the model config. One small handler per layer type,
in a registry (``@layer_rule(nn.Linear)``), plus name vocabularies for the attributes
Hugging Face modules store (``num_heads``, ``split_size``, ``intermediate_size`` ...).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

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
