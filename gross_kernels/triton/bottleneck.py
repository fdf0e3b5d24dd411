"""Decomposed layer (1×1 A → series core → 1×1 C + bias) in Triton: one fused launch where it fits, else separate kernels.

Fit rule (`fits_on_chip`): a program of BM output pixels keeps the core accumulator z (BM × T)
on chip, and, per tap and slice of BS bottleneck channels, a BM × BS slice of u = A·x and the
BS × T slice of the core. The fused forward runs when S and T padded to powers of two ≥ 16 are
both ≤ 128 (z's registers bound T; S is bounded by cost, since the core is applied densely and
u recomputed per tap) and the kernel has at most 49 taps; otherwise the layer runs as three
series-kernel launches (the 1×1 convolutions are series kernels with one dense term, i.e. matrix
multiplies) with u and z in memory.

Inside the fused kernel the core is applied as one block-diagonal S × T matrix per tap, built on
the fly from the active terms (zeros off the blocks), so small group sizes spend extra tensor-core
work to keep every tile ≥ 16 wide. u is recomputed for each tap from x instead of being written
out with a halo: x at a padded position loads as 0 and A has no bias, so u is exactly 0 there.
The price is KH·KW times the A product's arithmetic; it buys not writing and re-reading u and z
(4 activation passes). Whether that pays per shape is what bench/kernels.py's 'triton-unfused'
column measures (not yet measured on a GPU: see bench/RESULTS.md).

The backward pass runs as separate kernels (recompute u and z, then five GEMM-shaped kernels).
It is not fused: the weight gradients need grad_z, u and grad_u in memory anyway (each is a
reduction over all pixels), so chaining the input-gradient convolutions on chip would only save
re-reading two of them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import series
from ._common import (autotune, check_index_range, dot_precision, input_tap, pack_terms,
                      series_weight)

MAX_FUSED_WIDTH = 128


def _padded(width):
    return max(16, triton.next_power_of_2(width))


def fits_on_chip(C_in, S, T, C_out, kernel_size):
    """True where the fused one-launch forward applies (see the module docstring)."""
    kh, kw = kernel_size
    return _padded(S) <= MAX_FUSED_WIDTH and _padded(T) <= MAX_FUSED_WIDTH and kh * kw <= 49


def _fused_configs():
    # (BM, BS, BCI, BCO, warps, stages); the first is the interpreter's single config. z (BM × T)
    # dominates the registers: 4 warps spill at BM = 64 on sm_90 (cuobjdump -res-usage).
    choices = [(64, 16, 32, 32, 8, 2), (32, 16, 32, 32, 4, 2), (32, 32, 32, 32, 4, 2),
               (64, 32, 32, 32, 8, 2), (128, 16, 16, 32, 8, 2)]
    return [triton.Config({"BM": m, "BS": bs, "BCI": ci, "BCO": co}, num_warps=w, num_stages=s)
            for m, bs, ci, co, w, s in choices]


@autotune(_fused_configs(), key=["N", "H", "W", "CI", "S", "T", "CO", "G", "NT", "KH", "KW", "sh"],
          widths=lambda a: {"BS": a["S"], "BCI": a["CI"], "BCO": a["CO"]})
@triton.jit(do_not_specialize=series._TERM_ARGS)
def _fused_forward_kernel(x_ptr, a_ptr, c_ptr, b_ptr, y_ptr,
                          w0, w1, w2, w3, w4, w5, w6, w7, g0, g1, g2, g3, g4, g5, g6, g7,
                          N, H, W, Ho, Wo, CI, S, T, CO, G,
                          sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                          sh, sw, ph, pw, dh, dw,
                          NT, KH: tl.constexpr, KW: tl.constexpr,
                          HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                          TP: tl.constexpr, BM: tl.constexpr, BS: tl.constexpr,
                          BCI: tl.constexpr, BCO: tl.constexpr):
    """y = C · core(A · x) + bias for BM output pixels, u and z never leaving the chip.

    u is produced BS bottleneck channels at a time and consumed at once by the matching BS rows
    of the core tap, so only a BM × BS slice of u and a BS × TP slice of the core are live.
    """
    m = tl.program_id(0) * BM + tl.arange(0, BM)
    m_ok = m < N * Ho * Wo
    n = m // (Ho * Wo)
    r = m % (Ho * Wo)
    ho = r // Wo
    wo = r % Wo
    t_idx = tl.arange(0, TP)
    t_ok = t_idx < T
    x_row = n * sxn  # int32 offsets: launchers refuse tensors of 2**31 elements or more
    z = tl.zeros((BM, TP), tl.float32)
    for tap in range(KH * KW):  # one loop: nested tap loops cost registers
        pix_ok, pix = input_tap(tap, ho, wo, x_row, m_ok, H, W, sh, sw, ph, pw, dh, dw, sxh, sxw,
                                KW)
        for s0 in range(0, S, BS):
            s_idx = s0 + tl.arange(0, BS)
            s_ok = s_idx < S
            u = tl.zeros((BM, BS), tl.float32)
            for c0 in range(0, CI, BCI):
                ci = c0 + tl.arange(0, BCI)
                ci_ok = ci < CI
                xt = tl.load(x_ptr + pix[:, None] + ci[None, :] * sxc,
                             mask=pix_ok[:, None] & ci_ok[None, :], other=0.0)
                at = tl.load(a_ptr + s_idx[None, :] * CI + ci[:, None],
                             mask=ci_ok[:, None] & s_ok[None, :], other=0.0)
                u = tl.dot(xt, at, u, input_precision=PREC)
            # Round u to the input dtype, as a three-kernel pipeline storing u would.
            u_t = u.to(x_ptr.dtype.element_ty)
            wt = series_weight(w0, w1, w2, w3, w4, w5, w6, w7,
                               g0, g1, g2, g3, g4, g5, g6, g7,
                               t_idx[None, :], s_idx[:, None], tap, T, S,
                               s_ok[:, None] & t_ok[None, :], NT, KH * KW)
            z = tl.dot(u_t, wt.to(u_t.dtype), z, input_precision=PREC)
    z_t = z.to(x_ptr.dtype.element_ty)
    y_row = n * syn + ho * syh + wo * syw
    for o0 in range(0, CO, BCO):
        co = o0 + tl.arange(0, BCO)
        co_ok = co < CO
        ct = tl.load(c_ptr + co[None, :] * T + t_idx[:, None],
                     mask=t_ok[:, None] & co_ok[None, :], other=0.0)
        y = tl.dot(z_t, ct, input_precision=PREC)
        if HAS_BIAS:
            y += tl.load(b_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + y_row[:, None] + co[None, :] * syc, y.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & co_ok[None, :])


_UNIT = ((1, 1), (0, 0), (1, 1))  # stride, padding, dilation of a 1×1 convolution


def _pointwise(x, weight, bias=None):
    """A 1×1 convolution as the series kernel with one dense term (a matrix multiply)."""
    c_in = x.shape[1]
    return series.forward(x, [weight], (c_in,), c_in, *_UNIT, bias=bias)


def _pointwise_input_grad(grad_out, weight, x_shape):
    c_in = x_shape[1]
    return series.backward_input(grad_out, [weight], (c_in,), c_in, x_shape, *_UNIT)


def _pointwise_weight_grad(grad_out, x, weight):
    c_in = x.shape[1]
    return series.backward_weight(grad_out, x, [weight], (c_in,), c_in, *_UNIT)[0]


def _fused_forward(x, A, cores, C, bias, group_sizes, group_size, stride, padding, dilation):
    N, CI, H, W = x.shape
    S = A.shape[0]
    T, _, KH, KW = cores[0].shape
    CO = C.shape[0]
    ptrs, sizes, nt = pack_terms(cores, group_sizes, group_size)
    Ho = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    y = series._like((N, CO, Ho, Wo), x)
    check_index_range(x, y)
    A = A.reshape(S, CI).contiguous()
    C = C.reshape(CO, T).contiguous()

    def grid(meta):
        return (triton.cdiv(N * Ho * Wo, meta["BM"]),)

    has_bias = bias is not None
    bias = bias.contiguous() if has_bias else y  # y: an unread placeholder pointer
    _fused_forward_kernel[grid](x, A, C, bias, y, *ptrs, *sizes,
                                N, H, W, Ho, Wo, CI, S, T, CO, group_size,
                                *x.stride(), *y.stride(), *stride, *padding, *dilation,
                                NT=nt, KH=KH, KW=KW, HAS_BIAS=has_bias,
                                PREC=dot_precision(x.dtype), TP=_padded(T))
    return y


def forward(x, A, cores, C, bias, group_sizes, group_size, stride, padding, dilation, fused=None):
    """The whole layer; `fused=None` applies the fit rule, True/False force a path (tests, benchmarks)."""
    if fused is None:
        fused = fits_on_chip(x.shape[1], A.shape[0], cores[0].shape[0], C.shape[0],
                             cores[0].shape[2:])
    if fused:
        return _fused_forward(x, A, cores, C, bias, group_sizes, group_size, stride, padding,
                              dilation)
    u = _pointwise(x, A)
    z = series.forward(u, cores, group_sizes, group_size, stride, padding, dilation)
    return _pointwise(z, C, bias)


def backward(grad_y, x, A, cores, C, bias, group_sizes, group_size, stride, padding, dilation,
             needs=(True,) * 5):
    """(grad_x, grad_A, grad_cores_active, grad_C, grad_bias), by separate Triton kernels; None
    where `needs` (flags for x, A, cores, C, bias) asks for no gradient.

    u and z are recomputed (two GEMM-shaped launches) rather than saved by the forward pass.
    """
    need_x, need_A, need_cores, need_C, need_bias = needs
    need_u = need_x or need_A
    u = _pointwise(x, A)
    z = series.forward(u, cores, group_sizes, group_size, stride, padding, dilation)
    grad_C = _pointwise_weight_grad(grad_y, z, C) if need_C else None
    grad_z = _pointwise_input_grad(grad_y, C, z.shape) if need_u or need_cores else None
    grad_cores = series.backward_weight(grad_z, u, cores, group_sizes, group_size, stride,
                                        padding, dilation) if need_cores else None
    grad_x = grad_A = None
    if need_u:
        grad_u = series.backward_input(grad_z, cores, group_sizes, group_size, u.shape, stride,
                                       padding, dilation)
        grad_A = _pointwise_weight_grad(grad_u, x, A) if need_A else None
        grad_x = _pointwise_input_grad(grad_u, A, x.shape) if need_x else None
    grad_bias = (grad_y.sum(dim=(0, 2, 3), dtype=torch.float32).to(bias.dtype)
                 if bias is not None and need_bias else None)
    return grad_x, grad_A, grad_cores, grad_C, grad_bias
