"""Analysis speed: depgraph ``trace+groups`` vs Torch-Pruning's DependencyGraph vs bare ``torch.export``.

Usage::

    python benchmarks/speed.py [--quick] [--runs N] [--json PATH] [--md PATH] [--isolation spawn|fork]

Every measurement runs in its own child process (a fresh interpreter by default, ``--isolation fork``
forks a child of an interpreter that has only imported the libraries), so the peak RSS read from
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` belongs to one tool on one model. Children have a
timeout; a hang or a crash becomes a ``timeout`` / ``error`` cell instead of stopping the run, and a
cell that times out is not retried (a timeout is a finding, not noise). All models are random-weight
Llamas built from configs (``LlamaForCausalLM``); the imports are done before the clock starts, first-call
costs (lazy imports inside ``torch.export``, ...) are part of each tool's time.

Sections (full run):

* main table: tiny Llama, TinyLlama-1.1B shape, Llama-2-7B shape (depgraph and export: all 32 layers on
  the ``meta`` device; Torch-Pruning needs real weights for its autograd forward, so it runs with fewer
  layers on CPU: see the row) and the 7B shape with the same few layers on CPU for all three tools
  (the like-for-like ratio); min and median of ``--runs`` runs, peak RSS, ratios of medians;
* scaling: depgraph (and export) on 2..32 layers of the 7B shape on ``meta``;
* Llama-3-70B shape on ``meta``: trace + groups + a random-criterion 20% plan (computed, not cut), and
  depgraph trace+groups (replicated blocks, the default; and ``replicate=False``) vs a bare ``torch.export``
  of all 80 layers, each in a fresh child, with the ratio (issue 18's goal: < 0.5x export);
* a full 20% prune (L2-magnitude scores, all A/B/C groups, forward check) of the 1.1B shape with real
  random weights, by depgraph and by Torch-Pruning (MetaPruner, heads via num_heads) in the same run.

``--quick`` (the test's smoke run, well under 3 minutes): tiny + 1.1B shape with 4 layers, 2 runs,
forked children. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
RESULT_TAG = "RESULT-JSON "
SEQ_LEN = 8

# name -> Llama shape (hidden, intermediate, layers, heads, kv heads, vocab)
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(label="tiny Llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1000),
    "1.1b": dict(label="TinyLlama-1.1B shape", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "7b": dict(label="Llama-2-7B shape", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "70b": dict(label="Llama-3-70B shape", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
}
TOOLS = ("depgraph", "tp", "export")
TOOL_LABEL = {"depgraph": "depgraph trace+groups", "tp": "Torch-Pruning build+groups", "export": "torch.export"}


# ---- child side: build one model, run one tool, report time and peak RSS ---------------------------------

def _import_all() -> None:
    """Import every library any tool needs, so each child starts from the same baseline (time and RSS)."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch  # noqa: F401
    import torch_pruning  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import depgraph  # noqa: F401


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mib() -> float:
    """Current resident set size (``/proc/self/statm``), falling back to the peak."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mib()


def build_llama(shape: str, layers: int | None, device: str, seed: int = 0):
    """A random-weight ``LlamaForCausalLM`` of ``shape`` (``layers`` overrides the depth), in eval mode.

    On ``meta`` nothing is allocated. On CPU the weights are allocated without the (slow) default init and
    filled with seeded N(0, 0.02) noise (norm weights 1), so every page is resident, as for a loaded model.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    spec = {k: v for k, v in SHAPES[shape].items() if k != "label"}
    if layers is not None:
        spec["num_hidden_layers"] = layers
    config = LlamaConfig(**spec, max_position_embeddings=2048, use_cache=False, tie_word_embeddings=False)
    if device == "meta":
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        return model.eval()
    with no_init_weights():
        model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02, generator=gen)
            else:
                param.fill_(1.0)
    return model.eval()


def example_ids(model, device: str):
    import torch

    vocab = int(model.config.vocab_size)
    return (torch.arange(SEQ_LEN).reshape(1, SEQ_LEN) % (vocab - 1) + 1).to(device)


