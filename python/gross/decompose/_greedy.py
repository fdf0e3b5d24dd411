"""Greedy start for PCI: the released GroSS PCI's first passes, each block refitted from scratch.

From all-zero blocks, each block in turn becomes the best Tucker-2 fit of the residual of the
others, computed afresh (truncated HOSVD of that residual, then HOOI sweeps), exactly as the
released code does with tensorly's `partial_tucker`. Unlike PCI's warm updates, a fresh fit lets
a block jump to the residual's dominant subspace wherever it lies; a few such passes before the
warm iteration land in lower minima on most layers (bench/RESULTS.md, "Decomposition").
Weights are held as `W3[o, p, c]` and blocks as `_btd.Blocks`, like `_btd`.
"""
import math


from . import _btd


def fresh_fit(R3, tb, g, tol=1e-4, max_sweeps=100):
    """tensorly's `partial_tucker(R, rank=[tb, g], modes=[C_out, C_in])` of R3 `(C_out, p, C_in)`.

    Truncated HOSVD, then HOOI sweeps (C_out factor first) until the relative error changes by
    less than `tol`, at least three sweeps (tensorly's rule). Returns U `(C_out, tb)`,
    K `(tb, p, g)`, V `(C_in, g)`.
    """
    c_out, p, c_in = R3.shape
    R2, Rc = R3.reshape(c_out, p * c_in), R3.reshape(c_out * p, c_in)
    U = _btd.top_subspace(R2, tb)
    V = _btd.top_subspace(Rc.mT, g)
    norm2 = R3.square().sum().item()
    last = math.inf
    for sweep in range(max_sweeps):
        U = _btd.top_subspace((Rc @ V).reshape(c_out, p * g), tb)
        Y = (U.mT @ R2).reshape(tb * p, c_in)
        V = _btd.top_subspace(Y.mT, g)
        K = Y @ V
        # Orthonormal factors: the fit's error follows from the core's norm alone.
        err = math.sqrt(abs(norm2 - K.square().sum().item()) / norm2) if norm2 > 0 else 0.0
        if sweep >= 2 and abs(last - err) < tol:
            break
        last = err
    return U, K.reshape(tb, p, g), V


def greedy_init(W3, n_blocks, tb, g, passes):
    """Blocks after `passes` passes of fresh block refits from all-zero blocks (the released PCI)."""
    c_out, p, c_in = W3.shape
    U = W3.new_zeros(n_blocks, c_out, tb)
    K = W3.new_zeros(n_blocks, tb, p, g)
    V = W3.new_zeros(n_blocks, c_in, g)
    residual = W3.clone()

    def block(b):
        return _btd.reconstruct(_btd.Blocks(U[b:b + 1], K[b:b + 1], V[b:b + 1]))

    for _ in range(passes):
        for b in range(n_blocks):
            residual += block(b)  # the residual of the other blocks
            U[b], K[b], V[b] = fresh_fit(residual, tb, g)
            residual -= block(b)
    return _btd.Blocks(U, K, V)
