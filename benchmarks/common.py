"""Shared pieces of the benchmarks: the small Llama LMs they train themselves, and cost measures.

The benchmark model is a Llama (GQA, untied embeddings) trained from scratch on WikiText-2 ``valid.txt``
for a few CPU minutes, so the quality benchmark has a real, non-random LM to prune without downloading
weights. Two tokenizers: byte-level (:class:`depgraph.data.ByteTokenizer`, the default) and a BPE
tokenizer (the ``tokenizers`` library, :data:`BPE_VOCAB` tokens, trained on the same ``valid.txt``):
per-byte perplexities compress the differences between pruning methods, per-BPE-token ones less so.
Each is cached on disk keyed by everything that determines it.

Run ``python benchmarks/common.py [--quick] [--tokenizer byte|bpe] [--retrain]`` to train (or load) one
and print its perplexity.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from depgraph.data import ByteTokenizer, default_text_path, read_text
from depgraph.evaluate import perplexity

TOKENIZERS = ("byte", "bpe")
BPE_VOCAB = 2048  # a few thousand: the embedding (2 x 2048 x 256) stays a minor part of the full model
BPE_SPECIAL = ("<pad>", "<bos>", "<eos>")
BPE_RECIPE = {"steps": 300, "batch_size": 16}  # ~2 passes over valid.txt's ~0.3M BPE tokens

CACHE_ENV = "DEPGRAPH_CACHE"
# The library has no default data folder: the benchmarks use the WikiText-2 copy beside the repository
# unless DEPGRAPH_DATA_DIR names another one.
_SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
if "DEPGRAPH_DATA_DIR" not in os.environ and _SHARED_DATA.is_dir():
    os.environ["DEPGRAPH_DATA_DIR"] = str(_SHARED_DATA)
SEQ_LEN = 128
_CACHE_VERSION = 1  # bump when the training recipe changes in a way the key below does not capture

# Full: ~3M params, a few minutes on 2 cores. Quick: ~0.4M params, about a minute; both keep GQA
# (2 query heads per KV head) so the pruning benchmark still sees grouped attention.
FULL = {
    "model": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
    ),
    "steps": 400,
    "batch_size": 32,
    "lr": 3e-3,
}
QUICK = {
    "model": dict(
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    ),
    "steps": 700,
    "batch_size": 16,
    "lr": 4e-3,
}


def default_cache_dir() -> Path:
    """``$DEPGRAPH_CACHE`` if set, else ``~/.cache/depgraph/bench``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "depgraph" / "bench"


def tiny_llama_config(quick: bool = False, vocab_size: int | None = None, tokenizer: Any = None) -> LlamaConfig:
    """The benchmark LM's architecture (context 128, untied embeddings); byte vocabulary unless
    ``tokenizer`` (which gives the special ids) or ``vocab_size`` says otherwise."""
    spec = QUICK if quick else FULL
    tok = tokenizer if tokenizer is not None else ByteTokenizer()
    return LlamaConfig(
        vocab_size=vocab_size or len(tok),
        max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **spec["model"],
    )


