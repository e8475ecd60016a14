"""Calibration/evaluation data sources: files, strings, lists, datasets.Dataset, load_dataset specs, ids;
the tokenizer is the model's own (loaded from its directory) and named; no silent fallbacks."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from depgraph.data import (
    ByteTokenizer,
    calibration_batches,
    data_dir,
    default_text_path,
    describe_tokenizer,
    id_streams,
    resolve_tokenizer,
    texts,
)
from depgraph.errors import CalibrationError, DataNotFoundError

DOCS = ["The first document is about lobsters and their claws. " * 3,
        "A second one, about towers and their heights in metres. " * 3]


def test_no_data_folder_without_the_env_var(monkeypatch):
    """Regression (issue 17): data_dir() defaulted to a folder beside the repository."""
    monkeypatch.delenv("DEPGRAPH_DATA_DIR", raising=False)
    with pytest.raises(DataNotFoundError, match="DEPGRAPH_DATA_DIR"):
        data_dir()
    with pytest.raises(FileNotFoundError, match="DEPGRAPH_DATA_DIR"):  # still a FileNotFoundError
        default_text_path("valid")
    with pytest.raises(DataNotFoundError, match="DEPGRAPH_DATA_DIR"):  # source=None: no silent default
        calibration_batches(tokenizer=ByteTokenizer(), n_samples=1, seq_len=4)


def test_env_var_names_the_folder(tmp_path, monkeypatch):
    (tmp_path / "valid.txt").write_text("hello world " * 20)
    monkeypatch.setenv("DEPGRAPH_DATA_DIR", str(tmp_path))
    assert default_text_path("valid") == tmp_path / "valid.txt"
    assert len(calibration_batches(tokenizer=ByteTokenizer(), n_samples=2, seq_len=8)) == 2


def test_text_sources_agree(tmp_path):
    tok = ByteTokenizer()
    joined = "\n\n".join(DOCS)
    path = tmp_path / "docs.txt"
    path.write_text(joined)
    want = torch.tensor(tok.encode(joined))
    for source in (path, str(path), joined, DOCS, tuple(DOCS)):
        (stream,) = id_streams(source, tok)
        assert torch.equal(stream, want), source
    assert texts(torch.arange(4)) is None  # ids are not text


def test_datasets_dataset_and_load_dataset_spec(tmp_path):
    datasets = pytest.importorskip("datasets")
    tok = ByteTokenizer()
    want = torch.tensor(tok.encode("\n\n".join(DOCS)))
    ds = datasets.Dataset.from_dict({"text": DOCS, "n": [1, 2]})
    assert torch.equal(id_streams(ds, tok)[0], want)
    other = datasets.Dataset.from_dict({"content": DOCS})
    assert torch.equal(id_streams(other, tok, text_column="content")[0], want)
    with pytest.raises(CalibrationError, match=r"no column 'text'.*content.*text_column="):
        id_streams(other, tok)
    # a load_dataset spec over a local file (the "text" builder: one row per line; no download)
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(DOCS) + "\n")
    spec = {"path": "text", "data_files": str(path), "split": "train"}
    rows = texts(spec)
    assert [r.strip() for r in rows] == [d.strip() for d in DOCS]
    batches = calibration_batches(spec, tokenizer=tok, n_samples=3, seq_len=16, vocab_size=259)
    assert [tuple(b.shape) for b in batches] == [(1, 16)] * 3
    with pytest.raises(CalibrationError, match="'path' and 'split'"):
        texts({"path": "text"})


def test_tokenizer_is_loaded_from_the_model_directory_and_named(tmp_path, caplog):
    model_dir = tmp_path / "model"
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=259)).save_pretrained(model_dir)
    with pytest.raises(CalibrationError, match="holds no tokenizer files"):
        resolve_tokenizer(model_dir)
    with pytest.raises(CalibrationError, match="not a directory"):
        resolve_tokenizer(tmp_path / "missing")
    ByteTokenizer().save_pretrained(model_dir)
    tok = resolve_tokenizer(model_dir)
    assert isinstance(tok, ByteTokenizer) and describe_tokenizer(tok) == "ByteTokenizer"
    with caplog.at_level(logging.INFO, logger="depgraph"):
        logging.getLogger("depgraph").propagate = True
        batches = calibration_batches(DOCS, tokenizer=str(model_dir), n_samples=2, seq_len=8, vocab_size=259)
    assert len(batches) == 2
    assert "with ByteTokenizer" in caplog.text


def test_text_without_a_tokenizer_names_the_option(tmp_path: Path):
    with pytest.raises(CalibrationError, match=r"needs a tokenizer: pass tokenizer="):
        calibration_batches(DOCS, n_samples=1, seq_len=4)
    with pytest.raises(DataNotFoundError, match="no such text file"):
        texts(Path(tmp_path / "nope.txt"))
    with pytest.raises(CalibrationError, match="unsupported data source type"):
        id_streams(3.5)


def test_perplexity_reads_the_same_sources(tmp_path):
    from depgraph.evaluate import perplexity

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=259)).eval()
    ByteTokenizer().save_pretrained(tmp_path)
    joined = perplexity(model, "\n\n".join(DOCS), ByteTokenizer(), context_length=16, progress=False)
    listed = perplexity(model, DOCS, str(tmp_path), context_length=16, progress=False)  # tokenizer from a dir
    assert listed.nll == joined.nll and listed.tokens == joined.tokens


def test_hf_tokenizer_from_a_model_directory_is_used_and_named(tmp_path, caplog):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for d in DOCS for w in d.replace(",", " ").replace(".", " ").split()})
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(tmp_path)
    tok = resolve_tokenizer(tmp_path)
    assert not isinstance(tok, ByteTokenizer) and str(tmp_path) in describe_tokenizer(tok)
    logging.getLogger("depgraph").propagate = True
    with caplog.at_level(logging.INFO, logger="depgraph"):
        (stream,) = id_streams(DOCS, str(tmp_path))
    assert str(tmp_path) in caplog.text
    assert torch.equal(stream, torch.tensor(tok("\n\n".join(DOCS))["input_ids"]))
    with pytest.raises(CalibrationError, match=r"token id .* is out of range"):
        calibration_batches(DOCS, tokenizer=tok, n_samples=1, seq_len=4, vocab_size=5)  # not the model's own
