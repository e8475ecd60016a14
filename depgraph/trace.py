"""Tracing: turn an ``nn.Module`` into an exported FX graph, with errors that say what to try.

``torch.export.export(strict=False)`` is used for every model: it handles Hugging Face
transformers (which ``torch.fx.symbolic_trace`` cannot) as well as plain modules, works on
the ``meta`` device (fake tensors, so a 70B config needs no RAM for weights), and records
the module path of every node (``nn_module_stack``) and the parameter behind every input.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import traceback
from typing import Any

import torch
from torch import nn

from . import calibration
from .errors import CalibrationError, TraceError, UnsupportedModelError


def model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _accepts_use_cache(model: nn.Module) -> bool:
    """``use_cache`` is a named parameter, or the model has a cache and takes ``**kwargs``."""
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params:
        return True
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return takes_kwargs and hasattr(getattr(model, "config", None), "use_cache")


def default_inputs(model: nn.Module, batch: int = 2, seq_len: int = 8) -> tuple[tuple, dict[str, Any]]:
    """Example inputs built from the model's config: token ids for a transformer."""
    config = getattr(model, "config", None)
    device = model_device(model)
    if config is None:
        raise TraceError(
            f"{type(model).__name__} has no `config`, so depgraph cannot build example inputs: "
            "pass example_inputs=(tensor, ...) to depgraph.trace"
        )
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text_config, "vocab_size", None) or 2
    max_pos = getattr(text_config, "max_position_embeddings", None) or seq_len
    seq_len = max(2, min(seq_len, int(max_pos)))
    ids = torch.arange(batch * seq_len, device="cpu").reshape(batch, seq_len) % max(int(vocab) - 1, 1) + 1
    kwargs: dict[str, Any] = {}
    if _accepts_use_cache(model):
        kwargs["use_cache"] = False
    return (ids.to(device),), kwargs


def adapter_layers(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that carry peft adapters (LoRA and the other peft tuners)."""
    peft = sys.modules.get("peft")  # a model cannot hold peft layers unless peft was imported
    if peft is None:
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def refuse_adapters(model: nn.Module) -> None:
    """Refuse a peft-wrapped model: its adapter ranks would be traced as prunable channels and the base
    layers' sizes cut under peft's feet (stale ``intermediate_size``, stale LoRA ``r``)."""
    wrapped = adapter_layers(model)
    if wrapped:
        shown = ", ".join(wrapped[:3]) + (f" and {len(wrapped) - 3} more" if len(wrapped) > 3 else "")
        raise UnsupportedModelError(
            f"{type(model).__name__} carries peft adapters ({shown}): depgraph cannot prune through them "
            "(the adapter ranks and peft's config would go stale). Merge them first "
            "(model = model.merge_and_unload()) or prune the base model and attach the adapters afterwards."
        )


def normalise_inputs(model: nn.Module, example_inputs) -> tuple[tuple, dict[str, Any]]:
    """Accept a tensor, a tuple/list of args, a dict of kwargs, or (args, kwargs).

    Refuses peft-wrapped models and example token ids the model cannot embed (before any tracing)."""
    refuse_adapters(model)
    if example_inputs is None:
        return default_inputs(model)
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif (isinstance(example_inputs, tuple) and len(example_inputs) == 2
          and isinstance(example_inputs[0], tuple) and isinstance(example_inputs[1], dict)):
        args, kwargs = example_inputs
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise TraceError(
            f"example_inputs must be a tensor, a tuple of tensors, a dict of keyword inputs or "
            f"(args, kwargs); got {type(example_inputs).__name__}"
        )
    check_example_ids(model, args, kwargs)
    if _accepts_use_cache(model) and "use_cache" not in kwargs:
        kwargs["use_cache"] = False  # a KV cache is state, not structure
    return args, kwargs


def check_example_ids(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """Refuse token ids the model cannot embed (outside ``[0, vocab_size)``, not integers) here, rather
    than tracing them and letting the next prune's forward check fail for a reason it cannot name.

    Checked: ``input_ids=`` and an integer first positional input of a model with a vocabulary.
    """
    vocab = calibration.vocab_size(model)
    if vocab is None:
        return
    found = [("example_inputs['input_ids']", kwargs["input_ids"])] if "input_ids" in kwargs else []
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        found.append(("example_inputs[0]", args[0]))
    for what, ids in found:
        if ids is None:
            continue
        try:
            calibration.check_ids(ids, vocab, what)
        except CalibrationError as exc:
            raise TraceError(f"{exc}. Pass example ids in [0, {vocab - 1}] (or leave example_inputs=None "
                             "to build valid ones from the config).") from exc


def _failing_module(model: nn.Module, tb) -> str | None:
    """The innermost module of ``model`` whose forward was running when tracing failed."""
    names = {id(m): n for n, m in model.named_modules()}
    found = None
    for frame, _ in traceback.walk_tb(tb):
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            found = f"{names[id(owner)] or '<root>'} ({type(owner).__name__})"
    return found


def export(model: nn.Module, example_inputs=None) -> torch.export.ExportedProgram:
    """Export ``model`` (eval mode, no grad) to an FX graph; raise :class:`TraceError` on failure."""
    if not isinstance(model, nn.Module):
        raise TraceError(f"depgraph.trace expects a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = normalise_inputs(model, example_inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), contextlib.redirect_stderr(sys.stderr):
            return torch.export.export(model, args, kwargs=kwargs, strict=False)
    except TraceError:
        raise
    except Exception as exc:  # torch raises many types here; all become one named error
        where = _failing_module(model, exc.__traceback__)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise TraceError(
            f"could not trace {type(model).__name__}"
            + (f": failed in module {where}" if where else "")
            + f": {type(exc).__name__}: {first}. Try passing example_inputs that the model's forward "
            "accepts (e.g. example_inputs=(input_ids,) or a dict of keyword inputs), a different "
            "input shape, or make the failing module traceable by torch.export (no data-dependent "
            "Python control flow)."
        ) from exc
    finally:
        model.train(was_training)
