"""Decomposition: block term decomposition of conv weights, the GroSS series, and model conversion."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

import gross_kernels as gk
from gross_kernels.algebra import expand_core
from gross_kernels._validate import check_series

from . import _btd, _greedy, _parallel


@dataclass
class BTDResult:
    """Factors of a BTD in SeriesConv2d's shapes; unpacks as `A, B, C = result`.

    A `(S, C_in, 1, 1)`, B `(T, G, kh, kw)` (grouped core, S/G groups), C `(C_out, T, 1, 1)`;
    `rel_error` = ‖W − C·B·A‖ / ‖W‖, `iterations` = PCI passes run and `seconds` = the wall time
    `btd` took. Within each block the rows of A and the columns of C are orthonormal (Tucker-2
    form), so B carries the scale.
    """

    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    rel_error: float
    iterations: int
    seconds: float = 0.0

    def __iter__(self):
        return iter((self.A, self.B, self.C))

    @property
    def group_size(self) -> int:
        """Input channels per group of the core B."""
        return self.B.shape[1]


def _int(name, value, minimum=1):
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_weight(weight):
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (C_out, C_in, kh, kw), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"weight must not be empty, got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight must be finite (it holds NaN or inf)")


def _bottleneck_pair(bottleneck, c_in, c_out):
    if bottleneck is None:
        S = T = c_in
    elif isinstance(bottleneck, int) and not isinstance(bottleneck, bool):
        S = T = bottleneck
    elif (isinstance(bottleneck, (tuple, list)) and len(bottleneck) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in bottleneck)):
        S, T = bottleneck
    else:
        raise TypeError(f"bottleneck must be None, an int S or a pair (S, T), got {bottleneck!r}")
    if S <= 0 or T <= 0:
        raise ValueError(f"bottleneck widths must be positive, got {(S, T)}")
    # Wider bottlenecks than the weight's mode ranks allow cannot be orthonormal factors.
    if S > c_in:
        raise ValueError(f"bottleneck S={S} exceeds the weight's C_in={c_in} (its rank along inputs)")
    if T > c_out:
        raise ValueError(f"bottleneck T={T} exceeds the weight's C_out={c_out} (its rank along outputs)")
    return S, T


def _blocks_from_factors(A, B, C, W_shape, S, T):
    """Per-block Tucker-2 form of given factors (an earlier BTD), checking their shapes against W."""
    c_out, c_in, kh, kw = W_shape
    if not (isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor) and isinstance(C, torch.Tensor)):
        raise TypeError(f"init must be one of {INITS}, a BTDResult or a tuple (A, B, C) of tensors")
    g = B.shape[1] if B.dim() == 4 else 0
    if A.shape != (S, c_in, 1, 1) or C.shape != (c_out, T, 1, 1) or B.dim() != 4 or B.shape[0] != T:
        raise ValueError(f"init factors have shapes A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}; "
                         f"expected A {(S, c_in, 1, 1)}, B ({T}, g, {kh}, {kw}), C {(c_out, T, 1, 1)}")
    if B.shape[2:] != (kh, kw):
        raise ValueError(f"init core kernel size {tuple(B.shape[2:])} does not match the weight's {(kh, kw)}")
    if g == 0 or S % g or T % (S // g):
        raise ValueError(f"init core group size {g} is not valid for the bottleneck (S, T)={(S, T)}")
    nb, tb = S // g, T // (S // g)
    dt = torch.float64
    U, Ru = torch.linalg.qr(C.to(dt).reshape(c_out, nb, tb).permute(1, 0, 2))
    V, Rv = torch.linalg.qr(A.to(dt).reshape(nb, g, c_in).mT)
    K = B.to(dt).reshape(nb, tb, g, kh * kw).permute(0, 1, 3, 2)
    return _btd.Blocks(U, torch.einsum("bst,btpg,bhg->bsph", Ru, K, Rv), V)


METHODS = ("pci", "als")


WORK_DTYPES = (torch.float32, torch.float64)


# The greedy start's fresh block fits form each block's Gram matrices of the dense residual, a cost
# that grows with C_out²·C_in and C_in²·C_out per block: 2.8 s for 128×128 at group size 1 (one
# thread), where it is a third of the decomposition; on 512×512 layers it would cost minutes.
GREEDY_MAX_WIDTHS = 128 * 128
# Passes of fresh fits before PCI. Over the benchmark's 64×32 and 128×128 rows, 3 passes gave
# lower final errors than the HOSVD start on 14 of 18 rows (1 pass, the released PCI's own first
# pass, did worse), and at or below the oracle's on 13 of 16 other 64×32 weights against 9 of 16
# for the HOSVD start. 5 passes: the same 13 of 16 there, with lower final errors than 3 passes
# on 10 of those 16 weights (higher on 6), and the benchmark's 64×32 G=1 random row below the
# oracle (3 passes: above it); 2 more fresh-fit passes cost ~1.9 s on 128×128 at G=1.
# bench/RESULTS.md, "Decomposition", rounds 3 and 4.
GREEDY_PASSES = 5
INITS = ("auto", "greedy", "hosvd")


def _start(W3, init, n_blocks, tb, g):
    """PCI's starting blocks for the named `init` (see `btd`)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, a BTDResult or a tuple (A, B, C), got {init!r}")
    c_out, _, c_in = W3.shape
    # One block is plain HOOI from the HOSVD, which a fresh fit would only repeat.
    narrow = c_out * c_in <= GREEDY_MAX_WIDTHS and n_blocks > 1
    if init == "greedy" or (init == "auto" and narrow):
        return _greedy.greedy_init(W3, n_blocks, tb, g, GREEDY_PASSES)
    return _btd.hosvd_init(W3, n_blocks, tb, g)


