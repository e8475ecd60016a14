"""Depth-independent analysis: analyse 3 identical blocks, replicate the result over all of them.

A deep transformer repeats one block: analysing 80 copies of it costs 80 times one, plus a
``torch.export`` of all 80. :func:`replicated_trace` instead

1. finds the block list (:func:`depgraph.depth.find_blocks`) and checks cheaply that the blocks repeat:
   module classes, plain attributes (``sliding_window``, ``attention_type``, ...; the layer index
   attributes excepted), hooks, parameter and buffer names, shapes and dtypes, the block's entry of
   every per-layer config list (``layer_types``) and of ``mlp_only_layers`` agree for all blocks, or
   with a period (alternating layer types) that divides their number at least 4 times: a *unit* is
   one period of blocks;
2. traces the model with its list temporarily holding only its first 3 units (the same module
   objects at the same indices, so their names are the real ones; the original list is put back in
   a ``finally``);
3. checks that unit 1's analysis is unit 0's with the layer indices renamed and unit 2's is unit 1's
   (groups, members, unit layout, parameter-channel components, frozen dims, ops, node names,
   couplings), that nothing runs between blocks outside them, that blocks read only the previous
   block (the code after them only the last one) and that FX names are numbered from the graph;
4. builds the full graph: unit 0 as traced, units 1..n-2 from unit 1, unit n-1 from unit 2,
   everything outside the blocks (embeddings, the final norm, the head) once; groups spanning units
   (the residual stream) get every unit's members. Group order, names, member order and FX node
   names follow the rules a full analysis uses, so the result is the one a full trace gives.

Before the trace, two checks look for layer-index-dependent behaviour the modules do not show: no
module class of a block may compare its layer index in ``forward`` (:func:`index_dependent_code`), and
one shapes-only run of the model with the blocks past the representatives stubbed must call every
block like the block that stands for it (:func:`block_call_mismatch`: same ``None`` arguments, tensor
shapes and dtypes, other values).

Anything that does not fit (blocks differ, too few of them, an op without a rule touching parameters,
a check failing) returns ``None`` and :func:`depgraph.trace` analyses the whole model. The limit:
index-dependent code the checks cannot see (a comparison in a helper method, ``torch.roll(x, layer_idx)``)
is caught only if units 0-2 already differ (see docs/concepts.md).
"""

from __future__ import annotations

import contextlib
import dis
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator

import networkx as nx
import numpy as np
import torch
from torch import nn

from . import depth
from . import groups as G
from .errors import DepGraphError
from .graph import DependencyGraph, GraphParts, add_axis_edges
from .trace import export

log = logging.getLogger("depgraph")

REPRESENTATIVES = 3  # units traced: the first, a steady-state one, the last
PRE, POST = -1, -2  # segments outside the blocks: before / after them
_SUFFIX = re.compile(r"(.*)_(\d+)$")  # torch.fx's de-duplicating suffix: ``linear_12``
_NO_USE = 1 << 30  # Member.order of a parameter dim no rule used
_LAYERISH = re.compile(r"(layers?|blocks?|idxs?|indices|index)$", re.I)  # config lists naming blocks


class Mismatch(Exception):
    """The representative analysis cannot be replicated (internal: leads to a full analysis)."""


# ---------------------------------------------------------------------------------------- identity


