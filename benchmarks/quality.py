"""Pruning quality: what each criterion, aggregation and structure costs in perplexity (and embedding agreement).

Usage::

    python benchmarks/quality.py [--quick] [--json PATH] [--md PATH] [--threads N] [overrides, see --help]

Models:

* the byte-level tiny Llama of :func:`common.train_tiny_llama` (trained on WikiText-2 ``valid.txt``,
  cached). Quality is perplexity on the first ``--eval-tokens`` bytes of WikiText-2 ``test.txt`` with
  non-overlapping windows of ``--context`` (128) tokens: the same bytes for every row, so rows are
  compared on paired data. Calibration (scoring, Wanda, depth, Taylor) is ``--calib-samples`` seeded
  windows of 128 bytes from ``valid.txt``; no test byte is ever used for calibration or recovery.
* the same Llama shape with a 2,048-token BPE tokenizer trained on ``valid.txt``
  (``train_tiny_llama(tokenizer="bpe")``), measured the same way per BPE token (``--lms byte,bpe``, the
  full default; quick mode: byte only). Its JSON section is ``llama_bpe``; recovery runs on the first LM only.
* the real pretrained all-MiniLM-L6-v2 (:func:`depgraph.evaluate.load_minilm`). Only A (MLP neurons)
  and B (attention heads) are pruned: the hidden width is the embedding the model outputs. Its token
  embedding table (11.9M of 22.7M parameters) cannot be touched by A/B cuts, so 50% of *all* parameters
  is out of reach: MiniLM budgets are fractions of the encoder-layer parameters (the % of the whole
  model is reported too). Quality: mean cosine between the original and pruned sentence embeddings of
  WikiText-2 test sentences, and Spearman agreement of their pairwise similarities.

Rows (tiny Llama; every one is a fresh copy of the same trained model):

* depgraph width pruning: criterion x aggregation x structure (``block`` = A+B, ``channel`` = C) x
  budget, ``target="params"``, local scope, one shot. Each criterion's per-member scores are computed
  once on the unpruned model and folded with each aggregation, then handed to ``depgraph.Pruner`` as
  fixed scores: the same plan ``Pruner(criterion=name)`` makes in one step (checked once per run:
  ``meta.fixed_score_check``). ``random`` ranks identically under every aggregation, so it has one row.
* reconstruction (``--reconstruct none,lsq,bias,lsq-seq``): the same plans cut with
  ``depgraph.reconstruct`` (the layers reading the cut units refitted on the calibration windows), beside
  the plain cut; ``--rows block@0.2,mlp@0.2`` runs only those structure@budget cells, ``--damp`` sets the
  ridge term. The report adds a table with each variant side by side and Torch-Pruning's row of the cell.
* per-layer budgets (``--allocations uniform,increasing,outlier,sensitivity``): the same cells planned
  with ``Pruner(allocation=...)`` (``--allocation-spread`` for increasing/outlier), one row each. Structure
  ``heads`` is A+B with the heads' share fixed (the budget rounded to whole KV heads per layer, MLP the
  rest) and ``heads:F`` cuts the fraction F of all KV-head units: ``block`` lets the planner split the
  budget, which may cut no head at all.
* depgraph depth pruning: ``depgraph.depth.block_importance`` (1 - cos(in, out)) and removal of the
  nearest whole number of blocks to each budget.
* Torch-Pruning (``MagnitudeImportance(p=2)``, ``TaylorImportance()``), each run in a child process with
  a timeout, pruning ratio bisected so the parameter count is as close as its granularity allows to
  the depgraph row's. Its LLM recipe (heads via ``num_heads``/``prune_num_heads``) is attempted first;
  when it fails or hangs the row says so, and the MLP-only / hidden-only configurations are used.
* unstructured sparsity (``depgraph.sparsify``): magnitude and Wanda at 50% and 2:4; parameters are not
  removed, the rows report non-zeros and run dense kernels.
* recovery of the best depgraph and the best Torch-Pruning model at the first budget with
  ``depgraph.heal``: LoRA (r=8, alpha=16 on q,k,v,o,gate,up,down, merged after), knowledge distillation
  (KL to the unpruned teacher's logits, temperature 1, all parameters) and LoRA trained by KD,
  ``--recovery-steps`` steps of batch 8 x 128 bytes of ``valid.txt`` (constant lr after 10% warmup);
  the unpruned model gets the same LoRA run as a control.

Every row reports parameters (% removed), MACs of a [1, 128] forward (``common.macs``), CPU latency of
that forward relative to the unpruned model (interleaved rounds of ``common.latency_ms`` so load drift
cancels; measured once per distinct architecture), quality and the time pruning took (scoring + cut;
a criterion's scoring time is shared by its aggregation rows and shown on each).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import faulthandler
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1]))

from common import SEQ_LEN, TOKENIZERS, encode, latency_ms, macs, param_count, train_tiny_llama  # noqa: E402

import depgraph  # noqa: E402
from depgraph.checkpoint import plain_hf_reason  # noqa: E402
from depgraph.data import calibration_batches, default_text_path, read_text  # noqa: E402
from depgraph.evaluate import perplexity  # noqa: E402
from depgraph.groups import GroupKind  # noqa: E402
from depgraph.importance import combine, member_scores  # noqa: E402
from depgraph.pruner import STRUCTURES  # noqa: E402

CRITERIA = ("random", "l1", "l2", "taylor_vector", "taylor_first", "taylor_second", "wanda", "activation", "obs")
# calibration reconstruction of the cut layers (depgraph.reconstruct): "none" is the plain cut; "lsq"/"bias"
# refit the layers reading the cut units on the same plan; "lsq-seq" does it decoder layer by decoder layer
# (with criterion obs it also re-chooses each layer's units from the already pruned layers' outputs)
RECONSTRUCT = ("none", "lsq", "bias", "lsq-seq")
AGGREGATIONS = ("sum", "product", "max", "last", "mean")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GRAD_BUDGET = 1 << 40  # one set of calibration passes for Taylor (the model is tiny)
TP_RESULT = "TP-RESULT "
TP_STAGE = "TP-STAGE "
# "mlp" (A only) is not one of depgraph's structures: it is Pruner(kinds=["A"]), the like-for-like
# comparison with Torch-Pruning's MLP-only configuration. "heads" is A+B with the heads' share fixed
# (see struct_ratio): "block" lets the planner split the budget, and it may cut no head at all
STRUCT_KINDS: dict[str, tuple[str, ...]] = {**STRUCTURES, "mlp": ("A",), "heads": ("A", "B")}
# per-layer budgets (Pruner(allocation=...)): "uniform" (every layer alike), "increasing" (SlimGPT's
# schedule, deeper layers lose more), "outlier" (OWL's outlier ratios) and "sensitivity" (each layer's
# measured output error)
ALLOCATIONS = ("uniform", "increasing", "outlier", "sensitivity")


# ------------------------------------------------------------------------------------------ settings


@dataclass
class Settings:
    """Everything that determines a run (all of it goes into the JSON ``meta``)."""

    quick: bool
    criteria: list[str]
    aggregations: list[str]
    ratios: list[float]
    structures: list[str]
    eval_tokens: int
    context: int
    calib_samples: int
    calib_batch: int
    latency_rounds: int
    latency_repeats: int
    tp_imps: list[str]
    tp_timeout: float
    tp_heads_timeout: float
    depth: bool
    sparse: list[tuple[str, str]]
    recovery_steps: int
    recovery_batch: int
    lora_lr: float
    kd_lr: float
    minilm_settings: list[tuple[str, str]]
    minilm_sentences: int
    seed: int = 0
    threads: int = 1
    cache_dir: str | None = None
    skip: list[str] = field(default_factory=list)
    reconstruct: list[str] = field(default_factory=lambda: ["none"])
    cells: list[tuple[str, float]] | None = None  # only these (structure, budget) cells; None: the whole grid
    damp: float = 0.01  # reconstruction's ridge term, relative to mean(diag H)
    allocations: list[str] = field(default_factory=lambda: ["uniform"])
    spread: float = 0.5  # Pruner(allocation_spread=) of the "increasing" rows
    lms: list[str] = field(default_factory=lambda: ["byte"])  # benchmark LMs by tokenizer (common.TOKENIZERS)


def make_settings(args: argparse.Namespace) -> Settings:
    """Quick or full defaults, then the command-line overrides."""
    if args.quick:
        s = Settings(
            quick=True, criteria=["random", "l2", "taylor_first", "wanda"], aggregations=["sum"], ratios=[0.2],
            structures=["block"], eval_tokens=1024, context=SEQ_LEN, calib_samples=8, calib_batch=4,
            latency_rounds=2, latency_repeats=3, tp_imps=["l2"], tp_timeout=150, tp_heads_timeout=0, depth=True,
            sparse=[("magnitude", "unstructured"), ("wanda", "2:4")], recovery_steps=20, recovery_batch=8,
            lora_lr=1e-3, kd_lr=1e-4, minilm_settings=[("random", "sum"), ("wanda", "sum")], minilm_sentences=64,
        )
    else:
        minilm = [(c, "sum") for c in ("random", "l1", "l2", "wanda", "activation")]
        minilm += [(c, a) for c in ("l2", "activation") for a in ("product", "max", "last", "mean")]
        s = Settings(
            quick=False, criteria=list(CRITERIA), aggregations=list(AGGREGATIONS), ratios=[0.2, 0.5],
            structures=["block", "mlp", "channel"], eval_tokens=16384, context=SEQ_LEN, calib_samples=32,
            calib_batch=8,
            latency_rounds=7, latency_repeats=5, tp_imps=["l2", "taylor"], tp_timeout=900, tp_heads_timeout=60,
            depth=True, sparse=[(m, p) for m in ("magnitude", "wanda") for p in ("unstructured", "2:4")],
            recovery_steps=300, recovery_batch=8, lora_lr=1e-3, kd_lr=1e-4, minilm_settings=minilm,
            minilm_sentences=256, lms=list(TOKENIZERS),
        )
    for name in ("criteria", "aggregations", "structures", "tp_imps"):
        value = getattr(args, name)
        if value is not None:
            setattr(s, name, [v for v in value.split(",") if v])
    if args.criteria is not None or args.aggregations is not None:  # MiniLM too: the given criteria and
        crits = s.criteria if args.criteria is not None else list(dict.fromkeys(c for c, _ in s.minilm_settings))
        s.minilm_settings = [(c, a) for c in crits for a in (  # aggregations (default: its own, or sum)
            [a for cc, a in s.minilm_settings if cc == c] or ["sum"]) if args.aggregations is None or a in s.aggregations]
    if args.ratios is not None:
        s.ratios = [float(r) for r in args.ratios.split(",")]
    for name in ("eval_tokens", "calib_samples", "recovery_steps", "minilm_sentences"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    if args.tp_heads_timeout is not None:
        s.tp_heads_timeout = args.tp_heads_timeout
    s.threads, s.cache_dir, s.seed = args.threads, args.cache_dir, args.seed
    s.skip = [v for v in (args.skip or "").split(",") if v]
    s.reconstruct = [v for v in (args.reconstruct or ",".join(s.reconstruct)).split(",") if v]
    s.damp = args.damp
    if args.allocations is not None:
        s.allocations = [v for v in args.allocations.split(",") if v]
    if args.lms is not None:
        s.lms = [v for v in args.lms.split(",") if v]
    s.spread = args.allocation_spread
    if args.rows:
        s.cells = [(c.split("@")[0], float(c.split("@")[1])) for c in args.rows.split(",") if c]
        s.structures = list(dict.fromkeys(st for st, _ in s.cells))
        s.ratios = list(dict.fromkeys(r for _, r in s.cells))
    bad = [c for c in s.criteria if c not in CRITERIA] + [a for a in s.aggregations if a not in AGGREGATIONS]
    bad += [r for r in s.reconstruct if r not in RECONSTRUCT] + [a for a in s.allocations if a not in ALLOCATIONS]
    bad += [t for t in s.lms if t not in TOKENIZERS] + [st for st in s.structures if st.split(":")[0] not in STRUCT_KINDS
                                                         or (":" in st and not st.startswith("heads:"))]
    if bad:
        raise SystemExit(f"unknown criteria/aggregations/reconstructions/allocations/LMs/structures: {bad}")
    return s


_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress line on stderr with the time since the script started."""
    print(f"[quality {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- measuring


def arch_key(model: nn.Module) -> tuple:
    """Every parameter's name and shape: rows with equal keys cost the same to run."""
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters())


