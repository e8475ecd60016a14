"""Gathers of tensor slices for cuts: several dims in one pass, in cache-sized blocks.

Cutting a weight along two dims with chained ``index_select`` writes a full-size intermediate; on CPU
that copy (and the page faults of its fresh memory) cost as much as the cut itself. These gathers read
each kept slice once and write each output once.
"""

from __future__ import annotations

import torch

__all__ = ["gather", "gather_blocks"]

# elements per block when gathering along several dims: a block stays in the CPU's cache between the
# gathers, so the whole tensor is read once and written once with no full-size intermediate
_BLOCK_ELEMENTS = 1 << 17


def gather(tensor: torch.Tensor, index: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """A new contiguous tensor of ``tensor``'s slices ``i`` along each ``(dim, i)`` of ``index`` (distinct dims).

    The same values as chaining ``index_select`` over the dims, without the chain's full-size intermediates.

    >>> gather(torch.arange(12).view(3, 4), [(0, torch.tensor([0, 2])), (1, torch.tensor([1, 3]))])
    tensor([[ 1,  3],
            [ 9, 11]])
    """
    if not index:
        return tensor.clone(memory_format=torch.contiguous_format)
    index = sorted(index, key=lambda pair: pair[0])
    return gather_blocks(tensor, index[0], [index[1:]])[0]


def gather_blocks(tensor: torch.Tensor, first: tuple[int, torch.Tensor],
                  rests: list[list[tuple[int, torch.Tensor]]]) -> list[torch.Tensor]:
    """``[gather(tensor, [first, *rest]) for rest in rests]`` in one blocked pass over ``first``'s slices: each
    block of them is read from memory once and serves every output. ``rest`` dims must be above ``first``'s."""
    dim0, rows = first
    if tensor.device.type != "cpu" or not any(rests):  # one dim, or an accelerator (few large kernels)
        outs = []
        for rest in rests:
            out = tensor.index_select(dim0, rows)
            for dim, i in rest:
                out = out.index_select(dim, i)
            outs.append(out.contiguous())
        return outs
    outs = []
    for rest in rests:
        shape = list(tensor.shape)
        shape[dim0] = rows.numel()
        for dim, i in rest:
            shape[dim] = i.numel()
        outs.append(torch.empty(shape, dtype=tensor.dtype, device=tensor.device))
    per_slice = max(1, tensor.numel() // max(tensor.shape[dim0], 1))
    block = max(1, _BLOCK_ELEMENTS // per_slice)
    for start in range(0, rows.numel(), block):
        piece = tensor.index_select(dim0, rows[start:start + block])
        n = piece.shape[dim0]
        for out, rest in zip(outs, rests):
            target = out.narrow(dim0, start, n)
            if not rest:
                target.copy_(piece)
                continue
            sub = piece
            for dim, i in rest[:-1]:
                sub = sub.index_select(dim, i)
            dim, i = rest[-1]
            if dim0 == 0:  # a row range of a contiguous tensor: the last gather writes in place
                torch.index_select(sub, dim, i, out=target)
            else:
                target.copy_(sub.index_select(dim, i))
    return outs
