"""The structural cut: cut == zero-mask (exact for A and B), atomicity, iterative use, save/reload."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st
from models import config_for, example_ids, tiny_model
from torch import nn

import depgraph

PROPERTY_FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "opt", "phi3", "bert", "qwen3", "gemma", "gpt_neox",
                     "phi"]


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    kwargs = {} if isinstance(model, transformers.BertPreTrainedModel) else {"use_cache": False}
    with torch.no_grad():
        return model(ids, **kwargs).logits


def snapshot(model: nn.Module) -> dict:
    """Every tensor and every config value: used to prove a failed prune changed nothing."""
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    attrs = {n: {k: v for k, v in vars(m).items() if isinstance(v, (int, float, tuple, str))}
             for n, m in model.named_modules()}
    return {"state": state, "attrs": attrs, "config": model.config.to_dict()}


def assert_unchanged(model: nn.Module, snap: dict) -> None:
    now = model.state_dict(keep_vars=True)
    assert set(now) == set(snap["state"])
    for k, v in snap["state"].items():
        assert now[k].shape == v.shape and torch.equal(now[k], v), k
    assert model.config.to_dict() == snap["config"]
    for n, m in model.named_modules():
        assert {k: v for k, v in vars(m).items() if isinstance(v, (int, float, tuple, str))} == snap["attrs"][n]


@st.composite
def architectures(draw):
    """A family and small sizes: layers, head_dim, KV heads, query heads per KV head, MLP width."""
    family = draw(st.sampled_from(PROPERTY_FAMILIES))
    layers = draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    kv = draw(st.integers(1, 4))
    groups = draw(st.integers(1, 3))
    inter = draw(st.integers(4, 64))
    heads = kv * groups
    hidden = heads * head_dim
    gqa_families = {"llama", "mistral", "qwen2", "phi3", "qwen3", "gemma"}
    if family not in gqa_families:
        heads, kv = kv * groups, kv * groups  # multi-head attention only
    names = {
        "gpt2": dict(n_embd=hidden, n_layer=layers, n_head=heads, n_inner=inter),
        "opt": dict(hidden_size=hidden, ffn_dim=inter, num_hidden_layers=layers, num_attention_heads=heads,
                    word_embed_proj_dim=hidden),
        "bert": dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                     num_attention_heads=heads),
        "gpt_neox": dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads),
        "phi": dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                    num_attention_heads=heads),
    }
    if family in names:
        overrides = names[family]
    else:
        overrides = dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv)
        if family in ("qwen3", "gemma"):
            overrides["head_dim"] = head_dim
    if family in ("gpt_neox", "phi") and head_dim < 8:
        overrides["hidden_size"] = heads * 8  # partial rotary needs an even rotated slice
    return family, overrides


def build(family: str, overrides: dict, seed: int = 0) -> nn.Module:
    model = tiny_model(family, seed=seed, **overrides)
    return model


@given(arch=architectures(), kind=st.sampled_from(["A", "B"]), data=st.data())
def test_cut_equals_zero_mask(arch, kind, data):
    """Cutting units of an A or B group computes exactly what zero-masking them does."""
    family, overrides = arch
    model = build(family, overrides)
    ids = example_ids(model)
    masked = copy.deepcopy(model)
    graph = depgraph.trace(model)
    groups = graph.groups(kind)
    if not groups or all(g.size < 2 for g in groups):
        return
    gi = data.draw(st.sampled_from([i for i, g in enumerate(groups) if g.size >= 2]), label="group")
    group = groups[gi]
    units = data.draw(st.lists(st.integers(0, group.size - 1), min_size=1, max_size=group.size - 1,
                               unique=True), label="units")
    mgraph = depgraph.trace(masked)
    depgraph.zero_mask(mgraph, {mgraph.groups(kind)[gi]: units})
    before = depgraph.count_parameters(model)
    report = graph.prune({group: units})
    assert report.params_after < before
    assert group.size == groups[gi].size  # the graph tracks the new size
    torch.testing.assert_close(logits(model, ids), logits(masked, ids), atol=1e-5, rtol=1e-4)


@given(arch=architectures(), data=st.data())
def test_hidden_cut_runs_and_reloads(arch, data, tmp_path_factory):
    """A C cut (with A and B cuts) keeps shapes consistent, outputs finite, and survives save/reload."""
    family, overrides = arch
    model = build(family, overrides)
    ids = example_ids(model)
    graph = depgraph.trace(model)
    (hidden,) = graph.groups("C")
    plan = {hidden: data.draw(st.lists(st.integers(0, hidden.size - 1), min_size=1,
                                       max_size=hidden.size - 1, unique=True), label="C units")}
    for g in graph.groups("A") + graph.groups("B"):
        if g.size > 1 and data.draw(st.booleans(), label=f"cut {g.name}"):
            plan[g] = data.draw(st.lists(st.integers(0, g.size - 1), min_size=1, max_size=g.size - 1,
                                         unique=True), label=g.name)
    graph.prune(plan)
    out = logits(model, ids)
    assert out.shape[:2] == ids.shape and torch.isfinite(out).all()
    path = tmp_path_factory.mktemp("ckpt")
    depgraph.save_pretrained(model, path)
    torch.testing.assert_close(logits(depgraph.load_pretrained(path), ids), out, atol=1e-6, rtol=1e-5)


@given(arch=architectures(), data=st.data())
def test_iterative_pruning_matches_one_shot(arch, data):
    """Two cuts through the same graph (units renumbered) equal masking the union once."""
    family, overrides = arch
    model = build(family, overrides)
    masked = copy.deepcopy(model)
    ids = example_ids(model)
    graph = depgraph.trace(model)
    group = max(graph.groups("A"), key=lambda g: g.size)
    if group.size < 3:
        return
    first = data.draw(st.lists(st.integers(0, group.size - 1), min_size=1, max_size=group.size - 2, unique=True))
    alive = [u for u in range(group.size) if u not in first]
    graph.prune({group: first})
    second = data.draw(st.lists(st.integers(0, group.size - 1), min_size=1, max_size=group.size - 1, unique=True))
    graph.prune({group: second})
    removed = set(first) | {alive[i] for i in second}
    mgraph = depgraph.trace(masked)
    mgroup = next(g for g in mgraph.groups("A") if g.name == group.name)
    depgraph.zero_mask(mgraph, {mgroup: sorted(removed)})
    torch.testing.assert_close(logits(model, ids), logits(masked, ids), atol=1e-5, rtol=1e-4)


# ---- the contract example, errors and atomicity ---------------------------------------------------

def contract_model() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    return transformers.LlamaForCausalLM(config).eval()


def test_contract_example_prunes_and_updates_attributes(tmp_path):
    model = contract_model()
    ids = torch.randint(0, 1000, (2, 8))
    graph = depgraph.trace(model)
    a0 = next(g for g in graph.groups("A") if "layers.0.mlp" in g.name)
    b1 = next(g for g in graph.groups("B") if "layers.1" in g.name)
    report = graph.prune({a0: [0, 5, 7], b1: [1]})
    assert report.units_removed == {a0.name: 3, b1.name: 1}
    mlp, attn = model.model.layers[0].mlp, model.model.layers[1].self_attn
    assert mlp.up_proj.weight.shape == (125, 64) and mlp.up_proj.out_features == 125
    assert mlp.down_proj.weight.shape == (64, 125) and mlp.down_proj.in_features == 125
    assert attn.q_proj.weight.shape == (32, 64) and attn.k_proj.out_features == 16
    assert attn.o_proj.in_features == 32
    assert a0.size == 125 and b1.size == 1
    assert model.config.head_dim == 16
    depgraph.save_pretrained(model, tmp_path)
    torch.testing.assert_close(logits(depgraph.load_pretrained(tmp_path), ids), logits(model, ids))


def test_uniform_prune_reloads_with_plain_transformers(tmp_path):
    model = contract_model()
    ids = torch.randint(0, 1000, (2, 8))
    graph = depgraph.trace(model)
    plan = {g: list(range(g.size // 4 or 1)) for g in graph.groups()}
    graph.prune(plan)
    assert model.config.intermediate_size == 96
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1
    assert model.config.hidden_size == 48 and model.config.head_dim == 16
    state = depgraph.save_pretrained(model, tmp_path)
    assert state["hf_compatible"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids))


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "opt", "bert", "gemma", "gpt_neox", "falcon"])
def test_non_uniform_prune_round_trips(family, tmp_path):
    model = tiny_model(family)
    ids = example_ids(model)
    graph = depgraph.trace(model)
    plan = {}
    for g in graph.groups():
        layer_one = ".1." in g.name + "."
        n = g.size // 2 if layer_one else g.size // 4
        if n >= 1 and n < g.size:
            plan[g] = list(range(0, 2 * n, 2))[:n]
    graph.prune(plan)
    state = depgraph.save_pretrained(model, tmp_path)
    assert not state["hf_compatible"]
    torch.testing.assert_close(logits(depgraph.load_pretrained(tmp_path), ids), logits(model, ids))


def test_tied_embeddings_stay_tied_and_counted_once():
    model = tiny_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    graph = depgraph.trace(model)
    before = depgraph.count_parameters(model)
    (hidden,) = graph.groups("C")
    assert [m.param for m in hidden.members].count("transformer.wte.weight") == 1
    graph.prune({hidden: [0, 1, 2, 3]})
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.shape == (1000, 60)
    assert depgraph.count_parameters(model) < before


@pytest.mark.parametrize("bad, message", [
    (lambda g: {g: [128]}, "out of range"),
    (lambda g: {g: [-1]}, "out of range"),
    (lambda g: {g: [3, 3]}, "duplicate"),
    (lambda g: {g: list(range(128))}, "removes all"),
    (lambda g: {g: [0.5]}, "integers"),
    (lambda g: {"model.layers.0.mlp": [1]}, "not a depgraph Group"),
])
def test_invalid_plans_raise_and_leave_model_unchanged(bad, message):
    model = contract_model()
    graph = depgraph.trace(model)
    a0 = graph.groups("A")[0]
    b0 = graph.groups("B")[0]
    snap = snapshot(model)
    plan = {b0: [0], **bad(a0)}  # a valid entry first: nothing may be applied before the error
    with pytest.raises(depgraph.PruneError, match=message):
        graph.prune(plan)
    assert_unchanged(model, snap)


def test_group_from_another_graph_is_rejected():
    model = contract_model()
    graph = depgraph.trace(model)
    other = depgraph.trace(copy.deepcopy(model))
    snap = snapshot(model)
    with pytest.raises(depgraph.PruneError, match="not a group of this graph"):
        graph.prune({other.groups("A")[0]: [0]})
    assert_unchanged(model, snap)


def test_stale_graph_is_rejected():
    model = contract_model()
    graph = depgraph.trace(model)
    other = depgraph.trace(model)
    other.prune({other.groups("A")[0]: [0]})  # cut behind the first graph's back
    with pytest.raises(depgraph.PruneError, match="re-trace"):
        graph.prune({graph.groups("A")[0]: [1]})


class HardCodedWidth(nn.Module):
    """Traces fine, but its forward hard-codes the hidden width: a cut of it cannot run."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.norm = nn.LayerNorm(32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)
        self.head = nn.Linear(32, 50)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.down(torch.relu(self.up(self.norm(h))))
        return self.head(h.reshape(*ids.shape, 32))


