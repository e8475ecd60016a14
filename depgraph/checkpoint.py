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
import math
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
# inf / nan are not JSON: they are tagged the way transformers' config files tag them
# ({"__float__": "Infinity"}), so Mamba's time_step_limit=(0.0, inf) survives a round trip
_FLOAT_TAG = "__float__"
_SPECIAL_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def encode_floats(obj):
    """``obj`` with every inf / nan replaced by its ``{"__float__": ...}`` tag (JSON-safe)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return {_FLOAT_TAG: "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")}
    if isinstance(obj, dict):
        return {k: encode_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode_floats(v) for v in obj]
    return obj


def decode_floats(obj):
    """Inverse of :func:`encode_floats` (also reads transformers' own ``config.json`` tags)."""
    if isinstance(obj, dict):
        if set(obj) == {_FLOAT_TAG} and obj[_FLOAT_TAG] in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[obj[_FLOAT_TAG]]
        return {k: decode_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_floats(v) for v in obj]
    return obj


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
    return {"shapes": shapes, "attrs": attrs, "configs": configs, "modules": _module_mismatch(model, ref),
            "containers": _container_mismatch(model, ref)}


def _container_mismatch(model: nn.Module, ref: nn.Module) -> dict[str, list[str]]:
    """Module lists/dicts holding other entries than a fresh build (experts removed from one block only):
    the keys to keep, in order, so the loader can drop the rest before loading the weights."""
    ref_modules = dict(ref.named_modules())
    out = {}
    for path, module in model.named_modules():
        other = ref_modules.get(path)
        if (isinstance(module, (nn.ModuleList, nn.ModuleDict)) and type(other) is type(module)
                and list(module._modules) != list(other._modules)):
            out[path] = list(module._modules)
    return out


def _module_mismatch(model: nn.Module, ref: nn.Module) -> list[str]:
    """Paths where ``model`` holds another module class than a fresh build: attributes cannot fix that."""
    ref_types = {path: type(m) for path, m in ref.named_modules()}
    return sorted(path for path, m in model.named_modules() if path in ref_types and ref_types[path] is not type(m))


def _runtime_config(model: nn.Module, config):
    """``config`` with the settings the model switched at run time, when a fresh build differs in module classes.

    BigBird swaps its block-sparse attention modules for full attention on short inputs and records it only in
    the modules' ``attention_type``; the config still says block-sparse, so a fresh build gets the other
    modules. A setting (str/bool module attribute named like a config field) that the modules agree on and
    that the config states differently is applied to a copy of the config; if the classes still differ, the
    checkpoint could not rebuild the model, so this raises.
    """
    mismatch = model_diff(model, config)["modules"]
    if not mismatch:
        return config
    seen: dict[str, set] = {}
    for _, module in model.named_modules():
        for key, value in vars(module).items():
            if key.startswith("_") or not isinstance(value, (str, bool)):
                continue
            try:
                stated = getattr(config, key, None)
            except Exception:  # per-layer attributes of heterogeneous configs
                continue
            if type(stated) is type(value) and stated != value:
                seen.setdefault(key, set()).add(value)
    settings = {k: next(iter(v)) for k, v in seen.items() if len(v) == 1}
    cause: Exception | None = None
    if settings:
        runtime = copy.deepcopy(config)
        for key, value in settings.items():
            setattr(runtime, key, value)
        try:
            if not model_diff(model, runtime)["modules"]:
                return runtime
        except Exception as exc:  # the setting does not build: report the mismatch below
            cause = exc
    raise DepGraphError(f"{type(model).__name__} cannot be checkpointed: module(s) {', '.join(mismatch[:3])} are "
                        "of another class than a fresh build from its config makes (replaced at run time?), "
                        "so a reloaded model would compute something else") from cause


def plain_hf_reason(model: nn.Module) -> str | None:
    """Why plain ``from_pretrained`` could not rebuild ``model`` from its (pruned) config; None when it can.

    Works on the meta device too (nothing is loaded), so a plan can be checked before it is cut.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return f"{type(model).__name__} has no Hugging Face config"
    try:
        if hasattr(config, "validate"):
            config.validate()  # from_pretrained re-validates the saved config
        diff = model_diff(model)
    except Exception as exc:  # e.g. the config class rejects hidden_size % heads != 0
        return f"the config class refuses the pruned sizes ({' '.join(str(exc).split())[-300:]})"
    if diff["shapes"]:
        names = sorted(diff["shapes"])
        return (f"{len(names)} tensor(s) differ from what the config describes, e.g. {names[0]} "
                f"{diff['shapes'][names[0]]} (layers of different widths: per-layer sizes)")
    for key, what in (("attrs", "module attributes"), ("configs", "per-module config copies"),
                      ("modules", "module classes"), ("containers", "module lists")):
        if diff[key]:
            return f"{what} differ from a fresh build from the config ({', '.join(sorted(diff[key])[:3])})"
    return None


def _hf_compatible(model: nn.Module) -> bool:
    """Can ``from_pretrained`` rebuild this model from its (pruned) config alone?"""
    return plain_hf_reason(model) is None


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
    if not compatible:
        base = _runtime_config(model, base)
    state = ({"shapes": {}, "attrs": {}, "configs": {}, "modules": [], "containers": {}} if compatible
             else model_diff(model, base))
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
    (path / STATE_FILE).write_text(json.dumps(encode_floats(state), indent=1, allow_nan=False))
    return state


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Reload a model written by :func:`save_pretrained` (uniform or per-layer sizes)."""
    from transformers import AutoConfig

    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.exists():
        raise DepGraphError(f"{path} has no {STATE_FILE}: it was not written by depgraph.save_pretrained "
                            "(use transformers' from_pretrained for plain checkpoints)")
    state = decode_floats(json.loads(state_file.read_text()))
    cls = getattr(importlib.import_module(state["module"]), state["cls"])
    if state["hf_compatible"]:
        model = cls.from_pretrained(path)
    else:
        pruned = decode_floats(json.loads((path / "config.json").read_text()))
        base = AutoConfig.for_model(**{k: v for k, v in state["base_config"].items() if k != "model_type"},
                                    model_type=state["base_config"]["model_type"])
        model = cls(base)  # a real build: buffers are computed, then overwritten below
        setattr(model, BASE_CONFIG_ATTR, copy.deepcopy(base))
        config = model.config
        for key, value in pruned.items():  # plain attributes: no re-validation of per-layer sizes
            if key not in ("transformers_version", "architectures", "model_type") and not key.startswith("_"):
                setattr(config, key, value)
        modules = dict(model.named_modules())
        for mpath, keys in state.get("containers", {}).items():  # absent in older checkpoints
            entries = modules[mpath]._modules
            if any(k not in entries for k in keys):
                raise DepGraphError(f"checkpoint {path}: {mpath} holds entries {keys[:5]}..., which a fresh "
                                    f"build does not have ({list(entries)[:5]}...)")
            modules[mpath]._modules = type(entries)((k, entries[k]) for k in keys)
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
