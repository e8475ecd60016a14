"""Multi-head latent attention (DeepSeek-V2/V3 style): heads, q/kv latent ranks, rope/nope splits.

MLA projects the hidden state to a q latent (``q_lora_rank``) and a kv latent (``kv_lora_rank``,
plus a rope key shared by every head), normalises each latent with an RMSNorm and projects them
back up to the heads. Heads are B groups (cut == zero-mask exactly); each latent is an A group
flagged ``extra["latent"]`` whose cut updates ``q_lora_rank`` / ``kv_lora_rank``; it is approximate
(the RMSNorm averages over the latent).
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn

import depgraph
from depgraph.groups import GroupKind
from depgraph.sizes import rank_names_layer, rank_stem

MLA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
           q_lora_rank=32, kv_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
           vocab_size=500, max_position_embeddings=64, n_routed_experts=4, num_experts_per_tok=2,
           moe_intermediate_size=32, n_group=1, topk_group=1, first_k_dense_replace=1)


def tiny_mla(family: str = "deepseek_v3", **overrides) -> nn.Module:
    config_cls, model_cls = {"deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
                             "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM")}[family]
    kwargs = dict(MLA, **overrides)
    if family == "deepseek_v2":  # no group-limited routing fields
        kwargs.pop("n_group")
        kwargs.pop("topk_group")
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()


IDS = torch.randint(3, 500, (2, 8), generator=torch.Generator().manual_seed(0))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, use_cache=False).logits


def attention(model: nn.Module, layer: int) -> nn.Module:
    return model.model.layers[layer].self_attn


def latent_group(graph, layer: int, proj: str):
    """The latent group of ``layer`` whose producer is ``proj`` (``q_a_proj`` / ``kv_a_proj_with_mqa``)."""
    return next(g for g in graph.groups("A") if g.extra.get("latent")
                and any(m.param == f"model.layers.{layer}.self_attn.{proj}.weight" for m in g.members))


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2"])
def test_mla_groups_heads_and_latents(family):
    graph = depgraph.trace(tiny_mla(family))
    assert not graph.warnings
    heads = graph.groups("B")
    assert len(heads) == 2 and all(g.size == 4 and g.exact for g in heads)
    members = {(m.param.rsplit(".", 2)[-2], m.dim, m.role, m.per_unit) for m in heads[0].members}
    # per head: 24 q rows (nope + rope), 32 kv_b rows (k nope + v), 16 o_proj columns
    assert members == {("q_b_proj", 0, "out", 24), ("kv_b_proj", 0, "out", 32), ("o_proj", 1, "in", 16)}
    kv = latent_group(graph, 0, "kv_a_proj_with_mqa")
    q = latent_group(graph, 0, "q_a_proj")
    assert kv.kind is GroupKind.A and q.kind is GroupKind.A
    assert kv.size == 24 and q.size == 32
    assert not kv.exact and not q.exact  # the latent RMSNorms average over the units
    # the shared rope key (rows kv_lora_rank..) is head_dim: never a unit
    rows = kv.member("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", 0)
    assert rows.indices().tolist() == list(range(24))
    assert not any(g.extra.get("latent") for g in graph.groups("A") if "mlp" in g.name)


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2"])
def test_mla_head_cut_equals_zero_mask(family):
    model = tiny_mla(family)
    reference = copy.deepcopy(model)
    graph, ref_graph = depgraph.trace(model), depgraph.trace(reference)
    group, ref_group = graph.groups("B")[0], ref_graph.groups("B")[0]
    depgraph.zero_mask(ref_graph, {ref_group: [1]})
    graph.prune({group: [1]})
    assert float((logits(model) - logits(reference)).abs().max()) <= 1e-5
    attn = attention(model, 0)
    assert attn.num_heads == 3 and attn.q_b_proj.out_features == 3 * 24 and attn.o_proj.in_features == 3 * 16
    assert attention(model, 1).num_heads == 4  # layer 1 untouched: it keeps its own config copy
    assert attn.config.num_attention_heads == 3 and attention(model, 1).config.num_attention_heads == 4


def test_mla_latent_cut_updates_rank_per_layer(tmp_path):
    model = tiny_mla()
    graph = depgraph.trace(model)
    kv, q = latent_group(graph, 0, "kv_a_proj_with_mqa"), latent_group(graph, 0, "q_a_proj")
    graph.prune({kv: [0, 5, 9], q: [3]})
    attn = attention(model, 0)
    assert attn.kv_lora_rank == 21 and attn.q_lora_rank == 31
    assert attn.kv_a_proj_with_mqa.out_features == 21 + 8  # latent + the untouched rope key
    assert attn.config.kv_lora_rank == 21 and attn.config.q_lora_rank == 31
    assert attention(model, 1).kv_lora_rank == 24 and model.config.kv_lora_rank == 24
    out = logits(model)
    assert torch.isfinite(out).all()
    depgraph.save_pretrained(model, tmp_path)
    torch.testing.assert_close(logits(depgraph.load_pretrained(tmp_path)), out)


def test_mla_prune_every_group_runs_and_reloads(tmp_path):
    model = tiny_mla()
    graph = depgraph.trace(model)
    plan = {g: list(range(0, g.size, 4)) for g in graph.groups() if g.size >= 2}
    assert {g.kind for g in plan} == {GroupKind.A, GroupKind.B, GroupKind.C}
    report = graph.prune(plan)
    assert report.params_after < report.params_before
    assert model.config.kv_lora_rank == 18 and model.config.q_lora_rank == 24  # uniform: the config says it
    assert model.config.num_attention_heads == 3
    out = logits(model)
    assert torch.isfinite(out).all()
    depgraph.save_pretrained(model, tmp_path)
    torch.testing.assert_close(logits(depgraph.load_pretrained(tmp_path)), out)


def test_mla_without_q_latent():
    # q_lora_rank=None: a plain q_proj; the heads still form and cut exactly
    model = tiny_mla(q_lora_rank=None)
    reference = copy.deepcopy(model)
    graph, ref_graph = depgraph.trace(model), depgraph.trace(reference)
    assert [g.size for g in graph.groups("B")] == [4, 4]
    assert len([g for g in graph.groups("A") if g.extra.get("latent")]) == 2  # the kv latents only
    depgraph.zero_mask(ref_graph, {ref_graph.groups("B")[1]: [0, 3]})
    graph.prune({graph.groups("B")[1]: [0, 3]})
    assert float((logits(model) - logits(reference)).abs().max()) <= 1e-5


def test_rank_fields_name_their_layers():
    assert rank_stem("kv_lora_rank") == "kv" and rank_stem("q_lora_rank") == "q" and rank_stem("lora_rank") == ""
    assert rank_stem("num_heads") is None
    assert rank_names_layer("kv_lora_rank", {"kv_a_proj_with_mqa", "kv_b_proj"})
    assert not rank_names_layer("q_lora_rank", {"kv_a_proj_with_mqa", "kv_b_proj"})
    assert rank_names_layer("q_lora_rank", {"wq_a"})  # original DeepSeek checkpoints' names


class AmbiguousAttention(nn.Module):
    """A latent attention whose rank could be either field: the cut must refuse, not guess."""

    def __init__(self):
        super().__init__()
        self.q_lora_rank, self.lora_rank, self.num_heads = 8, 8, 2
        self.q_a = nn.Linear(16, 8)
        self.q_b = nn.Linear(8, 2 * 4 * 3)
        self.o = nn.Linear(2 * 4, 16)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.q_b(self.q_a(x)).view(b, s, -1, 12).transpose(1, 2).split(4, dim=-1)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


class Ambiguous(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.attn = AmbiguousAttention()
        self.head = nn.Linear(16, 50)

    def forward(self, ids):
        x = self.embed(ids)
        return self.head(x + self.attn(x))


def test_ambiguous_rank_is_refused():
    model = Ambiguous().eval()
    ids = torch.randint(0, 50, (1, 5))
    graph = depgraph.trace(model, (ids,))
    latent = [g for g in graph.groups("A") if g.extra.get("latent")]
    assert len(latent) == 1 and latent[0].size == 8
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(depgraph.PruneError, match="lora_rank, q_lora_rank"):
        graph.prune({latent[0]: [0]})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class Streams(nn.Module):
    """Hyper-connection-like streams: ``expand`` to a length written in the code."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.mix = nn.Linear(4 * 16, 4)
        self.head = nn.Linear(16, 50)

    def forward(self, ids):
        x = self.embed(ids)
        streams = x.unsqueeze(2).expand(-1, -1, 4, -1)  # [b, s, 4 streams, 16]
        weights = self.mix(streams.flatten(2)).softmax(-1)
        return self.head((weights.unsqueeze(-1) * streams).sum(2))


def test_broadcast_length_written_in_code_is_frozen():
    graph = depgraph.trace(Streams().eval(), (torch.randint(0, 50, (1, 5)),))
    assert ("mix.weight", 0) in graph.frozen and "broadcast" in graph.frozen[("mix.weight", 0)]
    assert not any(m.param == "mix.weight" and m.dim == 0 for g in graph.groups() for m in g.members)
