"""The fast paths on PyTorch's own convolutions: `channels-last` tensors and the `folded` dense core.

`ChannelsLast`: oneDNN's CPU convolutions (and cuDNN's tensor-core ones) work in NHWC; handed
NCHW tensors they reorder every input and output. Converting x once (and, under autograd, the
incoming gradient once) avoids those reorders; outputs come back in x's own layout.

`Folded`: at a one-group size (G = S), 1×1 A → k×k core → 1×1 C is a product of three linear maps
that `C · core · A` computes once per call in weight space; one k×k convolution with it costs
C_out·C_in·k² multiply-adds per output pixel against C_in·S (at the input resolution) + T·S·k² +
C_out·T for the three convolutions, and reads and writes the image once instead of three times.
Autograd gets every factor's gradient from the folded weight's gradient by weight-space
contractions, so no activation of the three convolutions is kept.

`static_choice` is the rule `auto` follows when it does not measure (GROSS_KERNELS_AUTOTUNE=0,
under torchrun, on fake tensors): these paths and `reference` only, all PyTorch's own
convolutions, chosen by what bench/RESULTS.md measured on the CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _layout
from ..algebra import effective_core
from .reference import Reference


def _nhwc(t):
    return _layout.to_memory_format(t, torch.channels_last)


class ChannelsLast(Reference):
    """The reference on channels-last tensors; outputs back in x's layout."""

    name = "channels-last"

    def series(self, x, cores, geom):
        return _layout.to_memory_format(super().series(_nhwc(x), cores, geom), _layout.format_of(x))

    def layer(self, x, A, cores, C, bias, geom):
        return _layout.to_memory_format(super().layer(_nhwc(x), A, cores, C, bias, geom),
                                        _layout.format_of(x))


def fold(A, core, C):
    """The folded weight (C_out, C_in, kh, kw) = C · core · A, core dense (T, S, kh, kw)."""
    return torch.einsum("oskl,sc->ockl", torch.einsum("ot,tskl->oskl", C.flatten(1), core),
                        A.flatten(1))


class Folded(Reference):
    """The layer at a one-group size as one convolution with the folded weight (its gradients
    reach the factors through the fold's contractions); the series op is the reference's."""

    name = "folded"

    def applies(self, signature):
        return signature.op == "bottleneck" and signature.geom.group_size == signature.S

    def layer(self, x, A, cores, C, bias, geom):
        core = effective_core(cores, geom.group_sizes, geom.group_size, A.shape[0])
        return F.conv2d(x, fold(A, core, C), bias, *geom.conv)


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
