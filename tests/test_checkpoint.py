"""Checkpoints: class resolution only from transformers' registry, atomic saves, named load errors,
plain HF files after uniform cuts and remote code (``trust_remote_code=True``) after non-uniform ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from models import example_ids, tiny_model

import depgraph
from depgraph import checkpoint
from depgraph.errors import DepGraphError


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".depgraph-")]


def _non_uniform(family: str = "llama", **overrides):
    """``family`` with 3 MLP neurons cut in layer 0 only: only depgraph's layout can describe it."""
    model = tiny_model(family, **overrides)
    graph = depgraph.trace(model)
    graph.prune({graph.group("model.layers.0.mlp"): [0, 3, 5]})
    return model


@pytest.fixture
def saved(tmp_path):
    model = _non_uniform()
    ids = example_ids(model)
    path = tmp_path / "ckpt"
    state = depgraph.save_pretrained(model, path)
    assert not state["hf_compatible"]
    return model, ids, path


# ------------------------------------------------------------------------------------------ security

def _forge(path: Path, **fields) -> None:
    state = json.loads((path / checkpoint.STATE_FILE).read_text())
    state.update(fields)
    (path / checkpoint.STATE_FILE).write_text(json.dumps(state))


@pytest.mark.parametrize("hf_compatible", [False, True])
def test_load_refuses_a_class_outside_the_registry(saved, tmp_path, monkeypatch, hf_compatible):
    _, _, path = saved
    called = []
    monkeypatch.setattr(os, "system", lambda *a: called.append(a) or 0)
    _forge(path, module="os", cls="system", hf_compatible=hf_compatible)
    with pytest.raises(DepGraphError, match="trust_remote_code=True"):
        depgraph.load_pretrained(path)
    assert not called


