"""Calibration: how data enters a model for scoring, importance and sparsity (one owner).

Every pass that runs calibration data through a model (importance criteria, block and expert importance,
Wanda sparsity, the trace's example inputs) goes through here:

* :func:`check_ids` / :func:`batches` normalise and validate batches: token ids must be an integer
  tensor of rank 1 (``[L]``) or 2 (``[N, L]``) with every id in ``[0, vocab_size)``; a bad batch raises
  :class:`~depgraph.errors.CalibrationError` naming the allowed range and the offending value, before any
  forward pass runs;
* :func:`forward` runs one batch without a KV cache (memory spent on nothing during calibration);
* :func:`eval_mode` puts every module in eval mode and restores each one's own flag afterwards;
* :func:`layer_index` reads the decoder-layer index out of a module or parameter path.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .errors import CalibrationError, DepGraphError

__all__ = [
    "batches",
    "check_ids",
    "eval_mode",
    "first_tensor",
    "forward",
    "layer_index",
    "layer_prefix",
    "no_cache_kwargs",
    "require_values",
    "restore_modes",
    "set_eval",
    "to_device",
    "vocab_size",
]

_INT = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


def vocab_size(model: nn.Module) -> int | None:
    """Number of token ids ``model`` accepts: its input embedding's rows, else its (text) config's
    ``vocab_size``; None when neither is known (a model that does not take token ids)."""
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):  # transformers raises for models without one
            emb = None
        if isinstance(emb, nn.Embedding):
            return int(emb.num_embeddings)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    size = getattr(config, "vocab_size", None)
    return int(size) if isinstance(size, int) and size > 0 else None


def check_ids(ids: torch.Tensor, vocab: int | None, what: str = "calib") -> torch.Tensor:
    """Validate a token-id tensor: integer dtype, rank 1 or 2, non-empty, ids in ``[0, vocab)``.

    Returns ``ids`` unchanged; raises :class:`CalibrationError` naming ``what``, the allowed range and
    the first offending value.
    """
    if not isinstance(ids, torch.Tensor):
        raise CalibrationError(f"{what}: token ids must be a tensor, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise CalibrationError(f"{what}: token ids must be an integer tensor (torch.long), got dtype {ids.dtype}; "
                            "tokenize text first (depgraph.data.calibration_batches)")
    if ids.dim() not in (1, 2):
        raise CalibrationError(f"{what}: token ids must be [L] or [N, L], got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise CalibrationError(f"{what}: token ids are empty (shape {tuple(ids.shape)})")
    if ids.device.type == "meta":  # no values to check
        return ids
    lo, hi = int(ids.min()), int(ids.max())
    top = "" if vocab is None else f"{vocab - 1}"
    if lo < 0:
        raise CalibrationError(f"{what}: token id {lo} is negative; ids must be in [0, {top or 'vocab_size'}]")
    if vocab is not None and hi >= vocab:
        raise CalibrationError(f"{what}: token id {hi} is out of range: the model's vocabulary has {vocab} ids, so "
                            f"ids must be in [0, {top}]; is the tokenizer the model's own?")
    return ids


def batches(calib: Any, vocab: int | None = None, ids_only: bool = False, what: str = "calib") -> list:
    """Normalise calibration data into a list of batches, each validated.

    ``calib``: integer ids ``[N, L]`` (N batches ``[1, L]``) or ``[L]`` (one), a dict of model keyword
    inputs (one batch), or a list/tuple whose items are batches (id tensors ``[L]`` or ``[B, L]``, dicts,
    or tuples of positional inputs). A floating-point tensor is one batch of model input (a non-LM model)
    unless ``ids_only``. Id tensors (and a dict's ``input_ids``) are checked by :func:`check_ids`.
    """
    if calib is None:
        raise CalibrationError(f"{what} is None: pass token ids ([N, L] LongTensor or a list of batches), e.g. "
                            "depgraph.data.calibration_batches(text, tokenizer=tok)")
    if isinstance(calib, torch.Tensor):
        if calib.is_floating_point() and not ids_only:
            return [calib]
        check_ids(calib, vocab, what)
        return [row[None] for row in calib] if calib.dim() == 2 else [calib[None]]
    if isinstance(calib, Mapping):
        items = [calib]
    elif isinstance(calib, (str, bytes)):
        raise CalibrationError(f"{what} is text: tokenize it first, e.g. depgraph.data.calibration_batches(text, "
                            "tokenizer=tok)")
    else:
        try:
            items = list(calib)
        except TypeError:
            raise CalibrationError(f"{what} must be token ids, a dict of model inputs or a list of batches, got "
                                f"{type(calib).__name__}") from None
    if not items:
        raise CalibrationError(f"{what} is empty; pass at least one batch of token ids")
    out = []
    for i, item in enumerate(items):
        where = f"{what}[{i}]" if len(items) > 1 or not isinstance(calib, Mapping) else what
        if isinstance(item, torch.Tensor):
            if item.is_floating_point() and not ids_only:
                out.append(item)
                continue
            check_ids(item, vocab, where)
            out.append(item[None] if item.dim() == 1 else item)
        elif isinstance(item, Mapping):
            ids = item.get("input_ids")
            if ids is not None:
                check_ids(ids, vocab, f"{where}['input_ids']")
            out.append(item)
        elif isinstance(item, tuple) and not ids_only:
            out.append(item)
        else:
            raise CalibrationError(f"{where}: a batch must be a token-id tensor or a dict of model inputs, got "
                                f"{type(item).__name__}")
    return out


def require_values(model: nn.Module, what: str) -> None:
    """Refuse a model whose weights live on the ``meta`` device (shapes, no values) for ``what``, a step
    that reads weights or runs a forward pass, before it fails inside torch."""
    if any(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()]):
        raise DepGraphError(f"{what} needs real weights, but {type(model).__name__} is on the meta device "
                            "(shapes only): load the weights first (meta models can be traced, planned and "
                            "cut, and scored with criterion='random')")


def to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor in it (nested dicts/tuples/lists) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def no_cache_kwargs(model: nn.Module) -> dict[str, Any]:
    """``{"use_cache": False}`` when ``model.forward`` takes ``use_cache``, else ``{}``."""
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


def forward(model: nn.Module, batch: Any, device: torch.device | str | None = None) -> Any:
    """One forward pass of ``batch`` (ids, a dict of keyword inputs, or a tuple of positional inputs)
    without a KV cache, its tensors moved to ``device`` (default: the model's first parameter's)."""
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batch = to_device(batch, device)
    no_cache = no_cache_kwargs(model)
    if isinstance(batch, Mapping):
        return model(**{**no_cache, **batch})
    if isinstance(batch, (tuple, list)):
        return model(*batch, **no_cache)
    return model(batch, **no_cache)


def set_eval(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Put ``model`` in eval mode; returns every module's previous flag for :func:`restore_modes`."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    return modes


def restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    """Give every module back the training flag :func:`set_eval` saved (``model.train(flag)`` would
    overwrite submodules that were deliberately left in another mode)."""
    for m, training in modes:
        m.training = training


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block; afterwards every module gets back its own training flag (even on error)."""
    modes = set_eval(model)
    try:
        yield model
    finally:
        restore_modes(modes)


def first_tensor(value: Any) -> torch.Tensor | None:
    """The hidden state in a block's input/output: a tensor, or the first item of a tuple/ModelOutput."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):  # ModelOutput is an OrderedDict of its non-None fields
        value = list(value.values())
    if isinstance(value, (tuple, list)) and value:
        return first_tensor(value[0])
    return None


def layer_index(path: str) -> int | None:
    """Decoder-layer index in a module/parameter path: its first integer component
    (``model.layers.3.mlp.up_proj.weight`` -> 3); None when it has none."""
    hit = _INT.search(path)
    return int(hit.group(1)) if hit else None


def layer_prefix(path: str) -> str:
    """The path up to and including its first integer component (``model.layers.3``); "" when none."""
    hit = _INT.search(path)
    return path[: hit.end()] if hit else ""
