"""The decomposed layer with a dense core (one group) run as one convolution with the folded weight.

At the largest group size of a series whose bottleneck has one group, 1×1 A → k×k core → 1×1 C
is a product of three linear maps that `C · core · A` computes once per call in weight space.
One k×k convolution with it costs C_out·C_in·k² multiply-adds per output pixel against
C_in·S (at the input resolution) + T·S·k² + C_out·T for the three convolutions, and reads and
writes the image once instead of three times: fewer operations whenever S ≥ C_in and T ≥ C_out
(the paper's bottlenecks, S = C_in, T = C_out). The backward gets every factor's gradient from
the folded weight's gradient by weight-space contractions, so it saves no activations at all.
Same contract as the `reference` module's bottleneck functions (x may be NCHW or channels-last).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from .algebra import effective_core, gather_core


def _macs_per_call(x_shape, S, T, C_out, k_area, out_hw):
    """(folded, unfolded) multiply-adds per image pass; the weight-space work counted in full."""
    n, c_in, h, w = x_shape
    out_pixels = n * out_hw[0] * out_hw[1]
    unfolded = n * h * w * c_in * S + out_pixels * (T * S * k_area + C_out * T)
    # The fold in the forward, and the fold plus three contractions of its gradient in the
    # backward: each about (C_out·T·S + C_out·S·C_in)·k² multiply-adds.
    fold = 4 * (C_out * T * S + C_out * S * c_in) * k_area
    return out_pixels * C_out * c_in * k_area + fold, unfolded


def pays(x_shape, S, T, C_out, kernel, group_size, out_hw) -> bool:
    """Whether the folded convolution does fewer multiply-adds than the three convolutions."""
    if group_size != S:
        return False
    folded, unfolded = _macs_per_call(x_shape, S, T, C_out, kernel[0] * kernel[1], out_hw)
    return folded < unfolded


def fold(A, core, C):
    """The folded weight (C_out, C_in, kh, kw) = C · core · A, core dense (T, S, kh, kw)."""
    return torch.einsum("oskl,sc->ockl", torch.einsum("ot,tskl->oskl", C.flatten(1), core),
                        A.flatten(1))


def bottleneck_forward(x, A, cores, C, bias, group_sizes, group_size, stride, padding, dilation):
    """The whole decomposed layer as one convolution with the folded weight."""
    core = effective_core(cores, group_sizes, group_size, A.shape[0])
    return F.conv2d(x, fold(A, core, C), bias, stride, padding, dilation)


def bottleneck_backward(grad_y, x, A, cores, C, bias, group_sizes, group_size, stride, padding,
                        dilation):
    """(grad_x, grad_A, grads of the active cores, grad_C, grad_bias) via the folded weight."""
    S = A.shape[0]
    core = effective_core(cores, group_sizes, group_size, S)
    A2, C2 = A.flatten(1), C.flatten(1)
    grad_x, grad_W = reference.conv_backward(grad_y, x, fold(A, core, C), stride, padding,
                                             dilation, 1)
    # W[o,c] = Σ_{t,s} C[o,t] core[t,s] A[s,c] (per kernel tap), so each factor's gradient is
    # grad_W contracted with the other two (two-operand steps fix the cheap contraction order).
    grad_A = torch.einsum("oskl,ockl->sc", torch.einsum("ot,tskl->oskl", C2, core),
                          grad_W).view_as(A)
    grad_core = torch.einsum("ot,oskl->tskl", C2, torch.einsum("ockl,sc->oskl", grad_W, A2))
    grad_C = torch.einsum("ockl,tckl->ot", grad_W,
                          torch.einsum("tskl,sc->tckl", core, A2)).view_as(C)
    grad_cores = [gather_core(grad_core, S, g, group_size)
                  for g in group_sizes if g <= group_size]
    grad_bias = grad_y.sum(dim=(0, 2, 3)) if bias is not None else None
    return grad_x, grad_A, grad_cores, grad_C, grad_bias
