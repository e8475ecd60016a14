"""Smoke tests of the benchmark scripts (issues 8 and 11): they run, print their tables, and the core
architecture families fully pass the coverage checks.

Both scripts run as subprocesses, exactly as a user runs them. Smoke tests assert output, never elapsed
time: a busy machine may take several times longer than an idle one, and that is not a failure.
The whole file takes about 4-5 minutes on an idle 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
CORE = ["llama", "mistral", "qwen2", "gpt2", "opt", "phi3", "bert"]

pytestmark = pytest.mark.slow


# Only a hang guard, never a performance check: an hour is far above any realistic run (each script takes
# minutes even on a loaded machine), so reaching it means the script hangs, not that the machine is busy.
HANG_GUARD_S = 3600


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    try:
        return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=HANG_GUARD_S, env=env)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-2000:] if isinstance(exc.stderr, bytes) else (exc.stderr or "")[-2000:]
        pytest.fail(f"{' '.join(args)} still running after {HANG_GUARD_S} s (hung?); stderr tail:\n{tail}")


def test_speed_quick_prints_table(tmp_path: Path) -> None:
    """`speed.py --quick` (tiny + 1.1B shape with 4 layers, 2 runs) prints the main table and writes JSON."""
    out = tmp_path / "speed.json"
    # speed.py bounds each child (30 s for tiny models under --quick) so a slow tool becomes a "timeout"
    # cell; depgraph's cells must be "ok", so give its tiny-model children a hang guard, not a budget.
    # Torch-Pruning's group search hangs on the tiny GQA Llama: its cells get a short budget ("timeout")
    done = _run([str(BENCH / "speed.py"), "--quick", "--small-timeout", "600", "--peer-timeout", "30",
                 "--json", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    assert "| model | layers (dg / TP / export)" in text
    assert "tiny Llama" in text and "TinyLlama-1.1B shape" in text
    data = json.loads(out.read_text())
    assert [row["key"] for row in data["main"]] == ["tiny-2L-cpu", "1.1b-4L-cpu"]
    for row in data["main"]:
        # depgraph itself must produce a measurement (Torch-Pruning may legitimately time out)
        assert row["cells"]["depgraph"]["status"] == "ok", row["cells"]["depgraph"]
        assert row["cells"]["depgraph"]["median_s"] > 0
        for tool in ("depgraph", "tp", "export"):
            assert row["cells"][tool]["status"] in {"ok", "timeout", "error"}


def test_coverage_sample_core_families_pass(tmp_path: Path) -> None:
    """`coverage.py --sample --jobs 2` prints the summary line; llama, mistral, qwen2, gpt2, opt, phi3, bert pass."""
    out = tmp_path / "coverage.json"
    md = tmp_path / "coverage.md"
    # coverage.py gives each architecture 120 s by default and records "timeout" past it; the core families
    # must pass, so their budget is a hang guard too
    done = _run([str(BENCH / "coverage.py"), "--sample", "--jobs", "2", "--timeout", "1200", "--json", str(out),
                 "--out", str(md)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "architectures fully pass (" in done.stdout
    assert md.read_text().strip().endswith("%)")
    records = {r["name"]: r for r in json.loads(out.read_text())["records"]}
    failing = {name: records[name].get("reason") or records[name]["status"]
               for name in CORE if records[name]["status"] != "pass"}
    assert not failing, f"core families must fully pass: {failing}"


def test_coverage_tiny_configs_keep_invariants() -> None:
    """The tiny-config derivation keeps what each config needs: a field tied to its partner (LongCat's
    ``head_dim`` = ``qk_rope_head_dim``), an attention layer in an all-``linear_attention`` default
    (GraniteMoeHybrid), the class default where a validator rejects an override (ZAYA's top-1 routing),
    two layers of a shared block's kind (Zamba), and None-default sizes when asked (Qwen4-Exp's indexer)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("depgraph_coverage_tool", BENCH / "coverage.py")
    cov = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = cov  # its dataclasses look their module up
    spec.loader.exec_module(cov)
    entries = {e.name: e for e in cov.registry(["longcat_flash", "granitemoehybrid", "zaya", "zamba",
                                                 "qwen4_exp_text"])}
    longcat = cov.build_config(entries["longcat_flash"])
    assert longcat.head_dim == longcat.qk_rope_head_dim == cov.SIZES["qk_rope_head_dim"]
    granite = cov.build_config(entries["granitemoehybrid"])
    assert granite.num_hidden_layers == cov.LAYERS and "full_attention" in granite.layer_types
    assert cov.build_config(entries["zaya"], revert=True).num_experts_per_tok == 1
    zamba = cov.build_config(entries["zamba"], one_kind=True)
    assert zamba.layers_block_type == ["hybrid"] * cov.LAYERS
    qwen4 = cov.build_config(entries["qwen4_exp_text"], fill_none=True)
    assert (qwen4.indexer_budget, qwen4.indexer_compress_ratio, qwen4.indexer_kv_heads) == (4, 2, 1)
