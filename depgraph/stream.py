"""Streaming (out-of-core) pruning of a Hugging Face safetensors checkpoint directory.

:func:`prune_checkpoint` prunes a checkpoint that does not fit in memory, one decoder layer at a time:

1. the model is built on the ``meta`` device from the directory's ``config.json`` (transformers' registry
   only) and traced: the groups are those of the in-memory path;
2. **score**: for each decoder layer in turn, only that layer's tensors are read from the safetensors
   files (memory-mapped; weight-only criteria read one module's tensors at a time), the member scores whose parameters live there are computed with the criterion's
   own code (:func:`depgraph.importance.score_member`), and the layer goes back to ``meta``. Calibration
   criteria (``wanda``, ``activation``) run the calibration batches through the model with every layer
   before the current one replaced by a replay of the previous layer's stored output, so each layer sees
   exactly the inputs (and per-layer masks) of a full forward pass; only the current layer's output per
   batch is kept. Hidden-channel (C) groups span every layer: their member scores are small vectors,
   kept until the end and folded with :func:`depgraph.importance.combine` like the in-memory path;
3. **plan**: :class:`depgraph.Pruner` plans from those scores (same rounding, target, ``hf_loadable``);
4. **cut**: the plan is cut on the meta model (new shapes and config), :func:`depgraph.cut.tensor_cuts`
   gives every tensor's kept indices and RMSNorm factor, and each checkpoint tensor is read, cut and
   appended to its output shard, one tensor at a time (the shard header is known from the shapes, so no
   shard is ever held whole). Config, ``depgraph.json`` and buffers are written by
   :func:`depgraph.checkpoint.write_checkpoint` (plain Hugging Face files when the cut is uniform).

Peak memory is one decoder layer's weights (plus the tensor being read), the embeddings while calibrating
(loaded when first called; the head only for the last pass, or for the cut of its own tensor), the member
scores and one layer's calibration outputs, independent of depth (the meta model's trace grows with
depth, by about 8 MiB per Llama-7B layer). The output is
written into a temporary sibling directory, fsynced and renamed into place, so an interrupted run never
leaves a half-written checkpoint. Criteria that need gradients of the whole model (``taylor_*``, ``obs``)
are refused (:class:`~depgraph.errors.StreamError`): use the in-memory :class:`depgraph.Pruner`.

>>> report = depgraph.prune_checkpoint("llama-7b/", "llama-7b-pruned/", ratio=0.2, criterion="wanda",
...                                    calib=ids)   # ids: [N, L] token ids
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming, rename_source_key

from . import calibration, checkpoint, depth, importance
from .cut import PruneReport, tensor_cuts
from .errors import DepGraphError, StreamError
from .graph import canonical_names, trace
from .groups import Group
from .models import ResolvedSpec, load_model
from .pruner import Pruner

__all__ = ["DEFAULT_SHARD_SIZE", "TOKENIZER_FILES", "SourceCheckpoint", "check_criterion", "prune_checkpoint",
           "write_safetensors"]

DEFAULT_SHARD_SIZE = "5GB"
# files copied from the source directory unchanged (tokenizer, generation settings)
TOKENIZER_FILES = re.compile(r"(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.[^/]*|merges\.txt|"
                             r"[^/]*\.model|chat_template[^/]*|byte_tokenizer\.json|generation_config\.json)")
# safetensors' dtype names (the file format's own spelling)
_SAFE_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_FROM_SAFE = {v: k for k, v in _SAFE_DTYPES.items()}


class _Stop(Exception):
    """Raised by the hook after the current layer: the rest of the forward pass is not needed."""


# ---- the source directory ---------------------------------------------------------------------------


class SourceCheckpoint:
    """A Hugging Face checkpoint directory: ``config.json`` plus ``model.safetensors`` or shards listed in
    ``model.safetensors.index.json``. Reads headers only; tensors are read one at a time on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise StreamError(f"{self.path} is not a directory; pass a Hugging Face checkpoint directory "
                              "(config.json + *.safetensors)")
        if not (self.path / "config.json").is_file():
            raise StreamError(f"{self.path} has no config.json: it is not a Hugging Face checkpoint directory")
        state = self.path / checkpoint.STATE_FILE
        try:
            per_layer = state.is_file() and not json.loads(state.read_text()).get("hf_compatible", True)
        except (OSError, ValueError, AttributeError) as exc:
            raise StreamError(f"{state} cannot be read ({exc}); the checkpoint is damaged") from exc
        if per_layer:
            raise StreamError(f"{self.path} is a depgraph checkpoint with per-layer sizes (depgraph.json), which "
                              "the config alone cannot describe; prune it in memory (depgraph.load_pretrained + "
                              "depgraph.Pruner)")
        index = self.path / checkpoint.INDEX_FILE
        single = self.path / checkpoint.WEIGHTS_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise StreamError(f"{index} cannot be read ({exc}); the checkpoint is damaged") from exc
            self.file_of = {str(k): self.path / str(v) for k, v in weight_map.items()}
        elif single.is_file():
            self.file_of = {}
            files = [single]
        else:
            found = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
            hint = f" (found {', '.join(found[:3])}: convert them to safetensors first)" if found else ""
            raise StreamError(f"{self.path} has no safetensors weights ({checkpoint.WEIGHTS_FILE} or "
                              f"{checkpoint.INDEX_FILE}){hint}")
        if self.file_of:
            files = sorted(set(self.file_of.values()))
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, torch.dtype] = {}
        for file in files:
            if not file.is_file():
                raise StreamError(f"{file.name}, listed in {checkpoint.INDEX_FILE}, is missing from {self.path}")
            try:
                with safe_open(str(file), "pt") as f:
                    for key in f.keys():
                        part = f.get_slice(key)
                        self.shape[key] = tuple(int(n) for n in part.get_shape())
                        self.dtype[key] = _FROM_SAFE[part.get_dtype()]
                        self.file_of[key] = file
            except (OSError, SafetensorError, KeyError) as exc:
                raise StreamError(f"{file} cannot be read as safetensors ({exc}); the checkpoint is damaged") from exc
        if not self.shape:
            raise StreamError(f"{self.path}: the safetensors files hold no tensors")

    def read(self, key: str) -> torch.Tensor:
        """One tensor, read from its file (the file is mapped only while it is read)."""
        with safe_open(str(self.file_of[key]), "pt") as f:
            return f.get_tensor(key)

    def float_dtype(self) -> torch.dtype:
        """The checkpoint's main floating-point dtype (of most elements)."""
        count: dict[torch.dtype, int] = {}
        for key, dtype in self.dtype.items():
            if dtype.is_floating_point:
                count[dtype] = count.get(dtype, 0) + math.prod(self.shape[key])
        return max(count, key=count.get) if count else torch.float32


