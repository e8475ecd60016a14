"""Module-level flow of the coupled channels: which module hands which group's channels to which.

``graph.nx`` records *couplings* between channel spaces (its edge directions follow the op
rules, not the data), so the picture's arrows are derived from the groups instead. Every
member of a group has a role and the position of its first use in execution order:

* writers (``out``, ``embed``) produce the group's channels: consecutive writers add up
  (``gate_proj`` and ``up_proj`` both feed ``down_proj``);
* readers (``in``) consume them from the current writers;
* in-line members (a norm's ``scale``/``bias``) read the stream and hand it on, so the hidden
  stream reads ``embed -> norm -> q/k/v``, ``o_proj -> norm -> gate/up``, ``down -> norm``.

Key activations (attention, softmax) whose heads belong to a group sit between that group's
writers and readers (``q/k/v -> attention -> o_proj``). Residual skip connections are not
drawn: each arrow goes from the latest writer, which keeps the picture a chain.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

# ops that mix many channels into new ones: worth a node of their own between the weights
KEY_OPS: dict[str, str] = {
    "aten.scaled_dot_product_attention.default": "attention",
    "aten._scaled_dot_product_flash_attention.default": "attention",
    "aten._scaled_dot_product_efficient_attention.default": "attention",
    "aten._scaled_dot_product_flash_attention_for_cpu.default": "attention",
    "aten.softmax.int": "softmax",
    "aten._softmax.default": "softmax",
    "aten._safe_softmax.default": "softmax",
}

WRITE = {"out", "embed"}
READ = {"in", "other"}
INLINE = {"scale", "bias"}
UNKNOWN_ORDER = 1 << 30  # Member.order of a parameter dim no rule recorded a use for


@dataclass
class Unit:
    """One node of the module-level picture: a module with parameters, or a key activation."""

    id: str
    module: str  # the module path the unit is drawn inside ("" = top level)
    kind: str  # "module" | "activation"
    label: str
    params: list[str] = field(default_factory=list)  # parameters drawn in this unit
    op: str = ""  # the op of an activation unit
    group: str = ""  # the group whose channels an activation unit mixes
    tied: str = ""  # the parameter this unit shares with another module


@dataclass
class Flow:
    """Units in execution order and ``edges[(src, dst)] = {group kinds}``."""

    units: dict[str, Unit]
    edges: dict[tuple[str, str], set[str]]


def parent(path: str) -> str:
    """The module path one level up (``""`` at the top)."""
    return path.rsplit(".", 1)[0] if "." in path else ""


def tied_aliases(model) -> dict[str, list[str]]:
    """Every name of each shared parameter (tied embeddings), the canonical name first."""
    if model is None:
        return {}
    by_id: dict[int, list[str]] = defaultdict(list)
    for name, tensor in model.named_parameters(remove_duplicate=False):
        by_id[id(tensor)].append(name)
    return {names[0]: names for names in by_id.values() if len(names) > 1}


def module_flow(graph) -> Flow:
    """The module-level flow of a :class:`depgraph.DependencyGraph`."""
    units: dict[str, Unit] = {}
    unit_of_param: dict[str, str] = {}
    buffers = set(getattr(graph, "buffers", ()))

    def module_unit(uid: str) -> Unit:
        if uid not in units:
            units[uid] = Unit(uid, parent(uid), "module", uid.rsplit(".", 1)[-1])
        return units[uid]

    def add_param(param: str) -> str:
        if param not in unit_of_param:
            uid = parent(param) or param  # a top-level parameter is its own unit
            unit = module_unit(uid)
            unit.params.append(param)
            unit_of_param[param] = uid
        return unit_of_param[param]

    # units in execution order: members by first use, then parameters no rule used
    members = sorted(((m.order, m.param) for g in graph.groups() for m in g.members if not m.is_buffer))
    for _, param in members:
        add_param(param)
    for param in graph.param_shapes:
        if param not in buffers:
            add_param(param)

    tied_unit: dict[str, str] = {}
    for canonical, names in tied_aliases(getattr(graph, "model", None)).items():
        if canonical in unit_of_param:
            alias = parent(names[-1]) or names[-1]
            if alias != unit_of_param[canonical]:
                unit = module_unit(alias)
                unit.params.append(canonical)
                unit.tied, unit.label = canonical, f"{unit.label} (tied)"
                tied_unit[canonical] = alias

    key_units = _key_activations(graph, units)
    edges: dict[tuple[str, str], set[str]] = defaultdict(set)
    for group in graph.groups():
        _group_edges(group, unit_of_param, tied_unit, key_units.get(group.name, []), edges)
    return Flow(units, dict(edges))


def _key_activations(graph, units: dict[str, Unit]) -> dict[str, list[str]]:
    """Add a unit per attention/softmax op whose channels belong to a group: {group: [unit ids]}."""
    by_group: dict[str, list[str]] = defaultdict(list)
    seen: dict[str, str] = {}
    count: dict[tuple[str, str], int] = defaultdict(int)
    for _, data in graph.nx.nodes(data=True):
        op = str(data.get("op", ""))
        if data.get("kind") != "activation" or op not in KEY_OPS:
            continue
        tensor = str(data.get("tensor", ""))
        module = str(data.get("module", ""))
        if tensor not in seen:
            # the k-th such op in a module gets the same id in every repeated block
            k = count[(module, op)]
            count[(module, op)] += 1
            seen[tensor] = uid = f"{module}/{KEY_OPS[op]}#{k}"
            units[uid] = Unit(uid, module, "activation", KEY_OPS[op], op=op)
        group = str(data.get("group") or "")
        uid = seen[tensor]
        if group and uid not in by_group[group]:
            by_group[group].append(uid)
            units[uid].group = units[uid].group or group
    return by_group


def _group_edges(group, unit_of_param: dict[str, str], tied_unit: dict[str, str], keys: list[str],
                 edges: dict[tuple[str, str], set[str]]) -> None:
    kind = group.kind.value
    # one event per (unit, position): a linear's weight and bias are one writer
    events: list[tuple[str, set[str]]] = []
    last: tuple[str, int] | None = None
    for m in group.members:
        if m.is_buffer or m.order >= UNKNOWN_ORDER:
            continue  # no recorded use: where it sits in the flow is unknown, so draw no arrow
        unit = unit_of_param.get(m.param)
        if unit is None:
            continue
        if last == (unit, m.order):
            events[-1][1].add(m.role)
        else:
            events.append((unit, {m.role}))
            last = (unit, m.order)
    # a tied weight's second use (the output head) reads the stream after everything else
    for m in group.members:
        if m.role == "embed" and m.param in tied_unit:
            events.append((tied_unit[m.param], {"in"}))

    if keys:
        writers = [u for u, roles in events if roles & WRITE]
        readers = [u for u, roles in events if roles & READ and not roles & WRITE]
        chain = [*keys]
        for w in writers:
            _edge(edges, w, chain[0], kind)
        for a, b in zip(chain, chain[1:]):
            _edge(edges, a, b, kind)
        for r in readers:
            _edge(edges, chain[-1], r, kind)
        return

    head: list[str] = []
    wrote = False
    for unit, roles in events:
        if roles & READ or (roles & INLINE and not roles & WRITE):
            for h in head:
                _edge(edges, h, unit, kind)
        if roles & WRITE:
            head = [*head, unit] if wrote else [unit]
            wrote = True
        elif roles & INLINE and not roles & READ:
            head, wrote = [unit], False
        else:
            wrote = False


def _edge(edges: dict[tuple[str, str], set[str]], src: str, dst: str, kind: str) -> None:
    if src != dst:
        edges[(src, dst)].add(kind)
