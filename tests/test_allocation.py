"""Non-uniform per-layer budgets (issue 16 item 5): ``Pruner(allocation="increasing" | "sensitivity" | weights)``.

Checked: the exact parameter target is kept, the "increasing" schedule is monotone in depth, GQA units and
``round_to`` are honoured in every layer, bad options are refused before anything changes, a layer made
sensitive on purpose is protected, the pruned model runs, saves and reloads, and ``plan_errors`` leaves the
model as it was.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import example_ids, tiny_model

import depgraph
from depgraph.errors import PlanError
from depgraph.pruner import Pruner, layer_index, simulate_params
from depgraph.reconstruct import plan_errors

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def gqa_model(layers: int = 4, **overrides):
    """Llama with GQA (8 query heads over 4 KV heads, head_dim 8) and ``layers`` decoder layers."""
    spec = dict(num_hidden_layers=layers, hidden_size=64, num_attention_heads=8, num_key_value_heads=4,
                intermediate_size=96, vocab_size=256)
    return tiny_model("llama", **{**spec, **overrides})


@pytest.fixture(scope="module")
def traced():
    return depgraph.trace(gqa_model())


@pytest.fixture
def graph(traced):
    return copy.deepcopy(traced)


def calib(vocab: int = 256):
    return torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(0))


def widths(model) -> list[tuple[int, int, int]]:
    """Per decoder layer: (MLP neurons, query heads, KV heads)."""
    out = []
    for layer in model.model.layers:
        attn, hd = layer.self_attn, layer.self_attn.head_dim
        out.append((layer.mlp.up_proj.out_features, attn.q_proj.out_features // hd, attn.k_proj.out_features // hd))
    return out


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in now)


@pytest.mark.parametrize("allocation", ["increasing", "outlier", "sensitivity", (1.0, 2.0, 0.5, 1.0)])
@pytest.mark.parametrize("reconstruct", [None, "lsq"])
def test_exact_parameter_target(graph, allocation, reconstruct):
    """Non-uniform budgets hit the parameter target as exactly as the uniform plan; the report says so."""
    before = depgraph.count_parameters(graph.model)
    pruner = Pruner(graph, criterion="l2", ratio=0.3, target="params", allocation=allocation, calib=calib(),
                    reconstruct=reconstruct, progress=False)
    plan = pruner.plan()
    predicted = simulate_params(graph, plan)
    report = pruner.step(plan)
    after = depgraph.count_parameters(graph.model)
    assert after == predicted
    t = report.target
    assert t.reached, str(t)
    assert abs((1 - after / before) - 0.3) <= t.tolerance + 1e-12
    assert t.achieved == pytest.approx(1 - after / before)
    assert len({w for w in widths(graph.model)}) > 1, "the allocation must give layers different widths"
    assert not t.hf_loadable and t.hf_reason  # per-layer widths: depgraph's format, and the report says so
    assert f"allocation {t.allocation}: layer 0" in str(t) and set(t.layer_ratios) == {0, 1, 2, 3}


def test_increasing_is_monotone_and_differs_from_uniform(traced):
    """SlimGPT's schedule: every later layer loses at least as large a share of its units."""
    for ratio in (0.15, 0.3, 0.45):
        for spread in (0.2, 0.5, 0.9):
            g = copy.deepcopy(traced)
            Pruner(g, criterion="l2", ratio=ratio, target="params", allocation="increasing",
                   allocation_spread=spread, progress=False).prune()
            w = widths(g.model)
            mlp, heads = [x[0] for x in w], [x[2] for x in w]
            assert mlp == sorted(mlp, reverse=True), (ratio, spread, w)
            assert heads == sorted(heads, reverse=True), (ratio, spread, w)
            assert mlp[0] > mlp[-1], (ratio, spread, w)


def test_spread_zero_is_uniform(traced):
    a, b = copy.deepcopy(traced), copy.deepcopy(traced)
    Pruner(a, criterion="l2", ratio=0.3, target="params", progress=False).prune()
    Pruner(b, criterion="l2", ratio=0.3, target="params", allocation="increasing", allocation_spread=0.0,
           progress=False).prune()
    assert widths(a.model) == widths(b.model)


