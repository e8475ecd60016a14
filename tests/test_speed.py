"""Speed-path correctness: blocked per-index sums, one backward per batch for Taylor, bounded cut memory."""

from __future__ import annotations

import pytest
import torch
from models import tiny_model

import depgraph
from depgraph import importance as I


def naive_sums(t, dims, op, other=None, scale=None):
    v = t.double() if other is None else t.double() * other.double()
    v = {"abs": v.abs(), "square": v.pow(2), "signed": v}[op]
    if scale is not None:
        vec, d = scale
        v = v * vec.double().reshape([-1 if k == d else 1 for k in range(v.dim())])
    return {d: v.sum(dim=[k for k in range(v.dim()) if k != d]) if v.dim() > 1 else v for d in dims}


@pytest.mark.parametrize("shape", [(7,), (300, 1100), (5, 3, 4), (1, 9)])
@pytest.mark.parametrize("op", ["abs", "square", "signed"])
def test_index_sums_match_naive(monkeypatch, shape, op):
    monkeypatch.setattr(I, "BLOCK_ELEMENTS", 1000)  # several blocks even for small tensors
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(*shape, generator=gen)
    other = torch.randn(*shape, generator=gen)
    dims = range(len(shape))
    scale = (torch.rand(shape[-1], generator=gen), len(shape) - 1)
    for kw in ({}, {"other": other}, {"scale": scale}, {"other": other, "scale": scale}):
        got = I.index_sums(t, dims, op, **kw)
        want = naive_sums(t, dims, op, kw.get("other"), kw.get("scale"))
        assert set(got) == set(dims)
        for d in dims:
            assert got[d].dtype == torch.float32
            torch.testing.assert_close(got[d].double(), want[d], rtol=1e-5, atol=1e-4)  # fp32 sums
    # a bf16 or non-contiguous input is read as it is, never modified
    tt = t.t() if t.dim() == 2 else t
    before = tt.clone()
    got = I.index_sums(tt.to(torch.bfloat16), range(tt.dim()), op)
    torch.testing.assert_close(got[0].double(), naive_sums(tt.to(torch.bfloat16), [0], op)[0], rtol=1e-3, atol=1e-3)
    assert torch.equal(tt, before)


def test_magnitude_scores_equal_the_definition():
    model = tiny_model("llama", num_hidden_layers=2)
    graph = depgraph.trace(model)
    params = dict(model.named_parameters())
    for crit, op in (("l1", "abs"), ("l2", "square")):
        got = I.member_scores(graph, crit, progress=False)
        for group, members in got.items():
            for m, s in members.items():
                w = params[m.param].detach().double()
                v = w.abs() if op == "abs" else w.pow(2)
                per_index = v.sum(dim=[k for k in range(v.dim()) if k != m.dim]) if v.dim() > 1 else v
                want = I.reduce_member(per_index, m, group.size).double()
                want = want.sqrt() if crit == "l2" else want
                torch.testing.assert_close(s.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["first", "second", "vector"])
def test_taylor_costs_one_backward_per_batch(mode):
    # before: taylor_first/second with several batches ran one set of passes per layer-sized chunk
    model = tiny_model("llama", num_hidden_layers=3)
    graph = depgraph.trace(model)
    calib = torch.randint(0, 1000, (4, 10), generator=torch.Generator().manual_seed(0))
    calls = []

    def loss(m, batch):
        calls.append(1)
        return I.causal_lm_loss(m, batch)

    default = I.member_scores(graph, f"taylor_{mode}", calib=calib, loss_fn=loss, progress=False)
    assert len(calls) == 4
    calls.clear()
    chunked = I.member_scores(graph, f"taylor_{mode}", calib=calib, loss_fn=loss, progress=False, grad_budget=1)
    assert len(calls) >= 4
    for group in default:
        for m, s in default[group].items():
            torch.testing.assert_close(s, chunked[group][m], rtol=1e-5, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())


def test_taylor_chunks_when_memory_is_short(monkeypatch):
    model = tiny_model("llama", num_hidden_layers=2)
    graph = depgraph.trace(model)
    calib = torch.randint(0, 1000, (2, 6), generator=torch.Generator().manual_seed(0))
    calls = []

    def loss(m, batch):
        calls.append(1)
        return I.causal_lm_loss(m, batch)

    monkeypatch.setattr(I, "available_memory", lambda device: 1024)  # 1 KiB free: accumulators do not fit
    I.member_scores(graph, "taylor_first", calib=calib, loss_fn=loss, progress=False)
    assert len(calls) > 2  # several chunks, one set of passes each


def test_failed_cut_rolls_back_bit_identical(monkeypatch):
    # the cut journals only the dropped slices; rollback must rebuild every tensor exactly
    from depgraph import cut as C
    from depgraph.errors import PruneError

    model = tiny_model("llama", num_hidden_layers=2)
    graph = depgraph.trace(model)
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    plan = {g: list(range(0, g.size, 3))[: g.size - 1] for g in graph.groups()}

    def boom(*_args):
        raise PruneError("injected failure after commit")

    monkeypatch.setattr(C, "check_forward", boom)
    with pytest.raises(PruneError):
        graph.prune(plan)
    after = model.state_dict()
    assert set(after) == set(before)
    for n, t in before.items():
        assert after[n].shape == t.shape and torch.equal(after[n], t), n
    monkeypatch.undo()
    report = graph.prune(plan)  # the graph is still valid and the same plan now cuts
    assert report.params_after < report.params_before
