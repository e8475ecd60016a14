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
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from .errors import DepGraphError

STATE_FILE = "depgraph.json"
WEIGHTS_FILE = "model.safetensors"
BUFFERS_FILE = "depgraph_buffers.safetensors"
BASE_CONFIG_ATTR = "_depgraph_base_config"  # the config before the first cut (set by depgraph.prune)
_SIMPLE = (int, float, bool, str)


def _simple(value) -> bool:
    if isinstance(value, _SIMPLE) or value is None:
        return True
    return isinstance(value, (tuple, list)) and all(isinstance(v, _SIMPLE) for v in value)


def _fresh(cls, config, device="meta") -> nn.Module:
    with torch.device(device):
        return cls(config)


def model_diff(model: nn.Module, config=None) -> dict:
    """What a fresh ``type(model)(config)`` (default: ``model.config``) gets wrong about ``model``."""
    config = config if config is not None else model.config
    ref = _fresh(type(model), config)
    ref_modules = dict(ref.named_modules())
    ref_state = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if ref_state.get(k) != tuple(v.shape)}
    attrs: dict[str, dict] = {}
    configs: dict[str, dict] = {}
    base = model.config.to_dict()
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
        if local is not None and local is not model.config and hasattr(local, "to_dict"):
            configs[path] = {k: v for k, v in local.to_dict().items() if base.get(k) != v}
    return {"shapes": shapes, "attrs": attrs, "configs": configs}


def _hf_compatible(model: nn.Module) -> bool:
    """Can ``from_pretrained`` rebuild this model from its (pruned) config alone?"""
    try:
        if hasattr(model.config, "validate"):
            model.config.validate()  # from_pretrained re-validates the saved config
        diff = model_diff(model)
    except Exception:  # e.g. the config class rejects hidden_size % heads != 0
        return False
    return not (diff["shapes"] or diff["attrs"] or diff["configs"])


def _non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers the state dict leaves out (rotary tables, embedding scales): their values matter."""
    persistent = set(model.state_dict())
    return {n: b.detach().contiguous().clone() for n, b in model.named_buffers() if n not in persistent}


def save_pretrained(model: nn.Module, path: str | Path, **kwargs) -> dict:
    """Save weights (safetensors), config and the per-layer shapes; returns the saved state.

    ``state["hf_compatible"]`` says whether plain ``from_pretrained`` can reload it too; then the
    files are exactly what ``model.save_pretrained`` writes. Otherwise the weights are written
    with the model's own parameter names and only :func:`load_pretrained` can read them.
    """
    if not hasattr(model, "save_pretrained") or getattr(model, "config", None) is None:
        raise DepGraphError(f"{type(model).__name__} is not a Hugging Face PreTrainedModel; save its "
                            "state_dict with torch.save/safetensors instead")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    compatible = _hf_compatible(model)
    # per-layer sizes are described relative to the original config, which always builds
    base = getattr(model, BASE_CONFIG_ATTR, None) or model.config
    state = {"shapes": {}, "attrs": {}, "configs": {}} if compatible else model_diff(model, base)
    state.update(format=1, cls=type(model).__name__, module=type(model).__module__, hf_compatible=compatible,
                 base_config=None if compatible else base.to_dict())
    if state["hf_compatible"]:
        model.save_pretrained(path, safe_serialization=True, **kwargs)
    else:
        # not config.save_pretrained: it re-validates, and per-layer sizes may break the class's checks
        (path / "config.json").write_text(model.config.to_json_string(use_diff=False))
        save_model(model, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    buffers = _non_persistent_buffers(model)
    if buffers:
        save_file(buffers, str(path / BUFFERS_FILE))
    (path / STATE_FILE).write_text(json.dumps(state, indent=1))
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
    if state["hf_compatible"]:
        model = cls.from_pretrained(path)
    else:
        pruned = json.loads((path / "config.json").read_text())
        base = AutoConfig.for_model(**{k: v for k, v in state["base_config"].items() if k != "model_type"},
                                    model_type=state["base_config"]["model_type"])
        model = cls(base)  # a real build: buffers are computed, then overwritten below
        setattr(model, BASE_CONFIG_ATTR, copy.deepcopy(base))
        config = model.config
        for key, value in pruned.items():  # plain attributes: no re-validation of per-layer sizes
            if key not in ("transformers_version", "architectures", "model_type") and not key.startswith("_"):
                setattr(config, key, value)
        modules = dict(model.named_modules())
        for mpath, diff in state["configs"].items():
            local = copy.copy(config)  # no re-validation: per-layer sizes may break the class's checks
            for key, value in diff.items():
                setattr(local, key, value)
            modules[mpath].config = local
        for mpath, attrs in state["attrs"].items():
            for key, value in attrs.items():
                setattr(modules[mpath], key, tuple(value) if isinstance(value, list) else value)
        tensors = dict(model.named_parameters(remove_duplicate=False))
        tensors.update(dict(model.named_buffers(remove_duplicate=False)))
        for name, shape in state["shapes"].items():
            tensors[name].data = torch.empty(shape, dtype=tensors[name].dtype)
        missing, unexpected = load_model(model, str(path / WEIGHTS_FILE), strict=False)
        if missing or unexpected:
            raise DepGraphError(f"checkpoint {path} does not match the model: missing {sorted(missing)[:5]}, "
                                f"unexpected {sorted(unexpected)[:5]}")
    buffers_file = path / BUFFERS_FILE
    if buffers_file.exists():
        tensors = dict(model.named_buffers())
        for name, value in load_file(str(buffers_file)).items():
            if name in tensors:
                tensors[name].data = value.to(tensors[name].dtype)
    model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