def nonzeros(model: nn.Module) -> int:
    """Number of non-zero parameter elements."""
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


def relative_latency(base: Callable[[], float], other: Callable[[], float], rounds: int) -> dict[str, float]:
    """Median latency of ``other`` over that of ``base``, alternating rounds so machine load drifts out."""
    b, o = [], []
    for _ in range(rounds):
        b.append(base())
        o.append(other())
    mb, mo = statistics.median(b), statistics.median(o)
    return {"latency_ms": mo, "base_latency_ms": mb, "latency_rel": mo / mb}


class CostCache:
    """MACs and relative latency per distinct architecture (pruned shapes), each measured once."""

    def __init__(self, base: nn.Module, macs_fn: Callable[[nn.Module], int],
                 lat_fn: Callable[[nn.Module], float], rounds: int) -> None:
        self.base, self.macs_fn, self.lat_fn, self.rounds = base, macs_fn, lat_fn, rounds
        self.base_macs = macs_fn(base)
        self.cache: dict[tuple, dict[str, float]] = {}

    def __call__(self, model: nn.Module) -> dict[str, float]:
        key = arch_key(model)
        if key not in self.cache:
            m = self.macs_fn(model)
            lat = relative_latency(lambda: self.lat_fn(self.base), lambda: self.lat_fn(model), self.rounds)
            self.cache[key] = {"macs": m, "macs_pct": 100.0 * m / self.base_macs, **lat}
        return dict(self.cache[key])


