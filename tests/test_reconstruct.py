"""Calibration reconstruction (depgraph.reconstruct) and the OBS criterion."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import depgraph
from depgraph.reconstruct import Hessian, consumers, fit, obs_scores
from tests.models import tiny_model

FAMILIES = ["llama", "phi3", "gpt2"]  # GQA, fused qkv / gate_up, Conv1D with biases


def _calib(vocab: int = 1000, n: int = 6, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, state) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(now[k].shape == v.shape and torch.equal(now[k], v)
                                              for k, v in state.items())


def _inputs(model, names, calib) -> dict[str, torch.Tensor]:
    """Every named layer's input over the calibration batches, [tokens, in]."""
    modules = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [modules[n].register_forward_pre_hook(
        lambda _m, args, n=n: seen[n].append(args[0].detach().reshape(-1, args[0].shape[-1]).double()))
        for n in names]
    with torch.no_grad():
        for row in calib:
            model(row[None], use_cache=False)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def _rows(module) -> torch.Tensor:
    w = module.weight.detach().double()
    return w.T if type(module).__name__ == "Conv1D" else w


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(FAMILIES), method=st.sampled_from(["lsq", "bias"]), data=st.data())
def test_reconstruction_never_increases_consumer_error(family, method, data):
    """On the calibration inputs, every refitted consumer's output error is <= the plain cut's."""
    model = tiny_model(family)
    calib = _calib()
    graph = depgraph.trace(model)
    plan = {}
    for g in graph.groups():
        if g.kind.value in "AB":
            k = data.draw(st.integers(1, g.size - 1), label=g.name)
            plan[g] = sorted(data.draw(st.permutations(range(g.size)), label=f"{g.name} order")[:k])
    layers = consumers(graph, plan)
    assert layers and all(c.removed.size for c in layers)
    X = _inputs(model, [c.name for c in layers], calib)
    before = {c.name: (_rows(c.module), None if c.module.bias is None else c.module.bias.detach().double())
              for c in layers}
    keep = {c.name: np.setdiff1d(np.arange(c.width), c.removed) for c in layers}
    modules = dict(model.named_modules())
    report = depgraph.reconstruct(graph, plan, calib, method)
    assert {f.name for f in report.reconstruction.fits} == set(before)
    for name, (W, b) in before.items():
        x = X[name]
        y = x @ W.T + (0 if b is None else b)
        cut = x[:, keep[name]] @ W[:, keep[name]].T + (0 if b is None else b)
        new = modules[name]
        V = _rows(new)
        assert V.shape[1] == keep[name].size
        fitted = x[:, keep[name]] @ V.T + (0 if new.bias is None else new.bias.detach().double())
        e_cut = float((y - cut).pow(2).sum())
        e_fit = float((y - fitted).pow(2).sum())
        assert e_fit <= e_cut * (1 + 1e-5) + 1e-9 * float(y.pow(2).sum()), (name, e_fit, e_cut)


def _duplicate_mlp_neurons(model, removed: list[int], kept: list[int]) -> None:
    """Make MLP neurons ``removed`` exact copies of ``kept`` (same gate and up rows) in every layer."""
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
                proj.weight[removed] = proj.weight[kept]


def _duplicate_heads(model, removed: int, kept: int, head_dim: int) -> None:
    """MHA: make head ``removed`` an exact copy of head ``kept`` (q, k, v rows) in every layer."""
    r, k = slice(removed * head_dim, (removed + 1) * head_dim), slice(kept * head_dim, (kept + 1) * head_dim)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight[r] = proj.weight[k]


