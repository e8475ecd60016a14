"""Time and peak memory of calibration reconstruction on a TinyLlama-1.1B-shaped model (random weights).

Usage::

    python benchmarks/reconstruct_cost.py [--layers N] [--samples S] [--seq-len L] [--sequential] [--json PATH]

The model has TinyLlama-1.1B's widths (hidden 2048, MLP 5632, 32 query / 4 KV heads, vocab 32000) with
``--layers`` decoder layers (22 for the real shape; fewer keep the run small on a shared machine; the
report gives time and memory per decoder layer and per billion parameters). It prunes 20% of the MLP
neurons and heads (``Pruner(criterion="l2", target="params", reconstruct="lsq")``) and reports the wall
time of the reconstructed cut against the plain cut of the same plan, and the peak resident memory of the
process above the model's own size (``ru_maxrss``, measured in a fresh child process per mode).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))


def child(mode: str, layers: int, samples: int, seq_len: int, sequential: bool) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import depgraph

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                         num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    calib = torch.randint(0, 32000, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    graph = depgraph.trace(model)
    plan = depgraph.Pruner(graph, criterion="l2", ratio=0.2, target="params", progress=False).plan()
    before_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    if mode == "plain":
        graph.prune(plan)
    else:
        depgraph.reconstruct(graph, plan, calib, "lsq", sequential=sequential)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "sequential": sequential, "layers": layers, "params": params, "tokens": samples * seq_len,
            "wall_s": wall, "peak_rss_mib": peak, "rss_before_cut_mib": before_rss, "model_rss_mib": base_rss}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--sequential", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.samples, args.seq_len, args.sequential)))
        return
    rows = []
    for mode in ("plain", "lsq"):
        cmd = [sys.executable, str(HERE), "--child", mode, "--layers", str(args.layers), "--samples",
               str(args.samples), "--seq-len", str(args.seq_len)] + (["--sequential"] if args.sequential else [])
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    plain, lsq = rows
    billions = lsq["params"] / 1e9
    extra_s = lsq["wall_s"] - plain["wall_s"]
    extra_mib = lsq["peak_rss_mib"] - plain["peak_rss_mib"]
    summary = {"rows": rows, "reconstruction_s": extra_s, "reconstruction_s_per_layer": extra_s / args.layers,
               "reconstruction_s_per_billion_params": extra_s / billions,
               "extra_peak_mib": extra_mib, "extra_peak_mib_per_billion_params": extra_mib / billions}
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