def test_cut_that_breaks_forward_is_rolled_back():
    model = HardCodedWidth().eval()
    ids = torch.randint(0, 50, (2, 5))
    graph = depgraph.trace(model, (ids,))
    (hidden,) = graph.groups("C")
    snap_state = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = (model.up.in_features, model.norm.normalized_shape)
    with pytest.raises(depgraph.PruneError, match="no longer runs"):
        graph.prune({hidden: [0, 1]})
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap_state[k])
    assert (model.up.in_features, model.norm.normalized_shape) == shapes
    assert hidden.size == 32
    (neurons,) = graph.groups("A")  # the model is still fully usable
    graph.prune({neurons: [0, 1]})
    assert model.up.out_features == 62 and model(ids).shape == (2, 5, 50)


def test_meta_device_model_can_be_cut():
    config = config_for("llama")
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    graph = depgraph.trace(model)
    a0 = graph.groups("A")[0]
    graph.prune({a0: list(range(10))}, verify=False)
    assert model.model.layers[0].mlp.up_proj.weight.shape == (118, 64)
    assert model.model.layers[0].mlp.up_proj.weight.device.type == "meta"


def tiny_mixtral() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                        num_local_experts=4, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(config).eval()


def test_moe_fused_experts_group_and_cut_exactly(tmp_path):
    """Fused 3-D experts: a unit is neuron j of every expert; the router reads the hidden channels."""
    model = tiny_mixtral()
    ids = torch.randint(0, 1000, (2, 8))
    masked = copy.deepcopy(model)
    graph = depgraph.trace(model)
    assert [g.size for g in graph.groups("A")] == [32, 32]
    experts = graph.groups("A")[0]
    assert {(m.param, m.dim) for m in experts.members} == {
        ("model.layers.0.mlp.experts.gate_up_proj", 1), ("model.layers.0.mlp.experts.down_proj", 2)}
    assert experts.member("model.layers.0.mlp.experts.gate_up_proj").indices([3]).tolist() == [3, 35]
    (hidden,) = graph.groups("C")
    assert ("model.layers.0.mlp.gate.weight", 1) in {(m.param, m.dim) for m in hidden.members}
    units = [0, 3, 5, 9]
    mgraph = depgraph.trace(masked)
    depgraph.zero_mask(mgraph, {mgraph.groups("A")[0]: units})
    graph.prune({experts: units})
    torch.testing.assert_close(logits(model, ids), logits(masked, ids), atol=1e-5, rtol=1e-4)
    graph.prune({hidden: list(range(16))})
    depgraph.save_pretrained(model, tmp_path)
    torch.testing.assert_close(logits(depgraph.load_pretrained(tmp_path), ids), logits(model, ids))


