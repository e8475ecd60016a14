"""The calibration module: batch validation, the no-cache forward, eval-mode restore, layer index;
and where ids enter (trace, score, block/expert importance, sparsify) they are checked up front."""

from __future__ import annotations

import copy

import pytest
import torch
from models import example_ids, tiny_model

import depgraph
from depgraph import calibration
from depgraph.errors import CalibrationError, DepGraphError, TraceError


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def test_batches_normalise_shapes_and_kinds():
    ids = torch.arange(12).reshape(3, 4)
    out = calibration.batches(ids, vocab=100)
    assert [tuple(b.shape) for b in out] == [(1, 4)] * 3
    assert [tuple(b.shape) for b in calibration.batches(ids[0], vocab=100)] == [(1, 4)]
    mixed = calibration.batches([ids[0], ids[:2], {"input_ids": ids}], vocab=100)
    assert [tuple(b.shape) for b in mixed[:2]] == [(1, 4), (2, 4)] and mixed[2]["input_ids"] is ids
    x = torch.randn(2, 3)
    assert calibration.batches(x)[0] is x  # a float tensor is one batch of a non-LM model's input
    assert calibration.batches([(x, x)])[0] == (x, x)


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([[1, 2, 100]]), r"token id 100 is out of range.*100 ids.*\[0, 99\]"),
    (torch.tensor([[1, -3, 2]]), r"token id -3 is negative.*\[0, 99\]"),
    (torch.ones(2, 2, 2, dtype=torch.long), r"must be \[L\] or \[N, L\], got shape \(2, 2, 2\)"),
    (torch.ones(1, 4), r"integer tensor.*float32"),
    (torch.ones(1, 4, dtype=torch.bool), r"integer tensor.*bool"),
    (torch.ones(1, 0, dtype=torch.long), r"empty"),
    ([], r"empty"),
    ("some text", r"tokenize it first"),
    ([{"input_ids": torch.tensor([[5, 200]])}], r"input_ids.*200 is out of range"),
    ([torch.tensor([1, 2]), torch.tensor([[7, 150]])], r"calib\[1\]: token id 150"),
    ([3.5], r"calib\[0\]: a batch must be"),
])
def test_batches_refuse_bad_ids_naming_range_and_value(bad, match):
    with pytest.raises(CalibrationError, match=match):
        calibration.batches(bad, vocab=100, ids_only=True)
    assert issubclass(CalibrationError, DepGraphError) and issubclass(CalibrationError, ValueError)


def test_vocab_size_reads_embedding_then_config(llama):
    assert calibration.vocab_size(llama) == 1000
    assert calibration.vocab_size(torch.nn.Linear(2, 2)) is None


def test_eval_mode_restores_each_module_flag_even_on_error(llama):
    model = copy.deepcopy(llama)
    model.train()
    model.model.layers[0].eval()  # a deliberately mixed state: model.train(True) would lose it
    before = {n: m.training for n, m in model.named_modules()}
    with pytest.raises(RuntimeError), calibration.eval_mode(model):
        assert not any(m.training for m in model.modules())
        raise RuntimeError("midway")
    assert {n: m.training for n, m in model.named_modules()} == before


def test_forward_runs_without_cache_on_every_batch_kind(llama):
    ids = example_ids(llama, batch=1, seq=5)
    with torch.no_grad():
        a = calibration.forward(llama, ids).logits
        b = calibration.forward(llama, {"input_ids": ids}).logits
        c = calibration.forward(llama, (ids,)).logits
        out = calibration.forward(llama, ids)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    assert getattr(out, "past_key_values", None) is None  # no cache was built


def test_layer_index_and_prefix():
    assert calibration.layer_index("model.layers.3.mlp.up_proj.weight") == 3
    assert calibration.layer_index("0.weight") == 0
    assert calibration.layer_index("model.embed_tokens.weight") is None
    assert calibration.layer_index("model.layer10x.weight") is None  # not a whole path component
    assert calibration.layer_prefix("model.layers.12.self_attn.q_proj") == "model.layers.12"
    assert calibration.layer_prefix("lm_head.weight") == ""
    graph = depgraph.trace(tiny_model("llama"))
    from depgraph.pruner import layer_index
    assert sorted({layer_index(g) for g in graph.groups("B")}) == [0, 1]
    assert all(layer_index(g) is None for g in graph.groups("C"))


def test_trace_refuses_example_ids_outside_the_vocabulary(llama):
    """Regression: ids >= vocab_size traced fine and the next prune was blamed ("no longer runs forward")."""
    bad = torch.tensor([[1, 2, 1000, 3]])
    with pytest.raises(TraceError, match=r"token id 1000 is out of range.*\[0, 999\]"):
        depgraph.trace(llama, example_inputs=(bad,))
    with pytest.raises(TraceError, match=r"input_ids.*token id -1 is negative"):
        depgraph.trace(llama, example_inputs={"input_ids": torch.tensor([[1, -1]])})
    with pytest.raises(TraceError, match="integer tensor"):
        depgraph.trace(llama, example_inputs={"input_ids": torch.ones(1, 4)})
    depgraph.trace(llama, example_inputs=(torch.tensor([[0, 999, 5]]),))  # the edges of the range trace


def test_scoring_and_importance_refuse_out_of_range_calib_before_any_forward(llama):
    model = copy.deepcopy(llama)
    graph = depgraph.trace(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    bad = torch.tensor([[1, 2, 3, 5000]])
    with pytest.raises(CalibrationError, match=r"5000.*\[0, 999\]"):
        depgraph.score(graph, "wanda", calib=bad, progress=False)
    with pytest.raises(CalibrationError, match=r"5000.*\[0, 999\]"):
        depgraph.block_importance(model, bad, progress=False)
    with pytest.raises(CalibrationError, match=r"5000.*\[0, 999\]"):
        depgraph.sparsify(model, "wanda", 0.5, calib=bad, progress=False)
    handle.remove()
    assert not calls  # refused before the first forward pass
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_expert_importance_refuses_out_of_range_calib():
    import transformers
    config = transformers.MixtralConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                        num_local_experts=4, num_experts_per_tok=2)
    model = transformers.MixtralForCausalLM(config).eval()
    with pytest.raises(CalibrationError, match=r"token id 100 is out of range.*\[0, 99\]"):
        depgraph.expert_importance(model, torch.tensor([[1, 100]]), progress=False)
