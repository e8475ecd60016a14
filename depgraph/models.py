"""Where the command line gets its models: built-in demo configs and ``MODEL`` specs.

A ``MODEL`` argument is resolved (:func:`resolve`, cheap, no loading) to one of

* a **depgraph checkpoint**: a directory with ``depgraph.json`` (written by :func:`depgraph.save_pretrained`,
  e.g. by ``depgraph prune``), reloaded with :func:`depgraph.load_pretrained`;
* a **Hugging Face model directory**: ``config.json`` plus weights, loaded with ``from_pretrained``
  (``local_files_only=True``: nothing is downloaded);
* a **config file**: a ``config.json`` path; the model is built from it with seeded random weights, or on
  the ``meta`` device (shapes only, no memory for weights) with ``meta=True``;
* a **demo name** (:data:`DEMO_MODELS`): a tiny random-weight model (``tiny-llama``, ...) or the shape of
  a large one on the ``meta`` device (``llama-7b-shape``, ``llama-70b-shape``).

Anything else raises :class:`ModelSpecError` with one line that says what was expected.

>>> model = demo_model("tiny-llama")                  # seeded random weights, eval mode
>>> model = load_model("out/pruned")                   # a depgraph checkpoint
>>> model = load_model("llama-70b-shape")              # meta device: trace it, nothing else
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import STATE_FILE
from .errors import CalibrationError, DepGraphError

__all__ = [
    "DEFAULT_DEMO", "DEMO_MODELS", "DemoSpec", "ModelSpecError", "ResolvedSpec", "demo_model", "is_meta",
    "load_model", "load_tokenizer", "resolve",
]

_BYTE_VOCAB = 259  # depgraph.data.ByteTokenizer: 256 bytes + <pad>, <bos>, <eos>, so its ids map 1:1


class ModelSpecError(DepGraphError, ValueError):
    """A ``MODEL`` argument that names no directory, config file or demo model (or cannot be loaded)."""


@dataclass(frozen=True)
class DemoSpec:
    """A built-in demo model: a transformers config/model class pair and the config's keywords."""

    config_cls: str
    model_cls: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    meta_only: bool = False  # too large for weights: built on the meta device only
    about: str = ""


DEMO_MODELS: dict[str, DemoSpec] = {
    "tiny-llama": DemoSpec("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=8, vocab_size=_BYTE_VOCAB, max_position_embeddings=256),
        about="Llama, hidden 64, 2 layers, 8 query / 4 KV heads (GQA), byte vocabulary"),
    "tiny-gpt2": DemoSpec("GPT2Config", "GPT2LMHeadModel", dict(
        n_embd=64, n_layer=2, n_head=4, n_inner=128, vocab_size=_BYTE_VOCAB, n_positions=256,
        bos_token_id=257, eos_token_id=258),
        about="GPT-2, hidden 64, 2 layers, 4 heads, fused qkv (Conv1D), byte vocabulary"),
    "tiny-qwen2": DemoSpec("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=_BYTE_VOCAB, max_position_embeddings=256,
        tie_word_embeddings=False),
        about="Qwen2, hidden 64, 2 layers, 8 query / 4 KV heads, q/k/v biases, byte vocabulary"),
    "llama-7b-shape": DemoSpec("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096), meta_only=True,
        about="Llama-2-7B shapes on the meta device (no weights)"),
    "llama-70b-shape": DemoSpec("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096), meta_only=True,
        about="Llama-2-70B shapes (GQA, 8 KV heads) on the meta device (no weights)"),
}
DEFAULT_DEMO = "tiny-llama"


@dataclass(frozen=True)
class ResolvedSpec:
    """What a ``MODEL`` argument names: ``kind`` is "depgraph", "hf", "config" or "demo"."""

    kind: str
    spec: str
    path: Path | None = None

    @property
    def directory(self) -> Path | None:
        """The model directory (tokenizer files live there), if the spec names one."""
        return self.path if self.kind in ("depgraph", "hf") else None


def is_meta(model: nn.Module) -> bool:
    """True when the model's parameters live on the ``meta`` device (shapes only)."""
    return any(p.is_meta for p in model.parameters())


def _seeded_build(build, seed: int, device: str | torch.device | None) -> nn.Module:
    torch.manual_seed(seed)
    if device is None:
        return build()
    with torch.device(device):
        return build()


def demo_model(name: str = DEFAULT_DEMO, device: str | torch.device | None = None,
               seed: int = 0) -> nn.Module:
    """The built-in demo model ``name`` with seeded random weights, in eval mode.

    Shape-only names (``llama-7b-shape``, ``llama-70b-shape``) are always built on the ``meta`` device;
    asking for another device for them raises :class:`ModelSpecError`.
    """
    import transformers

    if name not in DEMO_MODELS:
        raise ModelSpecError(f"unknown demo model {name!r}; built-in: {', '.join(DEMO_MODELS)}")
    spec = DEMO_MODELS[name]
    if spec.meta_only:
        if device is not None and torch.device(device).type != "meta":
            raise ModelSpecError(f"{name} is a shape-only model (meta device): it has no weights to put on "
                                 f"{device}; use a tiny-* demo model or a real checkpoint for that")
        device = "meta"
    config = getattr(transformers, spec.config_cls)(**spec.kwargs)
    model_cls = getattr(transformers, spec.model_cls)
    return _seeded_build(lambda: model_cls(config), seed, device).eval()


