"""Block term decomposition of one conv weight (`btd`) and the dense weight of factors (`reconstruct`)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from gross_kernels.algebra import expand_core
from gross_kernels._validate import check_series

from . import _btd, _greedy


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


def check_weight(weight):
    """Raise TypeError/ValueError unless `weight` is a finite, non-empty 4-D floating-point tensor."""
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


def bottleneck_pair(bottleneck, c_in, c_out):
    """(S, T) of `bottleneck` (None: C_in; an int; a pair), checked against the weight's C_in and C_out."""
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


# Fresh block fits cost about C_out²·C_in per block: affordable on narrow layers only (bench/RESULTS.md, "Notes").
GREEDY_MAX_WIDTHS = 128 * 128
# Fresh-fit passes before PCI: five reached lower errors than one or three on most measured layers (bench/RESULTS.md).
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
    `work_dtype` (float32 by default: faster per pass, final errors as float64's to rounding on
    the measured layers, bench/RESULTS.md, "Notes"; the final error is always computed in float64
    from factors re-orthonormalised in float64); returns factors in the weight's dtype and device.
    """
    start = time.perf_counter()
    check_weight(weight)
    c_out, c_in, kh, kw = weight.shape
    S, T = bottleneck_pair(bottleneck, c_in, c_out)
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


