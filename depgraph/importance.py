"""Importance scores for every unit of every group: criteria, aggregation over members, normalisation.

A *criterion* gives each member of a group (one parameter slice, e.g. the ``gate_proj`` rows of an MLP)
a score per unit; an *aggregation* folds the member scores of a group into one score per unit (LLM-Pruner
§3.2). Scores are float32 CPU tensors of length ``group.size``; lower means less important.

Built-in criteria (``CRITERIA``), for member slice ``S_u`` (every element of the member's parameter
whose index along ``member.dim`` belongs to unit ``u``):

* ``random`` - seeded uniform scores (one vector per group, given to every member, so every
  aggregation ranks identically); the baseline.
* ``l1`` = ``sum_{S_u} |W|``; ``l2`` = ``sqrt(sum_{S_u} W^2)``.
* ``taylor_vector`` = ``|sum_{S_u} g * W|``; ``taylor_first`` = ``sum_{S_u} |g * W|``;
  ``taylor_second`` = ``sum_{S_u} (|g * W| + 1/2 * 1/N sum_s (g_s * W)^2)``. Here ``g_s = dL_s/dW`` is
  the gradient of the loss of calibration batch ``s`` (one backward per batch), ``N`` the number of
  batches and ``g = 1/N sum_s g_s`` the gradient of the mean calibration loss. The second term is the
  Hessian diagonal approximated by the empirical Fisher ``1/N sum_s g_s^2`` (as LLM-Pruner does).
* ``wanda`` = ``sum_{S_u} |W_ij| * ||X_j||_2`` with ``||X_j||_2`` the L2 norm of input channel ``j`` of
  that weight's layer over all calibration tokens (Sun et al. 2023). Defined for ``nn.Linear`` and
  ``Conv1D`` weights (and their biases, whose "input" is the constant 1, so ``|b| * sqrt(tokens)``) and
  for embeddings (one-hot inputs: ``||X_v|| = sqrt(count of token v)``); other members (norm scales)
  are not scored and are left out of the aggregation.
* ``activation`` (Minitron) = mean over calibration tokens of ``||x_{S_u}||_2``, the activation at the
  unit's channels, measured at the input of every layer that consumes the unit (its ``nn.Linear`` /
  ``Conv1D`` input columns): an MLP neuron's value at ``down_proj``, a head's output slice at ``o_proj``,
  a hidden channel at each layer that reads the (normalised) residual stream (q/k/v, gate/up, lm_head).
  Producer members are not scored.

Gradient memory (Taylor): ``.grad`` is never held for the whole model. Each parameter gets a
``post_accumulate_grad_hook`` that, as soon as its gradient is ready during ``backward``, folds it into
per-unit statistics of its members and frees ``.grad``. What cannot be folded per batch (the element-wise
``|g * W|`` of the *mean* gradient when there are several batches) needs an fp32 accumulator the size of
the parameter. By default every accumulator is kept at once when they fit in half the free memory of the
device, so the whole cost is one backward per batch (as for any gradient-based pruner); otherwise, or
with ``grad_budget=`` elements, parameters are processed in chunks of at most that many elements (when
memory is short: the largest decoder layer), one set of calibration passes per chunk, with
``requires_grad`` switched on only for the chunk. ``taylor_vector`` and single-batch calibration need one
set of passes in all.

Speed: weights and gradients are reduced by :func:`index_sums` in cache-sized blocks, one pass per
parameter for all the dims its members need, so scoring reads each weight once and never makes a
parameter-sized temporary.

Add a criterion with the decorator; it returns a member's per-unit scores (or None: not scored)::

    @criterion("l1_out")
    def l1_out(ctx, group, member):
        return ctx.reduce(member, ctx.weight(member).abs()) if member.role == "out" else None
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import calibration
from .errors import DepGraphError
from .groups import Group, GroupKind, Member
from .models import is_meta

try:  # transformers' GPT-2 style Conv1D stores its weight as [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None  # type: ignore[assignment,misc]

__all__ = [
    "AGGREGATIONS", "BLOCK_ELEMENTS", "CRITERIA", "MATMUL_LAYERS", "NORMALIZATIONS", "ScoreContext",
    "InputStats", "available_memory", "causal_lm_loss", "combine", "criterion", "index_sums", "input_dim",
    "input_hooks", "input_statistics",
    "member_scores", "normalize_scores", "ranking", "reduce_member", "score", "score_member",
    "taylor_statistics",
]

AGGREGATIONS = ("sum", "mean", "max", "product", "last")
NORMALIZATIONS = (None, "mean", "max", "sum", "gaussian")
_MATMUL: tuple[type[nn.Module], ...] = (nn.Linear,) if Conv1D is None else (nn.Linear, Conv1D)

MemberFn = Callable[["ScoreContext", Group, Member], "torch.Tensor | None"]
UnitFn = Callable[[Any, Group], torch.Tensor]


@dataclass
class _Spec:
    fn: MemberFn
    collect: Callable[[ScoreContext], Any] | None
    needs_calib: bool
    reads_weights: bool = True
    options: tuple[str, ...] = ()  # keyword options the criterion reads from ctx.options


CRITERIA: dict[str, _Spec] = {}


def criterion(name: str, *, collect: Callable[[ScoreContext], Any] | None = None, needs_calib: bool = False,
              reads_weights: bool = True, options: tuple[str, ...] = ()):
    """Register ``fn(ctx, group, member) -> Tensor[group.size] | None`` as criterion ``name``.

    ``collect(ctx)`` (optional) runs once per scoring call before any member is scored; its result is
    ``ctx.stats[name]``. ``needs_calib``: the criterion reads calibration data (``ctx.calib``).
    ``reads_weights=False``: the criterion never reads weight values, so it also scores a model on the
    ``meta`` device (shape analysis); the others refuse such a model.
    ``options``: the keyword options it reads from ``ctx.options`` (a ``Pruner`` refuses any other).
    """

    def wrap(fn: MemberFn) -> MemberFn:
        CRITERIA[name] = _Spec(fn, collect, needs_calib, reads_weights, tuple(options))
        return fn

    return wrap


# ---- helpers ----------------------------------------------------------------------------------


def reduce_member(values: torch.Tensor, member: Member, size: int) -> torch.Tensor:
    """Sum ``values`` (shaped like ``member``'s parameter, or already one value per index along
    ``member.dim``) over each unit's slice: a ``[size]`` tensor."""
    if values.dim() > 1:
        # reduce the other dims in place of movedim + reshape, which copied the whole tensor
        v = values.sum(dim=[d for d in range(values.dim()) if d != member.dim])
    else:
        v = values
    unit = torch.as_tensor(member.unit_of_index, device=v.device)
    own = unit >= 0
    out = torch.zeros(size, dtype=v.dtype, device=v.device)
    return out.index_add_(0, unit[own], v[own]).float().cpu()


