"""The dependency graph: run the op rules over an exported FX graph, then form typed groups.

:class:`DependencyBuilder` walks the graph node by node (like ``torch.fx``'s ``ShapeProp``
interpreter, but over shapes only: no tensor is computed, so ``meta``-device models work) and
asks the rule registry how each op moves channels. :class:`DependencyGraph` holds the result:
the groups, the networkx graph of channel spaces, and what could not be analysed.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import torch
import torch.fx as fx
from torch import nn

from . import groups as G
from . import sizes
from .errors import TraceError, UnsupportedModelError
from .rules import Axis, RuleContext, apply_rule, module_path, shape_of
from .rules.context import axis_key, data_dependent_dims, is_multi, size_of
from .trace import export, normalise_inputs

log = logging.getLogger("depgraph")
MAX_FACTOR_ROUNDS = 8  # reshape-decision rounds (see _build_groups); a guard, they settle sooner
MAX_UNIFY_ROUNDS = 8  # rounds coupling the factors of coupled reshapes; a guard as well


def _parts(value) -> list[list[Axis]]:
    """The axis lists of a node's outputs (one for a single-output op)."""
    if is_multi(value):
        return [list(p or []) for p in value]
    return [list(value or [])]


def _flat_axes(value) -> list[Axis]:
    return [a for part in _parts(value) for a in part]


class DependencyBuilder:
    """Apply the op rules to every node of an exported program (one job: fill a RuleContext)."""

    def __init__(self, exported: torch.export.ExportedProgram, canonical: dict[str, str] | None = None):
        self.exported = exported
        self.canonical = canonical or {}
        self.ctx = RuleContext()
        self.param_nodes: dict[str, tuple[str, list[Axis], bool]] = {}
        self.node_info: dict[str, tuple[str, str]] = {}
        self.input_ids: list[np.ndarray] = []  # channel ids of the user inputs (features a layer may read)
        self.mix_sites: list[tuple[np.ndarray, str]] = []  # (reduced ids, module that reduced them)
        # per node, before it is analysed: (len(ctx.axis_edges), len(ctx.unknown)); says which node recorded
        # each edge and unknown op (block replication, depgraph/replicate.py, re-times them per block)
        self.marks: list[tuple[int, int]] = []

    def run(self) -> RuleContext:
        sig = self.exported.graph_signature
        params = dict(sig.inputs_to_parameters)
        buffers = dict(sig.inputs_to_buffers)
        ctx = self.ctx
        for node_name, const in dict(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {}).items():
            value = self.exported.constants.get(const)
            if isinstance(value, torch.Tensor) and value.numel() <= 4096 and not value.is_floating_point():
                ctx.constants[node_name] = value  # rules may read fixed indices (see rules/indexing.py constant_values)
        for node in self.exported.graph.nodes:
            self.marks.append((len(ctx.axis_edges), len(ctx.unknown)))
            ctx.current = node
            ctx.order += 1
            if node.op == "placeholder":
                self._placeholder(node, params, buffers)
            elif node.op == "call_function":
                self._call(node)
            elif node.op == "output":
                # the model's outputs are its interface: their channels are never cut
                for out in _flatten(node.args):
                    for axis in _flat_axes(ctx.axes.get(out.name)):
                        ctx.freeze(axis, "model output")
            else:  # get_attr / call_module do not appear in exported programs; be safe anyway
                self._unknown(node)
        return ctx

    def _placeholder(self, node: fx.Node, params: dict, buffers: dict) -> None:
        ctx = self.ctx
        shape = shape_of(node)
        if shape is None:
            ctx.axes[node.name] = None
            return
        name = params.get(node.name) or buffers.get(node.name)
        val = node.meta.get("val")
        if name is not None and (not node.users or not val.dtype.is_floating_point):
            # unused (e.g. the second name of a tied weight) or integer index buffers: not channels
            name = None
            if not node.users:
                ctx.axes[node.name] = [ctx.fresh(node, d, s) for d, s in enumerate(shape)]
                return
        if name is not None:
            name = self.canonical.get(name, name)
            ctx.param_of_node[node.name] = name
            axes = [Axis(f"param:{name}:{d}", ctx.new_ids(s)) for d, s in enumerate(shape)]
            self.param_nodes[node.name] = (name, axes, node.name in buffers)
        else:
            axes = [ctx.fresh(node, d, s) for d, s in enumerate(shape)]
            for axis in axes:  # user inputs (token ids, masks) are data, not channels
                ctx.freeze(axis, "model input")
                self.input_ids.append(axis.ids)
        ctx.axes[node.name] = axes

    def _call(self, node: fx.Node) -> None:
        ctx = self.ctx
        mixed_before = len(ctx.mixed)
        result = apply_rule(ctx, node)
        if result is NotImplemented:
            result = self._unknown(node)
        where = module_path(node)
        self.mix_sites.extend((ids, where) for ids in ctx.mixed[mixed_before:])
        ctx.axes[node.name] = result
        self._freeze_data_dependent(node, result)

    def _freeze_data_dependent(self, node: fx.Node, result) -> None:
        """Axes whose length depends on data (a boolean mask's rows, a length read with ``.item()``) are data."""
        val = node.meta.get("val")
        vals = list(val) if isinstance(val, (list, tuple)) else [val]
        for v, axes in zip(vals, _parts(result)):  # an output without axes has an empty list
            for d in data_dependent_dims(getattr(v, "shape", None) or ()):
                if axes and d < len(axes):
                    self.ctx.freeze(axes[d], f"data-dependent size at {self.ctx.where()}")

    def _unknown(self, node: fx.Node):
        """Conservative rule: everything the op touches is frozen, its outputs are new."""
        ctx = self.ctx
        touched: list[Axis] = []
        for arg in _flatten((node.args, node.kwargs)):
            touched.extend(_flat_axes(ctx.axes.get(arg.name)))
        val = node.meta.get("val")
        if isinstance(val, (list, tuple)):
            out = [[ctx.fresh(node, j, size_of(s)) for j, s in enumerate(v.shape)] if hasattr(v, "shape") else []
                   for v in val]
        elif hasattr(val, "shape"):
            out = [ctx.fresh(node, j, size_of(s)) for j, s in enumerate(val.shape)]
        else:
            out = None
        ctx.unknown_op(node, touched + _flat_axes(out))
        return out


