"""Write diagrams to files: DOT always, SVG/PNG/PDF through the Graphviz ``dot`` binary."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from depgraph.errors import DepGraphError

from .dot import build

FORMATS = {".dot": "dot", ".gv": "dot", ".svg": "svg", ".png": "png", ".pdf": "pdf"}
INSTALL_HINT = ("install Graphviz: `apt-get install graphviz` (Debian/Ubuntu), `brew install graphviz` "
                "(macOS), or `conda install -c conda-forge graphviz`; or write a .dot file instead")


class GraphvizNotFound(DepGraphError):
    """The Graphviz ``dot`` binary is not on PATH (needed for SVG/PNG/PDF output)."""


class RenderError(DepGraphError):
    """Graphviz ran but could not lay out the diagram."""


def dot_binary() -> str:
    """Path of Graphviz ``dot``; raises :class:`GraphvizNotFound` with install instructions."""
    found = shutil.which("dot")
    if not found:
        raise GraphvizNotFound(f"the Graphviz `dot` program was not found on PATH; {INSTALL_HINT}")
    return found


def run_dot(source: str, fmt: str, timeout: float = 300.0) -> bytes:
    """Lay out DOT ``source`` with Graphviz and return the ``fmt`` (svg/png/pdf) bytes."""
    exe = dot_binary()
    # dot must not read the user's fonts config differently per call; only the output matters
    try:
        proc = subprocess.run([exe, f"-T{fmt}"], input=source.encode("utf-8"), capture_output=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RenderError(f"Graphviz took longer than {timeout:.0f}s; draw a smaller scope "
                          "(scope='model.layers.0') or keep collapse=True") from exc
    if proc.returncode != 0 or not proc.stdout:
        err = proc.stderr.decode("utf-8", "replace").strip()
        raise RenderError(f"Graphviz failed (exit {proc.returncode}): {err[:500]}")
    return proc.stdout


def svg_text(dot_source: str) -> str:
    """SVG produced by Graphviz for ``dot_source``, as text."""
    return run_dot(dot_source, "svg").decode("utf-8")


def render(graph, path: str | os.PathLike, *, scope: str | None = None, level: str = "module",
           groups: Iterable | None = None, scores=None, plan=None, collapse: bool = True,
           title: str | None = None, max_units: int = 4, max_members: int = 12) -> Path:
    """Draw ``graph`` to ``path``; the format comes from the suffix (.dot .gv .svg .png .pdf).

    * ``scope``: only modules under this path (``"model.layers.0"``);
    * ``level``: ``"module"`` (modules as nodes, groups as coloured arrows) or ``"neuron"``
      (one table per group listing the index ranges each unit owns);
    * ``groups``: draw these groups as tables (implies ``level="neuron"``);
    * ``scores`` ({group: [size]}): heat colours; ``plan`` ({group: [unit ids]}): cut units;
    * ``collapse``: draw repeated blocks once with a ``×N`` label (default).

    ``.dot`` needs no Graphviz; other formats raise :class:`GraphvizNotFound` when ``dot`` is missing.
    Returns the path written.
    """
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the format of {path.name!r}: use one of {', '.join(FORMATS)}")
    if fmt != "dot":
        dot_binary()  # fail before the work, with the install hint
    source = build(graph, scope=scope, level=level, groups=groups, scores=scores, plan=plan,
                   collapse=collapse, title=title, max_units=max_units, max_members=max_members).to_string()
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "dot":
        path.write_text(source, encoding="utf-8")
    else:
        path.write_bytes(run_dot(source, fmt))
    return path
