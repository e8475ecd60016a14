"""Save and reload pruned models.

After a uniform cut (same size in every layer) the Hugging Face config can describe the
model, so ``AutoModelForCausalLM.from_pretrained(dir)`` reloads it. After a non-uniform cut
it cannot; :func:`save_pretrained` therefore also writes ``depgraph.json``: the difference
between the pruned model and a fresh model built from the saved config (parameter shapes,
module attributes, per-module config copies). :func:`load_pretrained` builds the fresh
model, applies that difference and loads the safetensors weights.
"""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .errors import DepGraphError

STATE_FILE = "depgraph.json"
_SIMPLE = (int, float, bool, str)


def _simple(value) -> bool:
    if isinstance(value, _SIMPLE) or value is None:
        return True
    return isinstance(value, (tuple, list)) and all(isinstance(v, _SIMPLE) for v in value)


def _fresh(cls, config, device="meta") -> nn.Module:
    with torch.device(device):
        return cls(config)


def model_diff(model: nn.Module) -> dict:
    """What a fresh ``type(model)(model.config)`` would get wrong about ``model``."""
    config = model.config
    ref = _fresh(type(model), config)
    ref_modules = dict(ref.named_modules())
    ref_state = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if ref_state.get(k) != tuple(v.shape)}
    attrs: dict[str, dict] = {}
    configs: dict[str, dict] = {}
    base = config.to_dict()
    for path, module in model.named_modules():
        other = ref_modules.get(path)
        if other is None:
            continue
        for key, value in vars(module).items():
            if key.startswith("_") or key == "training" or not _simple(value):
                continue
            if getattr(other, key, object()) != value:
                attrs.setdefault(path, {})[key] = list(value) if isinstance(value, tuple) else value
        local = getattr(module, "config", None)
        if local is not None and local is not config and hasattr(local, "to_dict"):
            diff = {k: v for k, v in local.to_dict().items() if base.get(k) != v}
            configs[path] = diff
    return {"shapes": shapes, "attrs": attrs, "configs": configs}


def save_pretrained(model: nn.Module, path: str | Path, **kwargs) -> dict:
    """Save weights (safetensors), config and the per-layer shapes; returns the saved state.

    ``state["hf_compatible"]`` says whether plain ``from_pretrained`` can reload it too.
    """
    if not hasattr(model, "save_pretrained") or getattr(model, "config", None) is None:
        raise DepGraphError(f"{type(model).__name__} is not a Hugging Face PreTrainedModel; save its "
                            "state_dict with torch.save/safetensors instead")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    state = model_diff(model)
    state.update(
        format=1, cls=type(model).__name__, module=type(model).__module__,
        hf_compatible=not (state["shapes"] or state["attrs"] or state["configs"]),
    )
    (path / STATE_FILE).write_text(json.dumps(state, indent=1))
    return state


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(path / name)))
    return state


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Reload a model written by :func:`save_pretrained` (uniform or per-layer sizes)."""
    from transformers import AutoConfig

    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.exists():
        raise DepGraphError(f"{path} has no {STATE_FILE}: it was not written by depgraph.save_pretrained "
                            "(use transformers' from_pretrained for plain checkpoints)")
    state = json.loads(state_file.read_text())
    cls = getattr(importlib.import_module(state["module"]), state["cls"])
    config = AutoConfig.from_pretrained(path)
    # a real (CPU) build: non-persistent buffers such as rotary frequencies are computed here
    model = cls(config)
    modules = dict(model.named_modules())
    for mpath, diff in state["configs"].items():
        local = copy.copy(config)  # no re-validation: per-layer sizes may break the class's checks
        for key, value in diff.items():
            setattr(local, key, value)
        modules[mpath].config = local
    for mpath, attrs in state["attrs"].items():
        for key, value in attrs.items():
            setattr(modules[mpath], key, tuple(value) if isinstance(value, list) else value)
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    for name, shape in state["shapes"].items():
        tensors[name].data = torch.empty(shape, dtype=tensors[name].dtype)
    weights = _load_weights(path)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - set(dict(model.named_parameters()))
    missing = [m for m in missing if m not in tied and not _is_tied_alias(model, m, weights)]
    if missing or unexpected:
        raise DepGraphError(f"checkpoint {path} does not match the model: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")
    model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _is_tied_alias(model: nn.Module, name: str, weights: dict) -> bool:
    """True when ``name`` shares storage with a loaded tensor (tied embeddings)."""
    tensor = dict(model.named_parameters(remove_duplicate=False)).get(name)
    if tensor is None:
        return False
    for other, t in model.named_parameters():
        if t is tensor and other in weights:
            return True
    return False