def train_bpe_tokenizer(path: str | os.PathLike[str], vocab_size: int = BPE_VOCAB) -> Any:
    """A byte-level BPE tokenizer trained on the text file ``path`` (``tokenizers``; deterministic), wrapped
    as a ``transformers.PreTrainedTokenizerFast`` (``encode``, ``save_pretrained``, ``AutoTokenizer``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BPE_SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(path)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=BPE_SPECIAL[0], bos_token=BPE_SPECIAL[1],
                                   eos_token=BPE_SPECIAL[2], model_max_length=1 << 30)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (either benchmark tokenizer)."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return tokenizer.encode(text, add_special_tokens=False)


def _lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _unigram_ppl(train: torch.Tensor, test: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of the add-one smoothed byte-frequency model: the floor a real LM must beat clearly."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-float(logp[test].mean()))


def train_tiny_llama(
    cache_dir: str | os.PathLike[str] | None = None,
    steps: int | None = None,
    seed: int = 0,
    quick: bool = False,
    retrain: bool = False,
    verbose: bool = True,
    tokenizer: str = "byte",
    threads: int = 2,
) -> tuple[LlamaForCausalLM, Any, dict[str, Any]]:
    """Train (or load from cache) the benchmark's Llama; returns ``(model, tokenizer, info)``.

    ``tokenizer``: ``"byte"`` (:class:`ByteTokenizer`) or ``"bpe"`` (:func:`train_bpe_tokenizer` on
    ``valid.txt``, :data:`BPE_VOCAB` tokens; same architecture and recipe, so one step sees about three
    times as much text; :data:`BPE_RECIPE`: 300 steps of 16 x 128 tokens). ``threads``: torch threads
    while training (left set afterwards).

    Full: hidden 256, MLP 688, 4 layers, 8 heads / 4 KV heads (head_dim 32), 400 AdamW steps of 32x128
    bytes. Quick: hidden 128, MLP 344, 2 layers, 4 heads / 2 KV heads, 700 steps of 16x128. ``steps``
    overrides the step count. The cache entry is keyed by a hash of the config, recipe, seed and the
    training file's size; ``retrain=True`` ignores an existing entry. ``info`` holds the final train
    loss, steps, wall time, test-split perplexity (first 128K tokens of ``test.txt``) and the
    unigram baseline. The model is returned in eval mode.
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    torch.set_num_threads(threads)
    spec = QUICK if quick else FULL
    if tokenizer == "bpe":  # a BPE token is ~4 bytes of text and the output layer is 8x wider: fewer, smaller steps
        spec = {**spec, **BPE_RECIPE}
    steps = spec["steps"] if steps is None else steps
    kind = tokenizer
    train_path = default_text_path("valid")
    if kind == "byte":
        tokenizer = ByteTokenizer()
        config = tiny_llama_config(quick, len(tokenizer), tokenizer)
    else:  # trained (a few seconds) only when the model is; the special tokens come first: ids 0, 1, 2
        tokenizer = None
        ids = dict(zip(("pad_token_id", "bos_token_id", "eos_token_id"), range(len(BPE_SPECIAL))))
        config = tiny_llama_config(quick, BPE_VOCAB, argparse.Namespace(**ids))
    key_src = {
        "version": _CACHE_VERSION,
        "config": config.to_diff_dict(),
        "steps": steps,
        "seed": seed,
        "batch_size": spec["batch_size"],
        "lr": spec["lr"],
        "seq_len": SEQ_LEN,
        "data_bytes": train_path.stat().st_size,
    }
    if kind != "byte":  # the byte model's key (and cache entry) predates the BPE one: left as it was
        key_src.update(tokenizer=kind)
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()[:16]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    entry = root / f"tiny-llama-{'' if kind == 'byte' else kind + '-'}{'quick' if quick else 'full'}-{key}"

    if entry.is_dir() and (entry / "info.json").is_file() and not retrain:
        model = LlamaForCausalLM.from_pretrained(entry, dtype=torch.float32, local_files_only=True)
        model.eval()
        info = json.loads((entry / "info.json").read_text())
        info.update(cached=True, path=str(entry))
        if verbose:
            print(f"[tiny-llama] loaded {entry} (test ppl {info['test_ppl']:.3f})")
        if kind == "byte":
            return model, ByteTokenizer.from_pretrained(entry), info
        from transformers import PreTrainedTokenizerFast

        return model, PreTrainedTokenizerFast.from_pretrained(entry), info

    if tokenizer is None:
        tokenizer = train_bpe_tokenizer(train_path)
        if len(tokenizer) != BPE_VOCAB:
            raise RuntimeError(f"the BPE tokenizer has {len(tokenizer)} tokens, the model {BPE_VOCAB}: too little text")
    train_ids = torch.tensor(encode(tokenizer, read_text(train_path)), dtype=torch.long)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # norms: no weight decay
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec["lr"],
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(SEQ_LEN + 1)
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, spec["lr"])
        starts = torch.randint(0, train_ids.numel() - SEQ_LEN - 1, (spec["batch_size"],), generator=gen)
        batch = train_ids[starts[:, None] + offsets]
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if verbose and (step % 50 == 0 or step == steps - 1):
            print(
                f"[tiny-llama] step {step:4d}/{steps} loss {loss.item():.4f} "
                f"({time.perf_counter() - t0:.0f}s)"
            )
    train_time = time.perf_counter() - t0
    model.eval()

    eval_tokens = 131072
    test_ids = torch.tensor(encode(tokenizer, read_text(default_text_path("test"))), dtype=torch.long)
    test = perplexity(model, test_ids, context_length=SEQ_LEN, max_tokens=eval_tokens, progress=False)
    tail = losses[-max(1, steps // 10) :]
    info: dict[str, Any] = {
        "quick": quick,
        "tokenizer": kind,
        "vocab_size": len(tokenizer),
        "steps": steps,
        "seed": seed,
        "batch_size": spec["batch_size"],
        "lr": spec["lr"],
        "seq_len": SEQ_LEN,
        "params": param_count(model),
        "train_time_s": round(train_time, 1),
        "train_loss": sum(tail) / len(tail),
        "train_tokens": steps * spec["batch_size"] * SEQ_LEN,
        "test_ppl": test.ppl,
        "test_nll": test.nll,
        "test_ppl_tokens": test.tokens,
        "unigram_test_ppl": _unigram_ppl(train_ids, test_ids[:eval_tokens], len(tokenizer)),
        "torch_threads": torch.get_num_threads(),
        "key": key,
    }

    # Write to a temp dir and rename, so an interrupted run never leaves a half-written cache entry.
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".tmp-", dir=root))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    if entry.exists():
        shutil.rmtree(entry)
    tmp.rename(entry)
    info.update(cached=False, path=str(entry))
    if verbose:
        print(
            f"[tiny-llama] trained {info['params']:,} params, {steps} steps in {train_time:.0f}s; "
            f"train loss {info['train_loss']:.3f}; test ppl {test.ppl:.3f} over {test.tokens:,} {kind} tokens "
            f"(unigram baseline {info['unigram_test_ppl']:.2f}); saved to {entry}"
        )
    return model, tokenizer, info


