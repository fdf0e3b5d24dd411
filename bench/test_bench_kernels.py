"""pytest-benchmark suite of bench/kernels.py: the whole decomposed layer on the GPU, per backend, dtype and pass.

Cases from bench/cases.py (every distinct layer shape of the paper's networks, at its smallest
and largest group size; float32 and bfloat16); one group per layer shape, group size, dtype and
pass; the backends, the plain PyTorch layer (`torch`) and the released approach (`naive`) as
parameters; timings synchronised with the GPU. Without a GPU only `--bench-tiny` runs (one tiny
layer, float32, Triton in its interpreter). Each case is first checked against the reference.
"""
import pytest
import torch

from cases import NETS, unique_layers
from bench_device import kernel_device
from suite import case_id, check_and_time

BACKENDS = ("naive", "torch", "reference", "triton", "cuda", "auto")
PASSES = ("fwd", "fwd+bwd")


def _cases(config):
    tiny = config.getoption("--bench-tiny")
    if kernel_device(config) == "cpu" and not tiny:
        return []  # the interpreter is far too slow for the paper's shapes
    layers = unique_layers(NETS, smoke=tiny)
    return [(layer, g) for layer in layers for g in layer.extremes()]


def _dtypes(config):
    # The interpreter's bfloat16 dot is wrong (triton#11584): half precision on the GPU only.
    return ["float32"] + (["bfloat16"] if kernel_device(config) == "cuda" else [])


def pytest_generate_tests(metafunc):
    if "kernel_case" in metafunc.fixturenames:
        cases = _cases(metafunc.config)
        if not cases:
            pytest.skip("the kernel suite needs a GPU (or --bench-tiny)", allow_module_level=True)
        metafunc.parametrize("kernel_case", cases, ids=[case_id(*c) for c in cases])
        metafunc.parametrize("dtype", _dtypes(metafunc.config))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pass_", PASSES)
def test_kernels(timed, request, kernel_case, dtype, pass_, backend):
    layer, group_size = kernel_case
    check_and_time(timed, backend, layer, group_size, pass_,
                   torch.device(kernel_device(request.config)), getattr(torch, dtype),
                   f"kernels {layer.title} {layer.shape} | G={group_size} | {dtype} | {pass_}")
