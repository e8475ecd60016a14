"""Depth-independent analysis (depgraph/replicate.py): replicating 3 analysed blocks gives exactly the
graph a full analysis gives (groups, order, names, members, shapes, frozen dims, channel-space graph,
couplings), the same pruned model, falls back whenever blocks differ, and never changes the model."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
import transformers
from models import example_ids, tiny_model

import depgraph
from depgraph import replicate
from depgraph.trace import normalise_inputs

torch.set_num_threads(1)
LAYERS = 5


def _model(family: str, layers: int = LAYERS, **overrides):
    if family == "mixtral":
        config = transformers.MixtralConfig(
            hidden_size=32, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, num_local_experts=4,
            num_experts_per_tok=2, **overrides)
        torch.manual_seed(0)
        return transformers.MixtralForCausalLM(config).eval()
    if family == "qwen3_5":  # hybrid: gated delta-net and attention layers alternate
        config = transformers.Qwen3_5TextConfig(
            vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, head_dim=16, linear_key_head_dim=16,
            linear_value_head_dim=16, **overrides)
        torch.manual_seed(0)
        return transformers.Qwen3_5ForCausalLM(config).eval()
    if family in ("starcoder2", "olmo", "stablelm"):  # rest of the coverage sample
        name = {"starcoder2": "Starcoder2", "olmo": "Olmo", "stablelm": "StableLm"}[family]
        config = getattr(transformers, f"{name}Config")(
            vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, **overrides)
        torch.manual_seed(0)
        return getattr(transformers, f"{name}ForCausalLM")(config).eval()
    key = "n_layer" if family == "gpt2" else "num_hidden_layers"
    return tiny_model(family, **{key: layers, **overrides})


def canonical(graph) -> dict:
    """Everything a consumer can read from a graph, as plain data."""
    groups = [(g.kind.value, g.name, g.size, g.exact, g.frozen_units,
               sorted((k, repr(v)) for k, v in g.extra.items()),
               [(m.param, m.dim, m.role, m.order, m.is_buffer, m.unit_of_index.tolist()) for m in g.members])
              for g in graph.groups()]
    return {
        "groups": groups, "param_shapes": list(graph.param_shapes.items()), "buffers": sorted(graph.buffers),
        "experts": sorted(graph.expert_params), "frozen": list(graph.frozen.items()), "warnings": graph.warnings,
        "unknown_ops": graph.unknown_ops, "n_nodes": graph.n_nodes, "ops": sorted(graph.ops.items()),
        "nx_nodes": list(graph.nx.nodes(data=True)), "nx_edges": list(graph.nx.edges(data=True)),
        "summary": graph.summary(),
    }


def replicated(model):
    return replicate.replicated_trace(model, normalise_inputs(model, None))


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()}


FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "bert", "gemma", "qwen3", "phi3", "phi", "gpt_neox", "opt",
            "starcoder2", "olmo", "stablelm", "mixtral"]


@pytest.mark.parametrize("family", FAMILIES)
def test_replicated_graph_is_the_full_graph(family):
    assert_replicates_exactly(_model(family))


@pytest.mark.parametrize("family, layers, period, overrides", [
    ("gemma2", 8, 2, {}), ("qwen3_5", 12, 3, {"full_attention_interval": 3})])
def test_periodic_blocks_replicate_by_period(family, layers, period, overrides):
    """Alternating sliding / full attention (Gemma-2) and a hybrid with one attention layer per 2 linear
    (gated delta-net) ones repeat with a period: units of ``period`` blocks are replicated."""
    model = _model(family, layers=layers, **overrides)
    assert replicate.uniform_blocks(model)[2] == period
    assert_replicates_exactly(model)


def assert_replicates_exactly(model) -> None:
    full = depgraph.trace(model, replicate=False)
    rep = replicated(model)
    assert rep is not None, replicate.uniform_blocks(model)
    a, b = canonical(full), canonical(rep)
    for key in a:
        assert a[key] == b[key], key
    # couplings of single channels (the component arrays) agree too
    for param, shape in list(full.param_shapes.items())[::7]:
        for dim in range(len(shape)):
            for index in (0, shape[dim] - 1):
                assert full.coupled(param, index, dim) == rep.coupled(param, index, dim)
    # and the default trace takes the replicated path
    assert canonical(depgraph.trace(model)) == a


def _plan(graph) -> dict:
    plan = {}
    for g in graph.groups():
        n = g.size // 4
        if n and g.kind.value in "AB":
            plan[g.name] = list(range(1, 1 + n))
    return plan


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_same_plan_gives_the_same_pruned_model(family):
    model = _model(family)
    one, two = copy.deepcopy(model), copy.deepcopy(model)
    g1, g2 = depgraph.trace(one, replicate=False), depgraph.trace(two)
    p1, p2 = _plan(g1), _plan(g2)
    assert p1 == p2 and p1
    g1.prune({g1.group(n): u for n, u in p1.items()})
    g2.prune({g2.group(n): u for n, u in p2.items()})
    s1, s2 = state(one), state(two)
    assert list(s1) == list(s2)
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    ids = example_ids(one) if family != "mixtral" else torch.randint(2, 100, (2, 8))
    with torch.no_grad():
        assert torch.equal(one(ids).logits, two(ids).logits)
    assert canonical(g1) == canonical(g2)  # the graphs stay alike after the cut


def test_non_uniform_cut_falls_back():
    model = _model("llama")
    graph = depgraph.trace(model)
    mlp = graph.group("model.layers.2.mlp")
    graph.prune({mlp: [0, 1, 2, 3]})  # only layer 2 is narrower now
    assert isinstance(replicate.uniform_blocks(model), str)
    assert replicated(model) is None
    assert canonical(depgraph.trace(model)) == canonical(depgraph.trace(model, replicate=False))


def test_odd_layer_falls_back():
    model = _model("llama")
    model.model.layers[3].self_attn.scaling = 0.5  # a visible attribute differs in one block
    assert "block 3" in replicate.uniform_blocks(model)
    assert replicated(model) is None


@pytest.mark.parametrize("family", ["gemma2", "qwen3_5"])
def test_alternating_layers_fall_back_and_match(family):
    model = _model(family)  # 5 blocks: the layer-type pattern does not repeat 4 times
    assert isinstance(replicate.uniform_blocks(model), str)
    assert canonical(depgraph.trace(model)) == canonical(depgraph.trace(model, replicate=False))


def test_blocks_reading_a_lifted_constant_fall_back():
    model = _model("falcon")  # its attention indexes k/v with a constant export lifts per block
    assert not isinstance(replicate.uniform_blocks(model), str)
    assert replicated(model) is None
    assert canonical(depgraph.trace(model)) == canonical(depgraph.trace(model, replicate=False))


def test_few_blocks_are_analysed_whole():
    model = _model("llama", layers=3)
    assert isinstance(replicate.uniform_blocks(model), str)


def test_layer_index_dependent_analysis_falls_back(monkeypatch):
    """Code paths that differ by layer index without a module difference are caught by comparing the
    representatives: here block 1's attention output is frozen by an op only it runs."""
    model = _model("llama")
    layer = model.model.layers[1]
    original = type(layer).forward

    def forward(self, hidden_states, *args, **kwargs):
        out = original(self, hidden_states, *args, **kwargs)
        if self.self_attn.layer_idx == 1:
            out = out + torch.diff(out, dim=-1, prepend=out[..., :1])  # an op without a rule
        return out

    monkeypatch.setattr(type(layer), "forward", forward)
    assert replicated(model) is None
    assert canonical(depgraph.trace(model)) == canonical(depgraph.trace(model, replicate=False))


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_model_unchanged_after_trace_and_interruption(monkeypatch, error):
    model = _model("llama")
    blocks = model.model.layers
    before = state(model)
    modules = [id(m) for m in model.modules()]
    depgraph.trace(model)
    assert model.model.layers is blocks and len(blocks) == LAYERS
    assert [id(m) for m in model.modules()] == modules

    def boom(*args, **kwargs):
        raise error("interrupted mid-trace")

    monkeypatch.setattr(replicate, "DependencyGraph", boom)
    if error is KeyboardInterrupt:
        with pytest.raises(KeyboardInterrupt):
            depgraph.trace(model)
    else:  # any failure of the representative analysis: the full analysis runs instead
        assert depgraph.trace(model).groups()
    assert model.model.layers is blocks and len(blocks) == LAYERS
    assert [id(m) for m in model.modules()] == modules
    after = state(model)
    assert list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)


