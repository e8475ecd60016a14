"""Streaming pruning benchmark: prune a synthetic bf16 Llama checkpoint that is never held in memory.

1. A Llama checkpoint of the given shape (default: Llama-2-7B, 32 layers, hidden 4096, MLP 11008, 32 heads,
   vocab 32000) with random bf16 weights is written to disk shard by shard, one tensor at a time
   (:func:`depgraph.stream.write_safetensors`): the writer never holds more than one tensor.
2. Each measurement runs in a fresh child interpreter, which reports its own peak RSS
   (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and wall time: a bare ``import depgraph`` (the
   interpreter's constant), then :func:`depgraph.prune_checkpoint` at ``--ratio`` (default 20%) with
   ``l2`` and with ``wanda`` (``--calib-samples`` x ``--seq-len`` random token ids: a memory benchmark).
3. It prints one table row per run: checkpoint bytes, wall time, peak RSS and peak RSS / checkpoint bytes
   (the goal: below 25%). ``--layers 4,8`` runs several depths to show the peak does not grow with depth.

Run: ``OMP_NUM_THREADS=1 python benchmarks/stream.py --dir /work/tmp/stream-bench`` (``--quick``: tiny
widths, seconds). The checkpoints are deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32000, max_position_embeddings=4096)
QUICK = dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=4, vocab_size=512,
             max_position_embeddings=256)
POOL = 1 << 26  # random bf16 values every tensor is cut from (at its own offset): fast to "generate"


def write_checkpoint(directory: Path, layers: int, shape: dict, shard_size: str, seed: int = 0) -> int:
    """A random-weight bf16 Llama checkpoint in ``directory``, tensor by tensor; returns its bytes."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers import LlamaConfig, LlamaForCausalLM

    from depgraph.stream import write_safetensors

    config = LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=False, dtype="bfloat16", **shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    planned = {k: torch.empty(v.shape, dtype=torch.bfloat16, device="meta") for k, v in model.state_dict().items()}
    split = split_torch_state_dict_into_shards(planned, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=shard_size)
    gen = torch.Generator().manual_seed(seed)
    pool = (torch.randn(POOL, generator=gen) * 0.02).to(torch.bfloat16)

    def make(name: str) -> torch.Tensor:
        shape_ = tuple(planned[name].shape)
        if len(shape_) == 1:  # norm weights
            return torch.ones(shape_, dtype=torch.bfloat16)
        need, at, pieces = math.prod(shape_), int(torch.randint(0, POOL, (1,), generator=gen)), []
        while need:  # the pool from a random offset, wrapping around
            take = min(need, POOL - at)
            pieces.append(pool[at:at + take])
            need, at = need - take, 0
        return torch.cat(pieces).reshape(shape_)

    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    for filename, keys in split.filename_to_tensors.items():
        write_safetensors(directory / filename, [(k, tuple(planned[k].shape), torch.bfloat16) for k in keys], make)
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def _vm_hwm() -> int | None:
    """Peak resident bytes of this process's own memory map (``VmHWM``), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def child(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) interpreter; prints a JSON line."""
    start = time.perf_counter()
    import torch

    torch.set_num_threads(1)
    out: dict = {}
    if args.child == "write":
        shape = QUICK if args.quick else LLAMA_7B
        out = {"bytes": write_checkpoint(Path(args.src), int(args.layers), shape, args.shard_size)}
    else:
        import depgraph

        if args.child != "import":
            config = json.loads((Path(args.src) / "config.json").read_text())
            calib = None
            if args.child in ("wanda", "activation"):
                gen = torch.Generator().manual_seed(0)
                calib = torch.randint(0, config["vocab_size"], (args.calib_samples, args.seq_len), generator=gen)
            report = depgraph.prune_checkpoint(args.src, args.out, ratio=args.ratio, criterion=args.child,
                                               calib=calib, progress=False)
            out = {"params_before": report.params_before, "params_after": report.params_after}
    # ru_maxrss of an exec'd child also holds its parent's RSS at fork time (Linux keeps the old memory
    # map's peak across exec); the parent imports no torch, and VmHWM (this memory map only) is reported too
    out.update(wall_s=time.perf_counter() - start, peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               vm_hwm=_vm_hwm())
    print(json.dumps(out))


def _measure(what: str, args: argparse.Namespace, src: Path, out: Path | None = None, layers: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--src", str(src), "--out", str(out or src), "--ratio",
           str(args.ratio), "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len),
           "--layers", str(layers), "--shard-size", args.shard_size] + (["--quick"] if args.quick else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/depgraph-stream-bench"), help="scratch directory")
    parser.add_argument("--layers", default="32", help="decoder layers, comma-separated for several runs")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--criteria", default="l2,wanda")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--shard-size", default="2GB", help="shard size of the synthetic source checkpoint")
    parser.add_argument("--quick", action="store_true", help="tiny widths (smoke test)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # import | write | a criterion
    parser.add_argument("--src", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()} "
          f"{os.cpu_count()} cores, torch threads 1, load average {os.getloadavg()[0]:.1f}")
    args.dir.mkdir(parents=True, exist_ok=True)
    base = _measure("import", args, args.dir)
    print(f"# fresh interpreter after `import depgraph`: peak RSS {base['peak_rss'] / 2**20:,.0f} MiB")
    print("| layers | checkpoint GiB | write s | criterion | params before -> after | wall s | peak RSS MiB "
          "(VmHWM) | peak RSS / checkpoint | goal < 25% |")
    print("|---:|---:|---:|---|---|---:|---:|---:|---|")
    for layers in [int(x) for x in args.layers.split(",")]:
        src = args.dir / f"llama-{layers}l"
        shutil.rmtree(src, ignore_errors=True)
        written = _measure("write", args, src, layers=layers)
        nbytes = written["bytes"]
        for criterion in args.criteria.split(","):
            out = args.dir / f"llama-{layers}l-{criterion}"
            r = _measure(criterion, args, src, out)
            peak = max(r["peak_rss"], r["vm_hwm"] or 0)
            share = peak / nbytes
            print(f"| {layers} | {nbytes / 2**30:.2f} | {written['wall_s']:.0f} | {criterion} | "
                  f"{r['params_before'] / 1e6:,.1f}M -> {r['params_after'] / 1e6:,.1f}M | {r['wall_s']:.0f} | "
                  f"{r['peak_rss'] / 2**20:,.0f} ({(r['vm_hwm'] or 0) / 2**20:,.0f}) | {share:.1%} | "
                  f"{'met' if share < 0.25 else 'missed'} |", flush=True)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)

if __name__ == "__main__":
    main()
