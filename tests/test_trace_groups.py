"""Foundation tests for ``depgraph.trace``: the typed groups of every family, their index
mappings (fused layouts included), the networkx view, meta-device tracing, conservative
handling of unknown ops, trace errors, termination on small heads, and the op rules.

Expected numbers are derived from each model's config (``tests/models.py``), never hard-coded.
"""

from __future__ import annotations

import copy
import functools
import logging
import re
import time

import networkx as nx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from models import FAMILIES, dims, example_ids, tiny_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import depgraph

# ---------------------------------------------------------------------------------------------
# helpers


@functools.cache
def traced(family: str):
    """(model, graph) of the tiny model of ``family``, traced once per test session."""
    model = tiny_model(family)
    return model, depgraph.trace(model)


def layer_of(param: str) -> int | None:
    """Index of the decoder/encoder layer a parameter belongs to (``layers.3.`` -> 3)."""
    found = re.search(r"\.(?:layers|layer|h)\.(\d+)\.", param)
    return int(found.group(1)) if found else None


def slots(group) -> set[tuple[str, int]]:
    return {(m.param, m.dim) for m in group.members}


def grouped_slots(graph) -> set[tuple[str, int]]:
    return {s for g in graph.groups() for s in slots(g)}


def signature(graph) -> list:
    """Everything that identifies the groups: kinds, sizes, members and their index -> unit maps."""
    return [(g.kind.value, g.size, [(m.param, m.dim, m.unit_of_index.tolist()) for m in g.members])
            for g in graph.groups()]


def rows(start: int, stop: int) -> list[int]:
    return list(range(start, stop))


def hidden_norms(model: nn.Module, hidden: int) -> list[str]:
    """Weights and biases of every normalisation over the hidden size."""
    found = []
    for name, module in model.named_modules():
        if "norm" not in type(module).__name__.lower():
            continue
        for pname, param in module.named_parameters(recurse=False):
            if param.shape == (hidden,):
                found.append(f"{name}.{pname}")
    return found


def embeddings(model: nn.Module) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}  # canonical name of tied weights
    return [names[id(m.weight)] for m in model.modules() if isinstance(m, nn.Embedding)]


def cut(model: nn.Module, group, units) -> nn.Module:
    """A copy of ``model`` with ``units`` of ``group`` removed (plain parameter slicing)."""
    model = copy.deepcopy(model)
    units = list(units)
    for m in group.members:
        param = model.get_parameter(m.param)
        keep = torch.as_tensor(np.flatnonzero(~np.isin(m.unit_of_index, units)))
        module_name, _, attr = m.param.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        setattr(module, attr, nn.Parameter(param.detach().index_select(m.dim, keep)))
    return model


def silenced(model: nn.Module, group, units) -> nn.Module:
    """A copy of ``model`` where ``units`` of ``group`` are read as zero by their consumers."""
    model = copy.deepcopy(model)
    for m in group.members:
        if m.role == "in":
            idx = torch.as_tensor(m.indices(units))
            with torch.no_grad():
                model.get_parameter(m.param).index_fill_(m.dim, idx, 0.0)
    return model


def assert_exact_cut(model: nn.Module, graph, x: torch.Tensor, group, units, **attrs) -> None:
    """Cutting ``units`` gives the same function as silencing them: the cut is exact.

    ``attrs``: plain attributes of the root module to set on the cut copy (head counts).
    """
    smaller = cut(model, group, units)
    for name, value in attrs.items():
        setattr(smaller, name, value)
    with torch.no_grad():
        want = silenced(model, group, units)(x)
        got = smaller(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the contract example


@pytest.fixture(scope="module")
def contract():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000)
    model = LlamaForCausalLM(config).eval()
    return model, depgraph.trace(model)


def test_contract_group_counts(contract):
    _, graph = contract
    a, b, c = graph.groups("A"), graph.groups("B"), graph.groups("C")
    assert [g.size for g in a] == [128, 128]
    assert [g.size for g in b] == [2, 2]
    assert [g.size for g in c] == [64]
    assert len(graph.groups()) == 5
    assert graph.warnings == []
    for k, g in enumerate(a):
        assert {layer_of(p) for p in g.params} == {k}
        assert slots(g) == {(f"model.layers.{k}.mlp.{n}_proj.weight", d) for n, d in
                            (("gate", 0), ("up", 0), ("down", 1))}
    for k, g in enumerate(b):
        assert slots(g) == {(f"model.layers.{k}.self_attn.{n}_proj.weight", d) for n, d in
                            (("q", 0), ("k", 0), ("v", 0), ("o", 1))}


