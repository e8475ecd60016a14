"""One atomic edit of a model: staged tensor and attribute changes, one forward check, one report base.

Every structural edit (:func:`depgraph.prune`, :func:`depgraph.remove_layers`,
:func:`depgraph.remove_experts`) records each change in a :class:`Transaction`. Used as a context
manager it rolls every change back on *any* exception, ``KeyboardInterrupt`` included, and re-raises,
so an interrupted or failed edit leaves the model exactly as it was.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import PruneError
from .sizes import LayerConfig
from .slicing import gather, gather_blocks

__all__ = ["EditReport", "Transaction", "check_forward", "count_parameters", "output_tensor", "run_forward"]

class Transaction:
    """Changes to tensors (``.data``) and attributes, each undoable, in order.

    >>> with Transaction() as t:           # any BaseException inside: rolled back, then re-raised
    ...     t.set_data(param, smaller)
    ...     t.set_attr(linear, "in_features", 60)
    """

    def __init__(self) -> None:
        self.undo: list[tuple[str, object, str, object]] = []  # (kind, object, attribute, old value)

    def set_data(self, tensor: torch.Tensor, new: torch.Tensor) -> None:
        """Replace ``tensor.data`` (same object: tied weights stay tied); a stale ``.grad`` is dropped."""
        self.undo.append(("data", tensor, "data", tensor.data))
        tensor.data = new
        if isinstance(tensor, nn.Parameter) and tensor.grad is not None:
            self.undo.append(("attr", tensor, "grad", tensor.grad))
            tensor.grad = None

    def cut_data(self, tensor: torch.Tensor, cuts: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """Replace ``tensor.data`` by its ``keep`` slices along each ``(dim, keep, drop)`` of ``cuts``.

        The undo record keeps only the dropped slices (not the whole old tensor), so the old storage is
        freed as soon as the new one is in place: a cut's peak memory is the model plus what it removes,
        not twice the model. Rollback puts the kept and dropped slices back into a tensor of the old
        shape (bit-identical values). A view into a larger storage or a non-contiguous tensor keeps the
        old tensor.
        """
        old = tensor.data
        own = old.storage_offset() == 0 and old.untyped_storage().nbytes() == old.numel() * old.element_size()
        if not own or not old.is_contiguous() or old.device.type == "meta":
            self.set_data(tensor, gather(old, [(dim, keep) for dim, keep, _ in cuts]))
            return
        # the dropped slices of stage i, taken from the old tensor restricted to the earlier stages' kept
        # slices; stages after the first share one blocked pass over the first dim's kept slices with
        # the new tensor
        cuts = sorted(cuts, key=lambda cut: cut[0])
        (dim0, keep0, drop0), later = cuts[0], cuts[1:]
        rests = [[(dim, keep) for dim, keep, _ in later]]
        rests += [[(dim, keep) for dim, keep, _ in later[:i]] + [(later[i][0], later[i][2])] for i in range(len(later))]
        new, *dropped = gather_blocks(old, (dim0, keep0), rests)
        stages, shape = [(dim0, keep0, drop0, tuple(old.shape), old.index_select(dim0, drop0))], list(old.shape)
        shape[dim0] = keep0.numel()
        for (dim, keep, drop), slices in zip(later, dropped):
            stages.append((dim, keep, drop, tuple(shape), slices))
            shape[dim] = keep.numel()
        self.undo.append(("cut", tensor, "data", stages))
        del old
        tensor.data = new
        if isinstance(tensor, nn.Parameter) and tensor.grad is not None:
            self.undo.append(("attr", tensor, "grad", tensor.grad))
            tensor.grad = None

    @staticmethod
    def _uncut(tensor: torch.Tensor, stages) -> torch.Tensor:
        data = tensor.data
        for i in range(len(stages) - 1, -1, -1):
            dim, keep, drop, before, dropped = stages[i]
            full = torch.empty(before, dtype=data.dtype, device=data.device)
            full.index_copy_(dim, keep, data)
            full.index_copy_(dim, drop, dropped)
            data = full
        return data

    def set_attr(self, obj: object, name: str, value: object) -> None:
        """``setattr(obj, name, value)``, remembering the old value (or its absence)."""
        # a LayerConfig reads the fields it does not override from its base: undo removes the override
        missing = not obj.holds(name) if isinstance(obj, LayerConfig) else not hasattr(obj, name)
        self.undo.append(("del" if missing else "attr", obj, name, None if missing else getattr(obj, name)))
        setattr(obj, name, value)

    def old_value(self, obj: object, name: str, default: object = None) -> object:
        """The value ``obj.name`` had before this transaction first changed it."""
        for kind, o, n, old in self.undo:
            if o is obj and n == name and kind not in ("data", "cut"):
                return old
        return default

    def attribute_changes(self) -> list[tuple[object, str, object]]:
        """``(object, attribute, old value)`` of every attribute change, in order."""
        return [(o, n, old) for kind, o, n, old in self.undo if kind not in ("data", "cut")]

    def rollback(self) -> None:
        """Undo every change, newest first."""
        for kind, obj, name, old in reversed(self.undo):
            if kind == "data":
                obj.data = old
            elif kind == "cut":
                with torch.no_grad():
                    obj.data = self._uncut(obj, old)
            elif kind == "del":
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        self.undo.clear()

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:  # BaseException too: Ctrl-C mid-edit must not leave a half-cut model
            self.rollback()
        return False


def count_parameters(model: nn.Module) -> int:
    """Parameters counted once each (tied weights once)."""
    return sum(p.numel() for p in model.parameters())


def output_tensor(out) -> torch.Tensor | None:
    """The main output of a forward: ``.logits``, ``last_hidden_state``, or the first tensor."""
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def run_forward(model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``model(*args, **kwargs)`` in eval mode without gradients (the mode is restored); its main output."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return output_tensor(model(*args, **kwargs))
    finally:
        model.train(was_training)


def check_forward(model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The forward check after an edit: run the model once; a failure becomes :class:`PruneError`.

    Skipped (None) for models on the ``meta`` device, which cannot compute. Only ``Exception`` is
    translated: ``KeyboardInterrupt`` propagates unchanged (the caller's :class:`Transaction` rolls back).
    """
    if any(t.device.type == "meta" for t in model.parameters()):
        return None
    try:
        return run_forward(model, args, kwargs)
    except Exception as exc:
        raise PruneError(f"the edited model no longer runs forward ({type(exc).__name__}: {str(exc)[:300]}); "
                         "the edit was rolled back and the model is unchanged") from exc


class EditReport:
    """Base of the reports of structural edits: parameter counts before/after, ratio, one-line summary.

    Subclasses (dataclasses) define ``params_before``, ``params_after`` and :meth:`describe`.
    """

    params_before: int
    params_after: int

    @property
    def ratio(self) -> float:
        """Fraction of parameters removed."""
        return 1.0 - self.params_after / max(self.params_before, 1)

    def describe(self) -> str:
        """What was removed, in words (the part of ``str(report)`` before the parameter counts)."""
        return "edited"

    def __str__(self) -> str:
        return (f"{self.describe()}: {self.params_before:,} -> {self.params_after:,} parameters "
                f"({self.ratio:.1%} removed)")
