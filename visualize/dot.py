"""Build pydot graphs of a dependency graph: the module view and the channel-group view.

* :func:`module_view` - one node per module with parameters (a table of its parameters and
  dims: size, group kind, frozen or conservatively coupled), key activations (attention) as
  small ellipses, modules nested as clusters, arrows coloured by the kind of group whose
  channels flow along them. Repeated blocks are drawn once with a ``×N`` label.
* :func:`group_view` - one table per group: which index ranges of which parameter dims each
  unit owns, i.e. exactly what moves together when one unit is cut.

Both take an :class:`~visualize.style.Overlay` (scores as heat colours, a plan as cut units).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np
import pydot

from .collapse import Collapse, find_runs
from .flow import Unit, module_flow, parent
from .style import (
    CUT_TINT,
    FROZEN_COLOR,
    FROZEN_TINT,
    HEAT,
    KIND_COLOR,
    KIND_TEXT,
    KIND_TINT,
    WARN_COLOR,
    WARN_TINT,
    Overlay,
    esc,
    heat_color,
    human,
    ranges,
    resolve,
    text_color,
)

FONT = "Helvetica"
TABLE = '<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0" CELLPADDING="3">'


def _node_id(prefix: str, path: str) -> str:
    return f"{prefix}_{re.sub(r'[^0-9A-Za-z_]', '_', path)}"


def _under(path: str, scope: str | None) -> bool:
    return not scope or path == scope or path.startswith(scope + ".")


def _new_dot(title: str) -> pydot.Dot:
    dot = pydot.Dot("depgraph", graph_type="digraph")
    dot.set("rankdir", "TB")
    dot.set("newrank", "true")
    dot.set("compound", "true")
    dot.set("ordering", "out")  # keep q, k, v (and gate, up) in execution order
    dot.set("nodesep", "0.25")
    dot.set("ranksep", "0.35")
    dot.set("fontname", FONT)
    dot.set("fontsize", "12")
    dot.set("label", f"<<B>{esc(title)}</B>>")
    dot.set("labelloc", "t")
    dot.set_node_defaults(fontname=FONT, fontsize="10")
    dot.set_edge_defaults(fontname=FONT, fontsize="9", arrowsize="0.7")
    return dot


def _title(graph, extra: str = "") -> str:
    counts = {k: len(graph.groups(k)) for k in "ABC"}
    name = type(getattr(graph, "model", None)).__name__ if getattr(graph, "model", None) is not None else "model"
    text = f"{name}: {len(graph.groups())} groups (A={counts['A']}, B={counts['B']}, C={counts['C']})"
    return f"{text} \u2014 {extra}" if extra else text


# ---- shared bookkeeping ------------------------------------------------------------------------
class _Index:
    """Per-graph lookups: (param, dim) -> [(group, member)], conservatively frozen dims, module types."""

    def __init__(self, graph):
        self.graph = graph
        self.dims: dict[tuple[str, int], list] = defaultdict(list)
        for g in graph.groups():
            for m in g.members:
                self.dims[(m.param, m.dim)].append((g, m))
        self.conservative: set[tuple[str, int]] = {
            key for key, reason in graph.frozen.items() if str(reason).startswith("unknown op")}
        model = getattr(graph, "model", None)
        self.types: dict[str, str] = {}
        if model is not None:
            self.types = {name: type(mod).__name__ for name, mod in model.named_modules()}


def _span(values: Sequence[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}\u2013{hi}"


def _runs(graph, scope: str | None, collapse: bool) -> Collapse:
    """Repeated blocks to fold, keeping only runs inside ``scope`` (a scoped block is drawn as itself)."""
    if not collapse:
        return Collapse([])
    runs = find_runs(graph).runs
    return Collapse([r for r in runs if _under(r.prefix, scope)])


# ---- module view -------------------------------------------------------------------------------
def module_view(graph, *, scope: str | None = None, collapse: bool = True, overlay: Overlay | None = None,
                title: str | None = None) -> pydot.Dot:
    """The module-level picture of ``graph`` (optionally only the modules under ``scope``)."""
    overlay = overlay or resolve(graph)
    index = _Index(graph)
    flow = module_flow(graph)
    runs = _runs(graph, scope, collapse)

    def canon(uid: str) -> str:
        module, sep, rest = uid.partition("/")
        return runs.canonical(module) + sep + rest

    def unit_path(u: Unit) -> str:
        return u.module if u.kind == "activation" else u.id

    in_scope = {uid: u for uid, u in flow.units.items() if _under(unit_path(u), scope)}
    if scope and not in_scope:
        known = sorted({runs.canonical(parent(u.id)) for u in flow.units.values() if u.kind == "module"})
        raise ValueError(f"scope {scope!r} matches no module with parameters; try one of: "
                         + ", ".join(known[:8]))
    instances: dict[str, list[Unit]] = defaultdict(list)  # drawn unit -> the units it stands for
    for uid, u in in_scope.items():
        instances[canon(uid)].append(u)

    extra = f"scope {scope}" if scope else ""
    if runs.runs and collapse:
        extra = ", ".join(filter(None, [extra, "repeated blocks drawn once"]))
    dot = _new_dot(title or _title(graph, extra))
    clusters = _ClusterTree(dot, runs)

    for drawn, units in instances.items():
        rep = units[0] if units[0].id == drawn else next((u for u in units if canon(u.id) == u.id), units[0])
        node_id = _node_id("u", drawn)
        if rep.kind == "activation":
            kind = next((g.kind.value for g in graph.groups() if g.name == rep.group), "")
            node = pydot.Node(node_id, label=rep.label, shape="ellipse", style="filled",
                              fillcolor=KIND_TINT[kind], color=KIND_COLOR[kind], fontsize="9",
                              tooltip=f"{rep.op} in {rep.module} (mixes the channels of {rep.group})",
                              height="0.3", margin="0.04,0.02")
        else:
            node = _module_node(node_id, drawn, rep, units, runs, index, overlay)
        clusters.add(runs.canonical(rep.module) if rep.kind == "activation" else parent(drawn), node,
                     own=None if rep.kind == "activation" else drawn)

    _unknown_notes(graph, clusters, runs, scope, index, instances)

    drawn_edges: set[tuple[str, str, str]] = set()
    into_next: set[tuple[str, str]] = set()  # one dashed arrow per unit that feeds the next block
    for (src, dst), kinds in flow.edges.items():
        if src not in in_scope or dst not in in_scope:
            continue
        a, b = canon(src), canon(dst)
        repeat = _crosses_blocks(runs, in_scope[src], in_scope[dst], unit_path)
        for kind in sorted(kinds):
            key = (a, b, kind + ("r" if repeat else ""))
            if key in drawn_edges or (a == b and not repeat) or (repeat and (a, kind) in into_next):
                continue
            drawn_edges.add(key)
            attrs = dict(color=KIND_COLOR[kind], penwidth="1.8",
                         tooltip=f"{KIND_TEXT.get(kind, 'channels')}: {src} \u2192 {dst}")
            if repeat:
                into_next.add((a, kind))
                run = runs.locate(unit_path(in_scope[src]))[0]
                attrs.update(style="dashed", constraint="false", label=f"next block (\u00d7{run.count})",
                             fontcolor=KIND_COLOR[kind])
            dot.add_edge(pydot.Edge(_node_id("u", a), _node_id("u", b), **attrs))

    clusters.finish()
    _legend(dot, overlay, bool(runs.runs and collapse))
    return dot


def _crosses_blocks(runs: Collapse, src: Unit, dst: Unit, unit_path) -> bool:
    a, b = runs.locate(unit_path(src)), runs.locate(unit_path(dst))
    return a is not None and b is not None and a[0] is b[0] and a[1] != b[1]


def _module_node(node_id: str, drawn: str, rep: Unit, units: list[Unit], runs: Collapse, index: _Index,
                 overlay: Overlay) -> pydot.Node:
    graph = index.graph
    shapes = graph.param_shapes
    # the same parameter in every block the node stands for
    params_by_canon: dict[str, list[str]] = defaultdict(list)
    for u in units:
        for p in u.params:
            params_by_canon[runs.canonical(p) if not u.tied else p].append(p)
    ncols = max((len(shapes.get(p, ())) for p in params_by_canon), default=1) or 1
    type_name = index.types.get(drawn, "")
    head = f"<B>{esc(rep.label)}</B>" + (f' <FONT POINT-SIZE="8">{esc(type_name)}</FONT>' if type_name else "")
    rows = [f'<TR><TD COLSPAN="{ncols + 1}" BGCOLOR="#ffffff">{head}</TD></TR>']
    border = "#555555"
    for cparam, names in params_by_canon.items():
        leaf = cparam.rsplit(".", 1)[-1] if not rep.tied else f"= {cparam}"
        cells = [f'<TD ALIGN="LEFT">{esc(leaf)}</TD>']
        ndim = len(shapes.get(names[0], ()))
        for d in range(ndim):
            cell, warn = _dim_cell(names, d, index, overlay)
            border = WARN_COLOR if warn else border
            cells.append(cell)
        cells += ["<TD></TD>"] * (ncols - ndim)
        rows.append("<TR>" + "".join(cells) + "</TR>")
    tip = drawn + "".join(f"\n{p}: {list(shapes.get(p, ()))}" for p in params_by_canon)
    if len(units) > 1:
        tip += f"\n(stands for {len(units)} repeated modules)"
    return pydot.Node(node_id, label=f"<{TABLE}{''.join(rows)}</TABLE>>", shape="plain", color=border,
                      tooltip=tip)


def _dim_cell(names: list[str], d: int, index: _Index, overlay: Overlay) -> tuple[str, bool]:
    """One parameter dim across the blocks it stands for: size, kind, frozen/warning, overlays."""
    graph = index.graph
    sizes = [graph.param_shapes[p][d] for p in names]
    kinds = sorted({g.kind.value for p in names for g, _ in index.dims.get((p, d), [])})
    frozen = [graph.frozen[(p, d)] for p in names if (p, d) in graph.frozen]
    warn = any((p, d) in index.conservative for p in names)
    text = _span(sizes)
    if overlay.has_plan and kinds:
        after = []
        for p in names:
            removed = sum(len(overlay.cut.get(g.name, ())) * m.per_unit for g, m in index.dims.get((p, d), []))
            after.append(graph.param_shapes[p][d] - removed)
        if after != sizes:
            text = f"{text}\u2192{_span(after)}"
    fill = KIND_TINT[kinds[0]] if len(kinds) == 1 else (FROZEN_TINT if not kinds else "#ffffff")
    # one heat per block the node stands for (the mean over the groups that own this dim there)
    per_block = []
    for p in names:
        hs = [overlay.group_heat[g.name] for g, _ in index.dims.get((p, d), []) if g.name in overlay.group_heat]
        if hs:
            per_block.append(float(np.mean(hs)))
    heats = per_block
    strip: tuple[int, str] | None = None
    if len(per_block) > 1:
        # a repeated block: a strip of one swatch per block shows which layers score high
        strip = _heat_strip(per_block)
    elif heats:
        fill = heat_color(heats[0])
    fc = text_color(fill)
    badge = "".join(f'<FONT COLOR="{fc if heats and not strip else KIND_COLOR[k]}"><B>{k}</B></FONT>'
                    for k in kinds)
    tip = ", ".join(sorted({g.name for p in names for g, _ in index.dims.get((p, d), [])}))
    if warn:
        fill, badge = WARN_TINT, badge + f'<FONT COLOR="{WARN_COLOR}"><B>!</B></FONT>'
        tip = "coupled conservatively (unknown op): never cut. " + tip
    elif frozen and not kinds:
        badge = f'<FONT COLOR="{FROZEN_COLOR}" POINT-SIZE="8">frozen</FONT>'
        tip = f"frozen: {frozen[0]}"
    elif frozen:
        tip += f"; partly frozen: {frozen[0]}"
    content = f'<FONT COLOR="{fc}">{esc(text)}</FONT> {badge}'
    if strip:  # a cell holds text or one table: put both in a table
        content = (f'<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0" CELLPADDING="0">'
                   f'<TR><TD COLSPAN="{strip[0]}">{content}</TD></TR><TR>{strip[1]}</TR></TABLE>')
    cell = f'<TD BGCOLOR="{fill}" TOOLTIP="{esc(tip or "dim " + str(d))}">{content}</TD>'
    return cell, warn


def _heat_strip(values: list[float], max_swatches: int = 32) -> tuple[int, str]:
    """Swatch cells, one per block (averaged into ``max_swatches`` bins for deep models): (count, cells)."""
    bins = np.array_split(np.asarray(values, dtype=np.float64), min(len(values), max_swatches))
    cells = "".join(f'<TD BGCOLOR="{heat_color(float(b.mean()))}" WIDTH="6" HEIGHT="6"></TD>' for b in bins)
    return len(bins), cells


def _unknown_notes(graph, clusters: _ClusterTree, runs: Collapse, scope, index: _Index, instances) -> None:
    """A red note per module that ran ops no rule covers (counted in drawn blocks only)."""
    per_module: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for op, where in getattr(graph, "unknown_ops", []):
        module = where.split(" at ", 1)[1] if " at " in where else ""
        module = "" if module == "<top>" else module
        if runs.hidden(module) or not _under(module, scope):
            continue
        per_module[module][op] += 1
    for module, ops in per_module.items():
        lines = "<BR/>".join(f"{esc(op)} \u00d7{n}" for op, n in sorted(ops.items())[:6])
        if len(ops) > 6:
            lines += f"<BR/>\u2026 {len(ops) - 6} more"
        label = (f'<<FONT COLOR="{WARN_COLOR}"><B>unknown ops</B></FONT><BR/>'
                 f'<FONT POINT-SIZE="8">{lines}<BR/>(channels coupled conservatively)</FONT>>')
        node_id = _node_id("w", module or "top")
        clusters.add(module, pydot.Node(node_id, label=label, shape="note", color=WARN_COLOR,
                                        fillcolor="#fff5f5", style="filled",
                                        tooltip=f"ops without a rule in {module or 'the top level'}"))
        # point at the modules whose channels these ops froze
        targets = set()
        for drawn, units in instances.items():
            for u in units:
                if u.kind == "module" and any((p, d) in index.conservative for p in u.params
                                              for d in range(len(graph.param_shapes.get(p, ())))):
                    if _under(u.id, module) or not module:
                        targets.add(drawn)
        for t in sorted(targets):
            clusters.dot.add_edge(pydot.Edge(node_id, _node_id("u", t), color=WARN_COLOR, style="dotted",
                                             arrowhead="none", constraint="false"))


class _ClusterTree:
    """Module paths as nested clusters; a container with a single child cluster is skipped."""

    def __init__(self, dot: pydot.Dot, runs: Collapse):
        self.dot = dot
        self.runs = runs
        self.nodes: dict[str, list[pydot.Node]] = defaultdict(list)
        self.own: list[tuple[str, str, pydot.Node]] = []

    def add(self, module: str, node: pydot.Node, own: str | None = None) -> None:
        """Put ``node`` in ``module``'s cluster (or in the cluster of ``own`` if that one has children)."""
        self.nodes[module].append(node)
        if own:
            self.own.append((module, own, node))

    def finish(self) -> None:
        # a module with parameters *and* sub-modules (cls.predictions) sits inside its own cluster
        prefixes = {".".join(m.split(".")[:k]) for m in self.nodes if m for k in range(1, m.count(".") + 2)}
        for module, own, node in self.own:
            if own in prefixes:
                self.nodes[module].remove(node)
                self.nodes[own].append(node)
        paths = set()
        for module in self.nodes:
            parts = module.split(".") if module else []
            for k in range(1, len(parts) + 1):
                paths.add(".".join(parts[:k]))
        children: dict[str, list[str]] = defaultdict(list)
        for p in sorted(paths):
            children[parent(p)].append(p)

        def keep(p: str) -> bool:
            # a run's block is always a cluster (it carries the ×N); pass-through containers are not
            return bool(self.nodes.get(p)) or len(children.get(p, [])) > 1 or self.runs.run_of_block(p) is not None

        def build(p: str, container, shown_parent: str) -> None:
            target = container
            if p and keep(p):
                run = self.runs.run_of_block(p)
                rel = p[len(shown_parent) + 1:] if shown_parent and p.startswith(shown_parent + ".") else p
                if run is not None:
                    rel_run = run.label[len(shown_parent) + 1:] if shown_parent and run.label.startswith(
                        shown_parent + ".") else run.label
                    label = f'<<B>{esc(rel_run)}</B>>'
                    attrs = dict(style="rounded,filled,bold", fillcolor="#eef3fb", color="#4a6fa5", penwidth="2")
                else:
                    label = f"<{esc(rel)}>"
                    attrs = dict(style="rounded,filled", fillcolor="#fafafa", color="#9e9e9e")
                target = pydot.Cluster(_node_id("c", p), label=label, fontname=FONT, fontsize="11",
                                       labeljust="l", tooltip=p, **attrs)
                container.add_subgraph(target)
                shown_parent = p
            for node in self.nodes.get(p, []):
                target.add_node(node)
            for c in children.get(p, []):
                build(c, target, shown_parent)

        build("", self.dot, "")