def test_moe_cut_that_breaks_grouped_matmul_strides_is_refused():
    model = tiny_mixtral()
    graph = depgraph.trace(model)
    snap = snapshot(model)
    with pytest.raises(depgraph.PruneError, match="multiple of 4"):
        graph.prune({graph.groups("A")[0]: [1, 2, 3]})
    assert_unchanged(model, snap)


# ---- a head count written in a reshape must be one the cut updates ------------------------------------

class _NamedHeadAttention(nn.Module):
    """``view(b, t, self.<attr>, -1)``: with ``attr="nh"`` the head count lives in an attribute the cut does not
    know, so a cut would leave it stale and re-split the remaining rows into smaller heads. With ``norm_q`` the
    heads are a non-exact group (an RMSNorm over all heads), where only the forward check would run."""

    def __init__(self, norm_q: bool, attr: str = "nh"):
        super().__init__()
        self.attr = attr
        setattr(self, attr, 4)
        self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))
        self.qn = nn.RMSNorm(32) if norm_q else nn.Identity()

    def forward(self, x):
        b, t, _ = x.shape
        n = getattr(self, self.attr)
        q = self.qn(self.q(x)).view(b, t, n, -1).transpose(1, 2)
        k = self.k(x).view(b, t, n, -1).transpose(1, 2)
        v = self.v(x).view(b, t, n, -1).transpose(1, 2)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class _NamedHeadModel(nn.Module):
    def __init__(self, norm_q: bool, attr: str = "nh"):
        super().__init__()
        self.e, self.a, self.h = nn.Embedding(50, 32), _NamedHeadAttention(norm_q, attr), nn.Linear(32, 50)

    def forward(self, ids):
        x = self.e(ids)
        return self.h(x + self.a(x))


