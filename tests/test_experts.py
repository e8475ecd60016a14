"""Whole-expert removal: discovery, routing importance, exact atomic removal, save/reload.

The exactness reference: the original model with the removed experts' router logits forced to -inf
(a forward hook on the router intercepts its linear), so they are never routed and the softmax /
top-k renormalisation run over the remaining experts only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.overrides import TorchFunctionMode

import depgraph
from depgraph.errors import PruneError
from depgraph.experts import expert_importance, find_experts, remove_experts, remove_least_important_experts

torch.set_num_threads(1)

BASE = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
SPECS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=6, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        norm_topk_prob=False)),
    "qwen2_moe_norm": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        norm_topk_prob=True)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8, norm_topk_prob=False)),
    "qwen3_moe_norm": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=6, num_experts_per_tok=2)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(num_local_experts=6, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_group=1, topk_group=1,
        first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8, n_shared_experts=1, num_key_value_heads=4)),
    # mixture of attention (query/output projections as experts) and of MLPs, both routed
    "jetmoe": ("JetMoeConfig", "JetMoeForCausalLM", dict(num_local_experts=6, num_experts_per_tok=2, kv_channels=8)),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(num_local_experts=6, num_experts_per_tok=2)),
    # router bias, expert biases [E, out]
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(num_local_experts=6, num_experts_per_tok=2, head_dim=8)),
    # hybrid: Mamba mixers (conv1d [C, 1, K] next to dt_proj [C, r]) must not look like experts
    "jamba": ("JambaConfig", "JambaForCausalLM", dict(
        num_experts=6, num_experts_per_tok=2, expert_layer_period=1, expert_layer_offset=0, attn_layer_period=2,
        attn_layer_offset=1, mamba_d_state=8, mamba_dt_rank=4, use_mamba_kernels=False)),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
        head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
        linear_num_value_heads=4)),
}
EXACT = list(SPECS)


def _sharpen(model: nn.Module, seed: int = 0) -> nn.Module:
    """Larger router weights (decisive, tie-free routing) and random correction biases."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for s in find_experts(model):
            tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
            for name in s.router_tensors:
                t = tensors[name]
                t.copy_(torch.randn(t.shape, generator=gen) * (1.0 if t.dim() == 2 else 0.1))
    return model


def _moe(family: str, seed: int = 0, **overrides) -> nn.Module:
    config_cls, model_cls, kw = SPECS[family]
    config = getattr(transformers, config_cls)(**{**BASE, **kw, **overrides})
    torch.manual_seed(seed)
    return _sharpen(getattr(transformers, model_cls)(config).eval(), seed)


def _ids(vocab: int = 100, batch: int = 2, seq: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids) if not hasattr(model, "config") else model(input_ids=ids, use_cache=False)
    return out if isinstance(out, torch.Tensor) else out.logits


class _NeverRoute(TorchFunctionMode):
    """Sets the router linear's output columns ``ids`` to -inf (entered by a hook on the router)."""

    def __init__(self, weight: torch.Tensor, ids: list[int]):
        super().__init__()
        self.weight, self.ids = weight, ids

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and len(args) > 1 and args[1] is self.weight:
            out = out.clone()
            out[..., self.ids] = float("-inf")
        return out