def _legend(dot: pydot.Dot, overlay: Overlay, repeated: bool, view: str = "module") -> None:
    """A legend cluster: arrow colours by group kind, and what cell colours and marks mean."""
    rows = []
    for kind in "ABC":
        rows.append(f'<TR><TD><FONT COLOR="{KIND_COLOR[kind]}"><B>&#8212;&#8212;&#9654;</B></FONT></TD>'
                    f'<TD ALIGN="LEFT"><FONT COLOR="{KIND_COLOR[kind]}">{esc(KIND_TEXT[kind])}</FONT></TD></TR>')
    if view == "module":
        rows += ['<TR><TD>64 <B>B</B></TD><TD ALIGN="LEFT">dim size and the kind of its group</TD></TR>',
                 f'<TR><TD BGCOLOR="{FROZEN_TINT}"><FONT COLOR="{FROZEN_COLOR}" POINT-SIZE="8">frozen</FONT></TD>'
                 '<TD ALIGN="LEFT">never cut (model interface, embedding rows, ...)</TD></TR>',
                 f'<TR><TD BGCOLOR="{WARN_TINT}"><FONT COLOR="{WARN_COLOR}"><B>!</B></FONT></TD>'
                 '<TD ALIGN="LEFT">coupled conservatively (op without a rule)</TD></TR>']
    else:
        rows += ['<TR><TD>0-15, 32-47</TD><TD ALIGN="LEFT">indices of that dim one unit owns</TD></TR>',
                 '<TR><TD>a &#8594; b</TD><TD ALIGN="LEFT">weights that read group a and write group b</TD></TR>']
    if repeated:
        rows.append('<TR><TD>- - - &#9654;</TD><TD ALIGN="LEFT">into the next repeated block</TD></TR>')
    if overlay.has_plan:
        rows.append(f'<TR><TD BGCOLOR="{CUT_TINT}">64&#8594;48 <S>unit 3</S></TD>'
                    '<TD ALIGN="LEFT">size before &#8594; after the plan, cut units</TD></TR>')
    if overlay.has_scores:
        scale = "".join(f'<TD BGCOLOR="{c}" WIDTH="8"> </TD>' for c in HEAT)
        rows.append(f'<TR><TD><TABLE BORDER="0" CELLSPACING="0" CELLPADDING="1"><TR>{scale}</TR></TABLE></TD>'
                    '<TD ALIGN="LEFT">score low &#8594; high (units: in group; groups: mean, per kind)</TD></TR>')
        if repeated and view == "module":
            rows.append('<TR><TD>64 <B>A</B><BR/>&#9632;&#9632;&#9632;&#9632;</TD>'
                        '<TD ALIGN="LEFT">one swatch per repeated block (layer 0 on the left)</TD></TR>')
    legend = pydot.Cluster("legend", label="<<B>legend</B>>", fontname=FONT, fontsize="10", style="rounded",
                           color="#bdbdbd", labeljust="l")
    legend.add_node(pydot.Node("legend_table", shape="plain", fontsize="9",
                               label=f'<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0" CELLPADDING="2">'
                                     f'{"".join(rows)}</TABLE>>'))
    dot.add_subgraph(legend)


