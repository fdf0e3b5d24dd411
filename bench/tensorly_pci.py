"""Oracle block term decomposition: the released GroSS PCI, one tensorly partial_tucker per block per iteration.

Benchmark/test-only (tensorly is not a runtime dependency). Like the released code it starts from
all-zero blocks, refits each block to the residual of the others with `partial_tucker` (HOSVD
initialisation, tensorly's default inner iterations) and stops when the relative error changes by
at most `tol` between iterations. Set OPENBLAS_NUM_THREADS=1 before numpy is imported to time it
at its best on the 2-core machine (its default threading is several times slower there).
"""
import math
import time

import numpy as np


def pci(weight, group_size, bottleneck, tol=1e-5, max_iter=1000, max_seconds=None):
    """Run the oracle PCI on a `(C_out, C_in, kh, kw)` array.

    Returns a dict: factors `A (S, C_in)`, `B (T, G, kh, kw)`, `C (C_out, T)` (None when cut),
    `rel_error` (after the last finished iteration), `iterations`, `seconds`, `errors` (per
    iteration), `cut` (True when `max_seconds` stopped it before convergence).
    """
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    tl.set_backend("numpy")
    W = np.asarray(weight, dtype=np.float64)
    c_out, c_in, kh, kw = W.shape
    S, T = bottleneck
    n_blocks = S // group_size
    t_b = T // n_blocks
    W3 = W.reshape(c_out, c_in, kh * kw)
    norm_w = np.linalg.norm(W3)
    blocks = [np.zeros_like(W3) for _ in range(n_blocks)]
    fits = [None] * n_blocks
    total = np.zeros_like(W3)
    errors, last, cut = [], math.inf, False
    start = time.perf_counter()
    for _ in range(max_iter):
        for b in range(n_blocks):
            residual = W3 - (total - blocks[b])
            (core, factors), _ = partial_tucker(residual, rank=[t_b, group_size], modes=[0, 1])
            new = tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])
            total += new - blocks[b]
            blocks[b], fits[b] = new, (core, factors)
        err = float(np.linalg.norm(W3 - total) / norm_w)
        errors.append(err)
        if abs(last - err) <= tol:
            break
        last = err
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            cut = True
            break
    seconds = time.perf_counter() - start
    A = np.concatenate([factors[1].T for _, factors in fits], axis=0)
    C = np.concatenate([factors[0] for _, factors in fits], axis=1)
    B = np.concatenate([core for core, _ in fits], axis=0).reshape(T, group_size, kh, kw)
    return {"A": A, "B": B, "C": C, "rel_error": errors[-1], "iterations": len(errors),
            "seconds": seconds, "errors": errors, "cut": cut}
