"""Colours, overlays (scores, plans) and small text helpers shared by the DOT builder and the report."""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

# Dark2 (colour-blind safe, distinct in print): A green, B orange, C purple
KIND_COLOR = {"A": "#1b9e77", "B": "#d95f02", "C": "#7570b3", "": "#9e9e9e"}
KIND_TINT = {"A": "#d4efe6", "B": "#fbe0cc", "C": "#e3e2f0", "": "#eeeeee"}
KIND_TEXT = {
    "A": "A: MLP neurons (in-block)",
    "B": "B: attention heads",
    "C": "C: hidden / residual channels",
}
FROZEN_COLOR = "#bdbdbd"
FROZEN_TINT = "#f2f2f2"
WARN_COLOR = "#e31a1c"
WARN_TINT = "#fde0dd"
CUT_TINT = "#fcbba1"
# low -> high importance (YlOrRd): pale = cheap to cut, dark red = important
HEAT = ["#ffffcc", "#ffeda0", "#fed976", "#feb24c", "#fd8d3c", "#fc4e2a", "#e31a1c", "#bd0026", "#800026"]


def heat_color(x: float) -> str:
    """Colour of a value in [0, 1] on the heat scale."""
    if not np.isfinite(x):
        return FROZEN_TINT
    return HEAT[int(round(min(max(x, 0.0), 1.0) * (len(HEAT) - 1)))]


def text_color(fill: str) -> str:
    """Black or white, whichever reads better on ``fill``."""
    r, g, b = (int(fill[i:i + 2], 16) for i in (1, 3, 5))
    return "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#ffffff"


def esc(text: object) -> str:
    """Escape for Graphviz HTML-like labels and for HTML (numeric entities only: both accept them)."""
    return html.escape(str(text), quote=True).replace("&#x27;", "&#39;")


def ranges(indices: Iterable[int], limit: int = 4) -> str:
    """``[0..15, 32..47]`` -> ``"0-15, 32-47"``; at most ``limit`` ranges, then ``…``."""
    idx = sorted(int(i) for i in indices)
    if not idx:
        return "\u2013"
    parts: list[str] = []
    start = prev = idx[0]
    for i in idx[1:] + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    if len(parts) > limit:
        return ", ".join(parts[:limit]) + ", \u2026"
    return ", ".join(parts)


def human(n: float) -> str:
    """1234567 -> ``1.23M``."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def _as_array(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float64).reshape(-1)


def _lookup(mapping: Mapping | None, group):
    """``mapping[group]`` keyed by the Group object (identity) or by its name."""
    if not mapping:
        return None
    if group in mapping:
        return mapping[group]
    for key, value in mapping.items():
        if getattr(key, "name", key) == group.name:
            return value
    return None


@dataclass
class Overlay:
    """Scores and a pruning plan resolved against one graph's groups.

    ``unit_heat[name]`` holds each unit's score scaled to [0, 1] inside its group;
    ``group_heat[name]`` the group's mean score scaled to [0, 1] among groups of its kind
    (scores of different kinds measure different amounts of parameters, so they are not
    compared); ``cut[name]`` is the sorted list of unit ids the plan removes.
    """

    scores: dict[str, np.ndarray]
    unit_heat: dict[str, np.ndarray]
    group_heat: dict[str, float]
    cut: dict[str, list[int]]

    @property
    def has_scores(self) -> bool:
        return bool(self.scores)

    @property
    def has_plan(self) -> bool:
        return bool(self.cut)

    def stats(self, name: str) -> tuple[float, float, float] | None:
        s = self.scores.get(name)
        if s is None or s.size == 0:
            return None
        return float(np.nanmin(s)), float(np.nanmean(s)), float(np.nanmax(s))

    def after(self, group) -> int:
        return group.size - len(self.cut.get(group.name, ()))


def resolve(graph, scores: Mapping | None = None, plan: Mapping | None = None) -> Overlay:
    """Match ``scores`` ({group: [size]}) and ``plan`` ({group: [unit ids]}) to ``graph``'s groups."""
    by_name: dict[str, np.ndarray] = {}
    cut: dict[str, list[int]] = {}
    for g in graph.groups():
        s = _lookup(scores, g)
        if s is not None:
            arr = _as_array(s)
            if arr.size != g.size:
                raise ValueError(f"scores for group {g.name} have {arr.size} values, the group has {g.size} units")
            by_name[g.name] = arr
        units = _lookup(plan, g)
        if units is not None:
            ids = sorted({int(u) for u in (units.tolist() if hasattr(units, "tolist") else units)})
            if ids and (ids[0] < 0 or ids[-1] >= g.size):
                raise ValueError(f"plan for group {g.name} names unit {ids[-1] if ids[-1] >= g.size else ids[0]}"
                                 f" outside 0..{g.size - 1}")
            cut[g.name] = ids
    unit_heat = {}
    for name, s in by_name.items():
        lo, hi = np.nanmin(s), np.nanmax(s)
        unit_heat[name] = (s - lo) / (hi - lo) if hi > lo else np.full_like(s, 0.5)
    group_heat: dict[str, float] = {}
    kinds = {g.name: g.kind.value for g in graph.groups()}
    for kind in "ABC":
        means = {n: float(np.nanmean(s)) for n, s in by_name.items() if kinds.get(n) == kind and s.size}
        if means:
            lo, hi = min(means.values()), max(means.values())
            for n, m in means.items():
                group_heat[n] = (m - lo) / (hi - lo) if hi > lo else 0.5
    return Overlay(by_name, unit_heat, group_heat, cut)
