"""Importance criteria, aggregation and normalisation, checked against scores computed by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from models import tiny_model
from torch import nn

import depgraph
from depgraph import importance as I

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = MLP().eval()
    graph = depgraph.trace(model, torch.randn(2, 4))
    return model, graph, graph.groups("A")[0]


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama", num_hidden_layers=1)  # 4 query heads, 2 KV heads, head_dim 16
    return model, depgraph.trace(model)


def mlp_calib():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(5, 4, generator=gen) for _ in range(3)]


def mse_loss(model, batch):
    return model(batch).pow(2).sum()


def by_param(scores: dict, param: str, dim: int | None = None) -> torch.Tensor:
    return next(s for m, s in scores.items() if m.param == param and (dim is None or m.dim == dim))


# ---- data-free criteria -----------------------------------------------------------------------------


def test_l1_l2_per_member_and_aggregations(mlp):
    model, graph, group = mlp
    w1, b1, w2 = model.fc1.weight.detach(), model.fc1.bias.detach(), model.fc2.weight.detach()
    l2 = I.member_scores(graph, "l2", groups=[group], progress=False)[group]
    assert {m.param for m in l2} == {"fc1.weight", "fc1.bias", "fc2.weight"}
    torch.testing.assert_close(by_param(l2, "fc1.weight"), w1.norm(dim=1))
    torch.testing.assert_close(by_param(l2, "fc1.bias"), b1.abs())
    torch.testing.assert_close(by_param(l2, "fc2.weight"), w2.norm(dim=0))
    l1 = I.member_scores(graph, "l1", groups=[group], progress=False)[group]
    torch.testing.assert_close(by_param(l1, "fc1.weight"), w1.abs().sum(1))
    torch.testing.assert_close(by_param(l1, "fc2.weight"), w2.abs().sum(0))

    parts = torch.stack([w1.norm(dim=1), b1.abs(), w2.norm(dim=0)])
    expect = {"sum": parts.sum(0), "mean": parts.mean(0), "max": parts.max(0).values, "last": w2.norm(dim=0)}
    expect["product"] = parts.prod(0) ** (1 / 3)  # reported as the geometric mean (same ranking)
    for how, want in expect.items():
        got = I.score(graph, "l2", aggregate=how, groups=[group], progress=False)[group]
        torch.testing.assert_close(got, want, msg=how)


def test_l2_gqa_head_slices(llama):
    model, graph = llama
    group = graph.group("model.layers.0.self_attn")
    attn = model.model.layers[0].self_attn
    q, k, o = (getattr(attn, n).weight.detach() for n in ("q_proj", "k_proj", "o_proj"))
    scores = I.member_scores(graph, "l2", groups=[group], progress=False)[group]
    # KV head u owns k rows [16u, 16u+16) and query heads 2u, 2u+1: q rows / o columns [32u, 32u+32)
    torch.testing.assert_close(by_param(scores, attn_name("q_proj")), torch.stack([q[:32].norm(), q[32:].norm()]))
    torch.testing.assert_close(by_param(scores, attn_name("k_proj")), torch.stack([k[:16].norm(), k[16:].norm()]))
    torch.testing.assert_close(by_param(scores, attn_name("o_proj")),
                               torch.stack([o[:, :32].norm(), o[:, 32:].norm()]))


def attn_name(proj: str) -> str:
    return f"model.layers.0.self_attn.{proj}.weight"


def test_last_picks_last_member_in_execution_order(llama):
    model, graph = llama
    mlp_group, attn_group = graph.group("model.layers.0.mlp"), graph.group("model.layers.0.self_attn")
    scores = I.score(graph, "l1", aggregate="last", groups=[mlp_group, attn_group], progress=False)
    layer = model.model.layers[0]
    torch.testing.assert_close(scores[mlp_group], layer.mlp.down_proj.weight.detach().abs().sum(0))
    o = layer.self_attn.o_proj.weight.detach().abs()
    torch.testing.assert_close(scores[attn_group], torch.stack([o[:, :32].sum(), o[:, 32:].sum()]))


def test_product_and_sum_rank_differently(mlp):
    _, graph, group = mlp
    # unit 0: member scores (1, 10, 1); unit 1: (4, 4, 1): sum ranks unit 1 lower, product unit 0 lower
    table = {"out": [1.0, 4.0], "bias": [10.0, 4.0], "in": [1.0, 1.0]}

    @I.criterion("_test_table")
    def _table(ctx, g, m):
        return torch.tensor(table[m.role] + [2.0] * (g.size - 2))

    try:
        by_sum = I.score(graph, "_test_table", aggregate="sum", groups=[group], progress=False)[group]
        by_prod = I.score(graph, "_test_table", aggregate="product", groups=[group], progress=False)[group]
    finally:
        del I.CRITERIA["_test_table"]
    assert by_sum[1] < by_sum[0] and by_prod[0] < by_prod[1]
    torch.testing.assert_close(by_prod[:2], torch.tensor([10.0, 16.0]) ** (1 / 3))


def test_product_is_stable_with_many_members():
    members = [depgraph.Member(f"p{i}", 0, torch.arange(3).numpy()) for i in range(500)]
    scores = {m: torch.tensor([1e-3, 2e-3, 0.0]) for m in members}
    out = I.combine(scores, "product")
    torch.testing.assert_close(out, torch.tensor([1e-3, 2e-3, 0.0]))  # the plain product underflows


def test_normalisations():
    s = torch.tensor([1.0, 2.0, 3.0, 6.0])
    torch.testing.assert_close(I.normalize_scores(s, "mean"), s / 3.0)
    torch.testing.assert_close(I.normalize_scores(s, "max"), s / 6.0)
    torch.testing.assert_close(I.normalize_scores(s, "sum"), s / 12.0)
    torch.testing.assert_close(I.normalize_scores(s, "gaussian"), (s - 3.0) / s.std(unbiased=False))
    assert I.normalize_scores(torch.zeros(3), "mean").eq(0).all()
    with pytest.raises(ValueError):
        I.normalize_scores(s, "median")


def test_random_is_seeded_and_aggregation_free(llama):
    _, graph = llama
    a = I.score(graph, "random", seed=3, progress=False)
    b = I.score(graph, "random", seed=3, aggregate="product", progress=False)
    c = I.score(graph, "random", seed=4, progress=False)
    for g in graph.groups():
        assert torch.equal(torch.argsort(a[g]), torch.argsort(b[g]))
        assert not torch.equal(a[g], c[g])


def test_user_scores_and_callables(mlp):
    _, graph, group = mlp
    fixed = torch.arange(6.0)
    torch.testing.assert_close(I.score(graph, {group: fixed}, normalize="max")[group], fixed / 5)
    torch.testing.assert_close(I.score(graph, lambda gr, g: torch.ones(g.size))[group], torch.ones(6))
    with pytest.raises(ValueError, match="6 units"):
        I.score(graph, {group: torch.ones(5)})
    with pytest.raises(ValueError, match="unknown criterion"):
        I.score(graph, "nope")
    with pytest.raises(ValueError, match="calib"):
        I.score(graph, "wanda")


# ---- Taylor ------------------------------------------------------------------------------------------


def naive_taylor(model, batches, loss_fn):
    """Every parameter's full gradient per batch, held at once (the reference the hooks must match)."""
    params = dict(model.named_parameters())
    per_batch = []
    for batch in batches:
        grads = torch.autograd.grad(loss_fn(model, batch), list(params.values()), allow_unused=True)
        per_batch.append({n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params.items(), grads)})
    n = len(batches)
    out = {}
    for name, p in params.items():
        w = p.detach()
        mean = sum(b[name] for b in per_batch) / n
        fisher = sum((b[name] * w) ** 2 for b in per_batch) / n
        out[name] = {"vector": mean * w, "first": (mean * w).abs(), "second": (mean * w).abs() + 0.5 * fisher}
    return out


