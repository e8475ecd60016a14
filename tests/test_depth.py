"""Depth pruning: block discovery, Minitron block importance, atomic block removal, save/reload."""

from __future__ import annotations

import copy

import pytest
import torch
from models import example_ids, tiny_model
from torch import nn

import depgraph
from depgraph.depth import block_importance, find_blocks, remove_layers, remove_least_important
from depgraph.errors import DepGraphError, PruneError

torch.set_num_threads(1)

N_LAYERS = 4
REMOVE = [0, 2]  # first and middle: every kept block moves, so a missing renumbering shows
BLOCK_PATHS = {"llama": "model.layers", "gpt2": "transformer.h", "opt": "model.decoder.layers",
               "phi3": "model.layers", "bert": "bert.encoder.layer", "gemma2": "model.layers",
               "gpt_neox": "gpt_neox.layers", "falcon": "transformer.h"}
RUN_FAMILIES = ["llama", "gpt2", "opt", "phi3", "bert", "gemma2"]
DECODERS = ["llama", "gpt2", "opt", "phi3", "gemma2"]


def _layers_kw(family: str, n: int) -> dict:
    kw = {"n_layer": n} if family == "gpt2" else {"num_hidden_layers": n}
    if family == "gemma2":
        # a window shorter than the test sequence, so sliding and full layers really differ
        kw["sliding_window"] = 4
    return kw


def _model(family: str, n: int = N_LAYERS, **kw) -> nn.Module:
    return tiny_model(family, **{**_layers_kw(family, n), **kw})


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _layer_idx(model: nn.Module) -> list[int]:
    _, blocks = find_blocks(model)
    return [m.layer_idx for block in blocks for m in block.modules() if isinstance(vars(m).get("layer_idx"), int)]


