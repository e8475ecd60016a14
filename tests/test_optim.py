"""An optimizer created before a cut keeps training after it: cut_optimizer_state slices its state."""

from __future__ import annotations

import pytest
import torch
from models import example_ids, tiny_model

import depgraph
from depgraph.errors import DepGraphError
from depgraph.optim import cut_optimizer_state


def _train_step(model, opt, ids):
    opt.zero_grad()
    model(ids, labels=ids).loss.backward()
    opt.step()


@pytest.mark.parametrize("family, tied", [("llama", False), ("qwen2", True)])
def test_adamw_steps_after_a_cut_with_the_sliced_state(family, tied):
    model = tiny_model(family, tie_word_embeddings=tied) if tied else tiny_model(family)
    ids = example_ids(model)
    graph = depgraph.trace(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train_step(model, opt, ids)
    names = {id(p): n for n, p in model.named_parameters()}
    old = {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    # hidden channels (C), MLP neurons (A) and a KV head (B)
    plan = {graph.groups("C")[0]: [1, 5], graph.groups("A")[0]: [0, 3, 7], graph.groups("B")[0]: [1]}
    report = graph.prune(plan)
    assert report.kept and all(report.kept.values())
    done = cut_optimizer_state(opt, model, report)
    assert done
    for p, state in opt.state.items():
        name = names[id(p)]
        kept = report.kept.get(name) or next((report.kept[n] for n, q in model.named_parameters(
            remove_duplicate=False) if q is p and n in report.kept), {})
        for key, value in state.items():
            want = old[name][key]
            for dim, index in kept.items():
                if want.dim():
                    want = want.index_select(dim, torch.as_tensor(index))
            assert torch.equal(value, want), (name, key)
            assert value.dim() == 0 or value.shape == p.shape
    _train_step(model, opt, ids)  # the regression: this step failed on stale state shapes


def test_cut_optimizer_state_refuses_a_second_cut_and_changes_nothing():
    model = tiny_model("llama")
    ids = example_ids(model)
    graph = depgraph.trace(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train_step(model, opt, ids)
    report = graph.prune({graph.groups("C")[0]: [0, 1]})
    cut_optimizer_state(opt, model, report)
    before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    with pytest.raises(DepGraphError, match="was it cut already"):
        cut_optimizer_state(opt, model, report)
    for p, s in opt.state.items():
        assert all(torch.equal(v, before[id(p)][k]) for k, v in s.items())
    with pytest.raises(DepGraphError, match="PruneReport"):
        cut_optimizer_state(opt, model, {"not": "a report"})


def test_a_multi_step_pruner_report_is_applied_step_by_step():
    model = tiny_model("llama")
    ids = example_ids(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train_step(model, opt, ids)
    up = model.model.layers[0].mlp.up_proj.weight
    before = opt.state[up]["exp_avg"].clone()
    pruner = depgraph.Pruner(model, criterion="l2", ratio=0.5, structure="block", steps=2, progress=False)
    report = pruner.prune()
    assert len(report.steps) == 2
    cut_optimizer_state(opt, model, report)
    first, second = (r.kept["model.layers.0.mlp.up_proj.weight"][0] for r in report.steps)
    want = before[torch.as_tensor(first)][torch.as_tensor(second)]
    assert torch.equal(opt.state[up]["exp_avg"], want) and want.shape == up.shape
    _train_step(model, opt, ids)
    summary = depgraph.PruneReport(1, 1, shapes={"model.layers.0.mlp.up_proj.weight": ((1, 1), (1, 1))})
    with pytest.raises(DepGraphError, match="no kept indices"):  # a summary without indices is refused
        cut_optimizer_state(opt, model, summary)
