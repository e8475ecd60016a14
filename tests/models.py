"""Tiny random-weight transformer models of every supported family (shared by the test-suite).

Every model is built from a config (no download), seeded with ``torch.manual_seed``, in eval
mode, with 2 layers and a hidden size of 32-64 so that one trace takes well under a second.

>>> model = tiny_model("llama", num_key_value_heads=1)
>>> ids = example_ids(model)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# family -> (config class name, model class name, config kwargs)
_SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128)),
    "llama_mha": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=1000, max_position_embeddings=128)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128, tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=1000, max_position_embeddings=128,
        tie_word_embeddings=False)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=64, bos_token_id=0, eos_token_id=0)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000,
        max_position_embeddings=64, word_embed_proj_dim=64, pad_token_id=1)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)),
    "bert": ("BertConfig", "BertForMaskedLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000,
        max_position_embeddings=64, type_vocab_size=2)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, vocab_size=1000, max_position_embeddings=128)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=1000, max_position_embeddings=128,
        sliding_window=64)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000,
        max_position_embeddings=128, rotary_pct=0.5, use_parallel_residual=True)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000,
        max_position_embeddings=128, partial_rotary_factor=0.5)),
    # Falcon-40B layout: grouped fused qkv ([kv heads, q per kv + 2, head_dim]), parallel attn+MLP
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2, vocab_size=1000,
        new_decoder_architecture=True, parallel_attn=True, bias=False, alibi=False)),
}

FAMILIES: list[str] = list(_SPECS)


def config_for(family: str, **overrides):
    """The tiny config of ``family`` with ``overrides`` applied (keyword names of the config class)."""
    import transformers

    if family not in _SPECS:
        raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    config_cls, _, kwargs = _SPECS[family]
    return getattr(transformers, config_cls)(**{**kwargs, **overrides})


def tiny_model(family: str, seed: int = 0, device: str | torch.device | None = None, **overrides) -> nn.Module:
    """A seeded, eval-mode, random-weight model of ``family`` built from its tiny config."""
    import transformers

    config = config_for(family, **overrides)
    model_cls = getattr(transformers, _SPECS[family][1])
    torch.manual_seed(seed)
    if device is not None:
        with torch.device(device):
            model = model_cls(config)
    else:
        model = model_cls(config)
    return model.eval()


@dataclass(frozen=True)
class Dims:
    """The structural sizes of a config, spelled the same for every family."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def queries_per_kv(self) -> int:
        return self.heads // self.kv_heads

    @property
    def attention_units(self) -> int:
        """Expected Type-B group size: one unit per KV head with its query heads (GQA/MHA);
        under multi-query attention (one shared KV head) each query head is a unit."""
        return self.kv_heads if self.kv_heads > 1 else self.heads


def dims(config) -> Dims:
    """Hidden / MLP / head sizes of ``config`` (any family in :data:`FAMILIES`)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv = getattr(config, "num_key_value_heads", None)
    if getattr(config, "model_type", "") == "falcon":
        kv = config.num_kv_heads if config.new_decoder_architecture else (1 if config.multi_query else heads)
    kv = int(kv or heads)
    inter = next((getattr(config, name) for name in ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")
                  if getattr(config, name, None)), 4 * hidden)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    return Dims(hidden, int(inter), int(config.num_hidden_layers), heads, kv, head_dim)


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def example_ids(model: nn.Module, batch: int = 2, seq: int = 8, seed: int = 0) -> torch.Tensor:
    """Random token ids valid for ``model``, shape ``[batch, seq]``, on the model's device."""
    vocab = int(getattr(text_config(model), "vocab_size", 2))
    device = next(iter(model.parameters())).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, max(vocab, 3), (batch, seq), generator=gen)
    return ids.to(device)