def test_load_never_imports_a_module_the_checkpoint_names(saved, tmp_path, monkeypatch):
    _, ids, path = saved
    code = tmp_path / "code"
    code.mkdir()
    marker = tmp_path / "imported.txt"
    (code / "evil_ckpt_mod.py").write_text(textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("ran")
        class Evil:
            pass
    """))
    monkeypatch.syspath_prepend(str(code))
    _forge(path, module="evil_ckpt_mod", cls="Evil")
    with pytest.raises(DepGraphError, match="not a transformers model class"):
        depgraph.load_pretrained(path)
    # a transformers class name with a foreign module: the module is ignored, transformers' class is used
    _forge(path, module="evil_ckpt_mod", cls="LlamaForCausalLM")
    assert isinstance(depgraph.load_pretrained(path), transformers.LlamaForCausalLM)
    # a transformers class that is not registered for the config's model type is refused too
    _forge(path, module="transformers", cls="GPT2LMHeadModel")
    with pytest.raises(DepGraphError, match="'llama'"):
        depgraph.load_pretrained(path)
    assert not marker.exists() and "evil_ckpt_mod" not in sys.modules
    # the explicit opt-in imports it (and then finds it is not a model class)
    _forge(path, module="evil_ckpt_mod", cls="Evil")
    with pytest.raises(DepGraphError, match="not a model class"):
        depgraph.load_pretrained(path, trust_remote_code=True)
    assert marker.read_text() == "ran"
    sys.modules.pop("evil_ckpt_mod", None)


# ---------------------------------------------------------------------------------------- atomicity

def _failing_writer(exc: BaseException):
    def write(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")  # the disk filled up half way
        raise exc

    return write


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
@pytest.mark.parametrize("new_uniform", [False, True])
def test_failed_save_keeps_the_old_checkpoint(saved, monkeypatch, exc, new_uniform):
    model, ids, path = saved
    (path / "tokenizer.json").write_text("{}")  # the user's own file beside the checkpoint
    before = _files(path)
    other = tiny_model("llama", seed=1) if new_uniform else _non_uniform(seed=1)
    for target in (safetensors.torch, transformers.modeling_utils, checkpoint):
        for name in ("save_file", "safe_save_file", "save_model"):
            if hasattr(target, name):
                monkeypatch.setattr(target, name, _failing_writer(exc))
    with pytest.raises(type(exc)):
        depgraph.save_pretrained(other, path)
    monkeypatch.undo()
    assert _files(path) == before
    assert not _leftovers(path.parent)
    torch.testing.assert_close(_logits(depgraph.load_pretrained(path), ids), _logits(model, ids))


def test_interrupt_between_the_renames_restores_the_old_checkpoint(saved, monkeypatch):
    model, ids, path = saved
    before = _files(path)
    rename = os.rename

    def interrupted(src, dst):
        if Path(src).name.endswith(".tmp"):  # the old one is already moved aside: Ctrl-C now
            raise KeyboardInterrupt
        rename(src, dst)

    monkeypatch.setattr(os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        depgraph.save_pretrained(tiny_model("llama", seed=3), path)
    monkeypatch.undo()
    assert _files(path) == before and not _leftovers(path.parent)
    torch.testing.assert_close(_logits(depgraph.load_pretrained(path), ids), _logits(model, ids))


def test_save_replaces_a_checkpoint_and_keeps_foreign_files(saved):
    _, ids, path = saved
    (path / "tokenizer.json").write_text("{}")
    (path / "model-00001-of-00002.safetensors").write_bytes(b"stale shard of an older save")
    model = tiny_model("llama", seed=2)
    assert depgraph.save_pretrained(model, path)["hf_compatible"]
    names = set(os.listdir(path))
    assert "tokenizer.json" in names and "model-00001-of-00002.safetensors" not in names
    assert "modeling_depgraph.py" not in names  # nothing of the non-uniform checkpoint is left
    assert not _leftovers(path.parent)
    torch.testing.assert_close(_logits(depgraph.load_pretrained(path), ids), _logits(model, ids))


def test_save_refuses_a_file_path(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(DepGraphError, match="not a directory"):
        depgraph.save_pretrained(tiny_model("llama"), target)
    assert target.read_text() == "x" and not _leftovers(tmp_path)


# -------------------------------------------------------------------------------------- named errors

@pytest.mark.parametrize("damage", ["state_truncated", "state_not_object", "state_no_cls", "config_truncated",
                                    "config_missing", "weights_truncated", "weights_missing", "buffers_truncated"])
def test_damaged_checkpoint_raises_a_named_error(saved, damage):
    _, _, path = saved
    file = {"state": path / checkpoint.STATE_FILE, "config": path / "config.json",
            "weights": path / checkpoint.WEIGHTS_FILE, "buffers": path / checkpoint.BUFFERS_FILE}[damage.split("_")[0]]
    if damage.endswith("truncated"):
        file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
    elif damage.endswith("missing"):
        file.unlink()
    elif damage == "state_not_object":
        file.write_text("[1, 2]")
    else:
        _forge(path, cls=None)
    with pytest.raises(DepGraphError, match="save the model again"):
        depgraph.load_pretrained(path)


def test_weights_of_another_model_raise_a_named_error(saved, tmp_path):
    _, _, path = saved
    other = tmp_path / "other"
    depgraph.save_pretrained(tiny_model("llama", intermediate_size=64), other)
    (path / checkpoint.WEIGHTS_FILE).write_bytes((other / checkpoint.WEIGHTS_FILE).read_bytes())
    with pytest.raises(DepGraphError, match="another model|shapes do not fit"):
        depgraph.load_pretrained(path)
    # a uniform checkpoint whose config does not fit its weights
    config = json.loads((other / "config.json").read_text())
    config["intermediate_size"] = 96
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(DepGraphError, match="cannot be loaded"):
        depgraph.load_pretrained(other)


def test_load_refuses_a_missing_directory(tmp_path):
    with pytest.raises(DepGraphError, match="not a directory"):
        depgraph.load_pretrained(tmp_path / "nothing")


def test_save_of_a_compiled_model(tmp_path):
    model = _non_uniform()
    ids = example_ids(model)
    compiled = torch.compile(model)  # never run: saving must not need the compiled graph
    state = depgraph.save_pretrained(compiled, tmp_path / "c")
    assert state["cls"] == "LlamaForCausalLM"
    torch.testing.assert_close(_logits(depgraph.load_pretrained(tmp_path / "c"), ids), _logits(model, ids))


def test_save_of_a_meta_model_refuses_before_writing(tmp_path):
    model = tiny_model("llama", device="meta")
    with pytest.raises(DepGraphError, match="meta device"):
        depgraph.save_pretrained(model, tmp_path / "m")
    assert not (tmp_path / "m").exists() and not _leftovers(tmp_path)


# ------------------------------------------------------------------------- plain Hugging Face files

def test_uniform_cut_of_tied_embeddings_saves_plain_hf_files(tmp_path):
    model = tiny_model("qwen2", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = example_ids(model)
    graph = depgraph.trace(model)
    graph.prune({g: [0, 1] if g.kind != "B" else [0] for g in graph.groups()})  # the same cut in every layer
    assert model.lm_head.weight is model.model.embed_tokens.weight
    state = depgraph.save_pretrained(model, tmp_path)
    assert state["hf_compatible"] and model.config.hidden_size == 62
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids))


# ---------------------------------------------------------------------- remote code, without depgraph

_OPEN = """
import sys
sys.modules["depgraph"] = None  # `import depgraph` raises ImportError from here on
import torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, local_files_only=True)
io = torch.load(sys.argv[2])
with torch.no_grad():
    out = model(input_ids=io["ids"], use_cache=False).logits
    cached = model.generate(io["ids"], max_new_tokens=3, do_sample=False)