def _describe(value, shared: tuple) -> object:
    """A comparable stand-in for one module attribute."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return value if not isinstance(value, (torch.dtype, torch.device)) else str(value)
    if isinstance(value, (list, tuple)):
        return tuple(_describe(v, shared) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), repr(_describe(v, shared))) for k, v in value.items()))
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype))
    if any(value is s for s in shared):
        return "shared config"
    if hasattr(value, "to_dict"):  # a per-module config copy (non-uniform cut): its fields
        return ("config", repr(sorted(value.to_dict().items(), key=lambda kv: kv[0])))
    return ("object", getattr(value, "__qualname__", type(value).__qualname__))


def block_signature(block: nn.Module, shared: tuple = ()) -> tuple:
    """What makes two blocks analyse alike: classes, plain attributes (not the layer index), hooks,
    parameter and buffer names, shapes, dtypes."""
    out: list[object] = []
    for name, module in block.named_modules(remove_duplicate=False):
        attrs = tuple((k, _describe(v, shared)) for k, v in sorted(vars(module).items())
                      if not k.startswith("_") and k not in depth.INDEX_ATTRS)
        hooks = tuple(getattr(h, "__qualname__", type(h).__qualname__)
                      for table in (module._forward_hooks, module._forward_pre_hooks) for h in table.values())
        out.append((name, type(module).__module__, type(module).__qualname__, attrs, hooks))
    out += [("param", n, tuple(p.shape), str(p.dtype), p.requires_grad)
            for n, p in block.named_parameters(remove_duplicate=False)]
    out += [("buffer", n, tuple(b.shape), str(b.dtype)) for n, b in block.named_buffers(remove_duplicate=False)]
    return tuple(out)


def uniform_blocks(model: nn.Module) -> tuple[str, nn.ModuleList, int] | str:
    """``(path, blocks, period)`` when the model's blocks repeat with ``period`` (1: all identical; 2:
    alternating sliding / full attention, ...) and are worth replicating, else the reason."""
    try:
        path, blocks = depth.find_blocks(model)
    except DepGraphError as exc:
        return f"no single block list ({exc})"
    n = len(blocks)
    if n <= REPRESENTATIVES:
        return f"{n} blocks (replication needs more than {REPRESENTATIVES})"
    if len({id(block) for block in blocks}) != n:  # one module run at several depths (weight-shared layers)
        return f"a block of {path} appears several times in it"
    config = depth.owner_config(model, path)
    per_layer: list[tuple[str, object]] = []
    shared: tuple = tuple(c for c in (getattr(model, "config", None), config) if c is not None)
    if config is not None:
        for key, value in sorted(vars(config).items()):
            if isinstance(value, (list, tuple)) and len(value) == n:
                per_layer.append((key, value))
        for key, value in sorted(vars(config).items()):
            if _index_list(key, value, n):  # ``mlp_only_layers``, ``value_layers``: membership per block
                per_layer.append((key, [i in value for i in range(n)]))
    sigs = [(block_signature(block, shared), tuple((key, repr(value[i])) for key, value in per_layer))
            for i, block in enumerate(blocks)]
    kinds: dict[tuple, int] = {}
    seq = [kinds.setdefault(sig, len(kinds)) for sig in sigs]  # each block's kind, numbered by first sight
    for period in range(1, n // (REPRESENTATIVES + 1) + 1):
        if n % period == 0 and all(seq[i] == seq[i % period] for i in range(n)):
            return path, blocks, period
    odd = next((i for i in range(n) if seq[i] != seq[0]), 0)
    return (f"the blocks of {path} do not repeat with a period that divides {n} at least "
            f"{REPRESENTATIVES + 1} times (block {odd} differs from block 0)")


def _index_list(key: str, value: object, n: int) -> bool:
    """Whether the config field ``key`` names blocks by index (``mlp_only_layers=[3, 7]``): a non-empty
    list, tuple or set of ints in ``range(n)`` under a name that says layers / indices."""
    if key in depth.INDEX_LISTS:
        return isinstance(value, (list, tuple, set, frozenset))
    return (isinstance(value, (list, tuple, set, frozenset)) and bool(value) and _LAYERISH.search(key) is not None
            and "token" not in key
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n for v in value))


def index_dependent_code(block: nn.Module) -> str | None:
    """A module of ``block`` whose ``forward`` compares a layer-index attribute (``if self.layer_idx >= k``,
    ``self.layer_idx % 2``, ``self.layer_idx in ...``), else ``None``: such a block may compute differently
    at a depth the representatives do not reach, with no visible difference in its modules."""
    seen: set[type] = set()
    for name, module in block.named_modules():
        cls = type(module)
        if cls in seen:
            continue
        seen.add(cls)
        code = getattr(getattr(cls, "forward", None), "__code__", None)
        if code is not None and _compares_index(code):
            return f"{cls.__qualname__}.forward ({name or 'the block'}) compares its layer index"
    return None


def _compares_index(code) -> bool:
    """Bytecode scan: a layer-index attribute load followed, within a few instructions and before a store
    or a jump, by a comparison, a membership test or a modulo (``+ 1`` scalings and the index passed to a
    cache pass; a comparison of a call's result with the index as argument is taken as one)."""
    instructions = list(dis.get_instructions(code))
    for i, ins in enumerate(instructions):
        if ins.opname.startswith("LOAD_ATTR") and ins.argval in depth.INDEX_ATTRS:
            for nxt in instructions[i + 1:i + 9]:
                if nxt.opname in ("COMPARE_OP", "CONTAINS_OP") or (
                        nxt.opname == "BINARY_OP" and "%" in str(nxt.argrepr)):
                    return True
                if nxt.opname.startswith(("STORE", "RETURN", "POP_JUMP", "UNPACK", "JUMP")):
                    break
    return any(_compares_index(c) for c in code.co_consts if hasattr(c, "co_code"))


def block_call_mismatch(model: nn.Module, inputs, blocks: nn.ModuleList, period: int) -> str | None:
    """Run the model's forward once with every block past the representatives stubbed (it returns what
    the block standing for it returned) and compare how each block is called (which arguments are
    ``None``, tensor shapes and dtypes, other values) with the call of the block that stands for it in
    the replication. ``None`` when all agree, else the reason.

    This catches a parent loop that treats some layers apart (``value_embeds if i in special else None``,
    KV sharing from layer ``k`` on, a last-layer test written against ``config.num_hidden_layers``). The
    representatives run under fake tensors (shapes only, as ``torch.export`` runs them), or eagerly when
    fake tensors cannot run them; RNG, buffers and grads are left as they were."""
    n = len(blocks) // period
    traced = REPRESENTATIVES * period

    def stand_in(i: int) -> int:
        unit = i // period
        t = 0 if unit == 0 else (REPRESENTATIVES - 1 if unit == n - 1 else 1)
        return t * period + i % period

    calls: list[tuple[int, object]] = []
    outputs: dict[int, object] = {}
    saved: dict[int, object] = {}

    def stub(i: int, forward: Callable) -> Callable:
        def run(*args, **kwargs):
            calls.append((i, _call_signature((args, kwargs), i)))
            if i < traced:
                outputs[i] = forward(*args, **kwargs)
                return outputs[i]
            if stand_in(i) not in outputs:
                raise Mismatch(f"block {i} ran before block {stand_in(i)}")
            return outputs[stand_in(i)]
        return run

    # shapes only first (as torch.export runs it: free, works on meta weights); a model whose traced path
    # fake tensors cannot run (an MoE's grouped matmul) runs eagerly on real weights
    on_meta = any(p.is_meta for p in model.parameters())
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})  # RNGs kept
    failure = ""
    for fake in (True, False) if not on_meta else (True,):
        calls.clear()
        outputs.clear()
        buffers = [(b, b.detach().clone()) for b in model.buffers() if not b.is_meta]
        try:
            for i, block in enumerate(blocks):
                if "forward" in vars(block):  # an instance-level forward (accelerate hooks): put back after
                    saved[i] = vars(block)["forward"]
                vars(block)["forward"] = stub(i, block.forward)
            args, kwargs = inputs
            with torch.random.fork_rng(devices=cuda), torch.no_grad(), _fake(fake):
                model(*args, **kwargs)
            failure = ""
            break
        except Mismatch as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001  a forward we cannot run: its calls are unverified
            failure = f"the block calls could not be checked ({type(exc).__name__}: {exc})"
        finally:
            for i, block in enumerate(blocks):
                vars(block).pop("forward", None)
                if i in saved:
                    vars(block)["forward"] = saved.pop(i)
            with torch.no_grad():
                for b, copy in buffers:  # a forward may update statistics (batch norm in training mode)
                    b.copy_(copy)
    if failure:
        return failure
    order = [i for i, _ in calls]
    if order != list(range(len(blocks))):
        return f"the blocks are not called once each, in order (calls: {order[:12]}...)"
    sigs = dict(calls)
    for i in range(len(blocks)):
        if sigs[i] != sigs[stand_in(i)]:
            return f"block {i} is called unlike block {stand_in(i)}, which stands for it"
    return None


