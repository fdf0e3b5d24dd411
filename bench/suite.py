"""Helpers of the pytest-benchmark suites (bench/test_bench_*.py): their device, test ids and skips."""
import pytest
import torch

import gross_kernels as gk
from cases import BASELINES, call_layer, make_tensors, rel_error, runner, tolerance


def case_id(layer, group_size):
    """A short test id for a layer at a group size, e.g. "vgg16-cifar:conv3_2+conv3_3:G32"."""
    names = "+".join(layer.names).replace(" ×", "x").replace(" ", "")
    return f"{layer.net}:{names}:G{group_size}"


def require_backend(backend, device):
    """Skip the test where `backend` (a library backend, not a baseline or auto) cannot run on `device`."""
    if backend not in BASELINES and backend != "auto" and backend not in gk.available_backends(device):
        pytest.skip(f"backend {backend!r} is not available on {device}")


def check_and_time(timed, backend, layer, group_size, pass_, device, dtype, group):
    """The suites' one test: `backend` on `layer` agrees with the reference, then is timed."""
    require_backend(backend, device)
    torch.manual_seed(0)
    tensors = make_tensors(layer, device, dtype)
    fn = runner(backend, layer, tensors, group_size, pass_)
    xs, firsts, cores, lasts, bias = tensors
    with torch.no_grad():
        want = call_layer("reference", layer, xs[0], firsts, cores, lasts, bias, group_size)
    assert rel_error(fn(), want) < tolerance(dtype)
    timed(fn, device, group, layer=layer.title, shape=layer.shape, group_size=group_size,
          dtype=str(dtype).removeprefix("torch."), pass_=pass_, backend=backend)
