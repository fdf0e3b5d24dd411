"""The series algebra: a term's core re-expressed at a larger group size, and the summed core.

Used by every backend that builds the summed weight, by `SeriesConv2d.export` and by the
decomposition (`gross.decompose`).
"""
from __future__ import annotations

import torch


def _diagonal_blocks(weight: torch.Tensor, S: int, g: int, G: int) -> torch.Tensor:
    """View of the diagonal g-blocks of a group-size-G weight (T, G, kh, kw): (S/G, T·g/S, g, kh, kw, G/g).

    Output channel o of the g-grouping lies in G-group q, sub-block s (its g-group is q·G/g + s),
    at position j within that g-group; its g inputs sit at offset s·g of the G-group's inputs.
    """
    T, _, kh, kw = weight.shape
    r = G // g
    blocks = weight.view(S // G, r, T * g // S, r, g, kh, kw)
    return torch.diagonal(blocks, dim1=1, dim2=3)


def _as_diagonal(core: torch.Tensor, S: int, g: int, G: int) -> torch.Tensor:
    """A g-core (T, g, kh, kw) arranged like `_diagonal_blocks` of its expansion to group size G."""
    T, _, kh, kw = core.shape
    r = G // g
    return core.reshape(S // G, r, T * g // S, g, kh, kw).permute(0, 2, 3, 4, 5, 1)


def expand_core(core: torch.Tensor, S: int, g: int, G: int) -> torch.Tensor:
    """Re-express a core at group size g as a core at group size G (g | G): blocks on the diagonal."""
    if g == G:
        return core
    T, _, kh, kw = core.shape
    expanded = core.new_zeros(T, G, kh, kw)
    _diagonal_blocks(expanded, S, g, G).copy_(_as_diagonal(core, S, g, G))
    return expanded


def effective_core(cores, group_sizes, group_size: int, S: int) -> torch.Tensor:
    """Σ over active terms of each core expanded to the active group size: one grouped weight."""
    active = [(core, g) for core, g in zip(cores, group_sizes) if g <= group_size]
    total = active[-1][0]  # the term at the active group size itself
    if len(active) == 1:
        return total
    # Each smaller term only touches its diagonal blocks: add it there in place, no expansion.
    total = total.clone(memory_format=torch.contiguous_format)
    for core, g in active[:-1]:
        _diagonal_blocks(total, S, g, group_size).add_(_as_diagonal(core, S, g, group_size))
    return total


def sum_active(tensors, count: int):
    """Σ of the first `count` tensors (the summed 1×1 factor A or C of the active terms)."""
    total = tensors[0]
    for t in tensors[1:count]:
        total = total + t
    return total