# ---- safetensors, written tensor by tensor ---------------------------------------------------------


def write_safetensors(path: str | Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                      produce: Callable[[str], torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors (``(name, shape, dtype)``, in file order) are made one at a
    time by ``produce(name)``: the header is written from the shapes first, then each tensor's bytes, so
    at most one tensor is in memory (``safetensors.torch.save_file`` needs them all at once).
    """
    header: dict[str, Any] = {}
    offset = 0
    for name, shape, dtype in entries:
        if dtype not in _SAFE_DTYPES:
            raise StreamError(f"tensor {name} has dtype {dtype}, which safetensors cannot store")
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFE_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in entries:
            tensor = produce(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise StreamError(f"tensor {name} came out as {tuple(tensor.shape)} {tensor.dtype}, planned "
                                  f"{tuple(shape)} {dtype}; nothing was written")
            f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            del tensor


# ---- moving tensors between the meta device and memory -------------------------------------------


class _Residency:
    """Puts checkpoint tensors into the meta model and takes them out again, by tensor name.

    A tensor is set with accelerate's ``set_module_tensor_to_device``, and the same object under its other
    names (a tied embedding and head stay one parameter); ``params`` (shared with the scoring context)
    always maps each parameter name to the model's current parameter object.
    """

    def __init__(self, model: nn.Module, source: SourceCheckpoint, key_of: dict[str, str]):
        self.model, self.source, self.key_of = model, source, key_of
        self.names: dict[str, list[str]] = {}
        for name, first in canonical_names(model).items():
            self.names.setdefault(first, []).append(name)
        self.params: dict[str, nn.Parameter] = dict(model.named_parameters())
        self.resident: set[str] = set()

    def _set(self, name: str, device: str, value: torch.Tensor | None) -> None:
        from accelerate.utils import set_module_tensor_to_device

        first, *others = self.names.get(name, [name])
        set_module_tensor_to_device(self.model, first, device, value=value)
        tensor = self.model.get_parameter(first) if name in self.params else self.model.get_buffer(first)
        for alias in others:  # the same object under every name: tied weights stay tied
            owner, _, leaf = alias.rpartition(".")
            setattr(self.model.get_submodule(owner), leaf, tensor)
        if name in self.params:
            self.params[name] = self.model.get_parameter(name)

    def load(self, names) -> None:
        for name in names:
            if name not in self.resident:
                self._set(name, "cpu", self.source.read(self.key_of[name]))
                self.resident.add(name)

    def release(self, names) -> None:
        for name in names:
            if name in self.resident:
                self._set(name, "meta", None)
                self.resident.discard(name)

    def release_all(self) -> None:
        self.release(list(self.resident))


def _real_buffers(model: nn.Module) -> None:
    """Give the meta model real values for the buffers its constructor computes (rotary tables): built once
    more with accelerate's ``init_empty_weights`` (parameters on meta, buffers computed)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    with init_empty_weights(include_buffers=False):
        ref = type(model)(model.config)
    for name, buf in ref.named_buffers():
        if buf.device.type != "meta":
            set_module_tensor_to_device(model, name, "cpu", value=buf)


def _bind(model: nn.Module, source: SourceCheckpoint) -> tuple[dict[str, str], dict[str, str]]:
    """``({model tensor name: checkpoint key}, {checkpoint key: model state key})`` for every persistent
    tensor. Checkpoint keys go through transformers' own renaming rules (``get_model_conversion_mapping``:
    e.g. GPT-NeoX's ``embed_out`` is the model's ``lm_head``); keys that only a weight *conversion* (fused or
    split tensors) or nothing maps to a model tensor, and model tensors the checkpoint lacks, are refused
    before anything is written."""
    alias = canonical_names(model)
    state = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    transforms = get_model_conversion_mapping(model, add_legacy=True) if hasattr(model, "config") else []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    key_of: dict[str, str] = {}
    state_key: dict[str, str] = {}
    for key, shape in source.shape.items():
        renamed = key
        if key not in state:
            renamed, converted = rename_source_key(key, renamings, converters, getattr(model, "base_model_prefix", None),
                                                   state)
            if converted is not None:
                renamed = None  # fused or split by a conversion: no one tensor to stream
        name = alias.get(renamed)
        if name is None or renamed not in state:
            raise StreamError(f"the checkpoint holds {key!r}, which {type(model).__name__} (built from its config) "
                              "has no tensor of that name, even after transformers' key renaming (fused or converted "
                              "weights): streaming needs one checkpoint tensor per model tensor; prune it in memory "
                              "with depgraph.Pruner")
        if tuple(state[renamed].shape) != shape:
            raise StreamError(f"checkpoint tensor {key} has shape {shape}, but the config builds "
                              f"{tuple(state[renamed].shape)}: the weights do not belong to this config")
        key_of.setdefault(name, key)
        state_key[key] = renamed
    missing = sorted({alias[k] for k in state} - set(key_of))
    if missing:
        raise StreamError(f"the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[0]}: "
                          "it is incomplete or for another model")
    return key_of, state_key


# ---- scoring, layer by layer ------------------------------------------------------------------------


@contextlib.contextmanager
def _replayed(blocks: nn.ModuleList, upto: int, outputs: list, index: dict[str, int]) -> Iterator[None]:
    """Blocks ``[0, upto)`` return the stored output of block ``upto - 1`` for the current batch
    (``index["batch"]``) instead of computing: the model's own loop then feeds block ``upto`` exactly
    the input and keyword arguments of a full forward pass."""
    def replay(*args, **kwargs):
        return outputs[index["batch"]]

    try:
        for j in range(upto):
            blocks[j].forward = replay
        yield
    finally:
        for j in range(upto):
            blocks[j].__dict__.pop("forward", None)


def _lazy_loads(model: nn.Module, residency: _Residency, paths: list[str]) -> list:
    """Pre-hooks that load a module's own checkpoint tensors when it is first called (the embeddings run
    in every calibration pass, the head only in the last one: it is not held while the layers run)."""
    alias = canonical_names(model)
    handles = []
    for path in paths:
        module = model.get_submodule(path)
        local = [n for n, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]]
        own = [alias.get(f"{path}.{n}" if path else n) for n in local]
        own = [n for n in own if n in residency.key_of]
        if own:
            handles.append(module.register_forward_pre_hook(lambda _m, _a, own=own: residency.load(own)))
    return handles


def _by_module(tensors: list[str], members: list) -> list[tuple[list[str], list]]:
    """``(tensor names, (group, member) pairs)`` per owning module, in order."""
    out: dict[str, tuple[list[str], list]] = {}
    for name in tensors:
        out.setdefault(name.rpartition(".")[0], ([], []))[0].append(name)
    for g, m in members:
        out.setdefault(m.param.rpartition(".")[0], ([], []))[1].append((g, m))
    return list(out.values())


def _calibrate(model: nn.Module, ctx, stats, blocks: nn.ModuleList, phase: int, n_blocks: int, outputs: list,
               batches: list, modules: set[str]) -> list:
    """Run every calibration batch up to and through block ``phase`` (the whole model when ``phase ==
    n_blocks``), earlier blocks replayed from ``outputs``, with the statistics hooks of ``modules``;
    returns block ``phase``'s output per batch."""
    hooks = importance.input_hooks(ctx, stats, modules)
    index = {"batch": 0}
    new_outputs: list = []
    stop = None
    if phase < n_blocks:
        def keep(_module, _args, output):
            new_outputs.append(output)
            raise _Stop
        stop = blocks[phase].register_forward_hook(keep)
    try:
        with torch.no_grad(), calibration.eval_mode(model), _replayed(blocks, phase, outputs, index):
            for b, batch in enumerate(batches):
                index["batch"] = b
                try:
                    calibration.forward(model, batch, torch.device("cpu"))
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()
        if stop is not None:
            stop.remove()
    return new_outputs


def _stream_scores(graph, groups: list[Group], criterion: str, aggregate: str, batches: list | None,
                   residency: _Residency, block_path: str, n_blocks: int, seed: int, progress: bool,
                   options: dict) -> dict[Group, torch.Tensor]:
    """Per-group (aggregated, unnormalised) scores computed one decoder layer at a time."""
    model = graph.model
    ctx = importance.ScoreContext(graph, groups, batches, seed, progress, None, dict(options))
    ctx.params = residency.params  # the same dict: it follows the tensors as they come and go
    calibrate = batches is not None
    if calibrate:
        ctx.stats[criterion] = importance.InputStats()

    def phase_of(path: str) -> int:
        if path.startswith(block_path + "."):
            rest = path[len(block_path) + 1:]
            head = rest.split(".", 1)[0]
            if head.isdigit():
                return int(head)
        return n_blocks  # embeddings, final norm, head: the last phase

    tensors_of: list[list[str]] = [[] for _ in range(n_blocks + 1)]
    for name in residency.key_of:
        tensors_of[phase_of(name)].append(name)
    members_of: list[list[tuple[Group, Any]]] = [[] for _ in range(n_blocks + 1)]
    for g in groups:
        for m in g.members:
            if not m.is_buffer and m.param in ctx.params:
                members_of[phase_of(m.param)].append((g, m))
    modules_of: list[set[str]] = [set() for _ in range(n_blocks + 1)]
    for name, _ in model.named_modules():
        modules_of[phase_of(name)].add(name)

    blocks = model.get_submodule(block_path)
    scores: dict[int, torch.Tensor] = {}
    outputs: list = []
    lazy = _lazy_loads(model, residency, [n for n, _ in model.named_modules() if phase_of(n) == n_blocks]) \
        if calibrate else []
    try:
        for phase in tqdm(range(n_blocks + 1), desc=f"streaming {criterion}", disable=not progress, leave=False):
            units = [(tensors_of[phase], members_of[phase])]
            if calibrate:
                residency.load(tensors_of[phase])
                stats: importance.InputStats = ctx.stats[criterion]
                try:
                    outputs = _calibrate(model, ctx, stats, blocks, phase, n_blocks, outputs, batches, modules_of[phase])
                except Exception:
                    if all(n in residency.resident for n in tensors_of[n_blocks]):
                        raise
                    # a module read another one's weight without calling it (so its loader never ran): run
                    # this layer's batches again from scratch with the embeddings and head all in memory
                    stats.forget(modules_of[phase], [id(m) for _, m in members_of[phase]])
                    residency.load(tensors_of[n_blocks])
                    outputs = _calibrate(model, ctx, stats, blocks, phase, n_blocks, outputs, batches, modules_of[phase])
            else:  # weights only: one module's tensors at a time (its largest matrix, not a whole layer)
                units = _by_module(tensors_of[phase], members_of[phase])
            for tensors, members in units:
                residency.load(tensors)
                for g, m in members:
                    s = importance.score_member(ctx, criterion, g, m)
                    if s is not None:
                        scores[id(m)] = s
                ctx.stats.get("index_sums", {}).clear()  # per-parameter sums of the tensors just scored
                if not calibrate:
                    residency.release(tensors)
            residency.release(tensors_of[phase])
    finally:
        for h in lazy:
            h.remove()
        residency.release_all()
    out = {}
    for g in groups:
        per_member = {m: scores[id(m)] for m in g.members if id(m) in scores}
        out[g] = importance.combine(per_member, aggregate)
    return out


# ---- the public entry point ------------------------------------------------------------------------


def check_criterion(criterion) -> None:
    """Refuse (:class:`~depgraph.errors.StreamError`) a criterion streaming cannot compute one layer at a time."""
    if not isinstance(criterion, str):
        raise StreamError(f"prune_checkpoint needs a criterion name, got {type(criterion).__name__}: callables and "
                          "fixed scores read the model, which streaming never holds whole; use depgraph.Pruner")
    if criterion not in importance.CRITERIA:
        raise StreamError(f"unknown criterion {criterion!r}; registered: {', '.join(sorted(importance.CRITERIA))}")
    spec = importance.CRITERIA[criterion]
    if spec.collect is not None and spec.collect is not importance.input_statistics:
        streamable = sorted(n for n, s in importance.CRITERIA.items()
                            if s.collect is None or s.collect is importance.input_statistics)
        raise StreamError(f"criterion {criterion!r} needs gradients or second-order statistics of the whole model "
                          "(a full backward pass), which streaming pruning never holds in memory; use the "
                          "in-memory depgraph.Pruner for it, or stream with one of: " + ", ".join(streamable)
                          + "; nothing was written")


def prune_checkpoint(src: str | Path, out: str | Path, *, ratio: float | Mapping[str, float] = 0.2,
                     criterion: str = "l2", aggregate: str = "sum", target: str = "units", scope: str = "local",
                     structure: str = "block", kinds=None, skip_first: int = 0, skip_last: int = 0,
                     round_to: int | None = None, head_round_to: int | None = None, calib=None, seed: int = 0,
                     normalize: str | None = "auto", hf_loadable: bool = False, allow_partial: bool = False,
                     max_shard_size: int | str = DEFAULT_SHARD_SIZE, progress: bool = True,
                     **options) -> PruneReport:
    """Prune the Hugging Face safetensors checkpoint in directory ``src`` into ``out``, layer by layer.

    The model never needs to fit in memory (see the module docstring). Arguments mean what they mean for
    :class:`depgraph.Pruner` (one step; no reconstruction); on a model that fits, the result equals
    ``Pruner(model, ...).prune()`` followed by :func:`depgraph.save_pretrained`. ``criterion``: ``l1``,
    ``l2``, ``random``, ``wanda``, ``activation`` or a registered criterion without statistics of its own;
    ``taylor_*`` and ``obs`` need the whole model and raise :class:`~depgraph.errors.StreamError`.
    ``calib``: token ids ``[N, L]`` or a list of batches (for ``wanda``/``activation``).
    ``max_shard_size``: bytes (or ``"5GB"``) per output shard; an index is written when there are several.
    Tokenizer and generation files are copied. Returns the cut's :class:`~depgraph.PruneReport` (with
    ``report.target``), computed on the meta model (``verified`` is False: nothing ran on the pruned weights).

    Raises :class:`~depgraph.errors.StreamError` (bad source, unsupported criterion, weights the config does
    not name) or :class:`~depgraph.errors.PlanError` (bad arguments) before anything is written; the output
    is written atomically, so on any failure (Ctrl-C included) ``out`` is left as it was.
    """
    check_criterion(criterion)
    source = SourceCheckpoint(src)
    out = Path(out)
    if out.resolve() == source.path.resolve():
        raise StreamError(f"out {out} is the source directory: write the pruned checkpoint elsewhere")
    if out.exists() and not out.is_dir():
        raise StreamError(f"out {out} exists and is not a directory")
    try:
        model = load_model(ResolvedSpec("hf", str(source.path), source.path), meta=True)
    except DepGraphError as exc:
        raise StreamError(f"cannot build the model of {source.path} from its config: {exc}") from exc
    key_of, state_key = _bind(model, source)
    try:
        block_path, blocks = depth.find_blocks(model)
    except DepGraphError as exc:
        raise StreamError(f"streaming needs the decoder layers in one ModuleList: {exc}") from exc
    graph = trace(model)
    settings = dict(aggregate=aggregate, ratio=ratio, target=target, scope=scope, structure=structure, kinds=kinds,
                    skip_first=skip_first, skip_last=skip_last, round_to=round_to, head_round_to=head_round_to,
                    seed=seed, progress=progress, normalize=normalize, hf_loadable=hf_loadable,
                    allow_partial=allow_partial)
    pruner = Pruner(graph, criterion=criterion, calib=calib, **settings, **options)  # checks every argument
    spec = importance.CRITERIA[criterion]
    batches = None
    if spec.needs_calib:
        batches = calibration.batches(calib, calibration.vocab_size(model))
    _real_buffers(model)
    meta = sorted(n for n, b in model.named_buffers() if b.is_meta and n not in key_of)
    if meta:  # the buffers file of the output needs their values
        raise StreamError(f"buffer(s) {', '.join(meta[:3])} have no values (not in the checkpoint, not computed by "
                          "the model's constructor); prune this model in memory with depgraph.Pruner")
    residency = _Residency(model, source, key_of)
    if spec.reads_weights:
        scores = _stream_scores(graph, [g for g in pruner.groups if g.size > 0], criterion, aggregate, batches,
                                residency, block_path, len(blocks), seed, progress, options)
        pruner = Pruner(graph, criterion=scores, **settings)
    plan = pruner.plan()
    cuts = tensor_cuts(graph, plan)
    report = pruner.step(plan)  # cuts the meta model: new shapes, module attributes, config

    # ---- write: shards tensor by tensor, then config / layout / buffers, then tokenizer files
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    alias = canonical_names(model)
    planned: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    order = {k: i for i, k in enumerate(model.state_dict())}
    # every checkpoint key under its own name (a checkpoint transformers renames on loading stays so), in the
    # model's order
    for key in sorted(source.shape, key=lambda k: order[state_key[k]]):
        name = alias[state_key[key]]
        shape = cuts[name].shape if name in cuts else source.shape[key]
        if tuple(tensors[name].shape) != tuple(shape):  # the cut meta model and the tensor cuts must agree
            raise StreamError(f"internal: {name} planned {shape}, cut model has {tuple(tensors[name].shape)}")
        planned[key] = (tuple(shape), source.dtype[key])
    split = split_torch_state_dict_into_shards(
        {k: torch.empty(s, dtype=d, device="meta") for k, (s, d) in planned.items()},
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)

    def produce(key: str) -> torch.Tensor:
        value = source.read(key)
        cut = cuts.get(alias[state_key[key]])
        return value if cut is None else cut.apply(value)

    model.config.dtype = source.float_dtype()  # what from_pretrained + save_pretrained would state
    state = checkpoint.save_layout(model)
    with tqdm(total=len(planned), desc="writing", disable=not progress, leave=False) as bar, \
            checkpoint.atomic_directory(out) as tmp:
        def counted(key: str) -> torch.Tensor:
            bar.update(1)
            return produce(key)

        for filename, keys in split.filename_to_tensors.items():
            write_safetensors(tmp / filename, [(k, *planned[k]) for k in keys], counted)
        if split.is_sharded:
            index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}
            (tmp / checkpoint.INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        checkpoint.write_checkpoint(model, tmp, state, weights=False)
        for entry in source.path.iterdir():
            if entry.is_file() and TOKENIZER_FILES.fullmatch(entry.name):
                shutil.copy2(entry, tmp / entry.name)
    return report
