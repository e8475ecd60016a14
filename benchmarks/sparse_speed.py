"""Dense vs CSR storage and CPU matmul time for a magnitude-pruned weight (not a test).

Usage: python benchmarks/sparse_speed.py [--quick] [--repeats 20] [--threads N]

For a ``[out, in]`` weight at several unstructured sparsities, prints a markdown table of dense bytes vs
CSR bytes (crow_indices + col_indices + values) and the median time of ``x @ W.T`` (dense) vs the same
product through ``torch.sparse`` CSR (``W_csr @ x.T``, transposed back), with ``x`` of 64 rows.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch


def prune_magnitude(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero exactly ``round(sparsity * numel)`` smallest-magnitude entries."""
    k = round(sparsity * weight.numel())
    out = weight.clone()
    if k:
        order = torch.argsort(weight.abs().flatten(), stable=True)[:k]
        out.view(-1)[order] = 0.0
    return out


def csr_bytes(csr: torch.Tensor) -> int:
    parts = (csr.crow_indices(), csr.col_indices(), csr.values())
    return sum(t.numel() * t.element_size() for t in parts)


def median_ms(fns: list[Callable[[], torch.Tensor]], repeats: int, warmup: int = 3) -> list[float]:
    """Median wall time of each fn in ms; the fns are interleaved so machine noise hits them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) * 1e3 for bucket in times]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512x2048 weight, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per cell (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    out_features, in_features = (512, 2048) if args.quick else (1024, 4096)
    repeats = args.repeats or (5 if args.quick else 20)
    rows = 64

    gen = torch.Generator().manual_seed(0)
    dense_w = torch.randn(out_features, in_features, generator=gen)
    x = torch.randn(rows, in_features, generator=gen)
    warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")

    print(
        f"weight {out_features}x{in_features} fp32, x {rows}x{in_features}, "
        f"{torch.get_num_threads()} threads, median of {repeats}\n"
    )
    print("| sparsity | dense KiB | CSR KiB | CSR/dense | dense ms | CSR ms | CSR speedup |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for sparsity in args.sparsities:
        w = prune_magnitude(dense_w, sparsity)
        w_csr = w.to_sparse_csr()
        with torch.no_grad():
            ref = x @ w.t()
            got = torch.sparse.mm(w_csr, x.t()).t()
            if not torch.allclose(ref, got, rtol=1e-4, atol=1e-3):
                raise SystemExit(f"CSR result differs from dense at sparsity {sparsity}")
            dense_ms, csr_ms = median_ms(
                [lambda w=w: x @ w.t(), lambda w_csr=w_csr: torch.sparse.mm(w_csr, x.t()).t()], repeats
            )
        dense_bytes = w.numel() * w.element_size()
        sparse_bytes = csr_bytes(w_csr)
        print(
            f"| {sparsity:.0%} | {dense_bytes / 1024:.0f} | {sparse_bytes / 1024:.0f} | "
            f"{sparse_bytes / dense_bytes:.2f} | {dense_ms:.3f} | {csr_ms:.3f} | {dense_ms / csr_ms:.2f}x |"
        )


if __name__ == "__main__":
    main()
