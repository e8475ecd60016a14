"""Recover a pruned model's quality: LoRA, knowledge distillation, or LoRA trained by distillation.

>>> report = depgraph.heal(model, "train.txt", tokenizer=tok, method="lora+kd", teacher=unpruned,
...                        steps=200, eval_data="valid.txt", eval_every=50, patience=2)
>>> report.model is model     # healed in place; adapters merged: a plain model of the pruned shape

The training loop is transformers' :class:`~transformers.Trainer` (so gradient accumulation, learning-rate
schedules, checkpoints, resuming, progress bars and ``torchrun`` / ``accelerate launch`` DDP come from
there); the adapters are peft's LoRA. This module only adds the distillation loss (KL to the teacher's
logits at a temperature, plus the optional Minitron-style hidden-state loss), the token-window
datasets, validation before anything changes, and rollback: on any failure (``KeyboardInterrupt``
included) the model is left exactly as it was.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import id_streams
from .errors import HealError

__all__ = ["METHODS", "HealReport", "distillation_loss", "heal", "hidden_state_loss", "layer_map", "token_windows"]

METHODS = ("lora", "kd", "lora+kd")
_DEFAULT_LR = {"lora": 1e-3, "kd": 1e-4, "lora+kd": 1e-3}


@dataclass
class HealReport:
    """What :func:`heal` did. ``model`` is the healed model (the one passed in, adapters merged)."""

    model: nn.Module
    method: str
    steps: int
    train_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) at every log
    eval_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out LM loss)
    best_step: int | None = None
    stopped_early: bool = False
    resumed_from: str | None = None
    is_main_process: bool = True  # False on the other ranks of a distributed run: only rank 0 saves

    @property
    def eval_ppl(self) -> float | None:
        """Perplexity of the held-out text at the best (or last) evaluation."""
        if not self.eval_loss:
            return None
        losses = dict(self.eval_loss)
        return math.exp(losses[self.best_step] if self.best_step in losses else self.eval_loss[-1][1])

    def __str__(self) -> str:
        first = f"{self.train_loss[0][1]:.4f}" if self.train_loss else "-"
        last = f"{self.train_loss[-1][1]:.4f}" if self.train_loss else "-"
        text = f"heal ({self.method}): {self.steps} steps, train loss {first} -> {last}"
        if self.eval_loss:
            text += f"; held-out ppl {self.eval_ppl:.3f}"
            if self.best_step is not None:
                text += f" (best at step {self.best_step})"
        if self.stopped_early:
            text += "; stopped early"
        return text


class _Windows(torch.utils.data.Dataset):
    """Rows of a ``[N, L]`` id tensor as causal-LM examples (labels = inputs; the model shifts them)."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def token_windows(source: Any, tokenizer: Any = None, seq_len: int = 128,
                  vocab_size: int | None = None, what: str = "data") -> torch.Tensor:
    """Every non-overlapping window of ``seq_len`` tokens of ``source`` as a ``[N, seq_len]`` tensor.

    ``source`` is anything :func:`depgraph.data.id_streams` accepts (a text file, text with a
    ``tokenizer``, token-id tensors or lists). Raises :class:`HealError` naming ``what`` when there is
    no full window or an id is outside ``vocab_size``.
    """
    if seq_len < 2:
        raise HealError(f"seq_len must be >= 2 (one token predicts the next), got {seq_len}")
    try:
        streams = id_streams(source, tokenizer)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise HealError(f"{what}: {exc}") from exc
    rows = [t[: t.numel() // seq_len * seq_len].view(-1, seq_len) for t in streams if t.numel() >= seq_len]
    if not rows:
        longest = max((t.numel() for t in streams), default=0)
        raise HealError(f"{what} has no window of seq_len={seq_len} tokens (the longest stream has {longest}): "
                        "pass more text or a smaller seq_len")
    ids = torch.cat(rows)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        bad = lo if lo < 0 else hi
        raise HealError(f"{what}: token id {bad} is outside the model's vocabulary (size {vocab_size}): "
                        "tokenize with the model's own tokenizer")
    return ids


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def _num_layers(model: nn.Module) -> int | None:
    return getattr(_text_config(model), "num_hidden_layers", None)


def layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """(student, teacher) indices into ``hidden_states`` (0 = embeddings): proportional, last to last."""
    return [(i, round(i * teacher_layers / student_layers)) for i in range(1, student_layers + 1)]


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over tokens (float32; Hinton et al. scaling)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def hidden_state_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor]
                      ) -> torch.Tensor:
    """Minitron's intermediate-state loss: mean over mapped layers of MSE relative to the teacher's scale."""
    pairs = layer_map(len(student_hidden) - 1, len(teacher_hidden) - 1)
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for i, j in pairs:
        s, t = student_hidden[i].float(), teacher_hidden[j].float()
        total = total + F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-6)
    return total / len(pairs)