def slice_sum(values, member):
    return I.reduce_member(values, member, int(member.unit_of_index.max()) + 1)


def test_taylor_formulas_on_mlp(mlp):
    model, graph, group = mlp
    calib = mlp_calib()
    ref = naive_taylor(model, calib, mse_loss)
    for mode in ("vector", "first", "second"):
        got = I.member_scores(graph, f"taylor_{mode}", calib=calib, loss_fn=mse_loss, progress=False)[group]
        assert len(got) == 3
        for m, s in got.items():
            want = slice_sum(ref[m.param][mode], m)
            torch.testing.assert_close(s, want.abs() if mode == "vector" else want, rtol=1e-5, atol=1e-7)
    # sum inside, abs outside: vector <= first element-wise, and strictly below it somewhere
    vec = I.score(graph, "taylor_vector", calib=calib, loss_fn=mse_loss, progress=False)[group]
    first = I.score(graph, "taylor_first", calib=calib, loss_fn=mse_loss, progress=False)[group]
    assert (vec <= first + 1e-7).all() and (vec < first - 1e-6).any()


def test_taylor_single_batch_and_second_order_term(mlp):
    model, graph, group = mlp
    batch = mlp_calib()[:1]
    ref = naive_taylor(model, batch, mse_loss)
    got = I.member_scores(graph, "taylor_second", calib=batch, loss_fn=mse_loss, progress=False)[group]
    for m, s in got.items():
        gw = ref[m.param]["vector"]
        torch.testing.assert_close(s, slice_sum(gw.abs() + 0.5 * gw**2, m), rtol=1e-5, atol=1e-7)


