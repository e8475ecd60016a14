"""Architecture coverage: build a tiny random model of every Hugging Face causal LM and run depgraph on it.

Usage::

    python benchmarks/coverage.py [--sample | --only NAME ...] [--jobs 2] [--timeout 120]
                                  [--out docs/coverage.md] [--json PATH] [--isolation fork|spawn]

For each architecture of ``transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (plus
``bert`` as a BERT-style encoder, ``BertForMaskedLM`` from ``MODEL_FOR_MASKED_LM_MAPPING_NAMES``) a tiny
config is derived generically from the config class: every size field that exists is shrunk (hidden 64,
intermediate 128, 2 layers, 4 heads, 2 KV heads, head_dim 16, vocab 1000 with special token ids kept in
range, 128 positions, MoE 4 experts / 2 per token / expert width 32, per-layer lists such as
``layer_types`` trimmed to 2 layers keeping distinct layer kinds). Out of scope and recorded as skipped:
multimodal / composite configs (vision, audio, ... sub-configs), encoder-decoder halves, pure SSM/RNN
models, and configs or models that fail to build (first line of the exception, after retrying with KV heads =
heads, with every layer of the attention-keeping kind, with None-default sizes set, and with the class default
of an override the config's validator rejects; flagged as a transformers bug when the config's own defaults
fail with the same error).

Every built model then goes through, in its own child process with a timeout (a hang is a
``timeout`` cell, never a blocked run):

a. ``depgraph.trace`` (timed); b. group counts per kind; c. cut == zero-mask: one drawn A group and one
drawn B group (fixed seed, ~25% of their units), ``max |logits(cut) - logits(masked original)| <= 1e-4``;
d. one plan cutting ~25% of every group (A, B and C) on a fresh copy, then a forward pass (finite logits,
fewer parameters); e. ``save_pretrained`` / ``load_pretrained`` of that pruned model gives the same logits.

Output: a markdown table (also written to ``--out``), JSON (``--json``), failures grouped by cause, and the
summary line ``N/M architectures fully pass (x%)`` where M counts the architectures that were built.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()

SAMPLE = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "opt", "phi3", "phi", "gemma", "gemma2", "gpt_neox",
          "falcon", "starcoder2", "olmo", "stablelm", "bert"]
CORE = ["llama", "mistral", "qwen2", "gpt2", "opt", "phi3", "bert"]  # must fully pass (issue 11's CI sample)

TOL_CUT = 1e-4
TOL_RELOAD = 1e-6
UNIT_FRACTION = 0.25
SEED = 0

# ---- the generic tiny config ----------------------------------------------------------------------------

HIDDEN, INTER, LAYERS, HEADS, KV, HEAD_DIM, VOCAB, POSITIONS = 64, 128, 2, 4, 2, 16, 1000, 128
DEPTH_FIELDS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "encoder_layers",
                "num_decoder_layers", "num_encoder_layers")
SIZES: dict[str, int] = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "n_embed", "embed_dim", "model_dim", "emb_dim",
                     "word_embed_proj_dim", "embedding_size", "input_embedding_size", "lru_width",
                     "cross_attention_hidden_size", "attention_hidden_size", "hidden_size_per_layer_input"),
                    HIDDEN),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "d_ff", "ffn_hidden_size", "decoder_ffn_dim",
                     "encoder_ffn_dim", "d_inner", "dim_ff", "dff", "feed_forward_size", "intermediate_size_mlp",
                     "dense_intermediate_size", "prefix_dense_intermediate_size"), INTER),
    **dict.fromkeys(DEPTH_FIELDS, LAYERS),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads",
                     "encoder_attention_heads", "attention_heads", "num_encoder_attention_heads",
                     "num_decoder_attention_heads", "swa_num_attention_heads"), HEADS),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "n_head_kv", "n_kv_heads", "multi_query_group_num",
                     "swa_num_key_value_heads", "kv_n_heads"), KV),
    **dict.fromkeys(("head_dim", "d_head", "dim_head", "kv_channels", "attention_head_size", "attention_head_dim",
                     "swa_head_dim", "d_kv", "linear_key_head_dim", "linear_value_head_dim", "index_head_dim",
                     "linear_head_dim", "mamba_d_head", "mamba_head_dim"), HEAD_DIM),
    # multi-head latent attention (DeepSeek-V2/V3 style)
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "qk_head_dim": 24, "kv_lora_rank": 32,
    "q_lora_rank": 32, "rotary_dim": 8,
    **dict.fromkeys(("vocab_size", "padded_vocab_size", "unpadded_vocab_size"), VOCAB),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "context_length",
                     "max_target_positions"), POSITIONS),
    # mixture of experts
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k_experts",
                     "moe_top_k", "n_activated_experts"), 2),
    **dict.fromkeys(("moe_intermediate_size", "expert_ffn_hidden_size", "shared_expert_intermediate_size",
                     "moe_shared_expert_intermediate_size", "shared_experts_intermediate_size",
                     "shared_intermediate_size"), 32),
    "zero_expert_num": 2,  # LongCat-Flash's identity ("zero") experts, routed beside the real ones
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "moe_num_shared_experts", "n_group", "topk_group",
                     "first_k_dense_replace", "decoder_sparse_step"), 1),
    # linear-attention / indexer heads of hybrid models
    **dict.fromkeys(("linear_num_key_heads", "index_n_heads", "indexer_n_heads", "linear_num_heads"), 2),
    "linear_num_value_heads": 4,
    # Qwen4-Exp's QSA token indexer (one key head; the budget a multiple of the compression ratio)
    "indexer_kv_heads": 1, "indexer_head_dim": HEAD_DIM, "indexer_budget": 4, "indexer_compress_ratio": 2,
    # Mamba mixers of hybrid models: heads x head_dim must equal expand x hidden (2 x 64)
    "mamba_n_heads": 8, "mamba_num_heads": 8, "mamba_expand": 2, "mamba_d_ssm": 128,
}
# fields set to a fixed value whenever they exist
FORCE: dict[str, Any] = {"num_kv_shared_layers": 0, "mlp_only_layers": [], "axial_pos_embds_dim": [32, 32]}
# set even when the class default is None (a None default means "derived from the others")
SET_IF_NONE = {"num_key_value_heads", "num_kv_heads", "n_head_kv", "n_kv_heads", "head_dim", "n_inner"}
# MoE sizes: set even when None as soon as the config is a MoE (it has some non-empty MoE field)
MOE_FIELDS = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok",
              "num_experts_per_token", "moe_topk", "moe_k", "top_k_experts", "moe_top_k", "n_activated_experts",
              "moe_intermediate_size", "expert_ffn_hidden_size", "n_shared_experts", "num_shared_experts",
              "moe_num_shared_experts", "shared_expert_intermediate_size", "moe_shared_expert_intermediate_size"}
KV_FIELDS = {k for k, v in SIZES.items() if v == KV and "head" in k}
MULTIMODAL = re.compile(r"vision|audio|speech|image|visual|video|vq|patcher|encoder|decoder|depth", re.I)
PURE_SSM = {"mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm"}
SSM_FIELDS = ("state_size", "ssm_state_size", "d_state", "mamba_d_state", "conv_kernel", "time_step_rank")
# a field equal to its partner in the class defaults keeps following it (LongCat-Flash's rotary embedding is
# sized by ``head_dim``, which its MLA attention applies to the ``qk_rope_head_dim`` slice)
TIED: dict[str, str] = {"head_dim": "qk_rope_head_dim"}
HEAD_FIELDS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads",
               "decoder_attention_heads")
LAYER_INDEX_LIST = re.compile(r"(idx|indices|index|ids|layers)$")


@dataclasses.dataclass
class Entry:
    """One architecture to test: registry name, config class, model class name."""

    name: str
    arch: str
    model_class: str
    mapping: str  # "causal" or "masked"


def registry(names: list[str] | None = None) -> list[Entry]:
    """The architectures of the causal-LM mapping (plus ``bert`` as a masked-LM encoder)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    entries = [Entry("bert", "bert", MODEL_FOR_MASKED_LM_MAPPING_NAMES["bert"], "masked")]
    for arch, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        name = f"{arch}:causal" if arch == "bert" else arch
        entries.append(Entry(name, arch, cls, "causal"))
    entries.sort(key=lambda e: e.name)
    if names is not None:
        by_name = {e.name: e for e in entries}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise SystemExit(f"unknown architecture(s) {missing}; see MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
        entries = [by_name[n] for n in names]
    return entries


def _defaults(config_cls) -> dict[str, Any]:
    """Declared defaults of a config class (dataclass fields), else a default instance's attributes."""
    try:
        out = {}
        for f in dataclasses.fields(config_cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
            else:
                out[f.name] = None
        return out
    except TypeError:
        return dict(vars(config_cls()))


def _trim_per_layer(values: list, n: int) -> list:
    """Keep ``n`` entries of a per-layer list, preferring distinct kinds (first occurrence order)."""
    picked: list[int] = []
    for i, v in enumerate(values):
        if all(values[j] != v for j in picked):
            picked.append(i)
        if len(picked) == n:
            break
    for i in range(len(values)):
        if len(picked) == n:
            break
        if i not in picked:
            picked.append(i)
    return [values[i] for i in sorted(picked)]


def _keep_attention(defaults: dict[str, Any], out: dict[str, Any],
                    instance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hybrid (attention + SSM / recurrent) configs: make the tiny depth keep an attention layer.

    Four generic spellings: a ``*_period`` / ``*_offset`` pair placing attention beyond the tiny depth
    (Jamba's ``attn_layer_offset=4``), an attention layer-index list left to None (Bamba's
    ``attn_layer_indices``: no attention at all), a repeating pattern of block kinds whose first
    layers are all recurrent (RecurrentGemma's ``block_types``), and a transformers ``layer_types`` list
    derived (default None) as all ``linear_attention`` layers (GraniteMoeHybrid, whose config holds attention heads):
    its last layer becomes ``full_attention``, transformers' name for an attention layer."""
    extra: dict[str, Any] = {}
    kinds = (instance or {}).get("layer_types")
    if ("layer_types" in defaults and defaults["layer_types"] is None and "layer_types" not in out
            and isinstance(kinds, (list, tuple)) and kinds and all(isinstance(v, str) for v in kinds)
            and all("linear" in v for v in kinds) and any(k in defaults for k in HEAD_FIELDS)):
        extra["layer_types"] = [kinds[0]] * (LAYERS - 1) + ["full_attention"]
    for name, value in defaults.items():
        if name in out or isinstance(value, bool):
            continue
        if name.endswith("_offset") and isinstance(value, int) and value >= LAYERS:
            period = name[: -len("offset")] + "period"
            if isinstance(defaults.get(period), int) and not isinstance(defaults.get(period), bool):
                extra[name], extra[period] = LAYERS - 1, LAYERS
        elif value is None and "att" in name and LAYER_INDEX_LIST.search(name):
            extra[name] = [LAYERS - 1]
        elif (isinstance(value, (list, tuple)) and len(value) > LAYERS and all(isinstance(v, str) for v in value)
              and any("att" in v for v in value) and not any("att" in v for v in value[:LAYERS])):
            extra[name] = type(value)(_trim_per_layer(list(value), LAYERS))
    return extra


def tiny_overrides(config_cls, fill_none: bool = False) -> dict[str, Any]:
    """Keyword overrides that make ``config_cls`` tiny (only fields the class has).

    ``fill_none``: also set the size fields whose default is None (a None default usually means "derived"
    or "feature off"; Qwen4-Exp's default layers nevertheless need its None-default QSA indexer sizes)."""
    defaults = _defaults(config_cls)
    is_moe = any(defaults.get(k) for k in MOE_FIELDS)
    out: dict[str, Any] = {}
    for name, value in defaults.items():
        if name not in SIZES:
            continue
        if isinstance(value, bool):
            continue
        if (value is None and not fill_none and name not in SET_IF_NONE
                and not (is_moe and name in MOE_FIELDS)):
            continue
        if isinstance(value, int) and value == 0:
            continue  # a disabled feature (0 experts, no shared expert): keep it disabled
        out[name] = SIZES[name]
    n_layers = next((defaults[k] for k in ("num_hidden_layers", "n_layer", "n_layers", "num_layers",
                                           "decoder_layers") if isinstance(defaults.get(k), int)), None)
    # explicit per-layer lists are trimmed; derived ones (default None) are re-derived from the new depth,
    # unless they mix layer kinds (hybrids): then 2 layers of different kinds are asked for explicitly
    try:
        instance = vars(config_cls())
    except Exception:  # noqa: BLE001 - some configs cannot be built with their defaults
        instance = {}
    for name, value in instance.items():
        if (defaults.get(name) is None and isinstance(value, (list, tuple)) and n_layers
                and len(value) == n_layers and len({str(v) for v in value}) > 1 and name not in out):
            out[name] = type(value)(_trim_per_layer(list(value), LAYERS))
    for name, value in defaults.items():
        if not isinstance(value, (list, tuple)) or not value or name in out:
            continue
        if n_layers and len(value) == n_layers and n_layers > LAYERS:
            out[name] = type(value)(_trim_per_layer(list(value), LAYERS))
        elif (LAYER_INDEX_LIST.search(name) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
              and "token" not in name):
            kept = [v for v in value if v < LAYERS]
            out[name] = type(value)(kept or [LAYERS - 1])
    out.update(_keep_attention(defaults, out, instance))
    for name, partner in TIED.items():
        if (name in out and partner in out and isinstance(defaults.get(name), int)
                and defaults.get(name) == defaults.get(partner)):
            out[name] = out[partner]
    # special token ids must index the small vocabulary
    vocab = out.get("vocab_size", defaults.get("vocab_size"))
    if isinstance(vocab, int):
        for name, value in defaults.items():
            if not (name.endswith("_token_id") or name.endswith("_token_ids") or name.endswith("_token_index")):
                continue
            if isinstance(value, int) and not isinstance(value, bool) and value >= vocab:
                out[name] = value % vocab
            elif isinstance(value, (list, tuple)) and any(isinstance(v, int) and v >= vocab for v in value):
                out[name] = type(value)(v % vocab if isinstance(v, int) else v for v in value)
    return out


def skip_reason(entry: Entry) -> str | None:
    """Why ``entry`` is out of scope (multimodal, encoder-decoder half, pure SSM/RNN), or None."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config_cls = CONFIG_MAPPING[entry.arch]
    except Exception as exc:  # noqa: BLE001
        return f"build failed: no config class ({type(exc).__name__}: {_first_line(exc)})"
    subs = dict(getattr(config_cls, "sub_configs", {}) or {})
    mm = [k for k in subs if MULTIMODAL.search(k)]
    if mm:
        return f"multimodal/composite config (sub-configs: {', '.join(subs)})"
    generic = [k for k, v in subs.items() if getattr(v, "__name__", "") == "AutoConfig"]
    if generic:
        return f"composite config (generic AutoConfig sub-config: {', '.join(generic)})"
    if entry.arch in PURE_SSM:
        return "pure SSM/RNN (no attention)"
    defaults = _defaults(config_cls)
    if defaults.get("is_encoder_decoder"):
        return "encoder-decoder half (config is_encoder_decoder=True)"
    if not any(k in defaults for k in HEAD_FIELDS) and any(k in defaults for k in SSM_FIELDS):
        return "pure SSM/RNN (no attention heads in the config)"
    return None


def _one_kind(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Per-layer lists of layer kinds with every layer of the last (attention-keeping) kind."""
    return {k: type(v)([v[-1]] * len(v)) if (isinstance(v, (list, tuple)) and len(v) == LAYERS
                                             and all(isinstance(x, str) for x in v) and len(set(v)) > 1) else v
            for k, v in kwargs.items()}


def _construct(config_cls, kwargs: dict[str, Any], revert: bool = False):
    """``config_cls(**kwargs)``; with ``revert``, an override that a validator rejects by name falls back to
    the class default.

    E.g. ZAYA's validator accepts ``num_experts_per_tok=1`` only. Depth fields are never reverted (the
    per-layer lists follow the tiny depth); the first error is raised when no reverting helps."""
    kwargs = dict(kwargs)
    first: Exception | None = None
    for _ in range(4):
        try:
            return config_cls(**kwargs)
        except Exception as exc:  # noqa: BLE001
            first = first or exc
            if not revert:
                break
            named = [k for k in kwargs if k in SIZES and k not in DEPTH_FIELDS
                     and re.search(rf"(?<![\w.]){re.escape(k)}(?!\w)", str(exc))]
            if not named:
                break
            for k in named:
                kwargs.pop(k)
    assert first is not None
    raise first


def build_config(entry: Entry, mha: bool = False, one_kind: bool = False, fill_none: bool = False,
                 revert: bool = False):
    """The tiny config of ``entry`` (sub-configs such as DBRX's ``attn_config`` shrunk too).

    ``mha``: KV heads = query heads (for models whose attention needs it, e.g. multi-head latent attention).
    ``one_kind``: every layer of the attention-keeping kind, for hybrids that share one block across all
    layers of that kind and need two of them (Zamba ties its ``shared_transf`` into the other hybrid layers).
    ``fill_none``: size fields with a None default set too (see ``tiny_overrides``).
    ``revert``: an override the config's validator rejects by name falls back to the class default.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    def shrink(cls) -> dict[str, Any]:
        kwargs = tiny_overrides(cls, fill_none)
        if mha:
            kwargs.update({k: HEADS for k in kwargs if k in KV_FIELDS})
        return _one_kind(kwargs) if one_kind else kwargs

    config_cls = CONFIG_MAPPING[entry.arch]
    kwargs = shrink(config_cls)
    defaults = _defaults(config_cls)
    if entry.mapping == "causal" and "is_decoder" in defaults:
        kwargs["is_decoder"] = True  # encoder families used as causal LMs (what HF asks for)
    for name, value in FORCE.items():
        if name in defaults:
            kwargs[name] = value
    for key, sub_cls in (getattr(config_cls, "sub_configs", {}) or {}).items():
        if isinstance(sub_cls, type):
            kwargs[key] = shrink(sub_cls)  # a dict: the parent config builds (and completes) the sub-config
    return _construct(config_cls, kwargs, revert)


def build_model(entry: Entry, mha: bool = False, one_kind: bool = False, fill_none: bool = False,
                revert: bool = False):
    """A seeded, eval-mode tiny random model of ``entry``."""
    import torch
    import transformers

    config = build_config(entry, mha, one_kind, fill_none, revert)
    model_cls = getattr(transformers, entry.model_class)
    torch.manual_seed(SEED)
    model = model_cls(config).eval()
    if hasattr(model, "set_default_language"):  # X-MOD: adapters are per language
        languages = list(getattr(config, "languages", None) or [])
        language = getattr(config, "default_language", None) or (languages[0] if languages else None)
        if language:
            model.set_default_language(language)
    return model


def build_runnable(entry: Entry, ids_shape: tuple[int, int] = (2, 8)):
    """The tiny model, its eval ids and logits; retried with KV heads = heads when the GQA build fails, then
    with every layer of the attention-keeping kind, then with the None-default size fields set, then with the
    class default of any override the config's validator rejects by name (see ``build_config``).

    Returns ``(model, ids, logits, variant)``; raises the first attempt's error when no variant runs.
    """
    import torch

    first: Exception | None = None
    variants = {"gqa": {}, "mha": {"mha": True}, "one-kind": {"one_kind": True}, "fill-none": {"fill_none": True},
                "revert": {"revert": True}}
    for variant, flags in variants.items():
        try:
            model = build_model(entry, **flags)
            gen = torch.Generator().manual_seed(SEED)
            vocab = vocab_of(model)
            ids = torch.randint(3, max(vocab, 4), ids_shape, generator=gen)
            return model, ids, logits_of(model, ids), variant
        except Exception as exc:  # noqa: BLE001 - try the next variant, report the first error
            first = first or exc
    assert first is not None
    raise first


def defaults_fail_alike(entry: Entry, exc: BaseException) -> bool:
    """Whether the config's own defaults fail to build the model with the same error as the tiny build (a
    transformers bug, not our derivation); built on the meta device, so default sizes cost nothing."""
    import torch
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config = CONFIG_MAPPING[entry.arch]()
        with torch.device("meta"):
            getattr(transformers, entry.model_class)(config)
    except Exception as default_exc:  # noqa: BLE001
        return _error(default_exc) == _error(exc)
    return False


# ---- the checks (child side) ---------------------------------------------------------------------------

def _first_line(exc: BaseException) -> str:
    """The exception's first line (plus the next one when the first only introduces it)."""
    text = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not text:
        return type(exc).__name__
    line = text[0] + (f" {text[1]}" if text[0].endswith(":") and len(text) > 1 else "")
    return line[:300]


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_first_line(exc)}"


def vocab_of(model) -> int:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "vocab_size", None) or VOCAB)