@contextlib.contextmanager
def _fake(enabled: bool) -> Iterator[None]:
    """Shapes only (as ``torch.export`` runs a model): no compute, works on ``meta`` weights. Torch's
    own error log of an op fake tensors cannot run is muted: the caller retries eagerly."""
    if not enabled:
        yield
        return
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    torch_log = logging.getLogger("torch._subclasses.fake_tensor")
    was = torch_log.disabled
    torch_log.disabled = True
    try:
        with FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv()):
            yield
    finally:
        torch_log.disabled = was


def _call_signature(value, index: int) -> object:
    """What a block call passes, as comparable data: tensors by shape and dtype, the block's own index
    as a token, objects by class."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, float)):
        return value
    if isinstance(value, int):
        return "<index>" if value == index else value
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype))
    if isinstance(value, (list, tuple)):
        return tuple(_call_signature(v, index) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), repr(_call_signature(v, index))) for k, v in value.items()))
    return ("object", type(value).__qualname__)


@contextlib.contextmanager
def only_blocks(model: nn.Module, path: str, keep: int) -> Iterator[None]:
    """The model with its block list at ``path`` holding only its first ``keep`` blocks (same objects);
    the original list is back afterwards, whatever happens (also on KeyboardInterrupt)."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    original = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList([original[i] for i in range(keep)]))
    try:
        yield
    finally:
        setattr(parent, attr, original)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The representative analysis' warnings are re-derived for the whole model: do not log them twice."""
    was = log.disabled
    log.disabled = True
    try:
        yield
    finally:
        log.disabled = was


def replicated_trace(model: nn.Module, inputs) -> DependencyGraph | None:
    """The model's graph from 3 representative units of blocks, or ``None`` (then trace it whole)."""
    found = uniform_blocks(model)
    if isinstance(found, str):
        log.debug("analysing every block: %s", found)
        return None
    path, blocks, period = found
    n = len(blocks) // period  # replicated units: ``period`` consecutive blocks
    why = index_dependent_code(blocks[0]) or block_call_mismatch(model, inputs, blocks, period)
    if why is not None:
        log.info("depgraph: analysing all %d blocks of %s: %s", len(blocks), path, why)
        return None
    try:
        with only_blocks(model, path, REPRESENTATIVES * period), _quiet():
            reduced = DependencyGraph(model, export(model, inputs), inputs, record=True)
    except Exception as exc:  # noqa: BLE001  the full analysis raises (or succeeds) on its own terms
        log.debug("analysing every block: the representative trace failed (%s)", exc)
        return None
    try:
        return _Replicator(model, inputs, reduced, path, n, period).graph()
    except Mismatch as exc:
        log.info("depgraph: analysing all %d blocks of %s: %s", len(blocks), path, exc)
    except Exception as exc:  # noqa: BLE001  a replication bug must not cost the user a correct graph
        log.warning("depgraph: block replication failed (%s: %s); analysing all %d blocks instead. Please "
                    "report the model class.", type(exc).__name__, exc, len(blocks))
    return None


# ------------------------------------------------------------------------------------- replication


