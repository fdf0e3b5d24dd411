"""The `triton` backend: the Triton kernels of `gross_kernels.triton` (GPU; CPU tensors only under
TRITON_INTERPRET=1, for tests). The layer forward is fused where it fits on chip; the backward
recomputes u, z rather than keeping them."""
from __future__ import annotations

import importlib

import torch

from .base import Kernels, Needs

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels():
    return importlib.import_module("gross_kernels.triton")


class Triton(Kernels):
    """Adapter from the backend interface to the Triton launchers' positional geometry."""

    name = "triton"

    def unavailable_reason(self, device, dtype):
        try:
            kernels = _kernels()
        except Exception as error:  # triton missing or broken: report why, never crash the import
            return f"Triton could not be imported ({error})"
        ok, reason = kernels.is_available(device)
        if not ok:
            return reason
        if dtype not in _DTYPES:
            return f"the triton backend supports float32, float16 and bfloat16, got {dtype}"
        return None

    def tunes_on(self, device):
        # On CPU tensors the kernels run in Triton's interpreter: a debugging path, never a choice.
        return device.type == "cuda"

    def series_forward(self, x, cores, geom):
        return _kernels().series_forward(x, cores, geom.group_sizes, geom.group_size, *geom.conv)

    def series_backward(self, grad_z, x, cores, geom, need_x=True, need_cores=True):
        kernels, series = _kernels(), (geom.group_sizes, geom.group_size)
        grad_x = (kernels.series_backward_input(grad_z, cores, *series, x.shape, *geom.conv)
                  if need_x else None)
        grad_cores = (kernels.series_backward_weight(grad_z, x, cores, *series, *geom.conv)
                      if need_cores else None)
        return grad_x, grad_cores

    def bottleneck_forward(self, x, A, cores, C, bias, geom):
        return _kernels().bottleneck_forward(x, A, cores, C, bias, geom.group_sizes,
                                             geom.group_size, *geom.conv)

    def bottleneck_backward(self, grad_y, x, A, cores, C, bias, geom, needs=Needs(),
                            activations=None):
        return _kernels().bottleneck_backward(grad_y, x, A, cores, C, bias, geom.group_sizes,
                                              geom.group_size, *geom.conv, tuple(needs))
