"""Loads the compiled extension gross_kernels._C (which registers the gross:: C++ ops), if it was built."""
import functools
from importlib import import_module

import torch

_state = {"loaded": None, "error": None}


def load():
    """Import gross_kernels._C once; return whether it loaded (the import error is kept for `error()`)."""
    if _state["loaded"] is None:
        try:
            import_module("gross_kernels._C")
            _state["loaded"] = True
        except (ImportError, OSError) as exc:  # not built, or built against another torch
            _state["loaded"] = False
            _state["error"] = f"{type(exc).__name__}: {exc}"
    return _state["loaded"]


def error():
    """Why the extension did not load (None when it loaded or was never tried)."""
    return _state["error"]


@functools.lru_cache(maxsize=None)
def _has_kernel(op, dispatch_key):
    # Asked on every CPU call of the ops; the registrations are fixed once the library loaded.
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key)


def has_cpu_kernels():
    """Whether the C++ CPU kernels are registered."""
    return load() and _has_kernel("gross::series_conv_forward", "CPU")


def has_cuda_kernels():
    """Whether the CUDA kernels were compiled into the extension (registered for the CUDA key)."""
    return load() and _has_kernel("gross::series_conv_forward", "CUDA")


def has_relayout():
    """Whether the CPU NCHW <-> channels-last transpose kernel is registered."""
    return load() and _has_kernel("gross::relayout", "CPU")
