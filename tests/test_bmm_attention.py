"""Attention written without SDPA: ``bmm``/``baddbmm`` on a merged ``[batch*heads]`` axis (XGLM,
TrOCR, Bloom), fixed-index k/v picks from a fused qkv (Falcon-7B multi-query), in-place masking
(XLM), ALiBi slopes (Bloom: frozen), and the ``reshape_as`` rule.

Every model is a tiny random-weight config built from its transformers config class (no download).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import transformers
from torch import nn

import depgraph

IDS = torch.randint(3, 1000, (2, 8), generator=torch.Generator().manual_seed(0))


def build(config_cls: str, model_cls: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()


MODELS = {
    "xglm": ("XGLMConfig", "XGLMForCausalLM", dict(
        d_model=64, ffn_dim=128, num_layers=2, attention_heads=4, vocab_size=1000, max_position_embeddings=128)),
    "xlm": ("XLMConfig", "XLMWithLMHeadModel", dict(
        emb_dim=64, n_layers=2, n_heads=4, vocab_size=1000, max_position_embeddings=128)),
    "roformer": ("RoFormerConfig", "RoFormerForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000,
        max_position_embeddings=128, is_decoder=True)),
    # Falcon-7B layout: one shared k/v head picked from the fused qkv with fixed indices [-2], [-1]
    "falcon7b": ("FalconConfig", "FalconForCausalLM", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000, multi_query=True,
        new_decoder_architecture=False, alibi=False, bias=False)),
}


def tiny(name: str) -> nn.Module:
    config_cls, model_cls, kwargs = MODELS[name]
    return build(config_cls, model_cls, **kwargs)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=IDS)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


def cut_minus_mask(model: nn.Module, group_index: int, units: list[int]) -> float:
    """max |logits(cut) - logits(zero-masked original)| for B group ``group_index``."""
    ref = copy.deepcopy(model)
    graph, graph_ref = depgraph.trace(model, IDS), depgraph.trace(ref, IDS)
    depgraph.zero_mask(graph_ref, {graph_ref.groups("B")[group_index]: units})
    graph.prune({graph.groups("B")[group_index]: units})
    return float((logits(model) - logits(ref)).abs().max())


@pytest.mark.parametrize("name", list(MODELS))
def test_heads_are_b_groups(name):
    model = tiny(name)
    graph = depgraph.trace(model, IDS)
    heads = graph.groups("B")
    assert len(heads) == 2, graph.summary()
    for g in heads:
        assert g.size == 4 and g.exact
        assert all(m.per_unit == 16 or m.per_unit == 1 for m in g.members)  # a head's rows, never head dims
    assert not any("reshape_as" in op or "masked_fill_" in op for op, _ in graph.unknown_ops)


@pytest.mark.parametrize("name", ["xglm", "falcon7b"])
def test_head_cut_equals_zero_mask(name):
    model = tiny(name)
    before = logits(model)
    assert cut_minus_mask(model, 0, [1, 3]) <= 1e-5
    assert logits(model).shape == before.shape


@pytest.mark.parametrize("name", ["xglm", "xlm", "falcon7b"])
def test_quarter_of_every_group_runs(name):
    model = tiny(name)
    graph = depgraph.trace(model, IDS)
    plan = {g: list(range(0, g.size, 4)) for g in graph.groups()}  # a quarter of every A, B, C group
    report = graph.prune(plan)
    assert report.params_after < report.params_before
    assert torch.isfinite(logits(model)).all()


def test_xglm_head_cut_updates_head_counts():
    model = tiny("xglm")
    graph = depgraph.trace(model, IDS)
    group = graph.groups("B")[0]
    attn = model.model.layers[0].self_attn
    assert group.name == "model.layers.0.self_attn"
    assert {m.param.rsplit(".", 2)[-2] for m in group.members} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    graph.prune({group: [0]})
    assert attn.num_heads == 3 and attn.embed_dim == 48 and attn.q_proj.out_features == 48
    assert model.model.layers[1].self_attn.num_heads == 4


def test_falcon_multi_query_keeps_the_shared_kv_head():
    model = tiny("falcon7b")
    graph = depgraph.trace(model, IDS)
    group = graph.groups("B")[0]
    qkv = group.member("transformer.h.0.self_attention.query_key_value.weight", 0)
    # rows [q0 .. q3 | k | v] x 16: the query heads are the units, the k and v rows stay
    assert qkv.unit_of_index.tolist() == np.repeat(np.r_[0:4, -1, -1], 16).tolist()
    graph.prune({group: [2]})
    attn = model.transformer.h[0].self_attention
    assert attn.num_heads == 3 and attn.query_key_value.weight.shape[0] == 80


def test_bloom_alibi_heads_are_frozen():
    # Bloom rebuilds its ALiBi slopes from n_head (an arange) once for all layers: a head cut
    # would need other slopes, so the heads are frozen and say why
    model = build("BloomConfig", "BloomForCausalLM", hidden_size=64, n_layer=2, n_head=4, vocab_size=1000)
    graph = depgraph.trace(model, IDS)
    assert graph.groups("B") == []
    assert [g.name for g in graph.groups("A")] == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    for k in range(2):
        reason = graph.frozen[(f"transformer.h.{k}.self_attention.query_key_value.weight", 0)]
        assert "arange" in reason
    report = graph.prune({g: [0] for g in graph.groups()})  # everything else still cuts
    assert report.params_after < report.params_before


class BmmAttention(nn.Module):
    """Multi-head attention over a merged [batch*heads] axis with a per-head learned bias."""

    def __init__(self, dim: int = 32, num_heads: int = 4):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.head_bias = nn.Parameter(torch.randn(num_heads, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            t = t.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
            return t.reshape(b * self.num_heads, s, self.head_dim)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(self.head_dim)
        scores = scores.view(b, self.num_heads, s, s) + self.head_bias
        probs = scores.softmax(-1).view(b * self.num_heads, s, s)
        out = torch.bmm(probs, v).view(b, self.num_heads, s, self.head_dim).transpose(1, 2)
        return self.o(out.reshape(b, s, self.num_heads * self.head_dim))


def test_bmm_heads_cut_with_their_per_head_parameter():
    torch.manual_seed(0)
    model, x = nn.Sequential(BmmAttention()).eval(), torch.randn(2, 5, 32)
    graph = depgraph.trace(model, example_inputs=x)
    (group,) = graph.groups("B")
    assert group.size == 4
    assert group.member("0.head_bias", 0).unit_of_index.tolist() == [0, 1, 2, 3]
    ref = copy.deepcopy(model)
    graph_ref = depgraph.trace(ref, example_inputs=x)
    depgraph.zero_mask(graph_ref, {graph_ref.groups("B")[0]: [0, 2]})
    graph.prune({group: [0, 2]})
    assert model[0].num_heads == 2 and model[0].head_bias.shape == (2, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


class ReshapeAs(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        pairs = h.view(*h.shape[:-1], -1, 2)
        pairs = pairs * pairs.softmax(-1)  # neighbours mix: a unit is a pair of channels
        return self.down(pairs.reshape_as(h).relu())


def test_reshape_as_is_a_reshape():
    torch.manual_seed(0)
    model, x = ReshapeAs().eval(), torch.randn(2, 5, 16)
    graph = depgraph.trace(model, example_inputs=x)
    assert not any("reshape_as" in op for op, _ in graph.unknown_ops)
    (group,) = [g for g in graph.groups() if any(m.param == "up.weight" and m.dim == 0 for m in g.members)]
    assert group.size == 16 and group.member("up.weight", 0).indices([3]).tolist() == [6, 7]
    assert group.member("down.weight", 1).indices([3]).tolist() == [6, 7]
    ref = copy.deepcopy(model)
    graph_ref = depgraph.trace(ref, example_inputs=x)
    (group_ref,) = [g for g in graph_ref.groups() if g.name == group.name]
    depgraph.zero_mask(graph_ref, {group_ref: [1, 3]})
    graph.prune({group: [1, 3]})
    assert model.up.weight.shape == (28, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_factor_coupling_cap_keeps_unsettled_reshapes_whole(monkeypatch):
    # the loop coupling the factors of coupled reshapes is bounded: on its cap, the reshapes it was still
    # coupling are kept whole with a reason and a warning, never left half-coupled
    import depgraph.graph as dg

    monkeypatch.setattr(dg, "MAX_UNIFY_ROUNDS", 0)
    graph = depgraph.trace(tiny("xglm"), IDS)
    assert not graph.groups("B")
    reason = graph.frozen[("model.layers.0.self_attn.v_proj.weight", 0)]
    assert reason.startswith("unsettled factor coupling at ")
    assert any(w.startswith("model.layers.0.self_attn:") and "kept whole" in w for w in graph.warnings)
    assert graph.groups("A") and graph.groups("C")  # the rest still prunes


def test_multi_output_axes_with_a_leading_none():
    from depgraph.graph import _flat_axes, _parts
    from depgraph.rules.context import Axis, is_multi

    a, b = Axis("x:0", np.arange(3)), Axis("x:1", np.arange(3, 5))
    assert is_multi([None, [a, b]]) and is_multi([[a], []]) and not is_multi([a, b]) and not is_multi([])
    assert _parts([None, [a, b]]) == [[], [a, b]] and _parts([a, b]) == [[a, b]] and _parts(None) == [[]]
    assert _flat_axes([None, [a, b]]) == [a, b]