# ---- channel-group view ------------------------------------------------------------------------
def _dim_name(param_shape: tuple[int, ...], dim: int) -> str:
    if len(param_shape) == 2:
        return "rows" if dim == 0 else "cols"
    return f"dim {dim}"


def _rel(path: str, scope: str | None) -> str:
    return path[len(scope) + 1:] if scope and path.startswith(scope + ".") else path


def group_view(graph, groups: Iterable | None = None, *, scope: str | None = None, collapse: bool = True,
               overlay: Overlay | None = None, max_units: int = 4, max_members: int = 12,
               max_groups: int = 60, title: str | None = None) -> pydot.Dot:
    """One table per group: the index ranges of every parameter dim each unit owns."""
    overlay = overlay or resolve(graph)
    runs = _runs(graph, scope, collapse)
    explicit = groups is not None
    if explicit:
        chosen = list(groups)
        by_name = {g.name: g for g in graph.groups()}
        chosen = [by_name.get(g.name, g) for g in chosen]
    else:
        chosen = [g for g in graph.groups() if any(_under(m.param, scope) for m in g.members)]
        if scope and not chosen:
            raise ValueError(f"scope {scope!r} touches no group; group names: "
                             + ", ".join(g.name for g in graph.groups()[:8]))
        # a repeated block's groups are drawn once (the run's first block stands for the others)
        chosen = [g for g in chosen if not all(runs.hidden(m.param) for m in g.members)]
    dropped = max(0, len(chosen) - max_groups)
    chosen = chosen[:max_groups]

    extra = f"scope {scope}" if scope else ("selected groups" if explicit else "")
    dot = _new_dot(title or _title(graph, ", ".join(filter(None, [extra, "channel groups"]))))
    scope_cluster = None
    if scope:
        run = runs.run_of_block(scope)
        label = run.label if run is not None else scope
        scope_cluster = pydot.Cluster(_node_id("c", scope), label=f"<<B>{esc(label)}</B>>", fontname=FONT,
                                      style="rounded,filled", fillcolor="#eef3fb", color="#4a6fa5",
                                      labeljust="l")
        dot.add_subgraph(scope_cluster)

    ids = {}
    for g in chosen:
        node_id = _node_id("g", g.name)
        ids[g.name] = node_id
        label = _group_table(graph, g, scope, runs, overlay, max_units, max_members, explicit)
        node = pydot.Node(node_id, label=f"<{label}>", shape="plain", tooltip=g.name)
        inside = scope_cluster is not None and _under(g.name.split("#", 1)[0], scope)
        (scope_cluster if inside else dot).add_node(node)
    if dropped:
        dot.add_node(pydot.Node("g_more", label=f"\u2026 {dropped} more groups", shape="plaintext"))

    # a weight links the group it reads (its "in"/"embed" dim) to the group it writes ("out")
    links: dict[tuple[str, str], list[str]] = defaultdict(list)
    dims_of: dict[str, list] = defaultdict(list)
    for g in chosen:
        for m in g.members:
            if not m.is_buffer and (explicit or not runs.hidden(m.param)) and (explicit or _under(m.param, scope)):
                dims_of[m.param].append((g, m))
    for param, pairs in dims_of.items():
        for g_in, m_in in pairs:
            for g_out, m_out in pairs:
                if g_in is not g_out and m_in.role in ("in", "embed") and m_out.role == "out":
                    leaf = param.rsplit(".", 2)[-2] if param.count(".") else param
                    if leaf not in links[(g_in.name, g_out.name)]:
                        links[(g_in.name, g_out.name)].append(leaf)
    for (a, b), names in links.items():
        kind = next(g.kind.value for g in chosen if g.name == b)
        text = ", ".join(names[:4]) + (", \u2026" if len(names) > 4 else "")
        dot.add_edge(pydot.Edge(ids[a], ids[b], color=KIND_COLOR[kind], penwidth="1.6", label=text,
                                fontcolor="#555555", tooltip=f"weights that read {a} and write {b}"))
    _legend(dot, overlay, False, view="neuron")
    return dot


