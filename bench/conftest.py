"""The pytest-benchmark suites of bench/: options, Triton's interpreter without a GPU, synchronised timing.

    pytest bench/ --benchmark-only [--benchmark-save=NAME] [--benchmark-compare]   # time on this machine
    pytest bench/ --benchmark-disable --bench-tiny                                 # CI: run each case once
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_addoption(parser):
    group = parser.getgroup("gross bench")
    group.addoption("--bench-tiny", action="store_true",
                    help="tiny layer shapes (CI runs them once with --benchmark-disable)")
    group.addoption("--bench-device", choices=("cuda", "cpu"), default=None,
                    help="device of the kernel suite (default: cuda when available, else cpu)")


def pytest_configure(config):
    # Triton reads the flag when its kernels are defined, i.e. before the suites import them
    # (gross_kernels imports Triton, through torch.compile's machinery).
    from bench_device import kernel_device

    if kernel_device(config) == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def timed(benchmark):
    """timed(fn, device, group, **info): benchmark fn() once warmed up, CUDA work synchronised,
    grouped under `group` (one group per layer shape, group size and pass) with `info` attached."""
    import torch

    def run(fn, device, group, **info):
        def synchronised():
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return out

        synchronised()  # compilation and autotuning stay out of the timings
        benchmark.group = group
        benchmark.extra_info.update(info)
        return benchmark(synchronised)

    return run