def _sdpa_flops(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    b, h, sq, d = q
    return 2 * b * h * sq * k[-2] * (d + v[-1])


def encoder_macs(model: nn.Module, seq_len: int = SEQ_LEN) -> int:
    """MACs of one ``[1, seq_len]`` forward of an encoder (BERT-style: ids + attention mask)."""
    from torch.utils.flop_counter import FlopCounterMode

    custom = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        custom[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_flops
    ids = torch.arange(seq_len)[None] % 1000 + 1000
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=custom) as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return counter.get_total_flops() // 2


def encoder_latency_ms(model: nn.Module, repeats: int, seq_len: int = SEQ_LEN, warmup: int = 1) -> float:
    """Median wall time (ms) of one ``[1, seq_len]`` encoder forward."""
    ids = torch.arange(seq_len)[None] % 1000 + 1000
    mask = torch.ones_like(ids)
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            t = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            if i >= warmup:
                times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


# ------------------------------------------------------------------------------------ tiny Llama


@dataclass
class LlamaBench:
    """The trained model, its data and the shared measures."""

    model: nn.Module
    tokenizer: Any
    info: dict[str, Any]
    test_ids: torch.Tensor
    train_ids: torch.Tensor
    calib: list[torch.Tensor]
    settings: Settings
    costs: CostCache
    params: int
    base_ppl: float
    lm: str = "byte"  # tokenizer of the benchmark LM (common.TOKENIZERS)

    def ppl(self, model: nn.Module) -> float:
        s = self.settings
        return perplexity(model, self.test_ids, context_length=s.context, max_tokens=s.eval_tokens,
                          progress=False).ppl

    def row(self, model: nn.Module, **fields: Any) -> dict[str, Any]:
        """Measure ``model`` and return a table row (``fields`` first)."""
        t = time.perf_counter()
        n = param_count(model)
        reason = plain_hf_reason(model)
        out: dict[str, Any] = {
            **fields,
            "params": n,
            "removed_pct": 100.0 * (1 - n / self.params),
            "plain_hf": reason is None,  # saved files load with plain from_pretrained
            "hf_reason": reason,
            "kind_removed_pct": kind_removed_pct(self.model, model),
            **self.costs(model),
            "ppl": self.ppl(model),
            "status": fields.get("status", "ok"),
        }
        out["eval_s"] = time.perf_counter() - t
        return out


def _widths(model: nn.Module) -> dict[str, int]:
    """Units of each kind in the benchmark Llama, read from the weights (any pruner, uniform or not):
    A = MLP neurons, B = query heads (q_proj rows / head_dim), C = hidden channels."""
    head_dim = model.config.head_dim
    layers = model.model.layers
    return {"A": sum(layer.mlp.up_proj.weight.shape[0] for layer in layers),
            "B": sum(layer.self_attn.q_proj.weight.shape[0] // head_dim for layer in layers),
            "C": model.model.embed_tokens.weight.shape[1]}


def kind_removed_pct(base: nn.Module, model: nn.Module) -> dict[str, float]:
    """Per-kind share of units removed, in percent (whole layers removed count for A and B)."""
    before, after = _widths(base), _widths(model)
    return {k: 100.0 * (1 - after[k] / before[k]) for k in before}


def setup_llama(s: Settings, lm: str = "byte") -> LlamaBench:
    model, tok, info = train_tiny_llama(s.cache_dir, quick=s.quick, verbose=False, tokenizer=lm)
    torch.set_num_threads(s.threads)  # train_tiny_llama sets 2
    model.eval()
    test_ids = torch.tensor(encode(tok, read_text(default_text_path("test"))), dtype=torch.long)
    train_ids = torch.tensor(encode(tok, read_text(default_text_path("valid"))), dtype=torch.long)
    calib = calibration_batches(train_ids, n_samples=s.calib_samples, seq_len=s.context, seed=s.seed,
                                batch_size=s.calib_batch)
    costs = CostCache(model, lambda m: macs(m, s.context),
                      lambda m: latency_ms(m, s.context, repeats=s.latency_repeats, warmup=1), s.latency_rounds)
    params = param_count(model)
    base_ppl = perplexity(model, test_ids, context_length=s.context, max_tokens=s.eval_tokens, progress=False).ppl
    return LlamaBench(model, tok, info, test_ids, train_ids, calib, s, costs, params, base_ppl, lm)


def struct_ratio(graph: depgraph.DependencyGraph, structure: str, ratio: float) -> float | dict[str, float]:
    """``Pruner(ratio=)`` of a structure: the fraction itself, or for ``"heads"`` a per-kind budget where the
    heads (B) lose ``ratio`` of their units rounded to whole KV-head units per layer (20% of 4 KV heads: 1
    per layer, 25%) and MLP neurons (A) the rest of the parameter budget. Every allocation then cuts the
    same number of heads and the same total; the allocation decides in which layers. ``"heads:F"``: the
    heads lose the fraction ``F`` of all KV-head units, rounded to whole units over the model (e.g.
    ``heads:0.125`` = 2 of 16), which a uniform plan can only round to whole units per layer."""
    if not structure.startswith("heads"):
        return ratio
    heads = [g for g in graph.groups() if g.kind is GroupKind.B]
    total = depgraph.count_parameters(graph.model)
    one_each = total - depgraph.simulate_params(graph, {g: [0] for g in heads})  # one KV unit in every layer
    if ":" in structure:
        units = round(float(structure.split(":")[1]) * heads[0].size * len(heads))
        b_share = units * one_each / len(heads) / total
    else:
        per_layer = max(1, round(ratio * heads[0].size))
        b_share = (total - depgraph.simulate_params(graph, {g: list(range(per_layer)) for g in heads})) / total
    if b_share >= ratio:
        raise ValueError(f"{structure}@{ratio}: the heads alone are {b_share:.1%} of the parameters; use a "
                         "larger budget")
    return {"A": ratio - b_share, "B": b_share}


def fixed_plan_pruner(graph: depgraph.DependencyGraph, per_group: dict[int, torch.Tensor], structure: str,
                      ratio: float, recon: str = "none", calib: Any = None, criterion: str | None = None,
                      damp: float = 0.01, allocation: str = "uniform", spread: float = 0.5,
                      ) -> tuple[depgraph.DependencyGraph, depgraph.PruneReport, float]:
    """Copy ``graph`` (and its model), prune it with fixed per-group scores (by group index); time the cut.

    ``recon`` (one of ``RECONSTRUCT``) refits the cut layers on ``calib``; ``"lsq-seq"`` with
    ``criterion="obs"`` runs ``Pruner(criterion="obs", sequential=True)`` (units re-chosen layer by layer).
    ``allocation``/``spread``: ``Pruner(allocation=, allocation_spread=)`` (per-layer budgets).
    """
    g2 = copy.deepcopy(graph)
    kinds = {GroupKind(k) for k in STRUCT_KINDS[structure.split(":")[0]]}
    groups = g2.groups()
    fixed = {groups[i]: s for i, s in per_group.items() if groups[i].kind in kinds}
    method = None if recon == "none" else recon.split("-")[0]
    sequential = recon.endswith("-seq")
    crit: Any = "obs" if sequential and criterion == "obs" else fixed
    t = time.perf_counter()
    needs_calib = method is not None or allocation in ("sensitivity", "outlier")
    report = depgraph.Pruner(g2, criterion=crit, ratio=struct_ratio(g2, structure, ratio), target="params",
                             kinds=sorted(k.value for k in kinds),
                             progress=False, reconstruct=method, sequential=sequential, damp=damp,
                             calib=calib if needs_calib else None, allocation=allocation,
                             allocation_spread=spread).prune()
    return g2, report, time.perf_counter() - t


def check_fixed_scores(bench: LlamaBench, graph: depgraph.DependencyGraph, structure: str, ratio: float) -> str:
    """The fixed-score path must cut exactly what ``Pruner(criterion="l2")`` cuts; returns a verdict."""
    scores = member_scores(graph, "l2", progress=False)
    per_group = {i: combine(scores[g], "sum") for i, g in enumerate(graph.groups())}
    a, _, _ = fixed_plan_pruner(graph, per_group, structure, ratio)
    b = copy.deepcopy(bench.model)
    depgraph.Pruner(b, criterion="l2", aggregate="sum", ratio=struct_ratio(graph, structure, ratio), target="params",
                    kinds=list(STRUCT_KINDS[structure.split(":")[0]]), progress=False).prune()
    sa, sb = a.model.state_dict(), b.state_dict()
    same = sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)
    return "identical" if same else "DIFFERENT"


def run_depgraph_grid(bench: LlamaBench, rows: list[dict], best: dict[Any, tuple[float, nn.Module, dict]]) -> str:
    """All criterion x aggregation x structure x budget rows; keeps the best model per budget (key: ratio)
    and per structure and budget (key: ``(structure, ratio)``) in ``best``."""
    s = bench.settings
    graph = depgraph.trace(bench.model)
    verdict = check_fixed_scores(bench, graph, s.structures[0], s.ratios[0])
    log(f"fixed-score path vs Pruner(criterion='l2'): {verdict}")
    for crit in s.criteria:
        t = time.perf_counter()
        try:
            scores = member_scores(graph, crit, calib=bench.calib, seed=s.seed, progress=False,
                                   grad_budget=GRAD_BUDGET)
        except Exception as exc:  # a failing criterion is a finding: record it, go on
            rows.append({"section": "depgraph", "method": "depgraph", "criterion": crit, "status": "error",
                         "error": f"{type(exc).__name__}: {exc}"})
            log(f"{crit}: scoring FAILED {exc!r}")
            continue
        score_s = time.perf_counter() - t
        aggs = ["sum"] if crit == "random" else s.aggregations
        for agg in aggs:
            per_group = {i: combine(scores[g], agg) for i, g in enumerate(graph.groups()) if scores[g]}
            for structure, ratio, recon, alloc in ((st, r, rc, al) for st in s.structures for r in s.ratios
                                                   for rc in s.reconstruct for al in s.allocations):
                if s.cells is not None and (structure, ratio) not in s.cells:
                    continue
                fields = {"section": "depgraph", "method": "depgraph", "structure": structure,
                          "criterion": crit, "aggregation": "any" if crit == "random" else agg,
                          "budget": ratio, "reconstruct": recon, "allocation": alloc}
                try:
                    g2, report, cut_s = fixed_plan_pruner(graph, per_group, structure, ratio, recon, bench.calib,
                                                          crit, s.damp, alloc, s.spread)
                    row = bench.row(g2.model, **fields, score_s=score_s, prune_s=score_s + cut_s,
                                    target=str(report.target))
                except Exception as exc:
                    row = {**fields, "status": "error", "error": f"{type(exc).__name__}: {exc}"}
                    traceback.print_exc()
                rows.append(row)
                log(f"depgraph {bench.lm} {structure} {crit}/{agg} @{ratio:.0%} recon={recon} alloc={alloc}: ppl "
                    f"{row.get('ppl', float('nan')):.3f} params -{row.get('removed_pct', float('nan')):.1f}% "
                    f"({row.get('prune_s', 0):.1f}s prune, {row.get('eval_s', 0):.1f}s eval)")
                if row["status"] == "ok":
                    for key in (ratio, (structure, ratio)):  # overall and per structure
                        if key not in best or row["ppl"] < best[key][0]:
                            best[key] = (row["ppl"], g2.model, row)
    if param_count(graph.model) != bench.params:
        raise RuntimeError("the traced base model changed while pruning copies: the copies share parameters")
    return verdict


def run_depth(bench: LlamaBench, rows: list[dict]) -> None:
    """Remove the nearest whole number of blocks to each budget, least important (1 - cos) first."""
    from depgraph.depth import block_importance, find_blocks, remove_least_important

    s = bench.settings
    t = time.perf_counter()
    scores = block_importance(bench.model, bench.calib, progress=False)
    score_s = time.perf_counter() - t
    _, blocks = find_blocks(bench.model)
    per_block = sum(p.numel() for p in blocks[0].parameters())
    for ratio in s.ratios:
        n = min(max(round(ratio * bench.params / per_block), 1), len(blocks) - 1)
        m = copy.deepcopy(bench.model)
        t = time.perf_counter()
        rep = remove_least_important(m, scores, n)
        cut_s = time.perf_counter() - t
        row = bench.row(m, section="depth", method="depgraph depth", structure="depth", criterion="block cos",
                        aggregation="-", budget=ratio, score_s=score_s, prune_s=score_s + cut_s,
                        note=f"removed blocks {list(rep.removed)} of {len(blocks)}; "
                             f"importance {[round(float(x), 4) for x in scores]}")
        rows.append(row)
        log(f"depth @{ratio:.0%}: removed {list(rep.removed)} ppl {row['ppl']:.3f}")


def run_sparse(bench: LlamaBench, rows: list[dict]) -> None:
    """Unstructured / 2:4 masks (no parameter removed; dense kernels)."""
    total = bench.params
    for method, pattern in bench.settings.sparse:
        m = copy.deepcopy(bench.model)
        t = time.perf_counter()
        rep = depgraph.sparsify(m, method=method, sparsity=0.5 if pattern == "unstructured" else None,
                                pattern=pattern, calib=bench.calib, progress=False)
        depgraph.make_permanent(m)
        prune_s = time.perf_counter() - t
        nz = nonzeros(m)
        row = bench.row(m, section="sparse", method=f"sparsify {method}", structure=f"sparse {pattern}",
                        criterion=method, aggregation="-", budget=0.5, prune_s=prune_s, nonzeros=nz,
                        nonzero_pct=100.0 * nz / total,
                        note=f"{sum(r.masked for r in rep.layers):,} weights zeroed in {len(rep.layers)} Linear "
                             "layers (lm_head skipped); dense kernels")
        rows.append(row)
        log(f"sparse {method} {pattern}: ppl {row['ppl']:.3f} nonzeros {100 * nz / total:.1f}%")


# ------------------------------------------------------------------------------------ Torch-Pruning


def _tp_config(model: nn.Module, mode: str, ratio: float, imp_name: str) -> dict[str, Any]:
    """Torch-Pruning ``BasePruner`` arguments for ``mode``: heads (its LLM recipe, block-wise), mlp or channel."""
    import torch_pruning as tp

    imp = tp.importance.MagnitudeImportance(p=2) if imp_name == "l2" else tp.importance.TaylorImportance()
    kw: dict[str, Any] = dict(importance=imp, pruning_ratio=ratio, global_pruning=False,
                              output_transform=lambda out: out.logits)
    attn = [mod for name, mod in model.named_modules() if name.endswith("self_attn")]
    if mode == "heads":  # LLM-Pruner-style block pruning: whole heads + MLP neurons, hidden width kept
        num_heads = {}
        for a in attn:
            num_heads[a.q_proj] = model.config.num_attention_heads
            num_heads[a.k_proj] = model.config.num_key_value_heads
            num_heads[a.v_proj] = model.config.num_key_value_heads
        kw.update(ignored_layers=[model.lm_head, model.model.embed_tokens], num_heads=num_heads,
                  prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio)
    elif mode == "mlp":  # MLP neurons only (attention left whole; the embedding pins the hidden width)
        kw.update(ignored_layers=[model.lm_head, model.model.embed_tokens] + attn)
    elif mode == "channel":  # hidden channels only: the only root is the embedding
        kw.update(ignored_layers=[model.lm_head], root_module_types=[nn.Embedding])
    else:
        raise ValueError(mode)
    return kw


def _tp_prune(model: nn.Module, grads: dict[str, torch.Tensor] | None, mode: str, ratio: float,
              imp_name: str) -> nn.Module:
    import torch_pruning as tp

    m = copy.deepcopy(model)
    if grads is not None:
        for n, p in m.named_parameters():
            p.grad = grads[n].clone()
    ids = torch.arange(32)[None] % 256
    print(f"{TP_STAGE}BasePruner.__init__ (dependency graph and groups)", flush=True)
    pruner = tp.pruner.BasePruner(m, ids, **_tp_config(m, mode, ratio, imp_name))
    print(f"{TP_STAGE}BasePruner.step", flush=True)
    pruner.step()
    for p in m.parameters():
        p.grad = None
    if mode == "channel":
        m.config.hidden_size = m.lm_head.in_features
    if mode in ("mlp", "heads"):
        m.config.intermediate_size = m.model.layers[0].mlp.up_proj.out_features
    return m


def tp_worker(spec: dict[str, Any]) -> None:
    """Child process: prune with Torch-Pruning to each target parameter count, save the models."""
    torch.set_num_threads(spec["threads"])
    faulthandler.dump_traceback_later(max(spec["timeout"] * 0.8, 5), exit=True)  # show where a hang is
    model, tok, _ = train_tiny_llama(spec["cache_dir"], quick=spec["quick"], verbose=False,
                                     tokenizer=spec.get("tokenizer", "byte"))
    torch.set_num_threads(spec["threads"])
    model.eval()
    grads = None
    t0 = time.perf_counter()
    if spec["imp"] == "taylor":  # gradients of the calibration loss, the same batches depgraph scores with
        train_ids = torch.tensor(encode(tok, read_text(default_text_path("valid"))), dtype=torch.long)
        calib = calibration_batches(train_ids, n_samples=spec["calib_samples"], seq_len=spec["context"],
                                    seed=spec["seed"], batch_size=spec["calib_batch"])
        model.zero_grad(set_to_none=True)
        for batch in calib:
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
    grad_s = time.perf_counter() - t0
    for i, target in enumerate(spec["targets"]):
        t = time.perf_counter()
        lo, hi, best = 0.0, 0.95, None
        for _ in range(spec["iters"]):  # parameter count is non-increasing in the ratio
            mid = (lo + hi) / 2
            m = _tp_prune(model, grads, spec["mode"], mid, spec["imp"])
            n = param_count(m)
            if best is None or abs(n - target) < abs(best[1] - target):
                best = (mid, n, m)
            if n > target:
                lo = mid
            else:
                hi = mid
        ratio, n, m = best
        path = Path(spec["out"]) / f"tp-{i}.pt"
        torch.save(m, path)
        out = {"target": target, "params": n, "ratio": ratio, "path": str(path),
               "prune_s": grad_s + time.perf_counter() - t}
        print(TP_RESULT + json.dumps(out), flush=True)


def _main_stack(err: str, frames: int = 3) -> str:
    """The innermost ``frames`` frames of the worker's main thread from a faulthandler dump or a traceback."""
    blocks: list[list[str]] = [[]]
    for line in err.splitlines():
        if line.startswith(("Thread 0x", "Current thread", "Traceback")):
            blocks.append([])
        elif line.strip().startswith("File "):
            blocks[-1].append(line.strip())
    main = [b for b in blocks if any("quality.py" in f for f in b)]
    if not main:
        return ""
    stack = main[-1]
    if not any(ln.startswith(("Thread 0x", "Current thread")) for ln in err.splitlines()):
        stack = stack[::-1]  # a Python traceback lists the innermost frame last
    out = []
    for f in stack[:frames]:
        path, _, rest = f.partition('", line ')
        path = path.split("site-packages/")[-1].removeprefix('File "')
        out.append(f"{path}:{rest}")
    return " <- ".join(out)


def run_tp(bench: LlamaBench, rows: list[dict], targets: dict[float, int],
           best: dict[float, tuple[float, nn.Module, dict]], tmp: Path) -> None:
    """Torch-Pruning rows: the LLM (heads) recipe first, then MLP-only and hidden-only configurations."""
    s = bench.settings
    modes = (["heads"] if s.tp_heads_timeout > 0 else []) + ["mlp"] + (["channel"] if "channel" in s.structures
                                                                      else [])
    for imp in s.tp_imps:
        for mode in modes:
            timeout = s.tp_heads_timeout if mode == "heads" else s.tp_timeout
            spec = {"imp": imp, "mode": mode, "targets": [targets[r] for r in s.ratios], "quick": s.quick,
                    "tokenizer": bench.lm,
                    "cache_dir": s.cache_dir, "threads": s.threads, "timeout": timeout, "iters": 12,
                    "out": str(tmp), "calib_samples": s.calib_samples, "calib_batch": s.calib_batch,
                    "context": s.context, "seed": s.seed}
            label = {"l2": "Magnitude(L2)", "taylor": "Taylor"}[imp]
            structure = {"heads": "block (heads+MLP)", "mlp": "MLP only", "channel": "channel"}[mode]
            t = time.perf_counter()
            env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
            try:
                done = subprocess.run([sys.executable, str(HERE), "--tp-worker", json.dumps(spec)], capture_output=True,
                                      text=True, timeout=timeout, env=env)
                out, err, rc = done.stdout, done.stderr, done.returncode
            except subprocess.TimeoutExpired as exc:
                out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
                err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
                rc = "timeout"
            wall = time.perf_counter() - t
            results = [json.loads(line[len(TP_RESULT):]) for line in out.splitlines() if line.startswith(TP_RESULT)]
            for ratio, res in zip(s.ratios, results):
                m = torch.load(res["path"], weights_only=False)
                m.eval()
                row = bench.row(m, section="tp", method=f"Torch-Pruning {label}", structure=structure,
                                criterion=f"tp {imp}", aggregation="tp mean", budget=ratio, prune_s=res["prune_s"],
                                note=f"pruning_ratio {res['ratio']:.4f} (bisected to the depgraph row's "
                                     f"parameter count {res['target']:,})")
                rows.append(row)
                log(f"TP {imp} {mode} @{ratio:.0%}: ppl {row['ppl']:.3f} params -{row['removed_pct']:.1f}%")
                if ratio == s.ratios[0] and (ratio not in best or row["ppl"] < best[ratio][0]):
                    best[ratio] = (row["ppl"], m, row)
                Path(res["path"]).unlink(missing_ok=True)
            if len(results) < len(s.ratios):
                hung = rc == "timeout" or "Timeout (" in err
                msg = (f"hang: no result within {wall:.0f} s" if hung else f"exit {rc} after {wall:.0f} s")
                stages = [ln[len(TP_STAGE):] for ln in out.splitlines() if ln.startswith(TP_STAGE)]
                if stages:
                    msg += f" in {stages[-1]}"
                where = _main_stack(err)
                if where:
                    msg += f"; stuck in {where}" if hung else f"; in {where}"
                last = [ln.strip() for ln in err.strip().splitlines() if ln.strip()][-1:]
                if not hung and last:
                    msg += f": {last[0][:300]}"
                for ratio in s.ratios[len(results):]:
                    rows.append({"section": "tp", "method": f"Torch-Pruning {label}", "structure": structure,
                                 "criterion": f"tp {imp}", "aggregation": "tp mean", "budget": ratio,
                                 "status": "timeout" if hung else "error", "error": msg})
                log(f"TP {imp} {mode}: {msg}")


# ----------------------------------------------------------------------------------------- recovery


RECOVERY = {"lora": "LoRA r=8 a=16", "kd": "KD (KL, T=1)", "lora+kd": "LoRA r=8 trained by KD"}


def recover(bench: LlamaBench, model: nn.Module, method: str) -> tuple[nn.Module, list[float]]:
    """``depgraph.heal`` on a copy of ``model``: LoRA on every projection, KD to the unpruned model, or both."""
    s = bench.settings
    healed = copy.deepcopy(model)
    lr = s.kd_lr if method == "kd" else s.lora_lr
    report = depgraph.heal(healed, bench.train_ids, method=method, teacher=None if method == "lora" else bench.model,
                           seq_len=s.context, steps=s.recovery_steps, batch_size=s.recovery_batch, lr=lr,
                           scheduler="constant_with_warmup", warmup=0.1, lora_targets=LORA_TARGETS,
                           log_every=1, quiet=True, seed=s.seed)
    healed.eval()
    return healed, [loss for _, loss in report.train_loss]


def run_recovery(bench: LlamaBench, candidates: list[tuple[str, nn.Module, dict]],
                 control: tuple[str, nn.Module, dict] | None = None) -> list[dict]:
    """LoRA and KD on each candidate (label, pruned model, its row); perplexity before and after.

    ``control``: the unpruned model gets the same LoRA run (KD to itself is a no-op), which separates
    recovering from pruning from simply training the (small, briefly trained) model further.
    """
    s = bench.settings
    out = []
    runs = [(c, kind) for c in candidates for kind in RECOVERY] + ([(control, "lora")] if control else [])
    for (label, model, row), which in runs:
        kind = RECOVERY[which]
        t = time.perf_counter()
        try:
            rec, losses = recover(bench, model, which)
            ppl = bench.ppl(rec)
            entry = {"model": label, "recovery": kind, "steps": s.recovery_steps, "budget": row["budget"],
                     "params": param_count(rec), "removed_pct": row["removed_pct"], "ppl_before": row["ppl"],
                     "ppl_after": ppl, "first_loss": losses[0], "last_loss": sum(losses[-5:]) / len(losses[-5:]),
                     "time_s": time.perf_counter() - t, "status": "ok"}
        except Exception as exc:
            traceback.print_exc()
            entry = {"model": label, "recovery": kind, "steps": s.recovery_steps, "budget": row["budget"],
                     "ppl_before": row["ppl"], "status": "error", "error": f"{type(exc).__name__}: {exc}"}
        out.append(entry)
        log(f"recovery {label} {kind}: {entry.get('ppl_before', 0):.3f} -> "
            f"{entry.get('ppl_after', float('nan')):.3f} ({entry.get('time_s', 0):.0f}s)")
    return out


# ------------------------------------------------------------------------------------------ MiniLM


def run_minilm(s: Settings) -> dict[str, Any]:
    """A/B pruning of the pretrained all-MiniLM-L6-v2 at encoder-relative budgets; embedding agreement."""
    from depgraph.evaluate import embedding_agreement, load_minilm, sentence_embeddings, wikitext_sentences

    model, tok = load_minilm()
    model.eval()
    total = param_count(model)
    embed = sum(p.numel() for n, p in model.named_parameters() if n.startswith("embeddings."))
    encoder = total - embed
    sents = wikitext_sentences("test", n=s.minilm_sentences, seed=s.seed)
    calib_sents = wikitext_sentences("valid", n=s.calib_samples, seed=s.seed)
    calib = []
    for i in range(0, len(calib_sents), s.calib_batch):
        enc = tok(calib_sents[i:i + s.calib_batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        calib.append(dict(enc))
    ref = sentence_embeddings(model, tok, sents)
    costs = CostCache(model, encoder_macs, lambda m: encoder_latency_ms(m, s.latency_repeats), s.latency_rounds)
    graph = depgraph.trace(model)
    rows = []
    by_crit: dict[str, list[str]] = {}
    for crit, agg in s.minilm_settings:
        by_crit.setdefault(crit, []).append(agg)
    for crit, aggs in by_crit.items():
        t = time.perf_counter()
        scores = member_scores(graph, crit, calib=calib, seed=s.seed, progress=False)
        score_s = time.perf_counter() - t
        for agg in aggs:
            per_group = {i: combine(scores[g], agg) for i, g in enumerate(graph.groups()) if scores[g]}
            for ratio, recon in ((r, rc) for r in s.ratios for rc in s.reconstruct):
                if s.cells is not None and ratio not in [b for _, b in s.cells]:
                    continue
                total_ratio = ratio * encoder / total
                g2, report, cut_s = fixed_plan_pruner(graph, per_group, "block", total_ratio, recon, calib, crit,
                                                      s.damp)
                t = time.perf_counter()
                n = param_count(g2.model)
                agree = embedding_agreement(ref, sentence_embeddings(g2.model, tok, sents))
                row = {"section": "minilm", "method": "depgraph", "structure": "block", "criterion": crit,
                       "aggregation": "any" if crit == "random" else agg, "reconstruct": recon, "budget": ratio,
                       "params": n,
                       "removed_pct": 100.0 * (1 - n / total),
                       "removed_encoder_pct": 100.0 * (total - n) / encoder, **costs(g2.model), **agree,
                       "score_s": score_s, "prune_s": score_s + cut_s, "status": "ok"}
                row["eval_s"] = time.perf_counter() - t
                rows.append(row)
                log(f"MiniLM {crit}/{agg} @{ratio:.0%} of encoder recon={recon}: cos {agree['mean_cosine']:.4f} "
                    f"spearman {agree['spearman']:.4f}")
    return {"params": total, "embedding_params": embed, "encoder_params": encoder, "sentences": len(sents),
            "calib_sentences": len(calib_sents), "macs": costs.base_macs, "rows": rows,
            "taylor": "not run: the encoder has no training loss here (no MLM head in the checkpoint); "
                      "the criteria that need a loss need a task"}


# ------------------------------------------------------------------------------------------ report


def _f(x: Any, fmt: str = "{:.3f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return fmt.format(x)


def _table(header: Sequence[str], body: list[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in body]
    return "\n".join(lines)


def llama_table(rows: list[dict], base: dict) -> str:
    header = ["method", "structure", "criterion", "aggregation", "reconstruct", "budget", "params (removed)",
              "A / B / C removed", "plain HF", "non-zeros", "MACs (% of base)", "latency × base", "ppl", "time s",
              "note"]
    body = [["unpruned", "-", "-", "-", "-", "-", f"{base['params']:,} (0.0%)", "-", "yes", "-",
             f"{base['macs']:,} (100%)", "1.00", _f(base["ppl"]), "-", ""]]
    for r in rows:
        if r.get("status") != "ok":
            body.append([r.get("method", ""), r.get("structure", "-"), r.get("criterion", ""),
                         r.get("aggregation", "-"), r.get("reconstruct", "-"), _f(r.get("budget"), "{:.0%}"),
                         "-", "-", "-", "-", "-", "-", f"**{r['status']}**", "-", r.get("error", "")[:400]])
            continue
        nz = f"{r['nonzero_pct']:.1f}% (sparse)" if "nonzero_pct" in r else "-"
        kinds = r.get("kind_removed_pct")
        kinds_text = " / ".join(f"{kinds[k]:.0f}%" for k in "ABC") if kinds else "-"
        plain = "-" if "plain_hf" not in r else ("yes" if r["plain_hf"] else "no")
        body.append([r["method"], r["structure"], r["criterion"], r["aggregation"], r.get("reconstruct", "-"),
                     _f(r["budget"], "{:.0%}"), f"{r['params']:,} ({r['removed_pct']:.1f}%)", kinds_text, plain,
                     nz, f"{r['macs']:,} ({r['macs_pct']:.1f}%)", _f(r["latency_rel"], "{:.2f}"), _f(r["ppl"]),
                     _f(r.get("prune_s"), "{:.1f}"), r.get("note", "")])
    return _table(header, body)


def pivot_tables(rows: list[dict], s: Settings) -> str:
    """Perplexity per criterion (rows) x aggregation (columns), one table per structure and budget."""
    out = []
    for structure in s.structures:
        for ratio in s.ratios:
            sel = {(r["criterion"], r["aggregation"]): r for r in rows
                   if r.get("section") == "depgraph" and r.get("status") == "ok" and r["structure"] == structure
                   and r["budget"] == ratio and r.get("reconstruct", "none") == "none"
                   and r.get("allocation", "uniform") == "uniform"}
            if not sel:
                continue
            body = []
            for crit in s.criteria:
                if crit == "random":
                    r = sel.get(("random", "any"))
                    body.append([crit] + [_f(r["ppl"]) if r else "-"] * len(s.aggregations))
                    continue
                vals = [sel.get((crit, a), {}).get("ppl") for a in s.aggregations]
                ok = [v for v in vals if v is not None]
                lo = min(ok) if ok else None
                body.append([crit] + [("**" + _f(v) + "**") if v is not None and v == lo and len(ok) > 1 else _f(v)
                                      for v in vals])
            out.append(f"Perplexity, depgraph {structure}-wise, {ratio:.0%} of parameters "
                       f"(bold: the criterion's best aggregation)\n\n" + _table(["criterion", *s.aggregations], body))
    return "\n\n".join(out)


def reconstruction_table(rows: list[dict], s: Settings, base_ppl: float) -> str:
    """Perplexity per (structure, budget, criterion/aggregation, allocation) with each reconstruction variant
    side by side, the ratio of the best to the unpruned model, the share of heads (B) and MLP neurons (A)
    removed, and Torch-Pruning's rows of the same cell."""
    cells: dict[tuple, dict[str, float]] = {}
    shares: dict[tuple, str] = {}
    for r in rows:
        if r.get("section") == "depgraph" and r.get("status") == "ok":
            key = (r["structure"], r["budget"], f"{r['criterion']}/{r['aggregation']}", r.get("allocation", "uniform"))
            cells.setdefault(key, {})[r.get("reconstruct", "none")] = r["ppl"]
            k = r.get("kind_removed_pct") or {}
            shares[key] = f"{r['removed_pct']:.1f}% | {k.get('A', 0):.0f}% / {k.get('B', 0):.0f}%"
    tp_struct = {"block": "block (heads+MLP)", "mlp": "MLP only", "channel": "channel"}
    tp: dict[tuple, list[str]] = {}
    for r in rows:
        if r.get("section") == "tp" and r.get("status") == "ok":
            for st, label in tp_struct.items():
                if r["structure"] == label:
                    tp.setdefault((st, r["budget"]), []).append(f"{r['criterion']} {r['ppl']:.3f}")
    if not any(len(v) > 1 or "none" not in v for v in cells.values()) and len(s.allocations) < 2:
        return ""
    order = {a: i for i, a in enumerate(s.allocations)}
    body = []
    for key, by in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], order.get(kv[0][3], 9))):
        st, budget, crit, alloc = key
        vals = [by.get(v) for v in s.reconstruct]
        best = min(v for v in vals if v is not None)
        body.append([st, _f(budget, "{:.0%}"), crit, alloc, shares[key], *[_f(v) for v in vals],
                     f"{best / base_ppl:.3f}", "; ".join(tp.get(("block" if st.startswith("heads") else st, budget), [])) or "-"])
    return _table(["structure", "budget", "criterion/aggregation", "allocation", "params removed", "A / B removed",
                   *[f"ppl {v}" for v in s.reconstruct], "best ÷ unpruned", "Torch-Pruning"], body)


def aggregation_summary(rows: list[dict], s: Settings) -> list[dict]:
    """Per scope (every structure, then each one) and aggregation: wins (ties count for each tied
    aggregation), mean rank, geometric-mean perplexity and its ratio to ``sum``, over the
    (criterion except random, structure, budget) cells that have every aggregation."""
    cells: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if (r.get("section") == "depgraph" and r.get("status") == "ok" and r["criterion"] != "random"
                and r.get("reconstruct", "none") == "none" and r.get("allocation", "uniform") == "uniform"):
            cells.setdefault((r["criterion"], r["structure"], r["budget"]), {})[r["aggregation"]] = r["ppl"]
    out = []
    for scope in ["all", *s.structures]:
        full = [c for k, c in cells.items() if (scope == "all" or k[1] == scope) and all(a in c for a in s.aggregations)]
        if not full:
            continue
        for a in s.aggregations:
            ranks = [sorted(c.values()).index(c[a]) + 1 for c in full]
            wins = sum(1 for c in full if c[a] == min(c.values()))
            logr = [math.log(c[a] / c["sum"]) for c in full] if "sum" in s.aggregations else []
            out.append({"scope": scope, "aggregation": a, "cells": len(full), "wins": wins,
                        "mean_rank": sum(ranks) / len(ranks),
                        "geo_mean_ppl_vs_sum": math.exp(sum(logr) / len(logr)) if logr else None,
                        "geo_mean_ppl": math.exp(sum(math.log(c[a]) for c in full) / len(full))})
    return out


def gap_closed(entry: dict, entries: list[dict]) -> float | None:
    """Share of the perplexity gap a recovery closes, measured to the unpruned-LoRA control's result.

    ``(before - after) / (before - control after)``: the control trains the unpruned model the same way,
    so what it gains is training, not recovery from pruning, and is not counted.
    """
    control = next((e for e in entries if e["model"].startswith("unpruned") and e["status"] == "ok"), None)
    if control is None or entry is control or entry["status"] != "ok":
        return None
    gap = entry["ppl_before"] - control["ppl_after"]
    return (entry["ppl_before"] - entry["ppl_after"]) / gap if gap > 0 else None


def recovery_table(entries: list[dict]) -> str:
    body = []
    for e in entries:
        body.append([e["model"], e["recovery"], str(e["steps"]), _f(e.get("budget"), "{:.0%}"),
                     _f(e.get("removed_pct"), "{:.1f}%"), _f(e.get("ppl_before")),
                     _f(e.get("ppl_after")) if e["status"] == "ok" else f"**{e['status']}** {e.get('error', '')}",
                     _f(gap_closed(e, entries), "{:.0%}"), _f(e.get("time_s"), "{:.0f}")])
    return _table(["pruned model", "recovery", "steps", "budget", "removed", "ppl before", "ppl after",
                   "gap closed (vs control)", "time s"], body)


def minilm_table(mini: dict) -> str:
    body = [["unpruned", "-", "-", f"{mini['params']:,} (0.0% / 0.0%)", f"{mini['macs']:,} (100%)", "1.00",
             "1.0000", "1.0000", "-"]]
    body[0].insert(2, "-")
    for r in mini["rows"]:
        body.append([r["criterion"], r["aggregation"], r.get("reconstruct", "none"), _f(r["budget"], "{:.0%}"),
                     f"{r['params']:,} ({r['removed_encoder_pct']:.1f}% / {r['removed_pct']:.1f}%)",
                     f"{r['macs']:,} ({r['macs_pct']:.1f}%)", _f(r["latency_rel"], "{:.2f}"),
                     _f(r["mean_cosine"], "{:.4f}"), _f(r["spearman"], "{:.4f}"), _f(r["prune_s"], "{:.1f}")])
    return _table(["criterion", "aggregation", "reconstruct", "budget (of encoder)", "params (removed: encoder / total)",
                   "MACs", "latency × base", "mean cosine", "Spearman", "time s"], body)


def render(result: dict[str, Any], s: Settings) -> str:
    meta = result["meta"]
    parts = [f"## Pruning quality ({'quick' if s.quick else 'full'} mode)\n",
             f"{meta['date']}; torch {meta['torch']}, transformers {meta['transformers']}, "
             f"torch-pruning {meta['torch_pruning']}, peft {meta['peft']}; torch threads: {meta['threads']}; "
             f"total {meta['wall_s']:.0f} s.\n"]
    for llama in (v for k, v in result.items() if k == "llama" or k.startswith("llama_")):
        if not llama:
            continue
        b = llama["base"]
        lm = llama.get("lm", "byte")
        unit = "bytes" if lm == "byte" else f"{lm.upper()} tokens"
        vocab = b["info"].get("vocab_size", 259)
        parts.append(
            f"### Tiny Llama, {lm} tokenizer ({'quick' if s.quick else 'full'}: {b['params']:,} params, "
            f"{b['layers']} layers, vocabulary {vocab:,})\n\nPerplexity per {unit.rstrip('s')} on the first "
            f"{s.eval_tokens:,} {unit} of WikiText-2 test.txt, "
            f"context {s.context} (non-overlapping windows); unpruned {b['ppl']:.3f}. Calibration: "
            f"{s.calib_samples} x {s.context} {unit} of valid.txt (seed {s.seed}). Latency: [1, {s.context}] CPU "
            f"forward, median of {s.latency_rounds} interleaved rounds x {s.latency_repeats} (unpruned "
            f"{b['latency_ms']:.1f} ms); MACs of the same forward. Fixed-score path check: "
            f"{llama['fixed_score_check']}.\n")
        piv = pivot_tables(llama["rows"], s)
        if piv:
            parts.append(piv + "\n")
        agg = llama.get("aggregation_summary") or []
        if agg:
            parts.append("Aggregations over the (criterion except random, structure, budget) cells (ties count as a "
                         "win for each tied aggregation; rank 1 = lowest perplexity of the cell):\n\n" + _table(
                ["structures", "aggregation", "cells", "wins", "mean rank", "geo-mean ppl", "ppl ÷ sum (geo-mean)"],
                [[a["scope"], a["aggregation"], a["cells"], a["wins"], _f(a["mean_rank"], "{:.2f}"),
                  _f(a["geo_mean_ppl"]), _f(a["geo_mean_ppl_vs_sum"], "{:.3f}")] for a in agg]) + "\n")
        recon = reconstruction_table(llama["rows"], s, b["ppl"])
        if recon:
            parts.append("Reconstruction and per-layer allocation (depgraph.reconstruct, Pruner(allocation=); "
                         "params removed: of the whole model (a plan the rounding keeps short says so); A / B "
                         "removed: share of MLP neurons / heads cut):\n\n" + recon + "\n")
        parts.append("All rows:\n\n" + llama_table(llama["rows"], b) + "\n")
        if llama.get("best"):
            parts.append("Best per budget: " + "; ".join(
                f"{k}: {v['method']} {v['structure']} {v['criterion']}/{v['aggregation']} ppl {v['ppl']:.3f}"
                for k, v in llama["best"].items()) + "\n")
    if result.get("recovery"):
        parts.append(f"### Recovery ({s.recovery_steps} steps, batch {s.recovery_batch} x {s.context}, "
                     f"LoRA lr {s.lora_lr:g}, KD lr {s.kd_lr:g})\n\n" + recovery_table(result["recovery"]) + "\n")
    mini = result.get("minilm")
    if mini:
        parts.append(f"### all-MiniLM-L6-v2 (A+B pruning; {mini['sentences']} WikiText-2 test sentences)\n\n"
                     f"{mini['params']:,} params, of which {mini['embedding_params']:,} embeddings and "
                     f"{mini['encoder_params']:,} encoder layers; budgets are fractions of the encoder layers. "
                     f"Taylor: {mini['taylor']}.\n\n" + minilm_table(mini) + "\n")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- main


def versions() -> dict[str, str]:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    for mod in ("torch_pruning", "peft", "depgraph"):
        try:
            out[mod] = getattr(__import__(mod), "__version__", "?")
        except ImportError:
            out[mod] = "missing"
    return out


def run(s: Settings) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    result: dict[str, Any] = {"meta": {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                                       **versions(), "threads": s.threads, "cpu_count": os.cpu_count(),
                                       "settings": {k: v for k, v in vars(s).items()}},
                              "llama": None, "recovery": [], "minilm": None}
    for lm in (s.lms if "llama" not in s.skip else []):
        bench = setup_llama(s, lm)
        base_lat = latency_ms(bench.model, s.context, repeats=s.latency_repeats, warmup=1)
        layers = bench.model.config.num_hidden_layers
        log(f"tiny Llama ({lm}): {bench.params:,} params, test ppl {bench.base_ppl:.3f} on {s.eval_tokens} tokens")
        rows: list[dict] = []
        best: dict[Any, tuple[float, nn.Module, dict]] = {}
        verdict = run_depgraph_grid(bench, rows, best)
        dg_best = {k: v for k, v in best.items() if not isinstance(k, tuple)}
        if s.depth and "depth" not in s.skip:
            run_depth(bench, rows)
        if "sparse" not in s.skip:
            run_sparse(bench, rows)
        tp_best: dict[float, tuple[float, nn.Module, dict]] = {}
        if "tp" not in s.skip and s.tp_imps:
            targets = {r: dg_best[r][2]["params"] for r in s.ratios if r in dg_best}
            with tempfile.TemporaryDirectory(prefix="quality-tp-") as tmp:
                run_tp(bench, rows, targets, tp_best, Path(tmp))
        # the first LM is "llama" (the byte-level one by default), the others "llama_<tokenizer>"
        result["llama" if lm == s.lms[0] else f"llama_{lm}"] = {
            "lm": lm,
            "base": {"params": bench.params, "ppl": bench.base_ppl, "macs": bench.costs.base_macs,
                     "latency_ms": base_lat, "layers": layers, "info": {k: v for k, v in bench.info.items()
                                                                        if k != "path"}},
            "fixed_score_check": verdict, "rows": rows,
            "best": {f"{r:.0%}": v[2] for r, v in sorted(dg_best.items())},
            "tp_best": {f"{r:.0%}": v[2] for r, v in sorted(tp_best.items())},
            "aggregation_summary": aggregation_summary(rows, s),
        }
        if "recovery" not in s.skip and s.recovery_steps > 0 and lm == s.lms[0]:  # the first LM only (cost)
            r0 = s.ratios[0]
            cands: list[tuple[str, nn.Module, dict]] = []
            for key in (r0, ("block", r0)):  # the best overall, and the best LLM-Pruner-style (A+B) row
                if key in best and all(best[key][1] is not c[1] for c in cands):
                    b = best[key]
                    cands.append((f"depgraph {b[2]['structure']} {b[2]['criterion']}/{b[2]['aggregation']}", b[1],
                                  b[2]))
            if r0 in tp_best:
                b = tp_best[r0]
                cands.append((f"{b[2]['method']} {b[2]['structure']}", b[1], b[2]))
            control = {"budget": 0.0, "removed_pct": 0.0, "ppl": bench.base_ppl}
            result["recovery"] = run_recovery(bench, cands, ("unpruned (control)", bench.model, control))
    if "minilm" not in s.skip and s.minilm_settings:
        result["minilm"] = run_minilm(s)
    result["meta"]["wall_s"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the < 5 minute smoke configuration")
    parser.add_argument("--json", default=None, help="write every number here")
    parser.add_argument("--md", default=None, help="also write the markdown report here")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core box 2 threads made a training step 8-14x "
                             "slower than 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="tiny Llama cache (default: common.default_cache_dir())")
    parser.add_argument("--criteria", default=None, help="comma list, overrides the mode's")
    parser.add_argument("--aggregations", default=None, help="comma list")
    parser.add_argument("--ratios", default=None, help="comma list of parameter fractions, e.g. 0.2,0.5")
    parser.add_argument("--structures", default=None, help="comma list of block (A+B), mlp (A), channel (C)")
    parser.add_argument("--tp-imps", dest="tp_imps", default=None, help="comma list of l2,taylor ('' = none)")
    parser.add_argument("--tp-heads-timeout", type=float, default=None,
                        help="seconds for Torch-Pruning's heads recipe (0 = skip it)")
    parser.add_argument("--eval-tokens", type=int, default=None)
    parser.add_argument("--calib-samples", type=int, default=None)
    parser.add_argument("--recovery-steps", type=int, default=None)
    parser.add_argument("--minilm-sentences", type=int, default=None)
    parser.add_argument("--skip", default=None, help="comma list of llama,depth,sparse,tp,recovery,minilm")
    parser.add_argument("--reconstruct", default=None,
                        help=f"comma list of {','.join(RECONSTRUCT)}: depgraph rows with each (default: none)")
    parser.add_argument("--damp", type=float, default=0.01, help="reconstruction ridge term (default 0.01)")
    parser.add_argument("--allocations", default=None,
                        help=f"comma list of {','.join(ALLOCATIONS)}: per-layer budgets (Pruner(allocation=); "
                             "default: uniform)")
    parser.add_argument("--allocation-spread", type=float, default=0.5,
                        help="Pruner(allocation_spread=) of the increasing and outlier rows (default 0.5)")
    parser.add_argument("--lms", default=None,
                        help=f"comma list of benchmark LMs by tokenizer ({','.join(TOKENIZERS)}; full default: both, "
                             "quick: byte)")
    parser.add_argument("--rows", default=None,
                        help="only these structure@budget cells, e.g. heads@0.2,block@0.2,mlp@0.2,block@0.5,channel@0.2 "
                             "(sets --structures/--ratios; MiniLM runs the budgets)")
    parser.add_argument("--tp-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tp_worker:
        tp_worker(json.loads(args.tp_worker))
        return
    s = make_settings(args)
    result = run(s)
    text = render(result, s)
    print(text)
    if args.md:
        Path(args.md).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