def _group_table(graph, g, scope, runs: Collapse, overlay: Overlay, max_units: int, max_members: int,
                 explicit: bool) -> str:
    kind = g.kind.value
    shown_units = list(range(min(g.size, max_units)))
    more_units = g.size > len(shown_units)
    ncols = 4 + len(shown_units) + (1 if more_units else 0)
    members = [m for m in g.members if (explicit or _under(m.param, scope)) and (explicit or not runs.hidden(m.param))]
    hidden_members = len(g.members) - len(members)
    more_members = max(0, len(members) - max_members)
    members = members[:max_members]

    head_fill = KIND_COLOR[kind]
    if g.name in overlay.group_heat:
        head_fill = heat_color(overlay.group_heat[g.name])
    fc = text_color(head_fill)
    size = str(g.size)
    if overlay.has_plan and g.name in overlay.cut:
        size = f"{g.size}&#8594;{overlay.after(g)}"
    run_note = ""
    loc = runs.locate(g.name.split("#", 1)[0])
    if loc is not None and not explicit:
        run_note = f" &#183; \u00d7{loc[0].count} blocks"
    info = (f"{size} units &#183; {human(g.extra.get('params_per_unit', 0))} params/unit &#183; "
            f"{'exact' if g.exact else 'approx.'}{run_note}")
    stats = overlay.stats(g.name)
    if stats is not None:
        info += f"<BR/>score min {stats[0]:.3g} &#183; mean {stats[1]:.3g} &#183; max {stats[2]:.3g}"
    rows = [f'<TR><TD COLSPAN="{ncols}" BGCOLOR="{head_fill}"><FONT COLOR="{fc}"><B>{kind}</B>  '
            f'<B>{esc(g.name)}</B><BR/><FONT POINT-SIZE="9">{info}</FONT></FONT></TD></TR>']
    cut = set(overlay.cut.get(g.name, ()))
    heat = overlay.unit_heat.get(g.name)
    unit_heads = []
    for u in shown_units:
        fill = heat_color(float(heat[u])) if heat is not None else "#f5f5f5"
        text = f"unit {u}"
        if u in cut:
            text, fill = f"<S>unit {u}</S>", CUT_TINT
        tip = f"score {overlay.scores[g.name][u]:.4g}" if g.name in overlay.scores else f"unit {u}"
        unit_heads.append(f'<TD BGCOLOR="{fill}" TOOLTIP="{esc(tip)}"><FONT COLOR="{text_color(fill)}">'
                          f'{text}</FONT></TD>')
    if more_units:
        unit_heads.append(f'<TD BGCOLOR="#f5f5f5">+{g.size - len(shown_units)}</TD>')
    rows.append('<TR><TD BGCOLOR="#f5f5f5"><B>parameter</B></TD><TD BGCOLOR="#f5f5f5">dim</TD>'
                '<TD BGCOLOR="#f5f5f5">role</TD><TD BGCOLOR="#f5f5f5">/unit</TD>' + "".join(unit_heads) + "</TR>")
    for m in members:
        shape = graph.param_shapes.get(m.param, ())
        frozen = (m.param, m.dim) in graph.frozen
        cells = [f'<TD ALIGN="LEFT">{esc(_rel(m.param, scope or g.name.split("#", 1)[0]))}</TD>',
                 f"<TD>{esc(_dim_name(shape, m.dim))}</TD>",
                 f"<TD>{esc(m.role)}</TD>", f"<TD>{m.per_unit}</TD>"]
        for u in shown_units:
            text = esc(ranges(m.indices([u])))
            if u in cut:
                cells.append(f'<TD BGCOLOR="{CUT_TINT}"><S>{text}</S></TD>')
            else:
                cells.append(f'<TD BGCOLOR="{FROZEN_TINT if frozen else KIND_TINT[kind]}">{text}</TD>')
        if more_units:
            cells.append("<TD>&#8230;</TD>")
        rows.append("<TR>" + "".join(cells) + "</TR>")
    notes = []
    if more_members:
        notes.append(f"&#8230; {more_members} more members")
    if hidden_members:
        where = f"outside {esc(scope)}" if scope else "in repeated blocks"
        notes.append(f"+ {hidden_members} members {where}")
    if cut:
        listed = ", ".join(str(u) for u in sorted(cut)[:12]) + (", &#8230;" if len(cut) > 12 else "")
        notes.append(f"plan cuts {len(cut)} of {g.size} units: {listed}")
    if notes:
        rows.append(f'<TR><TD COLSPAN="{ncols}" ALIGN="LEFT"><FONT POINT-SIZE="8">{"<BR/>".join(notes)}'
                    "</FONT></TD></TR>")
    return TABLE + "".join(rows) + "</TABLE>"


# ---- entry point ---------------------------------------------------------------------------------
def build(graph, *, scope: str | None = None, level: str = "module", groups: Iterable | None = None,
          scores=None, plan=None, collapse: bool = True, title: str | None = None,
          max_units: int = 4, max_members: int = 12) -> pydot.Dot:
    """The pydot graph :func:`visualize.render` draws (see there for the arguments)."""
    if level not in ("module", "neuron"):
        raise ValueError(f"level must be 'module' or 'neuron', not {level!r}")
    overlay = resolve(graph, scores, plan)
    if groups is not None or level == "neuron":
        return group_view(graph, groups, scope=scope, collapse=collapse, overlay=overlay,
                          max_units=max_units, max_members=max_members, title=title)
    return module_view(graph, scope=scope, collapse=collapse, overlay=overlay, title=title)


__all__ = ["build", "group_view", "module_view"]
