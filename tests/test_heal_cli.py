"""The prune -> heal -> eval story on the command line, run as a user runs it (subprocesses).

Also: ``prune --depth`` / ``--experts``, torch's default thread count, plain progress lines when stderr
is not a terminal, and ``eval --lm-eval`` (the lm-evaluation-harness, offline, on WikiText-2 test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

import depgraph

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
        "structure in Paris. Its base is square, measuring 125 metres on each side. ") * 60


def _env(tmp: Path) -> dict[str, str]:
    # HF_HOME: lm-eval / datasets caches go to the test's folder; offline: nothing may be downloaded
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp / "hf"),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "depgraph", *args], cwd=cwd, env=_env(cwd), capture_output=True,
                          text=True, timeout=timeout)


def _wikitext_test() -> Path | None:
    env = os.environ.get("DEPGRAPH_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates += [p / "shared" / "data" / "wikitext-2" for p in ROOT.parents]
    return next((c / "test.txt" for c in candidates if (c / "test.txt").is_file()), None)


@pytest.fixture(scope="module")
def wikitext_test() -> Path:
    path = _wikitext_test()
    if path is None:
        pytest.skip("WikiText-2 test.txt not found (set DEPGRAPH_DATA_DIR)")
    return path


def _word_tokenizer(text_file: Path, directory: Path) -> None:
    """A word-level fast tokenizer trained offline on ``text_file`` (lm-eval's ``--model hf`` needs one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train([str(text_file)], trainers.WordLevelTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)


@pytest.fixture(scope="module")
def story(tmp_path_factory) -> dict:
    """``prune --depth 1`` then ``heal --teacher`` on a tiny Llama with its own word tokenizer."""
    root = tmp_path_factory.mktemp("story")
    (root / "train.txt").write_text(TEXT)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=128)
    LlamaForCausalLM(config).eval().save_pretrained(root / "base")
    _word_tokenizer(root / "train.txt", root / "base")
    prune = _run(["prune", "base", "--depth", "1", "--calib", "train.txt", "--calib-samples", "2", "--seq-len",
                  "16", "--out", "pruned"], root)
    heal = _run(["heal", "pruned", "--teacher", "base", "--data", "train.txt", "--eval-data", "train.txt",
                 "--eval-every", "4", "--steps", "8", "--seq-len", "16", "--batch-size", "4", "--lr", "5e-3",
                 "--out", "healed"], root)
    return {"root": root, "prune": prune, "heal": heal}


def test_prune_depth_alone_removes_blocks_without_width_pruning(story):
    proc, root = story["prune"], story["root"]
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((root / "pruned" / "plan.json").read_text())
    assert len(plan["depth"]["removed"]) == 1 and plan["groups"] == {} and plan["ratio"] is None
    model = depgraph.load_pretrained(root / "pruned")
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert model.config.hidden_size == 32 and model.config.intermediate_size == 64


def test_heal_writes_a_plain_healed_model_and_its_record(story):
    proc, root = story["heal"], story["root"]
    assert proc.returncode == 0, proc.stderr
    assert "heal (lora+kd): 8 steps" in proc.stdout
    record = json.loads((root / "healed" / "heal.json").read_text())
    assert record["method"] == "lora+kd" and record["steps"] == 8 and len(record["eval_loss"]) == 2
    assert record["tokens"].startswith("tokenizer ") and "Byte" not in record["tokens"]  # its own tokenizer
    pruned = depgraph.load_pretrained(root / "pruned")
    healed = depgraph.load_pretrained(root / "healed")
    assert {k: v.shape for k, v in healed.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}
    assert any(not torch.equal(v, pruned.state_dict()[k]) for k, v in healed.state_dict().items())
    assert (root / "healed" / "tokenizer.json").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".healed")]  # no temporary left behind
    # stderr is a pipe here: plain progress lines, no progress bars
    assert "depgraph: heal: train (3/4" in proc.stderr and "heal step 8/8: loss" in proc.stderr
    assert "\r" not in proc.stderr and "it/s]" not in proc.stderr


def test_heal_refuses_bad_requests_before_writing(story):
    root = story["root"]
    proc = _run(["heal", "pruned", "--method", "kd", "--data", "train.txt", "--out", "nope"], root)
    assert proc.returncode == 2 and "--teacher" in proc.stderr and not (root / "nope").exists()
    proc = _run(["heal", "pruned", "--data", "train.txt", "--patience", "2", "--out", "nope"], root)
    assert proc.returncode == 2 and "eval_data" in proc.stderr and not (root / "nope").exists()


def test_eval_runs_the_lm_evaluation_harness_offline(story, wikitext_test):
    pytest.importorskip("lm_eval")
    root = story["root"]
    assert story["heal"].returncode == 0
    proc = _run(["eval", "healed", "--lm-eval", str(wikitext_test), "--limit", "12", "--batch-size", "4"], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("lm-eval depgraph_text"))
    ppl = float(line.split("word_perplexity ")[1].split(",")[0])
    assert 1.0 < ppl < float("inf") and str(wikitext_test.name) in line


def test_prune_experts_removes_routed_experts(tmp_path):
    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=300, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=128)
    MixtralForCausalLM(config).eval().save_pretrained(tmp_path / "moe")
    (tmp_path / "train.txt").write_text(TEXT)
    _word_tokenizer(tmp_path / "train.txt", tmp_path / "moe")  # vocab 300 is not bytes: text needs its tokenizer
    proc = _run(["prune", "moe", "--experts", "0.25", "--calib", "train.txt", "--calib-samples", "2",
                 "--seq-len", "16", "--out", "out", "-q"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert all(len(v) == 2 for v in plan["experts"]["removed"].values()) and len(plan["experts"]["removed"]) == 2
    assert depgraph.load_pretrained(tmp_path / "out").config.num_local_experts == 6
    proc = _run(["prune", "moe", "--depth", "2", "--calib", "train.txt", "--out", "out2", "-q"], tmp_path)
    assert proc.returncode == 2 and "at least one must stay" in proc.stderr and not (tmp_path / "out2").exists()


def test_cli_keeps_torch_default_threads_unless_asked(tmp_path):
    code = ("import torch; from depgraph.cli import main; n = torch.get_num_threads(); "
            "main(['inspect', 'tiny-llama', '-q']); a = torch.get_num_threads(); "
            "main(['inspect', 'tiny-llama', '-q', '--threads', '1']); print(n, a, torch.get_num_threads())")
    env = {**_env(tmp_path), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-3:] == ["2", "2", "1"]


def test_lm_eval_text_task_has_one_document_per_line(tmp_path):
    from depgraph.evaluate import lm_eval_text_task

    (tmp_path / "t.txt").write_text(" = Title = \n \n First paragraph here . \n\n Second one . \n")
    name = lm_eval_text_task(tmp_path / "t.txt", tmp_path / "task")
    spec = json.loads((tmp_path / "task" / f"{name}.yaml").read_text())
    assert spec["output_type"] == "loglikelihood_rolling"
    assert [m["metric"] for m in spec["metric_list"]] == ["word_perplexity", "byte_perplexity", "bits_per_byte"]
    docs = [json.loads(x)["text"] for x in (tmp_path / "task" / f"{name}.jsonl").read_text().splitlines()]
    assert docs == ["= Title =", "First paragraph here .", "Second one ."]
    (tmp_path / "empty.txt").write_text(" \n\n")
    with pytest.raises(ValueError, match="no non-empty line"):
        lm_eval_text_task(tmp_path / "empty.txt", tmp_path / "task2")