class _Replicator:
    """Turns the analysis of ``REPRESENTATIVES`` units into the analysis of ``n``. A unit is ``period``
    consecutive blocks (one block when they are all alike); below, "block" ``j`` means unit ``j`` and
    the list index of block ``i`` is renumbered through its unit (:meth:`index`)."""

    def __init__(self, model: nn.Module, inputs, reduced: DependencyGraph, path: str, n: int, period: int = 1):
        self.model, self.inputs, self.path, self.n, self.r = model, inputs, path, n, REPRESENTATIVES
        self.period = period
        self.reduced = reduced
        self.rec = reduced.record
        self.parts = reduced.parts()
        if self.parts.op_warnings:
            raise Mismatch("ops without a rule touch parameters (their reach depends on depth)")
        esc = re.escape(path)
        self._dotted = re.compile(rf"(?<![\w.]){esc}\.(\d+)(?!\d)")  # one group: split() keeps the numbers
        self._block_of = re.compile(rf"{esc}\.(\d+)(?:\.|$)")
        self._placeholder = re.compile(rf"^([a-z]_){re.escape(path.replace('.', '_'))}_(\d+)_")
        self._pieces: dict[str, list[str]] = {}
        self._node_info: dict[str, tuple] = {}
        self._keys: dict[str, tuple[str, str]] = {}
        self._segment_nodes()
        self._segment_params()

    # ---- segments ------------------------------------------------------------------------------
    def block(self, name: str) -> int | None:
        """The unit whose blocks hold ``name`` (a module path or parameter name), else ``None``."""
        m = self._block_of.match(name)
        return int(m.group(1)) // self.period if m else None

    def index(self, i: int, bm: Callable[[int], int]) -> int:
        """List index ``i`` renumbered by the unit map ``bm``."""
        return bm(i // self.period) * self.period + i % self.period

    def _segment_nodes(self) -> None:
        nodes = self.rec.nodes
        seg = [PRE] * len(nodes)
        calls = [i for i, node in enumerate(nodes) if node[1] == "call_function"]
        for i, (name, op, _, where, tensor) in enumerate(nodes):
            if op == "placeholder":
                if name in self.rec.constant_users and any(self.block(u) is not None
                                                           for u in self.rec.constant_users[name]):
                    raise Mismatch(f"a block reads the lifted constant {name}")
                b = self.block(tensor) if tensor else None
                seg[i] = PRE if b is None else b
            elif op == "call_function":
                b = self.block(where)
                seg[i] = PRE if b is None else b
            else:
                seg[i] = POST
        in_block = [i for i in calls if seg[i] >= 0]
        if not in_block:
            raise Mismatch("no op ran inside the blocks")
        first, last = in_block[0], in_block[-1]
        for i in calls:
            if seg[i] < 0:
                if first < i < last:
                    raise Mismatch(f"op {nodes[i][0]} runs between blocks, outside them")
                seg[i] = PRE if i < first else POST
        runs = [s for k, s in enumerate(seg[i] for i in calls) if k == 0 or s != seg[calls[k - 1]]]
        if [s for s in runs if s >= 0] != list(range(self.r)):
            raise Mismatch("the blocks' ops are not contiguous, one block after the other")
        self._check_reads(seg)
        self._check_numbering(seg)
        self.seg = seg
        self.seg_of_name = {node[0]: s for node, s in zip(nodes, seg)}
        self.is_placeholder = {node[0] for node in nodes if node[1] == "placeholder"}
        by_block = [[i for i in calls if seg[i] == b] for b in range(self.r)]
        self.per_block = Counter(self._split(nodes[i][0])[0] for i in by_block[1])
        self.calls_per_block = len(by_block[1])
        holders = [sum(1 for i, node in enumerate(nodes) if node[1] == "placeholder" and seg[i] == b)
                   for b in range(self.r)]
        if len(set(holders)) != 1 or len({len(b) for b in by_block}) != 1:
            raise Mismatch("the blocks have different numbers of ops or tensors")
        self.holders_per_block = holders[0]
        for b in range(self.r - 1):
            for i, j in zip(by_block[b], by_block[b + 1]):
                bm = self._shift(b, b + 1)
                if (self.node_name(nodes[i][0], bm, within=True) != nodes[j][0] or nodes[i][2] != nodes[j][2]
                        or self.text(nodes[i][3], bm) != nodes[j][3]):
                    raise Mismatch(f"block {b + 1}'s op {nodes[j][0]} is not block {b}'s {nodes[i][0]}")

    def _check_reads(self, seg: list[int]) -> None:
        """Blocks talk only to the next one: a block reads its own values, the previous block's and those
        computed before the blocks; after them, only the last block's values are read. A later block
        reading an earlier one's values (cross-layer KV or value sharing) or the head reading every block's
        output (a stack of all hidden states) would change with depth."""
        nodes, at = self.rec.nodes, {node[0]: i for i, node in enumerate(self.rec.nodes)}
        for i, reads in enumerate(self.rec.inputs):
            s = seg[i]
            for name in reads:
                t = seg[at[name]]
                if t < 0:
                    continue
                if (s >= 0 and t not in (s, s - 1)) or (s < 0 and t != self.r - 1):
                    where = f"block {s}" if s >= 0 else "the code after the blocks"
                    raise Mismatch(f"{where} reads {name} of block {t} ({nodes[i][0]})")

    def _check_numbering(self, seg: list[int]) -> None:
        """torch.fx numbers each op name in sequence (``getitem``, ``getitem_1``, ...); the full trace's
        names are derived from that. A name whose first number is past 1 (1: the base is a Python builtin,
        ``pow_1``) had numbers taken by a pass whose graph was discarded (PhiMoE's router: by every block,
        so the offset grows with depth)."""
        first: dict[str, int] = {}
        inside: set[str] = set()
        for (name, op, *_), s in zip(self.rec.nodes, seg):
            if op != "call_function":
                continue
            base, num = self._split(name)
            first.setdefault(base, num)
            if s >= 0:
                inside.add(base)
        late = sorted(base for base in inside if first[base] > 1)
        if late:
            raise Mismatch(f"FX names numbered from outside the graph ({late[0]}_{first[late[0]]} comes first)")

    def _segment_params(self) -> None:
        names = list(self.parts.param_shapes)
        blocks = [self.block(p) for p in names]
        inside = [k for k, b in enumerate(blocks) if b is not None]
        if not inside:
            raise Mismatch("no parameter inside the blocks")
        self.param_seg: dict[str, int] = {}
        for k, (p, b) in enumerate(zip(names, blocks)):
            if b is None and inside[0] < k < inside[-1]:
                raise Mismatch(f"parameter {p} sits between the blocks' parameters")
            self.param_seg[p] = b if b is not None else (PRE if k < inside[0] else POST)

    # ---- renaming ----------------------------------------------------------------------------------
    @staticmethod
    def _split(name: str) -> tuple[str, int]:
        m = _SUFFIX.match(name)
        return (m.group(1), int(m.group(2))) if m else (name, 0)

    def _shift(self, template: int, k: int) -> Callable[[int], int]:
        return lambda j: k + (j - template)

    def mapping(self, seg: int, k: int | None) -> Callable[[int], int]:
        """Block renumbering for an item of segment ``seg`` placed as block ``k`` (``None`` outside blocks)."""
        if seg >= 0:
            return self._shift(seg, k)
        if seg == POST:
            return lambda j: j + self.n - self.r
        return lambda j: j

    def text(self, s: str, bm: Callable[[int], int]) -> str:
        """``s`` with every ``<blocks>.<j>`` renumbered."""
        if not s or self.path not in s:
            return s
        pieces = self._pieces.get(s)
        if pieces is None:  # literal text and block numbers, alternating (parsed once per string)
            pieces = self._pieces[s] = self._dotted.split(s)
        out = [pieces[0]]
        for i in range(1, len(pieces), 2):
            out.append(f"{self.path}.{self.index(int(pieces[i]), bm)}")
            out.append(pieces[i + 1])
        return "".join(out)

    def node_name(self, name: str, bm: Callable[[int], int], within: bool = False) -> str:
        """The FX name the node ``name`` has in the full trace (``within``: in the reduced one, renumbered)."""
        info = self._node_info.get(name)
        if info is None:
            seg = self.seg_of_name.get(name)
            if seg is None:
                raise Mismatch(f"unknown node {name}")
            base, num = self._split(name)
            info = self._node_info[name] = (seg, name in self.is_placeholder, base, num, self.per_block.get(base, 0))
        seg, placeholder, base, num, per_block = info
        if placeholder:
            if seg < 0:
                return name
            return self._placeholder.sub(
                lambda m: f"{m.group(1)}{self.path.replace('.', '_')}_{self.index(int(m.group(2)), bm)}_", name)
        if seg >= 0:
            delta = bm(seg) - seg
        elif seg == POST and not within:
            delta = self.n - self.r
        else:
            return name
        num += delta * per_block
        return base if num == 0 else f"{base}_{num}"

    def key(self, key: str, bm: Callable[[int], int], within: bool = False) -> str:
        """An ``nx`` node key (``param:<name>:<dim>`` or ``<node>[.<part>]:<dim>``) renamed."""
        if key.startswith("param:"):
            return self.text(key, bm)
        parsed = self._keys.get(key)
        if parsed is None:
            head, _, dim = key.rpartition(":")
            node, dot, part = head.partition(".")
            parsed = self._keys[key] = (node, f"{dot}{part}:{dim}")
        return self.node_name(parsed[0], bm, within) + parsed[1]

    def order(self, order: int, bm: Callable[[int], int], within: bool = False) -> int:
        """A ``ctx.order`` (node position) in the full trace."""
        if order >= _NO_USE:
            return order
        seg = self.seg[order - 1]
        if self.rec.nodes[order - 1][1] != "call_function":
            raise Mismatch("a parameter use outside an op")
        shift = 0 if within else (self.n - self.r) * self.holders_per_block
        if seg >= 0:
            shift += (bm(seg) - seg) * self.calls_per_block
        elif seg == POST and not within:
            shift += (self.n - self.r) * self.calls_per_block
        return order + shift

    # ---- expansion -------------------------------------------------------------------------------
    def template(self, k: int) -> int:
        return 0 if k == 0 else (self.r - 1 if k == self.n - 1 else 1)

    def expand(self, items: list, segs: list[int], emit: Callable) -> list:
        """``items`` (in order, segment ``segs[i]``) with each run of blocks 0..r-1 replaced by n blocks:
        ``emit(item, seg, k)`` renames one item for block ``k`` (``k=None`` outside the blocks)."""
        runs: list[tuple[int, list]] = []
        for item, s in zip(items, segs):
            if runs and runs[-1][0] == s:
                runs[-1][1].append(item)
            else:
                runs.append((s, [item]))
        out: list = []
        i = 0
        while i < len(runs):
            s, chunk = runs[i]
            if s < 0:
                out.extend(emit(item, s, None) for item in chunk)
                i += 1
                continue
            if [runs[i + b][0] if i + b < len(runs) else None for b in range(self.r)] != list(range(self.r)):
                raise Mismatch("block items are not in block order")
            templates = [runs[i + b][1] for b in range(self.r)]
            for k in range(self.n):
                t = self.template(k)
                out.extend(emit(item, t, k) for item in templates[t])
            i += self.r
        return out

    def check_alike(self, items: list, segs: list[int], canon: Callable, what: str, start: int = 0) -> None:
        """Block b+1's items are block b's renamed (for b from ``start``)."""
        per = [[x for x, s in zip(items, segs) if s == b] for b in range(self.r)]
        for b in range(start, self.r - 1):
            bm = self._shift(b, b + 1)
            if len(per[b]) != len(per[b + 1]) or any(canon(x, bm) != canon(y, None)
                                                     for x, y in zip(per[b], per[b + 1])):
                raise Mismatch(f"block {b + 1}'s {what} differ from block {b}'s")

    # ---- the parts ---------------------------------------------------------------------------------
    def graph(self) -> DependencyGraph:
        parts = self.parts
        groups, group_map = self._groups()
        labels, comp_group, comp_unit, param_ids = self._labels(group_map)
        params = list(parts.param_shapes)
        psegs = [self.param_seg[p] for p in params]
        param_shapes = dict(self.expand(list(parts.param_shapes.items()), psegs,
                                        lambda it, s, k: (self.text(it[0], self.mapping(s, k)), it[1])))
        self.check_alike(params, psegs, lambda p, bm: self.text(p, bm) if bm else p, "parameters")
        buffers = self._names(parts.buffers, params, psegs)
        experts = self._names(parts.expert_params, params, psegs)
        frozen_items = list(parts.frozen.items())
        fsegs = [self.param_seg[p] for (p, _), _ in frozen_items]
        # the reason of a dim is that of the first op that froze its first channel. Channels shared with
        # other blocks or the ends keep that first op: blocks 0..r-2 are the full model's first blocks, the
        # last representative is its last block. A block's own channels were frozen in that block.
        def first(j: int) -> int:
            return j if j < self.r - 1 else self.n - 1

        def reason_map(item, s: int, bm):
            return bm if s >= 0 and not self.shared_first[item] else first

        self.check_alike(frozen_items, fsegs, lambda it, bm: (self.text(it[0][0], bm), it[0][1], self.text(
            it[1], bm if not self.shared_first[it[0]] else (lambda j: j))) if bm else
                         (it[0][0], it[0][1], it[1]), "frozen dims")
        frozen = dict(self.expand(frozen_items, fsegs, lambda it, s, k: (
            (self.text(it[0][0], self.mapping(s, k)), it[0][1]),
            self.text(it[1], reason_map(it[0], s, self.mapping(s, k))))))
        unknown_ops = self._unknown_ops()
        graph_nx = self._nx(groups, group_map)
        per_block = Counter(node[2] for node, s in zip(self.rec.nodes, self.seg)
                            if s == 1 and node[1] == "call_function")
        ops = Counter(parts.ops)
        for op, count in per_block.items():
            ops[op] += count * (self.n - self.r)
        n_nodes = parts.n_nodes + (self.n - self.r) * (self.calls_per_block + self.holders_per_block)
        out = GraphParts(groups=groups, labels=labels, comp_group=comp_group, comp_unit=comp_unit,
                         param_ids=param_ids, param_shapes=param_shapes, buffers=buffers, expert_params=experts,
                         op_warnings=[], unknown_ops=unknown_ops, frozen=frozen, nx=graph_nx, n_nodes=n_nodes,
                         ops=ops)
        self._check_model(param_shapes)
        return DependencyGraph.assemble(self.model, self.inputs, out)

    def _check_model(self, param_shapes: dict[str, tuple[int, ...]]) -> None:
        """Every replicated tensor is one of the full model's, with its shape."""
        tensors = {**dict(self.model.named_parameters(remove_duplicate=False)),
                   **dict(self.model.named_buffers(remove_duplicate=False))}
        for name, shape in param_shapes.items():
            if name not in tensors or tuple(tensors[name].shape) != tuple(shape):
                raise Mismatch(f"replicated tensor {name} is not the model's")

    def _names(self, names: set[str], order: list[str], segs: list[int]) -> set[str]:
        picked = [p for p in order if p in names]
        psegs = [self.param_seg[p] for p in picked]
        self.check_alike(picked, psegs, lambda p, bm: self.text(p, bm) if bm else p, "tensor sets")
        return set(self.expand(picked, psegs, lambda p, s, k: self.text(p, self.mapping(s, k))))

    def _unknown_ops(self) -> list[tuple[str, str]]:
        marks = np.array([m[1] for m in self.rec.marks], dtype=np.int64)
        entries = list(self.parts.unknown_ops)
        node_of = np.searchsorted(marks, np.arange(len(entries)), side="right") - 1
        segs = [self.seg[i] for i in node_of.tolist()]
        self.check_alike(entries, segs, lambda e, bm: (e[0], self.text(e[1], bm)) if bm else e, "ops without a rule")
        return self.expand(entries, segs, lambda e, s, k: (e[0], self.text(e[1], self.mapping(s, k))))

    # ---- groups ---------------------------------------------------------------------------------------
    def _member(self, m: G.Member, bm, within: bool = False) -> G.Member:
        return G.Member(self.text(m.param, bm), m.dim, m.unit_of_index if within else m.unit_of_index.copy(),
                        m.role, self.order(m.order, bm, within), m.is_buffer)

    def _member_seg(self, m: G.Member) -> int:
        return self.param_seg[m.param]

    @staticmethod
    def _member_key(m: G.Member) -> tuple:
        return (m.param, m.dim, m.role, m.order, m.is_buffer, m.unit_of_index.tobytes())

    def _rms(self, group: G.Group, blocks: Callable[[int], list[Callable[[int], int]]]) -> list[str] | None:
        paths = group.extra.get("rms_norms")
        if paths is None:
            return None
        out: set[str] = set()
        for p in paths:
            b = self.block(p)
            if b is None:
                out.add(p)
            else:
                out.update(self.text(p, bm) for bm in blocks(b))
        return sorted(out)

    def _groups(self) -> tuple[list[G.Group], dict[tuple[int, int | None], G.Group]]:
        parts = self.parts
        local: list[list[int]] = [[] for _ in range(self.r)]
        global_: list[int] = []
        for gi, g in enumerate(parts.groups):
            segs = {self._member_seg(m) for m in g.members}
            if len(segs) == 1 and min(segs) >= 0:
                local[min(segs)].append(gi)
            else:
                global_.append(gi)

        def canon(g: G.Group, bm) -> tuple:
            members = [self._member(m, bm, within=True) if bm else m for m in g.members]
            rms = self._rms(g, lambda b: [bm]) if bm else g.extra.get("rms_norms")
            return (g.kind, self.text(g.name, bm) if bm else g.name, g.size, g.exact, g.frozen_units,
                    bool(g.extra.get("latent")), rms, [self._member_key(m) for m in members])

        for b in range(self.r - 1):
            bm = self._shift(b, b + 1)
            if len(local[b]) != len(local[b + 1]) or any(
                    canon(parts.groups[x], bm) != canon(parts.groups[y], None) for x, y in zip(local[b], local[b + 1])):
                raise Mismatch(f"block {b + 1}'s groups differ from block {b}'s")
            for gi in global_:
                ms = parts.groups[gi].members
                here = [self._member_key(self._member(m, bm, within=True)) for m in ms if self._member_seg(m) == b]
                there = [self._member_key(m) for m in ms if self._member_seg(m) == b + 1]
                if here != there:
                    raise Mismatch(f"group {parts.groups[gi].name} reaches block {b + 1} unlike block {b}")

        self.local = local
        self.local_pos = {gi: (b, i) for b in range(self.r) for i, gi in enumerate(local[b])}
        made: dict[tuple[int, int | None], G.Group] = {}

        def every_block(b: int) -> list[Callable[[int], int]]:
            return [self._shift(self.template(k), k) for k in range(self.n) if self.template(k) == b]

        for gi in global_:
            g = parts.groups[gi]
            members = []
            for m in g.members:
                s = self._member_seg(m)
                if s < 0:
                    members.append(self._member(m, self.mapping(s, None)))
                else:
                    members.extend(self._member(m, bm) for bm in every_block(s))
            made[(gi, None)] = self._group(g, members, self._rms(g, every_block))
        for k in range(self.n):
            t = self.template(k)
            bm = self._shift(t, k)
            for gi in local[t]:
                g = parts.groups[gi]
                made[(gi, k)] = self._group(g, [self._member(m, bm) for m in g.members],
                                            self._rms(g, lambda b, bm=bm: [bm]))
        groups = list(made.values())
        axis_index: dict[tuple[str, int], int] = {}
        psegs = [self.param_seg[p] for p in parts.param_shapes]
        names = self.expand(list(parts.param_shapes.items()), psegs,
                            lambda it, s, k: (self.text(it[0], self.mapping(s, k)), len(it[1])))
        for name, ndim in names:
            for d in range(ndim):
                axis_index[(name, d)] = len(axis_index)

        def first(g: G.Group) -> int:
            return min((axis_index[(m.param, m.dim)] << 32) + int(np.argmax(m.unit_of_index >= 0))
                       for m in g.members if (m.unit_of_index >= 0).any())

        groups.sort(key=first)
        for g in groups:
            g.members.sort(key=lambda m: (m.order, m.param, m.dim))
        G.name_groups(groups)
        self.final_groups = groups
        return groups, made

    @staticmethod
    def _group(g: G.Group, members: list[G.Member], rms: list[str] | None) -> G.Group:
        extra = {k: v for k, v in g.extra.items() if k not in ("params_per_unit", "rms_norms")}
        if rms is not None:
            extra["rms_norms"] = rms
        return G.Group(g.kind, g.name, g.size, members, g.exact, 0, g.frozen_units, extra)

    # ---- channel components ------------------------------------------------------------------------
    def _labels(self, made: dict[tuple[int, int | None], G.Group]):
        parts = self.parts
        keys = list(parts.param_ids)
        segs = [self.param_seg[p] for p, _ in keys]
        labels_r = parts.labels
        n_comp = int(labels_r.max()) + 1 if labels_r.size else 0
        unset, glob = -3, -2
        state = np.full(n_comp, unset, dtype=np.int64)
        outside = [labels_r[parts.param_ids[key]] for key, s in zip(keys, segs) if s < 0]
        if outside:
            state[np.concatenate(outside)] = glob
        per_block = []
        for b in range(self.r):
            comps = [labels_r[parts.param_ids[key]] for key, s in zip(keys, segs) if s == b]
            c = np.concatenate(comps) if comps else np.zeros(0, dtype=np.int64)
            cur = state[c]
            state[c[(cur != unset) & (cur != b)]] = glob
            fresh = c[state[c] == unset]
            state[fresh] = b
            per_block.append(c)
        # does the first channel of each dim belong to a component outside one block (frozen reasons)
        self.shared_first = {key: bool(state[labels_r[ids[0]]] == glob) if ids.size else False
                             for key, ids in parts.param_ids.items()}
        gidx = np.full(n_comp, -1, dtype=np.int64)
        globals_ = np.flatnonzero(state == glob)
        gidx[globals_] = np.arange(globals_.size)
        patterns, local_comps = [], []
        for b, c in enumerate(per_block):
            is_local = state[c] == b
            uniq, first_at = np.unique(c[is_local], return_index=True)
            comps_in_order = uniq[np.argsort(first_at, kind="stable")]
            local_idx = np.full(n_comp, -1, dtype=np.int64)
            local_idx[comps_in_order] = np.arange(comps_in_order.size)
            patterns.append(np.where(is_local, local_idx[c], -(gidx[c] + 1)))
            local_comps.append(comps_in_order)
        if any(not np.array_equal(patterns[0], p) for p in patterns[1:]):
            raise Mismatch("the blocks' parameter channels couple differently")
        n_glob, n_local = int(globals_.size), int(local_comps[0].size)
        base = [np.where(p >= 0, n_glob + p, -(p + 1)) for p in patterns]
        is_local = [p >= 0 for p in patterns]
        # the full model's parameter dims, in trace order, and their channel components
        sizes = self.expand([(key, int(parts.param_ids[key].size)) for key in keys], segs,
                            lambda it, s, k: ((self.text(it[0][0], self.mapping(s, k)), it[0][1]), it[1]))
        span: list[tuple[int, int]] = []  # where each dim sits in its block's pattern
        filled = [0] * self.r
        for key, s in zip(keys, segs):
            size = int(parts.param_ids[key].size)
            if s >= 0:
                span.append((filled[s], filled[s] + size))
                filled[s] += size
            else:
                span.append((0, 0))

        def chunk(i: int, s: int, k: int | None) -> np.ndarray:
            if s < 0:
                return gidx[labels_r[parts.param_ids[keys[i]]]]
            a, b = span[i]
            return base[s][a:b] + is_local[s][a:b] * (k * n_local)

        chunks = self.expand(list(range(len(keys))), segs, chunk)
        labels = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
        ids = np.arange(labels.size, dtype=np.int64)
        param_ids: dict[tuple[str, int], np.ndarray] = {}
        at = 0
        for key, size in sizes:
            param_ids[key] = ids[at:at + size]
            at += size
        if at != labels.size:
            raise Mismatch("parameter dims do not add up")
        # component -> group / unit, through the groups made from the representatives
        f_index = {id(g): i for i, g in enumerate(self.final_groups)}
        n_total = n_glob + self.n * n_local
        comp_group = np.full(n_total, -1, dtype=np.int64)
        comp_unit = np.full(n_total, -1, dtype=np.int64)
        remap_global = np.full(len(parts.groups) + 1, -1, dtype=np.int64)
        for (gi, k), g in made.items():
            if k is None:
                remap_global[gi] = f_index[id(g)]
        cg = parts.comp_group[globals_]
        comp_group[:n_glob] = np.where(cg >= 0, remap_global[np.maximum(cg, 0)], -1)
        comp_unit[:n_glob] = parts.comp_unit[globals_]
        for k in range(self.n):
            t = self.template(k)
            remap = np.full(len(parts.groups) + 1, -1, dtype=np.int64)
            for (gi, kk), g in made.items():
                if kk == k:
                    remap[gi] = f_index[id(g)]
            cg = parts.comp_group[local_comps[t]]
            sl = slice(n_glob + k * n_local, n_glob + (k + 1) * n_local)
            comp_group[sl] = np.where(cg >= 0, remap[np.maximum(cg, 0)], -1)
            comp_unit[sl] = parts.comp_unit[local_comps[t]]
        return labels, comp_group, comp_unit, param_ids

    # ---- the channel-space graph ----------------------------------------------------------------------
    def _nx(self, groups: list[G.Group], made: dict[tuple[int, int | None], G.Group]) -> nx.DiGraph:
        reduced = self.parts.nx
        name_of = {g.name: gi for gi, g in enumerate(self.parts.groups)}

        def group_name(name: str, bm) -> str:
            if not name:
                return name
            gi = name_of[name]
            if gi in self.local_pos:  # the same group of the block it lands in
                b, i = self.local_pos[gi]
                k = bm(b)
                return made[(self.local[self.template(k)][i], k)].name
            return made[(gi, None)].name

        def seg_of(key: str) -> int:
            if key.startswith("param:"):
                return self.param_seg[key[len("param:"):].rpartition(":")[0]]
            node = key.rpartition(":")[0].partition(".")[0]
            if node not in self.seg_of_name:
                raise Mismatch(f"unknown node {node}")
            return self.seg_of_name[node]

        def node_item(item, bm, within=False):
            key, data = item
            data = dict(data)
            if data["kind"] in ("param", "buffer"):
                data["tensor"] = self.text(data["tensor"], bm)
            elif data["tensor"] in self.seg_of_name:
                data["tensor"] = self.node_name(data["tensor"], bm, within)
            data["module"] = self.text(data["module"], bm)
            data["group"] = self.text(data["group"], bm) if within else group_name(data["group"], bm)
            return self.key(key, bm, within), data

        axis_nodes = list(reduced.nodes(data=True))[:self.rec.nx_axis_nodes]
        segs = [seg_of(key) for key, _ in axis_nodes]
        self.check_alike(axis_nodes, segs, lambda it, bm: node_item(it, bm, within=True) if bm else
                         (it[0], dict(it[1])), "channel spaces")
        graph = nx.DiGraph()
        for key, data in self.expand(axis_nodes, segs, lambda it, s, k: node_item(it, self.mapping(s, k))):
            graph.add_node(key, **data)
        marks = np.array([m[0] for m in self.rec.marks], dtype=np.int64)
        edges = self.rec.axis_edges
        node_of = np.searchsorted(marks, np.arange(len(edges)), side="right") - 1
        esegs = [self.seg[i] for i in node_of.tolist()]

        def edge(e, bm, within=False):
            return (self.key(e[0], bm, within), self.key(e[1], bm, within), e[2])

        self.check_alike(edges, esegs, lambda e, bm: edge(e, bm, True) if bm else e, "couplings", start=1)
        add_axis_edges(graph, self.expand(edges, esegs, lambda e, s, k: edge(e, self.mapping(s, k))))
        return graph
