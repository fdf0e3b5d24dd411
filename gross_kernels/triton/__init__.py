"""Triton backend: the kernel-level contract of docs/ARCHITECTURE.md (series conv and decomposed layer).

Runs on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 was set before this import.
"""
from __future__ import annotations

try:
    from . import bottleneck as _bottleneck
    from . import series as _series
    from ._common import INTERPRET as _INTERPRET
    _IMPORT_ERROR = None
except ImportError as exc:  # triton missing or broken: the backend reports itself unavailable
    _IMPORT_ERROR = exc


def is_available(device) -> tuple:
    """(True, "") where these kernels can run on tensors of `device`, else (False, reason)."""
    import torch

    device = torch.device(device)
    if _IMPORT_ERROR is not None:
        return False, f"triton does not import: {_IMPORT_ERROR}"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        return True, ""
    if device.type == "cpu":
        if _INTERPRET:
            return True, ""
        return False, "Triton runs on CPU tensors only with TRITON_INTERPRET=1 set before import"
    return False, f"Triton kernels do not support device type {device.type!r}"


def series_forward(x, cores, group_sizes, group_size, stride, padding, dilation):
    """z = Σ_{active i} conv2d(x, cores[i], groups=S/g_i), one launch."""
    return _series.forward(x, cores, group_sizes, group_size, stride, padding, dilation)


def series_backward_input(grad_z, cores, group_sizes, group_size, x_shape, stride, padding,
                          dilation):
    """Gradient of the series conv with respect to x, one launch."""
    return _series.backward_input(grad_z, cores, group_sizes, group_size, x_shape, stride,
                                  padding, dilation)


def series_backward_weight(grad_z, x, cores, group_sizes, group_size, stride, padding, dilation):
    """Gradients of the active cores (a list), one GEMM launch and one gather launch."""
    return _series.backward_weight(grad_z, x, cores, group_sizes, group_size, stride, padding,
                                   dilation)


def bottleneck_forward(x, A, cores, C, bias, group_sizes, group_size, stride, padding, dilation):
    """The decomposed layer; fused in one launch where `bottleneck.fits_on_chip` holds."""
    return _bottleneck.forward(x, A, cores, C, bias, group_sizes, group_size, stride, padding,
                               dilation)


def bottleneck_backward(grad_y, x, A, cores, C, bias, group_sizes, group_size, stride, padding,
                        dilation, needs=(True,) * 5):
    """(grad_x, grad_A, grad_cores_active, grad_C, grad_bias) of the decomposed layer; None where
    `needs` (flags for x, A, cores, C, bias) asks for no gradient."""
    return _bottleneck.backward(grad_y, x, A, cores, C, bias, group_sizes, group_size, stride,
                                padding, dilation, needs)
