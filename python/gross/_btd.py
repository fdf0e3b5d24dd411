"""Numerical core of the block term decomposition: principal component iteration (PCI) in torch.

A weight is held as `W3[o, p, c]` (`C_out`, `kh*kw`, `C_in`) so that both mode products the
iteration needs are plain matrix multiplies without copies. A BTD with `nb` blocks is held in
Tucker-2 form per block: `U (nb, C_out, tb)` and `V (nb, C_in, G)` with orthonormal columns and
a core `K (nb, tb, p, G)`; block `b` reconstructs as `K[b] ×_o U[b] ×_c V[b]`.
"""
import math
from typing import NamedTuple

import torch


class Blocks(NamedTuple):
    """Per-block Tucker-2 factors: U (nb, C_out, tb), K (nb, tb, p, G), V (nb, C_in, G)."""

    U: torch.Tensor
    K: torch.Tensor
    V: torch.Tensor


def top_subspace(M, k):
    """Orthonormal basis (n, k) of the top-k left singular subspace of M (n, m)."""
    n, m = M.shape
    if k <= m < n:
        # The thin side is cheaper: eigenvectors of the m×m Gram matrix mapped back through M,
        # re-orthonormalised by QR (cheaper and more stable than dividing by singular values).
        _, vecs = torch.linalg.eigh(M.mT @ M)
        return torch.linalg.qr(M @ vecs[:, m - k:])[0]
    # When k exceeds the rank, eigh's trailing eigenvectors complete the basis orthonormally.
    _, vecs = torch.linalg.eigh(M @ M.mT)
    return vecs[:, n - k:]


def block_products(blocks):
    """Z (nb, tb, p*C_in): each block's core multiplied out along C_in (X_b = U_b @ Z_b)."""
    U, K, V = blocks
    nb, tb, p, g = K.shape
    return (K.reshape(nb, tb * p, g) @ V.mT).reshape(nb, tb, p * V.shape[1])


def reconstruct(blocks):
    """The sum of all blocks as a dense `(C_out, p, C_in)` tensor."""
    U, K, V = blocks
    nb, c_out, tb = U.shape
    Z = block_products(blocks).reshape(nb * tb, -1)
    return (U.permute(1, 0, 2).reshape(c_out, nb * tb) @ Z).reshape(c_out, K.shape[2], V.shape[1])


def hosvd_init(W3, n_blocks, tb, g):
    """Blocks from a truncated HOSVD of W3, consecutive singular vectors going to consecutive blocks."""
    c_out, p, c_in = W3.shape
    U = top_subspace(W3.reshape(c_out, p * c_in), n_blocks * tb).flip(-1)
    V = top_subspace(W3.reshape(c_out * p, c_in).mT, n_blocks * g).flip(-1)
    U = U.reshape(c_out, n_blocks, tb).permute(1, 0, 2).contiguous()
    V = V.reshape(c_in, n_blocks, g).permute(1, 0, 2).contiguous()
    return Blocks(U, project(W3, U, V), V)


def project(W3, U, V):
    """Optimal cores (nb, tb, p, G) for fixed orthonormal factors: W3 ×_o U_b^T ×_c V_b^T."""
    c_out, p, c_in = W3.shape
    nb, _, g = V.shape
    WV = (W3.reshape(c_out * p, c_in) @ V.permute(1, 0, 2).reshape(c_in, nb * g)).reshape(c_out, p, nb, g)
    return torch.einsum("bot,opbg->btpg", U, WV)


def merge(blocks, factor):
    """Exactly re-express groups of `factor` consecutive blocks as one block each (QR of the factors)."""
    U, K, V = blocks
    nb, c_out, tb = U.shape
    _, _, p, g = K.shape
    nc = nb // factor
    Uc = U.reshape(nc, factor, c_out, tb).permute(0, 2, 1, 3).reshape(nc, c_out, factor * tb)
    Vc = V.reshape(nc, factor, V.shape[1], g).permute(0, 2, 1, 3).reshape(nc, V.shape[1], factor * g)
    Qu, Ru = torch.linalg.qr(Uc)
    Qv, Rv = torch.linalg.qr(Vc)
    # Block-diagonal core of the merged block, then carried into the new orthonormal bases.
    Kc = K.new_zeros(nc, factor * tb, p, factor * g)
    for i in range(factor):
        Kc[:, i * tb:(i + 1) * tb, :, i * g:(i + 1) * g] = K.reshape(nc, factor, tb, p, g)[:, i]
    Kc = torch.einsum("bst,btpg,bhg->bsph", Ru, Kc, Rv)
    return Blocks(Qu, Kc, Qv)


def _update_block(E2, blocks, Z, b, sweeps):
    """Refit block b to the residual of the others (HOOI sweeps warm-started from its factors).

    E2 is the current residual `(C_out, p*C_in)`, updated in place for the new block.
    """
    U, K, V = blocks
    Ub, Kb, Vb, Zb = U[b], K[b], V[b], Z[b]
    c_out, pc = E2.shape
    tb, p, g = Kb.shape
    c_in = pc // p
    E3 = E2.view(c_out * p, c_in)
    # Residual with this block added back, seen through U_b (U_b^T U_b = I, so its own part is Z_b).
    Y1 = (Ub.mT @ E2 + Zb).reshape(tb * p, c_in)
    for _ in range(sweeps):
        Vn = top_subspace(Y1.mT, g)
        Y2 = (E3 @ Vn).reshape(c_out, p * g) + Ub @ (Kb.reshape(tb * p, g) @ (Vb.mT @ Vn)).reshape(tb, p * g)
        Un = top_subspace(Y2, tb)
        if sweeps > 1:
            Y1 = (Un.mT @ E2 + (Un.mT @ Ub) @ Zb).reshape(tb * p, c_in)
    Kn = (Un.mT @ Y2).reshape(tb, p, g)
    Zn = (Kn.reshape(tb * p, g) @ Vn.mT).reshape(tb, pc)
    # E += X_old - X_new as one multiply-add over the dense residual.
    E2.addmm_(torch.cat([Ub, Un], 1), torch.cat([Zb, -Zn], 0))
    U[b], K[b], V[b], Z[b] = Un, Kn, Vn, Zn


def pci(W3, blocks, tol, max_iter, sweeps=1):
    """Principal component iteration from `blocks` (modified in place); returns (blocks, rel_error, iterations).

    Gauss-Seidel over blocks: each block in turn is refitted to the residual of all the others.
    Stops when the relative error changes by at most `tol` over one pass, or after `max_iter` passes.
    """
    c_out, p, c_in = W3.shape
    norm_w = torch.linalg.vector_norm(W3)
    E2 = (W3 - reconstruct(blocks)).reshape(c_out, p * c_in)
    Z = block_products(blocks)
    last, it = math.inf, 0
    for it in range(1, max_iter + 1):
        for b in range(blocks.U.shape[0]):
            _update_block(E2, blocks, Z, b, sweeps)
        err = (torch.linalg.vector_norm(E2) / norm_w).item()
        if abs(last - err) <= tol:
            break
        last = err
    # The final error from an exact reconstruction, not the incrementally updated residual.
    err = (torch.linalg.vector_norm(W3 - reconstruct(blocks)) / norm_w).item()
    return blocks, err, it
