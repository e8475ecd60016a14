"""The cut's working parts: blocked gathers, the rollback journal, and the zero-masked reference a cut is
checked against (masked features instead of weight copies, with a fall-back to zeroing weights)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from models import FAMILIES, example_ids, tiny_model
from test_cut import assert_unchanged, snapshot
from torch import nn
from transformers.pytorch_utils import Conv1D

import depgraph
from depgraph import cut as cut_module
from depgraph.activation_mask import masked_activations
from depgraph.cut import reference_output
from depgraph.slicing import gather
from depgraph.transaction import Transaction


@st.composite
def tensors_and_cuts(draw):
    shape = draw(st.lists(st.integers(1, 9), min_size=1, max_size=4))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.int64]))
    x = (torch.arange(int(np.prod(shape))).reshape(shape) * 7 % 101).to(dtype)
    dims = draw(st.lists(st.integers(0, len(shape) - 1), unique=True, min_size=1, max_size=len(shape)))
    cuts = []
    for d in dims:
        keep = sorted(draw(st.sets(st.integers(0, shape[d] - 1), min_size=1, max_size=shape[d])))
        drop = [i for i in range(shape[d]) if i not in keep]
        cuts.append((d, torch.tensor(keep), torch.tensor(drop, dtype=torch.long)))
    return x, cuts


@settings(max_examples=150, deadline=None)
@given(tensors_and_cuts(), st.integers(1, 64))
def test_gather_equals_chained_index_select(case, block):
    x, cuts = case
    expected = x
    for d, keep, _ in cuts:
        expected = expected.index_select(d, keep)
    import depgraph.slicing as slicing

    old = slicing._BLOCK_ELEMENTS
    slicing._BLOCK_ELEMENTS = block  # small blocks: many block boundaries on small tensors
    try:
        out = gather(x, [(d, keep) for d, keep, _ in cuts])
    finally:
        slicing._BLOCK_ELEMENTS = old
    assert out.is_contiguous() and out.dtype == x.dtype and torch.equal(out, expected)
    assert out.data_ptr() != x.data_ptr()


@settings(max_examples=100, deadline=None)
@given(tensors_and_cuts())
def test_cut_data_then_rollback_is_bit_identical(case):
    x, cuts = case
    if not any(drop.numel() for _, _, drop in cuts):
        return
    param = nn.Parameter(x.clone(), requires_grad=False)
    transaction = Transaction()
    transaction.cut_data(param, cuts)
    expected = x
    for d, keep, _ in cuts:
        expected = expected.index_select(d, keep)
    assert torch.equal(param.data, expected)
    transaction.rollback()
    assert param.shape == x.shape and torch.equal(param.data, x)


def _zeroed(module_call, weight, dim, index):
    saved = weight.data.clone()
    with torch.no_grad():
        weight.data.index_fill_(dim, index, 0)
    try:
        return module_call()
    finally:
        weight.data.copy_(saved)


@pytest.mark.parametrize("make, dim, x", [
    (lambda: nn.Linear(6, 5), 1, torch.randn(2, 3, 6)),
    (lambda: nn.Linear(6, 5), 0, torch.randn(2, 3, 6)),
    (lambda: nn.Linear(6, 5, bias=False), 0, torch.randn(3, 6)),
    (lambda: Conv1D(5, 6), 0, torch.randn(2, 3, 6)),
    (lambda: Conv1D(5, 6), 1, torch.randn(2, 3, 6)),
    (lambda: nn.Embedding(7, 5), 1, torch.tensor([[0, 3, 6]])),
])
def test_masked_features_compute_what_zeroed_weights_do(make, dim, x):
    torch.manual_seed(0)
    module = make()
    index = torch.tensor([0, 2, 3])
    with torch.no_grad():
        expected = _zeroed(lambda: module(x), module.weight, dim, index)
        before = x.clone()
        with masked_activations(module, [(module.weight, dim, index)]) as rest:
            got = module(x)
        assert rest == []
        assert torch.equal(got, expected)
        assert torch.equal(x, before)  # the caller's input is not masked in place
        assert torch.equal(module(x), _zeroed(lambda: module(x), module.weight, dim, index[:0]))  # hooks gone


class _OwnForward(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight * 2, self.bias)


def test_slices_the_hooks_cannot_express_are_returned():
    shared = nn.Linear(4, 4)
    twin = _OwnForward(4, 4)
    twin.weight = shared.weight  # one tensor, two modules, one of them not maskable: zero the weight
    model = nn.ModuleDict({"a": shared, "b": twin, "own": _OwnForward(4, 4),
                           "renorm": nn.Embedding(5, 4, max_norm=1.0), "plain": nn.Linear(4, 4)})
    index = torch.tensor([1])
    slices = [(shared.weight, 1, index), (model["own"].weight, 1, index), (model["renorm"].weight, 1, index),
              (model["plain"].bias, 0, index), (model["plain"].weight, 1, index)]
    with masked_activations(model, slices) as rest:
        assert [id(t) for t, _, _ in rest] == [id(shared.weight), id(model["own"].weight),
                                               id(model["renorm"].weight), id(model["plain"].bias)]
        assert model["plain"]._forward_pre_hooks
        model["plain"](torch.randn(1, 4))  # a hooked module must run inside the block
    assert not model["plain"]._forward_pre_hooks


def test_tied_weight_is_masked_in_every_module_that_holds_it():
    torch.manual_seed(0)
    embed, head = nn.Embedding(7, 5), nn.Linear(5, 7, bias=False)
    head.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "head": head})
    ids, index = torch.tensor([[1, 4, 6]]), torch.tensor([0, 3])

    def run():
        return head(embed(ids) + 1.0)  # the head's input is not zero in the masked channels

    with torch.no_grad():
        expected = _zeroed(run, embed.weight, 1, index)
        with masked_activations(model, [(embed.weight, 1, index)]) as rest:
            got = run()
    assert rest == [] and torch.equal(got, expected)


def test_hooks_are_removed_when_the_forward_raises():
    lin = nn.Linear(4, 3)
    with pytest.raises(KeyboardInterrupt):
        with masked_activations(lin, [(lin.weight, 0, torch.tensor([0]))]):
            raise KeyboardInterrupt
    assert not lin._forward_hooks


def _random_exact_plan(graph, seed):
    rng = np.random.default_rng(seed)
    plan = {}
    for group in graph.groups():
        if group.exact and group.size > 1:
            n = max(1, group.size // 4)
            plan[group] = rng.choice(group.size, n, replace=False)
    return plan


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_with_masked_features_equals_zeroing_every_slice(family, monkeypatch):
    model = tiny_model(family)
    graph = depgraph.trace(model, example_ids(model))
    plan = _random_exact_plan(graph, 0)
    if not plan:
        pytest.skip(f"{family}: no exact groups")
    snap = snapshot(model)
    unmaskable = []

    @contextlib.contextmanager
    def spy(model, slices):  # which slices the fast reference still zeroes in the weights
        with masked_activations(model, slices) as rest:
            unmaskable.extend(rest)
            yield rest

    monkeypatch.setattr(cut_module, "masked_activations", spy)
    fast = reference_output(graph, plan)
    full = reference_output(graph, plan, everywhere=True)
    assert_unchanged(model, snap)
    assert fast is not None and full is not None
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    if family != "falcon":  # FalconLinear has its own forward: its weights are zeroed, not hooked
        assert all(t.dim() == 1 for t, _, _ in unmaskable), [tuple(t.shape) for t, _, _ in unmaskable]
    unmasked = depgraph.transaction.run_forward(model, *graph.example_inputs)
    assert not torch.allclose(fast, unmasked)  # the masking did something
    report = depgraph.prune(graph, plan)
    assert report.verified


class _ReadsWeightDirectly(nn.Module):
    """A residual MLP whose parent reads ``down.weight`` itself besides calling ``down``: the hook on ``down``
    runs, but the direct read is not masked."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16, bias=False)
        self.head = nn.Linear(16, 50)

    def forward(self, ids):
        h = self.embed(ids)
        a = torch.relu(self.up(h))
        h = h + F.linear(a, self.down.weight) + 0.0 * self.down(a)
        return self.head(h)


