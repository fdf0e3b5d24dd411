"""Public series ops: every CPU backend against the naive oracle, gradcheck, opcheck, compile, autocast."""
import random

import pytest
import torch
from torch import nn

import gross_kernels as gk
from gross_kernels import backends
from gross_kernels.backends import fastpaths
from gross_kernels.backends._autotune import Inputs
from gross_kernels.backends.base import Needs
from gross_kernels.backends.reference import Reference
from gross_kernels.geometry import SeriesGeom
from oracle import dense_grads, naive_bottleneck, naive_series_conv
from series_cases import random_case

CPU_BACKENDS = [b for b in gk.available_backends("cpu")]
# The Triton interpreter runs every program in Python: it gets fewer (still random) cases here;
# tests/test_triton_kernels.py covers it in depth.
CASES_PER_BACKEND = {"reference": 200, "cpp": 200, "triton": 24}
# float32 kernels vs a float64 oracle: errors scale with the reduction length (g·kh·kw ≤ 18·25).
F32_RTOL, F32_ATOL = 1e-4, 1e-4


def _oracle_grads(x, cores, case, grad_out):
    x = x.detach().double().requires_grad_()
    cores = [c.detach().double().requires_grad_() for c in cores]
    z = naive_series_conv(x, cores, case.group_sizes, case.group_size, *case.geometry())
    return z, torch.autograd.grad(z, [x, *cores], grad_out.double(), allow_unused=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_series_conv_matches_oracle_on_random_cases(backend):
    rng = random.Random(1234)
    gen = torch.Generator().manual_seed(1234)
    for index in range(CASES_PER_BACKEND.get(backend, 200)):
        case = random_case(rng, max_hw=7 if backend == "triton" else 9)
        x, cores = case.tensors(torch.float32, gen)
        x.requires_grad_()
        for c in cores:
            c.requires_grad_()
        z = gk.series_grouped_conv2d(x, cores, case.group_sizes, case.group_size,
                                     *case.geometry(), backend=backend)
        grad_out = torch.randn(z.shape, generator=gen)
        grads = torch.autograd.grad(z, [x, *cores], grad_out, allow_unused=True)
        z_ref, grads_ref = _oracle_grads(x, cores, case, grad_out)
        what = f"case {index}: {case}"
        torch.testing.assert_close(z.double(), z_ref, rtol=F32_RTOL, atol=F32_ATOL, msg=what)
        for name, g, g_ref in zip(["x"] + [f"cores[{i}]" for i in range(len(cores))], grads,
                                  grads_ref):
            # None exactly where the oracle's is (an inactive term: no gradient)
            torch.testing.assert_close(None if g is None else g.double(), g_ref, rtol=F32_RTOL,
                                       atol=F32_ATOL, msg=lambda m: f"grad {name}, {what}: {m}")


# "auto" runs its own CPU path for float32 (the reference on channels-last tensors).
@pytest.mark.parametrize("backend", CPU_BACKENDS + ["auto"])
def test_bottleneck_matches_oracle(backend):
    rng = random.Random(99)
    gen = torch.Generator().manual_seed(99)
    for index in range(12 if backend == "triton" else 40):
        case = random_case(rng, max_hw=7)
        C_in, C_out = rng.randint(1, 7), rng.randint(1, 7)
        x = torch.randn(case.batch, C_in, *case.hw, generator=gen, requires_grad=True)
        n = len(case.group_sizes)
        firsts = [torch.randn(case.S, C_in, 1, 1, generator=gen, requires_grad=True) for _ in range(n)]
        cores = [torch.randn(case.T, g, *case.kernel, generator=gen, requires_grad=True)
                 for g in case.group_sizes]
        lasts = [torch.randn(C_out, case.T, 1, 1, generator=gen, requires_grad=True) for _ in range(n)]
        bias = torch.randn(C_out, generator=gen, requires_grad=True) if index % 2 else None
        args = (firsts, cores, lasts, bias, case.group_sizes, case.group_size, *case.geometry())
        y = gk.series_bottleneck_conv2d(x, *args, backend=backend)
        leaves = [x, *firsts, *cores, *lasts] + ([bias] if bias is not None else [])
        grad_out = torch.randn(y.shape, generator=gen)
        grads = torch.autograd.grad(y, leaves, grad_out, allow_unused=True)
        y_ref = naive_bottleneck(x, *args)
        grads_ref = torch.autograd.grad(y_ref, leaves, grad_out, allow_unused=True)
        scale = max(1.0, y_ref.abs().max().item())
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4 * scale, msg=f"case {index}")
        for g, g_ref, leaf in zip(grads, grads_ref, leaves):
            if g_ref is None:  # an inactive term: no gradient
                assert g is None, f"case {index}: an inactive term got a gradient"
                continue
            gscale = max(1.0, g_ref.abs().max().item())
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4 * gscale,
                                       msg=f"case {index}")


