"""Test-wide setup: Triton runs in its CPU interpreter, markers, deterministic seeds."""
import os
import sys

# Triton reads the flag when @triton.jit runs, so it must be set before any kernel module imports.
os.environ.setdefault("TRITON_INTERPRET", "1")
# auto's decisions stay in memory unless a test asks for the disk cache (tests/test_dispatch.py).
os.environ.setdefault("GROSS_KERNELS_CACHE", "off")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: longer end-to-end test")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
