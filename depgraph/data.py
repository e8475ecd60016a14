"""Text -> token-id batches: the calibration and evaluation data that scoring, pruning and perplexity use.

Sources (:func:`texts`, :func:`id_streams`): a text file, a string of text, a list of strings, a 🤗
``datasets.Dataset`` (its ``text`` column), a ``load_dataset`` spec (a dict with ``path``, ``split`` and
optionally ``name`` / ``text_column``; needs the optional ``datasets`` package), or token-id tensors.
Text is tokenized with the tokenizer the caller passes: a tokenizer object, or a model directory whose own
tokenizer is loaded (``AutoTokenizer``, or the demo models' :class:`ByteTokenizer`); which one was used is
logged and returned by :func:`describe_tokenizer`. Nothing falls back silently: text without a tokenizer,
or no source without ``$DEPGRAPH_DATA_DIR``, is a :class:`~depgraph.errors.CalibrationError` naming what
to pass. Everything here is offline.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .calibration import check_ids
from .errors import CalibrationError, DataNotFoundError

__all__ = [
    "DATA_DIR_ENV",
    "ByteTokenizer",
    "calibration_batches",
    "data_dir",
    "default_text_path",
    "describe_tokenizer",
    "id_streams",
    "read_text",
    "resolve_tokenizer",
    "tokenizer_from_directory",
    "texts",
    "tokenize_text",
]

logger = logging.getLogger("depgraph")

DATA_DIR_ENV = "DEPGRAPH_DATA_DIR"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
BYTE_TOKENIZER_FILE = "byte_tokenizer.json"
_SPLITS = ("valid", "test")
# A str shorter than this without a newline is tried as a file name before being taken as text.
_MAX_PATH_CHARS = 4096


def data_dir() -> Path:
    """The folder holding WikiText-2 ``valid.txt`` / ``test.txt``: ``$DEPGRAPH_DATA_DIR``.

    There is no default (an installed package has no data folder beside it): without the variable this
    raises :class:`DataNotFoundError` (a ``FileNotFoundError``) saying to set it or to pass data explicitly.
    """
    env = os.environ.get(DATA_DIR_ENV)
    if not env:
        raise DataNotFoundError(
            f"no data folder: set the {DATA_DIR_ENV} environment variable to the folder holding WikiText-2 "
            "valid.txt/test.txt, or pass the data explicitly (a text file, a list of strings, a datasets "
            "Dataset or token ids)"
        )
    return Path(env).expanduser()


def default_text_path(split: str = "valid") -> Path:
    """Path of WikiText-2 ``valid.txt`` (calibration) or ``test.txt`` (perplexity) in :func:`data_dir`.

    Raises :class:`DataNotFoundError` (a ``FileNotFoundError``) naming the path looked at and the env var.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    path = data_dir() / f"{split}.txt"
    if not path.is_file():
        raise DataNotFoundError(
            f"WikiText-2 {split} split not found at {path}. Put valid.txt/test.txt there or point "
            f"the {DATA_DIR_ENV} environment variable at the folder that holds them."
        )
    return path


def read_text(path: str | os.PathLike[str]) -> str:
    """Read a UTF-8 text file (undecodable bytes replaced rather than failing mid-run)."""
    return Path(path).read_text(encoding="utf-8", errors="replace")


class ByteTokenizer:
    """Byte-level tokenizer: ids 0..255 are UTF-8 bytes, then ``<pad>``, ``<bos>``, ``<eos>``.

    Tiny and download-free, so the benchmark LM and the tests never need a hub tokenizer.
    """

    SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")

    def __init__(self) -> None:
        self.pad_token_id = 256
        self.bos_token_id = 257
        self.eos_token_id = 258

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.SPECIAL_TOKENS)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """UTF-8 bytes of ``text`` as ids, optionally wrapped in ``<bos>``/``<eos>``."""
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.bos_token_id)
        if add_eos:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Bytes back to text; special ids are dropped (or spelled out) and bad UTF-8 is replaced."""
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif 256 <= i < self.vocab_size:
                if not skip_special_tokens:
                    out.extend(self.SPECIAL_TOKENS[i - 256].encode())
            else:
                raise ValueError(
                    f"id {i} is outside the byte tokenizer's vocabulary (size {self.vocab_size})"
                )
        return out.decode("utf-8", errors="replace")

    def __call__(self, text: str, **_: Any) -> dict[str, list[int]]:
        """HF-style call so code written for hub tokenizers also accepts this one."""
        return {"input_ids": self.encode(text)}

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``byte_tokenizer.json`` into ``directory`` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / BYTE_TOKENIZER_FILE
        spec = {
            "type": "ByteTokenizer",
            "vocab_size": self.vocab_size,
            "special_tokens": list(self.SPECIAL_TOKENS),
        }
        path.write_text(json.dumps(spec, indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> ByteTokenizer:
        """Load what :meth:`save_pretrained` wrote, checking it describes this tokenizer."""
        path = Path(directory) / BYTE_TOKENIZER_FILE
        spec = json.loads(path.read_text())
        tok = cls()
        if spec.get("type") != "ByteTokenizer" or spec.get("special_tokens") != list(cls.SPECIAL_TOKENS):
            raise ValueError(f"{path} does not describe a ByteTokenizer with specials {cls.SPECIAL_TOKENS}")
        return tok


def tokenize_text(text: str, tokenizer: Any) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D LongTensor, from a :class:`ByteTokenizer` or an HF tokenizer.

    HF tokenizers are called with their defaults (a Llama tokenizer adds one BOS at the start), the
    usual recipe for WikiText perplexity and calibration.
    """
    if isinstance(tokenizer, ByteTokenizer):
        return torch.tensor(tokenizer.encode(text), dtype=torch.long)
    # verbose=False: long texts get cut into windows later, so the "too long" warning is noise.
    ids = tokenizer(text, verbose=False)["input_ids"]
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:  # tokenizer was configured to return a batch
        ids = ids[0]
    return ids