torch.save({"logits": out, "generated": cached, "cls": type(model).__name__}, sys.argv[3])
"""


def _open_without_depgraph(path: Path, model, ids, tmp_path: Path) -> dict:
    torch.save({"ids": ids}, tmp_path / "in.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_HOME", "HF_MODULES_CACHE")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", _OPEN, str(path), str(tmp_path / "in.pt"),
                             str(tmp_path / "out.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(got["logits"], _logits(model, ids), atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(got["generated"], expected)
    return got


def _mixtral():
    config = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, vocab_size=100, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    depgraph.remove_experts(model, {"model.layers.0.mlp": [1]})  # layer 1 keeps all 4 experts
    return model


def _gqa_per_layer_heads():
    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=4)
    graph = depgraph.trace(model)
    graph.prune({graph.group("model.layers.0.self_attn"): [1], graph.group("model.layers.1.self_attn"): [0, 2]})
    assert [layer.self_attn.k_proj.out_features for layer in model.model.layers] == [24, 16]
    return model


def _qwen2_tied():
    model = tiny_model("qwen2", tie_word_embeddings=True)
    graph = depgraph.trace(model)
    plan = {graph.group("model.layers.1.mlp"): [2, 4], graph.group("model.layers.0.self_attn"): [0]}
    plan.update({g: [3] for g in graph.groups("C")})
    graph.prune(plan)
    return model


@pytest.mark.parametrize("build", [_non_uniform, _qwen2_tied, _mixtral, _gqa_per_layer_heads],
                         ids=["llama", "qwen2_tied", "mixtral_experts", "gqa_per_layer"])
def test_non_uniform_checkpoint_opens_with_transformers_alone(build, tmp_path):
    model = build()
    ids = example_ids(model)
    state = depgraph.save_pretrained(model, tmp_path / "ckpt")
    assert not state["hf_compatible"] and state["remote_code"] == checkpoint.REMOTE_CODE_FILE
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_depgraph.")
    got = _open_without_depgraph(tmp_path / "ckpt", model, ids, tmp_path)
    assert got["cls"] == f"DepGraph{type(model).__name__}"
    # depgraph's own loader reads the same files
    torch.testing.assert_close(_logits(depgraph.load_pretrained(tmp_path / "ckpt"), ids), _logits(model, ids))


def test_remote_code_is_self_contained():
    source, auto_map = checkpoint.remote_code_source(_non_uniform())
    assert "depgraph" not in "".join(line for line in source.splitlines(True)
                                     if line.startswith(("import", "from")))
    assert set(auto_map) >= {"AutoConfig", "AutoModelForCausalLM"}


# ------------------------------------------------------------------------------------ property

_FAMILIES = [("llama", {}), ("qwen2", {"tie_word_embeddings": True}), ("qwen2", {}), ("mistral", {}),
             ("gemma", {})]
# Gemma scales embeddings by sqrt(hidden_size): after a C cut the model keeps the original scale, which a
# config with the new hidden size does not give, so only depgraph's layout can describe it
_SCALE_FROM_HIDDEN = {"gemma"}


@settings(max_examples=12, deadline=None)
@given(family=st.sampled_from(range(len(_FAMILIES))), uniform=st.fixed_dictionaries(
    {k: st.booleans() for k in "ABC"}), seed=st.integers(0, 2**16))
def test_property_save_reload_after_any_cut(family, uniform, seed):
    import random
    import tempfile

    name, overrides = _FAMILIES[family]
    model = tiny_model(name, **overrides)
    ids = example_ids(model)
    graph = depgraph.trace(model)
    rng = random.Random(seed)
    counts = {kind: rng.randint(0, 2) for kind in "ABC"}
    plan = {}
    for group in graph.groups():
        n = counts[group.kind] if uniform[group.kind] else rng.randint(0, 2)
        n = min(n, group.size - 1)
        if n:
            plan[group] = rng.sample(range(group.size), n)
    graph.prune(plan)
    out = _logits(model, ids)
    with tempfile.TemporaryDirectory() as tmp:
        state = depgraph.save_pretrained(model, tmp)
        torch.testing.assert_close(_logits(depgraph.load_pretrained(tmp), ids), out, atol=1e-5, rtol=1e-5)
        layers_agree = all(len({len(plan.get(g, ())) for g in graph.groups(kind)}) <= 1 for kind in "AB")
        if name in _SCALE_FROM_HIDDEN and any(g.kind == "C" for g in plan):
            layers_agree = False
        try:
            model.config.validate()
            valid = True
        except Exception:  # e.g. hidden % heads after a C cut: the config class cannot say it
            valid = False
        if layers_agree and valid:
            assert state["hf_compatible"], plan
        if state["hf_compatible"]:
            plain = transformers.AutoModelForCausalLM.from_pretrained(tmp)
            torch.testing.assert_close(_logits(plain, ids), out, atol=1e-5, rtol=1e-5)
        else:
            assert state["remote_code"] == checkpoint.REMOTE_CODE_FILE
            assert "auto_map" in json.loads((Path(tmp) / "config.json").read_text())


def test_load_model_opens_remote_code_only_when_trusted(saved, tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    from depgraph.models import load_model

    model, ids, path = saved
    (path / checkpoint.STATE_FILE).unlink()  # as another tool would pass it on: config, weights and code only
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))  # never the user's cache
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(DepGraphError, match="trust_remote_code=True"):  # LlamaForCausalLM has uniform layers
        load_model(path)
    loaded = load_model(path, trust_remote_code=True)
    assert type(loaded).__name__ == "DepGraphLlamaForCausalLM"
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids))
