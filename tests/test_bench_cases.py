"""bench/cases.py (the benchmark cases, defined once) and the pytest-benchmark suites built on them.

CI runs the suites themselves once (`.ci/run`: `pytest bench --benchmark-disable --bench-tiny`);
these tests check what their timings would mean: that the baselines compute the library's layer,
that the cases are valid and cover every network, and that the suites offer every backend and pass.
"""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import cases  # noqa: E402
import gross_kernels as gk  # noqa: E402
import ops  # noqa: E402
from test_bench_kernels import BACKENDS as KERNEL_BACKENDS  # noqa: E402
from test_bench_kernels import PASSES as KERNEL_PASSES  # noqa: E402
from test_bench_ops import BACKENDS as OPS_BACKENDS  # noqa: E402

AWKWARD = [cases.Layer("", ["stride 2, 18→12"], 2, 6, 8, 7, 2, 18, 12, (3, 9, 18)),
           cases.Layer("", ["dilation 2"], 1, 4, 5, 8, 1, 8, 8, (1, 2, 8), padding=2, dilation=2)]


@pytest.mark.parametrize("layer", [cases.tiny(cases.paper_layers("vgg16-hc")[3])] + AWKWARD,
                         ids=lambda layer: layer.title)
def test_baselines_compute_the_library_layer(layer):
    xs, firsts, cores, lasts, bias = cases.make_tensors(layer, dtype=torch.float64)
    for group_size in layer.group_sizes:
        want = cases.call_layer("reference", layer, xs[0], firsts, cores, lasts, bias, group_size)
        for baseline in ("torch", "torch'", "naive"):
            got = cases.call_layer(baseline, layer, xs[0], firsts, cores, lasts, bias, group_size)
            assert cases.rel_error(got, want) < 1e-12, (baseline, group_size)


def test_runner_computes_what_each_pass_needs():
    layer = cases.tiny(cases.paper_layers("4layer")[0])
    tensors = cases.make_tensors(layer)
    xs = tensors[0]
    for pass_ in cases.PASSES:
        y = cases.runner("reference", layer, tensors, layer.group_sizes[-1], pass_)()
        assert y.shape == (1, layer.c_out, 2, 2)
        assert y.requires_grad == (pass_ != "fwd")
        if pass_ != "fwd":
            assert xs[0].requires_grad == (pass_ == "fwd+bwd")
    with pytest.raises(ValueError, match="pass_"):
        cases.runner("reference", layer, tensors, 1, "bwd")


def test_every_case_is_a_valid_series_layer():
    layers = [layer for net in cases.NETS for layer in cases.paper_layers(net)]
    for layer in layers + [cases.tiny(layer) for layer in layers] + AWKWARD:
        gk.SeriesConv2d(layer.c_in, layer.c_out, 3, layer.group_sizes, (layer.S, layer.T),
                        layer.stride, layer.padding, layer.dilation)


def test_layer_lists_merge_shapes_and_cover_every_network():
    vgg = cases.distinct_layers("vgg16-cifar")
    assert len(vgg) == 8 and ["conv3_2", "conv3_3"] in [layer.names for layer in vgg]
    interleaved = cases.interleaved_layers(cases.NETS)
    assert [layer.net for layer in interleaved[:len(cases.NETS)]] == list(cases.NETS)
    assert len(interleaved) == sum(len(cases.distinct_layers(net)) for net in cases.NETS)
    assert len(cases.unique_layers(cases.NETS)) <= len(interleaved)
    assert [layer.title for layer in ops.LAYERS] == [
        "4-layer conv2", "4-layer conv3", "4-layer conv4", "VGG-16 conv2_2", "VGG-16 conv3_2",
        "VGG-16 conv4_2", "VGG-16 conv5_2"]
    assert {layer.batch for layer in ops.LAYERS} == {128, 64}


def test_suites_offer_every_backend_and_pass():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT, os.path.join(ROOT, "python"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", "bench", "--bench-tiny", "--bench-device", "cpu"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    ops_ids = [i for i in ids if i.startswith("bench/test_bench_ops.py")]
    kernel_ids = [i for i in ids if i.startswith("bench/test_bench_kernels.py")]
    assert len(ops_ids) == 2 * 2 * len(cases.PASSES) * len(OPS_BACKENDS)
    # One tiny layer at two group sizes, float32 only on the CPU.
    assert len(kernel_ids) == 2 * len(KERNEL_PASSES) * len(KERNEL_BACKENDS)
    for backend in OPS_BACKENDS:
        assert any(i.endswith(f"-{backend}]") for i in ops_ids), backend
    for backend in KERNEL_BACKENDS:
        assert any(i.endswith(f"-{backend}]") for i in kernel_ids), backend
