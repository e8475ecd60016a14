"""From coupled neuron ids to typed groups (plain functions over arrays, like networkx algorithms).

1. :func:`components` - connected components of the coupling edges. This is LLM-Pruner's
   trigger propagation (follow the in/out-degree dependencies from a trigger neuron until
   closure) computed for every trigger at once; each component is one *unit* that must be
   cut as a whole. It terminates because it is a single linear-time pass over a finite
   edge list (scipy's union of components), not an open-ended search.
2. :func:`resolve_products` - for every reshape that split or merged channels, decide which
   factor is the unit (the outermost factor that is not frozen: heads, not head dims) and
   keep the other factors whole. One pass over a finite list of reshapes.
3. :func:`form_groups` - units that touch the same parameter slices in the same way form a
   group (all neurons of one MLP, all heads of one attention layer, all hidden channels).
4. :func:`classify` - Type B if the units index attention heads, Type C if they are hidden
   channels (written by an embedding or by several layers that read different groups, i.e.
   the residual stream), otherwise Type A (neurons produced and consumed inside one block).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .rules.context import ParamUse, Relation


class GroupKind(str, Enum):
    """Type of a coupled structure (LLM-Pruner's taxonomy)."""

    A = "A"  # MLP intermediate neurons
    B = "B"  # attention heads (a KV head with the query heads that share it)
    C = "C"  # hidden / residual channels

    def __str__(self) -> str:
        return self.value


@dataclass(eq=False)
class Member:
    """One parameter slice a group couples: dimension ``dim`` of parameter ``param``.

    ``unit_of_index[i]`` is the unit id that owns index ``i`` along ``dim`` (``-1`` where the
    index belongs to another group or is frozen).
    """

    param: str
    dim: int
    unit_of_index: np.ndarray
    role: str = "other"
    order: int = 0
    is_buffer: bool = False

    def indices(self, units=None) -> np.ndarray:
        """Indices along ``dim`` owned by ``units`` (all units when None), ascending."""
        if units is None:
            return np.flatnonzero(self.unit_of_index >= 0)
        units = np.asarray(list(units), dtype=np.int64)
        return np.flatnonzero(np.isin(self.unit_of_index, units))

    @property
    def per_unit(self) -> int:
        """How many indices along ``dim`` each unit owns."""
        owned = int((self.unit_of_index >= 0).sum())
        n_units = int(self.unit_of_index.max()) + 1 if owned else 1
        return owned // max(n_units, 1)

    def __repr__(self) -> str:
        return f"Member({self.param!r}, dim={self.dim}, role={self.role!r}, per_unit={self.per_unit})"


@dataclass(eq=False)
class Group:
    """A set of units that must be cut together slice by slice.

    Groups hash by identity, so they can key a pruning plan ``{group: [unit ids]}``.
    """

    kind: GroupKind
    name: str
    size: int
    members: list[Member]
    exact: bool = True
    graph_id: int = 0
    frozen_units: int = 0
    extra: dict = field(default_factory=dict)

    def member(self, param: str, dim: int | None = None) -> Member:
        """The member slice of parameter ``param`` (and ``dim`` when given)."""
        for m in self.members:
            if m.param == param and (dim is None or m.dim == dim):
                return m
        raise KeyError(f"group {self.name} has no member {param}" + (f" dim {dim}" if dim is not None else ""))

    @property
    def params(self) -> list[str]:
        return sorted({m.param for m in self.members})

    def parameter_count(self, units=None) -> int:
        """Number of parameter elements that cutting ``units`` (default: one unit) removes,
        counting each element once even when it sits in two member dims."""
        n_units = 1 if units is None else len(list(units))
        return int(self.extra.get("params_per_unit", 0)) * n_units

    def __repr__(self) -> str:
        return f"Group(kind={self.kind.value}, name={self.name!r}, size={self.size}, members={len(self.members)})"


def components(n: int, edge_a: list[np.ndarray], edge_b: list[np.ndarray]) -> np.ndarray:
    """Component label of every neuron id in ``range(n)``."""
    if edge_a:
        a = np.concatenate(edge_a)
        b = np.concatenate(edge_b)
    else:
        a = b = np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(a.shape[0], dtype=np.int8), (a, b)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64)


def frozen_components(labels: np.ndarray, frozen: list[tuple[np.ndarray, str]]) -> np.ndarray:
    mask = np.zeros(int(labels.max()) + 1 if labels.size else 0, dtype=bool)
    for ids, _ in frozen:
        if ids.size:
            mask[labels[ids]] = True
    return mask


def marked_components(labels: np.ndarray, id_lists: list[np.ndarray]) -> np.ndarray:
    """Boolean mask over components: those holding any of the ids in ``id_lists``."""
    return frozen_components(labels, [(ids, "") for ids in id_lists])