def _snapshot(model: nn.Module) -> tuple:
    _, blocks = find_blocks(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, [id(b) for b in blocks], _layer_idx(model), model.config.to_dict()


def _assert_same(model: nn.Module, snap: tuple) -> None:
    state, block_ids, idx, config = snap
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert [id(b) for b in find_blocks(model)[1]] == block_ids
    assert _layer_idx(model) == idx
    assert model.config.to_dict() == config


def _reference(family: str, original: nn.Module, kept: list[int]) -> nn.Module:
    """A model built with fewer layers from a hand-written config, loaded with the kept blocks' weights."""
    path = BLOCK_PATHS[family]
    overrides = _layers_kw(family, len(kept))
    if family == "gemma2":
        overrides["layer_types"] = [original.config.layer_types[i] for i in kept]
    ref = tiny_model(family, **overrides)
    rename = {f"{path}.{old}.": f"{path}.{new}." for new, old in enumerate(kept)}
    state = {}
    for key, value in original.state_dict().items():
        if key.startswith(f"{path}."):
            prefix = ".".join(key.split(".")[: path.count(".") + 2]) + "."
            if prefix not in rename:
                continue  # a removed block
            key = rename[prefix] + key[len(prefix):]
        state[key] = value
    ref.load_state_dict(state, strict=True)
    return ref


# ------------------------------------------------------------------------------------------ find_blocks


@pytest.mark.parametrize("family", list(BLOCK_PATHS))
def test_find_blocks_locates_the_layer_list(family):
    model = _model(family, n=2)
    path, blocks = find_blocks(model)
    assert path == BLOCK_PATHS[family]
    assert blocks is model.get_submodule(path) and len(blocks) == 2


def test_find_blocks_errors_and_explicit_path():
    with pytest.raises(DepGraphError, match="no nn.ModuleList"):
        find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))

    class TwoStacks(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
            self.decoder = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    two = TwoStacks()
    with pytest.raises(DepGraphError, match="pass path="):
        find_blocks(two)
    assert find_blocks(two, "decoder") == ("decoder", two.decoder)
    with pytest.raises(DepGraphError, match="no submodule"):
        find_blocks(two, "middle")
    # lists of parameter-free modules are not blocks
    with pytest.raises(DepGraphError, match="no nn.ModuleList"):
        find_blocks(nn.ModuleDict({"acts": nn.ModuleList([nn.ReLU(), nn.ReLU()])}))


# ------------------------------------------------------------------------------------------- removal


@pytest.mark.parametrize("family", RUN_FAMILIES)
def test_removal_equals_dropping_the_blocks_by_hand(family):
    model = _model(family)
    ids = example_ids(model, seq=12)
    kept = [i for i in range(N_LAYERS) if i not in REMOVE]
    reference = _reference(family, copy.deepcopy(model), kept)
    report = remove_layers(model, REMOVE)
    assert report.removed == tuple(REMOVE) and report.kept == tuple(kept)
    assert len(find_blocks(model)[1]) == len(kept)
    out = _logits(model, ids)
    assert out.shape[:2] == ids.shape and torch.isfinite(out).all()
    assert torch.equal(out, _logits(reference, ids))
    assert report.params_after == depgraph.count_parameters(reference) == depgraph.count_parameters(model)
    assert report.params_before > report.params_after


def test_gemma2_layer_types_decide_the_outcome():
    """Guard for the test above: with stale layer_types the kept blocks would get the wrong masks."""
    model = _model("gemma2")
    ids = example_ids(model, seq=12)
    kept = [1, 3]
    assert [model.config.layer_types[i] for i in kept] != model.config.layer_types[:2]
    stale = tiny_model("gemma2", **_layers_kw("gemma2", 2), layer_types=model.config.layer_types[:2])
    stale.load_state_dict(_reference("gemma2", model, kept).state_dict())
    remove_layers(model, REMOVE)
    assert model.config.layer_types == ["full_attention", "full_attention"]
    assert not torch.allclose(_logits(model, ids), _logits(stale, ids), atol=1e-4)


@pytest.mark.parametrize("family", DECODERS)
def test_kv_cache_still_works_after_removal(family):
    model = _model(family)
    ids = example_ids(model, seq=12)
    remove_layers(model, REMOVE)
    assert _layer_idx(model) == [0, 1]
    with torch.no_grad():
        full = model(input_ids=ids).logits
        prefix = model(input_ids=ids[:, :8], use_cache=True)
        cache = getattr(prefix, "cache", None) or prefix.past_key_values
        assert cache is not None and len(cache.layers) == 2
        step = model(input_ids=ids[:, 8:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(step, full[:, 8:], atol=1e-5, rtol=1e-4)


def test_layer_idx_and_config_are_renumbered():
    model = _model("llama")
    moved = [find_blocks(model)[1][i] for i in (1, 3)]
    report = remove_layers(model, [2, 0])  # order does not matter
    assert report.removed == (0, 2)
    _, blocks = find_blocks(model)
    assert list(blocks) == moved  # the very same modules, in order
    assert [b.self_attn.layer_idx for b in blocks] == [0, 1]
    assert model.config.num_hidden_layers == 2
    assert ("config", "num_hidden_layers", 4, 2) in report.edits
    assert ("model.layers.0.self_attn", "layer_idx", 1, 0) in report.edits
    assert "removed blocks [0, 2]" in str(report) and 0 < report.ratio < 1

    gpt2 = _model("gpt2")
    remove_layers(gpt2, [1])
    assert gpt2.config.n_layer == gpt2.config.num_hidden_layers == 3
    assert [b.attn.layer_idx for b in gpt2.transformer.h] == [0, 1, 2]

    qwen2 = _model("qwen2", layer_types=["full_attention", "sliding_attention", "full_attention",
                                         "sliding_attention"], use_sliding_window=True, sliding_window=4)
    remove_layers(qwen2, [1])
    assert qwen2.config.layer_types == ["full_attention", "full_attention", "sliding_attention"]


def test_offset_layer_numbers_keep_their_offset():
    class Block(nn.Module):
        def __init__(self, i):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.layer_number = i + 1  # Megatron style: 1-based

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(i) for i in range(4)])

    toy = Toy()
    remove_layers(toy, [1])
    assert [b.layer_number for b in toy.blocks] == [1, 2, 3]


@pytest.mark.parametrize("bad, match", [
    ([4], "out of range"), ([-1], "out of range"), ([1, 1], "repeated"), ([0, 1, 2, 3], "leave none"),
    ([1.0], "not an integer"), ([True], "not an integer"), ("01", "sequence"), (3, "sequence"),
])
def test_invalid_indices_raise_and_leave_the_model_unchanged(bad, match):
    model = _model("gemma2")
    snap = _snapshot(model)
    with pytest.raises(PruneError, match=match):
        remove_layers(model, bad)
    _assert_same(model, snap)


def test_remove_least_important_validates_scores_and_n():
    model = _model("llama")
    snap = _snapshot(model)
    for scores, n, match in [([0.1, 0.2, 0.3], 1, "3 scores for 4"), ([0.1, float("nan"), 0.3, 0.4], 1, "NaN"),
                             ([0.1, 0.2, 0.3, 0.4], 4, "at least one"), ([0.1, 0.2, 0.3, 0.4], -1, "0..3")]:
        with pytest.raises(PruneError, match=match):
            remove_least_important(model, scores, n)
        _assert_same(model, snap)
    assert remove_least_important(model, [0.5, 0.5, 0.5, 0.5], 0).removed == ()
    _assert_same(model, snap)
    report = remove_least_important(model, torch.tensor([0.3, 0.1, 0.3, 0.1]), 2)
    assert report.removed == (1, 3)


def test_a_failure_midway_rolls_everything_back(monkeypatch):
    model = _model("gemma2")
    snap = _snapshot(model)

    def boom(self, idx):
        raise RuntimeError("simulated failure while deleting")

    monkeypatch.setattr(nn.ModuleList, "__delitem__", boom)
    with pytest.raises(PruneError, match="left unchanged"):
        remove_layers(model, REMOVE)
    monkeypatch.undo()
    _assert_same(model, snap)


# ------------------------------------------------------------------------------------- save / reload


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_pretrained_reloads_with_plain_from_pretrained(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model(family)
    ids = example_ids(model)
    remove_layers(model, REMOVE)
    state = depgraph.save_pretrained(model, tmp_path)
    assert state["hf_compatible"]  # uniform: the config alone describes the pruned model
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert len(find_blocks(reloaded)[1]) == 2
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))