@pytest.mark.parametrize("allocation", ["increasing", "outlier", "sensitivity"])
def test_units_and_rounding_in_every_layer(graph, allocation):
    """GQA: heads go with their KV head (2 query heads per KV head); round_to holds for every layer."""
    Pruner(graph, criterion="l2", ratio=0.35, target="params", allocation=allocation, calib=calib(), round_to=8,
           progress=False).prune()
    w = widths(graph.model)
    for mlp, q, kv in w:
        assert mlp % 8 == 0 and mlp >= 8, w
        assert q == 2 * kv and kv >= 1, w
    assert any(x != w[0] for x in w), w
    ids = example_ids(graph.model)
    assert torch.isfinite(graph.model(ids).logits).all()


def test_sensitivity_protects_a_sensitive_layer():
    """Layer 2's MLP is made to matter (its output scaled up): the sensitivity allocation cuts it least."""
    model = gqa_model()
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(20.0)
    graph = depgraph.trace(model)
    uniform = copy.deepcopy(graph)
    Pruner(uniform, criterion="l2", ratio=0.25, target="params", kinds="A", progress=False).prune()
    pruner = Pruner(graph, criterion="l2", ratio=0.25, target="params", kinds="A", allocation="sensitivity",
                    calib=calib(), progress=False)
    pruner.prune()
    mlp = [x[0] for x in widths(graph.model)]
    assert mlp[2] == max(mlp) and mlp[2] > widths(uniform.model)[2][0], mlp
    assert any("layers.2.mlp" in name for name in pruner.sensitivity)
    # and it is better on the calibration data than the uniform plan, by the measure it optimises
    ref = model.eval()
    with torch.no_grad():
        ids = calib()
        base = torch.log_softmax(ref(ids).logits, -1)

        def kl(m):
            out = torch.log_softmax(m(ids).logits, -1)
            return float((base.exp() * (base - out)).sum(-1).mean())

        assert kl(graph.model) < kl(uniform.model)


BAD = [
    (dict(allocation="depth"), "allocation"),
    (dict(allocation=[1.0, 2.0]), "4 decoder layer"),
    (dict(allocation=[1.0, -1.0, 1.0, 1.0]), "allocation"),
    (dict(allocation=[]), "allocation"),
    (dict(allocation="increasing", allocation_spread=1.0), "allocation_spread"),
    (dict(allocation="increasing", allocation_spread=True), "allocation_spread"),
    (dict(allocation="increasing", target="units"), "target='params'"),
    (dict(allocation="increasing", scope="global"), "scope='local'"),
    (dict(allocation="increasing", hf_loadable=True), "hf_loadable"),
    (dict(allocation="sensitivity", calib=None), "calib"),
    (dict(allocation="outlier", calib=None), "calib"),
]


@pytest.mark.parametrize("kwargs,match", BAD)
def test_bad_options_refused_before_anything_changes(graph, kwargs, match):
    before = state(graph.model)
    args = dict(criterion="l2", ratio=0.3, target="params", calib=calib(), progress=False)
    with pytest.raises(PlanError, match=match):
        Pruner(graph, **{**args, **kwargs})
    assert unchanged(graph.model, before)


@pytest.mark.parametrize("family,overrides", [
    ("llama", dict(num_hidden_layers=3)),
    ("qwen2", dict(num_hidden_layers=3)),
    ("gpt2", dict(n_layer=3)),  # Conv1D, fused qkv
    ("mistral", dict(num_hidden_layers=3)),
])
@pytest.mark.parametrize("allocation", ["increasing", "sensitivity"])
def test_families_forward_save_reload(tmp_path, family, overrides, allocation):
    """Across families: exact target, every layer valid, forward runs, and the model saves and reloads."""
    model = tiny_model(family, **overrides)
    vocab = model.config.vocab_size
    before = depgraph.count_parameters(model)
    report = Pruner(model, criterion="l2", ratio=0.25, target="params", allocation=allocation,
                    calib=calib(vocab), reconstruct="lsq", progress=False).prune()
    assert report.target.reached, str(report.target)
    assert abs(1 - depgraph.count_parameters(model) / before - 0.25) <= report.target.tolerance + 1e-12
    ids = example_ids(model)
    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all()
    depgraph.save_pretrained(model, tmp_path / "m")
    loaded = depgraph.load_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, out)


