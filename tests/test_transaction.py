"""The shared transaction: every structural edit rolls back on any BaseException (Ctrl-C included)."""

from __future__ import annotations

import pytest
import torch
from models import example_ids, tiny_model
from test_cut import assert_unchanged, snapshot
from test_experts import _moe, _state
from torch import nn

import depgraph
from depgraph.depth import RemovalReport
from depgraph.experts import ExpertRemovalReport
from depgraph.transaction import EditReport, Transaction


def test_transaction_rolls_back_on_keyboard_interrupt_and_reraises():
    lin = nn.Linear(4, 3)
    weight = lin.weight.data
    with pytest.raises(KeyboardInterrupt):
        with Transaction() as t:
            t.set_data(lin.weight, weight[:2].clone())
            t.set_attr(lin, "out_features", 2)
            t.set_attr(lin, "brand_new", 1)
            raise KeyboardInterrupt
    assert lin.weight.shape == (3, 4) and torch.equal(lin.weight, weight) and lin.out_features == 3 and not hasattr(lin, "brand_new")


def test_prune_keyboard_interrupt_in_forward_check_rolls_back():
    """Issue 15 item 6: Ctrl-C during the prune's forward check left the model cut, the graph not updated."""
    model = tiny_model("llama")
    graph = depgraph.trace(model)
    group = graph.groups("A")[0]
    mlp = model.model.layers[0].mlp
    snap = snapshot(model)
    shapes = dict(graph.param_shapes)

    def interrupt(module, args):  # only once the cut is committed: the forward check
        if module.up_proj.weight.shape[0] != 128:
            raise KeyboardInterrupt

    handle = mlp.register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            graph.prune({group: [0, 3, 5]})
    finally:
        handle.remove()
    assert_unchanged(model, snap)
    assert group.size == 128 and graph.param_shapes == shapes
    assert not hasattr(model, "_depgraph_base_config") or model._depgraph_base_config is not None
    report = graph.prune({group: [0, 3, 5]})  # still usable: the graph matches the model
    assert group.size == 125 and mlp.up_proj.out_features == 125 and report.ratio > 0


def test_remove_experts_keyboard_interrupt_rolls_back():
    model = _moe("qwen2_moe")
    state = _state(model)
    config = model.config.to_dict()
    experts = model.model.layers[0].mlp.experts

    def interrupt(module, args):
        if module.num_experts != 6:
            raise KeyboardInterrupt

    handle = experts.register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            depgraph.remove_experts(model, {"model.layers.0.mlp": [2]})
    finally:
        handle.remove()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.config.to_dict() == config and experts.num_experts == 6


def test_reports_share_one_base():
    for cls in (depgraph.PruneReport, RemovalReport, ExpertRemovalReport):
        assert issubclass(cls, EditReport)
    r = depgraph.PruneReport(100, 75, units_removed={"g": 3})
    assert r.ratio == pytest.approx(0.25) and str(r) == "pruned 3 units in 1 groups: 100 -> 75 parameters (25.0% removed)"
    d = RemovalReport("model.layers", (1,), (0,), 10, 5)
    assert str(d) == "removed blocks [1] of model.layers (1 left): 10 -> 5 parameters (50.0% removed)"


def test_remove_layers_still_atomic_and_renumbers():
    model = tiny_model("llama")
    ids = example_ids(model)
    report = depgraph.remove_layers(model, [0])
    assert len(model.model.layers) == 1 and list(model.model.layers._modules) == ["0"]
    assert model.config.num_hidden_layers == 1 and report.removed == (0,)
    with torch.no_grad():
        model(ids)