def btd(weight, group_size, bottleneck=None, tol=1e-5, max_iter=500, init="auto", method="pci",
        sweeps=1, device=None, work_dtype=torch.float32) -> BTDResult:
    """Block term decomposition of a conv weight `(C_out, C_in, kh, kw)` by principal component iteration.

    S/G blocks of multilinear rank (G, T·G/S) along (C_in, C_out), spatial dims full.
    `method="pci"`: each pass refits every block in turn to the residual of the others
    (Gauss-Seidel; `sweeps` HOOI sweeps per block, each factor updated by subspace-iteration steps
    warm-started from its current bases; each pass's change is extrapolated and kept when it
    lowers the error; a single block is plain HOOI). `method="als"`: each pass solves
    exactly for all blocks' A, then C, then the cores, with extrapolation; it touches the dense
    weight three times per pass whatever the block count, so it is far cheaper per pass when
    there are many small blocks, but it can stall in swamps where PCI recovers an exact BTD. Both
    stop when the relative error changes by at most `tol` over a pass or after `max_iter` passes.
    `init`: "greedy" (five passes of the released PCI from all-zero blocks: each block in turn
    fitted afresh to the residual of the others; lower minima on most layers, affordable on
    narrow ones), "hosvd" (truncated HOSVD split across the blocks), "auto" (greedy when
    C_out·C_in ≤ 128·128 and there are several blocks, else hosvd), or an earlier result /
    `(A, B, C)` at this or a finer group size that divides `group_size` (its blocks are merged
    exactly, so the start is at least as good as that result). Computes on `device` (default:
    the weight's) in float64, except PCI's iteration over several blocks, which runs in
    `work_dtype` (float32 by default: about twice as fast per pass on large layers; the same
    passes and final errors within a few 1e-6 of float64 on the benchmark's 64×32 and 128×128
    rows, while on VGG-16's series at group sizes 16 and 32 the local minimum reached sometimes
    differs, either way; the final error is always computed in float64 from factors
    re-orthonormalised in float64); returns factors in the weight's dtype and device.
    """
    start = time.perf_counter()
    _check_weight(weight)
    c_out, c_in, kh, kw = weight.shape
    S, T = _bottleneck_pair(bottleneck, c_in, c_out)
    G = _int("group_size", group_size)
    check_series([G], S, T, name="group_size")
    _int("max_iter", max_iter)
    _int("sweeps", sweeps)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if work_dtype not in WORK_DTYPES:
        raise ValueError(f"work_dtype must be one of {WORK_DTYPES}, got {work_dtype!r}")
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0:
        raise ValueError(f"tol must be a non-negative number, got {tol!r}")
    dev = torch.device(device) if device is not None else weight.device
    nb, tb = S // G, T // (S // G)
    W3 = weight.detach().to(dev, torch.float64).reshape(c_out, c_in, kh * kw).permute(0, 2, 1).contiguous()
    if isinstance(init, str):
        blocks = _start(W3, init, nb, tb, G)
    else:
        A0, B0, C0 = (t.detach().to(dev) for t in init)
        blocks = _blocks_from_factors(A0, B0, C0, weight.shape, S, T)
        g0 = B0.shape[1]
        if G % g0:
            raise ValueError(f"init group size {g0} must divide group_size {G} (a finer or equal BTD)")
        blocks = _btd.merge(blocks, G // g0)
    if method == "als":
        blocks, err, iters = _btd.als(W3, blocks, tol, max_iter)
    else:
        blocks, err, iters = _btd.pci(W3, blocks, tol, max_iter, sweeps, dtype=work_dtype)
    return _to_result(blocks, err, iters, weight, (kh, kw), time.perf_counter() - start)


def _to_result(blocks, err, iters, weight, kernel, seconds):
    U, K, V = blocks
    nb, c_out, tb = U.shape
    _, _, p, G = K.shape
    like = dict(dtype=weight.dtype, device=weight.device)
    A = V.mT.reshape(nb * G, -1, 1, 1).to(**like)
    B = K.permute(0, 1, 3, 2).reshape(nb * tb, G, *kernel).to(**like)
    C = U.permute(1, 0, 2).reshape(c_out, nb * tb, 1, 1).to(**like)
    return BTDResult(A, B, C, err, iters, seconds)


def reconstruct(A, B, C):
    """The dense conv weight `(C_out, C_in, kh, kw)` that the factors A, B, C compute."""
    S, T = A.shape[0], B.shape[0]
    G = B.shape[1]
    full = expand_core(B, S, G, S)  # (T, S, kh, kw): one group, zeros off the blocks
    return torch.einsum("ot,tskl,sc->ockl", C[:, :, 0, 0], full, A[:, :, 0, 0])


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


def _conv_padding(conv):
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
    S, T = _bottleneck_pair(bottleneck, W.shape[1], W.shape[0])
    sizes = check_series(group_sizes, S, T)
    return (S, T), sizes, [dict(weight=W, group_size=g, bottleneck=(S, T), **btd_args) for g in sizes]


def _new_series_layer(conv, bottleneck, sizes):
    """A `SeriesConv2d` with `conv`'s shape, geometry, device and dtype, its factors randomly initialised."""
    layer = gk.SeriesConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, sizes, bottleneck,
                            stride=conv.stride, padding=_conv_padding(conv), dilation=conv.dilation,
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

    Each size is decomposed from its own start (`btd`'s `init="auto"`): on VGG-16's 512×512
    layers that reached lower errors in fewer passes than warm starts from the next finer size
    (bench/RESULTS.md, "Decomposition", round 4), and it makes the sizes independent, so
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


def _spec_entry(name, entry):
    if not isinstance(entry, dict) or "group_sizes" not in entry:
        raise TypeError(f"spec[{name!r}] must be a dict with 'group_sizes' (and optional 'bottleneck'), "
                        f"got {entry!r}")
    unknown = set(entry) - {"group_sizes", "bottleneck"}
    if unknown:
        raise ValueError(f"spec[{name!r}] has unknown keys {sorted(unknown)}")
    bottleneck = entry.get("bottleneck")
    if isinstance(bottleneck, list):
        bottleneck = tuple(bottleneck)
    return list(entry["group_sizes"]), bottleneck


def convert(model, spec, inplace=True, init="decompose", progress=True, device=None, tol=1e-5, max_iter=500,
            method="pci", workers=1):
    """Replace the Conv2d layers named in `spec` by their group-size series; returns the model.

    `spec` maps names from `model.named_modules()` to `{"group_sizes": [...], "bottleneck": S |
    [S, T] | None}`. `init="decompose"` fits each layer's series by BTD (on `device` if given),
    with a progress bar over the layers (moving as each layer's sizes finish); `workers` > 1 runs
    the BTDs (one per layer and size) in that many CPU processes, largest layers first (call it
    under `if __name__ == "__main__":`, as spawned processes re-import the main module).
    `init="random"` builds SeriesConv2d layers with their default random initialisation, without
    decomposing. `inplace=False` converts a deep copy. `tol`, `max_iter`, `method` go to `btd`.
    Errors name the offending layer; all layers are checked before any is decomposed.
    """
    if init not in ("decompose", "random"):
        raise ValueError(f"init must be 'decompose' or 'random', got {init!r}")
    if not isinstance(spec, dict):
        raise TypeError(f"spec must be a dict of layer name → settings, got {type(spec).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    for name in spec:
        if name not in modules:
            raise ValueError(f"spec names layer {name!r}, which is not in the model")
        if not isinstance(modules[name], nn.Conv2d):
            raise TypeError(f"layer {name!r} is a {type(modules[name]).__name__}, not an nn.Conv2d")
    plans = {}
    for name in spec:
        group_sizes, bottleneck = _spec_entry(name, spec[name])
        try:
            plans[name] = _series_jobs(modules[name], group_sizes, bottleneck, tol=tol, max_iter=max_iter,
                                       method=method, device=device)
            if init == "decompose":
                _check_weight(modules[name].weight)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"layer {name!r}: {exc}") from exc
    if init == "decompose":
        built = _series_layers(modules, plans, workers, progress)
    for name, (pair, sizes, _) in plans.items():
        layer = built[name][0] if init == "decompose" else _new_series_layer(modules[name], pair, sizes)
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, layer)
    return model
