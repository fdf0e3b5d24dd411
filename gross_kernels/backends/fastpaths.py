"""The fast paths on PyTorch's own convolutions: `channels-last` tensors and the `folded` dense core.

`ChannelsLast`: oneDNN's CPU convolutions (and cuDNN's tensor-core ones) work in NHWC; handed
NCHW tensors they reorder every input and output. Converting x (and the incoming gradient) once
avoids those reorders; the kept u, z stay channels-last, and the op layer returns outputs in x's
own layout.

`Folded`: at a one-group size (G = S), 1×1 A → k×k core → 1×1 C is a product of three linear maps
that `C · core · A` computes once per call in weight space; one k×k convolution with it costs
C_out·C_in·k² multiply-adds per output pixel against C_in·S (at the input resolution) + T·S·k² +
C_out·T for the three convolutions, and reads and writes the image once instead of three times.
Its backward gets every factor's gradient from the folded weight's gradient by weight-space
contractions, so it keeps no activations.

`static_choice` is the rule `auto` follows when it does not measure (GROSS_KERNELS_AUTOTUNE=0,
under torch.compile before a decision exists, under torchrun): these paths and `reference` only,
all PyTorch's own convolutions, chosen by what bench/RESULTS.md measured on the CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _layout
from ..algebra import effective_core, gather_core
from .base import Backend, Needs, conv_backward
from .reference import Reference


def _nhwc(t):
    return _layout.to_memory_format(t, torch.channels_last)


class ChannelsLast(Reference):
    """The reference on channels-last tensors."""

    name = "channels-last"

    def series_forward(self, x, cores, geom):
        return super().series_forward(_nhwc(x), cores, geom)

    def series_backward(self, grad_z, x, cores, geom, need_x=True, need_cores=True):
        return super().series_backward(_nhwc(grad_z), _nhwc(x), cores, geom, need_x, need_cores)

    def activation_layout(self, x, geom):
        return torch.channels_last

    def bottleneck_forward_saving(self, x, A, cores, C, bias, geom):
        return super().bottleneck_forward_saving(_nhwc(x), A, cores, C, bias, geom)

    def bottleneck_backward(self, grad_y, x, A, cores, C, bias, geom, needs=Needs(),
                            activations=None):
        return super().bottleneck_backward(_nhwc(grad_y), _nhwc(x), A, cores, C, bias, geom,
                                           needs, activations)


def fold(A, core, C):
    """The folded weight (C_out, C_in, kh, kw) = C · core · A, core dense (T, S, kh, kw)."""
    return torch.einsum("oskl,sc->ockl", torch.einsum("ot,tskl->oskl", C.flatten(1), core),
                        A.flatten(1))


class Folded(Backend):
    """The layer at a one-group size as one convolution with the folded weight; the series op is
    left to the reference (folding concerns the whole layer only)."""

    name = "folded"

    def __init__(self):
        self._reference = Reference()

    def unavailable_reason(self, device, dtype):
        return None

    def applies(self, signature):
        return signature.op == "bottleneck" and signature.geom.group_size == signature.S

    def series_forward(self, x, cores, geom):
        return self._reference.series_forward(x, cores, geom)

    def series_backward(self, grad_z, x, cores, geom, need_x=True, need_cores=True):
        return self._reference.series_backward(grad_z, x, cores, geom, need_x, need_cores)

    def bottleneck_forward(self, x, A, cores, C, bias, geom):
        core = effective_core(cores, geom.group_sizes, geom.group_size, A.shape[0])
        return F.conv2d(x, fold(A, core, C), bias, *geom.conv)

    def bottleneck_backward(self, grad_y, x, A, cores, C, bias, geom, needs=Needs(),
                            activations=None):
        S = A.shape[0]
        core = effective_core(cores, geom.group_sizes, geom.group_size, S)
        A2, C2 = A.flatten(1), C.flatten(1)
        need_weights = needs.A or needs.cores or needs.C
        need_bias = needs.bias and bias is not None
        grad_x, grad_W, grad_bias = conv_backward(grad_y, x, fold(A, core, C), *geom.conv, 1,
                                                  need_x=needs.x, need_weight=need_weights,
                                                  need_bias=need_bias)
        grad_A = grad_C = grad_cores = None
        # W[o,c] = Σ_{t,s} C[o,t] core[t,s] A[s,c] per kernel tap, so each factor's gradient is
        # grad_W contracted with the other two (two-operand steps fix the cheap order).
        if needs.A:
            grad_A = torch.einsum("oskl,ockl->sc", torch.einsum("ot,tskl->oskl", C2, core),
                                  grad_W).view_as(A)
        if needs.cores:
            grad_core = torch.einsum("ot,oskl->tskl", C2,
                                     torch.einsum("ockl,sc->oskl", grad_W, A2))
            grad_cores = [gather_core(grad_core, S, g, geom.group_size) for g in geom.active_sizes]
        if needs.C:
            grad_C = torch.einsum("ockl,tckl->ot", grad_W,
                                  torch.einsum("tskl,sc->tckl", core, A2)).view_as(C)
        return grad_x, grad_A, grad_cores, grad_C, grad_bias


def _folding_pays(signature) -> bool:
    """Whether the folded convolution does fewer multiply-adds than the three convolutions
    (the weight-space work counted in full: the fold, and in training its gradient's contractions)."""
    n, (c_in, h, w) = signature.batch, signature.x
    S, T, C_out, (kh, kw) = signature.S, signature.T, signature.C_out, signature.kernel
    out_h, out_w = signature.geom.output_hw((h, w), (kh, kw))
    out_pixels, k_area = n * out_h * out_w, kh * kw
    unfolded = n * h * w * c_in * S + out_pixels * (T * S * k_area + C_out * T)
    fold_macs = 4 * (C_out * T * S + C_out * S * c_in) * k_area
    return out_pixels * C_out * c_in * k_area + fold_macs < unfolded


def _gains_from_channels_last(signature) -> bool:
    """Whether oneDNN ran this layer faster on channels-last tensors, conversions included
    (bench/RESULTS.md, "Ops benchmark (CPU)"): training on 8×8 images and up, with a depthwise
    core, or with at most 64 channels; inference with at most 64 channels or large images."""
    channels, h, w = signature.x
    pixels = h * w
    if signature.needs.any:
        return pixels >= 64 or signature.geom.group_size == 1 or channels <= 64
    return channels <= 64 or pixels >= max(channels, 128)


def static_choice(signature) -> str:
    """The backend `auto` runs without measuring: a fast path where the CPU benchmark found one."""
    if (signature.device_type != "cpu" or signature.dtype != "float32"
            or signature.op != "bottleneck" or signature.batch is None or None in signature.x):
        return "reference"  # dynamic sizes under torch.compile: nothing to base a rule on
    if signature.geom.group_size == signature.S and _folding_pays(signature):
        return "folded"
    return "channels-last" if _gains_from_channels_last(signature) else "reference"
