"""Meta-device models (shape analysis) and peft-wrapped models: work where it is honest, refuse otherwise."""

from __future__ import annotations

import peft
import pytest
import torch
from models import tiny_model

import depgraph
from depgraph.errors import DepGraphError, UnsupportedModelError


def _shapes(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_meta_model_refuses_weight_criteria_up_front_and_cuts_shapes_without_pretending():
    """Regression (issue 15): l1/l2 raised torch's NotImplementedError (nonzero on meta) and prune blamed
    the cut ("no longer runs forward: .item() on meta")."""
    model = tiny_model("llama", device="meta")
    graph = depgraph.trace(model)
    for name in ("l1", "l2", "taylor_first", "wanda"):
        with pytest.raises(DepGraphError, match=rf"criterion '{name}' reads weight values.*meta device.*'random'"):
            depgraph.score(graph, name, calib=torch.ones(1, 4, dtype=torch.long), progress=False)
    scores = depgraph.score(graph, "random", progress=False)
    assert all(s.shape == (g.size,) for g, s in scores.items())

    mlp = graph.groups("A")[0]
    report = graph.prune({mlp: [0, 1, 2, 3]})
    assert report.verified is False and "not verified" in str(report)
    assert model.model.layers[0].mlp.up_proj.weight.shape == (124, 64)
    assert model.model.layers[0].mlp.up_proj.out_features == 124
    assert all(p.device.type == "meta" for p in model.parameters())

    pruner = depgraph.Pruner(model, criterion="random", ratio=0.2)
    step = pruner.step()
    assert step.verified is False
    with pytest.raises(DepGraphError, match="meta device"):
        depgraph.Pruner(model, criterion="l2", ratio=0.2).step()


def test_cpu_prune_is_verified():
    model = tiny_model("llama")
    graph = depgraph.trace(model)
    assert graph.prune({graph.groups("A")[0]: [0]}).verified is True


@pytest.mark.parametrize("wrap_root", [True, False])
def test_peft_wrapped_model_is_refused_at_trace_time_unchanged(wrap_root):
    """Regression (issue 15 item 3): LoRA on up_proj/down_proj traced MLP neurons as a C group (cutting
    them left intermediate_size stale) and Pruner cut LoRA ranks (peft's r went stale)."""
    base = tiny_model("llama")
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["up_proj", "down_proj"]))
    model = wrapped if wrap_root else wrapped.base_model.model
    before = _shapes(model)
    with pytest.raises(UnsupportedModelError, match=r"peft adapters.*up_proj.*merge_and_unload\(\)"):
        depgraph.trace(model)
    with pytest.raises(UnsupportedModelError, match="merge_and_unload"):
        depgraph.Pruner(model, criterion="l2", ratio=0.2)
    assert _shapes(model) == before
    merged = wrapped.merge_and_unload()  # the suggested fix works
    graph = depgraph.trace(merged)
    assert [g.kind.name for g in graph.groups()].count("A") == 2


def test_weight_reading_steps_refuse_a_meta_model_by_name():
    model = tiny_model("llama", device="meta")
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(DepGraphError, match="block_importance needs real weights.*meta device"):
        depgraph.block_importance(model, ids, progress=False)
    with pytest.raises(DepGraphError, match="sparsify needs real weights.*meta device"):
        depgraph.sparsify(model, "magnitude", 0.5, progress=False)
    with pytest.raises(DepGraphError, match="sensitivity needs real weights"):
        depgraph.sensitivity(model, lambda m: 0.0, progress=False)