def test_gpt2_inverse_layer_scaling_survives_removal_and_reload(tmp_path):
    """GPT-2 may scale attention by 1/(layer_idx+1), fixed at build time: the kept blocks keep their
    original scale, which a fresh model with renumbered layers does not have -> depgraph's checkpoint."""
    model = _model("gpt2", scale_attn_by_inverse_layer_idx=True)
    ids = example_ids(model)
    kept = [i for i in range(N_LAYERS) if i not in REMOVE]
    reference = _reference("gpt2", copy.deepcopy(model), kept)
    remove_layers(model, REMOVE)
    out = _logits(model, ids)
    assert not torch.allclose(out, _logits(reference, ids), atol=1e-4)  # a renumbered fresh model differs
    state = depgraph.save_pretrained(model, tmp_path)
    assert not state["hf_compatible"]
    assert torch.equal(_logits(depgraph.load_pretrained(tmp_path), ids), out)


def test_depth_after_a_non_uniform_width_cut_reloads(tmp_path):
    model = _model("llama", n=3)
    ids = example_ids(model)
    graph = depgraph.trace(model)
    mlp = next(g for g in graph.groups("A") if g.name.startswith("model.layers.2."))
    graph.prune({mlp: list(range(10))})
    report = remove_layers(model, [0])
    # the remembered unpruned config follows the depth cut, or load_pretrained would build 3 layers
    assert ("_depgraph_base_config", "num_hidden_layers", 3, 2) in report.edits
    depgraph.save_pretrained(model, tmp_path)
    assert torch.equal(_logits(depgraph.load_pretrained(tmp_path), ids), _logits(model, ids))


