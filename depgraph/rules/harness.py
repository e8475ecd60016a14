"""Test one op rule on hand-written shapes, without tracing a model (see docs/adding-rules.md).

``run_rule`` builds a one-op FX graph from the op and its arguments (tensors given as :class:`Input` /
:class:`Param` shapes), runs the registered rule exactly as the graph builder does, and answers
questions in terms of *dims*, written ``"name:d"`` (``"x:2"``; the op's result is ``"out"``, or
``"out0"``, ``"out1"``, ... for ops returning several tensors; ``"out:1[0:8]"`` is a slice of a dim)::

    run = run_rule(aten.linear.default, Input(2, 5, 8, name="x"), Param(16, 8, name="w"))
    run.assert_couplings("x:0 = out:0", "x:1 = out:1", "x:2 = w:1", "w:0 = out:2")

Two dims are *coupled* when index ``i`` of one is the same neuron as index ``i`` of the other (after
closing over every edge the rule added, as the graph does); a dim is *frozen* when the rule (or
anything coupled with it) marks its neurons as never cut.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx

from ..groups import components, frozen_components
from .context import Axis, RuleContext, is_multi
from .registry import apply_rule

_REF = re.compile(r"^(?P<name>[A-Za-z_][\w.]*):(?P<dim>-?\d+)(\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$")


class Input:
    """An activation of the given shape (``Input(2, 8, 64)``), or with given ``values`` (an index tensor).

    ``constant=True``: the values are a constant written in the model's code (``x[..., [-2], :]``),
    as ``torch.export`` lifts them; rules may read them.
    """

    def __init__(self, *shape: int, name: str | None = None, values: torch.Tensor | None = None,
                 constant: bool = False, dtype: torch.dtype = torch.float32):
        if values is None:
            values = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        elif shape and tuple(values.shape) != shape:
            raise ValueError(f"values have shape {tuple(values.shape)}, not {shape}")
        self.values = values
        self.name = name
        self.constant = constant

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)


class Param(Input):
    """A parameter (weight) of the given shape: the rule records how it uses each dim (``run.roles``)."""


@dataclass
class RuleRun:
    """The outcome of one rule on one node: the dims' neurons, their couplings, what is frozen."""

    ctx: RuleContext
    node: fx.Node
    axes: dict[str, list[Axis]]
    fell_back: bool  # no rule, or the rule returned NotImplemented / could not read this variant
    _labels: np.ndarray | None = field(default=None, repr=False)

    # ---- resolving dims ----------------------------------------------------------------------
    @property
    def labels(self) -> np.ndarray:
        """Component (neuron) label of every id, after closing over the rule's couplings."""
        if self._labels is None:
            self._labels = components(self.ctx.next_id, self.ctx.edge_a, self.ctx.edge_b)
        return self._labels

    def ids(self, ref: str) -> np.ndarray:
        """The neuron ids of a dim (``"x:1"``, ``"out:-1"``, ``"out:1[0:8]"``)."""
        match = _REF.match(ref.replace(" ", ""))
        if match is None:
            raise ValueError(f"not a dim: {ref!r} (write 'name:dim' or 'name:dim[start:stop]')")
        name, dim = match["name"], int(match["dim"])
        if name not in self.axes:
            raise KeyError(f"no tensor {name!r}; known: {sorted(self.axes)}")
        ids = self.axes[name][dim].ids
        if match.group(3):
            ids = ids[slice(int(match["start"]) if match["start"] else None,
                            int(match["stop"]) if match["stop"] else None)]
        return ids

    def dims(self) -> list[str]:
        """Every dim of every input and output, ``"name:d"``."""
        return [f"{name}:{d}" for name, axes in self.axes.items() for d in range(len(axes))]

    def _check(self) -> None:
        if self.fell_back:
            raise AssertionError(f"no rule handled {self.node.target}: it falls back to the conservative rule "
                                 "(everything it touches frozen)")

    # ---- questions ---------------------------------------------------------------------------
    def same(self, a: str, b: str) -> bool:
        """Is index ``i`` of dim ``a`` the same neuron as index ``i`` of dim ``b``, for every ``i``?"""
        la, lb = self.labels[self.ids(a)], self.labels[self.ids(b)]
        return la.shape == lb.shape and bool(np.array_equal(la, lb))

    def couplings(self) -> set[frozenset[str]]:
        """Classes of whole dims (longer than 1) that are the same neurons index by index (each class
        has at least two dims)."""
        by_labels: dict[bytes, set[str]] = {}
        for ref in self.dims():
            ids = self.ids(ref)
            if ids.size > 1:
                by_labels.setdefault(self.labels[ids].tobytes(), set()).add(ref)
        return {frozenset(c) for c in by_labels.values() if len(c) > 1}

    def assert_couplings(self, *expected: str) -> None:
        """Assert the couplings are exactly ``expected``: each a class written ``"x:1 = w:0 = out:1"``."""
        self._check()
        want = {frozenset(part.strip() for part in cls.split("=")) for cls in expected}
        got = self.couplings()
        if want != got:
            def show(classes):
                return sorted(" = ".join(sorted(c)) for c in classes)
            raise AssertionError(f"couplings of {self.node.target} differ:\n  missing: {show(want - got)}"
                                 f"\n  unexpected: {show(got - want)}")

    @property
    def frozen(self) -> set[str]:
        """Dims every index of which is frozen (never cut)."""
        return {ref for ref in self.dims() if self.frozen_mask(ref).all()}

    def frozen_mask(self, ref: str) -> np.ndarray:
        """Per index of a dim: is that neuron frozen?"""
        mask = frozen_components(self.labels, self.ctx.frozen)
        return mask[self.labels[self.ids(ref)]] if mask.size else np.zeros(self.ids(ref).size, dtype=bool)

    @property
    def products(self) -> list[str]:
        """Reshape relations, ``"x:2 = out:2 * out:3"`` (``whole`` is the row-major product of the factors)."""
        out = []
        for rel in self.ctx.relations:
            out.append(f"{self._name_of(rel.whole)} = " + " * ".join(self._name_of(f) for f in rel.factors))
        return out

    def _name_of(self, ids: np.ndarray) -> str:
        labels = self.labels[ids]
        for ref in self.dims():
            if np.array_equal(self.labels[self.ids(ref)], labels):
                return ref
        return f"<{ids.size} new neurons>"

    @property
    def heads(self) -> set[str]:
        """Dims the rule marks as attention heads."""
        marked = {int(x) for ids in self.ctx.head_ids for x in self.labels[ids]}
        return {ref for ref in self.dims() if self.ids(ref).size > 1
                and all(int(x) in marked for x in self.labels[self.ids(ref)])}

    @property
    def roles(self) -> dict[str, set[str]]:
        """How the op uses each parameter dim: ``{"w:1": {"in"}, "w:0": {"out"}}``."""
        out: dict[str, set[str]] = {}
        for use in self.ctx.uses:
            out.setdefault(f"{use.param}:{use.dim}", set()).add(use.role)
        return out

    @property
    def sized(self) -> set[str]:
        """Dims whose length the code writes (split sizes, reshape factors that are not ``-1``)."""
        return {ref for ref in self.dims() for s in self.ctx.sized
                if self.ids(ref).size and np.array_equal(self.ids(ref), s.ids)}


