"""Save and reload pruned models.

After a uniform cut (same size in every layer) the Hugging Face config can describe the
model, so ``AutoModelForCausalLM.from_pretrained(dir)`` reloads it. After a non-uniform cut
it cannot; :func:`save_pretrained` therefore also writes ``depgraph.json``: the difference
between the pruned model and a fresh model built from the saved config (parameter shapes,
module attributes, per-module config copies; see :mod:`depgraph.hf_layout`).
:func:`load_pretrained` builds the fresh model, applies that difference and loads the
safetensors weights. Non-uniform checkpoints also carry remote code (``auto_map`` in
``config.json`` plus a copy of :mod:`depgraph.hf_layout`), so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` opens them without depgraph.

Safety: loading resolves the model class only from transformers' registry (never by importing a
module a file names, unless ``trust_remote_code=True``); saving writes a temporary sibling directory
and swaps it into place, so a failed save leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from . import hf_layout
from .errors import DepGraphError
from .hf_layout import BUFFERS_FILE, LAYOUT_KEY, LayoutError, apply_layout, load_buffers
from .sizes import LayerConfig, layer_edits

STATE_FILE = "depgraph.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # the shard map of a sharded checkpoint
REMOTE_CODE_FILE = "modeling_depgraph.py"  # the copy of depgraph.hf_layout in non-uniform checkpoints
# files a checkpoint writes (or an older one may hold): replaced as a whole; anything else in an existing
# directory (tokenizer files, a plan) is carried over into the new checkpoint
CHECKPOINT_FILES = re.compile(r"(config\.json|generation_config\.json|depgraph\.json|depgraph_buffers\.safetensors|"
                              r"modeling_depgraph\.py|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|"
                              r"pytorch_model.*\.bin(\.index\.json)?)")
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


def _same(a, b) -> bool:
    return (tuple(a) if isinstance(a, (list, tuple)) else a) == (tuple(b) if isinstance(b, (list, tuple)) else b)


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
        # sizes a layer derives from its own weights (Linear.in_features): when the fresh build already
        # states what the weights say, a different value on the model is stale, not a layout to reproduce
        derived = {key for obj, key, size in layer_edits(module, {}, "")
                   if obj is module and _same(getattr(other, key, None), size)}
        for key, value in vars(module).items():
            if key.startswith("_") or key == "training" or not _simple(value) or key in derived:
                continue
            if getattr(other, key, object()) != value:
                attrs.setdefault(path, {})[key] = list(value) if isinstance(value, tuple) else value
        local = getattr(module, "config", None)
        if local is not None and local is not model.config and hasattr(local, "to_dict"):
            differs = {k: v for k, v in local.to_dict().items() if base.get(k) != v}
            if differs:  # a per-layer config whose overrides a later uniform cut made equal says nothing
                configs[path] = differs
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


# ---- atomic directories ---------------------------------------------------------------------------

def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` to disk (a rename is only durable after this)."""
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(directory))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory; the files themselves are synced
        pass
    finally:
        os.close(fd)


def carry_over(old: Path, new: Path, owned: re.Pattern) -> None:
    """Copy what ``old`` holds besides checkpoint files (tokenizer, notes) into ``new``, unless ``new`` has it."""
    for entry in old.iterdir():
        target = new / entry.name
        if owned.fullmatch(entry.name) or target.exists() or entry.name.startswith(".depgraph-"):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True)
        else:
            shutil.copy2(entry, target, follow_symlinks=False)


