"""Hybrid linear-attention / SSM models: mixer channels the rules cannot prove exact are frozen with a
reason and a warning, depthwise convolutions are cut exactly, attention and MLP layers still prune, and
checkpoints of configs holding ``inf`` (Mamba's ``time_step_limit``) round-trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from transformers import BambaConfig, BambaForCausalLM, Qwen3_5ForCausalLM, Qwen3_5TextConfig

import depgraph
from depgraph.checkpoint import decode_floats, encode_floats

TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def ids(vocab: int = 1000) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 8), generator=torch.Generator().manual_seed(0))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


def quarter_plan(graph) -> dict:
    """About 25% of the units of every group with at least two."""
    rng = np.random.default_rng(0)
    return {g: sorted(rng.choice(g.size, max(1, g.size // 4), replace=False).tolist())
            for g in graph.groups() if g.size >= 2}


def grouped(graph, fragment: str) -> list[str]:
    """Members of any group whose parameter name contains ``fragment``."""
    return [f"{m.param}:{m.dim}" for g in graph.groups() for m in g.members if fragment in m.param]


# ---- conv1d / pad rules on small modules -------------------------------------------------------------

class ShortConv(nn.Module):
    """in_proj -> causal depthwise conv1d over the channels -> out_proj (the mixer of Mamba / GDN)."""

    def __init__(self, width: int = 24, groups: int | None = None):
        super().__init__()
        self.in_proj = nn.Linear(16, width)
        self.conv1d = nn.Conv1d(width, width, kernel_size=3, padding=2, groups=width if groups is None else groups)
        self.out_proj = nn.Linear(width, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.in_proj(x).transpose(1, 2)
        h = self.conv1d(h)[..., : x.shape[1]]
        h = nn.functional.pad(h, (0, 0))  # a no-op pad: the channel axis passes through
        return self.out_proj(torch.nn.functional.silu(h.transpose(1, 2)))


def test_depthwise_conv1d_is_channel_wise_and_cuts_exactly():
    torch.manual_seed(0)
    model = ShortConv().eval()
    x = torch.randn(2, 7, 16)
    graph = depgraph.trace(model, x)
    (group,) = [g for g in graph.groups("A") if g.size == 24]
    assert {(m.param, m.dim) for m in group.members} >= {
        ("in_proj.weight", 0), ("in_proj.bias", 0), ("conv1d.weight", 0), ("conv1d.bias", 0), ("out_proj.weight", 1)}
    assert "conv1d kernel" in graph.frozen[("conv1d.weight", 2)]
    units = [1, 5, 6, 20]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    depgraph.zero_mask(graph, {group: units})
    with torch.no_grad():
        masked = model(x)
    model.load_state_dict(state)
    graph.prune({group: units})
    assert model.conv1d.weight.shape == (20, 1, 3) and model.conv1d.groups == 20 == model.conv1d.in_channels
    with torch.no_grad():
        assert torch.allclose(model(x), masked, atol=1e-6)


def test_grouped_conv1d_stays_conservative():
    model = ShortConv(groups=2).eval()
    graph = depgraph.trace(model, torch.randn(2, 7, 16))
    assert not grouped(graph, "conv1d")
    assert any("conv1d" in w for w in graph.warnings)


class SizedSplit(nn.Module):
    """Jamba's x_proj: split([self.time_step_rank, self.state, self.state]) with a rank no cut updates."""

    def __init__(self):
        super().__init__()
        self.time_step_rank, self.state = 4, 8
        self.x_proj = nn.Linear(16, self.time_step_rank + 2 * self.state, bias=False)
        self.dt_proj = nn.Linear(self.time_step_rank, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt, b, c = torch.split(self.x_proj(x), [self.time_step_rank, self.state, self.state], dim=-1)
        return self.dt_proj(dt) * (b * c).sum(-1, keepdim=True)


def test_split_sizes_held_by_no_cut_attribute_are_frozen():
    graph = depgraph.trace(SizedSplit().eval(), torch.randn(2, 5, 16))
    assert not grouped(graph, "dt_proj.weight")
    assert "written in the code" in graph.frozen[("dt_proj.weight", 1)]
    assert any("kept whole" in w for w in graph.warnings)


# ---- tiny hybrid models from transformers config classes ----------------------------------------------

def test_checkpoint_floats_round_trip_json():
    state = {"time_step_limit": [0.0, math.inf], "x": -math.inf, "nested": {"nan": math.nan}}
    back = decode_floats(encode_floats(state))
    assert back["time_step_limit"] == [0.0, math.inf] and back["x"] == -math.inf and math.isnan(back["nested"]["nan"])
    assert decode_floats({"__float__": "Infinity"}) == math.inf  # transformers' own config.json tag


@pytest.fixture(scope="module")
def bamba():
    config = BambaConfig(**TINY, mamba_n_heads=8, mamba_d_head=16, mamba_expand=2, attn_layer_indices=[1])
    torch.manual_seed(0)
    return BambaForCausalLM(config).eval()


def test_mamba_hybrid_freezes_the_mixer_and_prunes_the_rest(bamba, tmp_path):
    model = bamba
    assert math.isinf(model.config.time_step_limit[1])
    x = ids()
    graph = depgraph.trace(model)
    assert graph.groups("A") and graph.groups("B") and graph.groups("C")
    assert [g.name for g in graph.groups("B")] == ["model.layers.1.self_attn"]
    # the SSM mixer's own channels (written lengths: split sizes, conv_dim) are never cut; its
    # in_proj columns / out_proj rows are hidden channels, its conv's size-1 dim is bookkeeping
    mixer = [p for p in grouped(graph, ".mamba.")
             if not p.endswith(("in_proj.weight:1", "out_proj.weight:0", "conv1d.weight:1"))]
    assert not mixer
    for key in ("in_proj.weight", 0), ("out_proj.weight", 1), ("conv1d.weight", 0), ("A_log", 0):
        assert (f"model.layers.0.mamba.{key[0]}", key[1]) in graph.frozen
    assert any("model.layers.0.mamba" in w for w in graph.warnings)
    before = logits(model, x)
    report = graph.prune(quarter_plan(graph))
    assert report.params_after < report.params_before
    out = logits(model, x)
    assert out.shape == before.shape and torch.isfinite(out).all()
    depgraph.save_pretrained(model, tmp_path)
    loaded = depgraph.load_pretrained(tmp_path)
    assert math.isinf(loaded.config.time_step_limit[1])
    assert torch.allclose(logits(loaded, x), out, atol=1e-6)


def test_gated_delta_net_is_frozen_and_attention_cut_is_exact():
    config = Qwen3_5TextConfig(**TINY, head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16,
                               linear_num_key_heads=2, linear_num_value_heads=4,
                               layer_types=["linear_attention", "full_attention"])
    torch.manual_seed(0)
    model = Qwen3_5ForCausalLM(config).eval()
    x = ids()
    graph = depgraph.trace(model)
    # the gated delta net's own channels are never cut (hidden columns / rows and the conv's size-1
    # dim aside): its heads are merged with batch x positions before out_proj, so no unit fits
    mixer = [p for p in grouped(graph, "linear_attn")
             if not p.endswith(("weight:1", "out_proj.weight:0")) or "out_proj.weight:1" in p]
    assert not mixer
    for key in (("model.layers.0.linear_attn.in_proj_qkv.weight", 0),
                ("model.layers.0.linear_attn.out_proj.weight", 1)):
        assert key in graph.frozen
    assert any("linear_attn" in w for w in graph.warnings)
    (attention,) = graph.groups("B")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    depgraph.zero_mask(graph, {attention: [1]})
    masked = logits(model, x)
    model.load_state_dict(state)
    graph.prune({attention: [1]})
    assert torch.allclose(logits(model, x), masked, atol=1e-4)
    report = graph.prune(quarter_plan(graph))  # the graph follows the cut: prune again, every group
    assert report.params_after < report.params_before and torch.isfinite(logits(model, x)).all()


# ---- Mamba-1 / Jamba: the mixer's inner width is a block-local (A) width, never the hidden size ----------

def _mamba1(expand: int):
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(vocab_size=200, hidden_size=64, state_size=8, num_hidden_layers=2, expand=expand,
                         conv_kernel=4, time_step_rank=8)
    torch.manual_seed(0)
    return MambaForCausalLM(config).eval()


def _jamba():
    from transformers import JambaConfig, JambaForCausalLM

    config = JambaConfig(**{**TINY, "num_hidden_layers": 4}, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8,
                         attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                         num_experts=2, num_experts_per_tok=1)
    torch.manual_seed(0)
    return JambaForCausalLM(config).eval()


def _mixer_cut_matches_zero_mask(build, mixer_name: str, mixers, tmp_path) -> None:
    """Cutting a Mamba mixer's inner channels is exact (== zero-mask), rescales that mixer's
    ``intermediate_size`` only, and leaves the hidden size alone; else the width is frozen with a reason."""
    import copy

    model = build()
    x = torch.randint(3, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    graph = depgraph.trace(model, x)
    hidden = model.config.hidden_size
    local_c = [g for g in graph.groups("C") if g.name.startswith(mixer_name)]
    assert not local_c, "a mixer's inner width must never pass for hidden channels"
    group = next((g for g in graph.groups() if g.name == mixer_name), None)
    if group is None:  # frozen: then with a reason
        assert (f"{mixer_name}.in_proj.weight", 0) in graph.frozen
        return
    assert group.kind is depgraph.GroupKind.A and group.exact
    mixer0, mixer1 = mixers(model)
    width = mixer0.intermediate_size
    assert group.size == width
    ref = copy.deepcopy(model)
    ref_graph = depgraph.trace(ref, x)
    units = [1, 5, 9]
    depgraph.zero_mask(ref_graph, {ref_graph.group(mixer_name): units})
    graph.prune({group: units})
    assert mixer0.intermediate_size == width - 3 and mixer1.intermediate_size == width
    assert mixer0.in_proj.weight.shape[0] == 2 * (width - 3)
    assert model.config.hidden_size == hidden and mixer0.hidden_size == mixer1.hidden_size == hidden
    assert torch.allclose(logits(model, x), logits(ref, x), atol=1e-5)
    depgraph.save_pretrained(model, tmp_path)
    loaded = depgraph.load_pretrained(tmp_path)
    assert loaded.config.hidden_size == hidden
    assert torch.allclose(logits(loaded, x), logits(model, x), atol=1e-6)


@pytest.mark.parametrize("expand", [1, 2])
def test_mamba1_mixer_width_is_cut_exactly_not_as_hidden(expand, tmp_path):
    # expand=1: the inner width equals hidden_size, which a by-value hidden-size edit used to rewrite
    _mixer_cut_matches_zero_mask(lambda: _mamba1(expand), "backbone.layers.0.mixer",
                                 lambda m: (m.backbone.layers[0].mixer, m.backbone.layers[1].mixer), tmp_path)


def test_jamba_mixer_width_is_cut_exactly_not_as_hidden(tmp_path):
    _mixer_cut_matches_zero_mask(_jamba, "model.layers.0.mamba",
                                 lambda m: (m.model.layers[0].mamba, m.model.layers[2].mamba), tmp_path)
