"""The ``depgraph`` command line, run as a user runs it: ``python -m depgraph ...`` in a subprocess.

Every command runs once, concurrently, on a tiny random Llama saved with ``save_pretrained`` (module
fixture ``runs``); each test then checks one command's output and files. Also: the built-in demo
models resolve, and the two CLI examples run.
"""

from __future__ import annotations

import json
import math
import os
import re
import runpy
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import depgraph
import depgraph.data
from depgraph.models import DEMO_MODELS, ModelSpecError, is_meta, load_model, resolve

ROOT = Path(__file__).resolve().parents[1]
HAVE_DOT = shutil.which("dot") is not None
TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
        "structure in Paris. Its base is square, measuring 125 metres on each side. ") * 40


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def __str__(self) -> str:  # shown by pytest when an assertion fails
        return (f"depgraph {' '.join(self.args)} -> rc {self.returncode} in {self.seconds:.1f} s\n"
                f"--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}")


def _run(args: list[str], cwd: Path, console_script: bool = False, env: dict[str, str] | None = None) -> Result:
    exe = [shutil.which("depgraph") or "depgraph"] if console_script else [sys.executable, "-m", "depgraph"]
    start = time.perf_counter()
    proc = subprocess.run(exe + args, cwd=cwd, capture_output=True, text=True, timeout=240, env=env)
    return Result(args, proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A tiny random Llama (8 query / 4 KV heads, hidden 64) saved by HF save_pretrained, and a text file."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=8, vocab_size=300, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(root / "tiny")
    depgraph.data.ByteTokenizer().save_pretrained(root / "tiny")  # the model's own tokenizer
    model.save_pretrained(root / "bare")  # no tokenizer files: text needs --tokenizer
    (root / "text.txt").write_text(TEXT)
    return root


@pytest.fixture(scope="module")
def runs(work: Path) -> dict[str, Result]:
    """Every command once; they run concurrently (each pays the torch import, the work is tiny)."""
    tiny, text = str(work / "tiny"), str(work / "text.txt")
    jobs: dict[str, tuple[list[str], bool]] = {
        "demo": (["demo", "-q", "--out", "out/demo"], False),
        "prune": (["prune", tiny, "--ratio", "0.2", "--criterion", "taylor_first", "--strategy", "all",
                   "--calib", text, "--calib-samples", "2", "--seq-len", "32", "--out", "out/pruned", "-q",
                   "--no-hf-loadable"], False),
        "prune_default": (["prune", tiny, "--ratio", "0.2", "--criterion", "l2", "--strategy", "all", "--target",
                           "params", "--out", "out/pruned_default", "-q"], False),
        "prune_allocation": (["prune", tiny, "--ratio", "0.25", "--criterion", "l2", "--target", "params",
                              "--allocation", "increasing", "--allocation-spread", "0.9", "--out",
                              "out/pruned_increasing", "-q"], False),
        "inspect": (["inspect", tiny, "-q"], False),
        "inspect_json": (["inspect", tiny, "--json", "-q"], False),
        "eval": (["eval", tiny, "--ppl", text, "--context-length", "32", "--max-tokens", "600"], False),
        "bad_path": (["inspect", str(work / "no-such-model")], False),
        "bad_ratio": (["prune", tiny, "--ratio", "1.5", "--out", "out/x"], False),
        "bad_criterion": (["prune", tiny, "--criterion", "no_such_criterion", "--out", "out/x"], False),
    }
    if HAVE_DOT:
        jobs["render"] = (["render", tiny, "-o", "out/graph.svg", "--scope", "model.layers.0", "--level",
                           "neuron", "--report", "out/report.html", "-q"], False)
    if shutil.which("depgraph"):
        jobs["script_help"] = (["--help"], True)
    bare = str(work / "bare")
    jobs["no_tokenizer"] = (["eval", bare, "--ppl", text, "--context-length", "32", "--max-tokens", "100", "-q"],
                          False)
    jobs["eval_tokenizer"] = (["eval", bare, "--ppl", text, "--context-length", "32", "--max-tokens", "100",
                               "--tokenizer", tiny], False)
    no_data = {k: v for k, v in os.environ.items() if k != "DEPGRAPH_DATA_DIR"}
    with ThreadPoolExecutor(max_workers=4) as pool:  # demo first: its wall time is asserted
        futures = {name: pool.submit(_run, args, work, script) for name, (args, script) in jobs.items()}
        futures["no_calib"] = pool.submit(_run, ["prune", tiny, "--criterion", "taylor_first", "--out", "out/y", "-q"],
                                          work, False, no_data)
        return {name: f.result() for name, f in futures.items()}


def test_inspect_prints_groups_frozen_and_warnings(runs):
    r = runs["inspect"]
    assert r.returncode == 0, r
    for text in ("model.layers.0.mlp", "model.layers.1.self_attn", "hidden", "params/unit",
                 "frozen parameter dims (never cut): ", "warnings"):
        assert text in r.stdout, r
    row = next(line for line in r.stdout.splitlines() if line.split()[:3] == ["A", "0", "model.layers.0.mlp"])
    assert row.split()[3] == "128", r  # one unit per MLP neuron


def test_inspect_json_parses(runs):
    r = runs["inspect_json"]
    assert r.returncode == 0, r
    data = json.loads(r.stdout)
    kinds = {g["kind"]: g for g in reversed(data["groups"])}
    assert set(kinds) == {"A", "B", "C"}
    assert kinds["A"]["size"] == 128 and kinds["B"]["size"] == 4 and kinds["C"]["size"] == 64
    for group in data["groups"]:
        assert group["name"] and group["members"]
        for m in group["members"]:
            assert {"param", "dim", "role"} <= set(m)
    assert data["parameters"] > 0 and isinstance(data["warnings"], list) and isinstance(data["frozen"], list)


def test_prune_writes_reloadable_model_and_plan(runs, work):
    r = runs["prune"]
    assert r.returncode == 0, r
    assert "parameters:" in r.stdout and "time:" in r.stdout, r
    out = work / "out" / "pruned"
    plan = json.loads((out / "plan.json").read_text())
    assert plan["params_after"] < plan["params_before"]
    assert {g["kind"] for g in plan["groups"].values()} == {"A", "B", "C"}
    for name, g in plan["groups"].items():
        assert len(g["removed"]) == g["before"] - g["after"] > 0, name
        assert len(set(g["removed"])) == len(g["removed"]) and max(g["removed"]) < g["before"], name
    model = depgraph.load_pretrained(out)
    assert depgraph.count_parameters(model) == plan["params_after"]
    with torch.no_grad():
        logits = model(torch.arange(1, 17)[None]).logits
    assert logits.shape == (1, 16, 300) and torch.isfinite(logits).all()


def test_prune_default_plan_is_plain_hf(runs, work):
    """Issue 19: the CLI's default plan keeps the model loadable by plain from_pretrained and prints the
    per-kind ratios; a per-layer (non-uniform) plan would need depgraph's own format."""
    from transformers import AutoModelForCausalLM

    r = runs["prune_default"]
    assert r.returncode == 0, r
    assert "plain from_pretrained: yes" in r.stdout, r.stdout
    assert all(f"  {k}: " in r.stdout for k in "ABC"), r.stdout  # one line per kind
    out = work / "out" / "pruned_default"
    plan = json.loads((out / "plan.json").read_text())
    assert plan["hf_loadable"] is True and plan["plain_hf"] is True and set(plan["achieved"]) == {"A", "B", "C"}
    assert abs(1 - plan["params_after"] / plan["params_before"] - 0.2) < 0.01
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no depgraph involved
    assert depgraph.count_parameters(model) == plan["params_after"]


def test_prune_allocation_gives_deeper_layers_less_width(runs, work):
    """Issue 16: --allocation increasing spreads the parameter budget so later layers lose more; such a
    model has per-layer widths, so --hf-loadable defaults off and depgraph's loader opens it."""
    r = runs["prune_allocation"]
    assert r.returncode == 0, r
    assert "allocation increasing: layer 0" in r.stdout, r
    out = work / "out" / "pruned_increasing"
    plan = json.loads((out / "plan.json").read_text())
    assert plan["allocation"] == "increasing" and plan["allocation_spread"] == 0.9
    assert plan["hf_loadable"] is False and plan["plain_hf"] is False
    mlp = [plan["groups"][f"model.layers.{i}.mlp"] for i in range(2)]
    assert mlp[0]["before"] - mlp[0]["after"] < mlp[1]["before"] - mlp[1]["after"], plan["groups"]
    assert abs(1 - plan["params_after"] / plan["params_before"] - 0.25) < 0.01
    model = depgraph.load_pretrained(out)
    assert depgraph.count_parameters(model) == plan["params_after"]


@pytest.mark.skipif(not HAVE_DOT, reason="Graphviz `dot` is not installed")
def test_render_writes_svg_and_report(runs, work):
    r = runs["render"]
    assert r.returncode == 0, r
    svg = (work / "out" / "graph.svg").read_text()
    assert "<svg" in svg
    assert "<html" in (work / "out" / "report.html").read_text().lower()


def test_eval_prints_perplexity_with_context_length(runs):
    r = runs["eval"]
    assert r.returncode == 0, r
    hit = re.search(r"perplexity: ([0-9.]+) .*context length 32", r.stdout)
    assert hit, r
    ppl = float(hit.group(1))
    assert math.isfinite(ppl) and ppl > 1
    assert len(r.stdout.strip().splitlines()) == 1, r  # progress bars go to stderr


def test_eval_names_the_tokenizer_it_used(runs, work):
    r = runs["eval"]
    assert "tokenizer ByteTokenizer" in r.stdout, r
    r = runs["eval_tokenizer"]
    assert r.returncode == 0 and "tokenizer ByteTokenizer" in r.stdout, r


def test_demo_runs_end_to_end(runs, work):
    r = runs["demo"]
    assert r.returncode == 0, r
    assert r.seconds < 90, r
    for header in ("1. trace", "2. coupled groups", "3. score", "4. plan", "5. cut and verify",
                   "6. save and reload", "7. render", "all checks passed"):
        assert header in r.stdout, r
    deltas = re.findall(r"cut vs zero-mask = ([0-9.e+-]+) ok", r.stdout)
    assert len(deltas) == 2 and all(float(d) < 1e-4 for d in deltas), r  # A and B are exact
    out = work / "out" / "demo"
    assert (out / "report.html").is_file() and (out / ("graph.svg" if HAVE_DOT else "graph.dot")).is_file()
    assert depgraph.count_parameters(depgraph.load_pretrained(out / "model")) > 0


@pytest.mark.parametrize("name, words", [("bad_path", "no-such-model"), ("bad_ratio", "ratio"),
                                         ("bad_criterion", "no_such_criterion"),
                                         ("no_tokenizer", "--tokenizer DIR"),  # no bytes-mod-vocab fallback
                                         ("no_calib", "--calib FILE")])  # no random-ids fallback
def test_bad_input_is_one_line_error(runs, name, words):
    r = runs[name]
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("depgraph: error: ") and words in lines[0], r
    assert "Traceback" not in r.stderr and r.stdout == "", r


def test_console_script_is_installed(runs):
    if "script_help" not in runs:
        pytest.skip("the depgraph console script is not on PATH (pip install -e .)")
    r = runs["script_help"]
    assert r.returncode == 0 and all(c in r.stdout for c in ("inspect", "prune", "render", "eval", "demo")), r


# ---- in-process: model specs and examples ----------------------------------------------------------------


def test_model_specs_resolve_and_fail_clearly(work):
    assert resolve(str(work / "tiny")).kind == "hf"
    assert resolve(str(work / "tiny" / "config.json")).kind == "config"
    assert resolve("tiny-llama").kind == "demo"
    with pytest.raises(ModelSpecError, match="not a model directory, a config.json file or a built-in"):
        resolve("definitely-not-a-model")
    with pytest.raises(ModelSpecError, match="no config.json"):
        resolve(str(work))
    meta = load_model(str(work / "tiny" / "config.json"), meta=True)
    real = load_model(work / "tiny")
    assert is_meta(meta) and not is_meta(real)
    assert depgraph.count_parameters(meta) == depgraph.count_parameters(real)
    big = load_model("llama-70b-shape")  # shapes only: nothing allocated
    assert is_meta(big) and depgraph.count_parameters(big) > 6e10
    with pytest.raises(ModelSpecError, match="shape-only"):
        depgraph.models.demo_model("llama-7b-shape", device="cpu")
    for name, spec in DEMO_MODELS.items():
        if not spec.meta_only:
            model = depgraph.models.demo_model(name)
            with torch.no_grad():
                assert model(torch.arange(8)[None]).logits.shape[-1] == model.config.vocab_size


@pytest.mark.parametrize("name", ["trace_and_inspect.py", "prune_and_save.py"])
def test_examples_run(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # anything an example writes lands here
    runpy.run_path(str(ROOT / "examples" / name), run_name="__main__")
    assert capsys.readouterr().out.strip()