def test_linear_combinations_are_restored():
    """Removed inputs that equal kept ones on the calibration set: the output is restored (1e-4)."""
    model = tiny_model("llama_mha").double()
    _duplicate_mlp_neurons(model, removed=[0, 1, 2], kept=[10, 11, 12])
    _duplicate_heads(model, removed=1, kept=3, head_dim=16)
    calib = _calib()
    with torch.no_grad():
        ref = model(calib, use_cache=False).logits
    graph = depgraph.trace(model)
    plan = {g: [0, 1, 2] if g.kind.value == "A" else [1] for g in graph.groups() if g.kind.value in "AB"}
    plain = copy.deepcopy(graph)
    depgraph.prune(plain, {plain.groups()[graph.groups().index(g)]: u for g, u in plan.items()})
    report = depgraph.reconstruct(graph, plan, calib, "lsq", damp=1e-9)
    with torch.no_grad():
        out = model(calib, use_cache=False).logits
        cut = plain.model(calib, use_cache=False).logits
    assert float((cut - ref).abs().max()) > 1e-2  # the plain cut does change the output
    assert float((out - ref).abs().max()) < 1e-4
    assert all(f.error_fit < 1e-10 for f in report.reconstruction.fits)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_reconstructed_model_saves_reloads_and_generates(family, tmp_path):
    model = tiny_model(family)
    calib = _calib()
    pruner = depgraph.Pruner(model, criterion="obs", calib=calib, ratio=0.3, target="params", reconstruct="lsq",
                             sequential=True, progress=False)
    pruner.prune()
    assert pruner.history[0].reconstruction.fits
    depgraph.save_pretrained(model, tmp_path / "m")
    loaded = depgraph.load_pretrained(tmp_path / "m")
    ids = calib[:2, :10]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with_cache = loaded.generate(ids, use_cache=True, **kw)
    without = loaded.generate(ids, use_cache=False, **kw)
    assert torch.equal(with_cache, without)


