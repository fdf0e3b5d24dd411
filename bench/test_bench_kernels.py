"""pytest-benchmark suite of bench/kernels.py: the whole decomposed layer on the GPU, per backend, dtype and pass.

Cases from bench/cases.py (every distinct layer shape of the paper's networks, at its smallest
and largest group size; float32 and bfloat16); one group per layer shape, group size, dtype and
pass; the backends, the plain PyTorch layer (`torch`) and the released approach (`naive`) as
parameters; timings synchronised with the GPU. Without a GPU only `--bench-tiny` runs (one tiny
layer, float32, Triton in its interpreter). Each case is first checked against the reference.
"""
import pytest
import torch

from cases import NETS, call_layer, make_tensors, rel_error, runner, tolerance, unique_layers
from suite import case_id, kernel_device, require_backend

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
    device = torch.device(kernel_device(request.config))
    require_backend(backend, device)
    torch.manual_seed(0)
    tensors = make_tensors(layer, device, getattr(torch, dtype))
    fn = runner(backend, layer, tensors, group_size, pass_)
    xs, firsts, cores, lasts, bias = tensors
    with torch.no_grad():
        want = call_layer("reference", layer, xs[0], firsts, cores, lasts, bias, group_size)
    assert rel_error(fn(), want) < tolerance(getattr(torch, dtype))
    timed(fn, device, f"kernels {layer.title} {layer.shape} | G={group_size} | {dtype} | {pass_}",
          layer=layer.title, shape=layer.shape, group_size=group_size, dtype=dtype, pass_=pass_,
          backend=backend)