def _trainer_class():
    from transformers import Trainer

    class HealTrainer(Trainer):
        """Trainer whose loss mixes next-token CE, KD to a teacher and a hidden-state loss.

        Evaluation always reports the plain next-token loss of the held-out text, whatever the
        training loss, so early stopping and the best checkpoint follow perplexity.
        """

        loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides by the accumulation steps

        def __init__(self, *args, teacher: nn.Module | None = None, weights: dict[str, float], temperature: float,
                     **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher
            self.weights = weights
            self.temperature = temperature

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            hidden = model.training and self.weights["hidden"] > 0
            outputs = model(input_ids=inputs["input_ids"], labels=inputs["labels"], use_cache=False,
                            output_hidden_states=hidden)
            loss = outputs.loss
            if model.training and self.teacher is not None:
                loss = loss * self.weights["ce"]
                with torch.no_grad():
                    target = self.teacher(input_ids=inputs["input_ids"], use_cache=False,
                                          output_hidden_states=hidden)
                if self.weights["kd"] > 0:
                    kd = distillation_loss(outputs.logits, target.logits, self.temperature)
                    loss = loss + self.weights["kd"] * kd
                if hidden:
                    loss = loss + self.weights["hidden"] * hidden_state_loss(outputs.hidden_states,
                                                                             target.hidden_states)
            return (loss, outputs) if return_outputs else loss

    return HealTrainer


def _progress_callback():
    from transformers import TrainerCallback

    class PlainProgress(TrainerCallback):
        """One plain line per log (for files and pipes, where a progress bar would be noise)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            if "loss" not in logs and "eval_loss" not in logs:
                return
            parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items()
                     if k in ("loss", "eval_loss", "learning_rate", "epoch")]
            if parts:
                print(f"heal step {state.global_step}/{state.max_steps}: " + ", ".join(parts), file=sys.stderr,
                      flush=True)

    return PlainProgress()


def _resolve_teacher(teacher: Any) -> nn.Module | None:
    if teacher is None or isinstance(teacher, nn.Module):
        return teacher
    if isinstance(teacher, (str, os.PathLike)):
        from .models import load_model

        return load_model(teacher)
    raise HealError(f"teacher must be a model or a model directory, got {type(teacher).__name__}")


def _check(model: nn.Module, method: str, teacher: nn.Module | None, weights: dict[str, float],
           temperature: float, steps: int | None, epochs: float | None, batch_size: int, grad_accum: int,
           eval_every: int | None, patience: int | None, has_eval: bool, checkpoint_dir: Path | None,
           resume: bool) -> None:
    """Every argument error, raised before the model or any file is touched."""
    if method not in METHODS:
        raise HealError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    for needed, why in (("accelerate", "transformers' Trainer"), ("peft", "LoRA")):
        if (needed == "peft" and not method.startswith("lora")) or importlib.util.find_spec(needed):
            continue
        raise HealError(f"{why} needs the {needed} package: pip install 'depgraph[heal]'")
    if not isinstance(model, nn.Module) or not callable(getattr(model, "forward", None)):
        raise HealError(f"model must be a causal-LM nn.Module, got {type(model).__name__}")
    if any(p.device.type == "meta" for p in model.parameters()):
        raise HealError("the model is on the meta device (shapes only): load it with weights to heal it")
    if "kd" in method and teacher is None:
        raise HealError(f"method {method!r} distils from a teacher: pass teacher= (the unpruned model)")
    if teacher is not None:
        s_vocab = getattr(_text_config(model), "vocab_size", None)
        t_vocab = getattr(_text_config(teacher), "vocab_size", None)
        if s_vocab is not None and t_vocab is not None and s_vocab != t_vocab:
            raise HealError(f"teacher vocabulary ({t_vocab}) differs from the model's ({s_vocab}): distillation "
                            "compares next-token distributions, so both need the same tokenizer")
    if weights["hidden"] > 0:
        if teacher is None:
            raise HealError("hidden_weight > 0 needs a teacher (method 'kd' or 'lora+kd')")
        s_width = getattr(_text_config(model), "hidden_size", None)
        t_width = getattr(_text_config(teacher), "hidden_size", None)
        if s_width != t_width:
            raise HealError(f"the hidden-state loss compares hidden states, but the model's width ({s_width}) "
                            f"differs from the teacher's ({t_width}) after hidden-channel (C) pruning: "
                            "use hidden_weight=0")
    if min(weights.values()) < 0 or not any(weights.values()):
        raise HealError(f"loss weights must be >= 0 and not all 0, got {weights}")
    if not temperature > 0:
        raise HealError(f"temperature must be > 0, got {temperature}")
    if (steps is None) == (epochs is None):
        raise HealError("give exactly one of steps= and epochs=")
    if (steps is not None and steps < 1) or (epochs is not None and not epochs > 0):
        raise HealError(f"steps must be >= 1 and epochs > 0, got steps={steps}, epochs={epochs}")
    if batch_size < 1 or grad_accum < 1:
        raise HealError(f"batch_size and grad_accum must be >= 1, got {batch_size}, {grad_accum}")
    if eval_every is not None and eval_every < 1:
        raise HealError(f"eval_every must be >= 1, got {eval_every}")
    if (eval_every is not None or patience is not None) and not has_eval:
        raise HealError("eval_every / patience evaluate held-out text: pass eval_data=")
    if patience is not None and (patience < 1 or eval_every is None):
        raise HealError("patience (early stop after that many evaluations without improvement) must be >= 1 "
                        "and needs eval_every")
    if checkpoint_dir is not None and checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        raise HealError(f"checkpoint_dir {checkpoint_dir} exists and is not a directory")
    if resume:
        from transformers.trainer_utils import get_last_checkpoint

        if checkpoint_dir is None:
            raise HealError("resume=True continues from checkpoints: pass the checkpoint_dir of the earlier run")
        if not checkpoint_dir.is_dir() or get_last_checkpoint(str(checkpoint_dir)) is None:
            raise HealError(f"resume=True but {checkpoint_dir} holds no checkpoint-* folder to resume from")


class _Rollback:
    """Everything :func:`heal` may change on the model, restored on failure."""

    def __init__(self, model: nn.Module, teacher: nn.Module | None):
        self.model, self.teacher = model, teacher
        # clone: Trainer steps update the tensors in place
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self.training = model.training
        self.device = next(model.parameters()).device
        self.teacher_state = (next(teacher.parameters()).device, teacher.training) if teacher is not None else None

    def restore_flags(self) -> None:
        for n, p in self.model.named_parameters():
            p.requires_grad_(self.grad.get(n, True))
        self.model.train(self.training)
        self.model.to(self.device)
        if self.teacher is not None:
            self.teacher.to(self.teacher_state[0]).train(self.teacher_state[1])

    def undo(self, peft_model: Any) -> None:
        if peft_model is not None:
            peft_model.unload()  # puts the original Linear modules back (adapters discarded)
        self.model.load_state_dict(self.state, strict=True)
        self.restore_flags()


def heal(
    model: nn.Module,
    data: Any,
    method: str = "lora",
    teacher: nn.Module | str | os.PathLike | None = None,
    *,
    tokenizer: Any = None,
    eval_data: Any = None,
    seq_len: int = 128,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 8,
    grad_accum: int = 1,
    lr: float | None = None,
    scheduler: str = "cosine",
    warmup: float = 0.1,
    weight_decay: float = 0.0,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.05,
    lora_targets: str | Sequence[str] = "all-linear",
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float | None = None,
    hidden_weight: float = 0.0,
    eval_every: int | None = None,
    patience: int | None = None,
    log_every: int | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    save_every: int | None = None,
    resume: bool = False,
    progress: bool | None = None,
    quiet: bool = False,
    seed: int = 0,
    trainer_args: dict[str, Any] | None = None,
) -> HealReport:
    """Fine-tune a pruned ``model`` in place to recover quality; returns a :class:`HealReport`.

    ``method``: ``"lora"`` (peft LoRA adapters of rank ``lora_rank`` on ``lora_targets``, default every
    Linear layer except the output head, trained on next-token loss, merged at the end), ``"kd"`` (all
    parameters trained on ``kd_weight * T^2 KL(teacher || model)`` at temperature ``temperature``) or
    ``"lora+kd"`` (LoRA adapters trained on the distillation loss). ``ce_weight`` adds next-token loss
    (default 1 for lora, 0 with a teacher); ``hidden_weight`` adds Minitron's hidden-state loss (needs the
    teacher's hidden width; layers are mapped proportionally when blocks were removed).

    ``data`` / ``eval_data``: a text file, text (with ``tokenizer``) or token ids, cut into non-overlapping
    windows of ``seq_len`` tokens. Training runs ``steps`` optimizer steps (default 100) or ``epochs`` passes of
    ``batch_size x grad_accum`` windows per device with ``scheduler`` (any transformers schedule name)
    after ``warmup`` (a fraction of the steps, or a step count when >= 1). ``eval_every`` steps the
    held-out next-token loss is measured; with ``patience`` training stops after that many evaluations
    without improvement and the best weights are kept. ``checkpoint_dir`` keeps resumable checkpoints
    (every ``save_every`` steps, default every evaluation); ``resume=True`` continues the last one.
    ``progress``: bars (True), plain lines on stderr (False) or bars only on a terminal (None);
    ``quiet=True``: neither.
    ``trainer_args``: extra :class:`transformers.TrainingArguments` fields (e.g. ``bf16=True``).

    Under ``torchrun`` / ``accelerate launch`` the same call trains with DDP (the Trainer sets it up).
    On any failure the model is restored exactly (weights, modules, flags, device; from a CPU copy of its
    state taken at the start, so healing needs host memory for one more copy) and the error raised;
    argument errors raise :class:`HealError` before anything changes.
    """
    from transformers import EarlyStoppingCallback, TrainingArguments, set_seed

    teacher = _resolve_teacher(teacher)
    ce = ce_weight if ce_weight is not None else (1.0 if method == "lora" else 0.0)
    weights = {"ce": float(ce), "kd": float(kd_weight) if "kd" in method else 0.0, "hidden": float(hidden_weight)}
    ckpt = Path(checkpoint_dir).expanduser() if checkpoint_dir is not None else None
    if steps is None and epochs is None:
        steps = 100
    _check(model, method, teacher, weights, temperature, steps, epochs, batch_size, grad_accum, eval_every,
           patience, eval_data is not None, ckpt, resume)
    vocab = getattr(_text_config(model), "vocab_size", None)
    train_ids = token_windows(data, tokenizer, seq_len, vocab, "data")
    eval_ids = token_windows(eval_data, tokenizer, seq_len, vocab, "eval_data") if eval_data is not None else None
    if progress is None:
        progress = sys.stderr.isatty()
    progress = progress and not quiet
    log_every = log_every or max(1, (steps or 100) // 20)
    save_steps = save_every or eval_every
    keep_best = patience is not None
    scratch = None
    if ckpt is None and keep_best:  # the best weights come back from a checkpoint: keep them somewhere
        scratch = tempfile.TemporaryDirectory(prefix="depgraph-heal-")
    out_dir = ckpt if ckpt is not None else Path(scratch.name if scratch else tempfile.gettempdir()) / "unused"
    saving = ckpt is not None or keep_best
    fields = dict(
        output_dir=str(out_dir),
        max_steps=steps if steps is not None else -1,
        num_train_epochs=epochs if epochs is not None else 1.0,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=lr if lr is not None else _DEFAULT_LR[method],
        lr_scheduler_type=scheduler,
        warmup_steps=warmup,
        weight_decay=weight_decay,
        logging_steps=log_every,
        eval_strategy="steps" if eval_every else "no",
        eval_steps=eval_every,
        save_strategy="steps" if saving and save_steps else "no",
        save_steps=save_steps or 500,
        save_total_limit=2 if not keep_best else 3,
        load_best_model_at_end=keep_best,
        metric_for_best_model="eval_loss" if keep_best else None,
        greater_is_better=False if keep_best else None,
        prediction_loss_only=True,
        remove_unused_columns=False,
        disable_tqdm=not progress,
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    args = TrainingArguments(**{**fields, **(trainer_args or {})})
    set_seed(seed)  # LoRA's random init below is then the same on every rank and every run
    guard = _Rollback(model, teacher)
    peft_model = None
    try:
        if teacher is not None:
            teacher.eval()
        if method.startswith("lora"):
            from peft import LoraConfig, get_peft_model

            targets = lora_targets if isinstance(lora_targets, str) else list(lora_targets)
            config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                target_modules=targets, bias="none", task_type="CAUSAL_LM")
            peft_model = get_peft_model(model, config)
            trained = peft_model
        else:
            for p in model.parameters():
                p.requires_grad_(True)
            trained = model
        trained.train()
        callbacks = [] if progress or quiet else [_progress_callback()]
        if keep_best:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=patience))
        trainer = _trainer_class()(
            model=trained, args=args, train_dataset=_Windows(train_ids),
            eval_dataset=_Windows(eval_ids) if eval_ids is not None else None,
            callbacks=callbacks, teacher=teacher, weights=weights, temperature=temperature)
        if not progress:
            from transformers import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        if teacher is not None:
            teacher.to(trainer.args.device)
        from transformers.trainer_utils import get_last_checkpoint

        resumed = get_last_checkpoint(str(ckpt)) if resume else None
        trainer.train(resume_from_checkpoint=resumed)
        state = trainer.state
        if peft_model is not None:
            # merge the adapters into the pruned Linear weights; the modules become plain Linear again
            peft_model.merge_and_unload()
    except BaseException:
        guard.undo(peft_model)
        raise
    finally:
        if scratch is not None:
            scratch.cleanup()
    guard.restore_flags()  # healed weights kept; requires_grad, mode and device as they were
    train = [(h["step"], h["loss"]) for h in state.log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in state.log_history if "eval_loss" in h]
    best = None
    if state.best_global_step:
        best = state.best_global_step
    stopped = bool(steps is not None and state.global_step < steps)
    return HealReport(model=model, method=method, steps=state.global_step, train_loss=train, eval_loss=evals,
                      best_step=best, stopped_early=stopped, resumed_from=resumed,
                      is_main_process=state.is_world_process_zero)
