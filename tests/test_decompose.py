"""Block term decomposition, the GroSS series built from it, and model conversion."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gross
from gross.decompose import BTDResult, btd, convert, reconstruct, series

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    # These decompositions are many tiny LAPACK calls: on the shared CI cores, extra BLAS threads
    # only spin against each other (measured ~100x slower with 2 threads under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_btd(c_out, c_in, S, T, G, k=3):
    A = torch.randn(S, c_in, 1, 1, dtype=F64)
    B = torch.randn(T, G, k, k, dtype=F64)
    C = torch.randn(c_out, T, 1, 1, dtype=F64)
    return A, B, C


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_exact_btd_plus_noise_is_recovered():
    # S < C_in: with S = C_in, PCI from the HOSVD start can stall in a local minimum. ALS is not
    # tested here: on this case it stalls in a swamp (error 0.15 after 2000 passes).
    W = reconstruct(*_random_btd(20, 16, 8, 8, 4))
    noisy = W + 1e-7 * W.norm() / W.numel() ** 0.5 * torch.randn_like(W)
    res = btd(noisy, 4, (8, 8), tol=1e-13, max_iter=2000, method="pci")
    assert res.rel_error < 1e-5
    assert _rel(reconstruct(*res), noisy) == pytest.approx(res.rel_error, rel=1e-6, abs=1e-12)


def test_result_unpacks_as_factors_in_series_shapes():
    W = torch.randn(12, 8, 3, 5)
    res = btd(W, 2, (8, 4))
    assert isinstance(res, BTDResult)
    A, B, C = res
    assert A.shape == (8, 8, 1, 1) and B.shape == (4, 2, 3, 5) and C.shape == (12, 4, 1, 1)
    assert A.dtype == W.dtype and res.iterations >= 1 and 0 < res.rel_error < 1
    # The reported error is that of the returned factors.
    assert _rel(reconstruct(A.double(), B.double(), C.double()), W.double()) == pytest.approx(
        res.rel_error, rel=1e-4)


@pytest.mark.parametrize("method", ["pci", "als"])
def test_one_group_full_bottleneck_is_exact(method):
    W = torch.randn(12, 12, 3, 3, dtype=F64)
    res = btd(W, 12, 12, method=method)
    assert res.rel_error < 1e-12
    assert torch.allclose(reconstruct(*res), W, atol=1e-12)


def test_error_decreases_with_group_size():
    W = torch.randn(32, 16, 3, 3, dtype=F64)
    errors = [btd(W, g, 16, tol=1e-7).rel_error for g in (1, 2, 4, 8, 16)]
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > errors[-1] + 0.1


@pytest.mark.parametrize("method", ["pci", "als"])
def test_warm_start_from_finer_is_no_worse_than_its_start(method):
    W = torch.randn(24, 16, 3, 3, dtype=F64)
    fine = btd(W, 2, 16)
    coarse = btd(W, 8, 16, init=fine, method=method)
    assert coarse.rel_error <= fine.rel_error + 1e-12
    same = btd(W, 2, 16, init=fine, max_iter=1, method=method)
    assert same.rel_error <= fine.rel_error + 1e-9


@pytest.mark.parametrize("init", ["hosvd", "greedy"])
@pytest.mark.parametrize("g", [1, 2])
def test_weight_with_pruned_channels_keeps_orthonormal_finite_factors(init, g):
    # Zero rows and columns put some blocks' bases in the weight's null space, where a subspace
    # step is zero: it must keep the basis (no 0/0), and the result stay in Tucker-2 form.
    W = torch.randn(16, 8, 3, 3, dtype=F64)
    W[10:], W[:, 6:] = 0, 0
    res = btd(W, g, 8, init=init)
    assert all(torch.isfinite(t).all() for t in res)
    A = res.A.reshape(8 // g, g, 8)
    assert torch.allclose(A @ A.mT, torch.eye(g, dtype=F64).expand(8 // g, g, g), atol=1e-12)
    assert _rel(reconstruct(*res), W) == pytest.approx(res.rel_error, rel=1e-10)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(weight=torch.randn(8, 8, 3), group_size=2), ValueError, "4-D"),
    (dict(weight=torch.randn(8, 8, 3, 3), group_size=3), ValueError, "divide"),
    (dict(weight=torch.randn(8, 8, 3, 3), group_size=1, bottleneck=(8, 4)), ValueError, "T=4"),
    (dict(weight=torch.randn(8, 8, 3, 3), group_size=2, bottleneck=(16, 8)), ValueError, "C_in"),
    (dict(weight=torch.randn(6, 8, 3, 3), group_size=2, bottleneck=(8, 8)), ValueError, "C_out"),
    (dict(weight=torch.full((8, 8, 3, 3), float("nan")), group_size=2), ValueError, "finite"),
    (dict(weight=torch.randn(8, 8, 3, 3), group_size=2.0), TypeError, "group_size"),
    (dict(weight=torch.randn(8, 8, 3, 3), group_size=2, tol=-1.0), ValueError, "tol"),
    (dict(weight=torch.randn(8, 8, 3, 3), group_size=2, init="svd"), ValueError, "init"),
    (dict(weight=torch.randn(8, 8, 3, 3), group_size=2, method="cp"), ValueError, "method"),
    (dict(weight=[[1.0]], group_size=1), TypeError, "weight"),
    (dict(weight=torch.randn(8, 8, 3, 3), group_size=2, work_dtype=torch.float16), ValueError, "work_dtype"),
])
def test_btd_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        btd(**kwargs)


def test_btd_bad_init_factors():
    W = torch.randn(8, 8, 3, 3)
    A, B, C = btd(W, 2, 8, max_iter=2)
    with pytest.raises(ValueError, match="kernel size"):
        btd(W, 2, 8, init=(A, B[:, :, :1], C))
    with pytest.raises(ValueError, match="divide"):
        btd(W, 2, 8, init=btd(W, 4, 8, max_iter=2))


def _conv(c_in, c_out, **kw):
    return nn.Conv2d(c_in, c_out, 3, **kw).double()


@pytest.mark.parametrize("conv_kw,sizes,bottleneck", [
    (dict(stride=2, padding=1, bias=True), [2, 4, 8, 16], (16, 8)),
    (dict(padding=2, dilation=2, bias=False), [1, 4, 8], None),
])
def test_series_partial_sums_equal_each_sizes_btd(conv_kw, sizes, bottleneck):
    conv = _conv(8 if bottleneck is None else 16, 12, **conv_kw)
    layer, results = series(conv, sizes, bottleneck, return_results=True)
    x = torch.randn(2, conv.in_channels, 9, 9, dtype=F64)
    assert layer.stride == conv.stride and layer.padding == conv.padding and layer.dilation == conv.dilation
    assert (layer.bias is None) == (conv.bias is None)
    for g, res in zip(sizes, results):
        layer.group_size = g
        direct = F.conv2d(x, reconstruct(*res), conv.bias, conv.stride, conv.padding, conv.dilation)
        assert torch.allclose(layer(x), direct, atol=1e-10, rtol=0)
        # Against the original conv: the difference is exactly the conv of the weight error.
        err = F.conv2d(x, reconstruct(*res) - conv.weight, None, conv.stride, conv.padding, conv.dilation)
        assert torch.allclose(layer(x) - conv(x), err, atol=1e-10, rtol=0)
        assert _rel(reconstruct(*res), conv.weight.detach()) == pytest.approx(res.rel_error, rel=1e-8)


def test_series_full_rank_top_size_reproduces_conv():
    conv = _conv(8, 8, padding=1)
    layer = series(conv, [2, 8])
    layer.group_size = 8
    x = torch.randn(1, 8, 6, 6, dtype=F64)
    assert torch.allclose(layer(x), conv(x), atol=1e-10)


def test_series_bad_input():
    with pytest.raises(TypeError, match="Conv2d"):
        series(nn.Linear(4, 4), [1])
    with pytest.raises(ValueError, match="groups"):
        series(nn.Conv2d(8, 8, 3, groups=2), [1])
    with pytest.raises(ValueError, match="increasing"):
        series(nn.Conv2d(8, 8, 3), [4, 2])


def _net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()), nn.Conv2d(8, 4, 1))


def test_convert_decompose_and_random():
    net = _net()
    spec = {"2.0": {"group_sizes": [1, 2, 8], "bottleneck": None}}
    copy = convert(net, spec, inplace=False, progress=False)
    assert isinstance(net[2][0], nn.Conv2d)
    layer = copy[2][0]
    assert layer.group_sizes == (1, 2, 8) and layer.bottleneck == (8, 8)
    x = torch.randn(2, 3, 8, 8)
    # The largest size is an exact (full-rank) decomposition: same function as the original.
    assert torch.allclose(copy(x), net(x), atol=1e-4)
    rand = gross.convert(_net(), {"2.0": {"group_sizes": [2, 4], "bottleneck": [8, 4]}}, init="random",
                         progress=False)
    assert rand[2][0].bottleneck == (8, 4) and rand(x).shape == (2, 4, 8, 8)
    same = convert(net, spec, progress=False)
    assert same is net and not isinstance(net[2][0], nn.Conv2d)


@pytest.mark.parametrize("spec,exc,match", [
    ({"9": {"group_sizes": [1]}}, ValueError, "'9'.*not in the model"),
    ({"1": {"group_sizes": [1]}}, TypeError, "'1'.*ReLU"),
    ({"2.0": {"group_sizes": [3]}}, ValueError, "'2.0'.*divide"),
    ({"2.0": {"group_sizes": [2], "bottleneck": 16}}, ValueError, "'2.0'.*C_in"),
    ({"2.0": {"sizes": [2]}}, TypeError, "'2.0'"),
])
def test_convert_bad_spec_names_the_layer(spec, exc, match):
    with pytest.raises(exc, match=match):
        convert(_net(), spec, progress=False, init="random")


def test_convert_checks_every_layer_before_decomposing():
    net = _net()
    with torch.no_grad():
        net[2][0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="'2.0'.*finite"):
        convert(net, {"0": {"group_sizes": [1]}, "2.0": {"group_sizes": [1]}}, progress=False)
    assert isinstance(net[0], nn.Conv2d)  # nothing replaced
    with pytest.raises(ValueError, match="workers"):
        convert(_net(), {"0": {"group_sizes": [1]}}, progress=False, workers=0)


def test_series_sizes_are_each_sizes_own_btd():
    conv = _conv(8, 12, padding=1)
    _, results = series(conv, [1, 2, 8], return_results=True)
    for g, res in zip([1, 2, 8], results):
        own = btd(conv.weight.detach(), g)
        assert res.rel_error == pytest.approx(own.rel_error, rel=1e-12)
        assert torch.allclose(reconstruct(*res), reconstruct(*own), atol=1e-12)


def test_convert_progress_bar_counts_layers(capsys):
    convert(_net(), {"0": {"group_sizes": [1, 3]}, "2.0": {"group_sizes": [1, 2, 8]}}, progress=True)
    assert "2.00/2 layers" in capsys.readouterr().err


def test_convert_with_worker_processes_matches_one_process():
    torch.manual_seed(0)
    net = _net().double()
    spec = {"0": {"group_sizes": [1, 3]}, "2.0": {"group_sizes": [1, 2, 8]}}
    one = convert(net, spec, inplace=False, progress=False)
    two = convert(net, spec, inplace=False, progress=False, workers=2)
    for (name, a), (_, b) in zip(one.named_parameters(), two.named_parameters()):
        assert torch.allclose(a, b, atol=1e-10, rtol=0), name


def test_convert_rejects_grouped_conv():
    net = nn.Sequential(nn.Conv2d(8, 8, 3, groups=4))
    with pytest.raises(ValueError, match="'0'.*groups"):
        convert(net, {"0": {"group_sizes": [1]}}, progress=False)


def test_matches_tensorly_oracle_on_small_shapes():
    pytest.importorskip("tensorly")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    from tensorly_pci import pci

    W = torch.randn(16, 8, 3, 3, dtype=F64)
    for g, method in ((2, "pci"), (2, "als"), (8, "pci")):
        oracle = pci(W.numpy(), g, (8, 8), tol=1e-6)
        ours = btd(W, g, 8, tol=1e-6, method=method)
        # Same problem and stopping rule; PCI ends in a local minimum that depends on the start
        # (HOSVD split here, all-zero blocks there), so the errors agree to ~1%, not exactly.
        assert ours.rel_error <= oracle["rel_error"] * 1.02
        A, B, C = (torch.from_numpy(oracle[k]) for k in "ABC")
        assert _rel(reconstruct(A[..., None, None], B, C[..., None, None]), W) == pytest.approx(
            oracle["rel_error"], rel=1e-6)


def test_greedy_start_is_the_released_pcis_first_passes():
    # Fresh fits from all-zero blocks are the released PCI itself: its error after each of its
    # first passes, to rounding, on random weights of three block structures.
    pytest.importorskip("tensorly")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    from tensorly_pci import pci
    from gross.decompose import _btd, _greedy

    gen = torch.Generator().manual_seed(11)
    for c_out, c_in, g in ((20, 16, 2), (24, 12, 3), (16, 8, 8)):
        W = torch.randn(c_out, c_in, 3, 3, dtype=F64, generator=gen)
        oracle = pci(W.numpy(), g, (c_in, c_in), tol=0.0, max_iter=3)
        W3 = W.reshape(c_out, c_in, 9).permute(0, 2, 1).contiguous()
        nb = c_in // g
        for passes, expected in enumerate(oracle["errors"], start=1):
            blocks = _greedy.greedy_init(W3, nb, c_in // nb, g, passes)
            assert _rel(_btd.reconstruct(blocks), W3) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_auto_init_is_greedy_on_narrow_layers_and_hosvd_on_wide_ones():
    from gross.decompose import _btd, _greedy
    from gross.decompose import GREEDY_MAX_WIDTHS, GREEDY_PASSES

    W = torch.randn(12, 8, 3, 3, dtype=F64)
    W3 = W.reshape(12, 8, 9).permute(0, 2, 1).contiguous()
    greedy = _btd.pci(W3, _greedy.greedy_init(W3, 4, 2, 2, GREEDY_PASSES), 1e-5, 500)[1]
    hosvd = _btd.pci(W3, _btd.hosvd_init(W3, 4, 2, 2), 1e-5, 500)[1]
    assert greedy != hosvd  # the two starts are told apart below
    assert btd(W, 2, 8, work_dtype=F64).rel_error == pytest.approx(greedy, rel=1e-9)
    assert btd(W, 2, 8, init="hosvd", work_dtype=F64).rel_error == pytest.approx(hosvd, rel=1e-9)
    assert 12 * 8 <= GREEDY_MAX_WIDTHS < 256 * 256


def test_delayed_residual_updates_give_the_same_iterates():
    # Chunks refit blocks against the chunk-start residual plus their predecessors' low-rank
    # changes: exactly Gauss-Seidel, whatever the chunk length (here not dividing the block count).
    from gross.decompose import _btd

    W3 = torch.randn(12, 9, 16, dtype=F64)
    fits = []
    for chunk in (1, 3, 8):
        blocks = _btd.hosvd_init(W3, 8, 1, 2)
        blocks, err, _ = _btd.pci(W3, blocks, 0.0, 5, chunk=chunk, extrapolate=False)
        fits.append((err, _btd.reconstruct(blocks)))
    for err, X in fits[1:]:
        assert err == pytest.approx(fits[0][0], rel=1e-10)
        assert torch.allclose(X, fits[0][1], atol=1e-10)


def test_extrapolation_never_raises_the_error_of_a_pass():
    from gross.decompose import _btd

    W3 = torch.randn(16, 9, 12, dtype=F64)
    errors = [_btd.pci(W3, _btd.hosvd_init(W3, 4, 4, 3), 0.0, n)[1] for n in (1, 2, 5, 10, 20)]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])), errors


def test_single_block_reaches_the_optimal_tucker2():
    # One block with G = C_in: the best Tucker-2 keeps V full, so the optimum is the truncated SVD
    # of the C_out unfolding; the single-block HOOI path must reach it.
    W = torch.randn(12, 6, 3, 3, dtype=F64)
    res = btd(W, 6, (6, 4), tol=1e-12)
    sv = torch.linalg.svdvals(W.reshape(12, -1))
    assert res.rel_error == pytest.approx((sv[4:].norm() / sv.norm()).item(), rel=1e-9)
    assert _rel(reconstruct(*res), W) == pytest.approx(res.rel_error, rel=1e-9)


def test_warm_subspace_passes_never_raise_the_error():
    # Each block's factors take one subspace-iteration step per visit instead of an exact
    # eigendecomposition; without extrapolation, every pass must still be a descent step.
    from gross.decompose import _btd

    W3 = torch.randn(20, 9, 14, dtype=F64)
    errors = [_btd.pci(W3, _btd.hosvd_init(W3, 7, 2, 2), 0.0, n, extrapolate=False)[1] for n in range(1, 9)]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])), errors


def test_float32_work_precision_matches_float64():
    # PCI's passes run in float32 by default; the final error (computed in float64 from factors
    # re-orthonormalised in float64) must match the float64 iteration's to float32 rounding.
    W = torch.randn(32, 16, 3, 3, dtype=F64)
    fast, exact = (btd(W, 4, 16, tol=1e-6, work_dtype=dt) for dt in (torch.float32, torch.float64))
    assert fast.rel_error == pytest.approx(exact.rel_error, rel=1e-4)
    assert abs(fast.iterations - exact.iterations) <= 0.1 * exact.iterations + 2
    assert _rel(reconstruct(*fast), W) == pytest.approx(fast.rel_error, rel=1e-9)
    A = fast.A.reshape(4, 4, 16)  # per block: its 4 rows of A, orthonormal in float64
    assert torch.allclose(A @ A.mT, torch.eye(4, dtype=F64).expand(4, 4, 4), atol=1e-12)