# ------------------------------------------------------------------------------------ block importance


def _identity_block(model: nn.Module, i: int) -> None:
    """Zero the residual branches' output projections: the block then returns its input exactly."""
    block = find_blocks(model)[1][i]
    with torch.no_grad():
        for name, param in block.named_parameters():
            if any(k in name for k in ("o_proj", "down_proj", "attn.c_proj", "mlp.c_proj")):
                param.zero_()


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_identity_block_scores_zero_and_goes_first(family):
    model = _model(family)
    _identity_block(model, 2)
    ids = example_ids(model, batch=3, seq=10)
    hooks = _hook_count(model)
    scores = block_importance(model, ids, progress=False)
    assert scores.shape == (N_LAYERS,) and scores.dtype == torch.float32
    assert abs(float(scores[2])) < 1e-6
    others = scores[[0, 1, 3]]
    assert (others > 1e-3).all()
    assert _hook_count(model) == hooks
    angular = block_importance(model, ids, metric="angular", progress=False)
    assert abs(float(angular[2])) < 1e-6 and (angular[[0, 1, 3]] > 1e-3).all()
    report = remove_least_important(model, scores, 1)
    assert report.removed == (2,)


def test_block_importance_is_deterministic_and_input_forms_agree():
    model = _model("llama")
    ids = example_ids(model, batch=3, seq=10)
    a = block_importance(model, ids, progress=False)
    b = block_importance(model, ids, progress=False)
    assert torch.equal(a, b)
    rows = block_importance(model, [row[None] for row in ids], progress=False)
    torch.testing.assert_close(rows, a, atol=1e-6, rtol=0)


def test_block_importance_ignores_padding_and_restores_state():
    model = _model("llama")
    ids = example_ids(model, batch=1, seq=8)
    plain = block_importance(model, ids, progress=False)
    padded = torch.cat([ids, torch.full((1, 4), 5)], dim=1)
    mask = torch.tensor([[1] * 8 + [0] * 4])
    masked = block_importance(model, [{"input_ids": padded, "attention_mask": mask}], progress=False)
    torch.testing.assert_close(masked, plain, atol=1e-5, rtol=0)
    unmasked = block_importance(model, padded, progress=False)
    assert not torch.allclose(unmasked, plain, atol=1e-5)  # the pads would have counted

    model.train()
    hooks = _hook_count(model)
    block_importance(model, ids, progress=False)
    assert all(m.training for m in model.modules())
    with pytest.raises(DepGraphError, match=r"token id 10000 is out of range.*\[0, 999\]"):  # refused up front
        block_importance(model, torch.full((1, 4), 10_000), progress=False)
    def fail(*_):
        raise RuntimeError("boom")

    handle = find_blocks(model)[1][1].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):  # the forward fails midway
        block_importance(model, ids, progress=False)
    handle.remove()
    assert _hook_count(model) == hooks and all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="unknown block importance metric"):
        block_importance(model, ids, metric="ppl")


def test_block_importance_reads_tuple_outputs_and_keyword_inputs():
    class Block(nn.Module):
        def __init__(self, sign: float):
            super().__init__()
            self.sign = sign
            self.proj = nn.Linear(8, 8)

        def forward(self, hidden_states, mask=None):
            if self.sign == 0:
                return (hidden_states + self.proj(hidden_states), None)
            return (self.sign * hidden_states, None)  # a rescaled copy keeps its direction

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(16, 8)
            self.layers = nn.ModuleList([Block(2.0), Block(0.0), Block(-1.0)])

        def forward(self, input_ids):
            h = self.embed(input_ids)
            for layer in self.layers:
                h = layer(hidden_states=h)[0]
            return h

    scores = block_importance(Toy(), torch.randint(0, 16, (2, 6)), progress=False)
    assert abs(float(scores[0])) < 1e-6  # same direction: unimportant
    assert 1e-3 < float(scores[1]) < 2.0
    assert abs(float(scores[2]) - 2.0) < 1e-6  # flips the direction: cos = -1

