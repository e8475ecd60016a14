"""The ``depgraph`` command line: inspect, prune, heal, render, eval and demo.

::

    depgraph inspect MODEL [--meta] [--json] [--kind A|B|C]
    depgraph prune   MODEL --ratio 0.2 --criterion l2 --out DIR [--strategy block|channel|all] [--depth N]
                     [--experts R] [--kind-ratios A=0.3,B=0.25] [--no-hf-loadable] [--allow-partial]
                     [--reconstruct lsq|bias] [--sequential] [--stream]
    depgraph heal    MODEL --data FILE --out DIR [--teacher DIR] [--method lora|kd|lora+kd] [--steps N] ...
    depgraph render  MODEL -o graph.svg [--scope model.layers.0] [--level neuron] [--report report.html]
    depgraph eval    MODEL [--ppl FILE] [--lm-eval FILE] [--tasks NAMES] [--context-length 128] [--max-tokens N]
    depgraph demo    [--out out/demo]

``MODEL`` is a model directory (Hugging Face or written by ``depgraph prune``), a ``config.json`` path
(random weights, or shapes only with ``--meta``) or a built-in demo name (:mod:`depgraph.models`).
Progress goes to stderr: bars on a terminal, plain lines when stderr is a file or pipe (``-q`` silences
both); results go to stdout. Torch uses its default thread count unless ``--threads N``. Every failure prints one line,
``depgraph: error: ...``, and exits non-zero: 2 for bad arguments (unknown path, ratio outside (0, 1),
unknown criterion), 1 when the work itself fails; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import importance
from .calibration import vocab_size
from .errors import DepGraphError
from .models import (
    DEFAULT_DEMO,
    DEMO_MODELS,
    ModelSpecError,
    ResolvedSpec,
    is_meta,
    load_model,
    load_tokenizer,
    resolve,
)

PROG = "depgraph"
KIND_NAMES = {"A": "MLP neurons", "B": "attention heads", "C": "hidden channels"}
EXACT_TOL = 1e-4  # max |delta logit| accepted between a cut and its zero-mask reference (float32)


class CLIError(Exception):
    """A failure the user can fix; ``code`` is the exit status (2: bad arguments or input)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (raised, so :func:`main` prints them) instead of usage dumps."""

    def error(self, message: str):  # type: ignore[override]
        raise CLIError(f"{message} (see '{self.prog} --help')", 2)


# ---- output --------------------------------------------------------------------------------------


class Console:
    """Results to stdout (above any progress bar), stage progress bars to stderr unless ``quiet``."""

    def __init__(self, quiet: bool = False, terminal: bool | None = None):
        self.quiet = quiet
        self.terminal = sys.stderr.isatty() if terminal is None else terminal

    @property
    def bars(self) -> bool:
        """Progress bars: on a terminal only (a file or pipe gets plain lines instead), never with -q."""
        return self.terminal and not self.quiet

    def note(self, text: str) -> None:
        """A plain progress line on stderr, for output that is not a terminal (silenced by -q)."""
        if not self.quiet and not self.terminal:
            print(f"{PROG}: {text}", file=sys.stderr, flush=True)

    def say(self, text: str = "") -> None:
        tqdm.write(text, file=sys.stdout)

    def header(self, text: str) -> None:
        self.say(f"\n== {text} " + "=" * max(0, 72 - len(text)))

    @contextlib.contextmanager
    def stages(self, title: str, names: Sequence[str]) -> Iterator[Callable[[str], None]]:
        """A bar over the named stages of one command; call the yielded function as each one starts."""
        bar = tqdm(total=len(names), desc=title, leave=False, file=sys.stderr, disable=not self.bars,
                   bar_format="{desc} [{n_fmt}/{total_fmt} stages, {elapsed}]")
        started = [0]  # stages begun so far (a disabled tqdm does not count)
        clock = time.perf_counter()

        def start(name: str) -> None:
            if started[0]:
                bar.update(1)
            started[0] += 1
            bar.set_description_str(f"{title}: {name}")
            self.note(f"{title}: {name} ({started[0]}/{len(names)}, {time.perf_counter() - clock:.0f} s)")

        try:
            yield start
            bar.update(bar.total - bar.n)
        finally:
            bar.close()


def _table(rows: list[list[Any]], header: list[str], right: set[int] | None = None) -> str:
    """A plain fixed-width text table."""
    right = right if right is not None else set()
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        return "  ".join(padded).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ---- argument types ------------------------------------------------------------------------------


def _fraction(text: str, name: str, zero_allowed: bool) -> float:
    """``text`` as a number in (0, 1), or [0, 1) when ``zero_allowed``; else an argparse error naming ``name``."""
    interval = "[0, 1)" if zero_allowed else "(0, 1)"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be a number in {interval}, got {text!r}") from None
    low_ok = value >= 0.0 if zero_allowed else value > 0.0
    if not (low_ok and value < 1.0) or math.isnan(value):
        raise argparse.ArgumentTypeError(f"{name} must be in {interval}{'' if zero_allowed else ' (exclusive)'}, "
                                         f"got {text}")
    return value


def _ratio(text: str) -> float:
    return _fraction(text, "ratio", zero_allowed=False)


def _spread(text: str) -> float:
    return _fraction(text, "allocation spread", zero_allowed=True)


def _uniform_widths(args: argparse.Namespace) -> bool:
    """Whether the options keep identical blocks at identical widths (so --hf-loadable can default on)."""
    return (args.scope == "local" and not (args.skip_first or args.skip_last)
            and args.allocation == "uniform")


def _kind_ratios(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in text.split(","):
        kind, _, value = part.partition("=")
        kind = kind.strip().upper()
        if kind not in ("A", "B", "C") or kind in out:
            raise argparse.ArgumentTypeError(f"kind ratios look like A=0.3,B=0.25 (kinds A, B, C once each), "
                                             f"got {text!r}")
        out[kind] = _ratio(value)
    return out


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _criterion(text: str) -> str:
    if text not in importance.CRITERIA:
        known = ", ".join(sorted(importance.CRITERIA))
        raise argparse.ArgumentTypeError(f"unknown criterion {text!r} (choose from {known})")
    return text


def _existing_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


# ---- shared helpers ------------------------------------------------------------------------------


def _no_weights(spec: ResolvedSpec) -> CLIError:
    return CLIError(f"{spec.spec} has no weights (meta device, shapes only): it can be inspected or "
                    "rendered, not scored, cut or evaluated")


def _require_weights(spec: ResolvedSpec) -> None:
    """Fail before loading when ``spec`` names a shape-only demo model."""
    if spec.kind == "demo" and DEMO_MODELS[spec.spec].meta_only:
        raise _no_weights(spec)


def _load(spec: ResolvedSpec, meta: bool = False, need_weights: bool = False) -> nn.Module:
    model = load_model(spec, meta=meta)
    if need_weights and is_meta(model):
        raise _no_weights(spec)
    return model


def _trace(model: nn.Module):
    from .graph import trace

    return trace(model)


def _max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _tokenizer(spec: ResolvedSpec, directory: Path | None, model: nn.Module) -> Any:
    """The tokenizer text is read with: ``--tokenizer DIR``, else the model directory's own, else the
    byte tokenizer of a byte-vocabulary (demo) model; otherwise a CLIError naming ``--tokenizer``."""
    from .data import ByteTokenizer, resolve_tokenizer

    if directory is not None:
        return resolve_tokenizer(directory)
    own = load_tokenizer(spec)
    if own is not None:
        return own
    if vocab_size(model) == ByteTokenizer().vocab_size:
        return ByteTokenizer()
    raise CLIError(f"{spec.spec} comes with no tokenizer files, so text cannot be tokenized for it: pass "
                   "--tokenizer DIR (the original model's directory)")


def _text_ids(text: str, tokenizer: Any) -> tuple[torch.Tensor, str]:
    """Token ids of ``text`` with ``tokenizer`` and which tokenizer that was."""
    from .data import describe_tokenizer, tokenize_text

    return tokenize_text(text, tokenizer), f"tokenizer {describe_tokenizer(tokenizer)}"


def _calibration(model: nn.Module, tokenizer: Any, source: Path | None, n_samples: int, seq_len: int,
                 seed: int, demo: bool = False) -> tuple[list[torch.Tensor], str]:
    """``n_samples`` windows of ``seq_len`` tokens from ``source``, else WikiText-2 valid in
    ``$DEPGRAPH_DATA_DIR``; else a CLIError naming ``--calib`` (the demo says it uses random ids)."""
    from .data import DATA_DIR_ENV, calibration_batches, default_text_path, read_text

    vocab = vocab_size(model)
    limit = _max_positions(model)
    if limit is not None and seq_len > limit:
        seq_len = limit
    if source is None:
        try:
            source = default_text_path("valid")
        except FileNotFoundError as exc:
            if not demo or vocab is None:
                raise CLIError(f"no calibration text: pass --calib FILE ({_one_line(str(exc))})") from exc
            gen = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, vocab, (n_samples, seq_len), generator=gen)
            about = (f"{n_samples} RANDOM token windows x {seq_len} (demo only: no WikiText-2, set "
                     f"{DATA_DIR_ENV} to calibrate on text)")
            return [row[None] for row in ids], about
    ids, how = _text_ids(read_text(source), tokenizer)
    try:
        batches = calibration_batches(ids, n_samples=n_samples, seq_len=seq_len, seed=seed, vocab_size=vocab)
    except ValueError as exc:
        raise CLIError(f"calibration text {source}: {exc}") from exc
    return batches, f"{n_samples} windows x {seq_len} tokens of {source} ({how})"


def _save(model: nn.Module, path: Path) -> dict:
    """:func:`depgraph.save_pretrained` (HF files when the config can describe the model)."""
    from . import checkpoint

    return checkpoint.save_pretrained(model, path)


def _compact_json(value: Any) -> str:
    """Indented JSON with lists of numbers kept on one line (unit-id lists stay readable)."""
    def flat(match: re.Match) -> str:
        try:
            return json.dumps(json.loads(match.group(0)))
        except ValueError:  # e.g. "[-]" inside a string value: leave it alone
            return match.group(0)

    return re.sub(r"\[[\d,\s.-]*\]", flat, json.dumps(value, indent=1))


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


# ---- inspect -------------------------------------------------------------------------------------


def _group_record(group) -> dict[str, Any]:
    from .pruner import layer_index

    return {
        "kind": group.kind.value, "name": group.name, "layer": layer_index(group), "size": group.size,
        "exact": group.exact, "params_per_unit": int(group.extra.get("params_per_unit", 0)),
        "members": [{"param": m.param, "dim": m.dim, "role": m.role, "per_unit": m.per_unit,
                     "buffer": m.is_buffer} for m in group.members],
    }


def cmd_inspect(args: argparse.Namespace, console: Console) -> int:
    from .cut import count_parameters

    spec = resolve(args.model)
    with console.stages("inspect", ["load", "trace"]) as stage:
        stage("load")
        model = _load(spec, meta=args.meta)
        stage("trace")
        start = time.perf_counter()
        graph = _trace(model)
        took = time.perf_counter() - start
    groups = graph.groups(args.kind)
    if args.json:
        out = {
            "model": args.model, "class": type(model).__name__, "device": "meta" if is_meta(model) else "cpu",
            "parameters": count_parameters(model), "trace_seconds": round(took, 3),
            "groups": [_group_record(g) for g in groups],
            "warnings": list(graph.warnings),
            "frozen": [{"param": p, "dim": d, "reason": r} for (p, d), r in graph.frozen.items()],
        }
        console.say(json.dumps(out, indent=1, default=_json_default))
        return 0
    where = "meta device, shapes only" if is_meta(model) else "weights on cpu"
    console.say(f"{type(model).__name__} ({args.model}): {count_parameters(model):,} parameters, {where}; "
                f"traced in {took:.1f} s")
    records = [_group_record(g) for g in groups]
    rows = [[r["kind"], "-" if r["layer"] is None else r["layer"], r["name"], r["size"], len(r["members"]),
             f"{r['params_per_unit']:,}", "yes" if r["exact"] else "no"] for r in records]
    console.header("groups" + (f" of kind {args.kind}" if args.kind else ""))
    console.say(_table(rows, ["kind", "layer", "group", "units", "members", "params/unit", "exact"],
                       right={1, 3, 4, 5}))
    console.header("per kind")
    totals = []
    for kind in "ABC":
        of_kind = [r for r in records if r["kind"] == kind]
        if of_kind:
            units = sum(r["size"] for r in of_kind)
            prunable = sum(r["size"] * r["params_per_unit"] for r in of_kind)
            totals.append([kind, KIND_NAMES[kind], len(of_kind), units, f"{prunable:,}"])
    console.say(_table(totals, ["kind", "what", "groups", "units", "params in units"], right={2, 3, 4}))
    console.header("frozen and unknown")
    console.say(f"frozen parameter dims (never cut): {len(graph.frozen)}")
    for (param, dim), reason in list(graph.frozen.items())[:10]:
        console.say(f"  {param} dim {dim}: {reason}")
    if len(graph.frozen) > 10:
        console.say(f"  ... and {len(graph.frozen) - 10} more (--json lists them all)")
    console.say(f"warnings (ops without a rule, coupled conservatively): {len(graph.warnings)}")
    for warning in graph.warnings:
        console.say(f"  {warning}")
    return 0


# ---- prune ---------------------------------------------------------------------------------------


def _remove_structures(args: argparse.Namespace, console: Console, model: nn.Module, calib: Any) -> dict:
    """``--experts R`` then ``--depth N``: whole experts and whole blocks, scored on the calibration data."""
    from . import depth, experts

    done: dict[str, Any] = {}
    if args.experts is not None:
        sets = experts.find_experts(model)
        if not list(sets):
            hint = f" ({'; '.join(sets.warnings)})" if sets.warnings else ""
            raise CLIError(f"--experts: {type(model).__name__} has no mixture-of-experts block depgraph can "
                           f"remove experts from{hint}")
        scores = experts.expert_importance(model, calib, sets=sets, progress=console.bars)
        report = experts.remove_least_important_experts(model, scores, ratio=args.experts)
        done["experts"] = {"ratio": args.experts, "metric": "gate_mass",
                           "removed": {k: list(v) for k, v in report.removed.items()},
                           "remaining": report.remaining}
        console.say(str(report))
    if args.depth is not None:
        path, blocks = depth.find_blocks(model)
        if args.depth >= len(blocks):
            raise CLIError(f"--depth {args.depth}: {path} has {len(blocks)} blocks and at least one must stay")
        scores = depth.block_importance(model, calib, progress=console.bars)
        report = depth.remove_least_important(model, scores, args.depth)
        done["depth"] = {"metric": "cosine", "path": report.path, "removed": list(report.removed),
                         "scores": [round(float(x), 6) for x in scores]}
        console.say(str(report))
    return done


def _prune_stream(args: argparse.Namespace, console: Console) -> int:
    """``prune --stream``: :func:`depgraph.prune_checkpoint`, one decoder layer in memory at a time."""
    from .stream import check_criterion, prune_checkpoint

    spec = resolve(args.model)
    if spec.kind not in ("hf", "depgraph"):
        raise CLIError(f"--stream reads a checkpoint directory (config.json + safetensors); {spec.spec} is a "
                       f"{'config file' if spec.kind == 'config' else 'demo model'}: drop --stream")
    needs_memory = [flag for flag, on in (("--depth", args.depth is not None), ("--experts", args.experts is not None),
                                          ("--reconstruct", args.reconstruct is not None),
                                          (f"--allocation {args.allocation}",
                                           args.allocation in ("outlier", "sensitivity")),
                                          ("--sequential", args.sequential), ("--steps", args.steps != 1)) if on]
    if needs_memory:
        raise CLIError(f"--stream cuts once, one layer at a time; {', '.join(needs_memory)} need(s) the whole model "
                       "in memory: drop --stream")
    check_criterion(args.criterion)
    out = Path(args.out)
    start = time.perf_counter()
    ratio = args.ratio if args.ratio is not None else 0.2
    hf_loadable = args.hf_loadable
    if hf_loadable is None:  # as without --stream: on unless the options ask for per-layer widths
        hf_loadable = _uniform_widths(args)
    calib, calib_about = None, None
    with console.stages("prune --stream", ["calibration", "score, cut and write"]) as stage:
        stage("calibration")
        if importance.CRITERIA[args.criterion].needs_calib:
            shapes = load_model(ResolvedSpec("hf", spec.spec, spec.path), meta=True)  # config only
            tokenizer = _tokenizer(spec, args.tokenizer, shapes)
            calib, calib_about = _calibration(shapes, tokenizer, args.calib, args.calib_samples, args.seq_len,
                                              args.seed)
        stage("score, cut and write")
        report = prune_checkpoint(spec.path, out, ratio=args.kind_ratios or ratio, criterion=args.criterion,
                                  aggregate=args.aggregate, target=args.target, scope=args.scope,
                                  structure=args.strategy, skip_first=args.skip_first, skip_last=args.skip_last,
                                  round_to=args.round_to, head_round_to=args.head_round_to, calib=calib,
                                  seed=args.seed, hf_loadable=hf_loadable, allow_partial=args.allow_partial,
                                  allocation=args.allocation, allocation_spread=args.allocation_spread,
                                  progress=console.bars)
        target = report.target
        record = {
            "model": args.model, "stream": True, "criterion": args.criterion, "aggregate": args.aggregate,
            "ratio": ratio, "strategy": args.strategy, "scope": args.scope, "target": args.target,
            "skip_first": args.skip_first, "skip_last": args.skip_last, "round_to": args.round_to,
            "head_round_to": args.head_round_to, "kind_ratios": args.kind_ratios, "hf_loadable": hf_loadable,
            "allocation": args.allocation, "allocation_spread": args.allocation_spread, "seed": args.seed, "calibration": calib_about, "params_before": report.params_before,
            "params_after": report.params_after,
            "achieved": {k: r.ratio for k, r in target.kinds.items()} if target is not None else {},
            "plain_hf": target.hf_reason is None if target is not None else None,
            "notes": target.notes if target is not None else [],
            "groups": {g.name: {"kind": g.kind.value, "before": g.size + len(u), "after": g.size,
                                "removed": [int(x) for x in u]} for g, u in (report.plan or {}).items()},
        }
        (out / "plan.json").write_text(_compact_json(record) + "\n")
    if calib_about:
        console.say(f"calibration: {calib_about}")
    console.say(f"{report} (streamed: one decoder layer in memory at a time)")
    if target is not None:
        console.say(str(target))
    console.say(f"time: {time.perf_counter() - start:.1f} s")
    reload = "depgraph.load_pretrained or transformers' from_pretrained" if _plain_checkpoint(out) else "depgraph.load_pretrained"
    console.say(f"wrote {out}/ (reload with {reload}) and {out / 'plan.json'}")
    return 0


def _plain_checkpoint(directory: Path) -> bool:
    """Whether the checkpoint in ``directory`` is plain Hugging Face (``depgraph.json`` says so)."""
    from .checkpoint import STATE_FILE

    try:
        return bool(json.loads((directory / STATE_FILE).read_text()).get("hf_compatible"))
    except (OSError, ValueError):
        return False


def cmd_prune(args: argparse.Namespace, console: Console) -> int:
    from .cut import count_parameters
    from .pruner import Pruner

    if args.criterion is None:  # Taylor needs the whole model in memory: streaming defaults to magnitude
        args.criterion = "l2" if args.stream else "taylor_first"
    if args.stream:
        return _prune_stream(args, console)
    spec = resolve(args.model)
    _require_weights(spec)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    start = time.perf_counter()
    if args.sequential and args.reconstruct is None:
        raise CLIError("--sequential reconstructs layer by layer: add --reconstruct lsq (or bias)")
    structural = args.depth is not None or args.experts is not None
    width = args.ratio is not None or bool(args.kind_ratios) or not structural  # --depth/--experts alone: no width
    ratio = args.ratio if args.ratio is not None else 0.2
    needs_calib = structural or (width and (importance.CRITERIA[args.criterion].needs_calib
                                            or args.reconstruct is not None
                                            or args.allocation in ("outlier", "sensitivity")))
    stages = ["load", "calibration"] + (["experts and depth"] if structural else []) + ["trace", "score and cut",
                                                                                        "save"]
    pruner = None
    target = None
    before: dict[int, int] = {}
    removed: dict[int, list[int]] = {}
    with console.stages("prune", stages) as stage:
        stage("load")
        model = _load(spec, need_weights=True)
        tokenizer = load_tokenizer(spec)
        params_before = count_parameters(model)
        stage("calibration")
        calib, calib_about = None, None
        if needs_calib:
            tokenizer = _tokenizer(spec, args.tokenizer, model)
            calib, calib_about = _calibration(model, tokenizer, args.calib, args.calib_samples, args.seq_len,
                                              args.seed)
        whole = {}
        if structural:
            stage("experts and depth")
            whole = _remove_structures(args, console, model, calib)
        stage("trace")
        graph = _trace(model) if width else None
        stage("score and cut")
        if width:
            hf_loadable = args.hf_loadable
            if hf_loadable is None:  # on by default, unless the options ask for per-layer widths
                hf_loadable = _uniform_widths(args)
            pruner = Pruner(graph, criterion=args.criterion, aggregate=args.aggregate,
                            ratio=args.kind_ratios or ratio, target=args.target, scope=args.scope,
                            structure=args.strategy, skip_first=args.skip_first, skip_last=args.skip_last,
                            round_to=args.round_to, head_round_to=args.head_round_to, steps=args.steps,
                            calib=calib, seed=args.seed, progress=console.bars, hf_loadable=hf_loadable,
                            allow_partial=args.allow_partial, reconstruct=args.reconstruct,
                            sequential=args.sequential, allocation=args.allocation,
                            allocation_spread=args.allocation_spread)
            if not pruner.groups:
                raise CLIError(f"no group to prune: strategy {args.strategy!r} with --skip-first "
                               f"{args.skip_first} --skip-last {args.skip_last} selects none ({graph!r})", 1)
            before = {id(g): g.size for g in pruner.groups}
            alive = {id(g): list(range(g.size)) for g in pruner.groups}  # current unit id -> original unit id
            removed = {id(g): [] for g in pruner.groups}
            for _ in range(args.steps):
                plan = pruner.plan()
                plan = getattr(pruner.step(plan), "plan", plan)  # sequential obs re-chooses units layer by layer
                for group, units in plan.items():
                    gone = set(units)
                    removed[id(group)].extend(alive[id(group)][u] for u in units)
                    alive[id(group)] = [o for u, o in enumerate(alive[id(group)]) if u not in gone]
            target = pruner.history[-1].target if pruner.history else None
        else:
            hf_loadable = None
        stage("save")
        _save(model, out)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(out)
        params_after = count_parameters(model)
        record = {
            "model": args.model, "class": type(model).__name__, "criterion": args.criterion,
            "aggregate": args.aggregate, "ratio": ratio if width else None, "strategy": args.strategy,
            "scope": args.scope, "target": args.target, "skip_first": args.skip_first,
            "skip_last": args.skip_last, "round_to": args.round_to, "head_round_to": args.head_round_to,
            "kind_ratios": args.kind_ratios, "hf_loadable": hf_loadable, "steps": args.steps, "seed": args.seed,
            "allocation": args.allocation, "allocation_spread": args.allocation_spread,
            "calibration": calib_about, "reconstruct": args.reconstruct, "sequential": args.sequential,
            "params_before": params_before, "params_after": params_after,
            "achieved": {k: r.ratio for k, r in target.kinds.items()} if target is not None else {},
            "plain_hf": target.hf_reason is None if target is not None else None,
            "notes": target.notes if target is not None else [],
            **whole,
            "groups": {g.name: {"kind": g.kind.value, "before": before[id(g)], "after": g.size,
                                "removed": sorted(removed[id(g)])} for g in (pruner.groups if pruner else [])},
        }
        (out / "plan.json").write_text(_compact_json(record) + "\n")
    took = time.perf_counter() - start
    if calib_about:
        console.say(f"calibration: {calib_about}")
    for warning in graph.warnings if graph is not None else []:
        console.say(f"warning: {warning}")
    if pruner is not None:
        cut = sum(1 for g in pruner.groups if removed[id(g)])
        units = sum(len(v) for v in removed.values())
        console.say(f"pruned {units} units in {cut} of {len(pruner.groups)} groups "
                    f"({args.strategy}, {args.scope}, {args.criterion}/{args.aggregate})")
        if target is not None:
            console.say(str(target))  # per-kind ratios, notes, and whether plain from_pretrained loads it
        for report in pruner.history:
            if getattr(report, "reconstruction", None) is not None:
                console.say(str(report.reconstruction))
    console.say(f"parameters: {params_before:,} -> {params_after:,} "
                f"({1 - params_after / max(params_before, 1):.2%} removed)")
    console.say(f"time: {took:.1f} s")
    reload = ("depgraph.load_pretrained or transformers' from_pretrained" if target is None or
              target.hf_reason is None else "depgraph.load_pretrained")
    console.say(f"wrote {out}/ (reload with {reload}) and {out / 'plan.json'}")
    return 0


# ---- heal ----------------------------------------------------------------------------------------


def _swap_in(tmp: Path, out: Path) -> None:
    """Make ``tmp`` (a finished directory) be ``out``; an older ``out`` goes only once the new one is there."""
    import shutil

    old = out.with_name(f".{out.name}.old-{os.getpid()}") if out.exists() else None
    if old is not None:
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def cmd_heal(args: argparse.Namespace, console: Console) -> int:
    import shutil
    import tempfile

    from .cut import count_parameters
    from .data import read_text
    from .errors import HealError
    from .heal import heal

    spec = resolve(args.model)
    _require_weights(spec)
    teacher_spec = resolve(args.teacher) if args.teacher else None
    if teacher_spec is not None:
        _require_weights(teacher_spec)
    method = args.method or ("lora+kd" if teacher_spec is not None else "lora")
    if "kd" in method and teacher_spec is None:
        raise CLIError(f"--method {method} distils from a teacher: pass --teacher DIR (the unpruned model)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    start = time.perf_counter()
    with console.stages("heal", ["load", "tokenize", "train", "save"]) as stage:
        stage("load")
        model = _load(spec, need_weights=True)
        tokenizer = _tokenizer(spec, args.tokenizer, model)
        teacher = _load(teacher_spec, need_weights=True) if teacher_spec is not None else None
        stage("tokenize")
        data, how = _text_ids(read_text(args.data), tokenizer)
        held_out = _text_ids(read_text(args.eval_data), tokenizer)[0] if args.eval_data else None
        stage("train")
        params = count_parameters(model)
        targets = args.lora_targets.split(",") if args.lora_targets else "all-linear"
        try:
            report = heal(model, data, method=method, teacher=teacher, eval_data=held_out, seq_len=args.seq_len,
                          steps=args.steps if args.epochs is None else None, epochs=args.epochs,
                          batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                          scheduler=args.scheduler, warmup=args.warmup, lora_rank=args.lora_rank,
                          lora_alpha=args.lora_alpha, lora_targets=targets, temperature=args.temperature,
                          ce_weight=args.ce_weight, hidden_weight=args.hidden_weight, eval_every=args.eval_every,
                          patience=args.patience, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                          progress=console.bars, quiet=console.quiet, seed=args.seed)
        except HealError as exc:
            raise CLIError(_one_line(str(exc))) from exc
        stage("save")
        if not report.is_main_process:  # the other DDP ranks hold the same weights: rank 0 writes
            return 0
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            _save(model, tmp)
            if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(tmp)
            record = {"model": args.model, "teacher": args.teacher, "method": method, "data": str(args.data),
                      "tokens": f"{how}", "eval_data": str(args.eval_data) if args.eval_data else None,
                      "steps": report.steps, "best_step": report.best_step, "stopped_early": report.stopped_early,
                      "resumed_from": report.resumed_from, "train_loss": report.train_loss,
                      "eval_loss": report.eval_loss, "eval_ppl": report.eval_ppl, "parameters": params}
            (tmp / "heal.json").write_text(_compact_json(record) + "\n")
            _swap_in(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    console.say(f"tokens: {how}")
    console.say(str(report))
    console.say(f"parameters: {params:,} (shape unchanged; adapters merged)")
    console.say(f"time: {time.perf_counter() - start:.1f} s")
    console.say(f"wrote {out}/ and {out / 'heal.json'}. Next: depgraph eval {out} --ppl FILE")
    return 0


# ---- render --------------------------------------------------------------------------------------


def cmd_render(args: argparse.Namespace, console: Console) -> int:
    import visualize
    from visualize.render import FORMATS

    spec = resolve(args.model)
    checks = [(args.output, tuple(FORMATS))] + ([(args.report, (".html", ".htm"))] if args.report else [])
    for target, suffixes in checks:
        if Path(target).suffix.lower() not in suffixes:
            raise CLIError(f"cannot tell the format of {target!r}: use one of {', '.join(suffixes)}")
    with console.stages("render", ["load", "trace", "draw"]) as stage:
        stage("load")
        model = _load(spec, meta=args.meta)
        if args.scope:
            names = [n for n, _ in model.named_modules() if n]
            if args.scope not in names:
                close = [n for n in names if args.scope in n][:3] or names[:3]
                raise CLIError(f"--scope {args.scope!r} is not a module of {type(model).__name__} "
                               f"(e.g. {', '.join(close)})")
        stage("trace")
        graph = _trace(model)
        stage("draw")
        written = [visualize.render(graph, args.output, scope=args.scope, level=args.level)]
        if args.report:
            written.append(visualize.report(graph, args.report, scope=args.scope))
    for path in written:
        console.say(f"wrote {path}")
    return 0


# ---- eval ----------------------------------------------------------------------------------------


def _ppl_source(text: str) -> Path:
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if text.lower() in ("wikitext", "wikitext-2", "wikitext2"):
        from .data import default_text_path

        try:
            return default_text_path("test")
        except FileNotFoundError as exc:
            raise CLIError(_one_line(str(exc))) from exc
    raise CLIError(f"--ppl: no such file: {text} (a text file, or 'wikitext' for WikiText-2 test)")


def _harness(args: argparse.Namespace, spec: ResolvedSpec, console: Console) -> None:
    """``--lm-eval FILE`` / ``--tasks``: the lm-evaluation-harness on the saved checkpoint (``--model hf``)."""
    from .evaluate import LM_EVAL_TASK, lm_eval

    if spec.directory is None:
        raise CLIError("--lm-eval/--tasks evaluate a saved model directory (lm-eval opens it with from_pretrained)")
    state = spec.directory / "depgraph.json"
    config = json.loads((spec.directory / "config.json").read_text())
    if state.is_file() and not json.loads(state.read_text()).get("hf_compatible", True) \
            and "auto_map" not in config:
        raise CLIError(f"{spec.directory} has per-layer sizes that its config.json cannot describe, so "
                       "from_pretrained (and lm-eval) cannot open it; evaluate it with --ppl instead")
    tasks = [t for t in (args.tasks or "").split(",") if t]
    try:
        results = lm_eval(spec.directory, args.lm_eval, tasks=tasks, limit=args.limit, batch_size=args.batch_size)
    except ImportError as exc:
        raise CLIError(_one_line(str(exc))) from exc
    for task, metrics in results.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "sample_len")
        source = f" (over {args.lm_eval})" if task == LM_EVAL_TASK else ""
        console.say(f"lm-eval {task}: {shown}{source}")


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    from .data import read_text
    from .evaluate import perplexity

    spec = resolve(args.model)
    _require_weights(spec)
    if args.ppl is None and args.lm_eval is None and not args.tasks:
        raise CLIError("nothing to evaluate: pass --ppl FILE, --lm-eval FILE and/or --tasks NAMES")
    if args.ppl is not None:
        source = _ppl_source(args.ppl)
        with console.stages("eval", ["load", "tokenize", "perplexity"]) as stage:
            stage("load")
            model = _load(spec, need_weights=True)
            limit = _max_positions(model)
            if limit is not None and args.context_length > limit:
                raise CLIError(f"--context-length {args.context_length} exceeds the model's {limit} positions")
            stage("tokenize")
            ids, how = _text_ids(read_text(source), _tokenizer(spec, args.tokenizer, model))
            stage("perplexity")
            try:
                result = perplexity(model, ids, context_length=args.context_length, max_tokens=args.max_tokens,
                                    batch_size=args.batch_size, progress=console.bars)
            except ValueError as exc:
                raise CLIError(f"cannot score {source}: {exc}", 1) from exc
        console.say(f"perplexity: {result.ppl:.4f}  (nll {result.nll:.4f} nats/token over {result.tokens:,} "
                    f"tokens, context length {result.context_length}; {source}, {how})")
    if args.lm_eval is not None or args.tasks:
        _harness(args, spec, console)
    return 0


# ---- demo ----------------------------------------------------------------------------------------


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() < 2:
        return float("nan")
    ra = a.double().argsort().argsort().double()
    rb = b.double().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float((ra.pow(2).sum() * rb.pow(2).sum()).sqrt())
    return float((ra * rb).sum()) / denom if denom else float("nan")


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    """trace -> groups -> score -> prune 20% of each kind -> verify -> save/reload -> render."""
    import visualize

    from .checkpoint import load_pretrained
    from .cut import count_parameters, zero_mask
    from .data import ByteTokenizer
    from .pruner import Pruner

    spec = resolve(args.model)
    _require_weights(spec)
    out = Path(args.out)
    start = time.perf_counter()
    ok = True
    names = ["trace", "groups", "score", "plan", "cut and verify", "save and reload", "render"]
    with console.stages("demo", names) as stage:
        stage("trace")
        console.header(f"1. trace: {args.model}")
        model = _load(spec, need_weights=True)
        t0 = time.perf_counter()
        graph = _trace(model)
        console.say(f"{type(model).__name__}: {count_parameters(model):,} parameters; torch.export + rules "
                    f"-> {graph!r} in {time.perf_counter() - t0:.1f} s")

        stage("groups")
        console.header("2. coupled groups (A: MLP neurons, B: attention heads, C: hidden channels)")
        rows = [[g.kind.value, g.name, g.size, len(g.members), f"{g.extra.get('params_per_unit', 0):,}",
                 ", ".join(f"{m.param.rsplit('.', 2)[-2]}[{m.dim}]" for m in g.members[:4])
                 + (", ..." if len(g.members) > 4 else "")] for g in graph.groups()]
        console.say(_table(rows, ["kind", "group", "units", "members", "params/unit", "e.g. member (dim)"],
                           right={2, 3, 4}))

        stage("score")
        tokenizer = _tokenizer(spec, None, model)
        calib, about = _calibration(model, tokenizer, None, args.samples, args.seq_len, seed=0, demo=True)
        console.header("3. score: l2 (weights) and taylor_first (|g*W|, calibration loss)")
        console.say(f"calibration: {about}")
        l2 = importance.score(graph, "l2", progress=False)
        taylor = importance.score(graph, "taylor_first", calib=calib, progress=console.bars)
        rows = [[g.kind.value, g.name, g.size, f"{_spearman(l2[g], taylor[g]):+.2f}",
                 " ".join(str(int(u)) for u in importance.ranking(taylor[g])[:5])] for g in graph.groups()]
        header = ["kind", "group", "units", "rank corr(l2, taylor)", "least important (taylor)"]
        console.say(_table(rows, header, right={2, 3}))

        stage("plan")
        console.header(f"4. plan: cut {args.ratio:.0%} of the units of every group (lowest taylor first)")
        plan = Pruner(graph, criterion=taylor, ratio=args.ratio, structure="all", progress=False).plan()
        rows = [[g.kind.value, g.name, f"{len(u)} / {g.size}",
                 " ".join(map(str, u[:8])) + (" ..." if len(u) > 8 else "")] for g, u in plan.items()]
        console.say(_table(rows, ["kind", "group", "cut", "unit ids"], right={2}))
        pristine = copy.deepcopy((graph, taylor, plan))  # drawn at the end, with the plan as an overlay

        stage("cut and verify")
        console.header("5. cut and verify (cut == zero-masking the same units, for A and B)")
        ids = torch.cat(calib[:2]) if len(calib) >= 2 else calib[0]
        ids = ids[:, : min(ids.shape[1], 64)]
        original = _logits(model, ids)
        params_before = count_parameters(model)
        for kind in "ABC":
            part = {g: u for g, u in plan.items() if g.kind.value == kind}
            if not part:
                console.say(f"{kind} ({KIND_NAMES[kind]}): nothing to cut")
                continue
            masked_graph, masked_part = copy.deepcopy((graph, part))  # the reference: same units zeroed
            zero_mask(masked_graph, masked_part)
            reference = _logits(masked_graph.model, ids)
            before = count_parameters(model)
            graph.prune(part)
            delta = float((_logits(model, ids) - reference).abs().max())
            units = sum(len(u) for u in part.values())
            line = (f"{kind} ({KIND_NAMES[kind]}): cut {units} units in {_plural(len(part), 'group')}, "
                    f"{before:,} -> {count_parameters(model):,} parameters; max |dlogit| cut vs zero-mask = "
                    f"{delta:.2e}")
            if kind == "C":
                line += " (C is approximate by nature: norms mix hidden channels)"
            elif delta <= EXACT_TOL:
                line += " ok"
            else:
                line += f" MISMATCH (> {EXACT_TOL:g})"
                ok = False
            console.say(line)
        after = count_parameters(model)
        pruned = _logits(model, ids)
        console.say(f"parameters: {params_before:,} -> {after:,} ({1 - after / params_before:.1%} removed); "
                    f"max |dlogit| vs the unpruned model = {float((pruned - original).abs().max()):.2e}")

        stage("save and reload")
        console.header("6. save and reload")
        model_dir = out / "model"
        state = _save(model, model_dir)
        vocab = vocab_size(model)
        if tokenizer is None and vocab is not None and vocab >= ByteTokenizer().vocab_size:
            tokenizer = ByteTokenizer()  # so that `depgraph eval` on the saved model uses the same ids
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(model_dir)
        reloaded = load_pretrained(model_dir)
        delta = float((_logits(reloaded, ids) - pruned).abs().max())
        fine = delta <= EXACT_TOL and count_parameters(reloaded) == after
        ok &= fine
        kind = ("plain from_pretrained works too" if state.get("hf_compatible")
                else "sizes in depgraph.json: reload with depgraph.load_pretrained")
        console.say(f"saved {model_dir}/ ({kind}); reloaded: {count_parameters(reloaded):,} parameters, "
                    f"max |dlogit| vs before saving = {delta:.2e} {'ok' if fine else 'MISMATCH'}")

        stage("render")
        console.header("7. render")
        g0, scores0, plan0 = pristine
        written = []
        try:
            written.append(visualize.render(g0, out / "graph.svg", scores=scores0, plan=plan0))
        except visualize.GraphvizNotFound as exc:
            written.append(visualize.render(g0, out / "graph.dot", scores=scores0, plan=plan0))
            console.say(f"no SVG ({_one_line(str(exc))}); wrote the .dot source instead")
        written.append(visualize.report(g0, out / "report.html", scores=scores0, plan=plan0,
                                        title=f"depgraph demo: {args.model}"))
        for path in written:
            console.say(f"wrote {path}")
    console.header("done")
    verdict = "all checks passed" if ok else "SOME CHECKS FAILED"
    console.say(f"{verdict} in {time.perf_counter() - start:.1f} s. "
                f"Next: depgraph inspect {model_dir}   |   depgraph eval {model_dir} --ppl FILE")
    return 0 if ok else 1


# ---- parser and entry point ------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """-q/--debug/--threads, accepted before and after the command (sub-parsers must not reset them)."""

    def default(value):
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("-q", "--quiet", action="store_true", default=default(False), help="no progress bars")
    parser.add_argument("--debug", action="store_true", default=default(False),
                        help="show the traceback of an error")
    parser.add_argument("--threads", type=_int_at_least(1), metavar="N", default=default(None),
                        help="torch CPU threads (default: torch's own, usually one per core)")


def build_parser() -> argparse.ArgumentParser:
    """The ``depgraph`` argument parser (one sub-parser per command)."""
    from .pruner import ALLOCATIONS

    demos = ", ".join(f"{name} ({spec.about})" for name, spec in DEMO_MODELS.items())
    model_help = ("a model directory (Hugging Face, or written by 'depgraph prune'), a config.json path, "
                  f"or a demo name: {', '.join(DEMO_MODELS)}")
    meta_help = "build on the meta device from the config (no weights)"
    parser = _Parser(prog=PROG, description="Find, score, cut and draw the coupled structures in transformer "
                     "models.", epilog=f"demo models: {demos}")
    _common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common(p, suppress=True)
        p.set_defaults(func=func)
        return p

    def number(p: argparse.ArgumentParser, flag: str, low: int, default: int | None, help_text: str,
               metavar: str = "N") -> None:
        p.add_argument(flag, type=_int_at_least(low), default=default, metavar=metavar, help=help_text)

    p = command("inspect", "trace a model and list its coupled groups", cmd_inspect)
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--meta", action="store_true", help=meta_help)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--kind", type=str.upper, choices=["A", "B", "C"], help="only groups of this kind")

    p = command("prune", "score and cut units, then save the pruned model and plan.json", cmd_prune)
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--ratio", type=_ratio, default=None, metavar="R", help="fraction of width to remove, in "
                   "(0, 1) (default 0.2; no width pruning when only --depth/--experts are given)")
    p.add_argument("--criterion", type=_criterion, default=None, metavar="NAME",
                   help="importance criterion (default taylor_first; l2 with --stream): "
                   + ", ".join(sorted(importance.CRITERIA)))
    p.add_argument("--aggregate", choices=importance.AGGREGATIONS, default="sum",
                   help="fold member scores into unit scores (default sum)")
    p.add_argument("--strategy", choices=["block", "channel", "all"], default="block",
                   help="block: MLP neurons + heads (A+B), channel: hidden channels (C), all (default block)")
    p.add_argument("--scope", choices=["local", "global"], default="local",
                   help="ratio per group (local) or ranked across the groups of a kind (global)")
    p.add_argument("--target", choices=["units", "params"], default="units",
                   help="the ratio counts units of the selected groups or parameters of the model")
    number(p, "--skip-first", 0, 0, "leave the first N layers alone")
    number(p, "--skip-last", 0, 0, "leave the last N layers alone")
    p.add_argument("--kind-ratios", type=_kind_ratios, default=None, metavar="K=R,...",
                   help="a budget per kind instead of --ratio/--strategy, e.g. A=0.3,B=0.25 (of each kind's "
                   "units, or of the model's parameters with --target params)")
    number(p, "--round-to", 1, None, "keep multiples of N units per width group (A, C)")
    number(p, "--head-round-to", 1, None, "keep multiples of N KV heads per attention group (B)")
    p.add_argument("--hf-loadable", action=argparse.BooleanOptionalAction, default=None,
                   help="only plans whose result plain from_pretrained loads (uniform widths, sizes the config "
                   "class accepts); default: on, unless --scope global or --skip-first/--skip-last")
    p.add_argument("--allow-partial", action="store_true",
                   help="cut as far as possible when the target is out of reach (default: refuse)")
    p.add_argument("--allocation", choices=ALLOCATIONS, default="uniform",
                   help="per-layer budgets with --target params: uniform (default), increasing (deeper layers "
                   "lose more), outlier (OWL: layers with more activation outliers lose less), sensitivity "
                   "(each layer's measured output error on the calibration data); non-uniform widths are saved "
                   "in depgraph's format (--hf-loadable off)")
    p.add_argument("--allocation-spread", type=_spread, default=0.5, metavar="S",
                   help="how far --allocation increasing/outlier moves layers from the mean, in [0, 1) "
                   "(default 0.5)")
    number(p, "--steps", 1, 1, "reach the ratio in N re-scored cuts (default 1)")
    p.add_argument("--calib", type=_existing_file, default=None, metavar="FILE",
                   help="calibration text file (default: valid.txt in $DEPGRAPH_DATA_DIR)")
    p.add_argument("--tokenizer", type=Path, default=None, metavar="DIR",
                   help="directory whose tokenizer reads the text (default: the model's own)")
    number(p, "--calib-samples", 1, 8, "calibration windows (default 8)")
    number(p, "--seq-len", 2, 128, "tokens per calibration window (default 128)", metavar="L")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of calibration and random scores")
    p.add_argument("--reconstruct", choices=["lsq", "bias"], default=None,
                   help="refit the layers reading the cut units on the calibration data (lsq: least squares; "
                   "bias: bias compensation)")
    p.add_argument("--sequential", action="store_true",
                   help="with --reconstruct: decoder layer by decoder layer (with --criterion obs, re-choose "
                   "each layer's units)")
    number(p, "--depth", 1, None, "first remove the N least important whole blocks (block importance: "
           "1 - cos(block input, output) on the calibration data)")
    p.add_argument("--experts", type=_ratio, default=None, metavar="R",
                   help="first remove this fraction of the routed experts of every MoE block (least routing "
                   "weight on the calibration data)")
    p.add_argument("--stream", action="store_true",
                   help="prune a safetensors checkpoint directory that need not fit in memory, one decoder layer "
                   "at a time (criteria l1, l2, random, wanda, activation; no --depth/--experts/--reconstruct)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")

    p = command("heal", "recover a pruned model: LoRA, distillation from the unpruned teacher, or both",
                cmd_heal)
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--data", type=_existing_file, required=True, metavar="FILE", help="training text file")
    p.add_argument("--tokenizer", type=Path, default=None, metavar="DIR",
                   help="directory whose tokenizer reads the text (default: the model's own)")
    p.add_argument("--teacher", default=None, metavar="MODEL", help="the unpruned model to distil from")
    p.add_argument("--method", choices=["lora", "kd", "lora+kd"], default=None,
                   help="default: lora+kd with --teacher, else lora")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (the healed model)")
    p.add_argument("--eval-data", type=_existing_file, default=None, metavar="FILE",
                   help="held-out text for periodic evaluation and early stopping")
    number(p, "--steps", 1, 100, "optimizer steps (default 100)")
    p.add_argument("--epochs", type=float, default=None, metavar="E", help="passes over --data instead of --steps")
    number(p, "--batch-size", 1, 8, "windows per device per step (default 8)")
    number(p, "--grad-accum", 1, 1, "gradient accumulation steps (default 1)")
    number(p, "--seq-len", 2, 128, "tokens per window (default 128)", metavar="L")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3 LoRA, 1e-4 KD)")
    p.add_argument("--scheduler", default="cosine", metavar="NAME",
                   help="transformers lr schedule: cosine (default), linear, constant_with_warmup, ...")
    p.add_argument("--warmup", type=float, default=0.1, metavar="W",
                   help="warmup: a fraction of the steps (< 1) or a step count (default 0.1)")
    number(p, "--lora-rank", 1, 8, "LoRA rank (default 8)", metavar="R")
    p.add_argument("--lora-alpha", type=float, default=16.0, metavar="A", help="LoRA alpha (default 16)")
    p.add_argument("--lora-targets", default=None, metavar="NAMES",
                   help="comma list of module names (default: every Linear layer but the output head)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="distillation temperature")
    p.add_argument("--ce-weight", type=float, default=None, metavar="W",
                   help="next-token loss weight (default 1 for lora, 0 with a teacher)")
    p.add_argument("--hidden-weight", type=float, default=0.0, metavar="W",
                   help="Minitron hidden-state loss weight (default 0)")
    number(p, "--eval-every", 1, None, "evaluate --eval-data every N steps")
    number(p, "--patience", 1, None, "stop after N evaluations without improvement (keeps the best)")
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR", help="keep resumable checkpoints here")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --checkpoint-dir")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed (data order, LoRA init)")

    p = command("render", "draw the dependency graph (SVG/PNG/PDF/DOT) and an HTML report", cmd_render)
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("-o", "--output", required=True, metavar="PATH",
                   help="diagram path; the suffix picks the format (.svg .png .pdf .dot)")
    p.add_argument("--scope", default=None, metavar="MODULE", help="only this module, e.g. model.layers.0")
    p.add_argument("--level", choices=["module", "neuron"], default="module",
                   help="drawing level (default module)")
    p.add_argument("--report", default=None, metavar="HTML", help="also write an HTML report here")
    p.add_argument("--meta", action="store_true", help=meta_help)

    p = command("eval", "perplexity of a causal LM on a text file", cmd_eval)
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--ppl", default=None, metavar="FILE", help="text file (or 'wikitext': WikiText-2 test)")
    p.add_argument("--lm-eval", type=_existing_file, default=None, metavar="FILE",
                   help="word perplexity of FILE with the lm-evaluation-harness (--model hf; pip install lm-eval)")
    p.add_argument("--tasks", default=None, metavar="NAMES",
                   help="comma list of lm-eval tasks to run too (their data must be available offline)")
    number(p, "--limit", 1, None, "lm-eval: at most N documents per task")
    number(p, "--context-length", 2, 128, "tokens per window (default 128)", metavar="L")
    number(p, "--max-tokens", 2, None, "score only the first N tokens")
    number(p, "--batch-size", 1, 8, "windows per forward pass (default 8)")
    p.add_argument("--tokenizer", type=Path, default=None, metavar="DIR",
                   help="directory whose tokenizer reads the text (default: the model's own)")

    p = command("demo", "trace, group, score, prune, verify, save and render a tiny model", cmd_demo)
    p.add_argument("--out", default=os.path.join("out", "demo"), metavar="DIR",
                   help="output directory (default out/demo)")
    p.add_argument("--model", default=DEFAULT_DEMO, metavar="MODEL",
                   help=f"MODEL to run on (default {DEFAULT_DEMO})")
    p.add_argument("--ratio", type=_ratio, default=0.2, metavar="R",
                   help="fraction of each group's units to cut (default 0.2)")
    number(p, "--samples", 1, 4, "calibration windows (default 4)")
    number(p, "--seq-len", 2, 64, "tokens per calibration window (default 64)", metavar="L")
    return parser


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, CLIError):
        return exc.code
    if isinstance(exc, (ModelSpecError, FileNotFoundError)):
        return 2
    return 1


def _message(exc: BaseException) -> str:
    if isinstance(exc, (CLIError, DepGraphError)):
        return _one_line(str(exc))
    return _one_line(f"{type(exc).__name__}: {exc}")


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``depgraph`` command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except CLIError as exc:
        _error(_message(exc))
        return exc.code
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    console = Console(quiet=args.quiet)
    if not console.bars:  # transformers' own bars (weight loading, shard writing): terminals only too
        with contextlib.suppress(ImportError):
            import transformers

            if args.quiet:
                transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()
        with contextlib.suppress(ImportError):
            import huggingface_hub.utils

            huggingface_hub.utils.disable_progress_bars()
    if not args.debug:  # graph warnings are printed by the commands themselves
        logging.getLogger("depgraph").addHandler(logging.NullHandler())
        logging.getLogger("depgraph").propagate = False
    try:
        return int(args.func(args, console) or 0)
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except BrokenPipeError:  # stdout closed early (`depgraph inspect ... | head`): stop quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        if args.debug:
            raise
        _error(_message(exc))
        return _exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
