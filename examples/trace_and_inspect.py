"""Trace a tiny Llama, list its coupled groups, and explain what one MLP neuron is coupled with.

Run: ``python examples/trace_and_inspect.py`` (random weights, no download, writes nothing). The same
table comes from the command line: ``depgraph inspect tiny-llama``.
"""

import torch

import depgraph
from depgraph.models import demo_model


def main() -> None:
    torch.set_num_threads(1)
    model = demo_model("tiny-llama")  # Llama: hidden 64, 2 layers, 8 query / 4 KV heads (GQA)
    graph = depgraph.trace(model)
    print(graph)
    print(graph.summary())

    print("\nmembers of each kind (parameter slices cut together, unit by unit):")
    for kind in "ABC":
        group = graph.groups(kind)[0]
        members = ", ".join(f"{m.param} dim {m.dim} ({m.role}, {m.per_unit}/unit)" for m in group.members[:5])
        more = ", ..." if len(group.members) > 5 else ""
        print(f"  {kind} {group.name} ({group.size} units): {members}{more}")

    # One neuron of the first MLP: row 5 of gate_proj. Everything it is coupled with must go with it.
    param = "model.layers.0.mlp.gate_proj.weight"
    print(f"\nneuron 5 of {param} (dim 0) is coupled with:")
    for (name, dim), indices in graph.coupled(param, 5, dim=0).items():
        print(f"  {name} dim {dim}: indices {indices}")

    # One KV head couples whole blocks of rows: its k/v rows, the rows of the query heads that share
    # it, and the matching o_proj columns.
    param = "model.layers.0.self_attn.k_proj.weight"
    print(f"\nrow 0 of {param} (KV head 0) is coupled with:")
    for (name, dim), indices in graph.coupled(param, 0, dim=0).items():
        print(f"  {name} dim {dim}: {len(indices)} indices {indices[0]}..{indices[-1]}")

    print(f"\nfrozen parameter dims (never cut): {len(graph.frozen)}")
    for (name, dim), reason in graph.frozen.items():
        print(f"  {name} dim {dim}: {reason}")


if __name__ == "__main__":
    main()
