"""Draw a tiny Llama's coupled structures and write a self-contained HTML report.

Run: ``python examples/render_diagram.py [OUT_DIR]`` (default: ``out/``). Writes the whole-model
diagram (repeated decoder blocks drawn once), block 0 at channel-group level with magnitude scores
and a plan that cuts the weakest quarter of every MLP, the report, and a JSON export; prints the
paths. Needs Graphviz ``dot`` for SVG (without it, only the .dot file and the report are written).
"""

import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import depgraph
import visualize


def magnitude_scores(model, graph) -> dict:
    """Per unit: the L2 norm of the weight slices the unit produces (its ``out`` members)."""
    params = dict(model.named_parameters())
    scores = {}
    for group in graph.groups():
        total = torch.zeros(group.size)
        for m in group.members:
            if m.role != "out":
                continue
            w = params[m.param].detach().movedim(m.dim, 0).reshape(params[m.param].shape[m.dim], -1)
            per_index = w.pow(2).sum(1)
            unit = torch.as_tensor(m.unit_of_index)
            keep = unit >= 0
            total.index_add_(0, unit[keep], per_index[keep])
        scores[group] = total.sqrt()
    return scores


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "out")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    graph = depgraph.trace(model)

    scores = magnitude_scores(model, graph)
    plan = {g: torch.argsort(scores[g])[: g.size // 4].tolist() for g in graph.groups("A")}

    paths = [visualize.render(graph, out / "llama.dot")]
    try:
        paths.append(visualize.render(graph, out / "llama.svg"))
        paths.append(visualize.render(graph, out / "block0.svg", scope="model.layers.0", level="neuron",
                                      scores=scores, plan=plan))
    except visualize.GraphvizNotFound as exc:
        print(f"skipping SVG: {exc}")
    paths.append(visualize.report(graph, out / "report.html", scores=scores, plan=plan))
    paths.append(visualize.to_json(graph, out / "graph.json"))
    for p in paths:
        print(p)


if __name__ == "__main__":
    main()
