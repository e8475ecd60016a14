"""Export ``graph.nx`` (channel spaces and their couplings) to GraphML and JSON, and read it back.

GraphML only holds scalar attributes of one type per key, so every attribute is normalised
first: numpy scalars become Python ones, ``None`` becomes ``""``, anything else becomes its
string, and a key whose values mix types is written as strings throughout. Both formats
round-trip through networkx with node and edge attributes intact.
"""

from __future__ import annotations

import json
import numbers
import os
from pathlib import Path

import networkx as nx
import numpy as np

_EDGES_KEY = "edges"


def _scalar(value):
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        return value
    return str(value)


def _normalise(items) -> None:
    """Make every attribute a GraphML-legal scalar, one type per key (in place)."""
    items = list(items)
    types: dict[str, set[type]] = {}
    for data in items:
        for k, v in data.items():
            data[k] = _scalar(v)
            types.setdefault(k, set()).add(type(data[k]))
    for k, ts in types.items():
        if len(ts) > 1:
            to = float if ts <= {int, float} else str
            for data in items:
                if k in data:
                    data[k] = to(data[k])


def export_graph(graph) -> nx.DiGraph:
    """A copy of ``graph.nx`` (or of a networkx graph) with GraphML-legal attributes and metadata."""
    g = graph if isinstance(graph, nx.Graph) else graph.nx
    out = g.copy()
    _normalise(d for _, d in out.nodes(data=True))
    _normalise(d for _, _, d in out.edges(data=True))
    if not isinstance(graph, nx.Graph):
        model = getattr(graph, "model", None)
        out.graph.update(
            model=type(model).__name__ if model is not None else "",
            groups=len(graph.groups()),
            **{f"groups_{k}": len(graph.groups(k)) for k in "ABC"},
            warnings=len(getattr(graph, "warnings", [])),
        )
    out.graph = {str(k): _scalar(v) for k, v in out.graph.items()}
    return out


def to_graphml(graph, path: str | os.PathLike) -> Path:
    """Write the channel graph as GraphML (opens in Gephi, yEd, Cytoscape)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nx.write_graphml(export_graph(graph), str(path), named_key_ids=True)
    return path


def from_graphml(path: str | os.PathLike) -> nx.DiGraph:
    """Read a graph written by :func:`to_graphml` (a networkx ``DiGraph``)."""
    return nx.read_graphml(str(path))


def to_json(graph, path: str | os.PathLike) -> Path:
    """Write the channel graph as networkx node-link JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = nx.node_link_data(export_graph(graph), edges=_EDGES_KEY)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path


def from_json(path: str | os.PathLike) -> nx.DiGraph:
    """Read a graph written by :func:`to_json` (a networkx ``DiGraph``)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    key = _EDGES_KEY if _EDGES_KEY in data else "links"
    return nx.node_link_graph(data, edges=key)
