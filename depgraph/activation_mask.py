"""Zero weight slices without touching the weights: mask the module's input or output features instead.

Zeroing input columns of a linear layer computes exactly what zeroing those features of its input
does (every product with a zeroed factor is zero), and zeroing output rows what setting those output
features to the bias does. Doing it with forward hooks instead of ``index_fill_`` on the weights means no
copies to save and restore, which on a large model is most of the cost (time and memory) of the
zero-masked reference a cut is checked against.

>>> lin = torch.nn.Linear(4, 3)
>>> with masked_activations(lin, [(lin.weight, 1, torch.tensor([0, 2]))]) as rest:
...     y = lin(torch.ones(1, 4))
>>> rest
[]
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = ["masked_activations"]

Slice = tuple[torch.Tensor, int, torch.Tensor]  # (weight, dim, indices to zero)

# module class -> {weight dim: side of the module whose last dim that weight dim indexes}; only classes
# whose own forward is used (a subclass that overrides forward may read its weight differently)
_SIDES: dict[type, dict[int, str]] = {
    nn.Linear: {1: "input", 0: "output"},
    Conv1D: {0: "input", 1: "output"},  # transformers' GPT-2 style [in, out] weight
    nn.Embedding: {1: "output"},
}


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    owners: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for module in model.modules():
        for attr, param in module._parameters.items():
            if param is not None:
                owners[id(param)].append((module, attr))
    return owners


def _side(module: nn.Module, attr: str, dim: int) -> str | None:
    if attr != "weight" or module._forward_hooks or module._forward_pre_hooks:
        return None  # a hook of someone else's would run before or after the mask and see other values
    for cls, sides in _SIDES.items():
        if type(module).forward is cls.forward and isinstance(module, cls):
            if isinstance(module, nn.Embedding) and module.max_norm is not None:
                return None  # renormalises its weight rows in place during forward
            return sides.get(dim)
    return None


@contextlib.contextmanager
def masked_activations(model: nn.Module, slices: list[Slice]) -> Iterator[list[Slice]]:
    """Within the block, ``model`` computes as if every weight slice of ``slices`` were zero, for the slices
    that can be expressed as masked features (the weight of ``Linear``, transformers ``Conv1D`` or
    ``Embedding`` modules: every module holding it, for tied weights); yields the slices it could not express, for the caller to
    zero in the weights. Hooks are removed on exit, also on errors. Modules that already have forward hooks
    (or any global module hook exists) are not hooked; a hooked module the block never calls (its weight read
    some other way, e.g. ``nn.MultiheadAttention.out_proj``) raises ``RuntimeError`` on exit."""
    # global module hooks (``register_module_forward_hook``) see every module's output: zero weights instead
    global_hooks = nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
    owners = {} if global_hooks else _owners(model)
    masks: dict[tuple[int, str], tuple[nn.Module, list[torch.Tensor]]] = {}
    rest: list[Slice] = []
    for tensor, dim, index in slices:
        found = owners.get(id(tensor), [])
        sides = [_side(module, attr, dim) for module, attr in found]
        if not sides or None in sides:  # a tied weight: every module that uses it must be maskable
            rest.append((tensor, dim, index))
            continue
        for (module, _), side in zip(found, sides):
            masks.setdefault((id(module), side), (module, []))[1].append(index.to(tensor.device))
    handles, calls = [], [0] * len(masks)
    try:
        for k, ((_, side), (module, indices)) in enumerate(masks.items()):
            index = torch.unique(torch.cat(indices))
            if side == "input":
                handles.append(module.register_forward_pre_hook(_input_mask(index, calls, k)))
            else:
                handles.append(module.register_forward_hook(_output_mask(index, calls, k)))
        yield rest
        if calls and not all(calls):  # a module whose weight is read without calling it: nothing was masked
            never = [type(module).__name__ for (module, _), n in zip(masks.values(), calls) if not n]
            raise RuntimeError(f"masked modules never called ({', '.join(never[:3])}): their weights are read "
                               "some other way; zero the weights instead")
    finally:
        for handle in handles:
            handle.remove()


def _input_mask(index: torch.Tensor, calls: list[int], k: int):
    def hook(module, args):
        calls[k] += 1
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError(f"{type(module).__name__} was called without a tensor input to mask")
        x = args[0].clone()  # the caller's tensor is not changed
        x.index_fill_(-1, index.to(x.device), 0)
        return (x, *args[1:])
    return hook


def _output_mask(index: torch.Tensor, calls: list[int], k: int):
    def hook(module, args, out):
        calls[k] += 1
        out = out.clone()  # a module may return a tensor something else holds: never write into it
        bias = getattr(module, "bias", None)
        idx = index.to(out.device)
        if isinstance(bias, torch.Tensor):  # zero weight rows leave the bias: y = 0 + b
            out.index_copy_(-1, idx, bias.index_select(0, idx.to(bias.device)).to(out.device, out.dtype).expand(
                *out.shape[:-1], idx.numel()).contiguous())
        else:
            out.index_fill_(-1, idx, 0)
        return out
    return hook
