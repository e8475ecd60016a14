"""Prune 20% of a tiny Llama block-wise (MLP neurons + attention heads) with L2 scores, save, reload.

Run: ``python examples/prune_and_save.py`` (writes only into a temporary directory). The reloaded model
must give the same logits as the pruned one. Command-line equivalent:
``depgraph prune tiny-llama --ratio 0.2 --criterion l2 --strategy block --out out/pruned``.
"""

import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import depgraph


def tiny_llama() -> LlamaForCausalLM:
    """Random-weight Llama: 8 query / 4 KV heads of 8 dims, hidden 48, MLP 128, 2 layers.

    Cutting one KV head of four leaves 6 query heads, and 48 is a multiple of 6: transformers 5 configs
    require ``hidden_size % num_attention_heads == 0``, so the pruned config stays valid and plain
    ``from_pretrained`` can reload the result too (other sizes reload with ``depgraph.load_pretrained`` only).
    """
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=8, vocab_size=259, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def main() -> None:
    torch.set_num_threads(1)
    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))

    pruner = depgraph.Pruner(model, criterion="l2", ratio=0.2, structure="block", progress=False)
    report = pruner.prune()
    print(report)
    print(report.target)
    for name, (old, new) in list(report.shapes.items())[:4]:
        print(f"  {name}: {old} -> {new}")

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pruned"
        state = depgraph.save_pretrained(model, out)
        reloaded = depgraph.load_pretrained(out)
        with torch.no_grad():
            delta = (model(ids).logits - reloaded(ids).logits).abs().max().item()
        print(f"saved to {out} (plain transformers from_pretrained works too: {state['hf_compatible']})")
        print(f"reloaded: {depgraph.count_parameters(reloaded):,} parameters, max |dlogit| = {delta:.2e}")
        assert depgraph.count_parameters(reloaded) == report.params_after
        assert delta < 1e-5, delta


if __name__ == "__main__":
    main()