def param_count(model: torch.nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


def _dummy_ids(model: torch.nn.Module, seq_len: int) -> torch.Tensor:
    device = next(model.parameters()).device
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 2
    # A fixed, in-vocabulary pattern: cost does not depend on the ids, only on the shape.
    return (torch.arange(seq_len, device=device) % vocab).unsqueeze(0)


def _sdpa_cpu_flops(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of CPU fused attention (QK^T and AV; GQA-aware, causal mask not discounted, as for eager)."""
    b, h, sq, d = q
    return 2 * b * h * sq * k[-2] * (d + v[-1])


def macs(model: torch.nn.Module, seq_len: int = SEQ_LEN) -> int:
    """Multiply-accumulates of one forward pass on a ``[1, seq_len]`` input (FlopCounterMode flops / 2).

    Counts matmul-type ops (linear layers, attention scores and mixing). FlopCounterMode has no
    formula for the CPU fused SDPA kernel, so one is supplied; it gives the same count as eager attention.
    """
    from torch.utils.flop_counter import FlopCounterMode

    custom = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        custom[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
    ids = _dummy_ids(model, seq_len)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=custom) as counter:
        model(input_ids=ids, use_cache=False)
    return counter.get_total_flops() // 2


def latency_ms(model: torch.nn.Module, seq_len: int = SEQ_LEN, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time (ms) of one ``[1, seq_len]`` forward pass, after ``warmup`` untimed passes."""
    ids = _dummy_ids(model, seq_len)
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            t = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            if i >= warmup:
                times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the ~1 minute model instead of the full one")
    parser.add_argument("--retrain", action="store_true", help="ignore a cached model")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="byte")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model, _, info = train_tiny_llama(
        args.cache_dir, steps=args.steps, quick=args.quick, retrain=args.retrain, tokenizer=args.tokenizer,
        threads=args.threads,
    )
    print(json.dumps({k: v for k, v in info.items() if k != "path"}, indent=2))
    print(
        f"params {param_count(model):,}  MACs@{SEQ_LEN} {macs(model):,}  latency {latency_ms(model):.2f} ms"
    )


if __name__ == "__main__":
    main()