def resolve(spec: str | Path) -> ResolvedSpec:
    """Decide what ``spec`` names without loading anything; :class:`ModelSpecError` if nothing."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / STATE_FILE).is_file():
            return ResolvedSpec("depgraph", text, path)
        if (path / "config.json").is_file():
            return ResolvedSpec("hf", text, path)
        raise ModelSpecError(f"{text} is a directory but not a model directory (no config.json)")
    if path.is_file():
        if path.suffix != ".json":
            raise ModelSpecError(f"{text} is a file but not a config .json (MODEL is a model directory, "
                                 "a config.json path or a demo name)")
        return ResolvedSpec("config", text, path)
    if text in DEMO_MODELS:
        return ResolvedSpec("demo", text)
    raise ModelSpecError(f"MODEL {text!r} is not a model directory, a config.json file or a built-in demo "
                         f"model ({', '.join(DEMO_MODELS)})")


def _config_from_file(path: Path):
    from transformers import AutoConfig

    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelSpecError(f"cannot read config {path}: {exc}") from exc
    if not isinstance(values, dict) or "model_type" not in values:
        raise ModelSpecError(f"{path} is not a transformers config.json (it has no \"model_type\")")
    values = {k: v for k, v in values.items() if k not in ("transformers_version", "architectures")}
    model_type = values.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelSpecError(f"{path}: cannot build a config of model_type {model_type!r}: {exc}") from exc


def _from_config(config, meta: bool, seed: int) -> nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    def build() -> nn.Module:
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError:  # not a causal LM (an encoder, say): the bare model
            return AutoModel.from_config(config)

    return _seeded_build(build, seed, "meta" if meta else None).eval()


def _from_directory(path: Path, meta: bool, seed: int, trust_remote_code: bool = False) -> nn.Module:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if meta:  # shapes only: never touch the weight files
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ModelSpecError(f"cannot read the config of {path}: {str(exc).splitlines()[0]}") from exc
        return _from_config(config, meta=True, seed=seed)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "Unrecognized configuration class" not in str(exc):
            raise ModelSpecError(f"cannot load {path}: {str(exc).splitlines()[0]}") from exc
        model = AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, RuntimeError) as exc:  # no weights file; weights that do not fit the class's shapes
        hint = ""
        if not trust_remote_code and _names_remote_code(path):
            hint = "; its config.json names its own code (auto_map): pass trust_remote_code=True if you trust it"
        raise ModelSpecError(f"cannot load {path}: {str(exc).strip().splitlines()[0]}{hint}") from exc
    return model.eval()


def _names_remote_code(path: Path) -> bool:
    try:
        return "auto_map" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def load_model(spec: str | Path | ResolvedSpec, meta: bool = False, seed: int = 0,
               trust_remote_code: bool = False) -> nn.Module:
    """Load (or build) the model a ``MODEL`` argument names; see the module docstring.

    ``meta``: build on the meta device from the config (no weights read or allocated) for Hugging Face
    directories and config files. Depgraph checkpoints always load their weights (their per-layer sizes
    live in ``depgraph.json``, not in the config); demo ``*-shape`` models are always on meta.
    ``trust_remote_code``: run code a model directory names (off by default, as in transformers).
    """
    from .checkpoint import load_pretrained

    resolved = spec if isinstance(spec, ResolvedSpec) else resolve(spec)
    if resolved.kind == "depgraph":
        return load_pretrained(resolved.path, trust_remote_code=trust_remote_code)
    if resolved.kind == "hf":
        return _from_directory(resolved.path, meta, seed, trust_remote_code)
    if resolved.kind == "config":
        return _from_config(_config_from_file(resolved.path), meta, seed)
    return demo_model(resolved.spec, device="meta" if meta else None, seed=seed)


def load_tokenizer(spec: str | Path | ResolvedSpec) -> Any | None:
    """The tokenizer stored with a model directory (Hugging Face files or ``byte_tokenizer.json``).

    Returns None when there is none (demo models, config files, directories without tokenizer files):
    callers then need a tokenizer from elsewhere (the CLI's ``--tokenizer DIR``); the byte-vocabulary demo
    models use :class:`depgraph.data.ByteTokenizer`.
    """
    from .data import tokenizer_from_directory

    resolved = spec if isinstance(spec, ResolvedSpec) else resolve(spec)
    directory = resolved.directory
    if directory is None:
        return None
    try:
        return tokenizer_from_directory(directory)
    except CalibrationError as exc:
        raise ModelSpecError(str(exc)) from exc