@contextlib.contextmanager
def atomic_directory(path: str | Path, owned: re.Pattern = CHECKPOINT_FILES) -> Iterator[Path]:
    """Write a directory all at once: yields an empty temporary sibling; on success it replaces ``path``.

    Files of an existing ``path`` whose names ``owned`` does not match are carried over. On any failure
    (``KeyboardInterrupt`` included) the temporary directory is removed and ``path`` is left as it was;
    the new directory is fsynced before it is renamed into place, so ``path`` is never a mix of both.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DepGraphError(f"{path} exists and is not a directory; pass a directory path (or remove the file)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".depgraph-{path.name}.", suffix=".tmp", dir=path.parent))
    backup: Path | None = None
    swapped = False
    try:
        yield tmp
        if path.exists():
            carry_over(path, tmp, owned)
        _fsync_tree(tmp)
        try:
            if path.exists():
                backup = Path(tempfile.mkdtemp(prefix=f".depgraph-{path.name}.", suffix=".old", dir=path.parent))
                os.rmdir(backup)  # a unique free name for the old directory
                os.rename(path, backup)
            os.rename(tmp, path)
            swapped = True
        finally:
            if not swapped and backup is not None and backup.exists() and not path.exists():
                os.rename(backup, path)  # interrupted between the two renames: put the old one back
        _fsync_dir(path.parent)
    finally:
        if not swapped:
            shutil.rmtree(tmp, ignore_errors=True)
        elif backup is not None:
            shutil.rmtree(backup, ignore_errors=True)


# ---- which class a checkpoint names: transformers' registry only ----------------------------------

def _auto_classes() -> list[tuple[str, object]]:
    """``(name, mapping)`` of every transformers ``AutoModel*`` class and its model mapping."""
    from transformers.models.auto import modeling_auto

    out = []
    for name in dir(modeling_auto):
        mapping = getattr(getattr(modeling_auto, name), "_model_mapping", None)
        if name.startswith("AutoModel") and mapping is not None and hasattr(mapping, "_model_mapping"):
            out.append((name, mapping))
    return out


def _registered(mapping, model_type: str) -> list[type]:
    """Classes registered for ``model_type`` at run time (``AutoModelForCausalLM.register``): already imported."""
    return [cls for config_cls, cls in getattr(mapping, "_extra_content", {}).items()
            if getattr(config_cls, "model_type", None) == model_type and isinstance(cls, type)]


def auto_class_names(model_type: str, cls_name: str) -> list[str]:
    """The ``AutoModel*`` classes that map ``model_type`` to the class named ``cls_name``."""
    out = []
    for auto_name, mapping in _auto_classes():
        names = mapping._model_mapping.get(model_type, ())
        names = (names,) if isinstance(names, str) else tuple(names)
        if cls_name in names or any(c.__name__ == cls_name for c in _registered(mapping, model_type)):
            out.append(auto_name)
    return out


def registered_model_class(model_type: str, cls_name: str) -> type:
    """The transformers model class ``cls_name`` for ``model_type``, found only in transformers' registry:
    the auto mappings (built-in names, or classes registered in this process), or a class transformers
    exports whose config class has that model type. Never imports a module a file names."""
    import transformers

    for _, mapping in _auto_classes():
        names = mapping._model_mapping.get(model_type, ())
        names = (names,) if isinstance(names, str) else tuple(names)
        if cls_name in names:
            cls = getattr(transformers, cls_name, None)
            if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
                return cls
        for cls in _registered(mapping, model_type):
            if cls.__name__ == cls_name:
                return cls
    # a transformers class outside the auto mappings (a base model, an encoder-only head): accepted when
    # transformers itself exports it for this model type; getattr only imports transformers' own modules
    cls = getattr(transformers, cls_name, None) if cls_name.isidentifier() else None
    if (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
            and getattr(getattr(cls, "config_class", None), "model_type", None) == model_type):
        return cls
    raise DepGraphError(f"the checkpoint names model class {cls_name!r} for model_type {model_type!r}, which is "
                        "not a transformers model class registered for that model type; refusing to import it. "
                        "If you trust the files, pass trust_remote_code=True (or register the class with "
                        "AutoModelForCausalLM.register first)")


def _model_class(state: dict, model_type: str, trust_remote_code: bool) -> type:
    try:
        return registered_model_class(model_type, state["cls"])
    except DepGraphError:
        if not trust_remote_code:
            raise
    if not isinstance(state.get("module"), str):
        raise DepGraphError(f"the checkpoint names class {state['cls']!r} but no module; it is damaged")
    module = importlib.import_module(state["module"])  # the user opted in: run the checkpoint's code
    cls = getattr(module, state["cls"], None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise DepGraphError(f"{state['module']}.{state['cls']} is not a model class; the checkpoint is damaged")
    return cls


# ---- save -------------------------------------------------------------------------------------------

def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``torch.compile`` wrapper (``OptimizedModule``), else ``model`` itself."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def _check_saveable(model: nn.Module) -> None:
    if not hasattr(model, "save_pretrained") or getattr(model, "config", None) is None:
        raise DepGraphError(f"{type(model).__name__} is not a Hugging Face PreTrainedModel; save its "
                            "state_dict with torch.save/safetensors instead")
    meta = next((n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if meta is not None:
        raise DepGraphError(f"{type(model).__name__} has no weights to save: {meta} is on the meta device "
                            "(a shape-only model); load real weights first (e.g. from_pretrained), then prune and "
                            "save; nothing was written")


def remote_code_source(model: nn.Module) -> tuple[str, dict[str, str]] | None:
    """The module file and ``auto_map`` that let transformers rebuild ``model``'s per-layer shapes.

    None when the model or config class is not a transformers class (only depgraph can reload it then).
    """
    import transformers

    cls, config_cls = type(model), type(model.config)
    if getattr(transformers, cls.__name__, None) is not cls or getattr(transformers, config_cls.__name__,
                                                                            None) is not config_cls:
        return None
    autos = auto_class_names(model.config.model_type, cls.__name__)
    if not autos:
        return None
    stem = REMOTE_CODE_FILE.removesuffix(".py")
    tail = (f"\n\n# ---- written by depgraph.save_pretrained for {cls.__name__} ----\n"
            f"from transformers import {config_cls.__name__}, {cls.__name__}  # noqa: E402\n\n\n"
            f"class DepGraph{config_cls.__name__}(LayoutConfigMixin, {config_cls.__name__}):\n"
            f"    \"\"\"{config_cls.__name__} with per-layer sizes.\"\"\"\n\n\n"
            f"class DepGraph{cls.__name__}(LayoutModelMixin, {cls.__name__}):\n"
            f"    \"\"\"{cls.__name__} with per-layer sizes (config.{LAYOUT_KEY}).\"\"\"\n\n"
            f"    config_class = DepGraph{config_cls.__name__}\n")
    auto_map = {"AutoConfig": f"{stem}.DepGraph{config_cls.__name__}"}
    auto_map.update({name: f"{stem}.DepGraph{cls.__name__}" for name in autos})
    return inspect.getsource(hf_layout) + tail, auto_map


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(encode_floats(obj), indent=1, allow_nan=False) + "\n")


def save_layout(model: nn.Module) -> dict:
    """The ``depgraph.json`` state :func:`save_pretrained` writes for ``model`` (works on the meta device):
    ``hf_compatible``, and otherwise the per-layer layout relative to the unpruned config."""
    compatible = _hf_compatible(model)
    # per-layer sizes are described relative to the original config, which always builds
    base = getattr(model, BASE_CONFIG_ATTR, None) or model.config
    if not compatible:
        base = _runtime_config(model, base)
    state = ({"shapes": {}, "attrs": {}, "configs": {}, "modules": [], "containers": {}} if compatible
             else model_diff(model, base))
    remote = None if compatible else remote_code_source(model)
    state.update(format=1, cls=type(model).__name__, module=type(model).__module__, hf_compatible=compatible,
                 base_config=None if compatible else base.to_dict(),
                 remote_code=REMOTE_CODE_FILE if remote else None)
    return state


def write_checkpoint(model: nn.Module, directory: str | Path, state: dict, weights: bool = True, **kwargs) -> None:
    """Write ``model``'s checkpoint files into ``directory`` (the caller makes it atomic): config, per-layer
    layout (``state`` from :func:`save_layout`), non-persistent buffers and, with ``weights``, the weights.

    ``weights=False`` writes everything but the weights (the streaming writer of
    :func:`depgraph.prune_checkpoint` writes those itself, tensor by tensor, under the same names).
    """
    tmp = Path(directory)
    if state["hf_compatible"]:
        if weights:
            model.save_pretrained(tmp, safe_serialization=True, **kwargs)
        else:  # what transformers' save_pretrained writes besides the weights
            model.config.architectures = [type(model).__name__]
            model.config.save_pretrained(tmp)
            if model.can_generate():
                model.generation_config.save_pretrained(tmp)
    else:
        # not config.save_pretrained: it re-validates, and per-layer sizes may break the class's checks
        config = json.loads(model.config.to_json_string(use_diff=False))
        base_values = state["base_config"]
        layout = {key: state[key] for key in hf_layout.LAYOUT_PARTS}
        layout["build"] = {k: v for k, v in base_values.items() if config.get(k) != v and _simple(v)
                           and k not in ("transformers_version", "architectures", "model_type")}
        config[LAYOUT_KEY] = encode_floats(layout)
        remote = remote_code_source(model) if state.get("remote_code") else None
        if remote:
            config["auto_map"] = remote[1]
            (tmp / REMOTE_CODE_FILE).write_text(remote[0])
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if weights:
            save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    buffers = _non_persistent_buffers(model)
    if buffers:
        save_file(buffers, str(tmp / BUFFERS_FILE))
    _write_json(tmp / STATE_FILE, state)


def save_pretrained(model: nn.Module, path: str | Path, **kwargs) -> dict:
    """Save weights (safetensors), config and the per-layer shapes; returns the saved state.

    ``state["hf_compatible"]`` says whether plain ``from_pretrained`` can reload it; then the files are
    exactly what ``model.save_pretrained`` writes. Otherwise the weights keep the model's own parameter
    names, ``depgraph.json`` and ``config.json`` hold the per-layer layout, and (for transformers classes,
    ``state["remote_code"]``) ``from_pretrained(path, trust_remote_code=True)`` reloads it without depgraph.
    The write is atomic: on any failure an existing checkpoint at ``path`` is left as it was.
    A ``torch.compile`` wrapper is unwrapped; a model on the meta device is refused before anything is written.
    """
    model = unwrap(model)
    _check_saveable(model)
    state = save_layout(model)
    with atomic_directory(path) as tmp:
        write_checkpoint(model, tmp, state, weights=True, **kwargs)
    return state


# ---- load -------------------------------------------------------------------------------------------

def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise DepGraphError(f"checkpoint {path.parent}: {path.name} is missing; the directory is incomplete "
                            "(save the model again)")
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DepGraphError(f"checkpoint {path.parent}: {path.name} cannot be read ({exc}); the {what} is "
                            "damaged or truncated: save the model again") from exc
    if not isinstance(value, dict):
        raise DepGraphError(f"checkpoint {path.parent}: {path.name} is not a JSON object; the {what} is damaged: "
                            "save the model again")
    return decode_floats(value)


def _read_state(path: Path) -> dict:
    state = _read_json(path / STATE_FILE, "depgraph state")
    if not isinstance(state.get("cls"), str) or not isinstance(state.get("hf_compatible"), bool):
        raise DepGraphError(f"checkpoint {path}: {STATE_FILE} lacks \"cls\" / \"hf_compatible\"; it is damaged or "
                            "not written by depgraph.save_pretrained: save the model again")
    if not state["hf_compatible"]:
        parts = ("shapes", "attrs", "configs")
        if not isinstance(state.get("base_config"), dict) or "model_type" not in state["base_config"] or not all(
                isinstance(state.get(k), dict) for k in parts):
            raise DepGraphError(f"checkpoint {path}: {STATE_FILE} lacks the base config or the per-layer layout "
                                f"({', '.join(parts)}); it is damaged: save the model again")
    return state


def _load_failed(path: Path, exc: BaseException) -> DepGraphError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DepGraphError(f"checkpoint {path} cannot be loaded: {first} ({type(exc).__name__}); a weights file is "
                         "missing, truncated or from another model, or the shapes do not fit the config: save the "
                         "model again")


def _load_weights(model: nn.Module, path: Path) -> tuple[list[str], list[str]]:
    """Load ``model.safetensors``, or every shard ``model.safetensors.index.json`` lists (as the streaming
    writer of :func:`depgraph.prune_checkpoint` writes them); returns ``(missing, unexpected)`` keys, where
    a tied weight saved under one of its names is not missing."""
    index = path / INDEX_FILE
    if not index.is_file():
        return load_model(model, str(path / WEIGHTS_FILE), strict=False)
    weight_map = _read_json(index, "weights index").get("weight_map")
    if not isinstance(weight_map, dict):
        raise DepGraphError(f"checkpoint {path}: {INDEX_FILE} has no weight_map; it is damaged: save the model again")
    loaded: set[int] = set()
    unexpected: list[str] = []
    tensors = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}
    for shard in sorted(set(weight_map.values())):
        values = load_file(str(path / shard))
        result = model.load_state_dict(values, strict=False)
        unexpected += result.unexpected_keys
        loaded.update(id(tensors[k]) for k in values if k in tensors)
    missing = [k for k in model.state_dict() if k in tensors and id(tensors[k]) not in loaded]
    return missing, unexpected


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    trust_remote_code: bool = False):
    """Reload a model written by :func:`save_pretrained` (uniform or per-layer sizes).

    The model class is resolved only from transformers' registry (the config's ``model_type`` and the auto
    mappings); a checkpoint naming any other class is refused unless ``trust_remote_code=True``, which
    imports the module it names. Damaged files raise :class:`DepGraphError`.
    """
    from transformers import AutoConfig

    path = Path(path)
    if not path.is_dir():
        raise DepGraphError(f"{path} is not a directory; pass the directory depgraph.save_pretrained wrote")
    if not (path / STATE_FILE).exists():
        raise DepGraphError(f"{path} has no {STATE_FILE}: it was not written by depgraph.save_pretrained "
                            "(use transformers' from_pretrained for plain checkpoints)")
    state = _read_state(path)
    pruned = _read_json(path / "config.json", "config")
    if state["hf_compatible"]:
        if not isinstance(pruned.get("model_type"), str):
            raise DepGraphError(f"checkpoint {path}: config.json has no \"model_type\"; it is damaged: save the "
                                "model again")
        cls = _model_class(state, pruned["model_type"], trust_remote_code)
        try:
            model = cls.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as exc:
            raise _load_failed(path, exc) from exc
    else:
        values = dict(state["base_config"])
        model_type = values.pop("model_type")
        cls = _model_class(state, model_type, trust_remote_code)
        try:
            try:
                base = AutoConfig.for_model(model_type, **values)
            except ValueError:  # a model type only the trusted class knows
                if not trust_remote_code or getattr(cls, "config_class", None) is None:
                    raise
                base = cls.config_class(**values)
            model = cls(base)  # a real build: buffers are computed, then overwritten below
            setattr(model, BASE_CONFIG_ATTR, copy.deepcopy(base))
            for key, value in pruned.items():  # plain attributes: no re-validation of per-layer sizes
                if key not in ("transformers_version", "architectures", "model_type", "auto_map",
                               LAYOUT_KEY) and not key.startswith("_"):
                    setattr(model.config, key, value)
            apply_layout(model, state, LayerConfig)
            missing, unexpected = _load_weights(model, path)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, LayoutError, SafetensorError) as exc:
            raise _load_failed(path, exc) from exc
        if missing or unexpected:
            raise DepGraphError(f"checkpoint {path} does not match the model: missing {sorted(missing)[:5]}, "
                                f"unexpected {sorted(unexpected)[:5]}; the weights are from another model: save "
                                "the model again")
    try:
        load_buffers(model, path)
    except (OSError, RuntimeError, SafetensorError) as exc:
        raise _load_failed(path, exc) from exc
    model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
