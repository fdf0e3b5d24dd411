"""CPU tests of the CUDA kernels' index helpers and an emulation of their block loops against the oracle."""
import ctypes
import os
import random
import shutil
import subprocess

import pytest
import torch

from oracle import naive_bottleneck, naive_series_conv
from series_cases import random_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "csrc", "tests", "test_index.cpp")

# (N, S, H, W, T, (kh, kw), stride, padding, dilation, group_sizes)
CASES = [
    (2, 4, 6, 7, 4, (3, 3), (1, 1), (1, 1), (1, 1), (1, 2, 4)),
    (1, 8, 7, 5, 12, (3, 2), (2, 1), (1, 0), (1, 2), (2, 4, 8)),
    (2, 6, 5, 5, 6, (1, 3), (1, 2), (0, 2), (2, 1), (1, 3, 6)),
    (2, 8, 9, 9, 8, (5, 5), (2, 2), (2, 2), (1, 1), (1,)),
    (1, 4, 5, 5, 96, (3, 3), (1, 1), (1, 1), (1, 1), (2, 4)),
    (1, 64, 4, 4, 32, (3, 3), (1, 1), (1, 1), (1, 1), (16, 32, 64)),
    # Paper shapes (high-compression VGG-16 bottlenecks) on small images.
    (1, 28, 6, 6, 28, (3, 3), (1, 1), (1, 1), (1, 1), (1, 7, 14, 28)),
    (1, 36, 5, 5, 48, (3, 3), (2, 2), (1, 1), (1, 1), (3, 9, 18)),
    (1, 10, 5, 4, 24, (3, 3), (1, 1), (2, 2), (2, 2), (5, 10)),
]
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """The test library, compiled with the system C++ compiler (no CUDA, no torch headers)."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    out = str(tmp_path_factory.mktemp("gk_index") / "libgk_index.so")
    subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-Werror", "-shared", "-fPIC",
                    "-I", os.path.join(ROOT, "csrc"), SOURCE, "-o", out], check=True)
    return ctypes.CDLL(out)


def ptr(t):
    """A tensor's data pointer for ctypes."""
    return ctypes.c_void_p(t.data_ptr())


def ptrs(ts):
    """A C array of the tensors' data pointers."""
    return (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])


def ints(vals):
    """A C int array."""
    return (ctypes.c_int * len(vals))(*vals)


def nan(*shape):
    """An output buffer poisoned with NaN, so any element a kernel leaves unwritten fails the test."""
    return torch.full(shape, float("nan"))


def make_case(case, G):
    """Random x and cores for a case tuple; the active term indices; the C geometry array at G."""
    N, S, H, W, T, (kh, kw), stride, padding, dilation, gs = case
    x = torch.randn(N, S, H, W)
    cores = [torch.randn(T, g, kh, kw) for g in gs]
    active = [i for i, g in enumerate(gs) if g <= G]
    geom = ints([N, S, H, W, T, kh, kw, *stride, *padding, *dilation, G])
    return x, cores, active, geom