@settings(max_examples=12, deadline=None)
@given(ratio=st.floats(0.05, 0.6), spread=st.floats(0.0, 0.95), kinds=st.sampled_from(["AB", "A", "B"]),
       weights=st.one_of(st.none(), st.lists(st.floats(0.1, 5.0), min_size=4, max_size=4)))
def test_property_exact_target_any_schedule(traced, ratio, spread, kinds, weights):
    """Any schedule and ratio: the planned parameter count is the one cut, and within one cut of the target
    (or refused/flagged as out of reach, never silently short)."""
    g = copy.deepcopy(traced)
    allocation = tuple(weights) if weights is not None else "increasing"
    before = depgraph.count_parameters(g.model)
    try:
        pruner = Pruner(g, criterion="l2", ratio=ratio, target="params", kinds=kinds, allocation=allocation,
                        allocation_spread=spread, progress=False)
        plan = pruner.plan()
    except depgraph.PruneError as exc:
        assert "out of reach" in str(exc)
        assert depgraph.count_parameters(g.model) == before
        return
    predicted = simulate_params(g, plan)
    report = pruner.step(plan)
    assert depgraph.count_parameters(g.model) == predicted
    assert report.target.reached, str(report.target)
    for group in g.groups():
        if layer_index(group) is not None:
            assert group.size >= 1


def test_plan_errors_leave_the_model_unchanged(graph):
    groups = graph.groups("A")
    before = state(graph.model)
    errors = plan_errors(graph, [{}, {groups[0]: list(range(40))}, {groups[0]: list(range(40))}], calib(), "lsq")
    assert unchanged(graph.model, before)
    assert errors[0] < 1e-6 < errors[1]  # nothing cut: only the float32 reference's rounding
    plain = plan_errors(graph, [{groups[0]: list(range(40))}], calib())
    assert unchanged(graph.model, before)
    assert errors[2] <= plain[0] * 1.0001  # the refit consumer makes the output no worse here


def test_benchmark_heads_rows_and_bpe_tokenizer(tmp_path):
    """quality.py's "heads" structure: every allocation cuts the same heads count and parameter total; the
    BPE tokenizer of the second benchmark LM trains on a text file and round-trips text."""
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        import quality
        from common import encode, train_bpe_tokenizer
    finally:
        sys.path.remove(str(bench))
    graph = depgraph.trace(gqa_model())
    ratio = quality.struct_ratio(graph, "heads", 0.2)
    assert set(ratio) == {"A", "B"} and 0 < ratio["B"] < 0.2 and ratio["A"] + ratio["B"] == pytest.approx(0.2)
    scores = {i: torch.rand(g.size, generator=torch.Generator().manual_seed(i)) for i, g in enumerate(graph.groups())}
    out = {}
    for allocation in ("uniform", "sensitivity"):
        g2, report, _ = quality.fixed_plan_pruner(graph, scores, "heads", 0.2, "lsq", calib(), "l2",
                                                  allocation=allocation)
        out[allocation] = (depgraph.count_parameters(g2.model), widths(g2.model), report.target)
    (n_u, w_u, t_u), (n_s, w_s, t_s) = out["uniform"], out["sensitivity"]
    assert abs(n_u - n_s) <= 3 * 64 and t_u.reached and t_s.reached  # within one MLP neuron (gate, up, down)
    assert sum(kv for *_, kv in w_u) == sum(kv for *_, kv in w_s) == 4 * 3  # one of 4 KV heads per layer: 25%
    assert t_s.allocation == "sensitivity" and set(t_s.layer_ratios) == {0, 1, 2, 3}

    text = tmp_path / "valid.txt"
    text.write_text(" = Valkyria Chronicles = \n The game began development in 2010 . " * 200)
    tok = train_bpe_tokenizer(text, vocab_size=300)
    assert len(tok) <= 300 and tok.pad_token_id == 0 and tok.eos_token_id == 2
    ids = encode(tok, " The game began development")
    assert len(ids) < len(" The game began development") and tok.decode(ids) == " The game began development"


