"""Pruner: local/global selection, layer skipping, rounding, parameter targets, iterative steps."""

from __future__ import annotations

import copy
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from models import example_ids, tiny_model

import depgraph
from depgraph.pruner import Pruner, layer_index, simulate_params

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def traced():
    model = tiny_model("llama_mha", intermediate_size=100)  # 2 layers, 4 KV heads, 100 MLP neurons
    return depgraph.trace(model)


@pytest.fixture
def graph(traced):
    return copy.deepcopy(traced)  # every test cuts its own copy


def calib():
    return torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


def test_local_units_cut_lowest_scores(graph):
    pruner = Pruner(graph, criterion="l2", ratio=0.25, progress=False)
    scores = pruner.scores()
    plan = pruner.plan()
    assert {g.name for g in plan} == {g.name for g in graph.groups() if g.kind.value in "AB"}
    for g, units in plan.items():
        assert len(units) == round(0.25 * g.size)
        assert units == sorted(np.argsort(scores[g].numpy(), kind="stable")[: len(units)].tolist())
    report = pruner.prune()
    assert report.target.metric == "units" and report.target.reached
    assert [g.size for g in graph.groups("A")] == [75, 75] and [g.size for g in graph.groups("B")] == [3, 3]
    graph.model(example_ids(graph.model))


def test_global_differs_from_local(graph):
    a0, a1 = graph.groups("A")
    low = torch.cat([torch.full((50,), 0.01), torch.full((50,), 1.99)])  # mean 1: half the units far below it
    flat = torch.linspace(0.5, 1.5, 100)
    scores = {a0: low, a1: flat}
    local = Pruner(graph, scores, ratio=0.25, kinds="A", progress=False).plan()
    assert [len(local[a0]), len(local[a1])] == [25, 25]
    glob = Pruner(graph, scores, ratio=0.25, kinds="A", scope="global", progress=False).plan()
    assert list(glob) == [a0] and glob[a0] == list(range(50))  # all 50 from the layer with weak units
    # a global ranking uses normalised scores: scaling one group does not change it
    scaled = Pruner(graph, {a0: low * 1e3, a1: flat}, ratio=0.25, kinds="A", scope="global", progress=False)
    assert scaled.plan() == glob
    raw = Pruner(graph, {a0: low * 1e3, a1: flat}, ratio=0.25, kinds="A", scope="global", normalize=None,
                 progress=False).plan()
    assert list(raw) == [a1] and len(raw[a1]) == 50


def test_skip_first_and_last(graph):
    assert [layer_index(g) for g in graph.groups()] == [None, 0, 0, 1, 1]
    first = Pruner(graph, "l1", ratio=0.5, skip_first=1, progress=False).plan()
    assert {layer_index(g) for g in first} == {1}
    last = Pruner(graph, "l1", ratio=0.5, skip_last=1, progress=False).plan()
    assert {layer_index(g) for g in last} == {0}
    everything = Pruner(graph, "l1", ratio=0.5, structure="all", progress=False).plan()
    assert {layer_index(g) for g in everything} == {None, 0, 1}


def test_round_to(graph):
    pruner = Pruner(graph, "l2", ratio=0.3, kinds="A", round_to=16, progress=False)
    plan = pruner.plan()
    # 100 neurons, want 30 cut: keep a multiple of 16 -> 64 (cut 36) is closer than 80 (cut 20)
    assert {len(u) for u in plan.values()} == {36}
    pruner.prune()
    assert all(g.size % 16 == 0 for g in graph.groups("A"))
    # heads round with head_round_to (never below it), heads counted as units; 75% is reachable
    heads = Pruner(graph, "l2", ratio=0.75, kinds="B", head_round_to=2, progress=False).plan()
    assert {len(u) for u in heads.values()} == {2}


@pytest.mark.parametrize("scope,structure", [("local", "block"), ("global", "all")])
def test_params_target_within_one_unit(graph, scope, structure):
    before = depgraph.count_parameters(graph.model)
    biggest_unit = max(g.parameter_count() for g in graph.groups())
    pruner = Pruner(graph, "l2", ratio=0.2, target="params", scope=scope, structure=structure, progress=False)
    plan = pruner.plan()
    predicted = simulate_params(graph, plan)
    report = pruner.prune()
    after = depgraph.count_parameters(graph.model)
    assert predicted == after  # exact, C and A cuts sharing down_proj elements included
    assert abs((before - after) - 0.2 * before) <= biggest_unit
    assert report.target.metric == "params" and report.target.reached
    assert abs(report.target.achieved - 0.2) <= report.target.tolerance / 2 + 1e-12  # the closer of two cuts
    assert abs(report.target.achieved - report.ratio) < 1e-12
    if structure == "all":
        assert any(g.kind.value == "C" for g in plan)


def test_iterative_steps_reach_ratio(graph):
    pruner = Pruner(graph, "taylor_first", ratio=0.3, target="params", steps=3, calib=calib(), progress=False)
    report = pruner.prune()
    assert len(pruner.history) == 3 and len(report.steps) == 3
    achieved = [r.target.achieved for r in pruner.history]
    assert achieved[0] < achieved[1] < achieved[2]
    for i, r in enumerate(pruner.history, 1):
        assert r.target.requested == pytest.approx(0.3 * i / 3) and r.target.reached
    assert report.params_before == pruner.params_before and report.ratio == pytest.approx(achieved[-1])
    with pytest.raises(RuntimeError):
        pruner.step()


def test_iterative_units_match_one_shot_counts(traced):
    g1, g2 = copy.deepcopy(traced), copy.deepcopy(traced)
    Pruner(g1, "l1", ratio=0.4, steps=4, progress=False).prune()
    Pruner(g2, "l1", ratio=0.4, steps=1, progress=False).prune()
    assert [g.size for g in g1.groups()] == [g.size for g in g2.groups()] == [64, 2, 60, 2, 60]


def test_deterministic_given_seed(traced):
    def plan(seed):
        return {g.name: u for g, u in Pruner(copy.deepcopy(traced), "random", ratio=0.3, scope="global",
                                               seed=seed, progress=False).plan().items()}

    assert plan(0) == plan(0)
    assert plan(0) != plan(1)


def test_fixed_scores_follow_survivors(graph):
    a0 = graph.groups("A")[0]
    pruner = Pruner(graph, {a0: torch.arange(100.0)}, ratio=0.5, kinds="A", steps=2, progress=False)
    first = pruner.plan()
    assert first == {a0: list(range(25))}
    pruner.step(first)
    assert pruner.plan() == {a0: list(range(25))}  # units 25..99 renumbered 0..74, still ascending


def test_needs_calibration_and_validates(graph):
    with pytest.raises(ValueError, match="calib"):
        Pruner(graph, "wanda")
    with pytest.raises(ValueError, match="ratio"):
        Pruner(graph, "l1", ratio=1.0)
    with pytest.raises(ValueError, match="target"):
        Pruner(graph, "l1", target="flops")


def test_example_runs(capsys):
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "custom_importance.py"), run_name="__main__")
    assert "parameters" in capsys.readouterr().out