def test_memory_conscious_taylor_matches_naive_on_llama(llama):
    model, graph = llama
    calib = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    batches = [row[None] for row in calib]
    ref = naive_taylor(model, batches, I.causal_lm_loss)
    seen_grads = []

    def watched_loss(m, batch):
        # hooks free every .grad as soon as it is folded: none survives into the next pass
        seen_grads.append(sum(p.grad is not None for p in m.parameters()))
        return I.causal_lm_loss(m, batch)

    for mode, budget in (("first", 1), ("second", None), ("vector", None)):
        got = I.member_scores(graph, f"taylor_{mode}", calib=calib, loss_fn=watched_loss, progress=False,
                              grad_budget=budget)
        for group, members in got.items():
            for m, s in members.items():
                want = slice_sum(ref[m.param][mode], m)
                want = want.abs() if mode == "vector" else want
                torch.testing.assert_close(s, want, rtol=1e-4, atol=1e-9, msg=f"{mode} {group.name} {m.param}")
    assert max(seen_grads) == 0
    # grad_budget=1 puts every parameter in its own chunk: 2 passes per parameter
    assert len(seen_grads) > 2 * 10
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


# ---- activation-based criteria ------------------------------------------------------------------------


def test_wanda_and_activation_on_mlp(mlp):
    model, graph, group = mlp
    calib = mlp_calib()
    x = torch.cat(calib)
    h = torch.relu(model.fc1(x)).detach()
    w1, b1, w2 = model.fc1.weight.detach(), model.fc1.bias.detach(), model.fc2.weight.detach()
    wanda = I.member_scores(graph, "wanda", calib=calib, progress=False)[group]
    torch.testing.assert_close(by_param(wanda, "fc1.weight"), (w1.abs() * x.norm(dim=0)).sum(1))
    torch.testing.assert_close(by_param(wanda, "fc1.bias"), b1.abs() * x.shape[0] ** 0.5)
    torch.testing.assert_close(by_param(wanda, "fc2.weight"), w2.abs().sum(0) * h.norm(dim=0))
    act = I.member_scores(graph, "activation", calib=calib, progress=False)[group]
    assert [m.param for m in act] == ["fc2.weight"]  # measured at the consumer's input only
    torch.testing.assert_close(by_param(act, "fc2.weight"), h.abs().mean(0))


