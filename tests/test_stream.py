"""Streaming pruning of a checkpoint directory (depgraph.prune_checkpoint) equals in-memory pruning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import depgraph
from depgraph import stream
from depgraph.cli import main as cli_main
from depgraph.errors import StreamError
from tests.models import example_ids, tiny_model

# (family, criterion, structure, max shard bytes or None for one file, hf_loadable, dtype)
CASES = [
    ("llama", "l2", "all", 40_000, False, torch.float32),
    ("llama", "wanda", "block", None, True, torch.float32),
    ("llama", "wanda", "all", 20_000, False, torch.bfloat16),  # bf16 in, bf16 out: same rounding as in memory
    ("qwen2", "wanda", "all", 30_000, False, torch.float32),
    ("qwen2", "activation", "block", None, False, torch.float32),
    ("gpt2", "l2", "block", 50_000, False, torch.float32),
    ("gpt2", "wanda", "all", None, False, torch.float32),
]


def _source(tmp_path: Path, family: str, shard: int | None = None, dtype: torch.dtype = torch.float32) -> Path:
    src = tmp_path / f"src-{family}"
    model = tiny_model(family).to(dtype)
    model.save_pretrained(src, **({"max_shard_size": shard} if shard else {}))
    (src / "tokenizer_config.json").write_text("{}\n")  # stands in for the tokenizer files
    return src


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())} if path.exists() else {}


@pytest.mark.parametrize("family,criterion,structure,shard,hf_loadable,dtype", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{str(c[5])[6:]}" for c in CASES])
def test_stream_equals_in_memory(tmp_path, family, criterion, structure, shard, hf_loadable, dtype):
    src = _source(tmp_path, family, shard, dtype)
    if shard:
        assert (src / "model.safetensors.index.json").is_file()  # the source really is sharded
    calib = example_ids(tiny_model(family), batch=3, seq=12, seed=1) if criterion != "l2" else None
    kwargs = dict(criterion=criterion, ratio=0.25, structure=structure, calib=calib, hf_loadable=hf_loadable,
                  progress=False)
    report = depgraph.prune_checkpoint(src, tmp_path / "streamed", max_shard_size=shard or "5GB", **kwargs)

    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
    assert next(model.parameters()).dtype == dtype
    reference = depgraph.Pruner(model, **kwargs).prune()
    depgraph.save_pretrained(model, tmp_path / "in-memory")

    assert report.params_after == reference.params_after < report.params_before
    assert {g.name: list(u) for g, u in report.plan.items()} == {
        g.name: list(u) for g, u in reference.steps[0].plan.items()}
    streamed = depgraph.load_pretrained(tmp_path / "streamed")
    assert {t.dtype for t in streamed.state_dict().values() if t.is_floating_point()} == {dtype}
    ids = example_ids(model, batch=2, seq=10, seed=7)
    with torch.no_grad():
        delta = (streamed(ids).logits - model(ids).logits).abs().max().item()
    assert delta <= 1e-5
    for name in ("config.json", "generation_config.json"):  # the same files save_pretrained writes
        if (tmp_path / "in-memory" / name).is_file():  # (per-layer saves write no generation config)
            assert json.loads((tmp_path / "streamed" / name).read_text()) == json.loads(
                (tmp_path / "in-memory" / name).read_text())
    state = json.loads((tmp_path / "streamed" / "depgraph.json").read_text())
    assert state == json.loads((tmp_path / "in-memory" / "depgraph.json").read_text())
    assert (tmp_path / "streamed" / "tokenizer_config.json").is_file()
    if shard:
        index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    if hf_loadable:  # a uniform cut is a plain Hugging Face checkpoint
        assert state["hf_compatible"]
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").eval()
        with torch.no_grad():
            assert (plain(ids).logits - model(ids).logits).abs().max().item() <= 1e-5


def test_one_layer_resident_at_a_time(tmp_path, monkeypatch):
    """Scoring never holds two decoder layers' tensors at once (memory independent of depth)."""
    src = _source(tmp_path, "llama")
    seen: list[set[int]] = []
    head_with_layer = []
    load = stream._Residency.load

    def spy(self, names):
        load(self, names)
        seen.append({depgraph.calibration.layer_index(n) for n in self.resident} - {None})
        head_with_layer.append(bool(seen[-1]) and "lm_head.weight" in self.resident)

    monkeypatch.setattr(stream._Residency, "load", spy)
    calib = example_ids(tiny_model("llama"), batch=2, seq=8)
    depgraph.prune_checkpoint(src, tmp_path / "out", criterion="wanda", calib=calib, structure="all", progress=False)
    assert seen and all(len(layers) <= 1 for layers in seen)
    assert set().union(*seen) == {0, 1}
    assert not any(head_with_layer)  # the (untied) head is read only for the last pass, after the layers

    owners: list[set[str]] = []  # weight-only criteria: one module's tensors at a time
    monkeypatch.setattr(stream._Residency, "load", lambda self, names: (
        load(self, names), owners.append({n.rpartition(".")[0] for n in self.resident})))
    depgraph.prune_checkpoint(src, tmp_path / "out-l2", criterion="l2", structure="all", progress=False)
    assert len(owners) > 10 and all(len(o) == 1 for o in owners)


