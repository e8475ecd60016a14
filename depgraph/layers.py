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
)
HEAD_CONFIG = ("num_attention_heads", "n_head", "num_heads", "n_heads", "num_key_value_heads",
               "num_kv_heads", "n_head_kv", "multi_query_group_num")
# MLP width
MLP_ATTRS = ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "ffn_hidden_size", "hidden_dim_ffn")
MLP_CONFIG = ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "ffn_hidden_size")
# residual width
HIDDEN_ATTRS = ("hidden_size", "embed_dim", "n_embd", "d_model", "model_dim", "hidden_dim", "dim_norm")
HIDDEN_CONFIG = ("hidden_size", "n_embd", "d_model", "word_embed_proj_dim", "dim")
