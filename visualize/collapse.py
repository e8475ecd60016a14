"""Find repeated blocks (``model.layers.<i>``) so a 32-layer model draws like a 1-layer one.

Repetition is detected structurally: every module path with a numeric segment
(``model.layers.7``) is a candidate block of its container (``model.layers``). Two blocks are
the same when everything *relative* to them matches: parameter names and ranks, how the
groups touching them are made (kind, relative name, member param/dim/role/per-unit), which
dims are frozen and which unknown ops run inside. Sizes are deliberately not compared: a
pruned model keeps its structure while layer widths differ, and the picture shows ranges.
Consecutive equal blocks form a :class:`Run`, drawn once (its first block) with a ``×N`` label.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass


@dataclass(frozen=True)
class Run:
    """Blocks ``prefix.i`` for ``i`` in ``indices`` that look the same; ``prefix.indices[0]`` is drawn."""

    prefix: str
    indices: tuple[int, ...]

    @property
    def rep(self) -> str:
        """Path of the block that stands for the run."""
        return f"{self.prefix}.{self.indices[0]}"

    @property
    def count(self) -> int:
        return len(self.indices)

    def block(self, i: int) -> str:
        return f"{self.prefix}.{i}"

    @property
    def label(self) -> str:
        """``model.layers.{0…31} ×32``."""
        return f"{self.prefix}.{{{self.indices[0]}\u2026{self.indices[-1]}}}  \u00d7{self.count}"


class Collapse:
    """Maps every path inside a repeated block onto the block that stands for its run."""

    def __init__(self, runs: list[Run]):
        self.runs = runs
        # block path -> (run, position); runs are found outermost first, so mapping applies in order
        self._block: dict[str, Run] = {}
        for run in runs:
            for i in run.indices:
                self._block[run.block(i)] = run

    def canonical(self, path: str) -> str:
        """``model.layers.5.mlp.up_proj`` -> ``model.layers.0.mlp.up_proj`` (unchanged if not repeated)."""
        if not self.runs:
            return path
        parts = path.split(".")
        changed = True
        while changed:  # nested repeats (experts inside layers) map one level at a time
            changed = False
            for k in range(1, len(parts) + 1):
                run = self._block.get(".".join(parts[:k]))
                if run is not None and parts[k - 1] != str(run.indices[0]):
                    parts[k - 1] = str(run.indices[0])
                    changed = True
                    break
        return ".".join(parts)

    def run_of_block(self, path: str) -> Run | None:
        """The run whose drawn block is exactly ``path``."""
        run = self._block.get(path)
        return run if run is not None and run.rep == path else None

    def locate(self, path: str) -> tuple[Run, int] | None:
        """The outermost run and block index that ``path`` lies in."""
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            run = self._block.get(".".join(parts[:k]))
            if run is not None:
                return run, int(parts[k - 1])
        return None

    def hidden(self, path: str) -> bool:
        """True when ``path`` lies in a block that is not drawn."""
        return self.canonical(path) != path


def _under(path: str, block: str) -> bool:
    return path == block or path.startswith(block + ".")


def _rel(path: str, block: str) -> str:
    return path[len(block) + 1:] if path.startswith(block + ".") else ("" if path == block else "~")


def _module_of_where(where: str) -> str:
    # graph.unknown_ops entries read "aten.diff.default at model.layers.0"
    return where.split(" at ", 1)[1] if " at " in where else ""


def block_signature(graph, block: str, group_members=None) -> tuple:
    """Everything about ``block`` that must match for two blocks to be drawn as one."""
    params = tuple(sorted((_rel(p, block), len(s)) for p, s in graph.param_shapes.items() if _under(p, block)))
    groups = []
    for g, members in (group_members or _members_by_group(graph)):
        inside = [m for m in members if _under(m.param, block)]
        if not inside:
            continue
        name = _rel(g.name.split("#", 1)[0], block) if _under(g.name, block) else "~"
        groups.append((g.kind.value, name, tuple(sorted((_rel(m.param, block), m.dim, m.role, m.per_unit)
                                                        for m in inside))))
    frozen = tuple(sorted((_rel(p, block), d) for (p, d) in graph.frozen if _under(p, block)))
    unknown = tuple(sorted(Counter((op, _rel(_module_of_where(w), block)) for op, w in graph.unknown_ops
                                   if _under(_module_of_where(w), block)).items()))
    return params, tuple(sorted(groups)), frozen, unknown


def _members_by_group(graph):
    return [(g, g.members) for g in graph.groups()]


def find_runs(graph, min_count: int = 2) -> Collapse:
    """Detect runs of structurally equal consecutive blocks in ``graph`` (outermost first)."""
    children: dict[str, set[int]] = defaultdict(set)
    for name in graph.param_shapes:
        parts = name.split(".")
        for k, part in enumerate(parts[:-1]):
            if part.isdigit() and k > 0:
                children[".".join(parts[:k])].add(int(part))
    group_members = _members_by_group(graph)
    runs: list[Run] = []
    collapse = Collapse(runs)
    for prefix in sorted(children, key=lambda p: (p.count("."), p)):
        if collapse.hidden(prefix):
            continue  # inside a block that is not drawn anyway
        indices = sorted(children[prefix])
        if len(indices) < min_count:
            continue
        sigs = {i: block_signature(graph, f"{prefix}.{i}", group_members) for i in indices}
        start = 0
        for k in range(1, len(indices) + 1):
            if k == len(indices) or indices[k] != indices[k - 1] + 1 or sigs[indices[k]] != sigs[indices[start]]:
                if k - start >= min_count:
                    runs.append(Run(prefix, tuple(indices[start:k])))
                start = k
        collapse = Collapse(runs)
    return collapse
