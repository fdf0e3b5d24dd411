"""The C++ CPU kernels (torch.ops.gross.series_conv_*) against the naive oracle and its autograd.

Tolerances: float64 is compared at 1e-10 absolute on O(1) data (rounding only); float32 at
1e-4 relative to the largest magnitude of the oracle's result, because the kernels sum the
terms and the kernel window in a different order than oneDNN does.
"""
import random

import pytest
import torch

from oracle import naive_series_conv

gk = pytest.importorskip("gross_kernels")
from gross_kernels import _extension  # noqa: E402

pytestmark = pytest.mark.skipif(not _extension.has_cpu_kernels(),
                                reason=f"C++ CPU kernels not built: {_extension.error()}")
ops = torch.ops.gross

CASES = 200
FIXED_SERIES = [((3, 9, 18), 18, 12), ((1, 2, 4), 8, 8), ((2, 4), 4, 6), ((1,), 5, 10), ((5, 10), 10, 24)]


def random_case(rng: random.Random):
    """A random valid series layer: (group_sizes, S, T, kernel, stride, padding, dilation, N, H, W)."""
    if rng.random() < 0.3:
        group_sizes, S, T = rng.choice(FIXED_SERIES)
    else:
        g = rng.choice([1, 2, 3])
        group_sizes = [g]
        for _ in range(rng.randint(0, 2)):
            g *= rng.choice([2, 3])
            group_sizes.append(g)
        S = group_sizes[-1] * rng.choice([1, 2])
        T = (S // group_sizes[0]) * rng.choice([1, 2]) if S // group_sizes[0] <= 12 else S // group_sizes[0]
        group_sizes = tuple(group_sizes)
    kernel = rng.choice([(1, 1), (3, 3), (5, 5), (1, 3), (3, 5), (5, 1)])
    stride = (rng.randint(1, 2), rng.randint(1, 2))
    padding = (rng.randint(0, 2), rng.randint(0, 2))
    dilation = (rng.randint(1, 2), rng.randint(1, 2))
    N = rng.randint(1, 4)
    H = rng.choice([5, 7, 9, 11, 13])
    W = rng.choice([5, 7, 9, 11, 13, 17])
    # the dilated kernel must fit in the padded input
    H = max(H, dilation[0] * (kernel[0] - 1) + 1 - 2 * padding[0])
    W = max(W, dilation[1] * (kernel[1] - 1) + 1 - 2 * padding[1])
    group_size = rng.choice(group_sizes)
    return group_sizes, group_size, S, T, kernel, stride, padding, dilation, N, H, W


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in a contiguous, channels-last or non-contiguous (strided) tensor."""
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "strided":
        wide = torch.empty(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def check(case, dtype, kind):
    group_sizes, group_size, S, T, kernel, stride, padding, dilation, N, H, W = case
    x = torch.randn(N, S, H, W, dtype=dtype, requires_grad=True)
    cores = [torch.randn(T, g, *kernel, dtype=dtype, requires_grad=True) for g in group_sizes]
    z_ref = naive_series_conv(x, cores, group_sizes, group_size, stride, padding, dilation)
    grad_z = torch.randn_like(z_ref)
    active = [c for c, g in zip(cores, group_sizes) if g <= group_size]
    grads_ref = torch.autograd.grad(z_ref, [x] + active, grad_z)

    args = (list(group_sizes), group_size)
    conv = (list(stride), list(padding), list(dilation))
    x_in, gz_in = layout(x.detach(), kind), layout(grad_z, kind)
    cores_in = [layout(c.detach(), kind) for c in cores]
    z = ops.series_conv_forward(x_in, cores_in, *args, *conv)
    gx = ops.series_conv_backward_input(gz_in, cores_in, *args, [N, S, H, W], *conv)
    gw = ops.series_conv_backward_weight(gz_in, x_in, cores_in, *args, *conv)

    assert len(gw) == len(active)
    for name, got, want in [("z", z, z_ref), ("grad_x", gx, grads_ref[0])] + [
            (f"grad_core{i}", g, r) for i, (g, r) in enumerate(zip(gw, grads_ref[1:]))]:
        assert got.shape == want.shape and got.dtype == dtype, name
        if dtype == torch.float64:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=lambda m: f"{name} {case}: {m}")
        else:
            scale = want.abs().max().item() + 1e-30
            err = (got - want).abs().max().item() / scale
            assert err < 1e-4, f"{name} {case}: relative error {err}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_random_cases_against_oracle(dtype):
    rng = random.Random(1234 if dtype == torch.float64 else 5678)
    kinds = ["contiguous", "channels_last", "strided"]
    for n in range(CASES // 2):
        check(random_case(rng), dtype, kinds[n % 3])


def test_paper_bottleneck_shapes():
    """Non-power-of-two and S != T bottlenecks from the high-compression VGG-16."""
    for group_sizes, S, T in [((3, 9, 18), 36, 48), ((5, 10), 10, 24), ((15, 30, 60), 60, 48)]:
        for group_size in group_sizes:
            check((group_sizes, group_size, S, T, (3, 3), (1, 1), (1, 1), (1, 1), 2, 7, 9),
                  torch.float64, "contiguous")


def test_weight_gradient_independent_of_thread_count():
    """The per-thread partial sums reduce to the same gradient with 1 and several threads."""
    x = torch.randn(4, 16, 12, 12, dtype=torch.float64)
    cores = [torch.randn(16, g, 3, 3, dtype=torch.float64) for g in (1, 4, 16)]
    gz = torch.randn(4, 16, 12, 12, dtype=torch.float64)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, max(2, before)):
            torch.set_num_threads(threads)
            results.append(ops.series_conv_backward_weight(gz, x, cores, [1, 4, 16], 16, [1, 1], [1, 1], [1, 1]))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_several_tiles_and_channel_chunks_and_inactive_terms_ignored():
    """Images split over two tiles (the last one partial), channels over two chunks; inactive terms unused."""
    x = torch.randn(5, 64, 11, 11, dtype=torch.float64)
    cores = [torch.randn(64, g, 3, 3, dtype=torch.float64) for g in (1, 2, 64)]
    args = ([1, 2, 64], 2, [1, 1], [1, 1], [1, 1])
    gz = torch.randn(5, 64, 11, 11, dtype=torch.float64)
    z = ops.series_conv_forward(x, cores, *args)
    torch.testing.assert_close(z, naive_series_conv(x, cores, (1, 2, 64), 2, 1, 1, 1), rtol=0, atol=1e-10)
    cores[2].fill_(float("nan"))
    assert torch.isfinite(ops.series_conv_forward(x, cores, *args)).all()
    assert torch.isfinite(ops.series_conv_backward_input(gz, cores, args[0], 2, [5, 64, 11, 11], *args[2:])).all()
    assert len(ops.series_conv_backward_weight(gz, x, cores, *args)) == 2


@pytest.mark.parametrize("call, message", [
    (lambda x, c: ops.series_conv_forward(x[0], c, [1, 4], 4, [1, 1], [0, 0], [1, 1]), "4-D"),
    (lambda x, c: ops.series_conv_forward(x, c, [1, 4], 2, [1, 1], [0, 0], [1, 1]), "group_size"),
    (lambda x, c: ops.series_conv_forward(x, c, [1], 1, [1, 1], [0, 0], [1, 1]), "same length"),
    (lambda x, c: ops.series_conv_forward(x, c[::-1], [4, 1], 4, [1, 1], [0, 0], [1, 1]), "strictly increasing"),
    (lambda x, c: ops.series_conv_forward(x, [c[0], c[0]], [1, 4], 4, [1, 1], [0, 0], [1, 1]), "must have shape"),
    (lambda x, c: ops.series_conv_forward(x, c, [1, 3], 3, [1, 1], [0, 0], [1, 1]), "divide S"),
    (lambda x, c: ops.series_conv_forward(x, c, [1, 4], 4, [0, 1], [0, 0], [1, 1]), "stride"),
    (lambda x, c: ops.series_conv_forward(x, c, [1, 4], 4, [1, 1], [-1, 0], [1, 1]), "padding"),
    (lambda x, c: ops.series_conv_forward(x, c, [1, 4], 4, [1, 1], [0, 0], [1]), "dilation"),
    (lambda x, c: ops.series_conv_forward(x.double(), c, [1, 4], 4, [1, 1], [0, 0], [1, 1]), "dtype"),
    (lambda x, c: ops.series_conv_forward(x.int(), [t.int() for t in c], [1, 4], 4, [1, 1], [0, 0], [1, 1]),
     "float32 or float64"),
    (lambda x, c: ops.series_conv_forward(x[:, :, :2, :2], c, [1, 4], 4, [1, 1], [0, 0], [1, 1]),
     "non-positive"),
    (lambda x, c: ops.series_conv_backward_input(x, c, [1, 4], 4, [2, 8, 6, 6], [1, 1], [0, 0], [1, 1]),
     "grad_out"),
])
def test_direct_callers_get_clear_errors(call, message):
    x = torch.randn(2, 8, 6, 6)
    cores = [torch.randn(8, g, 3, 3) for g in (1, 4)]
    with pytest.raises(RuntimeError, match=message):
        call(x, cores)


def test_public_op_gradcheck_cpp_backend():
    """Autograd of the public op through the C++ kernels, in float64."""
    x = torch.randn(1, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    cores = [torch.randn(2, g, 3, 1, dtype=torch.float64, requires_grad=True) for g in (3, 6)]

    def f(x, c0, c1):
        return gk.series_grouped_conv2d(x, [c0, c1], (3, 6), 6, stride=2, padding=1, dilation=1, backend="cpp")

    assert torch.autograd.gradcheck(f, (x, *cores))
