"""Tests for depgraph.sparsity: exact counts, patterns, Wanda's row-wise rule, masks, Conv1D, sensitivity."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from depgraph.sparsity import (
    SensitivityResult,
    check_n_m,
    is_masked,
    make_permanent,
    sensitivity,
    sparsify,
    storage_report,
)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def token_ids(seed: int = 1, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(seed))


def linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and n != "lm_head"}


def out_in(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    return weight.t() if isinstance(module, Conv1D) else weight


@pytest.fixture
def llama() -> LlamaForCausalLM:
    return tiny_llama()


# ---------------------------------------------------------------- magnitude


@pytest.mark.parametrize("target", [0.3, 0.5, 0.77])
def test_magnitude_layer_exact_count_and_smallest(llama, target):
    dense = {n: m.weight.detach().clone() for n, m in linears(llama).items()}
    report = sparsify(llama, "magnitude", target, progress=False)
    assert [r.name for r in report.layers] == list(dense)
    for row in report.layers:
        module = linears(llama)[row.name]
        w = dense[row.name]
        pruned = module.weight_mask == 0
        assert int(pruned.sum()) == round(target * w.numel()) == row.zeros == row.masked
        assert int((module.weight == 0).sum()) == row.zeros
        # every pruned |w| <= every kept |w| (per layer, not per row)
        assert w[pruned].abs().max() <= w[~pruned].abs().min()
    assert not is_masked(llama.lm_head) and not hasattr(llama.lm_head, "weight_orig")


def test_magnitude_global_one_threshold(llama):
    dense = {n: m.weight.detach().clone() for n, m in linears(llama).items()}
    report = sparsify(llama, "magnitude", 0.6, scope="global", progress=False)
    total = sum(w.numel() for w in dense.values())
    zeros = sum(row.zeros for row in report.layers)
    assert zeros == round(0.6 * total)
    assert report.overall_sparsity == pytest.approx(zeros / total)
    pruned = torch.cat([dense[n][linears(llama)[n].weight_mask == 0].abs() for n in dense])
    kept = torch.cat([dense[n][linears(llama)[n].weight_mask == 1].abs() for n in dense])
    assert pruned.max() <= kept.min()
    # layers with different init scale end at different sparsities (not per-layer 0.6)
    assert len({round(row.sparsity, 3) for row in report.layers}) > 1


def test_sparsity_dict_longest_prefix_wins(llama):
    plan = {"model.layers.0": 0.2, "model.layers.1.mlp": 0.7, "model.layers.1.mlp.down_proj": 0.9}
    report = sparsify(llama, sparsity=plan, progress=False)
    got = {row.name: row for row in report.layers}
    for name, module in linears(llama).items():
        if name.startswith("model.layers.1.self_attn"):
            assert name not in got and not is_masked(module)
            continue
        expected = 0.9 if name.endswith("1.mlp.down_proj") else 0.7 if "layers.1" in name else 0.2
        assert got[name].zeros == round(expected * module.weight.numel())


def test_second_call_stacks_masks(llama):
    sparsify(llama, "magnitude", 0.3, progress=False)
    first = {n: m.weight_mask.clone() for n, m in linears(llama).items()}
    report = sparsify(llama, "magnitude", 0.6, progress=False)
    for row in report.layers:
        module = linears(llama)[row.name]
        assert row.zeros == round(0.6 * module.weight.numel())
        assert bool((module.weight_mask <= first[row.name]).all())  # old zeros stay zero
        assert is_masked(module)
    make_permanent(llama)
    assert not any(hasattr(m, "weight_orig") for m in linears(llama).values())


# ---------------------------------------------------------------- N:M


@pytest.mark.parametrize(("pattern", "n", "m"), [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)])
def test_n_m_pattern(llama, pattern, n, m):
    dense = {name: mod.weight.detach().clone() for name, mod in linears(llama).items()}
    report = sparsify(llama, pattern=pattern, progress=False)
    assert report.pattern == pattern
    assert report.overall_sparsity == pytest.approx(n / m)
    for name, module in linears(llama).items():
        assert check_n_m(module.weight, n, m)
        groups = dense[name].abs().reshape(dense[name].shape[0], -1, m)
        mask = module.weight_mask.reshape(groups.shape)
        assert bool(((mask == 0).sum(-1) == n).all())  # exactly N per group
        # in each group the pruned ones are the N smallest
        pruned_max = torch.where(mask == 0, groups, torch.zeros_like(groups)).amax(-1)
        kept_min = torch.where(mask == 1, groups, torch.full_like(groups, float("inf"))).amin(-1)
        assert bool((pruned_max <= kept_min).all())


def test_n_m_with_wanda_and_matching_sparsity(llama):
    report = sparsify(llama, "wanda", sparsity=0.5, pattern="2:4", calib=token_ids(), progress=False)
    assert report.overall_sparsity == pytest.approx(0.5)
    assert all(check_n_m(m.weight, 2, 4) for m in linears(llama).values())


def test_check_n_m_by_hand():
    assert not check_n_m(torch.randn(8, 16) + 10, 2, 4)
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 4.0]])
    assert check_n_m(w, 2, 4)
    assert not check_n_m(w, 3, 4)
    assert check_n_m(w, 4, 8)
    # in_out layout groups down the columns
    assert check_n_m(w.t().contiguous(), 2, 4, layout="in_out")
    with pytest.raises(ValueError, match="not divisible"):
        check_n_m(w.t().contiguous(), 2, 4)  # wrong layout: the input dim would be 1
    with pytest.raises(ValueError, match="layout"):
        check_n_m(w, 2, 4, layout="sideways")


# ---------------------------------------------------------------- Wanda


class Toy(nn.Module):
    """Embedding with hand-set vectors -> Linear(4, 2): the Linear's inputs are exactly those vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(2, 4)
        self.proj = nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            # token 0 and token 1; per-feature L2 norms: [0.5, 0.6, 0.1414, 7.071]
            # (L1 norms would be [0.7, 0.6, 0.2, 10] and flip features 0 and 1)
            self.embed.weight.copy_(torch.tensor([[0.3, 0.6, 0.1, 5.0], [0.4, 0.0, 0.1, 5.0]]))
            self.proj.weight.copy_(torch.tensor([[1.0, 1.1, 1.2, 0.5], [10.0, 5.0, 40.0, 20.0]]))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(input_ids))


