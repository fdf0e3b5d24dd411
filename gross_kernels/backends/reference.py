"""The `reference` backend: PyTorch's own convolutions (cuDNN, oneDNN) on the summed core.

The series is summed into one grouped weight (`algebra.effective_core`, a few small in-place
adds), then one grouped convolution runs; the layer is that between two 1×1 convolutions. It runs
every device and dtype PyTorch does, is what `auto` verifies every other candidate against, and
is what `auto` falls back to.
"""
from __future__ import annotations

import torch.nn.functional as F

from ..algebra import effective_core, gather_core
from .base import Composed, conv_backward


class Reference(Composed):
    """Summed core + F.conv2d; the layer composed with 1×1 convolutions."""

    name = "reference"

    def unavailable_reason(self, device, dtype):
        return None

    def series_forward(self, x, cores, geom):
        S = x.shape[1]
        weight = effective_core(cores, geom.group_sizes, geom.group_size, S)
        return F.conv2d(x, weight, None, *geom.conv, geom.groups(S))

    def series_backward(self, grad_z, x, cores, geom, need_x=True, need_cores=True):
        S = x.shape[1]
        weight = effective_core(cores, geom.group_sizes, geom.group_size, S)
        grad_x, grad_weight, _ = conv_backward(grad_z, x, weight, *geom.conv, geom.groups(S),
                                               need_x=need_x, need_weight=need_cores)
        if grad_weight is None:
            return grad_x, None
        return grad_x, [gather_core(grad_weight, S, g, geom.group_size) for g in geom.active_sizes]
