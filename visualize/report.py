"""One self-contained HTML report: summary, group table, diagrams (inline SVG) and the plan.

Everything is inline (CSS, SVG produced by Graphviz); nothing is fetched from the network and
there is no JavaScript, so the file can be mailed, archived or opened offline.
"""

from __future__ import annotations

import datetime as _dt
import html
import os
import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .collapse import find_runs
from .dot import build
from .render import INSTALL_HINT, GraphvizNotFound, RenderError, svg_text
from .style import KIND_COLOR, KIND_TEXT, KIND_TINT, Overlay, heat_color, human, resolve, text_color

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1400px;
       color: #222; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.muted { color: #777; font-size: 13px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 16px 0; }
.card { border: 1px solid #ddd; border-radius: 8px; padding: 10px 14px; min-width: 140px; background: #fafafa; }
.card b { display: block; font-size: 20px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.kind { display: inline-block; min-width: 18px; text-align: center; border-radius: 4px; color: #fff;
        font-weight: bold; padding: 0 4px; }
.diagram { border: 1px solid #ddd; border-radius: 8px; padding: 8px; overflow: auto; background: #fff; }
.diagram svg { max-width: 100%; height: auto; }
.note { border-left: 4px solid #e31a1c; background: #fff5f5; padding: 8px 12px; margin: 8px 0; }
.warn { color: #b10026; }
code { background: #f3f3f3; padding: 0 3px; border-radius: 3px; }
details summary { cursor: pointer; margin: 6px 0; }
"""


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _kind_badge(kind: str) -> str:
    return f'<span class="kind" style="background:{KIND_COLOR[kind]}">{_e(kind)}</span>'


def inline_svg(svg: str) -> str:
    """Graphviz SVG made embeddable: no XML prolog, no DOCTYPE (its DTD URL would be a reference)."""
    svg = re.sub(r"<\?xml[^>]*\?>", "", svg)
    svg = re.sub(r"<!DOCTYPE[^>]*>", "", svg, flags=re.S)
    return svg.strip()


def _diagram(graph, caption: str, **kwargs) -> str:
    try:
        svg = inline_svg(svg_text(build(graph, **kwargs).to_string()))
    except GraphvizNotFound:
        return (f'<div class="note">Diagram <b>{_e(caption)}</b> not drawn: the Graphviz <code>dot</code> program '
                f"was not found. To get diagrams, {_e(INSTALL_HINT)}.</div>")
    except (RenderError, ValueError) as exc:
        return f'<div class="note">Diagram <b>{_e(caption)}</b> could not be drawn: {_e(exc)}</div>'
    return f'<h3>{_e(caption)}</h3><div class="diagram">{svg}</div>'


def _param_counts(graph, overlay: Overlay) -> tuple[int, int]:
    """Parameter elements before and after the plan (exact: dims cut by several groups counted once)."""
    removed: dict[tuple[str, int], set[int]] = defaultdict(set)
    for g in graph.groups():
        cut = overlay.cut.get(g.name)
        if cut:
            for m in g.members:
                removed[(m.param, m.dim)].update(m.indices(cut).tolist())
    before = after = 0
    buffers = set(getattr(graph, "buffers", ()))
    for p, shape in graph.param_shapes.items():
        if p in buffers:
            continue
        before += int(np.prod(shape, dtype=np.int64))
        after += int(np.prod([s - len(removed.get((p, d), ())) for d, s in enumerate(shape)], dtype=np.int64))
    return before, after


def _summary(graph, overlay: Overlay) -> str:
    model = getattr(graph, "model", None)
    before, after = _param_counts(graph, overlay)
    groups = graph.groups()
    cards = [("model", type(model).__name__ if model is not None else "?"),
             ("parameters", human(before) + (f" &#8594; {human(after)}" if overlay.has_plan else ""))]
    for kind in "ABC":
        gs = [g for g in groups if g.kind.value == kind]
        cards.append((f"type {kind} groups", f"{len(gs)} <span class='muted'>({sum(g.size for g in gs)} units)</span>"))
    cards += [("FX nodes traced", str(getattr(graph, "n_nodes", "?"))),
              ("warnings", str(len(getattr(graph, "warnings", [])))),
              ("frozen dims", str(len(graph.frozen)))]
    html_cards = "".join(f'<div class="card"><span class="muted">{_e(k)}</span><b>{v}</b></div>' for k, v in cards)
    legend = " &#183; ".join(f"{_kind_badge(k)} {_e(KIND_TEXT[k])}" for k in "ABC")
    return f'<div class="cards">{html_cards}</div><p class="muted">{legend}</p>'


def _issues(graph) -> str:
    parts = []
    warnings = list(dict.fromkeys(getattr(graph, "warnings", [])))
    if warnings:
        items = "".join(f"<li class='warn'>{_e(w)}</li>" for w in warnings)
        parts.append(f"<h3>Conservatively coupled ops</h3><ul>{items}</ul>")
    unknown = Counter((op, where.split(" at ", 1)[-1]) for op, where in getattr(graph, "unknown_ops", []))
    if unknown:
        rows = "".join(f"<tr><td><code>{_e(op)}</code></td><td>{_e(where)}</td><td class='num'>{n}</td></tr>"
                       for (op, where), n in sorted(unknown.items()))
        parts.append("<details><summary>Ops without a rule (their channels are never cut): "
                     f"{sum(unknown.values())}</summary><table><tr><th>op</th><th>module</th><th>count</th></tr>"
                     f"{rows}</table></details>")
    if graph.frozen:
        rows = "".join(f"<tr><td><code>{_e(p)}</code></td><td class='num'>{d}</td><td>{_e(r)}</td></tr>"
                       for (p, d), r in sorted(graph.frozen.items()))
        parts.append(f"<details><summary>Frozen parameter dims: {len(graph.frozen)}</summary>"
                     f"<table><tr><th>parameter</th><th>dim</th><th>reason</th></tr>{rows}</table></details>")
    return "".join(parts)


def _group_table(graph, overlay: Overlay) -> str:
    head = ["kind", "group", "units", "members", "params / unit", "exact"]
    if overlay.has_scores:
        head += ["score min", "mean", "max"]
    if overlay.has_plan:
        head += ["cut", "after"]
    rows = []
    for g in graph.groups():
        kind = g.kind.value
        cells = [_kind_badge(kind), f"<code>{_e(g.name)}</code>", f"<td class='num'>{g.size}",
                 f"<td class='num'>{len(g.members)}", f"<td class='num'>{human(g.extra.get('params_per_unit', 0))}",
                 "yes" if g.exact else "approx."]
        if overlay.has_scores:
            stats = overlay.stats(g.name)
            if stats is None:
                cells += ["", "", ""]
            else:
                fill = heat_color(overlay.group_heat.get(g.name, float("nan")))
                cells += [f"<td class='num'>{stats[0]:.4g}",
                          f"<td class='num' style='background:{fill};color:{text_color(fill)}'>{stats[1]:.4g}",
                          f"<td class='num'>{stats[2]:.4g}"]
        if overlay.has_plan:
            cut = len(overlay.cut.get(g.name, ()))
            cells += [f"<td class='num'>{cut}", f"<td class='num'>{overlay.after(g)}"]
        row = "".join(c + "</td>" if c.startswith("<td") else f"<td>{c}</td>" for c in cells)
        rows.append(f"<tr style='background:{KIND_TINT[kind]}33'>{row}</tr>")
    header = "".join(f"<th>{_e(h)}</th>" for h in head)
    return f"<table><tr>{header}</tr>{''.join(rows)}</table>"


def _plan_table(graph, overlay: Overlay) -> str:
    if not overlay.has_plan:
        return "<p class='muted'>No plan given (pass <code>plan={group: [unit ids]}</code>).</p>"
    before, after = _param_counts(graph, overlay)
    rows = []
    for g in graph.groups():
        cut = overlay.cut.get(g.name)
        if not cut:
            continue
        listed = ", ".join(str(u) for u in cut[:24]) + (", &#8230;" if len(cut) > 24 else "")
        rows.append(f"<tr><td>{_kind_badge(g.kind.value)}</td><td><code>{_e(g.name)}</code></td>"
                    f"<td class='num'>{g.size}</td><td class='num'>{overlay.after(g)}</td>"
                    f"<td class='num'>{len(cut)}</td><td class='num'>{human(g.parameter_count(cut))}</td>"
                    f"<td>{listed}</td></tr>")
    share = 100.0 * (before - after) / before if before else 0.0
    return (f"<p>Parameters: <b>{human(before)}</b> &#8594; <b>{human(after)}</b> "
            f"({share:.1f}% removed; elements cut by several groups counted once).</p>"
            "<table><tr><th>kind</th><th>group</th><th>before</th><th>after</th><th>units cut</th>"
            f"<th>params removed</th><th>unit ids</th></tr>{''.join(rows)}</table>")


def report(graph, path: str | os.PathLike, scores: Mapping | None = None, plan: Mapping | None = None,
           title: str | None = None, scope: str | None = None) -> Path:
    """Write one self-contained HTML report about ``graph`` to ``path`` and return the path.

    ``scores`` ({group: [size]}) adds score statistics and heat colours, ``plan``
    ({group: [unit ids]}) the units cut and before/after sizes. ``scope`` names the block drawn
    at channel-group level (default: the first repeated block, e.g. ``model.layers.0``).
    Without Graphviz the report is still written, with a note where the diagrams would be.
    """
    path = Path(path)
    overlay = resolve(graph, scores, plan)
    model = getattr(graph, "model", None)
    name = type(model).__name__ if model is not None else "model"
    title = title or f"depgraph report: {name}"
    if scope is None:
        runs = find_runs(graph).runs
        scope = runs[0].rep if runs else None
    kwargs = dict(scores=scores, plan=plan)
    diagrams = _diagram(graph, "Whole model (repeated blocks drawn once)", **kwargs)
    if scope:
        diagrams += _diagram(graph, f"{scope}: which slices move together", scope=scope, level="neuron", **kwargs)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = (f"<h1>{_e(title)}</h1><p class='muted'>generated {stamp} by depgraph &#183; {_e(repr(graph))}</p>"
            f"<h2>Summary</h2>{_summary(graph, overlay)}{_issues(graph)}"
            f"<h2>Groups</h2>{_group_table(graph, overlay)}"
            f"<h2>Plan</h2>{_plan_table(graph, overlay)}"
            f"<h2>Diagrams</h2>{diagrams}")
    doc = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
           f'<meta name="viewport" content="width=device-width, initial-scale=1">'
           f"<style>{CSS}</style></head><body>{body}</body></html>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc, encoding="utf-8")
    return path
