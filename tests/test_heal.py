"""``depgraph.heal``: LoRA / KD / LoRA+KD on tiny pruned models, rollback, early stop, resume, DDP."""

from __future__ import annotations

import copy
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Trainer

import depgraph
from depgraph import HealError, heal

heal_module = importlib.import_module("depgraph.heal")  # `depgraph.heal` is the function
ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64


def _config(**kw) -> LlamaConfig:
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaConfig(**{**base, **kw})


def _periodic(n: int = 4096, period: int = 13) -> torch.Tensor:
    """A learnable token stream: the next id is a function of the previous one."""
    return torch.arange(n) * 7 % period


@pytest.fixture(scope="module")
def pair() -> tuple[nn.Module, nn.Module]:
    """(teacher, student): a random tiny Llama and a copy with a non-uniform A cut (layer 0 only)."""
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(_config(initializer_range=0.2)).eval()  # peaked next-token distributions
    student = copy.deepcopy(teacher)
    graph = depgraph.trace(student)
    a0 = graph.groups("A")[0]
    graph.prune({a0: list(range(0, 40, 3))})
    return teacher, student


def _snapshot(model: nn.Module) -> tuple[dict, list, list, bool]:
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()], model.training)


def _same(model: nn.Module, snap: tuple[dict, list, list, bool]) -> None:
    state, modules, grads, training = snap
    now = model.state_dict()
    assert set(now) == set(state)
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == grads
    assert model.training == training


def _kl(student: nn.Module, teacher: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(heal_module.distillation_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits))


def test_lora_merges_into_a_plain_model_that_reloads(pair, tmp_path):
    """LoRA training lowers the loss; merged result: plain nn.Linear of the pruned shapes, reloads exactly."""
    _, pruned = pair
    model = copy.deepcopy(pruned)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = heal(model, _periodic(), method="lora", steps=20, batch_size=4, seq_len=32, lr=1e-2,
                  log_every=1, progress=False)
    assert report.model is model and report.steps == 20
    assert report.train_loss[-1][1] < report.train_loss[0][1] - 0.3
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert not any("lora" in n for n, _ in model.named_modules())
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    assert not hasattr(model, "peft_config")
    changed = [k for k in before if not torch.equal(before[k], model.state_dict()[k])]
    assert changed and all(k.endswith("_proj.weight") for k in changed)  # only merged Linear weights
    assert all(p.requires_grad for p in model.parameters())  # flags as they were, not peft's frozen ones
    depgraph.save_pretrained(model, tmp_path / "healed")
    reloaded = depgraph.load_pretrained(tmp_path / "healed")
    ids = _periodic(32)[None]
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize(("method", "lr"), [("kd", 2e-3), ("lora+kd", 5e-3)])
def test_distillation_moves_the_student_towards_the_teacher(pair, method, lr):
    teacher, pruned = pair
    model = copy.deepcopy(pruned)
    held_out = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    kl_before = _kl(model, teacher, held_out)
    data = torch.randint(0, VOCAB, (4096,), generator=torch.Generator().manual_seed(2))
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    report = heal(model, data, method=method, teacher=teacher, steps=40, batch_size=8, seq_len=32, lr=lr,
                  scheduler="constant", warmup=0, progress=False)
    assert _kl(model, teacher, held_out) < 0.9 * kl_before, report
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())  # teacher untouched
    assert not teacher.training


def test_hidden_state_loss_maps_layers_after_depth_pruning(pair):
    """Minitron's hidden-state loss works across depths (layers mapped proportionally)."""
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(_config(num_hidden_layers=4)).eval()
    student = copy.deepcopy(teacher)
    depgraph.remove_layers(student, [1, 2])
    assert heal_module.layer_map(2, 4) == [(1, 2), (2, 4)]
    report = heal(student, _periodic(), method="kd", teacher=teacher, hidden_weight=1.0, steps=3, batch_size=2,
                  seq_len=16, progress=False)
    assert report.steps == 3 and all(torch.isfinite(torch.tensor(loss)) for _, loss in report.train_loss)


