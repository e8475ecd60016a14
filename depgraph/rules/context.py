"""The small API that op rules use to describe how channels flow through one op.

Every dimension of every tensor (and of every parameter) is an :class:`Axis`: an array
holding one *neuron id* per index along that dimension. Rules say how output axes relate
to input axes:

* ``same``      the output axis *is* the input axis (ids shared; pointwise ops, views);
* ``couple``    two axes of equal size are the same neurons index by index (a residual add,
                a norm weight multiplying the hidden state, the contraction of a matmul);
* ``product``   an axis is the row-major product of other axes (reshape splits/merges);
* ``freeze``    these neurons must never be cut (indexed by data, part of the model's
                interface, or touched by an op the rules do not understand).

Neuron ids are plain integers; coupling records an edge between ids. Groups are the
connected components of those edges (see :mod:`depgraph.groups`), which is LLM-Pruner's
trigger propagation run to closure for every trigger at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch.fx as fx


def is_multi(value) -> bool:
    """Is ``value`` (a node's entry in ``RuleContext.axes``) one axis list per output of a multi-output op?
    An output without axes is ``None`` there (it may be the first); a single output is a list of axes."""
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(p is None or isinstance(p, list) for p in value))


@dataclass(eq=False)
class Axis:
    """One dimension of one tensor: ``ids[i]`` is the neuron id of index ``i``."""

    key: str
    ids: np.ndarray

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])


@dataclass
class Relation:
    """``whole`` is the row-major product of ``factors`` (a reshape split or merge)."""

    whole: np.ndarray
    factors: list[np.ndarray]
    where: str
    preferred: np.ndarray | None = None  # the factor the code leaves to torch (-1), if any


class SizedLength(NamedTuple):
    """An axis whose length is written in a module's code (see :meth:`RuleContext.sized_by_code`)."""

    ids: np.ndarray  # the axis' neuron ids
    size: int  # the length the code writes
    where: str  # op and module, for messages
    path: str  # the module whose forward writes it
    reshape: bool  # a reshape factor (True) or a split size (False)
    # a reshape factor beside a ``-1`` (``view(b, s, self.nh, -1)``): a stale length re-splits the axis
    # silently (the ``-1`` absorbs the difference) instead of failing
    beside_inferred: bool = False


@dataclass
class ParamUse:
    """How an op uses one dimension of a parameter (for classification and scoring)."""

    param: str
    dim: int
    role: str  # "out" (produces channels), "in" (contracts channels), "scale", "bias", "embed"
    node: str
    order: int


@dataclass
class RuleContext:
    """State shared by all rules while one graph is analysed."""

    next_id: int = 0
    axes: dict[str, list[Axis] | list[list[Axis]] | None] = field(default_factory=dict)
    edge_a: list[np.ndarray] = field(default_factory=list)
    edge_b: list[np.ndarray] = field(default_factory=list)
    frozen: list[tuple[np.ndarray, str]] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)
    head_ids: list[np.ndarray] = field(default_factory=list)
    embed_ids: list[np.ndarray] = field(default_factory=list)
    uses: list[ParamUse] = field(default_factory=list)
    param_of_node: dict[str, str] = field(default_factory=dict)
    # views of a parameter (``w.t()``, ``w.to(dtype)``): node -> (parameter node, source dim per dim)
    param_views: dict[str, tuple[str, list[int]]] = field(default_factory=dict)
    unknown: list[tuple[str, str, np.ndarray]] = field(default_factory=list)
    axis_edges: list[tuple[str, str, str]] = field(default_factory=list)
    merged: dict[tuple[int, int, int], tuple[np.ndarray, list[Axis]]] = field(default_factory=dict)
    mixed: list[np.ndarray] = field(default_factory=list)
    expert_params: set[str] = field(default_factory=set)  # weights read by grouped (MoE) matmuls
    # axes made by broadcasting a size-1 dim to a length the code wrote (``x.expand(b, n, s, d)``)
    broadcast: list[tuple[np.ndarray, str]] = field(default_factory=list)
    # lengths the code writes (split sizes, reshape factors that are not -1): the graph keeps them
    # prunable only where a size attribute the cut updates holds that size
    sized: list[SizedLength] = field(default_factory=list)
    # small integer constants lifted by export (``x[..., [-2], :]``'s index): placeholder -> value
    constants: dict[str, object] = field(default_factory=dict)
    current: fx.Node | None = None
    order: int = 0

    # ---- ids -------------------------------------------------------------------------
    def new_ids(self, n: int) -> np.ndarray:
        ids = np.arange(self.next_id, self.next_id + n, dtype=np.int64)
        self.next_id += n
        return ids

    def fresh(self, node: fx.Node, dim: int, size: int) -> Axis:
        """A brand-new axis (a tensor created from nothing, or a new broadcast dimension)."""
        return Axis(axis_key(node.name, dim), self.new_ids(size))

    def same(self, src: Axis, node: fx.Node, dim: int, ids: np.ndarray | None = None) -> Axis:
        """Output axis ``dim`` of ``node`` carries ``src``'s neurons (optionally re-indexed)."""
        out = Axis(axis_key(node.name, dim), src.ids if ids is None else ids)
        self.axis_edges.append((src.key, out.key, self.op_name()))
        return out

    # ---- relations -----------------------------------------------------------------------
    def couple(self, a: Axis | np.ndarray, b: Axis | np.ndarray, why: str = "") -> None:
        """Index ``i`` of ``a`` and index ``i`` of ``b`` are the same neuron."""
        ids_a = a.ids if isinstance(a, Axis) else a
        ids_b = b.ids if isinstance(b, Axis) else b
        if ids_a.shape != ids_b.shape:
            raise ValueError(f"cannot couple axes of sizes {ids_a.shape[0]} and {ids_b.shape[0]} ({why})")
        if ids_a is not ids_b:
            self.edge_a.append(ids_a)
            self.edge_b.append(ids_b)
        if isinstance(a, Axis) and isinstance(b, Axis):
            self.axis_edges.append((a.key, b.key, why or self.op_name()))

    def product(self, whole: Axis, factors: list[Axis], preferred: Axis | None = None) -> None:
        """``whole`` is the row-major product of ``factors`` (sizes must multiply out).

        ``preferred``: the one factor whose size the code does not hard-code (a ``-1`` in a view).
        """
        size = 1
        for f in factors:
            size *= f.size
            self.axis_edges.append((whole.key, f.key, "reshape"))
        if size != whole.size:
            raise ValueError(f"reshape factors {[f.size for f in factors]} do not multiply to {whole.size}")
        self.relations.append(Relation(whole.ids, [f.ids for f in factors], self.where(),
                                       preferred.ids if preferred is not None else None))

    def remember_merge(self, whole: Axis, factors: list[Axis]) -> None:
        """``whole`` was made by merging ``factors`` (a reshape), so splitting it back can reuse them."""
        if whole.size:
            self.merged[(int(whole.ids[0]), int(whole.ids[-1]), whole.size)] = (whole.ids, list(factors))

    def merged_factors(self, whole: Axis, sizes: list[int]) -> list[Axis] | None:
        """The axes ``whole`` was merged from, when they have exactly these ``sizes``."""
        if not whole.size:
            return None
        hit = self.merged.get((int(whole.ids[0]), int(whole.ids[-1]), whole.size))
        if hit is None or [f.size for f in hit[1]] != list(sizes) or not np.array_equal(hit[0], whole.ids):
            return None
        return hit[1]

    def freeze(self, ids: Axis | np.ndarray, reason: str) -> None:
        """These neurons are never cut (conservative)."""
        self.frozen.append((ids.ids if isinstance(ids, Axis) else ids, reason))

    def sized_by_code(self, axis: Axis | np.ndarray, size: int, reshape: bool = False,
                      beside_inferred: bool = False) -> None:
        """``axis``'s length is written in the module's code (``split(x, [a, b])``, a reshape factor
        that is not ``-1``): cutting its neurons needs the attribute holding ``size`` updated too."""
        ids = axis.ids if isinstance(axis, Axis) else axis
        if ids.size > 1:
            path = module_path(self.current) if self.current is not None else ""
            self.sized.append(SizedLength(ids, size, self.where(), path, reshape, beside_inferred))

    def broadcasted(self, axis: Axis) -> None:
        """``axis`` was made by broadcasting (each index a copy): its length is whatever the code
        passed to ``expand``. Cutting it is only safe where the cut updates that length (heads)."""
        if axis.size > 1:
            self.broadcast.append((axis.ids, self.where()))

    def mix(self, axis: Axis) -> None:
        """``axis`` is reduced over (a norm's statistic, a mean, a softmax): cutting one of its
        neurons changes the others' values, so a group holding them is approximate, not exact."""
        if axis.size > 1:
            self.mixed.append(axis.ids)

    def mark_heads(self, axis: Axis) -> None:
        """``axis`` indexes attention heads (batch dimension of an attention contraction)."""
        self.head_ids.append(axis.ids)

    def mark_embedding(self, axis: Axis) -> None:
        """``axis`` is the hidden dimension written by a token/position embedding table."""
        self.embed_ids.append(axis.ids)

    def use(self, param_node: fx.Node | None, dim: int, role: str) -> None:
        """Record that the current op uses ``dim`` of a parameter (or a view of one) in ``role``."""
        if not isinstance(param_node, fx.Node):
            return
        key = param_node.name
        if key in self.param_views:
            key, dims = self.param_views[key]
            dim = dims[dim]
        name = self.param_of_node.get(key)
        if name is not None:
            self.uses.append(ParamUse(name, dim, role, self.current.name if self.current else "", self.order))

    def view_of_param(self, src, node: fx.Node, dims: list[int] | None = None) -> None:
        """``node`` is a layout view of parameter ``src``; output dim j is source dim ``dims[j]``."""
        if not isinstance(src, fx.Node):
            return
        base, base_dims = self.param_views.get(src.name, (src.name, None))
        if base not in self.param_of_node:
            return
        if dims is None:
            dims = list(range(len(self.axes.get(src.name) or [])))
        self.param_views[node.name] = (base, [base_dims[d] if base_dims else d for d in dims])

    def unknown_op(self, node: fx.Node, touched: list[Axis]) -> None:
        """An op no rule understands: freeze everything it touches and remember it."""
        ids = np.concatenate([a.ids for a in touched]) if touched else np.zeros(0, dtype=np.int64)
        self.freeze(ids, f"unknown op {node.target}")
        self.unknown.append((str(node.target), self.where(), ids))

    # ---- helpers for rules ---------------------------------------------------------------------
    def tensor_axes(self, arg) -> list[Axis] | None:
        """Axes of a tensor-valued FX argument, or None for non-tensors."""
        if isinstance(arg, fx.Node):
            value = self.axes.get(arg.name)
            if value is None or is_multi(value):
                return None
            return value  # type: ignore[return-value]
        return None

    def is_param(self, arg) -> bool:
        return isinstance(arg, fx.Node) and (arg.name in self.param_of_node or arg.name in self.param_views)

    def op_name(self) -> str:
        return str(self.current.target) if self.current is not None else ""

    def where(self) -> str:
        node = self.current
        if node is None:
            return ""
        return f"{node.target} at {module_path(node) or '<top>'}"