def _run_tool(tool: str, model, ids) -> dict[str, Any]:
    """Run one tool on ``model``; returns the timed seconds and what it found."""
    import torch

    if tool in ("depgraph", "depgraph_full"):
        import depgraph

        start = time.perf_counter()
        graph = depgraph.trace(model, ids, replicate=tool == "depgraph")  # full: every block analysed
        counts = {kind: len(graph.groups(kind)) for kind in "ABC"}
        elapsed = time.perf_counter() - start
        return {"time_s": elapsed, "groups": counts, "warnings": len(graph.warnings)}
    if tool == "export":
        start = time.perf_counter()
        with torch.no_grad():
            exported = torch.export.export(model, (ids,), kwargs={"use_cache": False}, strict=False)
        elapsed = time.perf_counter() - start
        return {"time_s": elapsed, "nodes": len(exported.graph.nodes)}
    if tool == "tp":
        import torch_pruning as tp

        start = time.perf_counter()
        dep = tp.DependencyGraph().build_dependency(model, example_inputs=ids)
        built = time.perf_counter()
        groups = list(dep.get_all_groups())
        end = time.perf_counter()
        return {"time_s": end - start, "build_s": built - start, "groups_s": end - built, "groups": len(groups)}
    raise ValueError(f"unknown tool {tool!r}")


def _plan_70b(model, ids, ratio: float, seed: int) -> dict[str, Any]:
    """Trace + groups + a random-criterion plan (lowest ``ratio`` of random scores per group; not cut)."""
    import numpy as np

    import depgraph

    start = time.perf_counter()
    graph = depgraph.trace(model, ids)
    groups = graph.groups()
    traced = time.perf_counter()
    rng = np.random.default_rng(seed)
    plan = {}
    for group in groups:
        n = int(group.size * ratio)
        if n:
            plan[group] = np.argsort(rng.random(group.size), kind="stable")[:n]
    depgraph.validate_plan(graph, plan)
    end = time.perf_counter()
    removed = sum(g.parameter_count(u) for g, u in plan.items() if g.kind.value != "C")
    return {
        "trace_s": traced - start, "plan_s": end - traced, "time_s": end - start,
        "groups": {k: len(graph.groups(k)) for k in "ABC"}, "units_planned": int(sum(len(u) for u in plan.values())),
        "params": int(sum(int(np.prod(s)) for s in graph.param_shapes.values())),
        "params_planned_AB": int(removed),
    }


def _prune_1b(model, ids, ratio: float) -> dict[str, Any]:
    """depgraph: trace, L2 scores (``importance``), 20% lowest units of every A/B/C group, forward-checked cut."""
    import depgraph

    start = time.perf_counter()
    graph = depgraph.trace(model, ids)
    traced = time.perf_counter()
    pruner = depgraph.Pruner(graph, criterion="l2", ratio=ratio, structure="all", progress=False)
    plan = pruner.plan()
    scored = time.perf_counter()
    report = pruner.step(plan)
    with __import__("torch").no_grad():
        model(ids)  # the forward check a user runs
    end = time.perf_counter()
    return {
        "trace_s": traced - start, "score_s": scored - traced, "prune_s": end - scored, "time_s": end - start,
        "params_before": report.params_before, "params_after": report.params_after, "ratio": report.ratio,
        "groups": {k: len(graph.groups(k)) for k in "ABC"},
    }


def _prune_1b_tp(model, ids, ratio: float) -> dict[str, Any]:
    """Torch-Pruning: MetaPruner, L2 magnitude, ``ratio`` of every layer's channels and of heads (its LLM
    recipe: ``num_heads`` for q/k/v, lm_head ignored), one step, then a forward check."""
    import torch
    import torch_pruning as tp

    start = time.perf_counter()
    num_heads = {}
    for layer in model.model.layers:
        a = layer.self_attn
        num_heads[a.q_proj] = model.config.num_attention_heads
        num_heads[a.k_proj] = model.config.num_key_value_heads
        num_heads[a.v_proj] = model.config.num_key_value_heads
    before = sum(p.numel() for p in model.parameters())
    pruner = tp.pruner.MetaPruner(model, ids, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=[model.lm_head], num_heads=num_heads,
                                  prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio,
                                  global_pruning=False, output_transform=lambda out: out.logits)
    built = time.perf_counter()
    pruner.step()
    with torch.no_grad():
        model(ids)
    end = time.perf_counter()
    after = sum(p.numel() for p in model.parameters())
    return {"trace_s": built - start, "score_s": 0.0, "prune_s": end - built, "time_s": end - start,
            "params_before": before, "params_after": after, "ratio": 1 - after / before}