BLOCK_ELEMENTS = 1 << 18  # elements per block of index_sums: the block's temporaries stay in cache
_OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "abs": torch.abs_, "square": torch.square_, "signed": lambda x: x}


def index_sums(tensor: torch.Tensor, dims, op: str = "abs", other: torch.Tensor | None = None,
               scale: tuple[torch.Tensor, int] | None = None) -> dict[int, torch.Tensor]:
    """Per-index sums of ``op(tensor * other) * scale`` along each dim of ``dims``: ``{dim: float32 [n_dim]}``.

    ``op`` is ``"abs"``, ``"square"`` or ``"signed"`` (no op); ``other`` (optional) is multiplied element-wise first (same shape);
    ``scale = (vector, d)`` multiplies every index ``i`` along dim ``d`` by ``vector[i]``. One pass over
    blocks of ``BLOCK_ELEMENTS`` along dim 0, so no temporary the size of the tensor is ever made: scoring
    a model costs one read of its weights, not a float copy per member.
    """
    fn = _OPS[op]
    t = tensor.detach()
    t = t.reshape(1) if t.dim() == 0 else t
    dims = sorted(set(int(d) for d in dims))
    out = {d: torch.zeros(t.shape[d], dtype=torch.float32, device=t.device) for d in dims}
    step = max(1, BLOCK_ELEMENTS // max(1, t[0].numel())) if t.shape[0] else 1
    for a in range(0, t.shape[0], step):
        blk = t[a:a + step]
        if op != "signed" and other is None and blk.dtype == torch.float32:
            blk = blk * blk if op == "square" else blk.abs()  # one pass, the result is the private copy
        else:
            blk = blk.to(torch.float32, copy=True)  # a private copy: the ops below run in place
            if other is not None:
                blk.mul_(other.detach()[a:a + step])
            fn(blk)
        if scale is not None:
            vec, sdim = scale
            vec = vec.to(device=blk.device, dtype=torch.float32)
            vec = vec[a:a + step] if sdim == 0 else vec
            blk.mul_(vec.reshape([-1 if k == sdim else 1 for k in range(blk.dim())]))
        for d in dims:
            rest = [k for k in range(blk.dim()) if k != d]
            part = blk.sum(dim=rest) if rest else blk
            if d == 0:
                out[0][a:a + step] = part
            else:
                out[d] += part
    return out


def _module_name(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else ""


def _input_dim(module: nn.Module) -> int:
    """The weight dim that multiplies the layer input (``Conv1D`` stores ``[in, out]``)."""
    return 0 if Conv1D is not None and isinstance(module, Conv1D) else 1


def causal_lm_loss(model: nn.Module, batch) -> torch.Tensor:
    """The default calibration loss: ``model(input_ids, labels=input_ids).loss`` (next-token CE)."""
    kwargs: dict[str, Any] = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
    kwargs.setdefault("labels", kwargs["input_ids"])
    out = model(**{**calibration.no_cache_kwargs(model), **kwargs})
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise TypeError(f"{type(model).__name__} returned no .loss for labels=input_ids; pass loss_fn=fn(model, batch)")
    return loss


@dataclass
class ScoreContext:
    """What a criterion may read: the graph, the groups being scored, calibration data, cached stats."""

    graph: Any
    groups: list[Group]
    calib: list | None = None
    seed: int = 0
    progress: bool = True
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.model: nn.Module = self.graph.model
        self.params: dict[str, nn.Parameter] = dict(self.model.named_parameters())
        self.modules: dict[str, nn.Module] = dict(self.model.named_modules())
        self.size_of: dict[int, int] = {id(m): g.size for g in self.groups for m in g.members}
        self._scored: dict[str, list[tuple[Member, int]]] | None = None

    def weight(self, member: Member) -> torch.Tensor:
        """The member's whole parameter, detached, in float32."""
        return self.params[member.param].detach().float()

    def module(self, member: Member) -> nn.Module | None:
        """The module that owns the member's parameter."""
        return self.modules.get(_module_name(member.param))

    def reduce(self, member: Member, values: torch.Tensor) -> torch.Tensor:
        """Per-unit sums of ``values`` (parameter-shaped) over the member's slices."""
        return reduce_member(values, member, self.size_of[id(member)])

    def unit_sums(self, member: Member, op: str = "abs", scale: tuple[torch.Tensor, int] | None = None,
                  key: str = "") -> torch.Tensor:
        """Per-unit sums of ``op(W) * scale`` (``op``: ``"abs"`` or ``"square"``; ``scale`` as in
        :func:`index_sums`) over the member's slices, without a parameter-sized temporary.

        One blocked pass per parameter computes the sums along every dim a scored member of that
        parameter needs; the others read them from a cache keyed by ``(parameter, op, key)`` (``key``
        names the scale, so two criteria with different scales never share an entry).
        """
        cache = self.stats.setdefault("index_sums", {})
        entry = (member.param, op, key)
        if entry not in cache or member.dim not in cache[entry]:
            dims = {m.dim for m, _ in self.scored_members().get(member.param, ())} | {member.dim}
            cache[entry] = index_sums(self.params[member.param], dims, op, scale=scale)
        return reduce_member(cache[entry][member.dim], member, self.size_of[id(member)])

    def scored_members(self) -> dict[str, list[tuple[Member, int]]]:
        """Parameter name -> [(member, group size)] for every non-buffer member of the scored groups."""
        if self._scored is None:
            out: dict[str, list[tuple[Member, int]]] = defaultdict(list)
            for g in self.groups:
                for m in g.members:
                    if not m.is_buffer and m.param in self.params:
                        out[m.param].append((m, g.size))
            self._scored = dict(out)
        return self._scored


# ---- data-free criteria ---------------------------------------------------------------------------


@criterion("random", reads_weights=False)
def _random(ctx: ScoreContext, group: Group, member: Member) -> torch.Tensor:
    cache = ctx.stats.setdefault("random", {})
    if id(group) not in cache:
        index = next(i for i, g in enumerate(ctx.graph.groups()) if g is group)
        gen = torch.Generator().manual_seed(int(ctx.seed) * 1_000_003 + index)
        cache[id(group)] = torch.rand(group.size, generator=gen)
    return cache[id(group)]


@criterion("l1")
def _l1(ctx: ScoreContext, group: Group, member: Member) -> torch.Tensor:
    return ctx.unit_sums(member, "abs")


@criterion("l2")
def _l2(ctx: ScoreContext, group: Group, member: Member) -> torch.Tensor:
    return ctx.unit_sums(member, "square").sqrt()


# ---- Taylor ----------------------------------------------------------------------------------------


def _grad_chunks(ctx: ScoreContext, names: list[str], budget: int | None) -> list[list[str]]:
    """Pack parameters (in model order) into chunks of at most ``budget`` elements."""
    total = sum(ctx.params[n].numel() for n in names)
    if budget is None and _fits(total * 4, ctx.params[names[0]].device if names else torch.device("cpu")):
        budget = total  # one set of passes: one backward per batch, like any gradient-based pruner
    if budget is None:  # memory is short: chunks of the largest decoder layer (or the largest parameter)
        per_layer: dict[str, int] = defaultdict(int)
        for n in names:
            per_layer[calibration.layer_prefix(n)] += ctx.params[n].numel()
        budget = max([v for k, v in per_layer.items() if k] + [max(ctx.params[n].numel() for n in names)])
    chunks: list[list[str]] = [[]]
    used = 0
    for n in names:
        size = ctx.params[n].numel()
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(n)
        used += size
    return chunks


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (CPU: ``MemAvailable``; CUDA: free memory), or None."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError, IndexError):
        pass
    return None


def _fits(nbytes: int, device: torch.device) -> bool:
    # the fp32 gradient accumulators may take half of what is free (activations need the rest);
    # when free memory cannot be read, assume it fits (the usual case, and the fast one)
    free = available_memory(device)
    return free is None or nbytes <= free // 2


def _taylor_collect(mode: str) -> Callable[[ScoreContext], dict[int, torch.Tensor]]:
    def collect(ctx: ScoreContext) -> dict[int, torch.Tensor]:
        return taylor_statistics(ctx, mode)

    return collect


def taylor_statistics(ctx: ScoreContext, mode: str) -> dict[int, torch.Tensor]:
    """Per-member Taylor scores ``{id(member): Tensor[size]}`` for ``mode`` in vector/first/second."""
    batches = ctx.calib
    loss_fn = ctx.loss_fn or causal_lm_loss
    model = ctx.model
    by_param = ctx.scored_members()
    order = [n for n, _ in model.named_parameters() if n in by_param]
    n_batches = len(batches)
    # the element-wise |g*W| of the mean gradient cannot be folded batch by batch: accumulate g
    accumulate = mode in ("first", "second") and n_batches > 1
    chunks = _grad_chunks(ctx, order, ctx.options.get("grad_budget")) if accumulate else [order]
    device = next(iter(ctx.params.values())).device
    out: dict[int, torch.Tensor] = {}
    saved = {n: (p.requires_grad, p.grad) for n, p in ctx.params.items()}
    modes = calibration.set_eval(model)
    try:
        for p in ctx.params.values():
            p.grad = None
        bar = tqdm(total=len(chunks) * n_batches, desc=f"taylor_{mode}", disable=not ctx.progress, leave=False)
        for chunk in chunks:
            in_chunk = set(chunk)
            for n, p in ctx.params.items():
                p.requires_grad_(n in in_chunk)
            folded: dict[int, torch.Tensor] = {}  # per member: sum over batches of per-unit terms
            acc: dict[str, torch.Tensor] = {}
            mean_gw: dict[str, dict[int, torch.Tensor]] = {}
            handles = [ctx.params[n].register_post_accumulate_grad_hook(
                _taylor_hook(n, by_param[n], mode, accumulate, folded, acc)) for n in chunk]
            try:
                with torch.enable_grad():
                    for batch in batches:
                        loss = loss_fn(model, calibration.to_device(batch, device))
                        loss.backward()
                        bar.update(1)
            finally:
                for h in handles:
                    h.remove()
            for name in chunk:
                for m, size in by_param[name]:
                    # a parameter the loss does not depend on has no gradient: its Taylor score is 0
                    s = folded.get(id(m), torch.zeros(size)) / n_batches
                    if mode == "vector":
                        s = s.abs()
                    elif accumulate and name in acc:
                        if name not in mean_gw:  # |mean g * W|, blocked: no parameter-sized temporary
                            dims = {mm.dim for mm, _ in by_param[name]}
                            mean_gw[name] = index_sums(acc[name], dims, "abs", other=ctx.params[name].detach())
                        s = s + reduce_member(mean_gw[name][m.dim], m, size) / n_batches
                    out[id(m)] = s
                acc.pop(name, None)  # free each accumulator as soon as it is folded
                mean_gw.pop(name, None)
        bar.close()
    finally:
        for n, p in ctx.params.items():
            p.requires_grad_(saved[n][0])
            p.grad = saved[n][1]
        calibration.restore_modes(modes)
    return out


def _taylor_hook(name: str, members: list[tuple[Member, int]], mode: str, accumulate: bool,
                 folded: dict[int, torch.Tensor], acc: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], None]:
    """Fold one parameter's fresh gradient into its members' per-unit terms, then free ``.grad``."""
    dims = {m.dim for m, _ in members}

    def fold(m: Member, size: int, term: torch.Tensor) -> None:
        folded[id(m)] = folded[id(m)] + term if id(m) in folded else term

    def hook(param: torch.Tensor) -> None:
        g = param.grad.detach()
        param.grad = None  # free right away: only this parameter's gradient is alive
        if accumulate:  # in place: one fp32 buffer per parameter for all batches
            if name in acc:
                acc[name].add_(g)
            else:
                acc[name] = g.float() if g.dtype != torch.float32 else g
            if mode == "first":
                return  # |g * W| of the mean gradient: folded once after the last batch
        w = param.detach()
        if mode == "vector":  # signed: |.| only after the mean over batches
            sums = index_sums(g, dims, "signed", other=w)
            for m, size in members:
                fold(m, size, reduce_member(sums[m.dim], m, size))
            return
        square = index_sums(g, dims, "square", other=w) if mode == "second" else None
        absolute = None if accumulate else index_sums(g, dims, "abs", other=w)
        for m, size in members:
            term = 0.5 * reduce_member(square[m.dim], m, size) if square is not None else None
            if absolute is not None:
                a = reduce_member(absolute[m.dim], m, size)
                term = a if term is None else term + a
            if term is not None:
                fold(m, size, term)

    return hook


def _taylor_member(name: str) -> MemberFn:
    def fn(ctx: ScoreContext, group: Group, member: Member) -> torch.Tensor | None:
        return ctx.stats[name].get(id(member))

    return fn


for _mode in ("vector", "first", "second"):
    criterion(f"taylor_{_mode}", collect=_taylor_collect(_mode), needs_calib=True, options=("grad_budget",))(_taylor_member(f"taylor_{_mode}"))


# ---- activation statistics (Wanda, Minitron) ----------------------------------------------------


@dataclass
class InputStats:
    """Calibration statistics at the inputs of the layers that own scored members."""

    sumsq: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> sum_t x_tj^2 per input channel
    tokens: dict[str, int] = field(default_factory=dict)  # module -> number of tokens seen
    counts: dict[str, torch.Tensor] = field(default_factory=dict)  # embedding -> token counts
    act: dict[int, torch.Tensor] = field(default_factory=dict)  # member -> sum_t ||x_t[S_u]||_2

    def forget(self, modules, members=()) -> None:
        """Drop what was collected at ``modules`` (names) and for ``members`` (ids), to collect it again."""
        for name in modules:
            for table in (self.sumsq, self.tokens, self.counts):
                table.pop(name, None)
        for key in members:
            self.act.pop(key, None)


def input_statistics(ctx: ScoreContext) -> InputStats:
    """One no-grad pass over the calibration batches with pre-hooks on every scored layer."""
    stats = InputStats()
    hooks = input_hooks(ctx, stats)
    model = ctx.model
    device = next(iter(ctx.params.values())).device
    try:
        with torch.no_grad(), calibration.eval_mode(model):
            for batch in tqdm(ctx.calib, desc="calibration", disable=not ctx.progress, leave=False):
                calibration.forward(model, batch, device)
    finally:
        for h in hooks:
            h.remove()
    return stats


def input_hooks(ctx: ScoreContext, stats: InputStats, modules: set[str] | None = None) -> list:
    """Register the forward pre-hooks that fold calibration inputs into ``stats`` (the statistics of
    ``wanda`` and ``activation``) on every scored layer, or only on those named in ``modules``; returns
    the handles (the caller removes them). Streaming pruning (:mod:`depgraph.stream`) runs one decoder
    layer at a time with the hooks of that layer only."""
    by_module: dict[str, list[tuple[Member, int]]] = defaultdict(list)
    for name, members in ctx.scored_members().items():
        by_module[_module_name(name)].extend(members)
    hooks = []
    unreadable: set[str] = set()

    def matmul_hook(name: str, module: nn.Module):
        in_dim = _input_dim(module)
        weight_name = f"{name}.weight" if name else "weight"
        readers = [(m, s) for m, s in by_module[name] if m.param == weight_name and m.dim == in_dim]
        units = [(m, s, torch.as_tensor(m.unit_of_index)) for m, s in readers]

        def hook(_module, args, kwargs) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            x = x.detach().reshape(-1, x.shape[-1]).float()
            sq = x.pow(2)
            stats.sumsq[name] = stats.sumsq[name] + sq.sum(0) if name in stats.sumsq else sq.sum(0)
            stats.tokens[name] = stats.tokens.get(name, 0) + x.shape[0]
            for m, size, unit in units:
                own = unit >= 0
                u = unit[own].to(x.device)
                per_unit = torch.zeros(x.shape[0], size, device=x.device).index_add_(1, u, sq[:, own.to(x.device)])
                a = per_unit.sqrt().sum(0).cpu()  # sum over tokens of ||x_t[S_u]||_2
                stats.act[id(m)] = stats.act[id(m)] + a if id(m) in stats.act else a

        return hook

    def embed_hook(name: str, module: nn.Embedding):
        def hook(_module, args, kwargs) -> None:
            ids = (args[0] if args else next(iter(kwargs.values()))).detach().reshape(-1)
            if name in unreadable or ids.is_floating_point() or (ids.numel() and (
                    int(ids.min()) < 0 or int(ids.max()) >= module.num_embeddings)):
                # an embedding subclass that computes its own indices (OPT's learned positions reads the
                # attention mask): its token counts are unknown, so wanda leaves it unscored
                unreadable.add(name)
                stats.counts.pop(name, None)
                return
            c = torch.bincount(ids, minlength=module.num_embeddings).float().cpu()
            stats.counts[name] = stats.counts[name] + c if name in stats.counts else c

        return hook

    for name in by_module:
        if modules is not None and name not in modules:
            continue
        module = ctx.modules.get(name)
        if isinstance(module, _MATMUL):
            hooks.append(module.register_forward_pre_hook(matmul_hook(name, module), with_kwargs=True))
        elif isinstance(module, nn.Embedding):
            hooks.append(module.register_forward_pre_hook(embed_hook(name, module), with_kwargs=True))
    return hooks


@criterion("wanda", collect=input_statistics, needs_calib=True)
def _wanda(ctx: ScoreContext, group: Group, member: Member) -> torch.Tensor | None:
    stats: InputStats = ctx.stats["wanda"]
    module = ctx.module(member)
    name = _module_name(member.param)
    ndim = ctx.params[member.param].dim()
    if isinstance(module, _MATMUL) and name in stats.sumsq:
        if member.param.endswith(".bias"):
            return ctx.unit_sums(member, "abs") * math.sqrt(stats.tokens[name])  # bias input is the constant 1
        if not member.param.endswith(".weight") or ndim != 2:
            return None
        return ctx.unit_sums(member, "abs", (stats.sumsq[name].sqrt(), _input_dim(module)), key="wanda")
    if isinstance(module, nn.Embedding) and name in stats.counts and member.param.endswith(".weight"):
        return ctx.unit_sums(member, "abs", (stats.counts[name].sqrt(), 0), key="wanda")
    return None


@criterion("activation", collect=input_statistics, needs_calib=True)
def _activation(ctx: ScoreContext, group: Group, member: Member) -> torch.Tensor | None:
    stats: InputStats = ctx.stats["activation"]
    total = stats.act.get(id(member))
    if total is None:
        return None
    return total / max(stats.tokens[_module_name(member.param)], 1)


# ---- aggregation and normalisation ---------------------------------------------------------------


def combine(scores: Mapping[Member, torch.Tensor], how: str = "sum") -> torch.Tensor:
    """Fold one group's member scores (``{member: Tensor[size]}``) into one score per unit.

    ``sum``/``mean``/``max`` are element-wise over members; ``last`` takes the scored member that runs
    last (largest ``order``; ties: the later one in ``group.members``); ``product`` is returned as its
    n-th root over the n scored members (the geometric mean), computed in log space in float64 with
    scores clamped to the smallest positive float64: it ranks the units of a group exactly like the
    product (n is the same for every unit), keeps the scale of one member's score, and neither
    overflows nor underflows for a group with hundreds of members (a 32-layer model's C group has ~300).
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregate must be one of {AGGREGATIONS}, got {how!r}")
    if not scores:
        raise ValueError("no member of this group was scored by the criterion")
    members = list(scores)
    stack = torch.stack([scores[m].double() for m in members])
    if how == "sum":
        out = stack.sum(0)
    elif how == "mean":
        out = stack.mean(0)
    elif how == "max":
        out = stack.max(0).values
    elif how == "last":
        last = max(range(len(members)), key=lambda i: (members[i].order, i))
        out = stack[last]
    else:
        out = stack.clamp_min(torch.finfo(torch.float64).tiny).log().mean(0).exp()
    return out.float()


def normalize_scores(scores: torch.Tensor, how: str | None) -> torch.Tensor:
    """Per-group normalisation: ``s/mean(s)``, ``s/max(s)``, ``s/sum(s)``, ``(s-mean)/std`` or none.

    A zero denominator leaves the scores unchanged (all-zero groups stay all-zero).
    """
    if how not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {how!r}")
    s = scores.double()
    if how is None:
        return scores
    if how == "gaussian":
        centred = s - s.mean()
        std = s.std(unbiased=False) if s.numel() > 1 else s.new_zeros(())
        out = centred / std if std > 0 else centred
    else:
        denom = {"mean": s.mean(), "max": s.max(), "sum": s.sum()}[how].abs()
        out = s / denom if denom > 0 else s
    return out.float()


# ---- public entry points --------------------------------------------------------------------------


def _select_groups(graph, groups) -> list[Group]:
    if groups is None:
        return graph.groups()
    if isinstance(groups, (str, GroupKind)):
        return graph.groups(groups)
    if isinstance(groups, Group):
        return [groups]
    return list(groups)


def _check_shapes(graph) -> None:
    params = dict(graph.model.named_parameters())
    for name, shape in graph.param_shapes.items():
        if name in params and tuple(params[name].shape) != tuple(shape):
            raise ValueError(f"parameter {name} changed shape since tracing ({tuple(shape)} -> "
                             f"{tuple(params[name].shape)}): prune through graph.prune or re-trace")


def member_scores(graph, criterion: str = "l2", calib=None, groups=None, seed: int = 0, progress: bool = True,
                  loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                  **options) -> dict[Group, dict[Member, torch.Tensor]]:
    """Per-member scores before aggregation: ``{group: {member: Tensor[group.size]}}``.

    Members a criterion does not define (e.g. norm scales for ``wanda``) are absent. ``options`` go to
    the criterion (``grad_budget``: Taylor's max accumulator elements per chunk).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; registered: {', '.join(sorted(CRITERIA))}")
    spec = CRITERIA[criterion]
    selected = _select_groups(graph, groups)
    _check_shapes(graph)
    if spec.reads_weights and is_meta(graph.model):
        free = sorted(n for n, s in CRITERIA.items() if not s.reads_weights)
        raise DepGraphError(f"criterion {criterion!r} reads weight values, but {type(graph.model).__name__} is on "
                            "the meta device (shapes only, no values)"
                            + (" and calibration needs a real forward pass" if spec.needs_calib else "")
                            + f". Load real weights, or for shape analysis use criterion={free[0]!r} "
                            "or fixed scores {group: tensor}.")
    batches = None if calib is None else calibration.batches(calib, calibration.vocab_size(graph.model))
    ctx = ScoreContext(graph, selected, batches, seed, progress, loss_fn, dict(options))
    if spec.needs_calib and not ctx.calib:
        raise ValueError(f"criterion {criterion!r} needs calibration data: pass calib= token ids ([N, L] "
                         "LongTensor or a list of batches), e.g. depgraph.data.calibration_batches(tokenizer=tok)")
    if spec.collect is not None:
        ctx.stats[criterion] = spec.collect(ctx)
    out: dict[Group, dict[Member, torch.Tensor]] = {}
    for group in tqdm(selected, desc=f"scoring {criterion}", disable=not progress or len(selected) < 8, leave=False):
        scores = {}
        for m in group.members:
            if m.is_buffer or m.param not in ctx.params:
                continue
            s = score_member(ctx, criterion, group, m)
            if s is not None:
                scores[m] = s
        out[group] = scores
    return out


def score_member(ctx: ScoreContext, criterion: str, group: Group, member: Member) -> torch.Tensor | None:
    """One member's checked per-unit scores under ``criterion`` (None: the criterion does not score it).

    The member's parameter (and ``ctx.stats[criterion]``, when the criterion collects statistics) must be
    ready; streaming pruning (:mod:`depgraph.stream`) calls this one decoder layer at a time.
    """
    s = CRITERIA[criterion].fn(ctx, group, member)
    return None if s is None else _check(s, group, f"criterion {criterion!r} on {member.param}")


def _check(s, group: Group, what: str) -> torch.Tensor:
    s = torch.as_tensor(s).detach().float().cpu().reshape(-1)
    if s.numel() != group.size:
        raise ValueError(f"{what}: got {s.numel()} scores for group {group.name} of {group.size} units")
    if not torch.isfinite(s).all():
        raise ValueError(f"{what}: scores for group {group.name} are not all finite")
    return s


def score(graph, criterion: str | UnitFn | Mapping[Group, torch.Tensor] = "l2", aggregate: str = "sum",
          calib=None, normalize: str | None = None, groups=None, seed: int = 0, progress: bool = True,
          loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None, **options) -> dict[Group, torch.Tensor]:
    """Importance of every unit of every group: ``{group: Tensor[group.size]}`` (lower = prune first).

    ``criterion``: a registered name (``CRITERIA``), a callable ``fn(graph, group) -> Tensor[size]``, or
    fixed scores ``{group: Tensor}``. ``aggregate`` folds member scores (default ``"sum"``, LLM-Pruner's
    default); ``normalize`` rescales each group afterwards. ``calib``: token ids ``[N, L]`` (N batches) or
    a list of batches, needed by taylor_*, wanda and activation. ``groups``: groups, a kind, or None (all).
    """
    selected = _select_groups(graph, groups)
    if isinstance(criterion, Mapping):
        raw = {g: _check(criterion[g], g, "user scores") for g in selected if g in criterion}
    elif callable(criterion):
        raw = {g: _check(criterion(graph, g), g, "user criterion") for g in selected}
    else:
        per_member = member_scores(graph, criterion, calib, selected, seed, progress, loss_fn, **options)
        raw = {g: combine(s, aggregate) for g, s in per_member.items()}
    return {g: normalize_scores(s, normalize) for g, s in raw.items()}


def ranking(scores: torch.Tensor) -> np.ndarray:
    """Unit ids from least to most important (stable: ties keep unit order, so results are deterministic)."""
    return np.argsort(scores.double().numpy(), kind="stable")



# ---- shared with the other calibration passes (depgraph.reconstruct) ------------------------------

MATMUL_LAYERS = _MATMUL
input_dim = _input_dim