def resolve_products(relations: list[Relation], labels: np.ndarray, frozen_comp: np.ndarray,
                     head_comp: np.ndarray | None = None):
    """Edges and freezes that make each reshape's unit factor the outermost unfrozen one.

    Row-major index ``i`` of the whole axis sits in block ``i // inner`` of the chosen factor,
    where ``inner`` is the product of the factor sizes after it. Cutting one unit of the chosen
    factor removes one contiguous block of the whole axis, which keeps every other factor
    intact, so the reshape stays valid after the cut.
    """
    new_a, new_b, freeze, decisions = [], [], [], []
    for rel in relations:
        factors = [f for f in rel.factors if f.size > 1]
        if len(factors) == 1:
            new_a.append(rel.whole)
            new_b.append(factors[0])
            decisions.append(0)
            continue
        chosen = None
        # never the innermost factor: it is the contiguous feature axis (head_dim), whose
        # size the module hard-codes; outer factors frozen by select/unbind may be skipped.
        # When the code wrote -1 for one factor, only that one may change size.
        candidates = list(enumerate(factors[:-1]))
        if rel.preferred is not None:
            # ``view(b, s, self.num_heads, -1)``: the head count is written, but it is an attribute the
            # head cut rescales, and the -1 then keeps head_dim: attention heads stay candidates
            candidates = [(k, f) for k, f in candidates if f is rel.preferred
                          or (rel.preferred is factors[-1] and head_comp is not None
                              and head_comp[labels[f]].all())]
        if (head_comp is not None and head_comp[labels[factors[-1]]].all()
                and (rel.preferred is None or rel.preferred is factors[-1])):
            # the batch axis of a bmm attention ([b, h] -> [b*h]): the heads are innermost. The
            # code sizes this axis as batch x num_heads, so the heads may be the unit (tried
            # after the outer factors, which are the batch)
            candidates.append((len(factors) - 1, factors[-1]))
        for k, f in candidates:
            if not frozen_comp[labels[f]].any():
                chosen = k
                break
        if chosen is None:
            # else a factor with only some indices frozen: those stay, the others are units
            # (Falcon's fused [query heads.., k, v] axis: k and v are read by a fixed index)
            for k, f in candidates:
                if not frozen_comp[labels[f]].all():
                    chosen = k
                    break
        decisions.append(chosen)
        if chosen is None:
            # no factor may change size, so none may lose units: cutting a factor alone would
            # break the reshape (e.g. Llama-4's experts view [E*T, H] -> [E, -1, H], where only
            # the token factor was left to torch and the experts factor is a fresh axis)
            freeze.append((rel.whole, f"reshape at {rel.where}"))
            freeze.extend((f, f"reshape at {rel.where}") for f in factors)
            continue
        inner = int(np.prod([f.size for f in factors[chosen + 1:]], dtype=np.int64))
        unit = factors[chosen]
        block = (np.arange(rel.whole.size) // inner) % unit.size
        new_a.append(rel.whole)
        new_b.append(unit[block])
        for k, f in enumerate(factors):
            if k != chosen:
                freeze.append((f, f"kept whole by reshape at {rel.where}"))
    return new_a, new_b, freeze, decisions


def unify_factors(relations: list[Relation], labels: np.ndarray
                  ) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """Edges coupling the factors of reshapes whose wholes are the same neurons index by index.

    Attention written with ``bmm`` merges heads into the batch axis (``[b, h, s, d] -> [b*h, s, d]``)
    for the query, the key, the value and an ALiBi bias separately; the bmm couples the merged axes,
    so their factors are the same neurons too (head ``j`` of the query is head ``j`` of the key).
    Only wholes whose indices are distinct neurons and factorisations of equal sizes are matched.
    Returns the edges and, per edge, the index of the relation whose factor is its second end.
    """
    new_a: list[np.ndarray] = []
    new_b: list[np.ndarray] = []
    which: list[int] = []
    seen: dict[tuple, list[np.ndarray]] = {}
    for r, rel in enumerate(relations):
        factors = [f for f in rel.factors if f.size > 1]
        if len(factors) < 2:
            continue
        whole = labels[rel.whole]
        if np.unique(whole).size != whole.size:
            continue
        key = (tuple(f.size for f in factors), whole.tobytes())
        first = seen.setdefault(key, factors)
        if first is not factors:
            for a, b in zip(first, factors):
                new_a.append(a)
                new_b.append(b)
                which.append(r)
    return new_a, new_b, which


def heads_through_products(head_ids: list[np.ndarray], relations: list[Relation],
                           labels: np.ndarray) -> list[np.ndarray]:
    """``head_ids`` plus the factors of every reshape whose whole holds heads.

    A bmm on a merged ``[b*h]`` axis marks the merged axis; the heads are its ``h`` factor.
    """
    if not head_ids:
        return list(head_ids)
    marked = np.zeros(int(labels.max()) + 1, dtype=bool)
    marked[labels[np.concatenate(head_ids)]] = True
    out = list(head_ids)
    done: set[int] = set()
    changed = True
    while changed:  # a factor may itself be the whole of another reshape; at most one pass per reshape
        changed = False
        for k, rel in enumerate(relations):
            if k in done or not rel.whole.size or not marked[labels[rel.whole]].any():
                continue
            done.add(k)
            for f in rel.factors:
                if f.size > 1:
                    out.append(f)
                    marked[labels[f]] = True
                    changed = True
    return out


@dataclass
class ParamAxis:
    param: str
    dim: int
    ids: np.ndarray
    is_buffer: bool


def form_groups(param_axes: list[ParamAxis], labels: np.ndarray, frozen_comp: np.ndarray,
                uses: list[ParamUse], seed: int = 0):
    """Group the unfrozen components by the parameter slices they touch.

    Returns ``(groups, comp_group, comp_unit)``: the groups (kind not yet set) and, for every
    component, its group index and unit id (``-1`` for frozen / parameter-free components).
    """
    n_comp = frozen_comp.shape[0]
    comps, axes, positions = [], [], []
    for k, pa in enumerate(param_axes):
        c = labels[pa.ids]
        keep = ~frozen_comp[c]
        comps.append(c[keep])
        axes.append(np.full(int(keep.sum()), k, dtype=np.int64))
        positions.append(np.flatnonzero(keep) + k * (1 << 32))
    comp_all = np.concatenate(comps) if comps else np.zeros(0, dtype=np.int64)
    axis_all = np.concatenate(axes) if axes else np.zeros(0, dtype=np.int64)
    pos_all = np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64)
    n_axes = max(len(param_axes), 1)

    # a component's signature: which parameter dims it touches and how many indices in each,
    # hashed as sum(count_k * r_k) with random reals r (components list their occurrences in the
    # same axis order, so equal signatures give bit-identical sums)
    rng = np.random.default_rng(seed)
    weights = rng.random(n_axes) + 0.5
    sig = np.bincount(comp_all, weights=weights[axis_all], minlength=n_comp)
    param_comps = np.flatnonzero(np.bincount(comp_all, minlength=n_comp))
    _, group_of = np.unique(sig[param_comps], return_inverse=True)
    group_of = group_of.reshape(-1)

    # order units by where they first appear (parameter order, then index): reversed assignment
    # leaves each component's first position
    first = np.full(n_comp, np.iinfo(np.int64).max, dtype=np.int64)
    first[comp_all[::-1]] = pos_all[::-1]
    comp_group = np.full(n_comp, -1, dtype=np.int64)
    comp_unit = np.full(n_comp, -1, dtype=np.int64)
    n_groups = int(group_of.max()) + 1 if group_of.size else 0
    order = np.lexsort((first[param_comps], group_of))
    sorted_comps = param_comps[order]
    sorted_groups = group_of[order]
    starts = np.searchsorted(sorted_groups, np.arange(n_groups))
    comp_unit[sorted_comps] = np.arange(sorted_comps.size) - starts[sorted_groups]
    sizes = np.bincount(group_of, minlength=n_groups)
    # groups in order of first appearance of their first unit
    group_first = np.full(n_groups, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(group_first, group_of, first[param_comps])
    group_order = np.argsort(group_first, kind="stable")
    remap = np.empty(n_groups, dtype=np.int64)
    remap[group_order] = np.arange(n_groups)
    comp_group[param_comps] = remap[group_of]

    first_use: dict[tuple[str, int], ParamUse] = {}
    for use in uses:
        first_use.setdefault((use.param, use.dim), use)
    axes_of_group: list[list[int]] = [[] for _ in range(n_groups)]
    pairs = np.flatnonzero(np.bincount(comp_group[comp_all] * n_axes + axis_all, minlength=n_groups * n_axes))
    for g, k in zip((pairs // n_axes).tolist(), (pairs % n_axes).tolist()):
        axes_of_group[g].append(k)
    groups = []
    for g in range(n_groups):
        members = []
        for k in axes_of_group[g]:
            pa = param_axes[k]
            c = labels[pa.ids]
            unit = np.where(comp_group[c] == g, comp_unit[c], -1)
            use = first_use.get((pa.param, pa.dim))
            members.append(Member(pa.param, pa.dim, unit, use.role if use else "other",
                                  use.order if use else 1 << 30, pa.is_buffer))
        members.sort(key=lambda m: (m.order, m.param, m.dim))
        groups.append(Group(GroupKind.A, "", int(sizes[group_order[g]]), members))
    return groups, comp_group, comp_unit


def classify(groups: list[Group], comp_group: np.ndarray, labels: np.ndarray, head_ids, embed_ids,
             param_ids: dict[tuple[str, int], np.ndarray], mixed_ids=(), input_ids=()) -> None:
    """Set ``kind``, ``exact`` and ``name`` of every group from where it sits in the graph.

    ``input_ids``: channel ids of the model's (frozen) inputs. A layer reading them (an input projection)
    is an entry point of the stream it writes, like an embedding."""
    def groups_touching(id_lists) -> set[int]:
        if not id_lists:
            return set()
        g = comp_group[labels[np.concatenate(id_lists)]]
        return set(np.unique(g[g >= 0]).tolist())

    head_groups = groups_touching(head_ids)
    embed_groups = groups_touching(embed_ids)
    mixed_groups = groups_touching(list(mixed_ids))
    input_comps = set(np.unique(labels[np.concatenate(list(input_ids))]).tolist()) if len(input_ids) else set()
    for gi, group in enumerate(groups):
        if gi in head_groups:
            group.kind = GroupKind.B
        elif gi in embed_groups:
            group.kind = GroupKind.C
        else:
            # the residual stream is written by several layers that read different groups. A producer
            # whose other dims are all frozen (Mamba's dt_proj reading the frozen time_step_rank) reads
            # no group: it is no second source, so a block's inner width stays A (zero-mask checked,
            # its MLP-width attribute rescaled in its own block) instead of passing for hidden channels.
            # A producer reading the model's input features (an input projection) is a source of its own:
            # with one residual block after it, its output is the residual stream (C), not a block's width
            sources: set[object] = set()
            for m in group.members:
                if m.role != "out":
                    continue
                src = None
                for d in (d for (p, d) in param_ids if p == m.param and d != m.dim):
                    comps = labels[param_ids[(m.param, d)]]
                    g = comp_group[comps]
                    g = g[g >= 0]
                    if g.size:
                        src = int(np.bincount(g).argmax())
                    elif input_comps and not input_comps.isdisjoint(np.unique(comps).tolist()):
                        src = "model input"
                if src is not None:
                    sources.add(src)
            group.kind = GroupKind.C if len(sources) >= 2 else GroupKind.A
        # exact (cut == zero-mask) unless something reduces over the units: a norm's statistic
        # (hidden channels, OLMo-2's q/k norm over all heads), a mean over a weight (BitNet)
        group.exact = group.kind is not GroupKind.C and gi not in mixed_groups
    mark_latent(groups, comp_group, labels, param_ids)
    name_groups(groups)


def mark_latent(groups: list[Group], comp_group: np.ndarray, labels: np.ndarray,
                param_ids: dict[tuple[str, int], np.ndarray]) -> None:
    """Flag A groups that are low-rank bottlenecks of attention: ``extra["latent"] = True``.

    Multi-head latent attention (DeepSeek-V2/V3) projects the hidden state down to a latent
    (``q_a_proj``/``kv_a_proj``, width ``q_lora_rank``/``kv_lora_rank``) and back up to the heads
    (``q_b_proj``/``kv_b_proj``). Structurally that latent is an A group (neurons produced and
    consumed inside one block), but one of its layers' other dims carries attention heads (a B
    group), so its width is an attention rank, not an MLP width: the cut updates rank attributes.
    """
    dims_of: dict[str, list[int]] = {}
    for p, d in param_ids:
        dims_of.setdefault(p, []).append(d)
    heads = {gi for gi, g in enumerate(groups) if g.kind is GroupKind.B}
    if not heads:
        return
    for group in groups:
        if group.kind is not GroupKind.A:
            continue
        for m in group.members:
            touched = set()
            for d in dims_of.get(m.param, ()):
                if d != m.dim:
                    g = comp_group[labels[param_ids[(m.param, d)]]]
                    touched.update(np.unique(g[g >= 0]).tolist())
            if touched & heads:
                group.extra["latent"] = True
                break


def _module_of(param: str) -> list[str]:
    return param.split(".")[:-1]


def name_groups(groups: list[Group]) -> None:
    """Readable names: the common module prefix of the members (``model.layers.0.mlp``)."""
    seen: dict[str, int] = {}
    for group in groups:
        paths = [_module_of(m.param) for m in group.members]
        prefix = paths[0] if paths else []
        for p in paths[1:]:
            n = 0
            while n < min(len(prefix), len(p)) and prefix[n] == p[n]:
                n += 1
            prefix = prefix[:n]
        if group.kind is GroupKind.C:
            base = "hidden" if not prefix else ".".join(prefix) + ".hidden"
        else:
            base = ".".join(prefix) or f"group{group.kind.value}"
        count = seen.get(base, 0)
        seen[base] = count + 1
        group.name = base if count == 0 else f"{base}#{count}"