def test_wanda_row_wise_hand_made():
    # scores |W|*||X||: row 0 [0.50, 0.66, 0.17, 3.54] -> drop cols 2, 0
    #                   row 1 [5.00, 3.00, 5.66, 141.4] -> drop cols 1, 0
    # (one threshold over the whole layer would drop all of row 0; magnitude drops all of row 0 too)
    toy = Toy()
    sparsify(toy, "wanda", 0.5, calib=torch.tensor([[0, 1]]), progress=False)
    assert torch.equal(toy.proj.weight_mask, torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]]))
    # calib as a list of batches gives the same norms
    toy2 = Toy()
    sparsify(toy2, "wanda", 0.5, calib=[torch.tensor([[0]]), torch.tensor([[1]])], progress=False)
    assert torch.equal(toy2.proj.weight_mask, toy.proj.weight_mask)

    mag = Toy()
    sparsify(mag, "magnitude", 0.5, progress=False)
    assert torch.equal(mag.proj.weight_mask, torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))


def test_wanda_matches_reference_on_gpt2_conv1d():
    """Conv1D stores [in, out]: norms are over nx inputs, rows are output columns."""
    model = tiny_gpt2()
    ids = token_ids()
    name = "transformer.h.1.mlp.c_fc"
    module = dict(model.named_modules())[name]
    seen = []
    handle = module.register_forward_hook(lambda _m, args, _o: seen.append(args[0].reshape(-1, 64)))
    with torch.no_grad():
        model(ids)
    handle.remove()
    norms = torch.cat(seen).double().pow(2).sum(0).sqrt().float()
    w = module.weight.detach().clone()  # [64 in, 256 out]
    score = w.abs().t() * norms[None, :]  # [out, in]
    k = round(0.6 * 64)
    expected = torch.ones_like(score)
    expected.scatter_(1, torch.argsort(score, dim=1, stable=True)[:, :k], 0.0)

    sparsify(model, "wanda", 0.6, calib=ids, layers=[name], progress=False)
    assert module.weight_mask.shape == w.shape
    assert torch.equal(module.weight_mask, expected.t())
    assert bool(((module.weight == 0).sum(0) == k).all())  # per output column