def test_inactive_terms_get_no_gradient():
    x = torch.randn(2, 8, 5, 5)
    cores = [torch.randn(8, g, 3, 3, requires_grad=True) for g in (1, 2, 4)]
    z = gk.series_grouped_conv2d(x, cores, (1, 2, 4), 2, padding=1)
    z.square().sum().backward()
    assert cores[0].grad.abs().sum() > 0 and cores[1].grad.abs().sum() > 0
    assert cores[2].grad is None  # as a plain PyTorch layer leaves a weight it does not use


GRADCHECK_BACKENDS = [b for b in ("reference", "cpp") if b in CPU_BACKENDS]


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
def test_gradcheck_float64(backend):
    rng = random.Random(7)
    gen = torch.Generator().manual_seed(7)
    for _ in range(4):
        case = random_case(rng, max_hw=5)
        case.batch = min(case.batch, 2)
        x, cores = case.tensors(torch.float64, gen)
        leaves = [x.requires_grad_()] + [c.requires_grad_() for c in cores]

        def f(x, *cores):
            return gk.series_grouped_conv2d(x, cores, case.group_sizes, case.group_size,
                                            *case.geometry(), backend=backend)

        assert torch.autograd.gradcheck(f, leaves, fast_mode=True)
    firsts = [torch.randn(4, 3, 1, 1, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    cores = [torch.randn(8, g, 3, 3, dtype=torch.float64, requires_grad=True) for g in (1, 2)]
    lasts = [torch.randn(5, 8, 1, 1, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)

    def g(x, a0, a1, b0, b1, c0, c1, bias):
        return gk.series_bottleneck_conv2d(x, [a0, a1], [b0, b1], [c0, c1], bias, (1, 2), 2,
                                           stride=2, padding=1, backend=backend)

    assert torch.autograd.gradcheck(g, (x, *firsts, *cores, *lasts, bias), fast_mode=True)


def _opcheck_args(backend):
    x = torch.randn(2, 4, 6, 5, requires_grad=True)
    cores = [torch.randn(8, g, 3, 3, requires_grad=True) for g in (1, 2, 4)]
    series = (x, cores, [1, 2, 4], 2, [1, 1], [1, 1], [1, 1], backend, [True, True])
    firsts = [torch.randn(4, 3, 1, 1, requires_grad=True) for _ in range(3)]
    lasts = [torch.randn(5, 8, 1, 1, requires_grad=True) for _ in range(3)]
    xb = torch.randn(2, 3, 6, 5, requires_grad=True)
    bottleneck = (xb, firsts, cores, lasts, torch.randn(5, requires_grad=True), [1, 2, 4], 4,
                  [2, 2], [1, 1], [1, 1], backend, [True] * 5)
    return series, bottleneck


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpp") if b in CPU_BACKENDS] + ["auto"])
def test_opcheck(backend):
    series, bottleneck = _opcheck_args(backend)
    torch.library.opcheck(torch.ops.gross.series_grouped_conv2d.default, series)
    torch.library.opcheck(torch.ops.gross.series_bottleneck_conv2d.default, bottleneck)
    # Inference (no activations kept), and a training call with x frozen.
    torch.library.opcheck(torch.ops.gross.series_bottleneck_conv2d.default, bottleneck[:-1] + ([],))
    torch.library.opcheck(torch.ops.gross.series_bottleneck_conv2d.default,
                          (bottleneck[0].detach(),) + bottleneck[1:-1] + ([False] + [True] * 4,))
    # The backward op runs backends with backward kernels (a differentiable one, such as
    # reference, runs under autograd instead).
    x, cores = series[0], series[1]
    grad = torch.randn(2, 8, 6, 5)
    kernel_backend = backend if backend == "cpp" else "cpp"
    if kernel_backend in CPU_BACKENDS:
        for needs in ([True, True], [False, True], [True, False]):
            torch.library.opcheck(torch.ops.gross._series_grouped_conv2d_backward.default,
                                  (grad, x.detach(), [c.detach() for c in cores], *series[2:-2],
                                   kernel_backend, needs))


class _SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.series = gk.SeriesConv2d(8, 6, 3, (1, 2, 4, 8), stride=2, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        y = self.series(torch.relu(self.conv(x)))
        return self.head(y.mean(dim=(2, 3)))


def test_torch_compile_fullgraph_matches_eager():
    net = _SmallNet()
    for p in net.series.parameters():
        nn.init.normal_(p, std=0.3)
    net.series.group_size = 4
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    eager, leaves = net(x), [x, *net.parameters()]
    eager_grads = torch.autograd.grad(eager.square().sum(), leaves, allow_unused=True)
    compiled = torch.compile(net, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), leaves, allow_unused=True)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for g, ge in zip(dense_grads(grads, leaves), dense_grads(eager_grads, leaves)):
        torch.testing.assert_close(g, ge, rtol=1e-4, atol=1e-5)


def test_autocast_bfloat16_on_cpu():
    layer = gk.SeriesConv2d(4, 4, 3, (1, 2, 4), padding=1)
    x = torch.randn(2, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_channels_last_in_channels_last_out(backend):
    x = torch.randn(2, 8, 7, 7).contiguous(memory_format=torch.channels_last)
    cores = [torch.randn(8, g, 3, 3) for g in (2, 4)]
    z = gk.series_grouped_conv2d(x, cores, (2, 4), 4, padding=1, backend=backend)
    assert z.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(z, naive_series_conv(x, cores, (2, 4), 4, padding=1),
                               rtol=1e-4, atol=1e-4)


# Every side of auto's channels-last rule on the CPU: few channels (channels-last throughout), a
# deep 9×9 image (channels-last in training only), a grouped core on a deep 2×2 image (NCHW).
@pytest.mark.parametrize("image", [(6, 7, 7), (72, 9, 9), (72, 2, 2)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("backend", CPU_BACKENDS + ["auto"])
def test_bottleneck_output_and_input_gradient_follow_x_layout(backend, memory_format, image):
    x = torch.randn(2, *image).contiguous(memory_format=memory_format).requires_grad_()
    firsts = [torch.randn(8, image[0], 1, 1) for _ in range(2)]
    cores = [torch.randn(8, g, 3, 3, requires_grad=True) for g in (2, 4)]
    lasts = [torch.randn(5, 8, 1, 1) for _ in range(2)]
    args = (firsts, cores, lasts, torch.randn(5), (2, 4), 4, 1, 1)
    y = gk.series_bottleneck_conv2d(x, *args, backend=backend)
    assert y.is_contiguous(memory_format=memory_format)
    grad_out = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *cores], grad_out)
    assert grads[0].is_contiguous(memory_format=memory_format)
    y_ref = naive_bottleneck(x, *args)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-3)
    with torch.no_grad():  # the inference forward
        y_inference = gk.series_bottleneck_conv2d(x, *args, backend=backend)
    assert y_inference.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(y_inference, y_ref, rtol=1e-4, atol=1e-3)
    for g, g_ref in zip(grads, torch.autograd.grad(y_ref, [x, *cores], grad_out)):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-3)


def test_available_backends_and_forced_unavailable_backend():
    names = gk.available_backends()
    assert "reference" in names
    assert set(names) <= {"reference", "cpp", "triton", "cuda"}
    if not torch.cuda.is_available():
        with pytest.raises(gk.BackendUnavailableError, match="cuda"):
            gk.series_grouped_conv2d(torch.randn(1, 2, 4, 4), [torch.randn(2, 1, 3, 3)], (1,), 1,
                                     backend="cuda")


def _dense_core_layer(dtype):
    """A layer at its one-group size with S = C_in, T = C_out, where folding pays."""
    gen = torch.Generator().manual_seed(5)
    C_in, S, T, C_out = 6, 6, 8, 8
    x = torch.randn(8, C_in, 9, 8, dtype=dtype, generator=gen).requires_grad_()
    firsts = [torch.randn(S, C_in, 1, 1, dtype=dtype, generator=gen, requires_grad=True)
              for _ in range(2)]
    cores = [torch.randn(T, g, 3, 3, dtype=dtype, generator=gen, requires_grad=True)
             for g in (3, 6)]
    lasts = [torch.randn(C_out, T, 1, 1, dtype=dtype, generator=gen, requires_grad=True)
             for _ in range(2)]
    bias = torch.randn(C_out, dtype=dtype, generator=gen, requires_grad=True)
    return x, firsts, cores, lasts, bias


@pytest.fixture
def static_rule():
    """auto follows its static rule (no measuring) for the test."""
    gk.set_autotune(False)
    yield
    gk.set_autotune(None)


def _kernel_args(x, firsts, cores, lasts, bias, geom):
    n = geom.num_active
    return x, sum(firsts[:n]), list(cores), sum(lasts[:n]), bias, geom


@pytest.mark.parametrize("geometry", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 0, 1)])
def test_folded_dense_core_matches_reference_in_float64(geometry):
    stride, padding, dilation = ((v, v) for v in geometry)
    x, firsts, cores, lasts, bias = _dense_core_layer(torch.float64)
    geom = SeriesGeom((3, 6), 6, stride, padding, dilation)
    x, A, cores, C, bias, geom = _kernel_args(x, firsts, cores, lasts, bias, geom)
    sig = backends.signature("bottleneck", x, cores, geom, Needs(), firsts, lasts, bias)
    assert fastpaths._folding_pays(sig)
    folded, reference = fastpaths.Folded(), Reference()
    inputs = Inputs("bottleneck", x, cores, geom, Needs(), A, C, bias)
    grad_y = torch.randn_like(reference.step(inputs, None)[0])
    got, want = folded.step(inputs, grad_y), reference.step(inputs, grad_y)  # y, then every gradient
    assert len(got) == len(want) == 1 + 4 + geom.num_active
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_static_rule_folds_a_dense_core_and_matches_the_oracle(static_rule):
    x, firsts, cores, lasts, bias = _dense_core_layer(torch.float32)
    args = (firsts, cores, lasts, bias, (3, 6), 6, 1, 1)
    geom = SeriesGeom((3, 6), 6, (1, 1), (1, 1))
    kernels = backends.choose("auto", "bottleneck", x, cores, geom, Needs(), firsts, lasts, bias)
    assert kernels.name == "folded"
    y = gk.series_bottleneck_conv2d(x, *args)
    leaves = [x, *firsts, *cores, *lasts, bias]
    grad_out = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, grad_out)
    y_ref = naive_bottleneck(x, *args)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for g, g_ref in zip(grads, torch.autograd.grad(y_ref, leaves, grad_out)):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-3)
    torch.library.opcheck(torch.ops.gross.series_bottleneck_conv2d.default,
                          (x, firsts, cores, lasts, bias, [3, 6], 6, [1, 1], [1, 1], [1, 1],
                           "auto", [True] * 5))


def test_torch_compile_of_a_folding_layer_matches_eager(static_rule):
    layer = gk.SeriesConv2d(8, 8, 3, (2, 4, 8), padding=1)
    for p in layer.parameters():
        nn.init.normal_(p, std=0.3)
    layer.group_size = 8
    x = torch.randn(4, 8, 12, 12, requires_grad=True)
    geom = SeriesGeom((2, 4, 8), 8, (1, 1), (1, 1))
    kernels = backends.choose("auto", "bottleneck", x, list(layer.cores), geom, Needs(),
                              list(layer.firsts), list(layer.lasts), layer.bias)
    assert kernels.name == "folded" and not kernels.keeps_activations(x, None, None, None, geom)
    eager = layer(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), [x, *layer.parameters()])
    out = torch.compile(layer, fullgraph=True)(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for g, ge in zip(grads, eager_grads):
        torch.testing.assert_close(g, ge, rtol=1e-4, atol=1e-4)