def _looks_like_file(source: str) -> bool:
    return len(source) < _MAX_PATH_CHARS and "\n" not in source and os.path.isfile(source)


def tokenizer_from_directory(directory: str | os.PathLike[str]) -> Any | None:
    """The tokenizer saved in ``directory``: :class:`ByteTokenizer` (``byte_tokenizer.json``), else its
    ``AutoTokenizer`` (local files only); None when the directory holds no tokenizer files."""
    directory = Path(directory)
    if (directory / BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer.from_pretrained(directory)
    if any((directory / name).is_file() for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CalibrationError(f"cannot load the tokenizer in {directory}: {first}") from exc
    return None


def resolve_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object as given, or the one saved in a directory (``str``/``Path``: a model's or a
    tokenizer's own): see :func:`tokenizer_from_directory`."""
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    directory = Path(tokenizer).expanduser()
    if not directory.is_dir():
        raise CalibrationError(f"tokenizer={str(tokenizer)!r} is not a directory: pass a model directory that "
                               "holds tokenizer files, or a tokenizer object")
    loaded = tokenizer_from_directory(directory)
    if loaded is None:
        raise CalibrationError(f"{directory} holds no tokenizer files ({', '.join(TOKENIZER_FILES)} or "
                               f"{BYTE_TOKENIZER_FILE}): pass tokenizer= the directory of the model's original "
                               "checkpoint, or a tokenizer object")
    return loaded


def describe_tokenizer(tokenizer: Any) -> str:
    """Which tokenizer this is, for logs and reports: its class and where it was loaded from."""
    where = getattr(tokenizer, "name_or_path", None)
    return type(tokenizer).__name__ + (f" from {where}" if where else "")


def _is_dataset(source: Any) -> bool:
    datasets = sys.modules.get("datasets")  # a Dataset cannot exist unless datasets was imported
    return datasets is not None and isinstance(source, (datasets.Dataset, datasets.IterableDataset))


def _dataset_texts(dataset: Any, text_column: str) -> list[str]:
    columns = list(getattr(dataset, "column_names", None) or [])
    if text_column not in columns:
        raise CalibrationError(f"the dataset has no column {text_column!r} (columns: {columns}): pass "
                               "text_column= naming the one that holds the text")
    return [row[text_column] for row in dataset if isinstance(row[text_column], str)]


def _load_dataset_spec(spec: Mapping[str, Any]) -> tuple[Any, str]:
    """``{"path": ..., "split": ..., "name": ..., "text_column": ..., **load_dataset kwargs}`` -> rows."""
    spec = dict(spec)
    if "path" not in spec or "split" not in spec:
        raise CalibrationError(f"a load_dataset spec needs 'path' and 'split' (and optionally 'name', "
                               f"'text_column', other load_dataset keywords), got keys {sorted(spec)}")
    text_column = spec.pop("text_column", "text")
    try:
        import datasets
    except ImportError as exc:
        raise CalibrationError("a load_dataset spec needs the optional 'datasets' package: pip install "
                               "'depgraph[data]' (or pass a text file, a list of strings or token ids)") from exc
    return datasets.load_dataset(**spec), text_column


def texts(source: Any, text_column: str = "text") -> list[str] | None:
    """The text in ``source`` as a list of documents, or None when ``source`` holds token ids.

    ``source``: a ``Path`` or the name of an existing file (its text), another ``str`` (the text itself),
    a list/tuple of strings, a ``datasets.Dataset`` (column ``text_column``), or a ``load_dataset`` spec
    dict (``path``, ``split``, optional ``name`` / ``text_column``).
    """
    if isinstance(source, os.PathLike) or (isinstance(source, str) and _looks_like_file(source)):
        path = Path(source)
        if not path.is_file():
            raise DataNotFoundError(f"no such text file: {path}")
        return [read_text(path)]
    if isinstance(source, str):
        return [source]
    if isinstance(source, Mapping) and "path" in source:
        dataset, text_column = _load_dataset_spec(source)
        return _dataset_texts(dataset, text_column)
    if _is_dataset(source):
        return _dataset_texts(source, text_column)
    if isinstance(source, (list, tuple)) and source and all(isinstance(x, str) for x in source):
        return list(source)
    return None


def id_streams(source: Any = None, tokenizer: Any = None, text_column: str = "text") -> list[torch.Tensor]:
    """Normalise any supported source into a list of 1-D LongTensor token streams.

    ``source``: anything :func:`texts` accepts (documents are joined with a blank line into one stream,
    the usual calibration recipe), a LongTensor ``[L]`` (one stream) or ``[N, L]`` (N streams), a list of
    id tensors / id lists, or None: WikiText-2 ``valid.txt`` in ``$DEPGRAPH_DATA_DIR``. Text needs
    ``tokenizer`` (an object, or a model directory whose own tokenizer is loaded); ids pass through.
    """
    if source is None:
        source = default_text_path("valid")
    docs = texts(source, text_column)
    if docs is not None:
        if tokenizer is None:
            raise CalibrationError(
                "text input needs a tokenizer: pass tokenizer= the model directory (its own tokenizer is "
                "loaded), an HF tokenizer, or depgraph.data.ByteTokenizer() for the byte-vocabulary demo "
                "models; or pass token ids (a LongTensor or a list of them) instead of text"
            )
        tokenizer = resolve_tokenizer(tokenizer)
        logger.info("tokenizing %d document(s) with %s", len(docs), describe_tokenizer(tokenizer))
        return [tokenize_text("\n\n".join(docs), tokenizer)]
    if isinstance(source, torch.Tensor):
        if source.dim() == 1:
            streams = [source]
        elif source.dim() == 2:
            streams = list(source.unbind(0))
        else:
            raise CalibrationError(f"token-id tensor must be [L] or [N, L], got shape {tuple(source.shape)}")
    elif isinstance(source, (list, tuple)):
        if not source:
            raise CalibrationError("empty list of token ids")
        if all(isinstance(x, int) for x in source):  # a single flat list of ids
            source = [source]
        streams = []
        for item in source:
            t = torch.as_tensor(item)
            if t.dim() == 2 and t.shape[0] == 1:  # a [1, L] batch as returned by tokenizers
                t = t[0]
            if t.dim() != 1:
                raise CalibrationError(
                    f"each list item must be [L] or [1, L] token ids, got shape {tuple(t.shape)}"
                )
            streams.append(t)
    else:
        raise CalibrationError(f"unsupported data source type {type(source).__name__}: pass a text file, a "
                               "string, a list of strings, a datasets.Dataset, a load_dataset spec dict or "
                               "token ids")
    for t in streams:
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise CalibrationError(f"token ids must be an integer tensor, got dtype {t.dtype}")
    return [t.to(torch.long).cpu() for t in streams]


def calibration_batches(
    source: Any = None,
    tokenizer: Any = None,
    n_samples: int = 8,
    seq_len: int = 128,
    seed: int = 0,
    vocab_size: int | None = None,
    batch_size: int = 1,
    text_column: str = "text",
) -> list[torch.LongTensor]:
    """Deterministic random windows of ``seq_len`` tokens drawn from ``source``.

    Each window start is drawn uniformly (with replacement) over every position of every stream
    where a full window fits, using a ``torch.Generator`` seeded with ``seed``, so the same arguments
    always give the same batches. Returns ``ceil(n_samples / batch_size)`` tensors of shape
    ``[batch_size, seq_len]`` (the last one smaller if ``batch_size`` does not divide ``n_samples``);
    with the default ``batch_size=1`` that is ``n_samples`` tensors of shape ``[1, seq_len]``.

    ``source`` is anything :func:`id_streams` accepts (``text_column`` names a Dataset's text column).
    Every id is checked to be non-negative and, when ``vocab_size`` is given, below it, so a
    tokenizer/model mismatch fails here rather than as an index error later.
    """
    if n_samples < 1 or seq_len < 1 or batch_size < 1:
        raise CalibrationError(
            f"n_samples, seq_len and batch_size must be >= 1, got {n_samples}, {seq_len}, {batch_size}"
        )
    streams = id_streams(source, tokenizer, text_column)
    if all(t.numel() == 0 for t in streams):
        raise CalibrationError("source contains no tokens")
    for i, t in enumerate(streams):
        if t.numel():
            check_ids(t, vocab_size, f"calibration stream {i}")

    # Number of window starts per stream; sampling a flat index over all of them weights streams by length.
    counts = torch.tensor([max(t.numel() - seq_len + 1, 0) for t in streams], dtype=torch.long)
    total = int(counts.sum())
    if total == 0:
        longest = max(t.numel() for t in streams)
        raise CalibrationError(f"no stream is long enough for seq_len={seq_len}: the longest has {longest} tokens")
    ends = counts.cumsum(0)
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randint(0, total, (n_samples,), generator=gen)
    which = torch.searchsorted(ends, flat, right=True)
    samples = []
    for f, s in zip(flat.tolist(), which.tolist(), strict=True):
        start = f - (int(ends[s]) - int(counts[s]))
        samples.append(streams[s][start : start + seq_len].clone())
    return [torch.stack(samples[i : i + batch_size]) for i in range(0, n_samples, batch_size)]