_MISSING = object()


def op_arg(node: fx.Node, name: str, default=None):
    """Argument ``name`` of an ATen op node, positional or keyword, else the schema default.

    Rules should read optional arguments with this rather than ``node.args[i]``: the same op
    may be recorded with keyword arguments, and reading the wrong position silently
    misreads (e.g. ``norm(x, 2, dim)``'s ``p=2`` taken for a dimension).
    """
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return node.kwargs.get(name, default)
    for i, argument in enumerate(schema.arguments):
        if argument.name != name:
            continue
        if not argument.kwarg_only and i < len(node.args):
            return node.args[i]
        if name in node.kwargs:
            return node.kwargs[name]
        value = argument.default_value if argument.has_default_value() else _MISSING
        return default if value is _MISSING or value is None else value
    return default


def norm_dim(d: int, ndim: int) -> int:
    """A dimension argument as a non-negative index (``-1`` is the last of ``ndim`` dims)."""
    return d + ndim if d < 0 else d


def axis_key(name: str, dim: int) -> str:
    return f"{name}:{dim}"


def module_path(node: fx.Node) -> str:
    """Qualified name of the innermost module that ran ``node`` (from export metadata)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # export spells nested names like "L['self'].model.layers[0]" in some versions
    return str(path).replace("L['self'].", "").replace("[", ".").replace("]", "")


# Stand-in length of a data-dependent ("unbacked") dimension, e.g. the rows a boolean mask selects (X-MOD's
# language adapters) or a length read with ``.item()`` (Reformer's axial positions). Such axes are data, never
# channels: the builder freezes them (see :func:`data_dependent_dims`). The stand-in only has to give every
# expression of the same symbols one consistent value; a prime keeps coincidences with channel sizes unlikely
# (and any coincidence can only couple more neurons to a frozen axis, i.e. freeze more, never cut more).
UNBACKED_SIZE = 1009


def size_of(size) -> int:
    """A dimension's length: its int value, or the stand-in value of a data-dependent size expression."""
    if isinstance(size, int):
        return size
    expr = getattr(getattr(size, "node", None), "expr", None)
    if expr is None:
        return int(size)
    if expr.free_symbols:
        import sympy

        expr = expr.xreplace({sym: sympy.Integer(UNBACKED_SIZE) for sym in expr.free_symbols})
    return int(expr)


def data_dependent_dims(shape) -> list[int]:
    """Dimensions of ``shape`` whose length depends on data (symbolic after export)."""
    out = []
    for d, size in enumerate(shape):
        expr = getattr(getattr(size, "node", None), "expr", None)
        if not isinstance(size, int) and expr is not None and expr.free_symbols:
            out.append(d)
    return out


def shape_of(node) -> tuple[int, ...] | None:
    """Static shape of a node's value (FakeTensor metadata); data-dependent sizes get their stand-in."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    shape = getattr(val, "shape", None)
    if shape is None:
        return None
    return tuple(size_of(s) for s in shape)