def run_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Child entry point: build the model of ``spec``, run its task, measure; never raises."""
    try:
        _import_all()
        import torch

        torch.manual_seed(spec.get("seed", 0))
        t0 = time.perf_counter()
        model = build_llama(spec["shape"], spec.get("layers"), spec["device"], spec.get("seed", 0))
        ids = example_ids(model, spec["device"])
        build_s = time.perf_counter() - t0
        rss_before = current_rss_mib()
        task = spec["task"]
        if task == "tool":
            out = _run_tool(spec["tool"], model, ids)
        elif task == "plan":
            out = _plan_70b(model, ids, spec["ratio"], spec.get("seed", 0))
        elif task == "prune":
            out = _prune_1b(model, ids, spec["ratio"])
        elif task == "prune_tp":
            out = _prune_1b_tp(model, ids, spec["ratio"])
        else:
            raise ValueError(f"unknown task {task!r}")
        out.update(status="ok", build_s=build_s, rss_before_mib=rss_before, peak_rss_mib=peak_rss_mib(),
                   params=out.get("params") or sum(p.numel() for p in model.parameters()))
        return out
    except Exception as exc:  # a failing tool is a result cell, not a crash
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return {"status": "error", "error": f"{type(exc).__name__}: {first}",
                "traceback": traceback.format_exc()[-2000:], "peak_rss_mib": peak_rss_mib()}


# ---- parent side: isolation, timeouts, aggregation ---------------------------------------------------

def _fork_child(conn, spec: dict[str, Any]) -> None:
    conn.send(run_job(spec))
    conn.close()


def run_isolated(spec: dict[str, Any], timeout: float, isolation: str = "spawn") -> dict[str, Any]:
    """Run ``spec`` in a child process; ``{"status": "timeout"}`` past ``timeout`` seconds."""
    start = time.perf_counter()
    if isolation == "fork":
        import multiprocessing as mp

        ctx = mp.get_context("fork")
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_fork_child, args=(child, spec), daemon=True)
        proc.start()
        child.close()
        result: dict[str, Any] | None = None
        if parent.poll(timeout):
            try:
                result = parent.recv()
            except EOFError:
                result = None
        if result is None:
            timed_out = proc.is_alive()
            proc.kill()
            proc.join()
            result = ({"status": "timeout"} if timed_out else
                      {"status": "error", "error": f"child died (exit code {proc.exitcode})"})
        else:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        parent.close()
    else:
        cmd = [sys.executable, str(HERE), "--worker", json.dumps(spec)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            result = {"status": "timeout"}
        else:
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT_TAG)]
            if lines:
                result = json.loads(lines[-1][len(RESULT_TAG):])
            else:
                tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
                result = {"status": "error", "error": f"child died: {tail[:200]}"}
    result["wall_s"] = time.perf_counter() - start
    return result


@dataclass
class Cell:
    """Repeated runs of one job: min/median time, peak RSS, or the failure that stopped it."""

    runs: list[dict[str, Any]] = field(default_factory=list)
    status: str = "ok"
    error: str = ""

    @property
    def times(self) -> list[float]:
        return [r["time_s"] for r in self.runs if r.get("status") == "ok"]

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times and self.status == "ok" else None

    @property
    def min(self) -> float | None:
        return min(self.times) if self.times and self.status == "ok" else None

    @property
    def peak_rss(self) -> float | None:
        peaks = [r["peak_rss_mib"] for r in self.runs if r.get("status") == "ok"]
        return max(peaks) if peaks else None

    @property
    def base_rss(self) -> float | None:
        base = [r["rss_before_mib"] for r in self.runs if r.get("status") == "ok"]
        return min(base) if base else None

    def time_text(self) -> str:
        if self.status != "ok":
            return self.status
        return f"{self.min:.2f} / {self.median:.2f}" if self.times else "-"

    def rss_text(self) -> str:
        if self.peak_rss is None:
            return "-"
        return f"{self.peak_rss:,.0f} (+{self.peak_rss - self.base_rss:,.0f})"

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "error": self.error, "min_s": self.min, "median_s": self.median,
                "peak_rss_mib": self.peak_rss, "rss_before_mib": self.base_rss,
                "runs": [{k: v for k, v in r.items() if k != "traceback"} for r in self.runs]}


def measure(spec: dict[str, Any], runs: int, timeout: float, isolation: str,
            log: Callable[[str], None]) -> Cell:
    """``runs`` isolated runs of ``spec``; stops at the first timeout or error (recorded in the cell)."""
    cell = Cell()
    for i in range(runs):
        result = run_isolated(spec, timeout, isolation)
        cell.runs.append(result)
        desc = f"{spec.get('tool', spec['task'])} {spec['shape']} L={spec.get('layers')} {spec['device']}"
        if result["status"] != "ok":
            cell.status = result["status"]
            cell.error = result.get("error", f"no result within {timeout:.0f} s")
            log(f"  {desc} run {i + 1}: {cell.status} {cell.error}")
            if result.get("traceback"):
                log("    " + result["traceback"].strip().splitlines()[-1])
            break
        log(f"  {desc} run {i + 1}: {result['time_s']:.2f} s, peak RSS {result['peak_rss_mib']:,.0f} MiB "
            f"(wall {result['wall_s']:.1f} s)")
    return cell


@dataclass
class Row:
    """One model of the main table: which layers/device each tool gets."""

    key: str
    shape: str
    layers: dict[str, int]
    device: dict[str, str]
    note: str = ""
    comparable: bool = True  # the three tools see the same model (ratios are meaningful)
    cells: dict[str, Cell] = field(default_factory=dict)


def _ratio(a: Cell, b: Cell) -> str:
    if a.median is None or b.median is None or b.median == 0:
        return "-"
    return f"{a.median / b.median:.2f}x"


def _n_params(shape: str, layers: int) -> int:
    s = SHAPES[shape]
    h, i, v = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    head = h // s["num_attention_heads"]
    attn = h * h * 2 + 2 * h * head * s["num_key_value_heads"]
    return 2 * v * h + layers * (attn + 3 * h * i + 2 * h) + h


def main_rows(quick: bool, tp_layers_7b: int) -> list[Row]:
    """The models of the main table."""
    def same(shape: str, layers: int, device: str = "cpu", note: str = "") -> Row:
        key = f"{shape}-{layers}L-{device}"
        return Row(key, shape, dict.fromkeys(TOOLS, layers), dict.fromkeys(TOOLS, device), note)

    if quick:
        return [same("tiny", 2), same("1.1b", 4, note="4 of 22 layers (--quick)")]
    seven = SHAPES["7b"]["num_hidden_layers"]
    return [
        same("tiny", 2),
        same("1.1b", 22),
        Row(f"7b-{seven}L-meta", "7b", {"depgraph": seven, "export": seven, "tp": tp_layers_7b},
            {"depgraph": "meta", "export": "meta", "tp": "cpu"},
            note=f"depgraph/export: {seven} layers on meta; Torch-Pruning: {tp_layers_7b} layers on CPU "
                 f"(it needs real weights; {seven} layers fp32 = 27 GB > RAM), so no depgraph/TP ratio here",
            comparable=False),
        same("7b", tp_layers_7b, note=f"{tp_layers_7b} of {seven} layers, CPU weights: the like-for-like "
                                      "7B-shape comparison"),
    ]


def _machine() -> dict[str, Any]:
    import torch
    import torch_pruning
    import transformers

    return {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "torch_pruning": getattr(torch_pruning, "__version__", "?"), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def run_benchmark(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Run every section; returns the JSON-able results (also rendered by :func:`render`)."""
    _import_all()
    runs = args.runs or (2 if args.quick else 3)
    results: dict[str, Any] = {"machine": _machine(), "runs": runs, "quick": args.quick,
                               "isolation": args.isolation, "seq_len": SEQ_LEN, "main": [], "scaling": [],
                               "sections": list(args.sections)}
    t_all = time.perf_counter()

    sections = set(args.sections)
    for row in main_rows(args.quick, args.tp_layers_7b) if "main" in sections else []:
        log(f"[main] {row.key}")
        for tool in TOOLS:
            layers, device = row.layers[tool], row.device[tool]
            small = _n_params(row.shape, layers) < 50_000_000
            timeout = min(args.timeout, args.small_timeout) if small else args.timeout
            if tool == "tp" and args.peer_timeout is not None:  # a peer that hangs is a finding, not a wait
                timeout = min(timeout, args.peer_timeout)
            spec = {"task": "tool", "tool": tool, "shape": row.shape, "layers": layers, "device": device}
            row.cells[tool] = measure(spec, runs, timeout, args.isolation, log)
        results["main"].append({
            "key": row.key, "label": SHAPES[row.shape]["label"], "layers": row.layers, "device": row.device,
            "params": {t: _n_params(row.shape, row.layers[t]) for t in TOOLS}, "note": row.note,
            "comparable": row.comparable, "cells": {t: c.to_json() for t, c in row.cells.items()},
            "ratio_depgraph_tp": (row.cells["depgraph"].median / row.cells["tp"].median
                                  if row.comparable and row.cells["depgraph"].median and row.cells["tp"].median
                                  else None),
            "ratio_depgraph_export": (row.cells["depgraph"].median / row.cells["export"].median
                                      if row.cells["depgraph"].median and row.cells["export"].median else None),
        })

    if args.quick or args.skip_extra:
        sections &= {"main"}
    if "scaling" in sections:
        for layers in args.scaling_layers:
            log(f"[scaling] 7b {layers} layers on meta")
            entry: dict[str, Any] = {"layers": layers}
            for tool in ("depgraph", "export"):
                spec = {"task": "tool", "tool": tool, "shape": "7b", "layers": layers, "device": "meta"}
                entry[tool] = measure(spec, runs, args.timeout, args.isolation, log).to_json()
            results["scaling"].append(entry)
    if "70b" in sections:
        log("[70b] trace + groups + random 20% plan on meta")
        spec = {"task": "plan", "shape": "70b", "layers": None, "device": "meta", "ratio": 0.2, "seed": 0}
        cell = measure(spec, runs, args.timeout, args.isolation, log)
        results["plan70b"] = cell.to_json()
        log("[70b] analysis: depgraph trace+groups (replicated blocks, and full) vs bare torch.export, 80 layers")
        entry = {}
        for tool in ("depgraph", "depgraph_full", "export"):
            spec = {"task": "tool", "tool": tool, "shape": "70b", "layers": None, "device": "meta"}
            entry[tool] = measure(spec, runs, args.timeout, args.isolation, log).to_json()
        results["analysis70b"] = entry
    if "prune" in sections:
        layers = args.prune_layers
        log(f"[prune] 1.1b {layers} layers, L2 20%, CPU weights")
        spec = {"task": "prune", "shape": "1.1b", "layers": layers, "device": "cpu", "ratio": 0.2}
        cell = measure(spec, 1, args.timeout, args.isolation, log)
        results["prune1b"] = cell.to_json() | {"layers": layers}
        log(f"[prune] 1.1b {layers} layers, Torch-Pruning L2 20%, CPU weights")
        cell = measure(spec | {"task": "prune_tp"}, 1, args.timeout, args.isolation, log)
        results["prune1b_tp"] = cell.to_json() | {"layers": layers}
    results["total_wall_s"] = time.perf_counter() - t_all
    results["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return results


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def render(results: dict[str, Any]) -> str:
    """The results as markdown tables."""
    m = results["machine"]
    out = [
        f"## depgraph analysis speed ({'quick' if results['quick'] else 'full'} run; sections: "
        f"{', '.join(results.get('sections', ['main']))})",
        "",
        f"torch {m['torch']}, transformers {m['transformers']}, torch-pruning {m['torch_pruning']}, "
        f"Python {m['python']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads); input ids "
        f"[1, {results['seq_len']}]; min / median of {results['runs']} runs, each in a fresh "
        f"{'forked child' if results['isolation'] == 'fork' else 'interpreter'}; peak RSS = ru_maxrss of that "
        "child in MiB (+ growth during the timed call); ratios are of medians.",
    ]
    if results["main"]:
        out += [
            "",
            "| model | layers (dg / TP / export) | params | depgraph trace+groups s | Torch-Pruning build+groups s "
            "| torch.export s | peak RSS MiB depgraph | peak RSS MiB TP | peak RSS MiB export | depgraph / TP "
            "| depgraph / export | notes |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
    for row in results["main"]:
        cells = {t: _cell_from_json(c) for t, c in row["cells"].items()}
        lay = " / ".join(f"{row['layers'][t]}{' meta' if row['device'][t] == 'meta' else ''}"
                         for t in ("depgraph", "tp", "export"))
        params = row["params"]["depgraph"]
        notes = [row["note"]] if row["note"] else []
        for tool in TOOLS:
            c = row["cells"][tool]
            if c["status"] != "ok":
                notes.append(f"{TOOL_LABEL[tool]}: {c['status']} ({c['error']})")
        ratio_tp = _fmt(row["ratio_depgraph_tp"]) + "x" if row["ratio_depgraph_tp"] else "-"
        ratio_ex = _fmt(row["ratio_depgraph_export"]) + "x" if row["ratio_depgraph_export"] else "-"
        out.append(
            f"| {row['label']} | {lay} | {params / 1e6:,.1f}M | {cells['depgraph'].time_text()} | "
            f"{cells['tp'].time_text()} | {cells['export'].time_text()} | {cells['depgraph'].rss_text()} | "
            f"{cells['tp'].rss_text()} | {cells['export'].rss_text()} | {ratio_tp} | {ratio_ex} | "
            f"{'; '.join(notes)} |")
    if results.get("scaling"):
        out += ["", "### Scaling: Llama-2-7B shape on meta, depgraph trace+groups (and bare torch.export)", "",
                "| layers | depgraph min / median s | s per layer | vs 2 layers | peak RSS MiB (+growth) "
                "| export min / median s | depgraph / export |",
                "|---:|---:|---:|---:|---:|---:|---:|"]
        base = None
        for entry in results["scaling"]:
            dg, ex = _cell_from_json(entry["depgraph"]), _cell_from_json(entry["export"])
            med = dg.median
            if base is None and med:
                base = (entry["layers"], med)
            rel = f"{med / base[1]:.2f}x (layers {entry['layers'] / base[0]:.0f}x)" if med and base else "-"
            out.append(f"| {entry['layers']} | {dg.time_text()} | {_fmt(med / entry['layers'] if med else None, '.3f')}"
                       f" | {rel} | {dg.rss_text()} | {ex.time_text()} | "
                       f"{_fmt(med / ex.median if med and ex.median else None)}x |")
    plan = results.get("plan70b")
    if plan:
        out += ["", "### Llama-3-70B shape (80 layers, hidden 8192, 64 heads / 8 KV) on meta", ""]
        ok = [r for r in plan["runs"] if r.get("status") == "ok"]
        if ok:
            r = min(ok, key=lambda x: x["time_s"])
            meds = {k: statistics.median(x[k] for x in ok) for k in ("trace_s", "plan_s", "time_s")}
            out += [
                "| params | groups A / B / C | trace+groups s (min / median) | random 20% plan s | total s "
                "| units planned | A+B params planned | peak RSS MiB (+growth) |",
                "|---:|---|---:|---:|---:|---:|---:|---:|",
                f"| {r['params'] / 1e9:.1f}B | {r['groups']['A']} / {r['groups']['B']} / {r['groups']['C']} | "
                f"{min(x['trace_s'] for x in ok):.1f} / {meds['trace_s']:.1f} | {meds['plan_s']:.2f} | "
                f"{meds['time_s']:.1f} | {r['units_planned']:,} | {r['params_planned_AB'] / 1e9:.2f}B | "
                f"{_cell_from_json(plan).rss_text()} |",
            ]
        else:
            out.append(f"{plan['status']}: {plan['error']}")
    analysis = results.get("analysis70b")
    if analysis:
        cells = {tool: _cell_from_json(data) for tool, data in analysis.items()}
        dg, full, ex = cells["depgraph"], cells["depgraph_full"], cells["export"]
        ratio = dg.median / ex.median if dg.median and ex.median else None
        verdict = "-" if ratio is None else ("met" if ratio < 0.5 else "missed")
        out += ["", "Analysis vs bare export, 80 layers on meta, fresh child each (goal: depgraph < 0.5x export):", "",
                "| depgraph trace+groups s (replicated blocks) | depgraph full analysis s | torch.export s "
                "| depgraph / export | full / export | peak RSS MiB depgraph | peak RSS MiB export | goal |",
                "|---:|---:|---:|---:|---:|---:|---:|---|",
                f"| {dg.time_text()} | {full.time_text()} | {ex.time_text()} | {_ratio(dg, ex)} | {_ratio(full, ex)} "
                f"| {dg.rss_text()} | {ex.rss_text()} | {verdict} |"]
    prune = results.get("prune1b")
    if prune:
        out += ["", f"### Full 20% prune of the TinyLlama-1.1B shape ({prune['layers']} layers, CPU random weights,"
                " L2-magnitude scores, 20% lowest units of every A/B/C group, forward-checked cut)", ""]
        ok = [r for r in prune["runs"] if r.get("status") == "ok"]
        if ok:
            r = ok[0]
            out += [
                "| tool | trace / build s | scores s | prune s | total s | params before -> after | removed "
                "| peak RSS MiB (+growth) | peak RSS / model bytes |",
                "|---|---:|---:|---:|---:|---|---:|---:|---:|",
            ]
            model_mib = r["params_before"] * 4 / 2**20
            for label, data in (("depgraph", prune), ("Torch-Pruning", results.get("prune1b_tp"))):
                done = [x for x in (data or {}).get("runs", []) if x.get("status") == "ok"]
                if not done:
                    out.append(f"| {label} | {(data or {}).get('status', 'not run')} | | | | | | | |")
                    continue
                x = done[0]
                peak = _cell_from_json(data).peak_rss
                out.append(f"| {label} | {x['trace_s']:.1f} | {x['score_s']:.1f} | {x['prune_s']:.1f} | "
                           f"{x['time_s']:.1f} | {x['params_before'] / 1e6:,.1f}M -> {x['params_after'] / 1e6:,.1f}M "
                           f"| {x['ratio']:.1%} | {_cell_from_json(data).rss_text()} | {peak / model_mib:.2f}x |")
            tp_ok = [x for x in (results.get("prune1b_tp") or {}).get("runs", []) if x.get("status") == "ok"]
            if tp_ok:
                out += ["", f"Torch-Pruning / depgraph total time: {tp_ok[0]['time_s'] / r['time_s']:.2f}x "
                            "(same run, same model shape, fresh child each)"]
        else:
            out.append(f"{prune['status']}: {prune['error']}")
    load = [m.get("loadavg_start"), m.get("loadavg_end")]
    load_text = " -> ".join(f"{x[0]:.1f}" for x in load if x) or "?"
    out += ["", f"total wall time {results['total_wall_s']:.0f} s; 1-min load average {load_text} "
                "(other work on the machine inflates every cell alike)"]
    return "\n".join(out)


def _cell_from_json(data: dict[str, Any]) -> Cell:
    return Cell(runs=list(data["runs"]), status=data["status"], error=data["error"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny + 1.1B shape with 4 layers, 2 runs, forked")
    parser.add_argument("--runs", type=int, default=None, help="runs per cell (default 3; 2 with --quick)")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--md", type=Path, default=None, help="also write the markdown here")
    parser.add_argument("--isolation", choices=("spawn", "fork"), default=None,
                        help="fresh interpreter per run (spawn, default) or a forked child (fork, --quick)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per child (large models)")
    parser.add_argument("--small-timeout", type=float, default=None,
                        help="seconds per child for models under 50M params (default 90; 30 with --quick)")
    parser.add_argument("--peer-timeout", type=float, default=None,
                        help="seconds per Torch-Pruning child in the main table (default: as the rows above)")
    parser.add_argument("--tp-layers-7b", type=int, default=8,
                        help="layers of the 7B shape Torch-Pruning gets (real fp32 weights: ~0.8 GB per layer)")
    parser.add_argument("--prune-layers", type=int, default=22, help="layers of the 1.1B shape fully pruned")
    parser.add_argument("--scaling-layers", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--skip-extra", action="store_true", help="main table only (no scaling/70B/prune)")
    parser.add_argument("--sections", nargs="+", choices=("main", "scaling", "70b", "prune"),
                        default=["main", "scaling", "70b", "prune"], help="which parts to run (default: all)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.isolation is None:
        args.isolation = "fork" if args.quick else "spawn"
    if args.small_timeout is None:
        args.small_timeout = 30.0 if args.quick else 90.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        result = run_job(json.loads(args.worker))
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results = run_benchmark(args, log)
    text = render(results)
    print(text, flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