def _reference(model: nn.Module, plan: dict[str, list[int]], ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` (unchanged) with the plan's experts never routed."""
    sets = {s.path: s for s in find_experts(model)}
    handles, saved = [], []
    for path, removed in plan.items():
        s = sets[path]
        router = model.get_submodule(s.router)
        weight = next(t for t in router.parameters() if t.dim() == 2)
        mode = _NeverRoute(weight, list(removed))
        handles.append(router.register_forward_pre_hook(lambda _m, _a, mode=mode: mode.__enter__() and None))
        handles.append(router.register_forward_hook(lambda _m, _a, _o, mode=mode: mode.__exit__(None, None, None)))
        for t in router.buffers():  # sigmoid routers add a correction bias after the logits
            if t.dim() == 1 and t.is_floating_point():
                saved.append((t, t.clone()))
                t[list(removed)] = float("-inf")
    try:
        return _logits(model, ids)
    finally:
        for h in handles:
            h.remove()
        for t, old in saved:
            t.copy_(old)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------- discovery


def test_find_experts_mixtral_and_shared():
    sets = find_experts(_moe("mixtral"))
    assert [s.path for s in sets] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    s = sets[0]
    assert s.num_experts == 6 and s.top_k == 2 and s.router == "model.layers.0.mlp.gate"
    assert s.expert_tensors == ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj")
    assert ("model.layers.0.mlp.experts", "num_experts") in s.counts and s.config_counts == ("num_local_experts",)
    q = find_experts(_moe("qwen2_moe"))[0]
    assert q.shared == ("model.layers.0.mlp.shared_expert", "model.layers.0.mlp.shared_expert_gate")
    assert not any("shared" in n for n in q.router_tensors + q.expert_tensors)
    assert [s.path for s in find_experts(_moe("jamba"))] == ["model.layers.0.feed_forward",
                                                            "model.layers.1.feed_forward"]
    d = find_experts(_moe("deepseek_v3"))[0]
    assert d.router_tensors == ("model.layers.0.mlp.gate.weight", "model.layers.0.mlp.gate.e_score_correction_bias")
    assert d.shared == ("model.layers.0.mlp.shared_experts",)


def test_find_experts_skips_layouts_it_does_not_understand():
    # LongCat-Flash: zero (identity) experts give the router more rows than down_proj has experts
    config = transformers.LongcatFlashConfig(**BASE, n_routed_experts=4,
                                             num_experts_per_tok=2, zero_expert_num=2)
    sets = find_experts(transformers.LongcatFlashForCausalLM(config))
    assert list(sets) == [] and "not understood" in sets.warnings[0]
    assert find_experts(transformers.LlamaForCausalLM(transformers.LlamaConfig(**BASE))) == []
    # Switch Transformers: per-expert ModuleDict, but top-1 routing by argmax with no top-k attribute
    config = transformers.SwitchTransformersConfig(num_experts=4, d_model=32, d_ff=32, num_layers=1,
                                                   num_decoder_layers=1, num_heads=4, d_kv=8, vocab_size=100,
                                                   encoder_sparse_step=1, decoder_sparse_step=1)
    sets = find_experts(transformers.SwitchTransformersForConditionalGeneration(config))
    assert list(sets) == [] and len(sets.warnings) == 2 and "no top-k attribute" in sets.warnings[0]


# ---------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("family", EXACT)
def test_removal_equals_never_routing(family):
    model = _moe(family)
    ids = _ids()
    sets = find_experts(model)
    e = sets[0].num_experts
    plan = {sets[0].path: [0, e - 2], sets[1].path: [1]}  # different counts per block: per-block config copies
    ref = _reference(model, plan, ids)
    before = _logits(model, ids)
    params = {n: p for n, p in model.named_parameters()}
    report = remove_experts(model, plan)
    assert {p: report.remaining[p] for p in plan} == {sets[0].path: e - 2, sets[1].path: e - 1}
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, ref)  # the removed experts were really routed to
    after = find_experts(model)
    assert [s.num_experts for s in after] == [e - 2, e - 1] + [e] * (len(sets) - 2)
    for name, p in model.named_parameters():
        assert p is params[name] and isinstance(p, nn.Parameter)  # cut in place


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_uniform_removal_edits_the_config(family):
    model = _moe(family)
    sets = find_experts(model)
    field = sets[0].config_counts[0]
    e = sets[0].num_experts
    plan = {s.path: [1, 2] for s in sets}
    ids = _ids()
    ref = _reference(model, plan, ids)
    remove_experts(model, plan)
    assert getattr(model.config, field) == e - 2
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-5, atol=1e-5)
    fresh = type(model)(model.config)  # the config alone rebuilds the pruned shapes
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@given(e=st.integers(3, 8), data=st.data())
@settings()
def test_mixtral_property(e, data):
    top_k = data.draw(st.integers(1, min(3, e - 1)), label="top_k")
    n = data.draw(st.integers(1, e - top_k), label="n removed")
    removed = data.draw(st.lists(st.integers(0, e - 1), min_size=n, max_size=n, unique=True), label="ids")
    model = _moe("mixtral", num_local_experts=e, num_experts_per_tok=top_k, num_hidden_layers=1)
    ids = _ids(seq=6)
    plan = {"model.layers.0.mlp": removed}
    ref = _reference(model, plan, ids)
    remove_experts(model, plan)
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-5, atol=1e-5)
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == e - n


# ------------------------------------------------------------------------- per-expert module lists


class _Expert(nn.Module):
    def __init__(self, h: int, i: int):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(h, i, bias=False), nn.Linear(i, h, bias=False), nn.Linear(h, i)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _ListMoE(nn.Module):
    """Old-style Mixtral block: router Linear with a bias, experts in an nn.ModuleList."""

    def __init__(self, h: int, e: int, k: int):
        super().__init__()
        self.num_experts, self.top_k = e, k
        self.gate = nn.Linear(h, e)
        self.experts = nn.ModuleList(_Expert(h, 12) for _ in range(e))
        self.shared = _Expert(h, 8)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        probs = torch.softmax(self.gate(flat), dim=-1)
        w, idx = probs.topk(self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = self.shared(flat)
        for j in range(self.num_experts):
            tok, slot = torch.where(idx == j)
            if tok.numel():
                out = out.index_add(0, tok, self.experts[j](flat[tok]) * w[tok, slot, None])
        return out.reshape(x.shape)


class _ListModel(nn.Module):
    def __init__(self, h: int = 16, e: int = 5, k: int = 2, vocab: int = 50):
        super().__init__()
        self.embed = nn.Embedding(vocab, h)
        self.layers = nn.ModuleList(_ListMoE(h, e, k) for _ in range(2))
        self.head = nn.Linear(h, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


def test_module_list_experts_exact():
    torch.manual_seed(0)
    model = _sharpen(_ListModel().eval())
    sets = find_experts(model)
    assert [s.expert_lists for s in sets] == [("layers.0.experts",), ("layers.1.experts",)]
    assert sets[0].router_tensors == ("layers.0.gate.weight", "layers.0.gate.bias")
    assert sets[0].shared == ("layers.0.shared",)
    ids = _ids(vocab=50)
    plan = {"layers.0": [1, 3], "layers.1": [4]}
    ref = _reference(model, plan, ids)
    kept = model.layers[0].experts[2]
    remove_experts(model, plan, example_inputs=ids)
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-5, atol=1e-5)
    assert len(model.layers[0].experts) == 3 and model.layers[0].experts[1] is kept
    assert model.layers[0].num_experts == 3 and model.layers[0].gate.weight.shape == (3, 16)
    assert [k for k, _ in model.named_parameters() if k.startswith("layers.0.experts.")][-1].startswith(
        "layers.0.experts.2.")


class _ListMoeConfig(transformers.PreTrainedConfig):
    model_type = "depgraph_test_list_moe"
    hidden_size: int = 16
    num_experts: int = 5
    num_experts_per_tok: int = 2
    vocab_size: int = 50


class _ListMoeForCausalLM(transformers.PreTrainedModel):
    """A remote-code style MoE (per-expert nn.ModuleList) that save/load_pretrained must rebuild."""

    config_class = _ListMoeConfig

    def __init__(self, config: _ListMoeConfig):
        super().__init__(config)
        self.net = _ListModel(config.hidden_size, config.num_experts, config.num_experts_per_tok, config.vocab_size)
        self.post_init()

    def forward(self, input_ids=None, **kwargs):
        return self.net(input_ids)


def test_module_list_save_reload(tmp_path):
    transformers.AutoConfig.register(_ListMoeConfig.model_type, _ListMoeConfig, exist_ok=True)
    # load_pretrained resolves classes only from transformers' registry
    transformers.AutoModelForCausalLM.register(_ListMoeConfig, _ListMoeForCausalLM, exist_ok=True)
    torch.manual_seed(0)
    model = _sharpen(_ListMoeForCausalLM(_ListMoeConfig()).eval())
    remove_experts(model, {"net.layers.0": [0, 2]})  # one block only: the config cannot say it
    state = depgraph.save_pretrained(model, tmp_path)
    assert not state["hf_compatible"] and state["containers"] == {"net.layers.0.experts": ["0", "1", "2"]}
    loaded = depgraph.load_pretrained(tmp_path)
    ids = _ids(vocab=50)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids))
    assert [s.num_experts for s in find_experts(loaded)] == [3, 5]


# --------------------------------------------------------------------------- refusals and rollback


def test_bad_ids_name_the_block():
    model = _moe("mixtral")
    path = "model.layers.1.mlp"
    state = _state(model)
    for ids, msg in [([6], "out of range"), ([1, 1], "repeated"), (list(range(6)), "fewer than"),
                     ([0, 1, 2, 3, 4], "fewer than"), (["a"], "not an integer")]:
        with pytest.raises(PruneError, match=msg) as err:
            remove_experts(model, {path: ids})
        assert path in str(err.value)
    with pytest.raises(PruneError, match="not an MoE block"):
        remove_experts(model, {"model.layers.1": [0]})
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_failed_removal_leaves_model_unchanged():
    model = _moe("qwen2_moe")
    ids = _ids()
    before = _logits(model, ids)
    state = _state(model)
    config = model.config.to_dict()
    experts = model.model.layers[0].mlp.experts

    def explode(module, args):  # fails only once the cut is committed: the forward check must roll back
        if module.num_experts != 6:
            raise RuntimeError("boom")

    handle = experts.register_forward_pre_hook(explode)
    try:
        with pytest.raises(PruneError, match=r"model\.layers\.0\.mlp.*boom.*unchanged"):
            remove_experts(model, {"model.layers.0.mlp": [2], "model.layers.1.mlp": [0, 3]})
    finally:
        handle.remove()
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.config.to_dict() == config
    assert experts.num_experts == 6 and model.model.layers[1].mlp.gate.num_experts == 6
    assert experts.config is model.config
    assert torch.equal(_logits(model, ids), before)


def test_group_limited_routing():
    model = _moe("deepseek_v3", n_group=2, topk_group=1)  # each token picks from one group of 4
    path = "model.layers.0.mlp"
    with pytest.raises(PruneError, match=r"model\.layers\.0\.mlp.*group-limited.*\[2, 0\]"):
        remove_experts(model, {path: [0, 1]})  # both from group 0: groups would differ in size
    with pytest.raises(PruneError, match="group-limited"):
        remove_experts(model, {path: [0, 1, 2, 4, 5, 6]})  # equal, but one expert per group cannot score
    ids = _ids()
    plan = {path: [1, 6]}  # one from each group of 4
    ref = _reference(model, plan, ids)
    remove_experts(model, plan)
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------- importance


def test_importance_and_least_important():
    model = _moe("mixtral")
    calib = _ids(batch=3, seq=10, seed=1)
    mass = expert_importance(model, calib, progress=False)
    freq = expert_importance(model, calib, metric="frequency", progress=False)
    for path in mass:
        assert mass[path].shape == (6,)
        torch.testing.assert_close(freq[path].sum(), torch.tensor(2.0))  # top-2 per token
        torch.testing.assert_close(mass[path].sum(), torch.tensor(1.0))  # renormalised weights
    # an expert the router never picks scores 0 and goes first
    with torch.no_grad():
        model.model.layers[0].mlp.gate.weight[4] = -100 * model.model.layers[0].mlp.gate.weight[0].sign()
    scores = expert_importance(model, calib, metric="frequency", progress=False)
    ids = _ids()
    report = remove_least_important_experts(model, {"model.layers.0.mlp": scores["model.layers.0.mlp"]}, n=1)
    assert report.removed == {"model.layers.0.mlp": (int(scores["model.layers.0.mlp"].argmin()),)}
    assert model.model.layers[0].mlp.experts.num_experts == 5
    _logits(model, ids)
    with pytest.raises(ValueError, match="metric"):
        expert_importance(model, calib, metric="loss")


def test_importance_reads_logits_only_routers():
    torch.manual_seed(0)
    model = _ListModel().eval()  # the router is a plain Linear: logits -> softmax -> top-k here
    calib = [{"ids": row[None]} for row in _ids(vocab=50)]
    scores = expert_importance(model, calib, metric="frequency", progress=False)
    assert set(scores) == {"layers.0", "layers.1"}
    torch.testing.assert_close(scores["layers.0"].sum(), torch.tensor(2.0))


# -------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("uniform", [True, False])
def test_save_reload_after_removal(tmp_path, uniform):
    model = _moe("qwen2_moe")
    plan = {"model.layers.0.mlp": [0, 3], "model.layers.1.mlp": [1, 2] if uniform else [5]}
    remove_experts(model, plan)
    ids = _ids()
    state = depgraph.save_pretrained(model, tmp_path)
    assert state["hf_compatible"] is uniform
    loaded = depgraph.load_pretrained(tmp_path)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids))
    assert [s.num_experts for s in find_experts(loaded)] == [4, 4 if uniform else 5]


def test_width_cut_after_removal_needs_retrace():
    model = _moe("mixtral", num_hidden_layers=1)
    remove_experts(model, {"model.layers.0.mlp": [0]})
    graph = depgraph.trace(model)  # re-traced on the smaller model
    assert graph.param_shapes["model.layers.0.mlp.experts.gate_up_proj"][0] == 5
    heads = graph.groups("B")[0]
    graph.prune({heads: [0]})
    assert torch.isfinite(_logits(model, _ids())).all()