def _unsized_broadcasts(ctx: RuleContext, labels: np.ndarray, frozen_comp: np.ndarray,
                        head_ids: list[np.ndarray]) -> list[tuple[np.ndarray, str]]:
    """Freezes for axes made by ``expand`` whose length no cut updates.

    Broadcasting gives every index a copy, so the units are free to cut as long as the code then
    expands to the new length. For heads it does (MLA's rope key ``k_rot.expand(-1, heads, ...)``,
    and the head counts are updated with the B group); the hidden stream's channels (an embedding
    writes them) follow the hidden size. Any other broadcast length, e.g. a hyper-connection's
    ``expand(..., config.hc_mult, ...)`` streams, is written in the code: never cut.
    """
    if not ctx.broadcast:
        return []
    keep = G.marked_components(labels, list(head_ids) + list(ctx.embed_ids))
    out = []
    for ids, where in ctx.broadcast:
        comps = labels[ids]
        if not frozen_comp[comps].all() and not keep[comps].all():
            out.append((ids, f"broadcast by {where}: its length is written in the code"))
    return out


def canonical_names(model: nn.Module) -> dict[str, str]:
    """Map every alias of a shared tensor (tied embeddings) to its ``named_parameters()`` name."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        out[name] = first.setdefault(id(tensor), name)
    return out


def add_axis_edges(graph: nx.DiGraph, edges) -> None:
    """Add the couplings ``(src, dst, op)`` to ``graph``, with a bare node for an end it lacks."""
    for src, dst, why in edges:
        for key in (src, dst):
            if key not in graph:
                graph.add_node(key, kind="activation", tensor=key.rsplit(":", 1)[0], dim=-1, size=0,
                               module="", op="", group="", group_kind="")
        graph.add_edge(src, dst, op=why, group_kind=graph.nodes[dst]["group_kind"] or
                       graph.nodes[src]["group_kind"])


@dataclass
class GraphParts:
    """Everything a :class:`DependencyGraph` holds besides its model and example inputs."""

    groups: list[G.Group]
    labels: np.ndarray  # component of every channel id
    comp_group: np.ndarray  # group index of every component (-1: none)
    comp_unit: np.ndarray  # unit id of every component within its group
    param_ids: dict[tuple[str, int], np.ndarray]  # channel ids of every parameter dim
    param_shapes: dict[str, tuple[int, ...]]
    buffers: set[str]
    expert_params: set[str]
    op_warnings: list[str]  # ops without a rule that touched parameters
    unknown_ops: list[tuple[str, str]]
    frozen: dict[tuple[str, int], str]
    nx: nx.DiGraph
    n_nodes: int
    ops: Counter


@dataclass
class AnalysisRecord:
    """Where things happened in one analysis, node by node (kept only when asked: ``record=True``).

    ``nodes``: ``(name, op, target, module path, tensor name)`` per FX node (module path for call nodes,
    parameter/buffer name for lifted placeholders); ``marks[i]``: ``(len(axis_edges), len(unknown))``
    before node ``i``; ``axis_edges`` as recorded; ``nx_axis_nodes``: how many of ``nx``'s first nodes
    come from the tensors' axes (the rest are bare ends of edges)."""

    nodes: list[tuple[str, str, str, str, str]]
    marks: list[tuple[int, int]]
    axis_edges: list[tuple[str, str, str]]
    nx_axis_nodes: int
    constant_users: dict[str, list[str]]  # lifted constant placeholder -> module paths of its users
    inputs: list[tuple[str, ...]] = field(default_factory=list)  # per node, the names of the nodes it reads

    @classmethod
    def of(cls, exported, builder: DependencyBuilder, ctx: RuleContext, graph: DependencyGraph) -> AnalysisRecord:
        sig = exported.graph_signature
        lifted = {**dict(sig.inputs_to_parameters), **dict(sig.inputs_to_buffers),
                  **dict(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})}
        nodes = [(n.name, n.op, str(n.target), module_path(n) if n.op == "call_function" else "",
                  lifted.get(n.name, "")) for n in exported.graph.nodes]
        constants = dict(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
        users = {n.name: [module_path(u) for u in n.users] for n in exported.graph.nodes if n.name in constants}
        inputs = [tuple(a.name for a in n.all_input_nodes) for n in exported.graph.nodes]
        return cls(nodes, list(builder.marks), list(ctx.axis_edges), graph._nx_axis_nodes, users, inputs)


def _flatten(args) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return found


class DependencyGraph:
    """Channel dependency graph of one model, with its typed groups.

    Build it with :func:`depgraph.trace`. ``groups(kind)`` lists the coupled structures,
    ``nx`` is the graph of channel spaces (networkx ``DiGraph``), ``warnings`` lists ops
    that were coupled conservatively, ``frozen`` names parameter dims that are never cut.
    """

    def __init__(self, model: nn.Module, exported: torch.export.ExportedProgram, example_inputs=None,
                 record: bool = False):
        self.model = model
        self.example_inputs = example_inputs if example_inputs is not None else ((), {})
        builder = DependencyBuilder(exported, canonical_names(model))
        ctx = builder.run()
        self.n_nodes = len(exported.graph.nodes)
        self._build_groups(ctx, builder)
        self._build_nx(ctx, exported)
        self.ops = Counter(str(n.target) for n in exported.graph.nodes if n.op == "call_function")
        # what block replication needs to re-time a representative trace (dropped otherwise)
        self.record = AnalysisRecord.of(exported, builder, ctx, self) if record else None

    @classmethod
    def assemble(cls, model: nn.Module, example_inputs, parts: GraphParts) -> DependencyGraph:
        """A graph from finished parts (see :mod:`depgraph.replicate`): the groups, names and arrays a full
        analysis would produce. Parameter counts and kept-whole warnings are derived here, as in a trace."""
        self = cls.__new__(cls)
        self.model = model
        self.example_inputs = example_inputs
        self.n_nodes = parts.n_nodes
        self.ops = parts.ops
        self._groups = parts.groups
        for g in self._groups:
            g.graph_id = id(self)
        self._labels = parts.labels
        self._comp_group = parts.comp_group
        self._comp_unit = parts.comp_unit
        self._param_ids = parts.param_ids
        self.param_shapes = parts.param_shapes
        self.buffers = parts.buffers
        self.expert_params = parts.expert_params
        self._set_param_counts()
        self.warnings = list(parts.op_warnings)
        self._op_warnings = len(self.warnings)
        self.unknown_ops = parts.unknown_ops
        self.frozen = parts.frozen
        self._warn_kept_whole()
        self.nx = parts.nx
        self.record = None
        return self

    def parts(self) -> GraphParts:
        """This graph's parts (shared, not copied), the input of :meth:`assemble`."""
        return GraphParts(
            groups=self._groups, labels=self._labels, comp_group=self._comp_group, comp_unit=self._comp_unit,
            param_ids=self._param_ids, param_shapes=self.param_shapes, buffers=self.buffers,
            expert_params=self.expert_params, op_warnings=self.warnings[:self._op_warnings],
            unknown_ops=self.unknown_ops, frozen=self.frozen, nx=self.nx, n_nodes=self.n_nodes, ops=self.ops)

    # ---- analysis --------------------------------------------------------------------------
    def _build_groups(self, ctx: RuleContext, builder: DependencyBuilder) -> None:
        labels = G.components(ctx.next_id, ctx.edge_a, ctx.edge_b)
        # reshapes whose wholes are coupled share their factors (q/k/v/ALiBi merged into a bmm's
        # [batch*heads] axis): couple those until no new component merges
        edge_a, edge_b = list(ctx.edge_a), list(ctx.edge_b)
        frozen = list(ctx.frozen)
        added: set[tuple[int, int]] = set()  # factor pairs already coupled (by identity)
        for round_ in range(MAX_UNIFY_ROUNDS + 1):
            unify_a, unify_b, unify_rel = G.unify_factors(ctx.relations, labels)
            new = [k for k, (a, b) in enumerate(zip(unify_a, unify_b)) if (id(a), id(b)) not in added]
            if not new:
                break
            if round_ == MAX_UNIFY_ROUNDS:
                # still finding new couplings: keep every reshape involved whole (conservative)
                for k in new:
                    rel = ctx.relations[unify_rel[k]]
                    frozen.append((rel.whole, f"unsettled factor coupling at {rel.where}"))
                    frozen.extend((f, f"unsettled factor coupling at {rel.where}") for f in rel.factors)
                break  # graph.frozen gives the reason, _warn_kept_whole names the modules
            added.update((id(unify_a[k]), id(unify_b[k])) for k in new)
            edge_a = edge_a + [unify_a[k] for k in new]
            edge_b = edge_b + [unify_b[k] for k in new]
            merged = G.components(ctx.next_id, edge_a, edge_b)
            if merged.max() == labels.max():
                break
            labels = merged
        # a bmm marks its merged [batch*heads] axis: the heads are that reshape's factor
        head_ids = G.heads_through_products(ctx.head_ids, ctx.relations, labels)
        frozen_comp = G.frozen_components(labels, frozen)
        # Decide each reshape's unit factor, then re-check with the merged components until the
        # decisions settle: freezes only accumulate, so this reaches a fixpoint; the cap is a guard.
        previous = None
        for round_ in range(MAX_FACTOR_ROUNDS + 1):
            head_comp = G.marked_components(labels, head_ids)
            new_a, new_b, freeze, decisions = G.resolve_products(ctx.relations, labels, frozen_comp, head_comp)
            if decisions == previous:  # labels and freezes already reflect these decisions
                break
            if round_ == MAX_FACTOR_ROUNDS:
                # still changing: freeze every reshape whose choice keeps flipping (conservative),
                # then settle once more with those frozen; the loop ends here whatever happens
                for rel, now, before in zip(ctx.relations, decisions, previous or [-1] * len(decisions)):
                    if now != before:
                        frozen.append((rel.whole, f"unsettled reshape at {rel.where}"))
                        frozen.extend((f, f"unsettled reshape at {rel.where}") for f in rel.factors)
                frozen_comp = G.frozen_components(labels, frozen)
                new_a, new_b, freeze, decisions = G.resolve_products(ctx.relations, labels, frozen_comp,
                                                                     head_comp)
            labels = G.components(ctx.next_id, edge_a + new_a, edge_b + new_b) if new_a else labels
            frozen = frozen + freeze
            frozen_comp = G.frozen_components(labels, frozen)
            previous = decisions
        param_axes = []
        for name, axes, is_buffer in builder.param_nodes.values():
            for d, axis in enumerate(axes):
                param_axes.append(G.ParamAxis(name, d, axis.ids, is_buffer))
        param_ids = {(pa.param, pa.dim): pa.ids for pa in param_axes}
        unsized = self._unsized_splits(ctx, labels, frozen_comp, param_axes, head_ids, builder.input_ids)
        unsized += _unsized_broadcasts(ctx, labels, frozen_comp, head_ids)
        if unsized:  # after the reshapes settled: freezing more only removes units, never splits one
            frozen = frozen + unsized
            frozen_comp = G.frozen_components(labels, frozen)
        groups, comp_group, comp_unit = G.form_groups(param_axes, labels, frozen_comp, ctx.uses)
        # a group must cut at least one real parameter (a buffer-only "group" is bookkeeping)
        for gi, g in enumerate(groups):
            if all(m.is_buffer for m in g.members):
                comp_group[comp_group == gi] = -2
        keep = [gi for gi, g in enumerate(groups) if not all(m.is_buffer for m in g.members)]
        remap = np.full(len(groups) + 2, -1, dtype=np.int64)
        remap[np.array(keep, dtype=np.int64)] = np.arange(len(keep))
        comp_group = np.where(comp_group >= 0, remap[np.maximum(comp_group, 0)], -1)
        groups = [groups[gi] for gi in keep]
        G.classify(groups, comp_group, labels, head_ids, ctx.embed_ids, param_ids, ctx.mixed, builder.input_ids)
        self._mark_rms_exact(groups, comp_group, labels, builder.mix_sites)
        for g in groups:
            g.graph_id = id(self)
        self._groups = groups
        self._labels = labels
        self._comp_group = comp_group
        self._comp_unit = comp_unit
        self._param_ids = param_ids
        self.param_shapes = {name: tuple(a.size for a in axes) for name, axes, _ in builder.param_nodes.values()}
        self.buffers = {name for name, _, is_buffer in builder.param_nodes.values() if is_buffer}
        self.expert_params = set(ctx.expert_params)
        self._set_param_counts()
        self._report(ctx, labels, frozen, frozen_comp, param_axes)
        self._warn_kept_whole()

    def _unsized_splits(self, ctx: RuleContext, labels: np.ndarray, frozen_comp: np.ndarray,
                        param_axes: list[G.ParamAxis],
                        head_ids: list[np.ndarray] | tuple = (),
                        input_ids: list[np.ndarray] | tuple = ()) -> list[tuple[np.ndarray, str]]:
        """Freezes for lengths written in a module's code that no attribute the cut updates holds.

        ``torch.split(x, [self.intermediate_size, self.conv_dim, self.num_heads])`` (Mamba's in_proj),
        Jamba's x_proj into ``time_step_rank`` / state sizes, RecurrentGemma's block-diagonal
        ``reshape(b * s, self.num_attention_heads, self.block_width)`` keep the old lengths after a cut
        unless the attribute holding them is one the cut rescales for that group's kind (MLP width for
        A, rank fields for latent A, head sizes for B, hidden size for C). A provisional grouping gives
        the kinds; such lengths are never cut.

        A head count in a reshape beside a ``-1`` (``view(b, s, self.nh, -1)``) is the same (the ``-1`` would
        absorb a stale count as a smaller head_dim, silently): the cut rescales it only
        when it is a head-size attribute (or config field) of a module inside the head group's scope
        that holds some of the group's weights or none at all (see :func:`depgraph.sizes.foreign`). Otherwise the
        stale count would re-split the remaining rows into the old number of smaller heads.
        """
        out: list[tuple[np.ndarray, str]] = []
        if not ctx.sized:
            return out
        groups, comp_group, _ = G.form_groups(param_axes, labels, frozen_comp, ctx.uses)
        param_ids = {(pa.param, pa.dim): pa.ids for pa in param_axes}
        G.classify(groups, comp_group, labels, list(head_ids), ctx.embed_ids, param_ids, ctx.mixed,
                   input_ids)
        modules = dict(self.model.named_modules())
        tensors = dict(self.model.named_parameters())
        for ids, size, where, path, reshape, beside_inferred in ctx.sized:
            found = comp_group[labels[ids]]
            for gi in np.unique(found[found >= 0]).tolist():
                group = groups[gi]
                if reshape and group.kind is G.GroupKind.B and not beside_inferred:
                    # ``view(b, s, self.heads, self.head_dim)``: every factor is written and head_dim is
                    # kept whole, so a stale head count cannot fit the cut width: the cut fails loudly
                    # (refused, model unchanged), it cannot re-split the heads
                    continue
                leaves = {m.param.rsplit(".", 2)[-2] for m in group.members if "." in m.param}
                module = modules.get(path)
                held = module is not None and sizes.size_attribute(
                    module, size, group.kind.value, bool(group.extra.get("latent")), leaves, group.size) is not None
                if reshape and group.kind is G.GroupKind.B:
                    held = module is not None and sizes.head_count_updated(module, path, size, group, groups,
                                                                          tensors)
                if not held:
                    out.append((ids, f"length {size} written in the code at {where}: no attribute the "
                                     f"{group.kind.value} cut updates holds it"))
                    break
        return out

    def _mark_rms_exact(self, groups: list[G.Group], comp_group: np.ndarray, labels: np.ndarray,
                        mix_sites: list[tuple[np.ndarray, str]]) -> None:
        """Hidden-channel (C) groups whose channels are reduced over only inside plain RMSNorms holding
        their weights are exact: the cut rescales each norm (:func:`depgraph.sizes.rms_norm_edits`) so it
        equals zero-masking the channels everywhere they live. ``extra["rms_norms"]`` names the norms."""
        sites: dict[int, set[str]] = {}
        for ids, where in mix_sites:
            g = comp_group[labels[ids]]
            for gi in np.unique(g[g >= 0]).tolist():
                sites.setdefault(gi, set()).add(where)
        modules = dict(self.model.named_modules())
        tensors = dict(self.model.named_parameters())
        for gi, group in enumerate(groups):
            if group.kind is not G.GroupKind.C or group.exact or not sites.get(gi):
                continue
            owned = sizes.member_tensors(tensors, group)
            norms = sorted(sites[gi])
            if all(path in modules and id(getattr(modules[path], "weight", None)) in owned
                   and sizes.rms_norm_eps(modules[path]) is not None for path in norms):
                group.exact = True
                group.extra["rms_norms"] = norms

    def _warn_kept_whole(self) -> None:
        """One warning per module whose weights' channels are frozen because the rules cannot prove a
        cut of them exact (a reshape no unit fits, a length written in the code): typically the
        recurrent mixer of a hybrid model (Mamba, gated delta net), left whole while the rest prunes."""
        by_module: dict[str, list[str]] = {}
        for (param, dim), reason in self.frozen.items():
            if reason.startswith(("reshape at ", "length ", "unsettled ")) and param not in self.buffers:
                where = reason.rsplit(" at ", 1)[-1].split(":")[0]
                by_module.setdefault(where, []).append(f"{param} dim {dim}")
        for where, dims in by_module.items():
            msg = (f"{where}: {len(dims)} parameter dim(s) are kept whole (never cut), e.g. {', '.join(dims[:3])}: "
                   "the rules cannot prove a cut of them exact (see graph.frozen for each reason)")
            self.warnings.append(msg)
            log.warning(msg)

    def _set_param_counts(self) -> None:
        for g in self._groups:
            total = 0
            for m in g.members:
                if m.is_buffer:
                    continue
                shape = self.param_shapes[m.param]
                total += m.per_unit * int(np.prod(shape)) // shape[m.dim]
            g.extra["params_per_unit"] = total

    def _report(self, ctx, labels, frozen, frozen_comp, param_axes) -> None:
        """Name the unknown ops that froze parameter channels, and why each frozen dim is frozen."""
        param_comp = np.zeros(frozen_comp.shape[0], dtype=bool)
        for pa in param_axes:
            param_comp[labels[pa.ids]] = True
        self.warnings: list[str] = []
        self.unknown_ops: list[tuple[str, str]] = []
        for op, where, ids in ctx.unknown:
            self.unknown_ops.append((op, where))
            if ids.size and param_comp[labels[ids]].any():
                hit = sorted({pa.param for pa in param_axes if np.isin(labels[pa.ids], labels[ids]).any()})
                msg = (f"op {op} is not covered by a rule: its channels were coupled conservatively "
                       f"(never cut); affects {len(hit)} parameter(s), e.g. {', '.join(hit[:3])}. "
                       "Add a rule for it (docs/adding-rules.md) to make them prunable.")
                msg = f"{where.split(' at ', 1)[-1]}: {msg}" if " at " in where else msg
                if msg not in self.warnings:  # one warning per op and module
                    self.warnings.append(msg)
                    log.warning(msg)
        self._op_warnings = len(self.warnings)
        reason_of = np.full(frozen_comp.shape[0], -1, dtype=np.int64)
        reasons = []
        for ids, reason in reversed(frozen):
            if ids.size:
                reason_of[labels[ids]] = len(reasons)
                reasons.append(reason)
        self.frozen: dict[tuple[str, int], str] = {}
        for pa in param_axes:
            comps = labels[pa.ids]
            if frozen_comp[comps].all():
                r = reason_of[comps[0]]
                self.frozen[(pa.param, pa.dim)] = reasons[r] if r >= 0 else "frozen"

    def _build_nx(self, ctx: RuleContext, exported) -> None:
        graph = nx.DiGraph()
        kinds = {i: g.kind.value for i, g in enumerate(self._groups)}
        names = {i: g.name for i, g in enumerate(self._groups)}
        nodes = {n.name: n for n in exported.graph.nodes}
        for name, value in ctx.axes.items():
            node = nodes.get(name)
            param = ctx.param_of_node.get(name)
            for part, axes in enumerate(_parts(value)):
                for d, axis in enumerate(axes):
                    key = axis.key if param else axis_key(name if part == 0 else f"{name}.{part}", d)
                    group = self._majority_group(axis.ids)
                    graph.add_node(
                        key,
                        kind=("buffer" if param in self.buffers else "param") if param else
                        ("input" if node is not None and node.op == "placeholder" else "activation"),
                        tensor=param or name, dim=d, size=axis.size,
                        module=(param.rsplit(".", 1)[0] if param and "." in param else "")
                        if param else (module_path(node) if node is not None else ""),
                        op=str(node.target) if node is not None and node.op == "call_function" else "",
                        group=names.get(group, ""), group_kind=kinds.get(group, ""),
                    )
        self._nx_axis_nodes = graph.number_of_nodes()
        add_axis_edges(graph, ctx.axis_edges)
        self.nx = graph

    def _majority_group(self, ids: np.ndarray) -> int:
        if ids.size == 0:
            return -1
        g = self._comp_group[self._labels[ids]]
        g = g[g >= 0]
        return int(np.bincount(g).argmax()) if g.size else -1

    # ---- public API ------------------------------------------------------------------------------
    def groups(self, kind: str | G.GroupKind | None = None) -> list[G.Group]:
        """The coupled structures, in execution order; ``kind`` filters by "A", "B" or "C"."""
        if kind is None:
            return list(self._groups)
        kind = G.GroupKind(str(kind).upper())
        return [g for g in self._groups if g.kind is kind]

    def group(self, name: str) -> G.Group:
        """The group called ``name``."""
        for g in self._groups:
            if g.name == name:
                return g
        raise KeyError(f"no group named {name!r}; names: {', '.join(g.name for g in self._groups[:8])}...")

    def coupled(self, param: str, index: int, dim: int = 0) -> dict[tuple[str, int], list[int]]:
        """Every parameter slice coupled with index ``index`` of dimension ``dim`` of ``param``.

        This is trigger propagation made explicit: the closure of the dependency rules
        started at that one neuron, as {(param, dim): [indices]}.
        """
        if (param, dim) not in self._param_ids:
            raise KeyError(f"{param} dim {dim} is not a parameter dimension of this graph")
        comp = self._labels[self._param_ids[(param, dim)][index]]
        out = {}
        for key, ids in self._param_ids.items():
            hit = np.flatnonzero(self._labels[ids] == comp)
            if hit.size:
                out[key] = hit.tolist()
        return out

    def summary(self) -> str:
        """A markdown table of the groups."""
        rows = ["| kind | group | units | members | params/unit | exact |", "|---|---|---|---|---|---|"]
        for g in self._groups:
            rows.append(f"| {g.kind.value} | {g.name} | {g.size} | {len(g.members)} | "
                        f"{g.extra.get('params_per_unit', 0)} | {'yes' if g.exact else 'no'} |")
        return "\n".join(rows)

    def prune(self, plan, **options):
        """Cut the units in ``plan`` ({group: unit ids}); see :func:`depgraph.cut.prune`."""
        from .cut import prune

        return prune(self, plan, **options)

    def __repr__(self) -> str:
        counts = Counter(g.kind.value for g in self._groups)
        return (f"DependencyGraph({type(self.model).__name__}: {len(self._groups)} groups "
                f"(A={counts['A']}, B={counts['B']}, C={counts['C']}), {len(self.warnings)} warnings)")


def trace(model: nn.Module, example_inputs=None, replicate: bool = True, **options) -> DependencyGraph:
    """Trace ``model`` and build its channel dependency graph with typed A/B/C groups.

    ``example_inputs``: a tensor, a tuple of positional inputs, a dict of keyword inputs or
    ``(args, kwargs)``; built from ``model.config`` (token ids) when omitted. Works on CPU
    weights and on models built on the ``meta`` device.

    ``replicate``: when the model's blocks are identical (module classes, attributes, parameter names,
    shapes and dtypes, per-layer config entries) or repeat with a period, trace a copy-free view holding
    only 3 of them (3 periods) and replicate the verified per-block analysis over all blocks
    (:mod:`depgraph.replicate`); any other difference or a failed check falls back to analysing the whole
    model. ``replicate=False`` always analyses it whole.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"depgraph.trace expects a torch.nn.Module, got {type(model).__name__}")
    inputs = normalise_inputs(model, example_inputs)
    graph = None
    if replicate:
        from .replicate import replicated_trace  # the module builds on this one

        graph = replicated_trace(model, inputs)
    if graph is None:
        exported = export(model, inputs)
        graph = DependencyGraph(model, exported, inputs)
    if not graph.groups() and options.get("require_groups", False):
        raise UnsupportedModelError(f"no prunable structure found in {type(model).__name__}")
    return graph
