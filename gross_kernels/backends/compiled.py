"""The compiled extension's kernels: `cpp` (C++ CPU loops) and `cuda` (CUDA kernels, with a fused
one-launch layer forward where its fit rule says the layer fits on chip)."""
from __future__ import annotations

import torch

from .. import _extension
from .base import Composed

_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class Compiled(Composed):
    """The extension's dispatcher ops `gross::series_conv_*` (the CPU or CUDA kernel by device)."""

    def __init__(self, name: str):
        self.name = name

    def unavailable_reason(self, device, dtype):
        if not _extension.load():
            return f"the compiled extension gross_kernels._C is not available ({_extension.error()})"
        if self.name == "cpp":
            if not _extension.has_cpu_kernels():
                return "gross_kernels._C has no CPU kernels registered"
            if device.type != "cpu":
                return f"the cpp backend runs CPU tensors only, got device {device}"
            if dtype not in (torch.float32, torch.float64):
                return f"the cpp backend supports float32 and float64, got {dtype}"
            return None
        if device.type != "cuda":
            return f"the cuda backend runs CUDA tensors only, got device {device}"
        if not _extension.has_cuda_kernels():
            return "gross_kernels._C was built without CUDA kernels (GROSS_CUDA=0 or no toolkit)"
        if dtype not in _CUDA_DTYPES:
            return f"the cuda backend supports float32, float64, float16 and bfloat16, got {dtype}"
        return None

    def series_forward(self, x, cores, geom):
        return torch.ops.gross.series_conv_forward(x, cores, *geom.as_lists())

    def series_backward(self, grad_z, x, cores, geom, need_x=True, need_cores=True):
        ops, args = torch.ops.gross, geom.as_lists()
        grad_x = (ops.series_conv_backward_input(grad_z, cores, args[0], args[1], list(x.shape),
                                                 *args[2:]) if need_x else None)
        grad_cores = ops.series_conv_backward_weight(grad_z, x, cores, *args) if need_cores else None
        return grad_x, grad_cores

    def _fuses(self, x, A, cores, geom) -> bool:
        return (self.name == "cuda" and x.dtype != torch.float64
                and torch.ops.gross.series_bottleneck_fits(A.shape[0], cores[0].shape[0],
                                                           list(cores[0].shape[2:]),
                                                           list(geom.stride), list(geom.dilation)))

    def bottleneck_forward(self, x, A, cores, C, bias, geom):
        # Inference only: a training forward keeps u, z through the composed path instead.
        if self._fuses(x, A, cores, geom):
            return torch.ops.gross.series_bottleneck_forward(x, A, cores, C, bias, *geom.as_lists())
        return super().bottleneck_forward(x, A, cores, C, bias, geom)
