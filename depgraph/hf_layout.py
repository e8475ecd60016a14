"""Per-layer layout of a pruned model, applied to a fresh build; also the remote code of its checkpoints.

A non-uniform cut (other sizes in each layer) leaves a model that a Hugging Face config cannot describe.
The *layout* is the difference between the pruned model and a fresh build of its class: parameter
shapes, module attributes, per-module config copies and module-list entries. :func:`apply_layout`
turns a fresh build into the pruned shape (the weights are loaded afterwards).

This file is self-contained (it imports only torch, safetensors and transformers, never depgraph):
:func:`depgraph.save_pretrained` copies it verbatim into non-uniform checkpoints, followed by two small
subclasses of the model's own config and model classes (:class:`LayoutConfigMixin`,
:class:`LayoutModelMixin`), and names them in ``config.json``'s ``auto_map``. So
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` rebuilds the pruned model
without depgraph installed.
"""

from __future__ import annotations

import copy
import os

import torch

LAYOUT_KEY = "depgraph_layout"  # config.json field holding the layout
BUFFERS_FILE = "depgraph_buffers.safetensors"  # non-persistent buffers whose values matter
LAYOUT_PARTS = ("containers", "configs", "attrs", "shapes")


class LayoutError(ValueError):
    """The layout names modules or entries that a fresh build does not have."""


def apply_layout(model: torch.nn.Module, layout: dict, layer_config=None) -> None:
    """Give a fresh build of the pruned model's class the pruned per-layer shapes, in place.

    ``layer_config(base, overrides)`` builds a module's own config; by default a detached copy
    (remote code cannot import depgraph), depgraph's loader passes its live ``LayerConfig``.

    ``layout`` maps ``containers`` (module lists keeping only some entries), ``configs`` (per-module
    config copies: their fields that differ from ``model.config``), ``attrs`` (module attributes) and
    ``shapes`` (parameter / buffer shapes; values are left uninitialised for the weights to fill).
    """
    modules = dict(model.named_modules())
    for path, keys in layout.get("containers", {}).items():
        entries = _module(modules, path)._modules
        if any(k not in entries for k in keys):
            raise LayoutError(f"{path} holds entries {keys[:5]}, which a fresh build does not have "
                              f"({list(entries)[:5]})")
        _module(modules, path)._modules = type(entries)((k, entries[k]) for k in keys)
    modules = dict(model.named_modules())
    for path, diff in layout.get("configs", {}).items():
        if layer_config is not None:
            _module(modules, path).config = layer_config(model.config, dict(diff))
            continue
        local = copy.copy(model.config)  # plain attributes: per-layer sizes may break the class's checks
        for key, value in diff.items():
            setattr(local, key, value)
        _module(modules, path).config = local
    for path, attrs in layout.get("attrs", {}).items():
        module = _module(modules, path)
        for key, value in attrs.items():
            setattr(module, key, tuple(value) if isinstance(value, list) else value)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    for name, shape in layout.get("shapes", {}).items():
        if name not in tensors:
            raise LayoutError(f"tensor {name} of the layout is not in a fresh build")
        old = tensors[name]
        old.data = torch.empty(shape, dtype=old.dtype, device=old.device)


def _module(modules: dict, path: str) -> torch.nn.Module:
    if path not in modules:
        raise LayoutError(f"module {path or '(root)'} of the layout is not in a fresh build")
    return modules[path]


def load_buffers(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Overwrite non-persistent buffers (rotary tables, embedding scales) with the saved values, if saved."""
    path = os.path.join(os.fspath(directory), BUFFERS_FILE)
    if not os.path.isfile(path):
        return
    from safetensors.torch import load_file

    buffers = dict(model.named_buffers())
    for name, value in load_file(path).items():
        if name in buffers:
            buffers[name].data = value.to(device=buffers[name].device, dtype=buffers[name].dtype)


class LayoutConfigMixin:
    """Config of a pruned checkpoint: the base class's uniform-layer checks do not apply to it."""

    def validate(self) -> None:
        """Per-layer sizes (``depgraph_layout``) may break the base class's checks (hidden % heads)."""


class LayoutModelMixin:
    """Model of a pruned checkpoint: builds the base class, then applies ``config.depgraph_layout``."""

    def __init__(self, config, *args, **kwargs):
        layout = getattr(config, LAYOUT_KEY, None) or {}
        build = layout.get("build", {})  # the unpruned values: the base class builds uniform layers from them
        pruned = {key: getattr(config, key, None) for key in build}
        for key, value in build.items():
            setattr(config, key, value)
        try:
            super().__init__(config, *args, **kwargs)
        finally:
            for key, value in pruned.items():
                setattr(config, key, value)
        apply_layout(self, layout)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """The base class's ``from_pretrained``, then the saved non-persistent buffers (local directories)."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if os.path.isdir(os.fspath(pretrained_model_name_or_path)):
            load_buffers(model, pretrained_model_name_or_path)
        return model
