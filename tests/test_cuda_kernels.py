"""GPU tests of the CUDA kernels (torch.ops.gross.* on CUDA tensors, and the public ops with backend="cuda").

Tolerances: each result is compared with the oracle run in float64 on the same (rounded) inputs,
as max |got - want| / max |want|: float32 1e-5, float16 4e-3, bfloat16 3e-2 (the kernels
accumulate in float32 and round once on store). Outputs are poisoned: before each launch the
CUDA caching allocator is handed NaN-filled blocks of exactly the output sizes, which it reuses
for the kernels' outputs, so an element a kernel never writes stays NaN and fails the test.
Run a quick subset under compute-sanitizer with csrc/ops/cuda/run_sanitizers.sh.
"""
import random

import pytest
import torch

from oracle import naive_bottleneck, naive_series_conv
from series_cases import random_case

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}

# High-compression VGG-16 and ResNet-18 style core shapes: (S, T, group sizes, H, stride).
PAPER = [
    (28, 28, (1, 7, 14, 28), 28, 1),
    (36, 48, (3, 9, 18), 28, 1),
    (60, 48, (15, 30, 60), 14, 1),
    (132, 132, (3, 33, 66), 14, 1),
    (224, 224, (7, 28, 56, 112), 14, 1),
    (128, 128, (1, 4, 16, 32), 28, 2),
]


@pytest.fixture(scope="module", autouse=True)
def cuda_ops():
    """The extension, which must have been built with its CUDA kernels on a GPU machine."""
    from gross_kernels import _extension
    assert _extension.load(), _extension.error()
    assert _extension.has_cuda_kernels(), "gross_kernels._C was built without CUDA kernels"
    return torch.ops.gross


def poison(*shapes, dtype):
    """Leave NaN-filled freed blocks of these shapes in the caching allocator for the next outputs."""
    blocks = [torch.full(s, float("nan"), device="cuda", dtype=dtype) for s in shapes]
    torch.cuda.synchronize()
    del blocks