def test_bad_requests_raise_before_anything_changes(pair, tmp_path):
    teacher, pruned = pair
    model = copy.deepcopy(pruned)
    snap = _snapshot(model)
    other_vocab = LlamaForCausalLM(_config(vocab_size=VOCAB + 1))
    narrow = copy.deepcopy(teacher)
    graph = depgraph.trace(narrow)
    graph.prune({graph.groups("C")[0]: [0, 1]})
    data = _periodic()
    cases = [
        (dict(method="sft"), "unknown method"),
        (dict(method="kd"), "pass teacher="),
        (dict(method="kd", teacher=other_vocab), "vocabulary"),
        (dict(method="kd", teacher=teacher, hidden_weight=1.0, data=data, model=narrow), "hidden_weight=0"),
        (dict(steps=0), "steps must be"),
        (dict(steps=5, epochs=1.0), "exactly one of"),
        (dict(patience=2), "eval_data"),
        (dict(data=_periodic(20)), "no window of seq_len=32"),
        (dict(data=torch.full((100,), VOCAB)), "outside the model's vocabulary"),
        (dict(data="some text"), "tokenizer"),
        (dict(resume=True, checkpoint_dir=tmp_path / "none"), "no checkpoint"),
        (dict(temperature=0.0, method="kd", teacher=teacher), "temperature"),
    ]
    for kwargs, message in cases:
        kwargs = {"data": data, "model": model, "seq_len": 32, "steps": 2, "progress": False, **kwargs}
        with pytest.raises(HealError, match=message):
            heal(kwargs.pop("model"), kwargs.pop("data"), **kwargs)
        _same(model, snap)
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("method", ["lora", "kd"])
def test_interrupt_mid_training_restores_the_model(pair, monkeypatch, method):
    teacher, pruned = pair
    model = copy.deepcopy(pruned)
    model.train()
    snap = _snapshot(model)
    calls = []
    real_step = Trainer.training_step

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", flaky)
    with pytest.raises(KeyboardInterrupt):
        heal(model, _periodic(), method=method, teacher=teacher, steps=5, batch_size=2, seq_len=32, lr=1e-2,
             progress=False)
    assert len(calls) == 3
    _same(model, snap)


def test_early_stop_keeps_the_best_evaluation(pair):
    """Training on one token range while evaluating on another: held-out loss rises, so training stops."""
    _, pruned = pair
    model = copy.deepcopy(pruned)
    train = torch.randint(0, VOCAB // 2, (4096,), generator=torch.Generator().manual_seed(3))
    held = torch.randint(VOCAB // 2, VOCAB, (512,), generator=torch.Generator().manual_seed(4))
    report = heal(model, train, method="lora", eval_data=held, eval_every=2, patience=1, steps=40, batch_size=4, seq_len=32, lr=2e-2,
                  warmup=0, progress=False)
    assert report.stopped_early and report.steps < 40
    losses = dict(report.eval_loss)
    assert report.best_step == min(losses, key=losses.get)
    # the kept weights are the best evaluation's: re-measure the held-out loss
    ids = held[: held.numel() // 32 * 32].view(-1, 32)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert abs(float(loss) - losses[report.best_step]) < 1e-3


def test_resume_after_interrupt_matches_an_uninterrupted_run(pair, tmp_path, monkeypatch):
    _, pruned = pair
    kwargs = dict(method="lora", steps=6, batch_size=2, seq_len=32, lr=1e-2, lora_dropout=0.0, progress=False)
    straight = copy.deepcopy(pruned)
    heal(straight, _periodic(), **kwargs)

    model = copy.deepcopy(pruned)
    ckpt = tmp_path / "ckpt"
    real_step = Trainer.training_step
    calls = []

    def flaky(self, *args, **kw):
        calls.append(1)
        if len(calls) == 5:  # after the checkpoint at step 4
            raise KeyboardInterrupt
        return real_step(self, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "training_step", flaky)
        with pytest.raises(KeyboardInterrupt):
            heal(model, _periodic(), checkpoint_dir=ckpt, save_every=2, **kwargs)
    assert (ckpt / "checkpoint-4").is_dir()
    report = heal(model, _periodic(), checkpoint_dir=ckpt, save_every=2, resume=True, **kwargs)
    assert report.resumed_from.endswith("checkpoint-4") and report.steps == 6
    for k, v in straight.state_dict().items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-6), k


DDP_WORKER = textwrap.dedent("""
    import sys, torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM
    import depgraph

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    report = depgraph.heal(model, torch.arange(4096) * 7 % 13, method="lora", steps=12, batch_size=2,
                           seq_len=32, lr=1e-2, log_every=1, progress=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.save({"state": model.state_dict(), "loss": report.train_loss, "world": world},
               f"{sys.argv[1]}/rank{rank}.pt")
""")


def test_two_process_ddp_gives_identical_weights_and_falling_loss(tmp_path):
    """``torchrun --nproc_per_node 2`` on CPU (gloo): the same heal call, both ranks end identical."""
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    a, b = (r["state"] for r in ranks)
    assert all(torch.equal(a[k], b[k]) for k in a)
    loss = ranks[0]["loss"]
    assert loss[-1][1] < loss[0][1] - 0.2