def test_weight_read_without_its_module_is_retried(tmp_path, monkeypatch):
    """A model that reads a head weight without calling its module (so the lazy loader never runs) still
    calibrates: that pass is rerun with the embeddings and head in memory, statistics counted once."""
    src = _source(tmp_path, "llama")
    calib = example_ids(tiny_model("llama"), batch=2, seq=8)
    monkeypatch.setattr(stream, "_lazy_loads", lambda *a: [])  # as if no module call announced the weights
    depgraph.prune_checkpoint(src, tmp_path / "retried", criterion="wanda", calib=calib, structure="all",
                              progress=False)
    monkeypatch.undo()
    depgraph.prune_checkpoint(src, tmp_path / "plain", criterion="wanda", calib=calib, structure="all",
                              progress=False)
    assert _files(tmp_path / "retried") == _files(tmp_path / "plain")


def test_taylor_refused_before_writing(tmp_path):
    src = _source(tmp_path, "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    calib = example_ids(tiny_model("llama"))
    for name in ("taylor_first", "taylor_second"):
        with pytest.raises(StreamError, match="backward.*depgraph.Pruner"):
            depgraph.prune_checkpoint(src, out, criterion=name, calib=calib, progress=False)
    assert _files(out) == {"keep.txt": b"mine"}


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch, exc):
    src = _source(tmp_path, "llama", shard=40_000)
    out = tmp_path / "out"
    calls = []
    write = stream.write_safetensors

    def failing(path, entries, produce):
        calls.append(path)
        write(path, entries, produce)
        if len(calls) == 2:  # one shard complete, the next one written: then the failure
            raise exc

    monkeypatch.setattr(stream, "write_safetensors", failing)
    with pytest.raises(type(exc)):
        depgraph.prune_checkpoint(src, out, criterion="l2", progress=False, max_shard_size=40_000)
    assert len(calls) == 2 and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".depgraph-")]  # no temporary left
    # an existing checkpoint at out survives a failed run unchanged
    depgraph.prune_checkpoint(src, out, criterion="l2", progress=False)
    before = _files(out)
    calls.clear()
    with pytest.raises(type(exc)):
        depgraph.prune_checkpoint(src, out, criterion="l2", ratio=0.5, progress=False, max_shard_size=40_000)
    assert _files(out) == before