def rel_err(got, want):
    """max |got - want| / max |want|, after checking every element was written (finite)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), "output has NaN/Inf (unwritten or overflowed elements)"
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def oracle(x, cores, gs, G, geom, gz=None):
    """Naive series in float64 on the given (already rounded) values: gz, z and the gradients.

    gz is drawn (and rounded to x's dtype) when not given."""
    x64 = x.double().requires_grad_()
    c64 = [c.double().requires_grad_() for c in cores]
    z = naive_series_conv(x64, c64, gs, G, *geom)
    if gz is None:
        gz = torch.randn_like(z).to(x.dtype)
    active = [c for c, g in zip(c64, gs) if g <= G]
    grads = torch.autograd.grad(z, [x64, *active], gz.double())
    return gz, z.detach(), grads[0], list(grads[1:])


def check_series(ops, x, cores, gs, G, geom, dtype):
    """The three torch.ops.gross series kernels on CUDA against the float64 oracle, outputs poisoned."""
    stride, padding, dilation = (list(v) for v in geom)
    gz, want_z, want_gx, want_gw = oracle(x, cores, gs, G, geom)
    z_shape = want_z.shape
    tol = TOL[dtype]

    poison(z_shape, dtype=dtype)
    z = ops.series_conv_forward(x, cores, list(gs), G, stride, padding, dilation)
    assert rel_err(z, want_z) <= tol

    poison(x.shape, dtype=dtype)
    gx = ops.series_conv_backward_input(gz, cores, list(gs), G, list(x.shape), stride, padding, dilation)
    assert rel_err(gx, want_gx) <= tol

    active = [c for c, g in zip(cores, gs) if g <= G]
    poison(*[c.shape for c in active], dtype=dtype)
    gw = ops.series_conv_backward_weight(gz, x, cores, list(gs), G, stride, padding, dilation)
    assert len(gw) == len(active)
    for got, want in zip(gw, want_gw):
        assert got.dtype == dtype
        assert rel_err(got, want) <= tol


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_small_series_ops_random(cuda_ops, dtype):
    rng = random.Random(7)
    for _ in range(25):
        case = random_case(rng)
        x, cores = case.tensors(dtype=torch.float32)
        x, cores = x.cuda().to(dtype), [c.cuda().to(dtype) for c in cores]
        check_series(cuda_ops, x, cores, case.group_sizes, case.group_size, case.geometry(), dtype)


def test_small_series_ops_float64(cuda_ops):
    rng = random.Random(8)
    for _ in range(10):
        case = random_case(rng)
        x, cores = case.tensors(dtype=torch.float64)
        check_series(cuda_ops, x.cuda(), [c.cuda() for c in cores], case.group_sizes, case.group_size,
                     case.geometry(), torch.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("S,T,gs,H,stride", PAPER)
def test_paper_shapes(cuda_ops, S, T, gs, H, stride, dtype):
    x = torch.randn(2, S, H, H, device="cuda").to(dtype)
    cores = [(torch.randn(T, g, 3, 3, device="cuda") / (3 * g) ** 0.5).to(dtype) for g in gs]
    for G in gs:
        check_series(cuda_ops, x, cores, gs, G, ((stride, stride), (1, 1), (1, 1)), dtype)


def test_small_non_contiguous_inputs(cuda_ops):
    """Channels-last and sliced inputs give the same result as contiguous ones."""
    gs, G, geom = (1, 2, 4), 4, ((1, 1), (1, 1), (1, 1))
    x = torch.randn(2, 8, 9, 9, device="cuda")
    cores = [torch.randn(8, g, 3, 3, device="cuda") for g in gs]
    want = cuda_ops.series_conv_forward(x, cores, list(gs), G, *[list(v) for v in geom])
    got = cuda_ops.series_conv_forward(x.to(memory_format=torch.channels_last), cores, list(gs), G,
                                       *[list(v) for v in geom])
    torch.testing.assert_close(got, want)
    wide = torch.randn(2, 16, 9, 9, device="cuda")[:, ::2]
    check_series(cuda_ops, wide, cores, gs, G, geom, torch.float32)


def test_small_weight_grad_deterministic(cuda_ops):
    """The split-K weight gradient adds its partials in a fixed order: bitwise repeatable."""
    x = torch.randn(4, 16, 20, 20, device="cuda")
    cores = [torch.randn(16, g, 3, 3, device="cuda") for g in (1, 4, 16)]
    gz = torch.randn(4, 16, 20, 20, device="cuda")
    args = ([1, 4, 16], 16, [1, 1], [1, 1], [1, 1])
    first = cuda_ops.series_conv_backward_weight(gz, x, cores, *args)
    second = cuda_ops.series_conv_backward_weight(gz, x, cores, *args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_small_public_op_backend_cuda(cuda_ops, dtype):
    import gross_kernels as gk
    rng = random.Random(9)
    for _ in range(8):
        case = random_case(rng)
        x, cores = case.tensors(dtype=torch.float32)
        x = x.cuda().to(dtype).requires_grad_()
        cores = [c.cuda().to(dtype).requires_grad_() for c in cores]
        stride, padding, dilation = case.geometry()
        z = gk.series_grouped_conv2d(x, cores, case.group_sizes, case.group_size, stride, padding, dilation,
                                     backend="cuda")
        gz = torch.randn_like(z)
        grads = torch.autograd.grad(z, [x, *cores], gz, allow_unused=True)
        _, want_z, want_gx, want_gw = oracle(x.detach(), [c.detach() for c in cores], case.group_sizes,
                                             case.group_size, case.geometry(), gz)
        assert rel_err(z.detach(), want_z) <= TOL[dtype]
        assert rel_err(grads[0], want_gx) <= TOL[dtype]
        for got, want in zip(grads[1:], want_gw):
            assert rel_err(got, want) <= TOL[dtype]
        for got, g in zip(grads[1 + len(want_gw):], case.group_sizes[len(want_gw):]):
            assert g > case.group_size and got is None  # inactive terms get no gradient


BOTTLENECK = [
    # (N, Cin, S, T, Cout, H, kernel, stride, padding, dilation, group sizes)
    (2, 5, 4, 8, 7, 9, (3, 3), (1, 1), (1, 1), (1, 1), (1, 2, 4)),
    (1, 3, 8, 12, 4, 11, (3, 2), (2, 1), (1, 0), (1, 2), (2, 8)),
    (2, 64, 28, 28, 64, 16, (3, 3), (1, 1), (1, 1), (1, 1), (1, 7, 14, 28)),
    (1, 256, 224, 224, 256, 14, (3, 3), (1, 1), (1, 1), (1, 1), (7, 28, 56, 112)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", BOTTLENECK)
def test_small_bottleneck_forward(cuda_ops, case, dtype):
    N, Cin, S, T, Cout, H, k, stride, padding, dilation, gs = case
    assert cuda_ops.series_bottleneck_fits(S, T, list(k), list(stride), list(dilation))
    x = torch.randn(N, Cin, H, H, device="cuda").to(dtype)
    firsts = [(torch.randn(S, Cin, 1, 1, device="cuda") / Cin ** 0.5).to(dtype) for _ in gs]
    cores = [(torch.randn(T, g, *k, device="cuda") / (g * k[0] * k[1]) ** 0.5).to(dtype) for g in gs]
    lasts = [(torch.randn(Cout, T, 1, 1, device="cuda") / T ** 0.5).to(dtype) for _ in gs]
    bias = torch.randn(Cout, device="cuda").to(dtype)
    for G in gs:
        active = [i for i, g in enumerate(gs) if g <= G]
        A = sum(firsts[i] for i in active)
        C = sum(lasts[i] for i in active)
        want = naive_bottleneck(x.double(), [f.double() for f in firsts], [c.double() for c in cores],
                                [w.double() for w in lasts], bias.double(), gs, G, stride, padding, dilation)
        poison(want.shape, dtype=dtype)
        y = cuda_ops.series_bottleneck_forward(x, A, cores, C, bias, list(gs), G, list(stride), list(padding),
                                               list(dilation))
        # A and C were summed in `dtype`, the oracle sums in float64: one extra rounding per weight.
        assert rel_err(y, want) <= 2 * TOL[dtype]
        y_nobias = cuda_ops.series_bottleneck_forward(x, A, cores, C, None, list(gs), G, list(stride),
                                                      list(padding), list(dilation))
        assert rel_err(y_nobias, want - bias.double().view(1, -1, 1, 1)) <= 2 * TOL[dtype]


def test_small_bottleneck_refuses_oversized(cuda_ops):
    S = T = 2048
    assert not cuda_ops.series_bottleneck_fits(S, T, [3, 3], [1, 1], [1, 1])
    x = torch.randn(1, 4, 5, 5, device="cuda")
    with pytest.raises(RuntimeError, match="shared memory"):
        cuda_ops.series_bottleneck_forward(x, torch.randn(S, 4, 1, 1, device="cuda"),
                                           [torch.randn(T, S, 3, 3, device="cuda")],
                                           torch.randn(4, T, 1, 1, device="cuda"), None, [S], S, [1, 1], [1, 1],
                                           [1, 1])
