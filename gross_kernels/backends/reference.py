"""The `reference` backend: PyTorch's own convolutions (cuDNN, oneDNN) on the summed core.

The series is summed into one grouped weight (`algebra.effective_core`, a few small in-place adds
on diagonal views), then one grouped convolution runs; the layer is that between two 1×1
convolutions. Made of differentiable PyTorch ops, it runs every device and dtype PyTorch does,
under autograd like a plain PyTorch layer; it is what `auto` verifies every other candidate
against, and what `auto` falls back to.
"""
from __future__ import annotations

import torch.nn.functional as F

from ..algebra import effective_core
from .base import Differentiable, pointwise


class Reference(Differentiable):
    """Summed core + F.conv2d; the layer composed with 1×1 convolutions."""

    name = "reference"

    def series(self, x, cores, geom):
        S = x.shape[1]
        weight = effective_core(cores, geom.group_sizes, geom.group_size, S)
        return F.conv2d(x, weight, None, *geom.conv, geom.groups(S))

    def layer(self, x, A, cores, C, bias, geom):
        return pointwise(self.series(pointwise(x, A), cores, geom), C, bias)