def test_contract_hidden_group_members(contract):
    model, graph = contract
    (c,) = graph.groups("C")
    want = {("model.embed_tokens.weight", 1), ("lm_head.weight", 1)}
    want |= {(n, 0) for n in hidden_norms(model, 64)}
    for k in range(2):
        pre = f"model.layers.{k}."
        want |= {(pre + "self_attn.o_proj.weight", 0), (pre + "mlp.down_proj.weight", 0)}
        want |= {(pre + f"self_attn.{n}_proj.weight", 1) for n in "qkv"}
        want |= {(pre + f"mlp.{n}_proj.weight", 1) for n in ("gate", "up")}
    assert len(hidden_norms(model, 64)) == 5  # 2 per layer + the final norm
    assert slots(c) == want
    for m in c.members:  # hidden channel i is index i of every member
        assert m.unit_of_index.tolist() == list(range(64))
    # every reduction over the hidden channels is inside a plain RMSNorm: the cut rescales them, exact
    assert c.exact and c.extra["rms_norms"] == sorted(n.rsplit(".", 1)[0] for n in hidden_norms(model, 64))


def test_contract_head_and_neuron_index_mapping(contract):
    _, graph = contract
    b0 = graph.groups("B")[0]
    pre = "model.layers.0.self_attn."
    assert b0.member(pre + "q_proj.weight", 0).indices([0]).tolist() == rows(0, 32)
    assert b0.member(pre + "k_proj.weight", 0).indices([0]).tolist() == rows(0, 16)
    assert b0.member(pre + "v_proj.weight", 0).indices([0]).tolist() == rows(0, 16)
    assert b0.member(pre + "o_proj.weight", 1).indices([0]).tolist() == rows(0, 32)
    assert b0.member(pre + "q_proj.weight", 0).indices([1]).tolist() == rows(32, 64)
    assert b0.member(pre + "k_proj.weight", 0).indices([1]).tolist() == rows(16, 32)
    for a in graph.groups("A"):
        k = layer_of(a.params[0])
        gate, up = (a.member(f"model.layers.{k}.mlp.{n}_proj.weight", 0) for n in ("gate", "up"))
        down = a.member(f"model.layers.{k}.mlp.down_proj.weight", 1)
        for j in (0, 1, 77, 127):
            assert gate.indices([j]).tolist() == [j]
            assert up.indices([j]).tolist() == [j]
            assert down.indices([j]).tolist() == [j]


def test_contract_frozen_and_coupled(contract):
    _, graph = contract
    assert ("model.embed_tokens.weight", 0) in graph.frozen  # vocabulary rows are looked up by data
    assert ("lm_head.weight", 0) in graph.frozen  # logits are the model's interface
    got = graph.coupled("model.layers.1.mlp.down_proj.weight", 5, dim=1)
    assert got == {("model.layers.1.mlp.gate_proj.weight", 0): [5], ("model.layers.1.mlp.up_proj.weight", 0): [5],
                   ("model.layers.1.mlp.down_proj.weight", 1): [5]}


def test_batch_size_of_example_inputs_does_not_change_groups(contract):
    model, graph = contract
    assert signature(depgraph.trace(model, example_ids(model, batch=1, seq=5))) == signature(graph)


# ---------------------------------------------------------------------------------------------
# every family


@pytest.mark.parametrize("family", FAMILIES)
def test_family_group_counts_and_sizes(family):
    model, graph = traced(family)
    d = dims(model.config)
    a, b, c = graph.groups("A"), graph.groups("B"), graph.groups("C")
    assert [g.size for g in a] == [d.intermediate] * d.layers
    assert [g.size for g in b] == [d.attention_units] * d.layers
    assert [g.size for g in c] == [d.hidden]
    assert graph.warnings == []
    # one A and one B group per layer, never mixing layers
    for kind in (a, b):
        assert [{layer_of(p) for p in g.params} for g in kind] == [{k} for k in range(d.layers)]
    # no parameter slice belongs to two groups
    seen = [s for g in graph.groups() for s in slots(g)]
    assert len(seen) == len(set(seen))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_hidden_group_holds_norms_and_embeddings(family):
    model, graph = traced(family)
    d = dims(model.config)
    (c,) = graph.groups("C")
    norms = hidden_norms(model, d.hidden)
    assert len(norms) >= d.layers + 1
    want = {(n, 0) for n in norms} | {(e, 1) for e in embeddings(model)}
    assert want <= slots(c)
    for m in c.members:
        assert m.per_unit == 1 and sorted(m.unit_of_index.tolist()) == list(range(d.hidden))


@pytest.mark.parametrize("family", [f for f in FAMILIES if f in
                                    ("llama", "llama_mha", "mistral", "qwen2", "qwen3", "gemma2", "opt", "phi",
                                     "bert")])
