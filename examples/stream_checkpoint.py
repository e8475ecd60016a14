"""Prune a sharded checkpoint directory layer by layer (out of core) and check it equals in-memory pruning.

Run: ``python examples/stream_checkpoint.py`` (writes only into a temporary directory). A tiny Llama is
saved in several shards to stand in for a model larger than memory; ``depgraph.prune_checkpoint`` prunes
20% of its MLP neurons and heads with Wanda scores, reading one decoder layer at a time, and writes a
sharded checkpoint. The same prune in memory gives the same logits. Command-line equivalent:
``depgraph prune SRC --stream --criterion wanda --ratio 0.2 --out DIR``.
"""

import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import depgraph


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # 8 query / 4 KV heads over hidden 48: a pruned head count still divides the hidden size, so the
    # uniform result stays a plain Hugging Face checkpoint (see examples/prune_and_save.py)
    config = LlamaConfig(hidden_size=48, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=8, vocab_size=259, max_position_embeddings=256)
    ids = torch.randint(0, config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "pruned"
        LlamaForCausalLM(config).save_pretrained(src, max_shard_size=100_000)
        print(f"source: {len(list(src.glob('*.safetensors')))} shards")

        report = depgraph.prune_checkpoint(src, out, ratio=0.2, criterion="wanda", calib=ids, hf_loadable=True,
                                           max_shard_size=100_000, progress=False)
        print(report)
        print(report.target)
        print(f"output: {sorted(p.name for p in out.iterdir())}")

        streamed = AutoModelForCausalLM.from_pretrained(out).eval()  # a uniform cut: plain transformers loads it
        model = AutoModelForCausalLM.from_pretrained(src).eval()
        depgraph.Pruner(model, criterion="wanda", ratio=0.2, calib=ids, hf_loadable=True, progress=False).prune()
        with torch.no_grad():
            delta = (streamed(ids[:2]).logits - model(ids[:2]).logits).abs().max().item()
        print(f"streamed vs in-memory: max |dlogit| = {delta:.2e}")
        assert depgraph.count_parameters(streamed) == report.params_after
        assert delta <= 1e-5, delta


if __name__ == "__main__":
    main()