def test_gpt2_conv1d_n_m_layout():
    model = tiny_gpt2()
    sparsify(model, pattern="2:4", progress=False)
    conv = [m for m in model.modules() if isinstance(m, Conv1D)]
    assert len(conv) == 8
    for module in conv:
        assert module.weight_mask.shape == module.weight_orig.shape
        assert check_n_m(module.weight, 2, 4, layout="in_out")
        assert not check_n_m(module.weight, 2, 4, layout="out_in")  # groups run along the input dim
    with torch.no_grad():
        out = model(token_ids()).logits
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- masks


def test_masks_removable_and_nothing_else_changes(llama):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    sparsify(llama, "wanda", 0.5, calib=token_ids(), progress=False)
    for name, module in linears(llama).items():
        assert is_masked(module)
        assert torch.equal(module.weight_orig, before[f"{name}.weight"])
        assert torch.equal(module.weight, module.weight_orig * module.weight_mask)
    masked = make_permanent(llama)
    assert masked == list(linears(llama))
    after = llama.state_dict()
    assert set(after) == set(before)  # no *_orig / *_mask left
    for key, old in before.items():
        new = after[key]
        keep = new != 0
        assert torch.equal(new[keep], old[keep]), key  # nothing changed outside the mask
        if key.removesuffix(".weight") in linears(llama):
            assert int((~keep).sum()) == old.numel() // 2
        else:
            assert torch.equal(new, old), key  # embeddings, norms, lm_head untouched
    for module in linears(llama).values():
        assert isinstance(module.weight, nn.Parameter) and not is_masked(module)
    assert make_permanent(llama) == []


def test_prune_remove_works_directly(llama):
    sparsify(llama, "magnitude", 0.4, progress=False)
    module = llama.model.layers[0].mlp.up_proj
    zeros = int((module.weight == 0).sum())
    prune.remove(module, "weight")
    assert not hasattr(module, "weight_orig") and not hasattr(module, "weight_mask")
    assert int((module.weight == 0).sum()) == zeros == round(0.4 * module.weight.numel())


def test_forward_runs_and_deterministic():
    a, b = tiny_llama(), tiny_llama()
    ids = token_ids()
    sparsify(a, "wanda", 0.5, calib=ids, progress=False)
    sparsify(b, "wanda", 0.5, calib=ids, progress=False)
    for (na, ma), (_, mb) in zip(linears(a).items(), linears(b).items(), strict=True):
        assert torch.equal(ma.weight_mask, mb.weight_mask), na
    with torch.no_grad():
        logits = a(ids).logits
    assert logits.shape == (2, 16, 1000) and torch.isfinite(logits).all()
    # a masked model still trains: gradients reach weight_orig, masked entries get none
    a.train()
    a(ids, labels=ids).loss.backward()
    module = a.model.layers[0].self_attn.q_proj
    assert torch.equal(module.weight_orig.grad[module.weight_mask == 0], torch.zeros(2048))


# ---------------------------------------------------------------- reports


def test_report_table_and_storage(llama):
    report = sparsify(llama, "magnitude", 0.9, progress=False)
    table = report.table()
    assert table.splitlines()[0].startswith("| layer |")
    assert len(table.splitlines()) == 2 + len(report.layers) + 1
    assert "model.layers.1.mlp.down_proj" in table and "0.9000" in table
    storage = report.storage(llama)
    assert [r.name for r in storage.rows] == [r.name for r in report.layers]
    for srow, lrow in zip(storage.rows, report.layers, strict=True):
        rows = lrow.shape[0]  # nn.Linear: [out, in]
        nnz = lrow.numel - lrow.zeros
        assert srow.nnz == nnz
        assert srow.dense_bytes == lrow.numel * 4
        assert srow.csr_bytes == (rows + 1) * 8 + nnz * 8 + nnz * 4  # crow + col (int64) + values (fp32)
        assert srow.csr_bytes < srow.dense_bytes
    assert storage.dense_bytes == sum(r.dense_bytes for r in storage.rows)
    assert "CSR" in storage.table()
    # dense model: CSR is bigger than dense
    dense = storage_report(tiny_llama())
    assert dense.csr_bytes > dense.dense_bytes


# ---------------------------------------------------------------- sensitivity