def test_cut_falls_back_to_zeroed_weights_when_the_features_reference_is_wrong():
    torch.manual_seed(0)
    model = _ReadsWeightDirectly().eval()
    ids = torch.randint(0, 50, (1, 6))
    graph = depgraph.trace(model, ids)
    mlp = next(g for g in graph.groups() if any(m.param == "down.weight" for m in g.members) and g.size == 32)
    plan = {mlp: [0, 3, 5, 9]}
    fast, full = reference_output(graph, plan), reference_output(graph, plan, everywhere=True)
    assert not torch.allclose(fast, full)  # the direct read of down.weight was not masked
    expected = full
    depgraph.prune(graph, plan)  # checked against the zeroed weights instead: no false alarm
    torch.testing.assert_close(model(ids), expected)


def test_a_mismatch_with_no_full_reference_to_confirm_is_refused(monkeypatch):
    """Review finding: the retry against the everywhere-zeroed reference must not commit unchecked when that
    reference cannot be computed (e.g. out of memory for its weight copies)."""
    torch.manual_seed(0)
    model = _ReadsWeightDirectly().eval()
    ids = torch.randint(0, 50, (1, 6))
    graph = depgraph.trace(model, ids)
    mlp = next(g for g in graph.groups() if any(m.param == "down.weight" for m in g.members) and g.size == 32)
    real = cut_module._masked_reference

    def no_full_reference(*args, everywhere, **kwargs):
        return None if everywhere else real(*args, everywhere=everywhere, **kwargs)

    monkeypatch.setattr(cut_module, "_masked_reference", no_full_reference)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(depgraph.PruneError, match="does not reproduce zero-masking"):
        depgraph.prune(graph, {mlp: [0, 3, 5, 9]})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snap.items())