def logits_of(model, ids):
    """fp32 logits of ``model`` on ``ids`` (no cache, no grad)."""
    import torch

    kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    with torch.no_grad():
        out = model(input_ids=ids, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float()


def draw_units(rng, size: int, fraction: float = UNIT_FRACTION) -> list[int]:
    """About ``fraction`` of ``size`` units (at least 1, never all), drawn with ``rng``."""
    n = min(max(1, int(round(size * fraction))), size - 1)
    return sorted(rng.choice(size, size=n, replace=False).tolist()) if n > 0 else []


def check_cut_equals_mask(model, graph, group, units: list[int], ids) -> float:
    """Cut ``units`` of ``group`` and return max |logits(cut) - logits(zero-masked original)|."""
    import torch

    import depgraph

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    depgraph.zero_mask(graph, {group: units})
    masked = logits_of(model, ids)
    with torch.no_grad():  # undo the mask: the cut starts from the original weights
        for key, tensor in model.state_dict().items():
            tensor.copy_(state[key])
    graph.prune({group: units})
    cut = logits_of(model, ids)
    if cut.shape != masked.shape:
        raise AssertionError(f"logits shape {tuple(cut.shape)} != {tuple(masked.shape)}")
    return float((cut - masked).abs().max())


class Stage:
    """Records the stage a child is in (a file the parent reads when it has to kill the child)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.name = "start"

    def __call__(self, name: str) -> None:
        self.name = name
        if self.path is not None:
            self.path.write_text(name)


def run_entry(entry: Entry, stage: Stage | None = None, workdir: Path | None = None) -> dict[str, Any]:
    """Build ``entry`` and run checks a-e; returns a JSON-able record (never raises)."""
    stage = stage or Stage(None)
    rec: dict[str, Any] = {"name": entry.name, "arch": entry.arch, "model_class": entry.model_class,
                           "status": "fail", "reason": ""}
    t_start = time.perf_counter()
    try:
        import numpy as np
        import torch

        import depgraph

        stage("build")
        try:
            model, ids, base, rec["variant"] = build_runnable(entry)
        except Exception as exc:  # noqa: BLE001 - any build failure is a recorded skip
            bug = " (the config's own defaults fail alike: a transformers bug)" if defaults_fail_alike(entry, exc) \
                else ""
            rec.update(status="skip", reason=f"build failed{bug}: {_error(exc)}")
            return rec
        rec["params"] = sum(p.numel() for p in model.parameters())
        pristine = copy.deepcopy(model)

        failures: list[str] = []
        # a. trace
        stage("trace")
        t0 = time.perf_counter()
        try:
            graph = depgraph.trace(model)
        except Exception as exc:  # noqa: BLE001
            rec.update(trace="fail", reason=f"trace: {_error(exc)}")
            return rec
        rec["trace"] = "ok"
        rec["trace_s"] = time.perf_counter() - t0
        # b. groups
        rec["groups"] = {k: len(graph.groups(k)) for k in "ABC"}
        rec["warnings"] = list(graph.warnings)
        rec["unknown_ops"] = sorted({op for op, _ in graph.unknown_ops})
        frozen = sorted({why for why in graph.frozen.values()})
        rec["frozen_reasons"] = frozen[:8]
        for kind in "AB":
            if not rec["groups"][kind]:
                failures.append(f"groups: no {kind} group"
                                + (f" (unknown ops: {', '.join(rec['unknown_ops'][:4])})" if rec["unknown_ops"]
                                   else ""))
        # c. cut == zero-mask on one drawn A and one drawn B group
        stage("cut==mask")
        rng = np.random.default_rng(SEED)
        rec["cut_vs_mask"] = {}
        for kind in "AB":
            groups = [g for g in graph.groups(kind) if g.size >= 2]
            if not groups:
                rec["cut_vs_mask"][kind] = None
                continue
            group = groups[int(rng.integers(len(groups)))]
            units = draw_units(rng, group.size)
            try:
                delta = check_cut_equals_mask(model, graph, group, units, ids)
            except Exception as exc:  # noqa: BLE001
                rec["cut_vs_mask"][kind] = {"group": group.name, "units": len(units), "error": _error(exc)}
                failures.append(f"cut==mask {kind} ({group.name}): {_error(exc)}")
                continue
            ok = math.isfinite(delta) and delta <= TOL_CUT
            rec["cut_vs_mask"][kind] = {"group": group.name, "size": group.size, "units": len(units),
                                        "max_abs_diff": delta, "pass": ok, "exact": group.exact}
            if not group.exact:
                # the graph says so itself: a norm or mean reduces over these units (e.g. OLMo-2's
                # q/k norm over all heads), so the cut is approximate by design, like hidden channels
                rec["cut_vs_mask"][kind]["pass"] = math.isfinite(delta)
                continue
            if not ok:
                failures.append(f"cut==mask {kind} ({group.name}, {len(units)}/{group.size} units): "
                                f"max |dlogits| = {delta:.3g} > {TOL_CUT:g}")
        # d. prune ~25% of every group in one plan, on a fresh copy
        stage("prune")
        model = pristine
        pruned = False
        try:
            graph = depgraph.trace(model)
            plan = {g: draw_units(rng, g.size) for g in graph.groups() if g.size >= 2}
            report = graph.prune(plan)
            out = logits_of(model, ids)
            if not torch.isfinite(out).all():
                raise AssertionError("non-finite logits after the cut")
            if out.shape != base.shape:
                raise AssertionError(f"logits shape {tuple(out.shape)} != {tuple(base.shape)}")
            if report.params_after >= report.params_before:
                raise AssertionError(f"parameters did not decrease ({report.params_before} -> "
                                     f"{report.params_after})")
            rec["prune"] = {"pass": True, "groups_cut": len(plan), "params_before": report.params_before,
                            "params_after": report.params_after}
            pruned = True
        except Exception as exc:  # noqa: BLE001
            rec["prune"] = {"pass": False, "error": _error(exc)}
            failures.append(f"prune+forward: {_error(exc)}")
        # e. save / load round trip (of the pruned model when the cut worked)
        stage("reload")
        tmp = Path(tempfile.mkdtemp(prefix=f"{entry.name.replace(':', '_')}-", dir=workdir))
        try:
            depgraph.save_pretrained(model, tmp)
            loaded = depgraph.load_pretrained(tmp)
            delta = float((logits_of(loaded, ids) - logits_of(model, ids)).abs().max())
            ok = delta <= TOL_RELOAD
            rec["reload"] = {"pass": ok, "max_abs_diff": delta, "pruned": pruned}
            if not ok:
                failures.append(f"reload: max |dlogits| = {delta:.3g}")
        except Exception as exc:  # noqa: BLE001
            rec["reload"] = {"pass": False, "error": _error(exc), "pruned": pruned}
            failures.append(f"reload: {_error(exc)}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        rec["status"] = "fail" if failures else "pass"
        rec["failures"] = failures
        rec["reason"] = " // ".join(failures)
    except Exception as exc:  # noqa: BLE001 - the harness itself must report, not crash
        rec.update(status="fail", reason=f"{stage.name}: harness error {_error(exc)}",
                   traceback=traceback.format_exc()[-3000:])
    finally:
        rec["time_s"] = time.perf_counter() - t_start
    return rec


# ---- isolation: one child per architecture, a pool of --jobs, timeouts --------------------------------------

def _child_main(entry: Entry, workdir: Path, threads: int) -> None:
    """Body of a child: quiet output, run the checks, write the record as JSON."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(threads)
    import logging

    logging.disable(logging.WARNING)
    rec = run_entry(entry, Stage(workdir / f"{_safe(entry.name)}.stage"), workdir)
    tmp = workdir / f"{_safe(entry.name)}.json.tmp"
    tmp.write_text(json.dumps(rec, default=str))
    tmp.rename(workdir / f"{_safe(entry.name)}.json")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class Child:
    """One running architecture (a forked process or a fresh interpreter)."""

    def __init__(self, entry: Entry, workdir: Path, isolation: str, threads: int):
        self.entry = entry
        self.workdir = workdir
        self.start = time.perf_counter()
        log = open(workdir / f"{_safe(entry.name)}.log", "w")  # noqa: SIM115 - closed by the child/finish
        self.log = log
        if isolation == "fork":
            pid = os.fork()
            if pid == 0:  # child
                code = 0
                try:
                    os.dup2(log.fileno(), 1)
                    os.dup2(log.fileno(), 2)
                    _child_main(entry, workdir, threads)
                except BaseException:  # noqa: BLE001
                    traceback.print_exc()
                    code = 1
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            self.pid = pid
            self.proc = None
        else:
            cmd = [sys.executable, str(HERE), "--worker", json.dumps(dataclasses.asdict(entry)),
                   "--workdir", str(workdir), "--threads", str(threads)]
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            self.pid = self.proc.pid
        self.exitcode: int | None = None

    def poll(self) -> bool:
        """True when the child has exited."""
        if self.proc is not None:
            code = self.proc.poll()
            if code is None:
                return False
            self.exitcode = code
            return True
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return False
        self.exitcode = os.waitstatus_to_exitcode(status)
        return True

    def kill(self) -> None:
        """Kill this child (by its own pid) and reap it."""
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            pass
        if self.proc is not None:
            self.proc.wait()
        else:
            os.waitpid(self.pid, 0)

    def file(self, suffix: str) -> Path:
        return self.workdir / f"{_safe(self.entry.name)}{suffix}"

    def stage(self) -> str:
        try:
            return self.file(".stage").read_text().strip() or "start"
        except OSError:
            return "start"

    def result(self, timed_out: bool, timeout: float) -> dict[str, Any]:
        self.log.close()
        wall = time.perf_counter() - self.start
        base = {"name": self.entry.name, "arch": self.entry.arch, "model_class": self.entry.model_class}
        if timed_out:
            return base | {"status": "timeout", "reason": f"timeout after {timeout:g} s in stage "
                                                          f"'{self.stage()}'", "time_s": wall}
        try:
            rec = json.loads(self.file(".json").read_text())
        except (OSError, ValueError):
            tail = ""
            try:
                lines = [ln for ln in self.file(".log").read_text().splitlines() if ln.strip()]
                tail = lines[-1][:300] if lines else ""
            except OSError:
                pass
            return base | {"status": "fail", "time_s": wall,
                           "reason": f"child crashed in stage '{self.stage()}' (exit code {self.exitcode})"
                                     + (f": {tail}" if tail else "")}
        rec["wall_s"] = wall
        return rec


def run_all(entries: list[Entry], jobs: int, timeout: float, isolation: str,
            log=print) -> list[dict[str, Any]]:
    """Run every in-scope entry in children, ``jobs`` at a time; skipped entries are recorded directly."""
    results: dict[str, dict[str, Any]] = {}
    pending: list[Entry] = []
    for entry in entries:
        reason = skip_reason(entry)
        if reason:
            results[entry.name] = {"name": entry.name, "arch": entry.arch, "model_class": entry.model_class,
                                   "status": "skip", "reason": reason}
        else:
            pending.append(entry)
    threads = max(1, (os.cpu_count() or 1) // max(jobs, 1))
    workdir = Path(tempfile.mkdtemp(prefix="depgraph-coverage-"))
    active: list[Child] = []
    done = 0
    total = len(pending)
    try:
        while pending or active:
            while pending and len(active) < jobs:
                active.append(Child(pending.pop(0), workdir, isolation, threads))
            time.sleep(0.1)
            for child in list(active):
                finished = child.poll()
                timed_out = not finished and time.perf_counter() - child.start > timeout
                if timed_out:
                    child.kill()
                if finished or timed_out:
                    active.remove(child)
                    rec = child.result(timed_out, timeout)
                    results[child.entry.name] = rec
                    done += 1
                    log(f"[{done}/{total}] {rec['name']}: {rec['status']} ({rec.get('time_s', 0):.1f} s)"
                        + (f" {rec['reason'][:160]}" if rec.get("reason") else ""))
    finally:
        for child in active:
            child.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    return [results[e.name] for e in entries]


# ---- report ---------------------------------------------------------------------------------------------

def summary_line(records: list[dict[str, Any]]) -> str:
    tested = [r for r in records if r["status"] != "skip"]
    passed = [r for r in tested if r["status"] == "pass"]
    pct = 100.0 * len(passed) / len(tested) if tested else 0.0
    return f"{len(passed)}/{len(tested)} architectures fully pass ({pct:.0f}%)"


def _cause(reason: str) -> str:
    """A failure reason with numbers and layer indices normalised, for grouping."""
    text = re.sub(r"layers\.\d+", "layers.N", reason)
    text = re.sub(r"\b\d+(\.\d+)?(e-?\d+)?\b", "N", text)
    return text[:220]


def _mark(value: dict[str, Any] | None) -> str:
    if value is None:
        return "n/a"
    if "error" in value:
        return "error"
    return "pass" if value.get("pass") else "FAIL"


def _cut_cell(rec: dict[str, Any], kind: str) -> str:
    value = (rec.get("cut_vs_mask") or {}).get(kind)
    if value is None:
        return "n/a" if rec.get("trace") == "ok" else ""
    if "error" in value:
        return "error"
    if value.get("exact") is False:  # approximate by design (a norm over the units)
        return f"approx ({value['max_abs_diff']:.1e})"
    return f"{'pass' if value['pass'] else 'FAIL'} ({value['max_abs_diff']:.1e})"


def render(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Markdown: summary, the per-architecture table, failures grouped by cause, skips grouped by reason."""
    tested = [r for r in records if r["status"] != "skip"]
    skipped = [r for r in records if r["status"] == "skip"]
    out = [
        "# Architecture coverage",
        "",
        f"Generated by `python benchmarks/coverage.py {meta['argv']}` (transformers {meta['transformers']}, "
        f"torch {meta['torch']}; tiny random configs: hidden {HIDDEN}, intermediate {INTER}, {LAYERS} layers, "
        f"{HEADS} heads / {KV} KV heads where the config has GQA fields, vocab {VOCAB}; timeout "
        f"{meta['timeout']:.0f} s per architecture; {meta['wall_s']:.0f} s wall with {meta['jobs']} jobs).",
        "",
        f"**{summary_line(records)}**; {len(records)} registry entries: {len(tested)} built and tested, "
        f"{len(skipped)} skipped (out of scope or not buildable).",
        "",
        "Columns: cut≡mask = max |Δlogits| between cutting ~25% of one drawn A (MLP) / B (attention) group and "
        f"zero-masking the same units (pass ≤ {TOL_CUT:g}); prune+fwd = ~25% of every A/B/C group cut in one "
        "plan, forward runs, fewer parameters; reload = depgraph.save_pretrained/load_pretrained of the pruned "
        f"model gives the same logits (≤ {TOL_RELOAD:g}).",
        "",
        "| architecture | model class | result | trace s | A | B | C | cut≡mask A | cut≡mask B | prune+fwd "
        "| reload | time s | failure reason |",
        "|---|---|---|---:|---:|---:|---:|---|---|---|---|---:|---|",
    ]
    for r in tested:
        groups = r.get("groups") or {}
        cm = {kind: _cut_cell(r, kind) for kind in "AB"}
        reason = (r.get("reason") or "").replace("|", "\\|")
        trace = f"{r['trace_s']:.1f}" if "trace_s" in r else r.get("trace", "-")
        out.append(
            f"| {r['name']} | {r['model_class']} | {r['status']} | {trace} | {groups.get('A', '')} | "
            f"{groups.get('B', '')} | {groups.get('C', '')} | {cm['A']} | {cm['B']} | "
            f"{_mark(r.get('prune')) if 'prune' in r else ''} | {_mark(r.get('reload')) if 'reload' in r else ''} | "
            f"{r.get('time_s', 0):.1f} | {reason} |")
    failing = [r for r in tested if r["status"] != "pass"]
    if failing:
        out += ["", "## Failures by cause", ""]
        causes: dict[str, list[str]] = defaultdict(list)
        for r in failing:
            for part in r.get("failures") or [r.get("reason") or r["status"]]:
                causes[_cause(part)].append(r["name"])
        for cause, names in sorted(causes.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            out.append(f"- **{len(names)}** × `{cause}`: {', '.join(sorted(set(names)))}")
    if skipped:
        out += ["", "## Skipped", ""]
        reasons: dict[str, list[str]] = defaultdict(list)
        for r in skipped:
            key = r["reason"]
            if key.startswith("multimodal"):
                key = "multimodal/composite config"
            reasons[key].append(r["name"])
        for reason, names in sorted(reasons.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            out.append(f"- {len(names)} × {reason}: {', '.join(names)}")
    out += ["", summary_line(records)]
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument("--sample", action="store_true", help=f"the fixed sample: {', '.join(SAMPLE)}")
    pick.add_argument("--only", nargs="+", default=None, metavar="NAME", help="these architectures only")
    parser.add_argument("--jobs", type=int, default=2, help="architectures run in parallel")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per architecture")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    parser.add_argument("--json", type=Path, default=None, help="write the records as JSON here")
    parser.add_argument("--isolation", choices=("fork", "spawn"), default="fork",
                        help="fork a child of this (already imported) interpreter, or a fresh interpreter")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        _child_main(Entry(**json.loads(args.worker)), args.workdir, args.threads)
        return 0
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import transformers

    import depgraph  # noqa: F401 - imported once here so forked children start warm

    names = SAMPLE if args.sample else args.only
    entries = registry(names)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    records = run_all(entries, args.jobs, args.timeout, args.isolation, log)
    what = "--sample" if args.sample else (f"--only {' '.join(args.only)}" if args.only else "")
    command = " ".join(x for x in (what, f"--jobs {args.jobs}", f"--timeout {args.timeout:g}",
                                   f"--isolation {args.isolation}") if x)
    meta = {"argv": command, "transformers": transformers.__version__,
            "torch": torch.__version__, "timeout": args.timeout, "jobs": args.jobs,
            "wall_s": time.perf_counter() - t0}
    text = render(records, meta)
    print(text, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "summary": summary_line(records), "records": records},
                                        indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
