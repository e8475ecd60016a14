"""Prune 20% of a tiny Llama's parameters with a user-defined importance criterion.

A criterion scores each member (parameter slice) of a group per unit; the Pruner sums them per unit
(``aggregate="sum"``), cuts the lowest-scoring MLP neurons and attention heads, and keeps the model
runnable. Run: ``python examples/custom_importance.py``.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import depgraph
from depgraph.importance import criterion
from depgraph.pruner import Pruner


@criterion("out_l1_in_l2")
def out_l1_in_l2(ctx, group, member):
    """Producer rows by their L1 norm, consumer columns by their L2 norm; other slices not scored."""
    w = ctx.weight(member)
    if member.role == "out":
        return ctx.reduce(member, w.abs())
    if member.role == "in":
        return ctx.reduce(member, w.pow(2)).sqrt()
    return None


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    before = depgraph.count_parameters(model)

    pruner = Pruner(model, criterion="out_l1_in_l2", ratio=0.2, target="params", progress=False)
    report = pruner.prune()

    after = depgraph.count_parameters(model)
    print(f"parameters before: {before:,}")
    print(f"parameters after:  {after:,} ({1 - after / before:.1%} removed)")
    print(report.target)
    ids = torch.randint(0, config.vocab_size, (1, 8))
    print("still runs, logits", tuple(model(ids).logits.shape))


if __name__ == "__main__":
    main()