def test_bad_sources(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(StreamError, match="not a directory"):
        depgraph.prune_checkpoint(tmp_path / "nowhere", out, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StreamError, match="no config.json"):
        depgraph.prune_checkpoint(empty, out, progress=False)
    src = _source(tmp_path, "llama")
    with pytest.raises(StreamError, match="source directory"):
        depgraph.prune_checkpoint(src, src, progress=False)
    (src / "model.safetensors").unlink()
    with pytest.raises(StreamError, match="no safetensors weights"):
        depgraph.prune_checkpoint(src, out, progress=False)
    assert not out.exists()


def test_foreign_weights_refused(tmp_path):
    """A checkpoint key the model does not have (renamed or fused weights) is refused, nothing written."""
    src = _source(tmp_path, "llama")
    values = {}
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        for key in f.keys():
            values[key.replace("mlp.up_proj", "mlp.up")] = f.get_tensor(key)
    from safetensors.torch import save_file

    save_file(values, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(StreamError, match="mlp.up.weight"):
        depgraph.prune_checkpoint(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_write_safetensors_round_trip(tmp_path):
    values = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7), "c": torch.ones(2, dtype=torch.bool)}
    path = tmp_path / "x.safetensors"
    stream.write_safetensors(path, [(k, tuple(v.shape), v.dtype) for k, v in values.items()], values.__getitem__)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for k, v in values.items():
            assert torch.equal(f.get_tensor(k), v)
    with pytest.raises(StreamError, match="planned"):
        stream.write_safetensors(path, [("a", (9,), torch.float32)], lambda k: torch.zeros(3))


def test_cli_stream(tmp_path, capsys):
    src = _source(tmp_path, "llama", shard=40_000)
    out = tmp_path / "pruned"
    rc = cli_main(["-q", "prune", str(src), "--out", str(out), "--stream", "--ratio", "0.25"])
    assert rc == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["stream"] is True and plan["criterion"] == "l2"  # the default with --stream (Taylor cannot stream)
    assert plan["params_after"] < plan["params_before"]
    model = depgraph.load_pretrained(out)
    assert depgraph.count_parameters(model) == plan["params_after"]
    # wanda calibrates on text: a byte-vocabulary model without tokenizer files reads it with the byte tokenizer
    byte_src = tmp_path / "byte-src"
    tiny_model("llama", vocab_size=259).save_pretrained(byte_src)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    rc = cli_main(["-q", "prune", str(byte_src), "--out", str(tmp_path / "w"), "--stream", "--criterion", "wanda",
                   "--calib", str(text), "--calib-samples", "2", "--seq-len", "16"])
    assert rc == 0
    plan = json.loads((tmp_path / "w" / "plan.json").read_text())
    assert "2 windows x 16 tokens" in plan["calibration"] and plan["params_after"] < plan["params_before"]
    rc = cli_main(["prune", str(src), "--out", str(tmp_path / "t"), "--stream", "--criterion", "taylor_first"])
    assert rc == 1 and "depgraph.Pruner" in capsys.readouterr().err
    rc = cli_main(["prune", str(src), "--out", str(tmp_path / "t"), "--stream", "--depth", "1"])
    assert rc == 2 and not (tmp_path / "t").exists()
    rc = cli_main(["prune", str(src), "--out", str(tmp_path / "t"), "--stream", "--target", "params",
                   "--allocation", "sensitivity"])  # measures layers on the whole model
    assert rc == 2 and "--allocation sensitivity" in capsys.readouterr().err and not (tmp_path / "t").exists()
    rc = cli_main(["-q", "prune", str(src), "--out", str(tmp_path / "inc"), "--stream", "--target", "params",
                   "--allocation", "increasing"])  # a schedule needs no weights: it streams
    assert rc == 0 and json.loads((tmp_path / "inc" / "plan.json").read_text())["allocation"] == "increasing"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tensor_cuts_match_prune(family):
    """cut.tensor_cuts applied to the old values gives exactly the tensors prune leaves (RMSNorm factors too)."""
    from depgraph.cut import tensor_cuts
    from depgraph.graph import canonical_names

    model = tiny_model(family)
    first = canonical_names(model)  # cuts name a tied weight once (GPT-2's lm_head is its wte)
    graph = depgraph.trace(model)
    plan = {g: list(range(0, g.size, 3))[: g.size - 1] for g in graph.groups()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cuts = tensor_cuts(graph, plan)
    assert any(c.scale != 1.0 for c in cuts.values()) == (family == "llama")  # RMSNorm rescale under a C cut
    depgraph.prune(graph, plan)
    after = model.state_dict()
    assert set(cuts) <= set(after) and len(cuts) > 10
    for name, value in after.items():
        cut = cuts.get(first[name])
        expected = before[name] if cut is None else cut.apply(before[name])
        assert torch.equal(value, expected), name


@pytest.mark.parametrize("structure", ["block", "all"])
def test_tied_embeddings_sharded(tmp_path, structure):
    """A tied head (saved once, under the embedding's name) stays tied; a uniform cut opens in plain transformers."""
    model = tiny_model("llama", tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "src", max_shard_size=40_000)
    ids = example_ids(model, batch=3, seq=12, seed=2)
    plain = structure == "block"
    kwargs = dict(criterion="wanda", ratio=0.25, structure=structure, calib=ids, hf_loadable=plain, progress=False)
    depgraph.prune_checkpoint(tmp_path / "src", tmp_path / "out", max_shard_size=40_000, **kwargs)
    depgraph.Pruner(model, **kwargs).prune()
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out") if plain else depgraph.load_pretrained(tmp_path / "out")
    out.eval()
    assert out.lm_head.weight is out.model.embed_tokens.weight
    with torch.no_grad():
        assert (out(ids).logits - model(ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("hf_loadable", [True, False])
def test_checkpoint_keys_transformers_renames(tmp_path, hf_loadable):
    """GPT-NeoX checkpoints store the head as ``embed_out``, the model calls it ``lm_head``: streaming binds
    them through transformers' key renaming and writes the pruned head under the checkpoint's own name."""
    model = tiny_model("gpt_neox")
    model.save_pretrained(tmp_path / "src")
    with safe_open(str(tmp_path / "src" / "model.safetensors"), "pt") as f:
        assert "embed_out.weight" in f.keys()  # the renamed key this test is about
    ids = example_ids(model, batch=3, seq=12, seed=2)
    structure = "block" if hf_loadable else "all"
    kwargs = dict(criterion="wanda", ratio=0.25, structure=structure, calib=ids, hf_loadable=hf_loadable,
                  progress=False)
    depgraph.prune_checkpoint(tmp_path / "src", tmp_path / "out", **kwargs)
    depgraph.Pruner(model, **kwargs).prune()
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert "embed_out.weight" in f.keys() and "lm_head.weight" not in f.keys()
    loaded = depgraph.load_pretrained(tmp_path / "out").eval()
    opened = [loaded] + ([AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()] if hf_loadable else [])
    with torch.no_grad():
        for out in opened:
            assert (out(ids).logits - model(ids).logits).abs().max().item() <= 1e-5
