"""The GroSS series of one convolution: each group size's BTD, aligned and stored as residual terms."""
from __future__ import annotations

import torch
from torch import nn

import gross_kernels as gk
from gross_kernels.algebra import expand_core
from gross_kernels._validate import check_series

from . import _parallel
from .weight import BTDResult, bottleneck_pair


def _align(result, previous):
    """Rotate each block's bases (orthogonal Procrustes) towards the previous size's factors.

    The reconstruction is unchanged; the residual terms A_j = A^(j) − A^(j−1) etc. become small,
    so every term of the series starts close to the ones below it (the GroSS shared basis).
    """
    A, B, C = (t.double() for t in result)
    S, c_in = A.shape[:2]
    T, G, kh, kw = B.shape
    nb, tb = S // G, T // (S // G)
    V = A.reshape(nb, G, c_in).mT                     # (nb, C_in, G)
    U = C.reshape(-1, nb, tb).permute(1, 0, 2)        # (nb, C_out, tb)
    V_ref = previous.A.double().reshape(nb, G, c_in).mT
    U_ref = previous.C.double().reshape(-1, nb, tb).permute(1, 0, 2)

    def polar(M):
        P, _, Rh = torch.linalg.svd(M)
        return P @ Rh

    Qv, Qu = polar(V.mT @ V_ref), polar(U.mT @ U_ref)
    K = B.reshape(nb, tb, G, kh * kw)
    K = torch.einsum("bts,btgp,bgh->bshp", Qu, K, Qv)
    like = dict(dtype=result.A.dtype, device=result.A.device)
    return BTDResult((V @ Qv).mT.reshape(S, c_in, 1, 1).to(**like), K.reshape(T, G, kh, kw).to(**like),
                     (U @ Qu).permute(1, 0, 2).reshape(-1, T, 1, 1).to(**like),
                     result.rel_error, result.iterations, result.seconds)


def conv_padding(conv):
    """The conv's padding as ints ('valid' → 0, 'same' → half the dilated kernel when symmetric)."""
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    if any(t % 2 for t in total):
        raise ValueError(f"padding='same' with kernel_size={conv.kernel_size} and dilation={conv.dilation} "
                         "needs asymmetric padding, which SeriesConv2d does not support")
    return tuple(t // 2 for t in total)


def _check_conv(conv):
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(f"conv must be an ungrouped convolution (groups=1), got groups={conv.groups}")
    if conv.padding_mode != "zeros":
        raise ValueError(f"conv must use padding_mode='zeros', got {conv.padding_mode!r}")


def _series_jobs(conv, group_sizes, bottleneck, **btd_args):
    """(S, T), the checked sizes and one `btd` job per size for `conv`'s series."""
    _check_conv(conv)
    W = conv.weight.detach()
    S, T = bottleneck_pair(bottleneck, W.shape[1], W.shape[0])
    sizes = check_series(group_sizes, S, T)
    return (S, T), sizes, [dict(weight=W, group_size=g, bottleneck=(S, T), **btd_args) for g in sizes]


def _new_series_layer(conv, bottleneck, sizes):
    """A `SeriesConv2d` with `conv`'s shape, geometry, device and dtype, its factors randomly initialised."""
    layer = gk.SeriesConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, sizes, bottleneck,
                            stride=conv.stride, padding=conv_padding(conv), dilation=conv.dilation,
                            bias=conv.bias is not None)
    return layer.to(device=conv.weight.device, dtype=conv.weight.dtype)


def _series_layer(conv, bottleneck, sizes, results):
    """The `SeriesConv2d` of `conv` whose configuration at each size computes that size's BTD.

    Each size's bases are first rotated towards the previous size's (`_align`, an exact
    re-expression) so that the stored residual terms are small.
    """
    S, T = bottleneck
    layer = _new_series_layer(conv, bottleneck, sizes)
    aligned, prev = [], None
    with torch.no_grad():
        for j, (g, res) in enumerate(zip(sizes, results)):
            if prev is None:
                layer.firsts[j].copy_(res.A)
                layer.cores[j].copy_(res.B)
                layer.lasts[j].copy_(res.C)
            else:
                res = _align(res, prev)
                layer.firsts[j].copy_(res.A - prev.A)
                layer.cores[j].copy_(res.B - expand_core(prev.B, S, prev.group_size, g))
                layer.lasts[j].copy_(res.C - prev.C)
            aligned.append(res)
            prev = res
        if conv.bias is not None:
            layer.bias.copy_(conv.bias)
    return layer, aligned


def _series_layers(convs, plans, workers, progress):
    """`_series_layer` for every key of `plans` (from `_series_jobs`), all BTDs in one `run_btds` call.

    Returns {key: (layer, [BTDResult per size])}. The progress bar counts layers: each of a
    layer's BTDs moves it by its share of the layer.
    """
    jobs = [job for _, _, layer_jobs in plans.values() for job in layer_jobs]
    steps = [1 / len(layer_jobs) for _, _, layer_jobs in plans.values() for _ in layer_jobs]
    results = iter(_parallel.run_btds(jobs, workers, progress=progress, unit="layer", steps=steps))
    return {key: _series_layer(convs[key], pair, sizes, [next(results) for _ in layer_jobs])
            for key, (pair, sizes, layer_jobs) in plans.items()}


def series(conv, group_sizes, bottleneck=None, tol=1e-5, max_iter=500, method="pci", device=None,
           return_results=False, work_dtype=torch.float32, workers=1):
    """A `SeriesConv2d` whose configuration at each group size g computes the BTD of `conv` at g.

    Each size is decomposed from its own start (`btd`'s `init="auto"`; warm starts from the next
    finer size did worse on the measured layers, bench/RESULTS.md, "Notes"), which makes the sizes independent, so
    `workers` > 1 decomposes them in parallel processes (on the CPU). Term j stores
    A^(j) − A^(j−1), C^(j) − C^(j−1) and B^(j) − expand(B^(j−1)) with each size's bases rotated
    towards the previous size's, so the partial sums of the terms are exactly the BTD at g_j.
    Stride, padding, dilation and bias carry over; `tol`, `max_iter`, `method`, `device` and
    `work_dtype` go to `btd`. With `return_results`, returns `(layer, [BTDResult per size])`.
    """
    plan = _series_jobs(conv, group_sizes, bottleneck, tol=tol, max_iter=max_iter, method=method, device=device,
                        work_dtype=work_dtype)
    layer, results = _series_layers({0: conv}, {0: plan}, workers, progress=False)[0]
    return (layer, results) if return_results else layer




def single_term(layer, group_size):
    """A one-term `SeriesConv2d` computing `layer` at `group_size`: the series' partial sums as its only term.

    On a freshly decomposed series this is the BTD of the original conv at that size alone.
    """
    previous = layer.group_size
    layer.group_size = group_size
    try:
        first, core, last = layer.export()
    finally:
        layer.group_size = previous
    single = gk.SeriesConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, [group_size], layer.bottleneck,
                             stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                             bias=layer.bias is not None, backend=layer.backend)
    with torch.no_grad():
        for target, source in ((single.firsts[0], first), (single.cores[0], core), (single.lasts[0], last)):
            target.copy_(source.weight)
        if layer.bias is not None:
            single.bias.copy_(last.bias)
    return single.to(device=layer.cores[0].device, dtype=layer.cores[0].dtype)
