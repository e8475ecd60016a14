"""Ops that contract a dimension: linear layers, matmuls, embeddings and attention.

These are the in/out-degree rules of LLM-Pruner at channel level: the contracted input
dimension of a weight is the same neuron set as the last dimension of its input (a neuron
read by the layer), and the output dimension of the weight *is* the new channel axis.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from .context import Axis, RuleContext, op_arg, shape_of
from .pointwise import broadcast
from .registry import register

aten = torch.ops.aten


@register(aten.linear)
def linear(ctx: RuleContext, node: fx.Node):
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    xa, wa = ctx.tensor_axes(x), ctx.tensor_axes(w)
    if xa is None or wa is None or len(wa) != 2:
        return NotImplemented
    ctx.couple(xa[-1], wa[1], "linear input")
    ctx.use(w, 1, "in")
    ctx.use(w, 0, "out")
    if bias is not None:
        ba = ctx.tensor_axes(bias)
        ctx.couple(wa[0], ba[-1], "linear bias")
        ctx.use(bias, 0, "bias")
    return [ctx.same(a, node, j) for j, a in enumerate(xa[:-1])] + [ctx.same(wa[0], node, len(xa) - 1)]


def _matmul_2d(ctx: RuleContext, node: fx.Node, a_node, b_node) -> list[Axis]:
    aa, ba = ctx.tensor_axes(a_node), ctx.tensor_axes(b_node)
    ctx.couple(aa[-1], ba[-2], "matmul contraction")
    if ctx.is_param(b_node):
        ctx.use(b_node, len(ba) - 2, "in")
        ctx.use(b_node, len(ba) - 1, "out")
    if ctx.is_param(a_node):
        ctx.use(a_node, len(aa) - 1, "in")
        ctx.use(a_node, len(aa) - 2, "out")
    return [ctx.same(aa[-2], node, 0), ctx.same(ba[-1], node, 1)]


@register(aten.mm)
def mm(ctx: RuleContext, node: fx.Node):
    return _matmul_2d(ctx, node, node.args[0], node.args[1])


@register(aten.addmm)
def addmm(ctx: RuleContext, node: fx.Node):
    # out = bias + m1 @ m2  (GPT-2's Conv1D: m2 is the [in, out] weight)
    bias, m1, m2 = node.args[0], node.args[1], node.args[2]
    out = _matmul_2d(ctx, node, m1, m2)
    ba = ctx.tensor_axes(bias)
    if ba is not None:
        if ba[-1].size == out[1].size:
            ctx.couple(out[1], ba[-1], "addmm bias")
            ctx.use(bias, len(ba) - 1, "bias")
        if len(ba) == 2 and ba[0].size == out[0].size:
            ctx.couple(out[0], ba[0], "addmm bias")
    return out


@register(aten.matmul, aten.bmm, aten.baddbmm)
def matmul(ctx: RuleContext, node: fx.Node):
    args = node.args[1:3] if node.target == aten.baddbmm.default else node.args[:2]
    a_node, b_node = args
    aa, ba = ctx.tensor_axes(a_node), ctx.tensor_axes(b_node)
    shape = shape_of(node)
    if aa is None or ba is None or shape is None:
        return NotImplemented
    if len(aa) == 1 or len(ba) == 1:
        ctx.couple(aa[-1], ba[-2] if len(ba) > 1 else ba[0], "matmul contraction")
        if len(aa) == 1 and len(ba) == 1:
            return []
        rest = ba[:-2] + [ba[-1]] if len(aa) == 1 else aa[:-1]
        return [ctx.same(a, node, j) for j, a in enumerate(rest)]
    ctx.couple(aa[-1], ba[-2], "matmul contraction")
    batch = broadcast(ctx, node, [aa[:-2], ba[:-2]], shape[:-2])
    if not ctx.is_param(a_node) and not ctx.is_param(b_node):
        # activation x activation with batch dims: attention scores / weighted values
        for axis in batch:
            if axis.size > 1:
                ctx.mark_heads(axis)
        if batch:  # attention-like: q @ k^T contracts head_dim, probs @ v outputs it
            ctx.freeze(aa[-1], f"head_dim at {ctx.where()}")
            ctx.freeze(ba[-1], f"head_dim at {ctx.where()}")
    for p_node, p_axes in ((a_node, aa), (b_node, ba)):
        if ctx.is_param(p_node):
            last = len(p_axes) - 1
            ctx.use(p_node, last if p_node is a_node else last - 1, "in")
            ctx.use(p_node, last - 1 if p_node is a_node else last, "out")
    nb = len(batch)
    out = batch + [ctx.same(aa[-2], node, nb), ctx.same(ba[-1], node, nb + 1)]
    added = ctx.tensor_axes(node.args[0]) if node.target == aten.baddbmm.default else None
    for j in range(1, min(len(added or []), len(out)) + 1):
        # baddbmm adds its input (Bloom's ALiBi bias, [batch*heads, 1, kv]): broadcast like an add
        if added[-j].size == out[-j].size and out[-j].size > 1:
            ctx.couple(out[-j], added[-j], "baddbmm input")
    return out


@register(aten.embedding)
def embedding(ctx: RuleContext, node: fx.Node):
    w, idx = node.args[0], node.args[1]
    wa, ia = ctx.tensor_axes(w), ctx.tensor_axes(idx)
    if wa is None or ia is None:
        return NotImplemented
    # rows are looked up by data: never cut the vocabulary/position rows
    ctx.freeze(wa[0], f"embedding rows at {ctx.where()}")
    ctx.use(w, 1, "embed")
    out = [ctx.same(a, node, j) for j, a in enumerate(ia)] + [ctx.same(wa[1], node, len(ia))]
    ctx.mark_embedding(out[-1])
    return out


@register(aten.scaled_dot_product_attention)
def sdpa(ctx: RuleContext, node: fx.Node):
    qa, ka, va = (ctx.tensor_axes(a) for a in node.args[:3])
    mask = op_arg(node, "attn_mask")
    if qa is None or ka is None or va is None:
        return NotImplemented
    out = []
    nb = len(qa) - 2
    for j in range(nb):
        q, k, v = qa[j], ka[j], va[j]
        for kv in (k, v):
            if kv.size == q.size:
                ctx.couple(q, kv, "attention heads")
            elif kv.size > 1 and q.size % kv.size == 0:
                # grouped-query attention (enable_gqa): query head i reads kv head i // groups
                ctx.couple(q.ids, np.repeat(kv.ids, q.size // kv.size), "grouped-query heads")
                ctx.axis_edges.append((kv.key, q.key, "grouped-query heads"))
        if j == nb - 1 or nb == 1:
            for axis in (q, k, v):
                if axis.size > 1:
                    ctx.mark_heads(axis)
        out.append(ctx.same(q, node, j))
    # head_dim is hard-coded in the modules' head reshapes: it is never a unit
    for axis in (qa[-1], ka[-1], va[-1]):
        ctx.freeze(axis, f"head_dim at {ctx.where()}")
    ctx.couple(qa[-1], ka[-1], "attention q.k contraction")
    ctx.couple(ka[-2], va[-2], "attention key positions")
    out.append(ctx.same(qa[-2], node, nb))
    out.append(ctx.same(va[-1], node, nb + 1))
    ma = ctx.tensor_axes(mask)
    if ma is not None:
        scores = out[:nb] + [qa[-2], ka[-2]]
        for j in range(1, len(ma) + 1):
            if j <= len(scores) and ma[-j].size == scores[-j].size and ma[-j].size > 1:
                ctx.couple(ma[-j], scores[-j], "attention mask")
    return out


def _einsum_terms(equation: str, ndims: list[int]) -> tuple[list[str], str] | None:
    """Inputs' and output's subscripts of an einsum, with ``...`` spelled out as letters."""
    equation = equation.replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ndims):
        return None
    n_ell = max((nd - len(t.replace("...", "")) for t, nd in zip(terms, ndims) if "..." in t), default=0)
    ell = "".join(chr(0x3B1 + k) for k in range(n_ell))  # greek: no clash with einsum's a-z / A-Z
    spelled = []
    for t, nd in zip(terms, ndims):
        if "..." in t:
            k = nd - len(t.replace("...", ""))
            t = t.replace("...", ell[n_ell - k:])
        if len(t) != nd:
            return None
        spelled.append(t)
    if not arrow:  # implicit output: broadcast dims, then the letters seen once, sorted
        letters = "".join(spelled)
        rhs = "..." + "".join(sorted(c for c in set(letters) if c.isascii() and letters.count(c) == 1))
    return spelled, rhs.replace("...", ell)


@register(aten.einsum)
def einsum(ctx: RuleContext, node: fx.Node):
    """Every subscript letter is one set of neurons: axes sharing a letter are coupled.

    Letters in the output are carried through (batch / head / kept dims), letters only in the
    inputs are contracted. A size-1 axis broadcast against a larger one couples nothing.
    """
    operands = list(node.args[1])
    axes = [ctx.tensor_axes(t) for t in operands]
    shape = shape_of(node)
    if shape is None or any(a is None for a in axes):
        return NotImplemented
    terms = _einsum_terms(node.args[0], [len(a) for a in axes])
    if terms is None:
        return NotImplemented
    inputs, output = terms
    if len(output) != len(shape):
        return NotImplemented
    by_letter: dict[str, list[Axis]] = {}
    for term, ax in zip(inputs, axes):
        for letter, axis in zip(term, ax):
            by_letter.setdefault(letter, []).append(axis)
    for letter, found in by_letter.items():
        big = [a for a in found if a.size > 1] or found[:1]
        for other in big[1:]:
            ctx.couple(big[0], other, f"einsum {letter}")
    # letters shared by two activations and kept are batch dims; with a contraction, the
    # non-trivial ones are attention heads (as for matmul)
    contracted = any(letter not in output for letter in by_letter)
    acts = [term for term, t in zip(inputs, operands) if not ctx.is_param(t)]
    batch = {c for c in output if len(acts) >= 2 and sum(c in term for term in acts) >= 2} if contracted else set()
    for term, t in zip(inputs, operands):
        if ctx.is_param(t):
            for d, letter in enumerate(term):
                ctx.use(t, d, "out" if letter in output else "in")
    out = []
    for j, letter in enumerate(output):
        found = [a for a in by_letter.get(letter, []) if a.size == shape[j]]
        if not found:
            out.append(ctx.fresh(node, j, shape[j]))
            continue
        out.append(ctx.same(found[0], node, j))
        if letter in batch and out[-1].size > 1:
            ctx.mark_heads(out[-1])
    if any(by_letter[c][0].size > 1 for c in batch):
        # attention-like (as for matmul): the per-head letters are head_dim or positions, never units
        for letter, found in by_letter.items():
            if letter not in batch:
                for axis in found:
                    ctx.freeze(axis, f"head_dim at {ctx.where()}")
    return out


def grouped_mm(ctx: RuleContext, node: fx.Node):
    """Mixture-of-experts grouped matmul: rows sorted by expert, ``weight`` is [experts, in, out].

    An intermediate neuron index is shared by every expert's slice of the weight, so a unit is
    "neuron j of every expert" (the 3-D layout stays rectangular). The expert axis is frozen here:
    whole experts are removed by expert pruning, together with the router rows.
    """
    x, w = node.args[0], node.args[1]
    xa, wa = ctx.tensor_axes(x), ctx.tensor_axes(w)
    if xa is None or wa is None or len(wa) != 3 or len(xa) != 2:
        return NotImplemented
    ctx.couple(xa[-1], wa[1], "expert input")
    ctx.freeze(wa[0], f"experts at {ctx.where()}")
    base = ctx.param_views.get(w.name, (w.name, None))[0]
    if base in ctx.param_of_node:
        ctx.expert_params.add(ctx.param_of_node[base])
    ctx.use(w, 1, "in")
    ctx.use(w, 2, "out")
    return [ctx.same(xa[0], node, 0), ctx.same(wa[2], node, 1)]


register("aten._grouped_mm", "transformers.grouped_mm_fallback")(grouped_mm)
