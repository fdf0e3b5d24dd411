"""pytest-benchmark suite of bench/ops.py: the whole decomposed layer on the CPU, per backend and pass.

Cases from bench/cases.py (`ops_layers`, each at its smallest and largest group size); one group
per layer shape, group size and pass; the backends, the plain PyTorch layer (`torch`) and the
released approach (`naive`) as parameters. Each case is first checked against the reference.
"""
import pytest
import torch

from cases import PASSES, ops_layers, tiny
from suite import case_id, check_and_time

BACKENDS = ("torch", "naive", "reference", "cpp", "auto")


def _cases(config):
    layers = ops_layers()
    if config.getoption("--bench-tiny"):
        layers = [tiny(layer) for layer in layers[:2]]
    return [(layer, g) for layer in layers for g in layer.extremes()]


def pytest_generate_tests(metafunc):
    if "ops_case" in metafunc.fixturenames:
        cases = _cases(metafunc.config)
        metafunc.parametrize("ops_case", cases, ids=[case_id(*c) for c in cases])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pass_", PASSES)
def test_ops(timed, ops_case, pass_, backend):
    layer, group_size = ops_case
    check_and_time(timed, backend, layer, group_size, pass_, torch.device("cpu"), torch.float32,
                   f"ops {layer.title} {layer.shape} | G={group_size} | {pass_}")