def test_modules_with_hooks_of_their_own_are_zeroed_not_hooked():
    """Review finding: a user's forward hook ran before the mask and was overwritten (and a cached tensor it
    returned was written into); such modules now have their weights zeroed."""
    model = tiny_model("llama")
    graph = depgraph.trace(model, example_ids(model))
    down = model.model.layers[0].mlp.down_proj
    cache = {}

    def user_hook(module, args, out):
        cache["out"] = out * 2 + 1
        return cache["out"]

    handle = down.register_forward_hook(user_hook)
    try:
        plan = {g: [0, 1, 2] for g in graph.groups("C")}
        with masked_activations(model, [(down.weight, 0, torch.tensor([0, 1, 2]))]) as rest:
            assert [t for t, _, _ in rest] == [down.weight]
        fast = reference_output(graph, plan)
        held = cache["out"].clone()
        full = reference_output(graph, plan, everywhere=True)
        torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
        assert torch.equal(held, cache["out"])  # both runs gave the user's hook the same (zeroed-weight) output
    finally:
        handle.remove()


def test_a_hooked_module_that_never_runs_falls_back_to_zeroed_weights():
    """Review finding: ``nn.MultiheadAttention`` reads ``out_proj.weight`` without calling ``out_proj``."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(1, 3, 8)
    index = torch.tensor([0, 5])
    with pytest.raises(RuntimeError, match="never called"):
        with masked_activations(mha, [(mha.out_proj.weight, 1, index)]):
            mha(x, x, x)
    assert not mha.out_proj._forward_pre_hooks


@pytest.mark.parametrize("out, ref, ok", [
    ([1.0, float("nan")], [1.0, float("nan")], True),
    ([1.0, float("nan")], [1.0, 2.0], False),
    ([1.0, 2.0], [1.0, float("nan")], False),
    ([1.0, 2.0], [1.0, 2.00001], True),
])
def test_exactness_check_treats_nan_as_a_mismatch_unless_both_are_nan(out, ref, ok):
    group = depgraph.trace(tiny_model("llama")).groups("A")[0]
    check = lambda: cut_module._check_exact(torch.tensor(out), torch.tensor(ref), {group: None})  # noqa: E731
    if ok:
        check()
    else:
        with pytest.raises(depgraph.PruneError):
            check()