def test_meta_model_replicates():
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000))
    rep = replicated(model.eval())
    assert rep is not None
    assert canonical(rep) == canonical(depgraph.trace(model, replicate=False))
    assert np.array_equal(rep.group("model.layers.5.mlp").members[0].indices(), np.arange(128))


# ---- behaviour that depends on the layer index but not on the modules (review of the replication) ----


class _Config(transformers.PretrainedConfig):
    model_type = "depgraph-test-blocks"


class _Block(torch.nn.Module):
    """A pre-norm MLP block; ``extra`` (an input only some layers get) goes through ``extra_proj``."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.norm = torch.nn.LayerNorm(16)
        self.up, self.down, self.extra_proj = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16), torch.nn.Linear(16, 16)

    def forward(self, x, extra=None):
        if extra is not None:
            x = x + self.extra_proj(extra)
        if self.skipped():
            return x
        return x + self.down(torch.relu(self.up(self.norm(x))))

    def skipped(self) -> bool:  # read in a helper: the forward itself has no index comparison
        return self.layer_idx in (getattr(self.config, "skip_layers", None) or ())


class _IndexBlock(_Block):
    def forward(self, x, extra=None):
        if self.layer_idx >= 5:  # a later layer computes differently, with the same modules
            return x
        return super().forward(x, extra)


class _Net(torch.nn.Module):
    def __init__(self, block=_Block, layers: int = 8, extra_at=(), **config):
        super().__init__()
        self.config = _Config(num_hidden_layers=layers, **config)
        self.embed, self.embed_extra = torch.nn.Embedding(50, 16), torch.nn.Embedding(50, 16)
        self.layers = torch.nn.ModuleList([block(self.config, i) for i in range(layers)])
        self.norm, self.head = torch.nn.LayerNorm(16), torch.nn.Linear(16, 50)
        self.extra_at = set(extra_at)

    def forward(self, ids):
        x, extra = self.embed(ids), self.embed_extra(ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, extra if i in self.extra_at else None)
        return self.head(self.norm(x))


class _StackNet(_Net):
    """The head reads every block's output (a mean over the stacked hidden states)."""

    def forward(self, ids):
        x, outs = self.embed(ids), []
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
        return self.head(self.norm(torch.stack(outs, -1).flatten(-2)[..., :16]))