def test_plan_errors_interrupted_restores_the_model(graph, monkeypatch):
    """A KeyboardInterrupt in the middle of a measurement (after the refit and copies) leaves every weight as
    it was, and the interrupt is not swallowed."""
    import sys

    rec = sys.modules["depgraph.reconstruct"]  # the package's attribute of that name is the function

    group = graph.groups("A")[0]
    before = state(graph.model)

    def interrupted(g, plan):
        raise KeyboardInterrupt

    monkeypatch.setattr(rec, "zero_mask", interrupted)
    with pytest.raises(KeyboardInterrupt):
        plan_errors(graph, [{group: list(range(40))}], calib(), "lsq")
    assert unchanged(graph.model, before)


def test_sensitivity_bad_calibration_refused_before_cut(graph):
    before = state(graph.model)
    bad = torch.full((2, 8), 10_000)  # ids outside the 256-token vocabulary
    pruner = Pruner(graph, criterion="l2", ratio=0.3, target="params", allocation="sensitivity", calib=bad,
                    progress=False)
    with pytest.raises((depgraph.PruneError, depgraph.CalibrationError), match="vocabulary"):
        pruner.prune()
    assert unchanged(graph.model, before)


def test_allocation_over_steps(graph):
    """Two steps with re-scoring: each step's budget is allocated anew; the final target is exact."""
    before = depgraph.count_parameters(graph.model)
    report = Pruner(graph, criterion="l2", ratio=0.4, target="params", allocation="sensitivity", calib=calib(),
                    steps=2, progress=False).prune()
    assert len(report.steps) == 2 and report.target.reached, str(report.target)
    assert abs(1 - depgraph.count_parameters(graph.model) / before - 0.4) <= report.target.tolerance + 1e-12
    assert len(set(widths(graph.model))) > 1


def test_outlier_schedule_follows_outlier_ratios():
    """OWL: the layer with the most outliers (the last one's weights made heavy-tailed on purpose, so no
    other layer's inputs change) is cut least."""
    from depgraph.reconstruct import outlier_ratios

    model = gqa_model()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # 3% of layer 3's weights 20x larger: scattered outliers
        for lin in (m for m in model.model.layers[3].modules() if isinstance(m, torch.nn.Linear)):
            lin.weight[torch.rand(lin.weight.shape, generator=gen) < 0.03] *= 20.0
    ratios = outlier_ratios(model, calib())
    assert set(ratios) == {0, 1, 2, 3} and max(ratios, key=ratios.get) == 3
    graph = depgraph.trace(model)
    Pruner(graph, criterion="l2", ratio=0.3, target="params", kinds="A", allocation="outlier", calib=calib(),
           progress=False).prune()
    mlp = [x[0] for x in widths(graph.model)]
    assert mlp[3] == max(mlp) and len(set(mlp)) > 1, mlp


def test_plan_errors_hidden_channels_tied_embeddings():
    """GPT-2 ties lm_head to the embedding: measuring a hidden-channel (C) cut zeroes that shared tensor,
    and the measurement still leaves every weight as it was."""
    model = tiny_model("gpt2")
    graph = depgraph.trace(model)
    before = state(model)
    c = graph.groups("C")[0]
    errors = plan_errors(graph, [{c: [0, 1, 2, 3]}, {c: list(range(16))}], calib(model.config.vocab_size), "lsq")
    assert unchanged(model, before)
    assert 0 < errors[0] < errors[1]
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
