"""Module-level flow of the coupled channels: which module hands which group's channels to which.

``graph.nx`` records *couplings* between channel spaces (its edge directions follow the op
rules, not always the data), so the picture's arrows are derived from the groups instead.
Every member of a group has a role and the position of its first use in execution order:

* writers (``out``, ``embed``) produce the group's channels; consecutive writers add up
  (``gate_proj`` and ``up_proj`` both feed ``down_proj``);
* readers (``in``) consume them from the current writers;
* in-line members (a norm's ``scale``/``bias``) read the stream and hand it on, so the hidden
  stream reads ``embed -> norm -> q/k/v``, ``o_proj -> norm -> gate/up``, ``down -> norm``.

Two local look-ups in ``graph.nx`` fix what execution order alone gets wrong: a weight reads
the norm whose module computed its input (parallel attention/MLP blocks run two norms before
either reader), and a norm no rule recorded a use for (``x * (1 + w)``) is placed where its
module computes a reader's input or post-processes a writer's output.

Key activations (attention, softmax) whose heads belong to a group sit between that group's
writers and readers (``q/k/v -> attention -> o_proj``). Residual skip connections are not
drawn: each arrow starts at the latest writer, which keeps the picture a chain.
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
READ = {"in"}
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
            module_unit(uid).params.append(param)
            unit_of_param[param] = uid
        return unit_of_param[param]

    # units in execution order: members by first use, then parameters no rule used
    for _, param in sorted((m.order, m.param) for g in graph.groups() for m in g.members if not m.is_buffer):
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
                if not unit.tied:
                    unit.tied, unit.label = canonical, f"{unit.label} (tied)"
                tied_unit[canonical] = alias

    rank = {p: i for i, p in enumerate(graph.param_shapes)}  # declaration order: weight before bias
    for unit in units.values():
        unit.params.sort(key=lambda p: rank.get(p, len(rank)))
    key_units = _key_activations(graph, units)
    edges: dict[tuple[str, str], set[str]] = defaultdict(set)
    near = _Near(graph.nx)
    for group in graph.groups():
        _GroupFlow(group, unit_of_param, tied_unit, graph.param_shapes, near, edges).run(
            key_units.get(group.name, []))
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


class _Near:
    """Modules of the activations a few ops before / after a parameter dim in ``graph.nx``.

    Activations carry the module that computed them, so "the input of ``q_proj`` was computed
    in ``input_layernorm``" is a short walk. The walk starts at the dim node and its direct
    neighbours (a transposed weight), then follows edges the chosen way through activations.
    """

    def __init__(self, g, depth: int = 3):
        self.g = g
        self.depth = depth

    def modules(self, nodes: list[str], backward: bool) -> set[str]:
        g = self.g
        start = [n for n in nodes if n in g]
        frontier = list(start)
        for n in start:
            frontier += [s for s in g.successors(n) if g.nodes[s].get("kind") == "activation"]
        seen = set(frontier)
        found: set[str] = set()
        for _ in range(self.depth):
            nxt = []
            for n in frontier:
                for p in (g.predecessors(n) if backward else g.successors(n)):
                    data = g.nodes[p]
                    if p in seen or data.get("kind") != "activation":
                        continue
                    seen.add(p)
                    found.add(str(data.get("module") or ""))
                    nxt.append(p)
            frontier = nxt
        return found


def _inside(unit: str, modules: set[str]) -> bool:
    return any(m == unit or m.startswith(unit + ".") for m in modules)


@dataclass
class _Norm:
    unit: str
    fed_by: list[str]


class _GroupFlow:
    """Arrows of one group's channels (see the module docstring for the rules)."""

    def __init__(self, group, unit_of_param, tied_unit, param_shapes, near: _Near, edges):
        self.kind = group.kind.value
        self.near = near
        self.edges = edges
        self.events: list[tuple[str, set[str], list[str]]] = []  # (unit, roles, dim nodes)
        self.floating: list[str] = []  # 1-D (norm-like) units no rule recorded a use for
        last: tuple[str, int] | None = None
        for m in group.members:
            unit = unit_of_param.get(m.param)
            if m.is_buffer or unit is None:
                continue
            node = f"param:{m.param}:{m.dim}"
            if m.order >= UNKNOWN_ORDER:
                if len(param_shapes.get(m.param, ())) == 1 and unit not in self.floating:
                    self.floating.append(unit)
                continue
            if last == (unit, m.order):  # one event per (unit, position): weight and bias together
                self.events[-1][1].add(m.role)
                self.events[-1][2].append(node)
            else:
                self.events.append((unit, {m.role}, [node]))
                last = (unit, m.order)
        placed = {u for u, _, _ in self.events}
        self.floating = [u for u in self.floating if u not in placed]
        # a tied weight's second use (the output head) reads the stream after everything else
        for m in group.members:
            if m.role == "embed" and m.param in tied_unit:
                self.events.append((tied_unit[m.param], {"in"}, [f"param:{m.param}:{m.dim}"]))

    def run(self, keys: list[str]) -> None:
        if keys:  # attention heads: writers -> attention -> readers
            for unit, roles, _ in self.events:
                if roles & WRITE:
                    self.edge(unit, keys[0])
                elif roles & (READ | {"other"}):
                    self.edge(keys[-1], unit)
            for a, b in zip(keys, keys[1:]):
                self.edge(a, b)
            return
        found: list[tuple[str, str]] = []
        head: list[str] = []  # the units whose output is the stream right now
        consumed: set[str] = set()  # head units something read (a new writer replaces them)
        norms: list[_Norm] = []  # in-line units seen so far, latest last

        def add_norm(unit: str) -> None:
            found.extend((h, unit) for h in head)
            consumed.update(head)
            norms.append(_Norm(unit, list(head)))

        for unit, roles, nodes in self.events:
            if roles & (READ | {"other"}):
                before = self.near.modules(nodes, backward=True) if (norms or self.floating) else set()
                src = next((k for k in range(len(norms) - 1, max(-1, len(norms) - 9), -1)
                            if _inside(norms[k].unit, before)), None)
                floating = next((f for f in self.floating if _inside(f, before)), None)
                if src is None and floating is not None:
                    self.floating.remove(floating)
                    add_norm(floating)
                    src = len(norms) - 1
                elif src is not None and src < len(norms) - 1:
                    # an earlier norm feeds this weight, so the norms after it ran in parallel
                    # with it: they read what it read, not its output
                    for later in norms[src + 1:]:
                        for f in later.fed_by:
                            if (f, later.unit) in found:
                                found.remove((f, later.unit))
                        later.fed_by = list(norms[src].fed_by)
                        found.extend((f, later.unit) for f in later.fed_by)
                sources = [norms[src].unit] if src is not None else head
                found.extend((h, unit) for h in sources)
                consumed.update(sources)
                if src is not None:
                    head = [norms[src].unit]
            if roles & WRITE:
                head = [h for h in head if h not in consumed] + [unit]
                after = self.near.modules(nodes, backward=False) if self.floating else set()
                floating = next((f for f in self.floating if _inside(f, after)), None)
                if floating is not None:  # a norm applied to this writer's output (post-norm)
                    self.floating.remove(floating)
                    found.append((unit, floating))
                    head[-1] = floating
            elif roles & INLINE and not roles & READ:
                add_norm(unit)
                head = [unit]
        for a, b in found:
            self.edge(a, b)

    def edge(self, src: str, dst: str) -> None:
        if src != dst:
            self.edges[(src, dst)].add(self.kind)
