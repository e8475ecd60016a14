"""Drawing and export of depgraph dependency graphs.

>>> visualize.render(graph, "llama.svg")                       # whole model, repeated blocks once
>>> visualize.render(graph, "block0.svg", scope="model.layers.0", level="neuron")
>>> visualize.render(graph, "groups.svg", groups=graph.groups("B"), scores=scores)
>>> visualize.report(graph, "report.html", scores=scores, plan=plan)
>>> visualize.to_json(graph, "graph.json"); g = visualize.from_json("graph.json")
"""

from .dot import build
from .export import from_graphml, from_json, to_graphml, to_json
from .render import GraphvizNotFound, RenderError, render
from .report import report

__all__ = [
    "GraphvizNotFound", "RenderError", "build", "from_graphml", "from_json", "render", "report", "to_graphml",
    "to_json",
]