def test_sensitivity_restores_and_prunes_only_one_group(llama):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    numel = {n: m.weight.numel() for n, m in linears(llama).items()}

    def zeros_per_layer(model: nn.Module) -> float:
        # encodes which layers are sparse and how much: sum of zeros / total params
        return sum(int((m.weight == 0).sum()) for m in linears(model).values()) / sum(numel.values())

    result = sensitivity(llama, zeros_per_layer, sparsities=(0.25, 0.75), progress=False)
    assert list(result.metrics) == ["model.layers.0", "model.layers.1"]
    assert result.baseline == 0.0
    for group, row in result.metrics.items():
        for s, value in row.items():
            expected = sum(round(s * n) for name, n in numel.items() if name.startswith(group + "."))
            assert value == pytest.approx(expected / sum(numel.values()))
    after = llama.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert "| model.layers.0 |" in result.table()


def test_sensitivity_loss_proposal_hits_target(llama):
    ids = token_ids()
    before = {k: v.clone() for k, v in llama.state_dict().items()}

    @torch.no_grad()
    def loss(model: nn.Module) -> float:
        return float(model(ids, labels=ids).loss)

    result = sensitivity(llama, loss, sparsities=(0.3, 0.6, 0.9), method="wanda", calib=ids, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())
    assert loss(llama) == result.baseline
    proposal = result.propose(target=0.5)
    mean = sum(result.numels[g] * s for g, s in proposal.items()) / sum(result.numels.values())
    assert mean == pytest.approx(0.5, rel=0.01)
    assert all(0.0 <= s <= 0.95 for s in proposal.values())
    report = sparsify(llama, sparsity=proposal, progress=False)
    assert report.overall_sparsity == pytest.approx(0.5, rel=0.01)


def test_sensitivity_on_masked_model_and_explicit_layers(llama):
    sparsify(llama, "magnitude", 0.5, progress=False)
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    names = ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn"]
    seen = []
    result = sensitivity(
        llama,
        lambda m: seen.append(float((m.model.layers[0].mlp.up_proj.weight_orig == 0).float().mean())) or 0.0,
        sparsities=(0.7,),
        layers=names,
        progress=False,
    )
    assert list(result.metrics) == names
    assert result.groups["model.layers.1.self_attn"][0] == "model.layers.1.self_attn.q_proj"
    assert seen[1] == pytest.approx(0.7, abs=1e-3)  # up_proj pruned to 0.7 of its masked weight
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())


def test_propose_rule_on_synthetic_result():
    result = SensitivityResult(
        baseline=1.0,
        sparsities=(0.5,),
        metrics={"a": {0.5: 5.0}, "b": {0.5: 1.1}, "c": {0.5: 2.0}},
        numels={"a": 100, "b": 300, "c": 600},
    )
    proposal = result.propose(target=0.4, spread=0.2)
    assert proposal["a"] < proposal["c"] < proposal["b"]  # most sensitive gets the least
    assert proposal["b"] - proposal["a"] == pytest.approx(0.2)
    assert sum(result.numels[g] * s for g, s in proposal.items()) / 1000 == pytest.approx(0.4, abs=1e-6)
    # clipping at max_sparsity, still on target after renormalising
    clipped = result.propose(target=0.9, spread=0.4)
    assert max(clipped.values()) == pytest.approx(0.95)
    assert sum(result.numels[g] * s for g, s in clipped.items()) / 1000 == pytest.approx(0.9, abs=1e-6)
    flipped = SensitivityResult(1.0, (0.5,), result.metrics, result.numels, higher_is_better=True)
    assert flipped.propose(0.4)["a"] > flipped.propose(0.4)["b"]
    with pytest.raises(ValueError, match="target"):
        result.propose(target=0.99)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("pattern", ["2-4", "4:2", "0:4", "4:4", "structured", ""])
def test_bad_pattern(llama, pattern):
    with pytest.raises(ValueError, match="pattern"):
        sparsify(llama, pattern=pattern, progress=False)


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5, True, "0.5"])
def test_bad_sparsity(llama, value):
    with pytest.raises(ValueError, match="sparsity"):
        sparsify(llama, sparsity=value, progress=False)


