"""Triton kernels under TRITON_INTERPRET=1 on CPU tensors (float32) against the naive oracle and its autograd."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from oracle import naive_bottleneck, naive_series_conv

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("these checks run the kernels in Triton's interpreter (TRITON_INTERPRET=1)",
                allow_module_level=True)
gt = pytest.importorskip("gross_kernels.triton")
from gross_kernels.triton import bottleneck as tb  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (N, S, T, H, W, group_sizes, group_size, kernel, stride, padding, dilation, channels_last)
SERIES_CASES = [
    (2, 16, 16, 5, 4, (1, 4, 16), 16, (3, 3), (1, 1), (1, 1), (1, 1), False),
    (1, 16, 16, 7, 6, (1, 4, 16), 4, (3, 3), (2, 2), (1, 1), (1, 1), False),
    (1, 8, 16, 5, 5, (1, 4, 8), 1, (3, 3), (1, 1), (0, 0), (1, 1), False),
    (1, 9, 18, 6, 7, (3, 9), 9, (3, 2), (2, 1), (2, 0), (1, 2), True),
    (1, 9, 6, 5, 5, (3, 9), 3, (1, 1), (1, 1), (0, 0), (1, 1), False),
    (1, 5, 5, 6, 5, (1,), 1, (3, 3), (1, 1), (2, 1), (2, 2), True),
]


def _rel(a, b):
    """Max abs error relative to the reference's max magnitude."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture
def poisoned(monkeypatch):
    """Every float buffer the launchers allocate starts as NaN, so an unwritten element fails the test."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


def _series_inputs(N, S, T, H, W, gs, k, channels_last):
    x = torch.randn(N, S, H, W)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, [torch.randn(T, g, *k) for g in gs]


def _oracle_grads(x, cores, gs, G, st, pd, dl, grad_z):
    xr = x.detach().clone().requires_grad_()
    cr = [c.detach().clone().requires_grad_() for c in cores]
    naive_series_conv(xr, cr, gs, G, st, pd, dl).backward(grad_z)
    return xr.grad, [c.grad for c, g in zip(cr, gs) if g <= G]


@pytest.mark.parametrize("case", SERIES_CASES)
def test_series_kernels_match_oracle(case, poisoned):
    N, S, T, H, W, gs, G, k, st, pd, dl, cl = case
    x, cores = _series_inputs(N, S, T, H, W, gs, k, cl)
    z = gt.series_forward(x, cores, gs, G, st, pd, dl)
    ref = naive_series_conv(x, cores, gs, G, st, pd, dl)
    assert z.shape == ref.shape and _rel(z, ref) < 1e-5
    grad_z = torch.randn_like(ref)
    ref_gx, ref_gw = _oracle_grads(x, cores, gs, G, st, pd, dl, grad_z)
    gx = gt.series_backward_input(grad_z, cores, gs, G, x.shape, st, pd, dl)
    assert gx.shape == x.shape and _rel(gx, ref_gx) < 1e-5
    gw = gt.series_backward_weight(grad_z, x, cores, gs, G, st, pd, dl)
    assert len(gw) == len(ref_gw)
    for got, want in zip(gw, ref_gw):
        assert got.shape == want.shape and _rel(got, want) < 1e-5


def test_channels_last_output_keeps_format():
    x, cores = _series_inputs(1, 8, 8, 4, 4, (2, 8), (3, 3), True)
    z = gt.series_forward(x, cores, (2, 8), 8, (1, 1), (1, 1), (1, 1))
    assert z.is_contiguous(memory_format=torch.channels_last)


# (N, C_in, S, T, C_out, H, W, group_sizes, group_size, kernel, stride, padding, dilation)
BOTTLENECK_CASES = [
    (2, 5, 12, 12, 7, 6, 5, (1, 3, 12), 3, (3, 3), (2, 2), (1, 1), (1, 1)),
    (1, 6, 9, 18, 20, 5, 6, (3, 9), 9, (3, 1), (1, 1), (2, 0), (1, 2)),
]


def _bottleneck_inputs(N, CI, S, T, CO, H, W, gs, k):
    x = torch.randn(N, CI, H, W)
    firsts = [torch.randn(S, CI, 1, 1) for _ in gs]
    cores = [torch.randn(T, g, *k) for g in gs]
    lasts = [torch.randn(CO, T, 1, 1) for _ in gs]
    return x, firsts, cores, lasts, torch.randn(CO)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("case", BOTTLENECK_CASES)
def test_bottleneck_forward_both_paths(case, fused, poisoned):
    N, CI, S, T, CO, H, W, gs, G, k, st, pd, dl = case
    x, firsts, cores, lasts, bias = _bottleneck_inputs(N, CI, S, T, CO, H, W, gs, k)
    active = [i for i, g in enumerate(gs) if g <= G]
    A = sum(firsts[i] for i in active)
    C = sum(lasts[i] for i in active)
    y = tb.forward(x, A, cores, C, bias, gs, G, st, pd, dl, fused=fused)
    ref = naive_bottleneck(x, firsts, cores, lasts, bias, gs, G, st, pd, dl)
    assert y.shape == ref.shape and _rel(y, ref) < 1e-5


@pytest.mark.parametrize("case", BOTTLENECK_CASES[:1])
def test_bottleneck_backward_matches_autograd(case, poisoned):
    N, CI, S, T, CO, H, W, gs, G, k, st, pd, dl = case
    x, _, cores, _, bias = _bottleneck_inputs(N, CI, S, T, CO, H, W, gs, k)
    A, C = torch.randn(S, CI, 1, 1), torch.randn(CO, T, 1, 1)
    leaves = [t.clone().requires_grad_() for t in (x, A, C, bias)]
    core_leaves = [c.clone().requires_grad_() for c in cores]
    xr, Ar, Cr, br = leaves
    out = F.conv2d(naive_series_conv(F.conv2d(xr, Ar), core_leaves, gs, G, st, pd, dl), Cr, br)
    grad_y = torch.randn_like(out)
    out.backward(grad_y)
    gx, gA, gcores, gC, gb = gt.bottleneck_backward(grad_y, x, A, cores, C, bias, gs, G, st, pd,
                                                    dl)
    for got, leaf in zip((gx, gA, gC, gb), leaves):
        assert got.shape == leaf.shape and _rel(got, leaf.grad) < 1e-5
    active = [c for c, g in zip(core_leaves, gs) if g <= G]
    assert len(gcores) == len(active)
    for got, leaf in zip(gcores, active):
        assert _rel(got, leaf.grad) < 1e-5
    no_bias = gt.bottleneck_backward(grad_y, x, A, cores, C, None, gs, G, st, pd, dl)
    assert no_bias[4] is None


def test_fit_rule_falls_back_for_wide_bottleneck():
    assert tb.fits_on_chip(64, 64, 64, 64, (3, 3))
    assert not tb.fits_on_chip(64, 130, 64, 64, (3, 3))
    # S = 130 pads to 256 > 128: the unfused path must run and still be right.
    x, firsts, cores, lasts, bias = _bottleneck_inputs(1, 3, 130, 2, 3, 2, 2, (65, 130), (1, 1))
    y = gt.bottleneck_forward(x, firsts[0], cores[:1], lasts[0], bias, (65, 130), 65,
                              (1, 1), (0, 0), (1, 1))
    ref = naive_bottleneck(x, firsts, cores, lasts, bias, (65, 130), 65)
    assert _rel(y, ref) < 1e-5


def test_is_available_on_cpu_under_interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    ok, reason = gt.is_available("cpu")
    assert ok, reason
    ok, reason = gt.is_available("meta")
    assert not ok and reason


def test_too_many_terms_is_refused():
    gs = tuple(2 ** i for i in range(9))
    x = torch.randn(1, 256, 2, 2)
    cores = [torch.randn(256, g, 1, 1) for g in gs]
    with pytest.raises(ValueError, match="at most 8"):
        gt.series_forward(x, cores, gs, 256, (1, 1), (0, 0), (1, 1))


def test_public_series_op_with_triton_backend():
    gk = pytest.importorskip("gross_kernels")
    gs, G = (1, 4, 16), 4
    x, cores = _series_inputs(1, 16, 16, 5, 6, gs, (3, 3), False)
    x.requires_grad_()
    cores = [c.requires_grad_() for c in cores]
    z = gk.series_grouped_conv2d(x, cores, gs, G, stride=2, padding=1, backend="triton")
    ref = naive_series_conv(x, cores, gs, G, 2, 1)
    assert _rel(z, ref) < 1e-5
    grad_z = torch.randn_like(ref)
    got = torch.autograd.grad(z, [x] + cores, grad_z, allow_unused=True)
    want = torch.autograd.grad(ref, [x] + cores, grad_z, allow_unused=True)
    assert _rel(got[0], want[0]) < 1e-5
    for g, a, b in zip(gs, got[1:], want[1:]):
        if g <= G:
            assert _rel(a, b) < 1e-5
        else:
            assert a is None


def test_public_bottleneck_op_with_triton_backend():
    gk = pytest.importorskip("gross_kernels")
    gs, G = (3, 9), 3
    x, firsts, cores, lasts, bias = _bottleneck_inputs(1, 4, 9, 9, 5, 4, 5, gs, (3, 3))
    leaves = [x, *firsts, *cores, *lasts, bias]
    for t in leaves:
        t.requires_grad_()
    y = gk.series_bottleneck_conv2d(x, firsts, cores, lasts, bias, gs, G, padding=1,
                                    backend="triton")
    ref = naive_bottleneck(x, firsts, cores, lasts, bias, gs, G, padding=1)
    assert _rel(y, ref) < 1e-5
    grad_y = torch.randn_like(ref)
    got = torch.autograd.grad(y, leaves, grad_y, allow_unused=True)
    want = torch.autograd.grad(ref, leaves, grad_y, allow_unused=True)
    for a, b in zip(got, want):
        if b is None:  # an inactive term: no gradient
            assert a is None
        else:
            assert _rel(a, b) < 1e-5


def test_benchmark_smoke_on_cpu(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python"),
                                           os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "kernels.py"),
                           "--device", "cpu", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "kernels.md").exists() and (tmp_path / "kernels.json").exists()
    assert "geomean" in (tmp_path / "kernels.md").read_text()


def test_autotune_prunes_tiles_wider_than_the_layer():
    from gross_kernels.triton import series
    prune = series._forward_kernel.early_config_prune
    everything = series._gemm_configs()
    depthwise = prune(everything, {"S": 64, "T": 64, "G": 1}, KH=3, KW=3, FLAT=True)
    assert depthwise and all(c.kwargs["BN"] == 16 and c.kwargs["BK"] == 16 for c in depthwise)
    assert prune(everything, {"S": 512, "T": 512, "G": 512}, KH=3, KW=3, FLAT=False) == everything


def test_float16_with_float32_accumulation():
    # bfloat16 tl.dot is wrong in the interpreter (KERNEL_NOTES), so half precision here is float16;
    # the GPU tests cover bfloat16. Tolerance: float16 output rounding (2⁻¹¹) times a few roundings.
    gs, G, geo = (1, 4, 16), 4, ((1, 1), (1, 1), (1, 1))
    x = torch.randn(1, 16, 5, 4).half()
    cores = [(torch.randn(16, g, 3, 3) / (3 * g ** 0.5)).half() for g in gs]
    ref_x = x.double().requires_grad_()
    ref_cores = [c.double().requires_grad_() for c in cores]
    ref = naive_series_conv(ref_x, ref_cores, gs, G, 1, 1)
    grad_z = torch.randn_like(ref)
    want = torch.autograd.grad(ref, [ref_x] + ref_cores[:2], grad_z)
    z = gt.series_forward(x, cores, gs, G, *geo)
    gx = gt.series_backward_input(grad_z.half(), cores, gs, G, x.shape, *geo)
    gws = gt.series_backward_weight(grad_z.half(), x, cores, gs, G, *geo)
    for got, ref_value in zip([z, gx] + gws, [ref] + list(want)):
        assert got.dtype == torch.float16
        assert ((got.double() - ref_value).norm() / ref_value.norm()).item() < 2e-3


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    # The interpreter accepts code the compiler rejects (tl.dot tiles < 16, dtype mismatches,
    # constexpr misuse); compiling every kernel for Hopper here catches that without a GPU.
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "gross_kernels.triton._compile_check",
                           "--arch", "90", "--dtypes", "fp32,bf16"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(": ok,") == 14


def test_tensors_beyond_int32_offsets_are_refused():
    # A stride-0 view has 2**31 elements without the memory; the check runs before any launch.
    x = torch.randn(1, 1, 1, 1).expand(1, 2 ** 16, 2 ** 8, 2 ** 7)
    cores = [torch.randn(1, 2 ** 16, 1, 1)]
    with pytest.raises(ValueError, match="2\\*\\*31"):
        gt.series_forward(x, cores, (2 ** 16,), 2 ** 16, (1, 1), (0, 0), (1, 1))