def run_rule(op, *args, **kwargs) -> RuleRun:
    """Run ``op``'s registered rule on a one-op graph: ``args`` / ``kwargs`` as the op takes them, with
    :class:`Input` / :class:`Param` in place of tensors (named ``x0``, ``x1``, ... in order unless named;
    lists of them work too, e.g. for ``cat``). The op is also run on the values, so its result's shape
    is the real one."""
    graph = fx.Graph()
    ctx = RuleContext()
    axes: dict[str, list[Axis]] = {}
    count = [0]

    def lift(arg):
        if isinstance(arg, (list, tuple)):
            return type(arg)(lift(a) for a in arg)
        if not isinstance(arg, Input):
            return arg
        name = arg.name or f"x{count[0]}"
        count[0] += 1
        if name in axes or name.startswith("out"):
            raise ValueError(f"tensor name {name!r} is taken (names must be unique and not start with 'out')")
        node = graph.placeholder(name)
        node.meta["val"] = arg.values
        axes[name] = [Axis(f"{name}:{d}", ctx.new_ids(s)) for d, s in enumerate(arg.shape)]
        ctx.axes[node.name] = axes[name]
        if isinstance(arg, Param):
            ctx.param_of_node[node.name] = name
        if arg.constant:
            ctx.constants[node.name] = arg.values
        return node

    def value(arg):
        if isinstance(arg, (list, tuple)):
            return type(arg)(value(a) for a in arg)
        return arg.values if isinstance(arg, Input) else arg

    node_args, node_kwargs = lift(args), {k: lift(v) for k, v in kwargs.items()}
    node = graph.call_function(op, node_args, node_kwargs)
    node.meta["val"] = op(*value(args), **{k: value(v) for k, v in kwargs.items()})
    ctx.current = node
    ctx.order += 1
    result = apply_rule(ctx, node)
    fell_back = result is NotImplemented
    if not fell_back and result is not None:
        ctx.axes[node.name] = result
        parts = result if is_multi(result) else [result]
        values = node.meta["val"] if is_multi(result) else [node.meta["val"]]
        for k, (part, val) in enumerate(zip(parts, values)):
            if part is None:
                continue
            # the rule's axes must describe the op's real result, dim by dim
            sizes = [a.size for a in part]
            if sizes != list(getattr(val, "shape", ())):
                raise AssertionError(f"the rule for {op} returned axes of sizes {sizes} for a result of shape "
                                     f"{tuple(getattr(val, 'shape', ()))}")
            axes[f"out{k}" if is_multi(result) else "out"] = part
    return RuleRun(ctx, node, axes, fell_back)
