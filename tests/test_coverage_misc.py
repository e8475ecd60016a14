"""Coverage fixes found by ``benchmarks/coverage.py``: MoE hidden sizes, reshapes no factor may cut,
heterogeneous (per-layer) configs, run-time module swaps in checkpoints, ``view_as`` heads and
data-dependent shapes (boolean masks, ``.item()`` lengths, splits by ``tolist()`` sizes).

Tiny random models from transformers config classes (no downloads).
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from torch import nn

import depgraph
from depgraph.errors import DepGraphError

IDS = torch.randint(3, 1000, (2, 8), generator=torch.Generator().manual_seed(0))


def build(config_cls: str, model_cls: str, **kwargs) -> nn.Module:
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=1000, max_position_embeddings=128)
    base.update(kwargs)
    torch.manual_seed(0)
    return getattr(T, model_cls)(getattr(T, config_cls)(**base)).eval()


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def cut_vs_mask(model: nn.Module, name: str, units: list[int]) -> float:
    """max |logits(cut) - logits(zero-masked original)| for the group called ``name``."""
    ref = copy.deepcopy(model)
    graph, ref_graph = depgraph.trace(model), depgraph.trace(ref)
    depgraph.zero_mask(ref_graph, {ref_graph.group(name): units})
    graph.prune({graph.group(name): units})
    return float((logits(model) - logits(ref)).abs().max())


def quarter_plan(graph) -> dict:
    """~25% of every group with at least 2 units (what coverage.py's prune+forward check cuts)."""
    return {g: list(range(0, g.size, 4))[: max(1, g.size // 4)] for g in graph.groups() if g.size >= 2}


def test_granitemoe_hidden_cut_updates_moe_input_size():
    # GraniteMoeMoE reshapes its output with self.input_size (the hidden size under another name)
    model = build("GraniteMoeConfig", "GraniteMoeForCausalLM", num_key_value_heads=2, num_local_experts=4,
                  num_experts_per_tok=2)
    graph = depgraph.trace(model)
    hidden = graph.groups("C")[0]
    graph.prune({hidden: list(range(16))})
    assert model.model.layers[0].block_sparse_moe.input_size == 48
    assert logits(model).shape == (2, 8, 1000)


def test_llama4_experts_axis_is_not_a_group_and_full_plan_runs():
    # the experts axis of Llama-4's fused expert weights comes from a view [E*T, H] -> [E, -1, H]
    # whose only free factor is the tokens: no factor may be cut, so the experts axis is frozen
    model = build("Llama4TextConfig", "Llama4ForCausalLM", num_key_value_heads=2, head_dim=16,
                  num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=128,
                  interleave_moe_layer_step=1, no_rope_layers=[1, 0], attention_chunk_size=128)
    graph = depgraph.trace(model)
    expert_axes = [g for g in graph.groups() if any(m.param.endswith("experts.gate_up_proj") and m.dim == 0
                                                    for m in g.members)]
    assert expert_axes == []
    report = graph.prune(quarter_plan(graph))
    assert report.params_after < report.params_before
    assert torch.isfinite(logits(model)).all()


def _gemma4(**kwargs) -> nn.Module:
    config = dict(num_key_value_heads=2, head_dim=16, global_head_dim=32, hidden_size_per_layer_input=16,
                  vocab_size_per_layer_input=1000, num_kv_shared_layers=0, layer_types=["sliding_attention",
                                                                                      "full_attention"])
    config.update(kwargs)
    return build("Gemma4TextConfig", "Gemma4ForCausalLM", **config)


def test_gemma4_per_layer_inputs_are_frozen_and_full_plan_runs():
    # the per-layer input channels are reshaped [.., L * d] -> [.., L, d] with the layer axis read by
    # index: no factor can be the unit, so none of them may be cut (it used to break the forward)
    model = _gemma4()
    graph = depgraph.trace(model)
    assert not any(m.param.endswith("per_layer_projection_norm.weight") for g in graph.groups() for m in g.members)
    graph.prune(quarter_plan(graph))
    assert torch.isfinite(logits(model)).all()


def test_gemma4_per_layer_kv_heads_are_updated_in_per_layer_config(tmp_path):
    # num_key_value_heads differs per layer (global layers have their own): reading it on the global config
    # raises, and the cut must state the new count in config.per_layer_config[i]
    model = _gemma4(num_key_value_heads=4, num_global_key_value_heads=2, attention_k_eq_v=True)
    assert "num_key_value_heads" in model.config.per_layer_attributes
    assert cut_vs_mask(model, "model.layers.0.self_attn", [1]) <= 1e-5
    assert cut_vs_mask(model, "model.layers.1.self_attn", [0]) <= 1e-5
    layers = model.model.layers
    assert model.config.per_layer_config[0].num_key_value_heads == 3 == layers[0].self_attn.k_proj.out_features // 16
    assert model.config.per_layer_config[1].num_key_value_heads == 1 == layers[1].self_attn.k_proj.out_features // 32
    for layer in layers:  # the modules' own config copies agree with the model's
        assert layer.self_attn.config.per_layer_config[0].num_key_value_heads == 3
    out = logits(model)
    depgraph.save_pretrained(model, tmp_path)
    torch.testing.assert_close(logits(depgraph.load_pretrained(tmp_path)), out, atol=1e-6, rtol=1e-5)


def test_failed_cut_restores_per_layer_config():
    model = _gemma4(num_key_value_heads=4, num_global_key_value_heads=2, attention_k_eq_v=True)
    graph = depgraph.trace(model)
    before = model.config.to_dict()
    graph.model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))  # the check fails
    with pytest.raises(depgraph.PruneError):
        graph.prune({graph.group("model.layers.0.self_attn"): [1]})
    del graph.model.forward
    assert model.config.to_dict() == before
    assert model.config.per_layer_config[0].num_key_value_heads == 4


@pytest.mark.parametrize("prune", [False, True])
def test_big_bird_reload_keeps_runtime_attention_type(tmp_path, prune):
    # BigBird swaps its block-sparse attention for full attention on short inputs at run time; the
    # checkpoint must rebuild the full-attention modules, not the config's block-sparse ones
    model = build("BigBirdConfig", "BigBirdForCausalLM", is_decoder=True)
    with torch.no_grad():
        model(IDS)
    assert model.bert.attention_type == "original_full" and model.config.attention_type == "block_sparse"
    if prune:
        graph = depgraph.trace(model, IDS)
        graph.prune(quarter_plan(graph))
    with torch.no_grad():
        out = model(IDS).logits
    depgraph.save_pretrained(model, tmp_path)
    loaded = depgraph.load_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, out, atol=1e-6, rtol=1e-5)


def test_checkpoint_refuses_a_module_swap_it_cannot_rebuild(tmp_path):
    model = build("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2)
    model.model.layers[0].mlp.act_fn = nn.GELU()  # no config setting builds this
    with pytest.raises(DepGraphError, match="another class"):
        depgraph.save_pretrained(model, tmp_path)


def test_beam_view_as_gate_keeps_heads():
    # Beam gates each head with gate_proj(x).view_as(attn_output): view_as must not freeze the heads
    model = build("BeamConfig", "BeamForCausalLM", num_key_value_heads=2, head_dim=16, mlp_only_layers=[],
                  layer_types=["sliding_attention", "full_attention"])
    graph = depgraph.trace(model)
    heads = graph.groups("B")
    assert heads and any(m.param.endswith("gate_proj.weight") for m in heads[0].members)
    assert cut_vs_mask(model, heads[0].name, [1]) <= 1e-5


def test_xmod_boolean_mask_adapters_trace_and_cut():
    # X-MOD runs each language's adapter on hidden[lang_ids == lang]: a boolean mask, data-dependent rows
    model = build("XmodConfig", "XmodForCausalLM", is_decoder=True, languages=["en_XX"],
                  default_language="en_XX")
    model.set_default_language("en_XX")
    graph = depgraph.trace(model)
    assert graph.groups("B") and graph.groups("C")
    adapters = [g for g in graph.groups("A") if "adapter" in g.name]
    assert adapters
    ref = copy.deepcopy(model)
    ref_graph = depgraph.trace(ref)
    depgraph.zero_mask(ref_graph, {ref_graph.group(adapters[0].name): [0, 1]})
    graph.prune({adapters[0]: [0, 1]})
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, atol=1e-5, rtol=1e-5)


def test_reformer_item_lengths_trace():
    # Reformer sizes its axial position embeddings with position_ids.max().item(): an unbacked size
    model = build("ReformerConfig", "ReformerModelWithLMHead", attn_layers=["local", "local"],
                  attention_head_size=16, feed_forward_size=128, axial_pos_embds_dim=[32, 32],
                  axial_pos_shape=[8, 16], is_decoder=True)
    graph = depgraph.trace(model)
    assert graph.groups("A") and graph.groups("B")
    graph.prune({g: [0] for g in graph.groups() if g.size >= 2})
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def test_jetmoe_data_dependent_split_traces():
    # JetMoE splits tokens by expert_size.tolist(): the split axis is data, the channels stay prunable;
    # its attention heads are interleaved (q heads = top_k x KV heads, keys repeated top_k times),
    # which no reshape factor expresses as contiguous blocks, so they stay frozen
    model = build("JetMoeConfig", "JetMoeForCausalLM", num_key_value_heads=2, kv_channels=16,
                  num_local_experts=4, num_experts_per_tok=2)
    graph = depgraph.trace(model)
    assert graph.groups("A") and graph.groups("C") and not graph.groups("B")
    # the experts' weights are read one expert at a time (weight[i]): still the parameter, so the
    # MLP neurons get their roles and zero_mask masks the consumer columns (cut == zero-mask)
    mlp = graph.group("model.layers.0.mlp")
    assert {m.role for m in mlp.members} == {"out", "in"}
    assert cut_vs_mask(model, "model.layers.0.mlp", [0, 5, 7]) <= 1e-5


def test_hidden_cut_reaches_norms_beside_heads_coupled_across_layers():
    # CpmAnt's relative-position bias is shared by every layer, so its head group spans the whole model;
    # the hidden cut must still update the norms' dim_norm (only attention modules keep "hidden" names)
    model = build("CpmAntConfig", "CpmAntForCausalLM", dim_model=64, dim_ff=128, num_heads=4, dim_head=16,
                  num_layers=2)
    graph = depgraph.trace(model)
    assert len(graph.groups("B")) == 1
    graph.prune(quarter_plan(graph))
    assert logits(model).shape[:2] == (2, 8)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_multi_query_head_cut_follows_repeat_count(attn):
    # one KV head repeated for every query head: cutting query heads must lower the repeat count
    model = build("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=1, head_dim=16, attn_implementation=attn)
    graph = depgraph.trace(model)
    heads = graph.groups("B")[0]
    assert heads.size == 4
    assert cut_vs_mask(model, heads.name, [1]) < 1e-5
    attention = model.model.layers[0].self_attn
    assert attention.num_key_value_groups == 3
    assert attention.config.num_attention_heads == 3 and attention.config.num_key_value_heads == 1