def test_family_separate_qkv_head_mapping(family):
    model, graph = traced(family)
    d = dims(model.config)
    names = {"bert": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
             "opt": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
             "phi": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense")}
    q, k, v, o = names.get(family, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"))
    per_q = d.queries_per_kv * d.head_dim
    for layer, g in enumerate(graph.groups("B")):
        pre = next(p for p in g.params if p.endswith(q + ".weight")).removesuffix(q + ".weight")
        assert layer_of(pre + "x") == layer
        for u in range(g.size):
            assert g.member(pre + q + ".weight", 0).indices([u]).tolist() == rows(u * per_q, (u + 1) * per_q)
            assert g.member(pre + o + ".weight", 1).indices([u]).tolist() == rows(u * per_q, (u + 1) * per_q)
            for kv in (k, v):
                got = g.member(pre + kv + ".weight", 0).indices([u]).tolist()
                assert got == rows(u * d.head_dim, (u + 1) * d.head_dim)
                if model.get_submodule(pre + kv).bias is not None:  # qwen2 / opt / phi / bert biases
                    assert g.member(pre + kv + ".bias", 0).indices([u]).tolist() == got


def test_qwen3_head_norms_stay_whole():
    model, graph = traced("qwen3")
    d = dims(model.config)
    for k in range(d.layers):
        for n in ("q_norm", "k_norm"):
            name = f"model.layers.{k}.self_attn.{n}.weight"
            assert model.get_parameter(name).shape == (d.head_dim,)
            assert (name, 0) in graph.frozen  # shared by every head: cut with no head
            assert (name, 0) not in grouped_slots(graph)


def test_gemma_multi_query_units_are_query_heads():
    model, graph = traced("gemma")
    d = dims(model.config)
    assert d.kv_heads == 1 and d.head_dim * d.heads != d.hidden  # head_dim is not hidden / heads
    for k, g in enumerate(graph.groups("B")):
        pre = f"model.layers.{k}.self_attn."
        assert slots(g) == {(pre + "q_proj.weight", 0), (pre + "o_proj.weight", 1)}
        assert g.member(pre + "q_proj.weight", 0).indices([2]).tolist() == rows(2 * d.head_dim, 3 * d.head_dim)
        for n in ("k_proj", "v_proj"):  # the one shared KV head is never cut
            assert (pre + n + ".weight", 0) in graph.frozen
    # tied, scaled embedding: the embedding table is both the input and the output projection
    (c,) = graph.groups("C")
    assert ("model.embed_tokens.weight", 1) in slots(c)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_phi3_fused_gate_up_and_qkv_mapping():
    model, graph = traced("phi3")
    d = dims(model.config)
    inter = d.intermediate
    for k, a in enumerate(graph.groups("A")):
        gate_up = a.member(f"model.layers.{k}.mlp.gate_up_proj.weight", 0)
        down = a.member(f"model.layers.{k}.mlp.down_proj.weight", 1)
        assert gate_up.unit_of_index.shape == (2 * inter,)
        for j in (0, 1, inter // 2, inter - 1):
            assert gate_up.indices([j]).tolist() == [j, inter + j]
            assert down.indices([j]).tolist() == [j]
    q_size, kv_size = d.heads * d.head_dim, d.kv_heads * d.head_dim
    per_q = d.queries_per_kv * d.head_dim
    for k, b in enumerate(graph.groups("B")):
        qkv = b.member(f"model.layers.{k}.self_attn.qkv_proj.weight", 0)
        o = b.member(f"model.layers.{k}.self_attn.o_proj.weight", 1)
        for u in range(d.kv_heads):
            hd = d.head_dim
            assert qkv.indices([u]).tolist() == (rows(u * per_q, (u + 1) * per_q)
                                                 + rows(q_size + u * hd, q_size + (u + 1) * hd)
                                                 + rows(q_size + kv_size + u * hd, q_size + kv_size + (u + 1) * hd))
            assert o.indices([u]).tolist() == rows(u * per_q, (u + 1) * per_q)


def test_gpt2_fused_c_attn_conv1d_mapping():
    model, graph = traced("gpt2")
    d = dims(model.config)
    hd, h = d.head_dim, d.hidden
    for k, b in enumerate(graph.groups("B")):
        pre = f"transformer.h.{k}.attn."
        # Conv1D stores [in, out]: the fused q|k|v outputs are columns (dim 1)
        assert model.get_parameter(pre + "c_attn.weight").shape == (h, 3 * h)
        assert slots(b) == {(pre + "c_attn.weight", 1), (pre + "c_attn.bias", 0), (pre + "c_proj.weight", 0)}
        for u in range(d.heads):
            want = rows(u * hd, (u + 1) * hd) + rows(h + u * hd, h + (u + 1) * hd) + rows(2 * h + u * hd,
                                                                                          2 * h + (u + 1) * hd)
            assert b.member(pre + "c_attn.weight", 1).indices([u]).tolist() == want
            assert b.member(pre + "c_attn.bias", 0).indices([u]).tolist() == want
            assert b.member(pre + "c_proj.weight", 0).indices([u]).tolist() == rows(u * hd, (u + 1) * hd)
    for k, a in enumerate(graph.groups("A")):
        pre = f"transformer.h.{k}.mlp."
        assert slots(a) == {(pre + "c_fc.weight", 1), (pre + "c_fc.bias", 0), (pre + "c_proj.weight", 0)}
        assert a.member(pre + "c_fc.weight", 1).indices([9]).tolist() == [9]
    assert ("transformer.wpe.weight", 0) in graph.frozen and ("transformer.wte.weight", 0) in graph.frozen


def test_gpt_neox_per_head_interleaved_qkv_mapping():
    model, graph = traced("gpt_neox")
    d = dims(model.config)
    hd = d.head_dim
    for k, b in enumerate(graph.groups("B")):
        pre = f"gpt_neox.layers.{k}.attention."
        for u in range(d.heads):  # rows are [head0: q k v, head1: q k v, ...]
            assert b.member(pre + "query_key_value.weight", 0).indices([u]).tolist() == rows(3 * u * hd,
                                                                                            3 * (u + 1) * hd)
            assert b.member(pre + "query_key_value.bias", 0).indices([u]).tolist() == rows(3 * u * hd,
                                                                                          3 * (u + 1) * hd)
            assert b.member(pre + "dense.weight", 1).indices([u]).tolist() == rows(u * hd, (u + 1) * hd)
    # parallel residual: attention and MLP read the same input norm output and write the same stream
    (c,) = graph.groups("C")
    assert {(f"gpt_neox.layers.{k}.attention.dense.weight", 0) for k in range(d.layers)} <= slots(c)
    assert {(f"gpt_neox.layers.{k}.mlp.dense_4h_to_h.weight", 0) for k in range(d.layers)} <= slots(c)


def test_falcon_grouped_fused_qkv_mapping():
    model, graph = traced("falcon")
    d = dims(model.config)
    per_kv = (d.queries_per_kv + 2) * d.head_dim  # [kv heads, q per kv + k + v, head_dim]
    per_q = d.queries_per_kv * d.head_dim
    for k, b in enumerate(graph.groups("B")):
        pre = f"transformer.h.{k}.self_attention."
        for u in range(d.kv_heads):
            assert b.member(pre + "query_key_value.weight", 0).indices([u]).tolist() == rows(u * per_kv,
                                                                                            (u + 1) * per_kv)
            assert b.member(pre + "dense.weight", 1).indices([u]).tolist() == rows(u * per_q, (u + 1) * per_q)


def test_bert_post_norm_encoder():
    model, graph = traced("bert")
    d = dims(model.config)
    (c,) = graph.groups("C")
    for k in range(d.layers):  # post-norm: both residual norms of every layer are hidden channels
        pre = f"bert.encoder.layer.{k}."
        assert {(pre + "attention.output.LayerNorm.weight", 0), (pre + "output.LayerNorm.weight", 0),
                (pre + "attention.output.dense.weight", 0), (pre + "output.dense.weight", 0)} <= slots(c)
    assert {("bert.embeddings.LayerNorm.weight", 0), ("bert.embeddings.position_embeddings.weight", 1),
            ("bert.embeddings.token_type_embeddings.weight", 1)} <= slots(c)


def test_falcon_7b_layout_never_cuts_head_dims():
    # multi-query fused qkv picks k and v with a fixed index ([-2], [-1]): the shared k/v head is
    # kept, the query heads are units. Head dims must never become the unit (default sdpa scale
    # 1/sqrt(head_dim), rotary pairs)
    model = tiny_model("falcon", new_decoder_architecture=False, multi_query=True)
    graph = depgraph.trace(model)
    d = dims(model.config)
    assert [g.size for g in graph.groups("A")] == [d.intermediate] * d.layers
    for g in graph.groups():
        assert len({layer_of(p) for p in g.params if layer_of(p) is not None}) <= 1 or g.kind.value == "C"
        assert not any("query_key_value" in p for p in g.params) or g.kind.value in "BC"
    for g in graph.groups("B"):
        assert g.size == d.heads
        qkv = next(m for m in g.members if "query_key_value" in m.param)
        assert qkv.per_unit == d.head_dim
        assert (qkv.unit_of_index[-2 * d.head_dim:] == -1).all()  # the k and v rows stay


def test_falcon_alibi_heads_are_not_prunable():
    # ALiBi slopes are rebuilt from num_heads (an arange): no head may be cut, and the bias that
    # every layer shares must not tie the heads of different layers into one group
    model = tiny_model("falcon", new_decoder_architecture=False, multi_query=False, num_kv_heads=4, alibi=True)
    graph = depgraph.trace(model)
    d = dims(model.config)
    assert graph.groups("B") == []
    assert [g.size for g in graph.groups("A")] == [d.intermediate] * d.layers
    for k in range(d.layers):
        assert (f"transformer.h.{k}.self_attention.query_key_value.weight", 0) in graph.frozen


# ---------------------------------------------------------------------------------------------
# networkx view, meta device


def node_of(graph, tensor: str, dim: int) -> str:
    found = [n for n, a in graph.nx.nodes(data=True) if a["tensor"] == tensor and a["dim"] == dim
             and a["kind"] in ("param", "buffer")]
    assert len(found) == 1, (tensor, dim, found)
    return found[0]


def test_nx_graph_holds_every_parameter_dim(contract):
    model, graph = contract
    g = graph.nx
    assert isinstance(g, nx.DiGraph) and g.is_directed()
    present = {(a["tensor"], a["dim"]) for _, a in g.nodes(data=True) if a["kind"] in ("param", "buffer")}
    for name, p in model.named_parameters():
        for d in range(p.dim()):
            assert (name, d) in present
    assert set(graph.param_shapes) >= {n for n, _ in model.named_parameters()}


def test_nx_algorithms_run(contract):
    _, graph = contract
    g = graph.nx
    emb, head = node_of(graph, "model.embed_tokens.weight", 1), node_of(graph, "lm_head.weight", 1)
    assert nx.has_path(g, emb, head)
    path = nx.shortest_path(g, emb, head)
    assert len(path) > 3
    comps = list(nx.weakly_connected_components(g))
    assert 1 < len(comps) < g.number_of_nodes()
    same = next(c for c in comps if emb in c)
    assert head in same
    # an MLP neuron space is one weakly connected channel space, labelled with its group
    mlp = [node_of(graph, f"model.layers.0.mlp.{n}", d) for n, d in
           (("gate_proj.weight", 0), ("up_proj.weight", 0), ("down_proj.weight", 1))]
    space = next(c for c in comps if mlp[0] in c)
    assert set(mlp) <= space and emb not in space
    assert {g.nodes[n]["group_kind"] for n in mlp} == {"A"} and g.nodes[emb]["group_kind"] == "C"
    assert {g.nodes[n]["group"] for n in mlp} == {"model.layers.0.mlp"}


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_meta_device_gives_the_same_groups(family):
    _, graph = traced(family)
    meta = tiny_model(family, device="meta")
    assert next(meta.parameters()).device.type == "meta"
    assert signature(depgraph.trace(meta)) == signature(graph)


# ---------------------------------------------------------------------------------------------
# plain modules, unknown ops, errors


def test_plain_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(4, 16)
    graph = depgraph.trace(model, example_inputs=x)
    (a,) = graph.groups()
    assert a.kind.value == "A" and a.size == 32 and a.exact
    assert slots(a) == {("0.weight", 0), ("0.bias", 0), ("2.weight", 1)}
    assert a.member("0.weight", 0).indices([5]).tolist() == [5] and a.member("2.weight", 1).indices([5]).tolist() == [5]
    for s in (("0.weight", 1), ("2.weight", 0), ("2.bias", 0)):  # the interface is not prunable
        assert s in graph.frozen
    assert a.parameter_count() == 16 + 1 + 8
    assert_exact_cut(model, graph, x, a, [3, 17])


@torch.library.custom_op("depgraph_tests::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    """An op no rule knows (guaranteed: it only exists in this test module)."""
    return x.flip(-1) * 1.5


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


class Mystery(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        return mystery(x) if self.kind == "custom" else torch.roll(x, 1, dims=-1)


class WithUnknownOp(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.up, self.block, self.down = nn.Linear(16, 32), Mystery(kind), nn.Linear(32, 8)
        self.side_up, self.side_down = nn.Linear(16, 24), nn.Linear(24, 8)

    def forward(self, x):
        return self.down(self.block(F.relu(self.up(x)))) + self.side_down(F.relu(self.side_up(x)))


@pytest.mark.parametrize("kind,op", [("custom", "depgraph_tests.mystery"), ("roll", "aten.roll")])
def test_unknown_op_is_conservative_and_reported(kind, op, caplog):
    torch.manual_seed(0)
    model = WithUnknownOp(kind)
    with caplog.at_level(logging.WARNING, logger="depgraph"):
        graph = depgraph.trace(model, example_inputs=torch.randn(2, 16))
    # the rest of the model is still analysed
    (a,) = graph.groups()
    assert a.size == 24 and slots(a) == {("side_up.weight", 0), ("side_up.bias", 0), ("side_down.weight", 1)}
    # every channel the unknown op touched is out of every group
    for s in (("up.weight", 0), ("up.bias", 0), ("down.weight", 1)):
        assert s not in grouped_slots(graph)
        assert s in graph.frozen and op in graph.frozen[s]
    assert graph.warnings and all(op in w and "block" in w for w in graph.warnings)
    assert any(op in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert any(op in o and "block" in where for o, where in graph.unknown_ops)


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow
            return x * 2
        return x - 1


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.fc(x))


def test_untraceable_model_names_module_and_what_to_try():
    with pytest.raises(depgraph.TraceError) as err:
        depgraph.trace(Branchy(), example_inputs=torch.randn(2, 8))
    msg = str(err.value)
    assert "gate (Gate)" in msg and "Branchy" in msg
    assert "Try" in msg and "example_inputs" in msg and "control flow" in msg


@pytest.mark.parametrize("bad", ["tokens", 3, 2.5, {1, 2}])
def test_wrong_example_inputs_type(bad):
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(depgraph.TraceError, match="example_inputs"):
        depgraph.trace(model, example_inputs=bad)


@pytest.mark.parametrize("bad", [lambda x: x, nn.Linear, "model", None])
def test_not_a_module(bad):
    with pytest.raises(depgraph.TraceError, match="nn.Module"):
        depgraph.trace(bad)


def test_no_config_and_no_inputs():
    with pytest.raises(depgraph.TraceError, match="example_inputs"):
        depgraph.trace(nn.Sequential(nn.Linear(8, 8)))


# ---------------------------------------------------------------------------------------------
# termination on small heads (property test; example count comes from the conftest profile)


@given(head_dim=st.sampled_from([2, 4]), kv=st.sampled_from([1, 2, 4]), per_kv=st.sampled_from([1, 2, 4]),
       inter=st.integers(2, 40))
def test_small_heads_terminate_with_expected_counts(head_dim, kv, per_kv, inter):
    # sizes may coincide with each other and with the example batch (2) / sequence (8): the
    # rules must align dimensions by position, never by size
    layers = 1
    heads = kv * per_kv
    if heads < 2:
        heads, per_kv = 2 * kv, 2
    config = LlamaConfig(hidden_size=heads * head_dim, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=64,
                         max_position_embeddings=32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    start = time.perf_counter()
    graph = depgraph.trace(model)
    assert time.perf_counter() - start < 60
    d = dims(config)
    assert [g.size for g in graph.groups("A")] == [inter] * layers
    assert [g.size for g in graph.groups("B")] == [d.attention_units] * layers
    assert [g.size for g in graph.groups("C")] == [heads * head_dim]
    assert graph.warnings == []


# ---------------------------------------------------------------------------------------------
# op rules (each case has a shape of code that the rules once coupled wrongly or not at all)


class Pipe(nn.Module):
    """up (16 -> n) -> body -> down (m -> 8): the units of the middle are what the rule decides."""

    def __init__(self, body, n: int = 32, m: int | None = None):
        super().__init__()
        self.up, self.down, self.body = nn.Linear(16, n), nn.Linear(m or n, 8), body

    def forward(self, x):
        return self.down(self.body(self.up(x)))


def pipe_graph(body, n: int = 32, m: int | None = None, shape=(2, 5, 16)):
    torch.manual_seed(0)
    model = Pipe(body, n, m).eval()
    x = torch.randn(*shape)
    return model, depgraph.trace(model, example_inputs=x), x


def middle(graph):
    groups = [g for g in graph.groups() if ("up.weight", 0) in slots(g)]
    return groups[0] if groups else None


def test_chunk_pieces_are_cut_together():
    # two halves used separately: after a cut chunk(2) splits in the middle again, so a unit
    # must hold index j of both halves (or the halves slide against the weights)
    class Halves(nn.Module):
        def forward(self, h):
            a, b = h.chunk(2, dim=-1)
            return torch.cat([torch.relu(a), torch.tanh(b)], -1)

    model, graph, x = pipe_graph(Halves())
    g = middle(graph)
    assert g.size == 16 and graph.warnings == []
    assert g.member("up.weight", 0).indices([3]).tolist() == [3, 19]
    assert g.member("down.weight", 1).indices([3]).tolist() == [3, 19]
    assert_exact_cut(model, graph, x, g, [3, 10])


def test_split_by_size_pieces_are_cut_together():
    class Thirds(nn.Module):
        def forward(self, h):
            a, b, c = h.split(h.shape[-1] // 3, dim=-1)
            return torch.cat([a.sigmoid(), b, c.tanh()], -1)

    model, graph, x = pipe_graph(Thirds(), n=36)
    g = middle(graph)
    assert g.size == 12
    assert g.member("up.weight", 0).indices([1]).tolist() == [1, 13, 25]
    assert_exact_cut(model, graph, x, g, [0, 11])


def test_split_with_explicit_sizes_keeps_pieces_independent():
    class Uneven(nn.Module):
        def forward(self, h):
            a, b = h.split([20, 12], dim=-1)
            return torch.cat([a.relu(), b.tanh()], -1)

    _, graph, _ = pipe_graph(Uneven())
    # unlike chunk, the pieces are not tied index by index ...
    assert graph.coupled("up.weight", 0, 0)[("up.weight", 0)] == [0]
    # ... but their lengths are literals no cut updates: a cut would break the split, so none is made
    assert middle(graph) is None and "written in the code" in graph.frozen[("up.weight", 0)]


def test_uneven_chunk_freezes_the_axis():
    class Ragged(nn.Module):
        def forward(self, h):
            a, b, c = h.chunk(3, dim=-1)  # 11 + 11 + 10: no cut keeps the pieces aligned
            return torch.cat([a.relu(), b, c.tanh()], -1)

    _, graph, _ = pipe_graph(Ragged(), n=32)
    assert middle(graph) is None and ("up.weight", 0) in graph.frozen


def test_stack_interleaved_rotary_pairs():
    class RotateEveryTwo(nn.Module):  # GPT-J / CodeGen style rotary
        def forward(self, h):
            h1, h2 = h[..., ::2], h[..., 1::2]
            return h * torch.stack((-h2, h1), dim=-1).flatten(-2)

    model, graph, x = pipe_graph(RotateEveryTwo())
    g = middle(graph)
    assert graph.warnings == []
    assert g.size == 16 and g.member("up.weight", 0).indices([5]).tolist() == [10, 11]
    assert_exact_cut(model, graph, x, g, [0, 5])


def test_slices_with_negative_none_and_step_bounds():
    class Halves(nn.Module):
        def forward(self, h):
            return h[..., -16:] * h[..., :16] + h[..., 16:] * h[..., None:16:1]

    model, graph, x = pipe_graph(Halves(), n=32, m=16)
    g = middle(graph)
    assert g.size == 16 and g.member("up.weight", 0).indices([2]).tolist() == [2, 18]
    assert g.member("down.weight", 1).indices([2]).tolist() == [2]


def test_squeeze_unsqueeze_round_trip():
    class Dims(nn.Module):
        def forward(self, h):
            return h.unsqueeze(1).unsqueeze(-2).squeeze(-2).squeeze(1).relu()

    model, graph, x = pipe_graph(Dims())
    assert middle(graph).size == 32 and graph.warnings == []


@pytest.mark.parametrize("how", ["norm", "vector_norm", "kthvalue", "max"])
def test_reductions_read_dim_by_name(how):
    # norm(h, 2, dim) and kthvalue(h, k, dim) have an int before ``dim``: it is not the dim
    class OverSequence(nn.Module):
        def forward(self, h):  # [B, S, 32] -> [B, 32]
            if how == "norm":
                return torch.norm(h, 2, dim=1)
            if how == "vector_norm":
                return torch.linalg.vector_norm(h, 2, dim=1)
            if how == "kthvalue":
                return h.kthvalue(2, dim=1).values
            return h.max(dim=1).values

    model, graph, x = pipe_graph(OverSequence())
    assert graph.warnings == []
    g = middle(graph)
    assert g is not None and g.size == 32 and ("down.weight", 1) in slots(g)


def test_var_mean_is_a_reduction():
    class Standardise(nn.Module):
        def forward(self, h):
            var, mean = torch.var_mean(h, dim=-1, keepdim=True)
            return (h - mean) / (var + 1e-5).sqrt()

    _, graph, _ = pipe_graph(Standardise())
    assert graph.warnings == []
    assert middle(graph).size == 32


def test_type_as_does_not_couple_its_dtype_source():
    class Three(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)

        def forward(self, x):
            h = self.a(x).relu().type_as(self.c.weight)  # c.weight only lends its dtype
            return self.c(self.b(h).relu())

    torch.manual_seed(0)
    graph = depgraph.trace(Three(), example_inputs=torch.randn(2, 16))
    assert [g.size for g in graph.groups("A")] == [32, 32]
    assert ("c.weight", 1) not in slots(graph.groups("A")[0])


def test_index_with_tensor_passes_untouched_axes():
    class Route(nn.Module):  # MoE-style token gather: rows chosen by data, channels untouched
        def forward(self, h):
            tokens = h.reshape(-1, h.shape[-1])
            return tokens[torch.tensor([0, 3, 4])].relu()

    model, graph, x = pipe_graph(Route())
    assert graph.warnings == []
    assert middle(graph).size == 32


def test_index_select_passes_untouched_axes():
    class Pick(nn.Module):
        def forward(self, h):
            return torch.index_select(h, 1, torch.tensor([0, 2])).relu()

    _, graph, _ = pipe_graph(Pick())
    assert graph.warnings == [] and middle(graph).size == 32


def test_index_on_channels_freezes_them():
    class PickChannels(nn.Module):
        def forward(self, h):
            return h[..., torch.tensor([0, 2, 4, 6])]

    _, graph, _ = pipe_graph(PickChannels(), m=4)
    assert middle(graph) is None and ("up.weight", 0) in graph.frozen


def test_einsum_contracts_and_keeps_letters():
    class Ein(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(24, 32) / 6)

        def forward(self, h):
            return torch.einsum("bsd,ed->bse", h.relu(), self.w)

    model, graph, x = pipe_graph(Ein(), m=24)
    assert graph.warnings == []
    g = next(g for g in graph.groups() if ("up.weight", 0) in slots(g))
    assert ("body.w", 1) in slots(g) and g.size == 32
    assert any(("body.w", 0) in slots(h) for h in graph.groups())
    assert_exact_cut(model, graph, x, g, [4])


def test_positional_tables_built_in_forward_freeze_channels():
    class Sinusoid(nn.Module):  # rebuilt from the width after a cut: not a sub-table of the old one
        def forward(self, h):
            return (h + torch.sin(torch.arange(h.shape[-1]) * 0.3)).relu()

    _, graph, _ = pipe_graph(Sinusoid())
    assert middle(graph) is None and "arange" in graph.frozen[("up.weight", 0)]


# ---- attention head couplings ---------------------------------------------------------------


class GQA(nn.Module):
    """q/k/v projections + sdpa with 4 query heads over 2 KV heads, expanded in one of four ways."""

    def __init__(self, how: str, heads: int = 4, kv: int = 2, hd: int = 8, scale: float | None = 0.35):
        super().__init__()
        self.how, self.heads, self.kv, self.hd, self.scale = how, heads, kv, hd, scale
        self.q, self.k, self.v = nn.Linear(32, heads * hd), nn.Linear(32, kv * hd), nn.Linear(32, kv * hd)
        self.o = nn.Linear(heads * hd, 32)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        k = self.k(x).view(b, s, self.kv, self.hd).transpose(1, 2)
        v = self.v(x).view(b, s, self.kv, self.hd).transpose(1, 2)
        n = self.heads // self.kv
        extra = {}
        if self.how == "enable_gqa":
            extra["enable_gqa"] = True
        elif self.how == "repeat_interleave":
            k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
        elif self.how == "expand":  # transformers' repeat_kv
            k, v = (t[:, :, None].expand(b, self.kv, n, s, self.hd).reshape(b, self.heads, s, self.hd)
                    for t in (k, v))
        elif self.how == "repeat":  # tiles: query head i reads KV head i % kv
            k, v = k.repeat(1, n, 1, 1), v.repeat(1, n, 1, 1)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale, **extra)
        return self.o(out.transpose(1, 2).reshape(b, s, -1))


@pytest.mark.parametrize("how", ["enable_gqa", "repeat_interleave", "expand", "repeat"])
def test_grouped_query_heads(how):
    torch.manual_seed(0)
    model = GQA(how).eval()
    x = torch.randn(2, 6, 32)
    graph = depgraph.trace(model, example_inputs=x)
    (b,) = graph.groups("B")
    assert b.size == 2 and graph.warnings == []
    q, k, o = b.member("q.weight", 0), b.member("k.weight", 0), b.member("o.weight", 1)
    kv_of_query_head = [i // 2 for i in range(4)] if how != "repeat" else [i % 2 for i in range(4)]
    for u in range(2):
        heads = [i for i in range(4) if kv_of_query_head[i] == u]
        assert q.indices([u]).tolist() == [i * 8 + j for i in heads for j in range(8)]
        assert o.indices([u]).tolist() == q.indices([u]).tolist()
        assert k.indices([u]).tolist() == rows(u * 8, (u + 1) * 8)
    assert_exact_cut(model, graph, x, b, [1], heads=2, kv=1)


@pytest.mark.parametrize("scale", [None, 0.35])
def test_head_dims_are_never_units(scale):
    # with the default scale 1/sqrt(head_dim) a head-dim cut would rescale every score; and the
    # modules' head reshapes hard-code head_dim either way
    torch.manual_seed(0)
    graph = depgraph.trace(GQA("enable_gqa", scale=scale).eval(), example_inputs=torch.randn(2, 6, 32))
    assert [g.size for g in graph.groups("B")] == [2]  # heads stay prunable
    assert not any(g.size == 8 for g in graph.groups())


def test_attention_einsum_marks_heads():
    class EinsumAttention(GQA):
        def forward(self, x):
            b, s, _ = x.shape
            q = self.q(x).view(b, s, self.heads, self.hd)
            k = self.k(x).view(b, s, self.heads, self.hd)
            v = self.v(x).view(b, s, self.heads, self.hd)
            probs = torch.einsum("bqhd,bkhd->bhqk", q, k).softmax(-1)
            return self.o(torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, -1))

    torch.manual_seed(0)
    model = EinsumAttention("mha", heads=4, kv=4).eval()
    x = torch.randn(2, 6, 32)
    graph = depgraph.trace(model, example_inputs=x)
    (b,) = graph.groups("B")
    assert b.size == 4 and graph.warnings == []
    assert b.member("v.weight", 0).indices([2]).tolist() == rows(16, 24)
    assert_exact_cut(model, graph, x, b, [0, 3], heads=2)


def test_reshape_as_ties_its_axes_to_the_other_tensor():
    # like view_as: the sizes come from ``other`` at run time, so ``other``'s channels must match the result's
    class ReshapeAs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.o = nn.Linear(8, 4), nn.Linear(8, 12), nn.Linear(12, 8)

        def forward(self, x):
            y = self.b(x[:, 0])  # [2, 12]: lends its shape
            z = self.a(x).reshape_as(y)  # [2, 3, 4] -> [2, 12]
            return self.o(z), y.sum()

    graph = depgraph.trace(ReshapeAs().eval(), example_inputs=(torch.randn(2, 3, 8),))
    assert not graph.groups()  # cutting b's rows alone would break the reshape
    assert ("b.weight", 0) in graph.frozen