def _half_plan(graph):
    return {g: list(range(g.size // 2)) for g in graph.groups() if g.kind.value in "AB"}


@pytest.mark.parametrize("calib,match", [
    (None, "needs calibration data"),
    ([], "empty"),
    (torch.full((2, 8), 1000), "out of range: the model's vocabulary"),
    (torch.full((2, 8), -1), "is negative"),
])
def test_bad_calibration_is_refused_before_anything_changes(calib, match):
    model = tiny_model("llama")
    graph = depgraph.trace(model)
    state = _state(model)
    with pytest.raises(depgraph.PruneError, match=match):
        depgraph.reconstruct(graph, _half_plan(graph), calib)
    assert _same(model, state)
    assert all(g.size == s for g, s in zip(graph.groups(), [g.size for g in depgraph.trace(model).groups()]))


def test_bad_method_and_damp_are_refused():
    model = tiny_model("llama")
    graph = depgraph.trace(model)
    with pytest.raises(depgraph.PruneError, match="method"):
        depgraph.reconstruct(graph, _half_plan(graph), _calib(), "nope")
    with pytest.raises(depgraph.PruneError, match="damp"):
        depgraph.reconstruct(graph, _half_plan(graph), _calib(), damp=0)
    with pytest.raises(depgraph.PruneError, match="calib"):
        depgraph.Pruner(model, criterion="l2", reconstruct="lsq")
    with pytest.raises(depgraph.PruneError, match="sequential"):
        depgraph.Pruner(model, criterion="l2", sequential=True)


def test_constant_inputs_singular_hessian_are_handled_by_the_ridge():
    """H of constant inputs has rank 1; the ridge term makes the system solvable, never worse than the cut."""
    x = torch.ones(50, 8, dtype=torch.float64) * torch.arange(1.0, 9.0, dtype=torch.float64)
    stats = Hessian(x.T @ x, x.sum(0), 50)
    W = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for b in (None, torch.zeros(4, dtype=torch.float64)):
        W2, b2, e_cut, e_fit = fit(W, b, stats, np.array([1, 5]), "lsq")
        assert torch.isfinite(W2).all() and (b2 is None or torch.isfinite(b2).all())
        assert e_fit <= e_cut
        assert (W2[:, [1, 5]] == 0).all()
    # with a bias, a constant input is pure offset: the bias absorbs it exactly
    _, _, _, e_fit = fit(W, torch.zeros(4, dtype=torch.float64), stats, np.array([1, 5]), "lsq", damp=1e-12)
    assert e_fit < 1e-8
    # and the whole model with a constant calibration sequence (every token the same id)
    model = tiny_model("gpt2")
    graph = depgraph.trace(model)
    report = depgraph.reconstruct(graph, _half_plan(graph), torch.full((2, 16), 7))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(f.error_fit <= f.error_cut for f in report.reconstruction.fits)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_failure_after_refit_restores_the_model(interrupt, monkeypatch):
    """The refitted weights are staged; a failure in the cut (even Ctrl-C) restores every weight."""
    model = tiny_model("gpt2")
    graph = depgraph.trace(model)
    state = _state(model)
    sizes = [g.size for g in graph.groups()]

    def boom(*args, **kwargs):
        raise interrupt("stop")

    monkeypatch.setattr(graph, "prune", boom)
    with pytest.raises(KeyboardInterrupt if interrupt is KeyboardInterrupt else depgraph.PruneError):
        depgraph.reconstruct(graph, _half_plan(graph), _calib(), "lsq", sequential=True)
    assert _same(model, state)
    assert [g.size for g in graph.groups()] == sizes


def test_obs_first_choice_is_the_cheapest_exact_refit():
    """OBS's cost of removing one unit equals the error of the best refit without it (damp -> 0)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, dtype=torch.float64, generator=gen)
    H = x.T @ x
    W = torch.randn(5, 12, dtype=torch.float64, generator=gen)
    units = np.repeat(np.arange(4), 3)  # 4 units of 3 columns (like heads)
    scores = obs_scores(W, H, units, 4, damp=1e-12, batch=0.25)
    stats = Hessian(H, x.sum(0), 200)
    scale = float((W @ H * W).sum())
    errors = [fit(W, None, stats, np.flatnonzero(units == u), "lsq", damp=1e-12)[3] * scale for u in range(4)]
    first = int(np.argmin(errors))
    assert int(torch.argmin(scores)) == first
    assert float(scores[first]) == pytest.approx(errors[first], rel=1e-4)
    assert torch.all(scores[torch.argsort(scores)].diff() > 0)  # strictly increasing in removal order


def test_obs_criterion_scores_consumers_only():
    model = tiny_model("llama")
    graph = depgraph.trace(model)
    scores = depgraph.member_scores(graph, "obs", calib=_calib(), groups="A", progress=False)
    for per_member in scores.values():
        assert per_member and all(m.role == "in" for m in per_member)
    with pytest.raises(ValueError, match="calibration"):
        depgraph.member_scores(graph, "obs", groups="A", progress=False)


def test_cli_prune_reconstruct_obs_sequential(tmp_path):
    import subprocess
    import sys

    tiny_model("llama").save_pretrained(tmp_path / "model")
    depgraph.data.ByteTokenizer().save_pretrained(tmp_path / "model")  # the model's own tokenizer (no fallback)
    args = [sys.executable, "-m", "depgraph", "prune", str(tmp_path / "model"), "--ratio", "0.3", "--target",
            "params", "--criterion", "obs", "--reconstruct", "lsq", "--sequential", "--calib-samples", "4",
            "--seq-len", "32", "--out", str(tmp_path / "out")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reconstruction (lsq" in done.stdout and "sequential" in done.stdout
    import json

    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["reconstruct"] == "lsq" and plan["sequential"] is True
    model = depgraph.load_pretrained(tmp_path / "out")
    assert depgraph.count_parameters(model) == plan["params_after"]
    bad = subprocess.run(args[:5] + ["--sequential", "--out", str(tmp_path / "bad")], capture_output=True, text=True,
                         timeout=240)
    assert bad.returncode == 2 and "--reconstruct" in bad.stderr


def test_padding_is_not_calibration_data():
    """Positions masked out by a batch's attention_mask do not enter H (padding is not data)."""
    from torch import nn

    from depgraph.reconstruct import collect_hessians

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.lin = nn.Linear(4, 3)

        def forward(self, input_ids, attention_mask=None):
            return self.lin(self.emb(input_ids))

    torch.manual_seed(0)
    model = Toy()
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    stats = collect_hessians(model, ["lin"], [batch])["lin"]
    x = model.emb.weight.detach().double()[torch.tensor([1, 2, 3, 4, 5])]
    assert stats.tokens == 5
    assert torch.allclose(stats.H, x.T @ x) and torch.allclose(stats.s, x.sum(0))
