"""Text -> token-id batches: the calibration data that scoring and pruning run on.

Everything here is offline: the text comes from the WikiText-2 copy in the shared data folder (or from
the caller), and :class:`ByteTokenizer` needs no vocabulary download.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DATA_DIR_ENV",
    "ByteTokenizer",
    "calibration_batches",
    "data_dir",
    "default_text_path",
    "id_streams",
    "read_text",
    "tokenize_text",
]

DATA_DIR_ENV = "DEPGRAPH_DATA_DIR"
_SPLITS = ("valid", "test")
# A str shorter than this without a newline is tried as a file name before being taken as text.
_MAX_PATH_CHARS = 4096


def data_dir() -> Path:
    """The WikiText-2 folder: ``$DEPGRAPH_DATA_DIR`` if set, else ``<repo>/../shared/data/wikitext-2``."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parents[1]
    return repo_root.parent / "shared" / "data" / "wikitext-2"


def default_text_path(split: str = "valid") -> Path:
    """Path of WikiText-2 ``valid.txt`` (calibration) or ``test.txt`` (perplexity).

    Raises ``FileNotFoundError`` naming the path looked at and the env var that overrides the folder.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    path = data_dir() / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(
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
        path = directory / "byte_tokenizer.json"
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
        path = Path(directory) / "byte_tokenizer.json"
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


def id_streams(source: Any = None, tokenizer: Any = None) -> list[torch.Tensor]:
    """Normalise any supported source into a list of 1-D LongTensor token streams.

    ``source``: None (WikiText-2 valid), a ``Path`` or the name of an existing file, a string of text,
    a LongTensor ``[L]`` (one stream) or ``[N, L]`` (N streams), or a list of id tensors / id lists.
    Text needs ``tokenizer``; ids pass through untouched.
    """
    if source is None:
        source = default_text_path("valid")
    if isinstance(source, (str, os.PathLike)):
        text = read_text(source) if isinstance(source, os.PathLike) or _looks_like_file(source) else source
        if tokenizer is None:
            raise ValueError(
                "text input needs a tokenizer: pass tokenizer=... (an HF tokenizer or "
                "depgraph.data.ByteTokenizer) "
                "or pass token ids (a LongTensor or a list of them) instead of text"
            )
        return [tokenize_text(text, tokenizer)]
    if isinstance(source, torch.Tensor):
        if source.dim() == 1:
            streams = [source]
        elif source.dim() == 2:
            streams = list(source.unbind(0))
        else:
            raise ValueError(f"token-id tensor must be [L] or [N, L], got shape {tuple(source.shape)}")
    elif isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("empty list of token ids")
        if all(isinstance(x, int) for x in source):  # a single flat list of ids
            source = [source]
        streams = []
        for item in source:
            t = torch.as_tensor(item)
            if t.dim() == 2 and t.shape[0] == 1:  # a [1, L] batch as returned by tokenizers
                t = t[0]
            if t.dim() != 1:
                raise ValueError(
                    f"each list item must be [L] or [1, L] token ids, got shape {tuple(t.shape)}"
                )
            streams.append(t)
    else:
        raise TypeError(f"unsupported source type {type(source).__name__}")
    for t in streams:
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor, got dtype {t.dtype}")
    return [t.to(torch.long).cpu() for t in streams]


def _check_vocab(streams: list[torch.Tensor], vocab_size: int | None) -> None:
    lo = min(int(t.min()) for t in streams if t.numel())
    if lo < 0:
        raise ValueError(f"token ids must be non-negative, found {lo}")
    if vocab_size is not None:
        hi = max(int(t.max()) for t in streams if t.numel())
        if hi >= vocab_size:
            raise ValueError(
                f"token id {hi} is out of range for vocab_size {vocab_size} "
                f"(max allowed id {vocab_size - 1}); "
                "is the tokenizer the model's own?"
            )


def calibration_batches(
    source: Any = None,
    tokenizer: Any = None,
    n_samples: int = 8,
    seq_len: int = 128,
    seed: int = 0,
    vocab_size: int | None = None,
    batch_size: int = 1,
) -> list[torch.LongTensor]:
    """Deterministic random windows of ``seq_len`` tokens drawn from ``source``.

    Each window start is drawn uniformly (with replacement) over every position of every stream
    where a full window fits, using a ``torch.Generator`` seeded with ``seed``, so the same arguments
    always give the same batches. Returns ``ceil(n_samples / batch_size)`` tensors of shape
    ``[batch_size, seq_len]`` (the last one smaller if ``batch_size`` does not divide ``n_samples``);
    with the default ``batch_size=1`` that is ``n_samples`` tensors of shape ``[1, seq_len]``.

    ``source`` is anything :func:`id_streams` accepts. When ``vocab_size`` is given, every id is
    checked against it so a tokenizer/model mismatch fails here rather than as an index error later.
    """
    if n_samples < 1 or seq_len < 1 or batch_size < 1:
        raise ValueError(
            f"n_samples, seq_len and batch_size must be >= 1, got {n_samples}, {seq_len}, {batch_size}"
        )
    streams = id_streams(source, tokenizer)
    if all(t.numel() == 0 for t in streams):
        raise ValueError("source contains no tokens")
    _check_vocab(streams, vocab_size)

    # Number of window starts per stream; sampling a flat index over all of them weights streams by length.
    counts = torch.tensor([max(t.numel() - seq_len + 1, 0) for t in streams], dtype=torch.long)
    total = int(counts.sum())
    if total == 0:
        longest = max(t.numel() for t in streams)
        raise ValueError(f"no stream is long enough for seq_len={seq_len}: the longest has {longest} tokens")
    ends = counts.cumsum(0)
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randint(0, total, (n_samples,), generator=gen)
    which = torch.searchsorted(ends, flat, right=True)
    samples = []
    for f, s in zip(flat.tolist(), which.tolist(), strict=True):
        start = f - (int(ends[s]) - int(counts[s]))
        samples.append(streams[s][start : start + seq_len].clone())
    return [torch.stack(samples[i : i + batch_size]) for i in range(0, n_samples, batch_size)]
