"""Shared pieces of the Triton kernels: interpreter flag, term packing, autotune configs, the in-kernel series weight."""
from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

# Triton decides at @triton.jit time whether kernels run in its CPU interpreter, so the flag is
# read once, at import, exactly like Triton itself does.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Active terms travel as this many pointer arguments (padded with a dummy, masked by a constexpr).
MAX_TERMS = 8


def pack_terms(cores, group_sizes, group_size):
    """Active cores (made contiguous) and their group sizes, padded to MAX_TERMS; returns (ptrs, sizes, count)."""
    active = [(core.contiguous(), g) for core, g in zip(cores, group_sizes) if g <= group_size]
    count = len(active)
    if count > MAX_TERMS:
        raise ValueError(f"cores: the Triton kernels take at most {MAX_TERMS} active terms, got {count}")
    pad = MAX_TERMS - count
    ptrs = [core for core, _ in active] + [active[0][0]] * pad
    sizes = [g for _, g in active] + [1] * pad
    return ptrs, sizes, count


def configs(choices):
    """The autotune config list: all choices on a GPU, only the first under the interpreter.

    `@triton.autotune` benchmarks when it has several configs, which needs a GPU; with one it
    skips benchmarking, so the interpreter stays deterministic and fast.
    """
    return choices[:1] if INTERPRET else choices


def _tune_bench(kernel_call, quantiles):
    # Short warm-up/repeat (ms): tuning the benchmark's ~100 shapes takes seconds, not minutes.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def autotune(choices, key, widths):
    """`triton.autotune` over `configs(choices)` keyed by shape, with short timing and, where this
    Triton supports it, results cached on disk so that a shape keeps its config across processes.

    `widths(args) -> {block name: extent}` gives the problem extent each block dimension tiles;
    configs whose block exceeds max(16, next power of two of it) are pruned before compiling,
    so a narrow layer neither compiles nor times tiles that would be mostly masked.
    """
    def prune(candidates, named_args, **kwargs):
        extents = widths({**named_args, **kwargs})
        kept = [c for c in candidates
                if all(c.kwargs[b] <= max(16, triton.next_power_of_2(int(e)))
                       for b, e in extents.items())]
        return kept or candidates[:1]

    accepted = inspect.signature(triton.autotune).parameters
    extra = {name: value for name, value in (("do_bench", _tune_bench), ("cache_results", True))
             if name in accepted}
    return triton.autotune(configs=configs(choices), key=key,
                           prune_configs_by={"early_config_prune": prune}, **extra)


def dot_precision(dtype: torch.dtype) -> str:
    """'tf32' for float32 only where PyTorch's convolution flag allows it (as F.conv2d does), else 'ieee'."""
    if dtype == torch.float32 and not INTERPRET and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def check_index_range(*tensors):
    """Kernels compute element offsets in int32 (64-bit offsets cost registers and spills), so
    refuse tensors whose offsets could overflow."""
    for t in tensors:
        if t is not None and t.numel() >= 2**31:
            raise ValueError(f"tensor of shape {tuple(t.shape)}: the Triton kernels take tensors of "
                             f"fewer than 2**31 elements")


@triton.jit
def input_tap(tap, ho, wo, x_row, m_ok, H, W, sh, sw, ph, pw, dh, dw, sxh, sxw,
              KW: tl.constexpr):
    """Where kernel tap `tap` of output pixels (ho, wo) reads its input: (in-image mask, offsets).

    The offsets are x_row + hi·sxh + wi·sxw for the tap's input pixel (hi, wi); padding pixels are
    masked out, so a masked load reads them as zeros.
    """
    hi = ho * sh - ph + tap // KW * dh
    wi = wo * sw - pw + tap % KW * dw
    pix_ok = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
    return pix_ok, x_row + hi * sxh + wi * sxw


@triton.jit
def _term_weight(acc, w_ptr, g, o, c, tap, T, S, KK: tl.constexpr, mask):
    """Add one term's weight at (out channel o, global in channel c, tap) where c lies in o's g-block."""
    tg = (g * T) // S
    blk = o // tg
    ok = mask & (blk == c // g)
    ci = c - blk * g
    w = tl.load(w_ptr + o * (g * KK) + ci * KK + tap, mask=ok, other=0.0)
    return acc + w.to(tl.float32)


@triton.jit
def series_weight(w0, w1, w2, w3, w4, w5, w6, w7, g0, g1, g2, g3, g4, g5, g6, g7,
                  o, c, tap, T, S, mask, NT, KK: tl.constexpr):
    """Effective weight Σ_i cores[i][o, c mod g_i, tap] over active terms whose g_i-block of o holds c.

    `o` and `c` are broadcastable int tensors (global output / input channel); the result has
    their broadcast shape, in float32. No expanded weight ever exists in memory.
    """
    acc = tl.zeros(mask.shape, tl.float32)
    acc = _term_weight(acc, w0, g0, o, c, tap, T, S, KK, mask)
    if NT > 1:
        acc = _term_weight(acc, w1, g1, o, c, tap, T, S, KK, mask)
    if NT > 2:
        acc = _term_weight(acc, w2, g2, o, c, tap, T, S, KK, mask)
    if NT > 3:
        acc = _term_weight(acc, w3, g3, o, c, tap, T, S, KK, mask)
    if NT > 4:
        acc = _term_weight(acc, w4, g4, o, c, tap, T, S, KK, mask)
    if NT > 5:
        acc = _term_weight(acc, w5, g5, o, c, tap, T, S, KK, mask)
    if NT > 6:
        acc = _term_weight(acc, w6, g6, o, c, tap, T, S, KK, mask)
    if NT > 7:
        acc = _term_weight(acc, w7, g7, o, c, tap, T, S, KK, mask)
    return acc