def test_clear_errors(llama):
    with pytest.raises(ValueError, match="calib"):
        sparsify(llama, "wanda", 0.5, progress=False)
    with pytest.raises(ValueError, match="calib"):
        sparsify(llama, "wanda", 0.5, calib=[], progress=False)
    with pytest.raises(ValueError, match="calib"):
        sparsify(llama, "wanda", 0.5, calib=torch.randn(2, 8), progress=False)
    with pytest.raises(ValueError, match="implies sparsity 0.5"):
        sparsify(llama, sparsity=0.3, pattern="2:4", progress=False)
    with pytest.raises(ValueError, match="method"):
        sparsify(llama, "random", 0.5, progress=False)
    with pytest.raises(ValueError, match="scope"):
        sparsify(llama, "wanda", 0.5, calib=token_ids(), scope="global", progress=False)
    with pytest.raises(ValueError, match="scope"):
        sparsify(llama, sparsity=0.5, scope="galaxy", progress=False)
    with pytest.raises(ValueError, match="model.layers.9"):
        sparsify(llama, sparsity={"model.layers.9": 0.5}, progress=False)
    with pytest.raises(ValueError, match="no_such"):
        sparsify(llama, layers=["no_such"], progress=False)
    with pytest.raises(ValueError, match="each of sparsities"):
        sensitivity(llama, lambda m: 0.0, sparsities=(0.5, 1.0), progress=False)
    # nothing was masked by any failed call
    assert not any(is_masked(m) for m in llama.modules())


def test_n_m_not_divisible_names_layer():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 6))
    with pytest.raises(ValueError, match=r"layer '2'.*not divisible by M=8"):
        sparsify(model, pattern="4:8", progress=False)
    assert not any(is_masked(m) for m in model.modules())  # checked before anything was masked
    sparsify(model, pattern="4:8", skip=("2",), progress=False)
    assert check_n_m(model[0].weight, 4, 8) and not is_masked(model[2])


def test_copy_of_masked_model_is_independent(llama):
    sparsify(llama, "magnitude", 0.5, progress=False)
    clone = copy.deepcopy(llama)
    make_permanent(clone)
    assert is_masked(llama.model.layers[0].mlp.up_proj) and not is_masked(clone.model.layers[0].mlp.up_proj)


def test_ties_give_exact_counts_in_position_order():
    layer = nn.Sequential(nn.Linear(8, 4, bias=False))
    with torch.no_grad():
        layer[0].weight.fill_(1.0)
        layer[0].weight[0, 0] = 0.5
    report = sparsify(layer, "magnitude", 0.25, progress=False)
    assert report.layers[0].zeros == 8
    expected = torch.ones(4, 8)
    expected[0, :8] = 0.0  # the 0.5, then the earliest of the tied 1.0s
    assert torch.equal(layer[0].weight_mask, expected)
    two = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    for module in two:
        nn.init.constant_(module.weight, 1.0)
    report = sparsify(two, "magnitude", 0.5, scope="global", progress=False)
    assert [row.zeros for row in report.layers] == [16, 0]


def test_sensitivity_restores_when_eval_fn_raises(llama):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    calls = []

    def flaky(_model: nn.Module) -> float:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return 0.0

    with pytest.raises(RuntimeError, match="boom"):
        sensitivity(llama, flaky, sparsities=(0.5, 0.9), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())


def test_make_permanent_on_a_tied_head_keeps_the_masked_logits(tmp_path):
    """Regression (issue 15 item 8): sparsify(skip=()) masked the tied lm_head only, but make_permanent
    wrote the zeros into the shared tensor, zeroing the embedding too (logits moved by ~0.2)."""
    from models import example_ids, tiny_model
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen2", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = example_ids(model)
    embedding = model.model.embed_tokens.weight.detach().clone()
    sparsify(model, "magnitude", 0.5, skip=(), progress=False)
    with torch.no_grad():
        masked = model(ids).logits
    assert "lm_head" in make_permanent(model)
    with torch.no_grad():
        permanent = model(ids).logits
    assert torch.equal(masked, permanent)
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # the embedding was never masked
    assert (model.lm_head.weight == 0).float().mean() >= 0.5
    assert model.config.tie_word_embeddings is False  # a reload must not re-tie the head
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()(ids).logits
    assert torch.equal(reloaded, masked)


def test_make_permanent_keeps_untied_weights_in_place():
    model = tiny_llama()
    sparsify(model, "magnitude", 0.5, progress=False)
    weight = model.model.layers[0].mlp.up_proj.weight_orig
    make_permanent(model)
    assert model.model.layers[0].mlp.up_proj.weight is weight  # same Parameter: optimizers keep working
