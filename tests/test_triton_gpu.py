"""Triton kernels on a CUDA GPU at the paper's real layer shapes, float32/float16/bfloat16, outputs poisoned with NaN.

Errors are ‖out − ref‖ / ‖ref‖ against the naive oracle in float64. Tolerances by dtype:
float32 with TF32 switched off 1e-5 (IEEE products, float32 accumulation); float16 5e-3
(10-bit mantissa inputs, float32 accumulation); bfloat16 3e-2 (7-bit mantissa). Run with
TRITON_INTERPRET unset (the conftest sets it only when it is absent, so export TRITON_INTERPRET=0).
"""
import pytest
import torch

from oracle import naive_bottleneck, naive_series_conv

pytestmark = pytest.mark.cuda

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}

# (name, N, S, T, H, group_sizes, group_size, stride) at the paper's channel counts and resolution
# (batches cut where the full batch only costs time, not coverage).
SERIES_SHAPES = [
    ("4layer conv4", 256, 64, 64, 4, (1, 2, 4, 8, 16, 32, 64), 8, 1),
    ("vgg-cifar conv3_1", 256, 128, 128, 8, (1, 4, 16, 32), 32, 1),
    ("vgg-cifar conv5_1 depthwise", 256, 512, 512, 2, (1, 4, 16, 32), 1, 1),
    ("resnet18 layer2.0.conv1", 16, 64, 64, 56, (1, 4, 16, 32), 16, 2),
    ("hc conv3_1", 16, 36, 48, 56, (3, 9, 18), 9, 1),
    ("hc conv4_2", 16, 116, 100, 28, (29, 58, 116), 116, 1),
]
# (name, N, C_in, S, T, C_out, H, group_sizes, group_size, stride)
BOTTLENECK_SHAPES = [
    ("4layer conv3", 256, 32, 32, 32, 64, 8, (1, 2, 4, 8, 16, 32), 4, 1),
    ("hc conv2_2", 16, 128, 28, 28, 128, 112, (1, 7, 14, 28), 14, 1),
    ("resnet18 layer3.0.conv1", 16, 128, 128, 128, 256, 28, (1, 4, 16, 32), 32, 2),
    ("hc conv4_3 (unfused: 132 > 128)", 16, 512, 132, 132, 512, 28, (3, 33, 66), 33, 1),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _exact_fp32_and_poison(monkeypatch):
    """IEEE float32 (no TF32) so float32 meets its tolerance; new float buffers start as NaN."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


@pytest.fixture(scope="module")
def gt():
    import os
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: these checks are for compiled kernels")
    return pytest.importorskip("gross_kernels.triton")


def _rel(a, b):
    assert torch.isfinite(a).all(), "non-finite output: an element was not written"
    return ((a.double() - b).norm() / b.norm()).item()


def _scaled(*shape, fan_in, dtype):
    return (torch.randn(*shape, device="cuda") / fan_in ** 0.5).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SERIES_SHAPES, ids=lambda s: s[0])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_series_real_shapes(gt, shape, dtype, channels_last):
    _, N, S, T, H, gs, G, st = shape
    x = torch.randn(N, S, H, H, device="cuda").to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    cores = [_scaled(T, g, 3, 3, fan_in=9 * g, dtype=dtype) for g in gs]
    geo = ((st, st), (1, 1), (1, 1))
    x64 = x.double().requires_grad_()
    c64 = [c.double().requires_grad_() for c in cores]
    ref = naive_series_conv(x64, c64, gs, G, st, 1, 1)
    grad_z = torch.randn_like(ref)
    active = [c for c, g in zip(c64, gs) if g <= G]
    ref_grads = torch.autograd.grad(ref, [x64] + active, grad_z)
    z = gt.series_forward(x, cores, gs, G, *geo)
    assert _rel(z, ref) < TOL[dtype]
    gz = grad_z.to(dtype)
    gx = gt.series_backward_input(gz, cores, gs, G, x.shape, *geo)
    assert _rel(gx, ref_grads[0]) < TOL[dtype]
    gws = gt.series_backward_weight(gz, x, cores, gs, G, *geo)
    assert len(gws) == len(active)
    for got, want in zip(gws, ref_grads[1:]):
        assert got.dtype == dtype and _rel(got, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BOTTLENECK_SHAPES, ids=lambda s: s[0])
def test_bottleneck_real_shapes(gt, shape, dtype):
    _, N, CI, S, T, CO, H, gs, G, st = shape
    x = torch.randn(N, CI, H, H, device="cuda").to(dtype)
    A = _scaled(S, CI, 1, 1, fan_in=CI, dtype=dtype)
    cores = [_scaled(T, g, 3, 3, fan_in=9 * g, dtype=dtype) for g in gs]
    C = _scaled(CO, T, 1, 1, fan_in=T, dtype=dtype)
    bias = _scaled(CO, fan_in=1, dtype=dtype)
    geo = ((st, st), (1, 1), (1, 1))
    leaves = [t.double().requires_grad_() for t in (x, A, C, bias)]
    c64 = [c.double().requires_grad_() for c in cores]
    ref = naive_bottleneck(leaves[0], [leaves[1]], c64, [leaves[2]], leaves[3], gs, G, st, 1)
    grad_y = torch.randn_like(ref)
    active = [c for c, g in zip(c64, gs) if g <= G]
    ref_grads = torch.autograd.grad(ref, leaves + active, grad_y)
    y = gt.bottleneck_forward(x, A, cores, C, bias, gs, G, *geo)
    assert _rel(y, ref) < TOL[dtype]
    gx, gA, gcores, gC, gb = gt.bottleneck_backward(grad_y.to(dtype), x, A, cores, C, bias, gs,
                                                    G, *geo)
    for got, want in zip([gx, gA, gC, gb] + list(gcores), ref_grads):
        assert _rel(got, want) < TOL[dtype]


def test_fused_and_unfused_forward_agree(gt):
    from gross_kernels.triton import bottleneck as tb
    gs, G = (1, 4, 16, 32), 4
    x = torch.randn(64, 64, 56, 56, device="cuda")
    A = _scaled(64, 64, 1, 1, fan_in=64, dtype=torch.float32)
    cores = [_scaled(64, g, 3, 3, fan_in=9 * g, dtype=torch.float32) for g in gs]
    C = _scaled(64, 64, 1, 1, fan_in=64, dtype=torch.float32)
    geo = ((1, 1), (1, 1), (1, 1))
    fused = tb.forward(x, A, cores, C, None, gs, G, *geo, fused=True)
    unfused = tb.forward(x, A, cores, C, None, gs, G, *geo, fused=False)
    assert _rel(fused, unfused.double()) < 1e-5


def test_public_ops_triton_backend_and_compile(gt):
    gk = pytest.importorskip("gross_kernels")
    gs, G = (1, 4, 16), 4
    x = torch.randn(8, 16, 12, 12, device="cuda", requires_grad=True)
    cores = [torch.randn(16, g, 3, 3, device="cuda", requires_grad=True) for g in gs]

    def f(x, cores):
        return gk.series_grouped_conv2d(x, cores, gs, G, padding=1, backend="triton")

    ref = naive_series_conv(x.double(), [c.double() for c in cores], gs, G, 1, 1)
    assert _rel(f(x, cores), ref) < 1e-5
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x, cores)
    out.sum().backward()
    assert _rel(out, ref) < 1e-5 and torch.isfinite(x.grad).all()