def random_cases(count, seed=11):
    """The shared random series cases (tests/series_cases.py) in this file's tuple form."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        c = random_case(rng)
        out.append((c.batch, c.S, *c.hw, c.T, c.kernel, c.stride, c.padding, c.dilation, c.group_sizes))
    return out


def case_ids():
    """(case, G) pairs: every G of the fixed cases, one random G of each shared random case."""
    return [(c, G) for c in CASES for G in c[-1]] + [(c, random.Random(i).choice(c[-1]))
                                                     for i, c in enumerate(random_cases(20))]


def test_index_helpers_brute_force(lib):
    msg = ctypes.create_string_buffer(512)
    failures = lib.gk_check_index(msg, 512)
    assert failures == 0, msg.value.decode()


@pytest.mark.parametrize("case,G", case_ids())
def test_emulated_forward_matches_oracle(lib, case, G):
    x, cores, active, geom = make_case(case, G)
    *_, stride, padding, dilation, gs = case
    want = naive_series_conv(x, cores, gs, G, stride, padding, dilation)
    for variant in range(7):  # direct; GEMM with 16/32/64-wide N tiles; the same on tensor cores
        out = nan(*want.shape)
        assert lib.gk_emulate_forward(ptr(x), ptrs([cores[i] for i in active]), ints([gs[i] for i in active]),
                                      len(active), geom, variant, ptr(out)) == 0
        torch.testing.assert_close(out, want, **TOL, msg=lambda m: f"variant {variant}: {m}")


def oracle_grads(x, cores, case, G, gz):
    """grad x and grads of the active cores of the naive series for output gradient gz."""
    *_, stride, padding, dilation, gs = case
    x = x.clone().requires_grad_()
    cores = [c.clone().requires_grad_() for c in cores]
    z = naive_series_conv(x, cores, gs, G, stride, padding, dilation)
    active = [c for c, g in zip(cores, gs) if g <= G]
    return torch.autograd.grad(z, [x, *active], gz)


@pytest.mark.parametrize("case,G", case_ids())
def test_emulated_backward_matches_oracle(lib, case, G):
    x, cores, active, geom = make_case(case, G)
    *_, stride, padding, dilation, gs = case
    z = naive_series_conv(x, cores, gs, G, stride, padding, dilation)
    gz = torch.randn_like(z)
    want_x, *want_w = oracle_grads(x, cores, case, G, gz)
    act_cores, act_gs = [cores[i] for i in active], ints([gs[i] for i in active])
    for variant in range(7):
        gx = nan(*x.shape)
        assert lib.gk_emulate_backward_input(ptr(gz), ptrs(act_cores), act_gs, len(active), geom, variant, ptr(gx)) == 0
        torch.testing.assert_close(gx, want_x, **TOL, msg=lambda m: f"grad_x variant {variant}: {m}")
    for variant in range(4):  # 16- and 64-row weight tiles, SIMT and tensor-core
        for splits in (0, 1, 3):  # 0: the launcher's choice
            grads = [nan(*c.shape) for c in act_cores]
            used = lib.gk_emulate_backward_weight(ptr(gz), ptr(x), act_gs, len(active), geom, variant, splits,
                                                  ptrs(grads))
            assert used >= 1
            for i, (got, want) in enumerate(zip(grads, want_w)):
                torch.testing.assert_close(got, want, **TOL,
                                           msg=lambda m: f"grad core {i} variant {variant} splits {used}: {m}")


BOTTLENECK_CASES = [
    # (N, Cin, S, T, Cout, H, W, (kh, kw), stride, padding, dilation, group_sizes)
    (2, 5, 4, 8, 7, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1), (1, 2, 4)),
    (1, 3, 8, 12, 4, 9, 8, (3, 2), (2, 1), (1, 0), (1, 2), (2, 8)),
    (1, 16, 28, 28, 9, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), (1, 7, 14, 28)),
]


@pytest.mark.parametrize("case", BOTTLENECK_CASES)
@pytest.mark.parametrize("tile", [(0, 0), (1, 1), (2, 3), (8, 8)])
def test_emulated_bottleneck_matches_oracle(lib, case, tile):
    N, Cin, S, T, Cout, H, W, (kh, kw), stride, padding, dilation, gs = case
    x = torch.randn(N, Cin, H, W)
    # Fan-in scaled weights keep the outputs O(1), so the float32 tolerance is meaningful.
    firsts = [torch.randn(S, Cin, 1, 1) / Cin ** 0.5 for _ in gs]
    cores = [torch.randn(T, g, kh, kw) / (g * kh * kw) ** 0.5 for g in gs]
    lasts = [torch.randn(Cout, T, 1, 1) / T ** 0.5 for _ in gs]
    bias = torch.randn(Cout)
    for G in gs:
        active = [i for i, g in enumerate(gs) if g <= G]
        want = naive_bottleneck(x, firsts, cores, lasts, bias, gs, G, stride, padding, dilation)
        A = sum(firsts[i] for i in active).contiguous()
        C = sum(lasts[i] for i in active).contiguous()
        geom = ints([N, S, H, W, T, kh, kw, *stride, *padding, *dilation, G])
        y = nan(*want.shape)
        assert lib.gk_emulate_bottleneck(ptr(x), ptr(A), ptrs([cores[i] for i in active]),
                                         ints([gs[i] for i in active]), len(active), ptr(C), ptr(bias), geom,
                                         Cin, Cout, tile[0], tile[1], ptr(y)) == 0
        torch.testing.assert_close(y, want, **TOL, msg=lambda m: f"G={G} tile {tile}: {m}")


def test_emulated_bottleneck_refuses_oversized_widths(lib):
    """Widths whose 1x1-tile shared memory exceeds 48 KiB are refused (the dispatcher falls back)."""
    S = T = 2000
    x, A, C, core = torch.randn(1, 1, 3, 3), torch.randn(S, 1), torch.randn(1, T), torch.randn(T, S, 3, 3)
    y = nan(1, 1, 1, 1)
    geom = ints([1, S, 3, 3, T, 3, 3, 1, 1, 0, 0, 1, 1, S])
    assert lib.gk_emulate_bottleneck(ptr(x), ptr(A), ptrs([core]), ints([S]), 1, ptr(C), None, geom,
                                     1, 1, 0, 0, ptr(y)) == 1


def test_bottleneck_fit_rule(lib):
    """The header's rule is the documented formula, and the registered op (CUDA builds) applies it."""
    from gross_kernels import _extension
    op = getattr(torch.ops.gross, "series_bottleneck_fits", None) if _extension.load() else None
    for S, T in [(11, 18), (224, 224), (512, 512), (1300, 100), (1400, 20), (2048, 2048)]:
        for k, stride, dil in [((3, 3), (1, 1), (1, 1)), ((5, 3), (2, 1), (1, 2)), ((1, 1), (1, 1), (1, 1))]:
            halo = ((k[0] - 1) * dil[0] + 1) * ((k[1] - 1) * dil[1] + 1)
            want = 4 * (S * halo + T) <= 48 * 1024
            assert bool(lib.gk_bottleneck_fits(S, T, *k, *stride, *dil)) == want
            if op is not None:
                assert op(S, T, list(k), list(stride), list(dil)) == want
