"""Drawing and export of depgraph dependency graphs.

>>> visualize.render(graph, "llama.svg")                       # whole model, repeated blocks once
>>> visualize.render(graph, "block0.svg", scope="model.layers.0", level="neuron")
>>> visualize.report(graph, "report.html", scores=scores, plan=plan)
>>> visualize.to_json(graph, "graph.json"); g = visualize.from_json("graph.json")
"""

from .render import GraphvizNotFound, RenderError, render

__all__ = ["GraphvizNotFound", "RenderError", "render"]