def capture_inputs(model, names, batch):
    seen = {}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_pre_hook(
        lambda mod, args, n=n: seen.__setitem__(n, args[0].detach().reshape(-1, args[0].shape[-1])))
        for n in names]
    with torch.no_grad():
        model(batch)
    for hk in hooks:
        hk.remove()
    return seen


def test_activation_heads_and_hidden_on_llama(llama):
    model, graph = llama
    calib = torch.randint(0, 1000, (1, 10), generator=torch.Generator().manual_seed(2))
    attn, hidden = graph.group("model.layers.0.self_attn"), graph.group("hidden")
    readers = ["q_proj", "k_proj", "v_proj"]
    names = ([f"model.layers.0.self_attn.{n}" for n in readers + ["o_proj"]]
             + [f"model.layers.0.mlp.{n}" for n in ("gate_proj", "up_proj")] + ["lm_head"])
    seen = capture_inputs(model, names, calib)
    o_in = seen["model.layers.0.self_attn.o_proj"]
    heads = torch.stack([o_in[:, :32].norm(dim=1).mean(), o_in[:, 32:].norm(dim=1).mean()])
    scores = I.score(graph, "activation", aggregate="mean", calib=calib, groups=[attn, hidden], progress=False)
    torch.testing.assert_close(scores[attn], heads)
    readers_of_hidden = [n for n in names if not n.endswith("o_proj")]
    want = torch.stack([seen[n].abs().mean(0) for n in readers_of_hidden]).mean(0)
    torch.testing.assert_close(scores[hidden], want)


def test_wanda_embedding_and_conv1d():
    model = tiny_model("gpt2", n_layer=1)
    graph = depgraph.trace(model)
    calib = torch.randint(0, 12, (2, 9), generator=torch.Generator().manual_seed(3))  # repeats: counts > 1
    mlp = graph.group("transformer.h.0.mlp")
    hidden = graph.groups("C")[0]
    got = I.member_scores(graph, "wanda", calib=calib, groups=[mlp, hidden], progress=False)
    c_fc, c_proj = model.transformer.h[0].mlp.c_fc, model.transformer.h[0].mlp.c_proj  # Conv1D: [in, out]
    xs = {"fc": [], "proj": []}
    hooks = [c_fc.register_forward_pre_hook(lambda m, a: xs["fc"].append(a[0].reshape(-1, 64))),
             c_proj.register_forward_pre_hook(lambda m, a: xs["proj"].append(a[0].reshape(-1, 256)))]
    with torch.no_grad():
        for row in calib:
            model(row[None])
    for hk in hooks:
        hk.remove()
    x_fc, x_proj = torch.cat(xs["fc"]), torch.cat(xs["proj"])
    torch.testing.assert_close(by_param(got[mlp], "transformer.h.0.mlp.c_fc.weight"),
                               (c_fc.weight.detach().abs() * x_fc.norm(dim=0)[:, None]).sum(0))
    torch.testing.assert_close(by_param(got[mlp], "transformer.h.0.mlp.c_proj.weight"),
                               (c_proj.weight.detach().abs() * x_proj.norm(dim=0)[:, None]).sum(1))
    counts = torch.bincount(calib.reshape(-1), minlength=1000).float()
    wte = model.transformer.wte.weight.detach()
    torch.testing.assert_close(by_param(got[hidden], "transformer.wte.weight"),
                               (wte.abs() * counts.sqrt()[:, None]).sum(0))
    # norm scales have no matrix input: wanda leaves them out
    assert not any(m.role == "scale" for m in got[hidden])


def test_real_calibration_text_if_available(llama):
    from depgraph import data

    try:
        calib = data.calibration_batches(tokenizer=data.ByteTokenizer(), n_samples=2, seq_len=16)
    except FileNotFoundError:
        pytest.skip("WikiText-2 not available")
    model, graph = llama
    scores = I.score(copy.deepcopy(graph), "taylor_first", calib=calib, progress=False)
    assert all(s.shape == (g.size,) and torch.isfinite(s).all() for g, s in scores.items())