class _FirstOutputNet(_Net):
    """Every block after the first also reads block 0's output (cross-layer sharing, ResFormer-like)."""

    def forward(self, ids):
        x = self.embed(ids)
        first = None
        for layer in self.layers:
            x = layer(x, first)
            first = x if first is None else first
        return self.head(self.norm(x))


def _net_graphs(net):
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 6))
    return replicate.replicated_trace(net.eval(), normalise_inputs(net, ids)), depgraph.trace(net, ids, replicate=False)


def test_uniform_custom_blocks_replicate():
    rep, full = _net_graphs(_Net(skip_layers=None))
    assert rep is not None and canonical(rep) == canonical(full)


@pytest.mark.parametrize("net, why", [
    (lambda: _Net(_IndexBlock), "compares its layer index"),  # ``if self.layer_idx >= 5`` in a forward
    (lambda: _Net(skip_layers=[5]), "block 5 differs"),  # a config list naming layers, read in a helper
    (lambda: _Net(extra_at=(5,)), "block 5 is called unlike block 1"),  # the parent loop treats layer 5 apart
    (lambda: _Net(extra_at=(7,)), "block 7 is called unlike block 2"),  # ... or the last layer
    (_StackNet, "the code after the blocks reads"),  # the head's input grows with depth
    (_FirstOutputNet, "block 2 reads"),  # block k reads block 0: unlike the previous block
])
def test_layer_index_behaviour_beyond_the_representatives_falls_back(caplog, net, why):
    """Without these checks each model replicated units 0-2 over a later layer that computes differently
    (silently wrong groups); now each falls back, and says why."""
    model = net()
    with caplog.at_level("DEBUG", logger="depgraph"):
        rep, full = _net_graphs(model)
    assert rep is None and why in caplog.text
    assert canonical(depgraph.trace(model, torch.randint(0, 50, (2, 6)))) == canonical(full)


def test_block_call_check_leaves_the_model_as_it_was():
    """The call check stubs block forwards and runs the model: forwards, an instance-level forward
    (accelerate-style), training flags, buffers, grads and the RNG are as before."""
    model = _model("llama").train()
    path, blocks, period = replicate.uniform_blocks(model)
    layer = blocks[4]
    hooked = functools.partial(type(layer).forward, layer)
    layer.forward = hooked
    flags = [m.training for m in model.modules()]
    rng = torch.random.get_rng_state()
    before = state(model)
    assert replicate.block_call_mismatch(model, normalise_inputs(model, None), blocks, period) is None
    assert layer.forward is hooked and all("forward" not in vars(b) for i, b in enumerate(blocks) if i != 4)
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_names_numbered_by_a_discarded_pass_fall_back(caplog):
    """PhiMoE's router: torch.export numbers its ``getitem`` nodes after a pass whose graph it discards, by
    every block, so block 0's names depend on depth; replicating gave other ``nx`` node names than the
    full analysis (found by the registry sweep). It falls back and says why."""
    config = transformers.PhimoeConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.PhimoeForCausalLM(config).eval()
    with caplog.at_level("INFO", logger="depgraph"):
        assert replicated(model) is None
    assert "FX names numbered from outside the graph" in caplog.text
    assert canonical(depgraph.trace(model)) == canonical(depgraph.trace(model, replicate=False))