@pytest.mark.parametrize("norm_q", [False, True])
def test_head_count_in_unknown_attribute_is_never_left_stale(norm_q):
    torch.manual_seed(0)
    model = _NamedHeadModel(norm_q).eval()
    x = torch.randint(0, 50, (1, 6))
    graph = depgraph.trace(model, (x,))
    heads = graph.groups("B")
    if heads:  # if the heads are offered at all, a cut must be refused (never accepted with nh == 4)
        with pytest.raises(depgraph.PruneError):
            graph.prune({heads[0]: [1]})
        assert model.a.q.weight.shape[0] == 32 and model.a.nh == 4
    else:
        assert "written in the code" in graph.frozen[("a.q.weight", 0)]
        assert any(w.startswith("a:") and "kept whole" in w for w in graph.warnings)


def test_head_count_in_a_head_attribute_stays_prunable():
    torch.manual_seed(0)
    model = _NamedHeadModel(norm_q=True, attr="num_heads").eval()
    x = torch.randint(0, 50, (1, 6))
    graph = depgraph.trace(model, (x,))
    heads = graph.groups("B")
    assert [g.name for g in heads] == ["a"] and heads[0].size == 4 and not heads[0].exact
    graph.prune({heads[0]: [1]})
    assert model.a.num_heads == 3 and model.a.q.weight.shape[0] == 24
    with torch.no_grad():
        assert model(x).shape == (1, 6, 50)
