"""Helpers of the pytest-benchmark suites (bench/test_bench_*.py): their device, test ids and skips."""
import pytest
import torch

import gross_kernels as gk
from cases import BASELINES


def kernel_device(config):
    """The kernel suite's device name: --bench-device, else cuda when a GPU is visible."""
    chosen = config.getoption("--bench-device")
    return chosen or ("cuda" if torch.cuda.is_available() else "cpu")


def case_id(layer, group_size):
    """A short test id for a layer at a group size, e.g. "vgg16-cifar:conv3_2+conv3_3:G32"."""
    names = "+".join(layer.names).replace(" ×", "x").replace(" ", "")
    return f"{layer.net}:{names}:G{group_size}"


def require_backend(backend, device):
    """Skip the test where `backend` (a library backend, not a baseline or auto) cannot run on `device`."""
    if backend not in BASELINES and backend != "auto" and backend not in gk.available_backends(device):
        pytest.skip(f"backend {backend!r} is not available on {device}")
