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


def warm_subspace(M, Q, steps=2):
    """Subspace-iteration steps from the orthonormal basis Q (n, k) towards M's top-k left singular subspace.

    Inside PCI a block's bases move little from one visit to the next, so a few steps of
    orth(M Mᵀ Q) from its current bases take the place of a full eigendecomposition of the Gram
    matrix (the dominant cost on large blocks); the fitted block's error still never rises, as
    the Ritz values of subspace iteration on a positive semi-definite matrix only increase. Two
    steps: measured to end as low as the exact eigendecomposition, one step slightly higher
    (bench/RESULTS.md, "Notes").
    """
    for _ in range(steps):
        if Q.shape[-1] == 1:
            # One column: QR is a normalisation, and LAPACK's QR of a vector cost more than the
            # step. A zero step (M orthogonal to Q: e.g. a block in the null space of a weight with
            # pruned channels) keeps Q instead of dividing zero by zero.
            X = M @ (M.mT @ Q)
            norm = torch.linalg.vector_norm(X)
            Q = torch.where(norm > 0, X / norm, Q)
        else:
            Q = torch.linalg.qr(M @ (M.mT @ Q))[0]
    return Q


def block_products(blocks):
    """Z (nb, tb, p*C_in): each block's core multiplied out along C_in (X_b = U_b @ Z_b)."""
    U, K, V = blocks
    nb, tb, p, g = K.shape
    return (K.reshape(nb, tb * p, g) @ V.mT).reshape(nb, tb, p * V.shape[1])


def _sum_blocks(U, Z):
    """Σ_b U_b @ Z_b as `(C_out, p*C_in)`, from the bases U and the block products Z."""
    nb, c_out, tb = U.shape
    return U.permute(1, 0, 2).reshape(c_out, nb * tb) @ Z.reshape(nb * tb, -1)


def reconstruct(blocks):
    """The sum of all blocks as a dense `(C_out, p, C_in)` tensor."""
    U, K, V = blocks
    return _sum_blocks(U, block_products(blocks)).reshape(U.shape[1], K.shape[2], V.shape[1])


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


def _times_columns(E3, V):
    """E3 @ V for the few columns of V (a block's new input basis); one column is passed as two.

    MKL's matrix-vector product was several times slower than the same product with the column
    given twice in column-major layout, the layout QR's bases already have (bench/RESULTS.md, "Notes").
    """
    if V.shape[1] != 1:
        return E3 @ V
    return (E3 @ V.mT.expand(2, -1).contiguous().mT)[:, :1]


def _update_block(E2, DU, DZ, n, P_b, blocks, Z, b, sweeps):
    """Refit block b to the residual of the others (HOOI sweeps, each factor one warm subspace step).

    The current residual is `E2 + DU[:, :n] @ DZ[:n]`: E2 `(C_out, p*C_in)` as it was at the start
    of the chunk, and DU, DZ the low-rank changes made by the chunk's earlier blocks, so the dense
    residual is read once per block (for `E ×_c V_new`) instead of four times. P_b = U_b^T E2 was
    computed for the whole chunk in one product. The block's change, +U_b Z_b - U_new Z_new, is
    appended to DU, DZ in two steps: its old part first, so that the residual with this block added
    back (what it is refitted to) is just the next longer prefix of the same low-rank sum.
    """
    U, K, V = blocks
    Ub, Vb = U[b], V[b]
    c_out, pc = E2.shape
    tb, p, g = K.shape[1:]
    c_in = pc // p
    DU[:, n:n + tb], DZ[n:n + tb] = Ub, Z[b]
    DU1, DZ1 = DU[:, :n + tb], DZ[:n + tb]
    E3, DZ3 = E2.view(c_out * p, c_in), DZ1.reshape(-1, c_in)
    # Seen through U_b, only the chunk's low-rank changes need adding to the chunk-start projection.
    Y1 = (P_b + (Ub.mT @ DU1) @ DZ1).reshape(tb * p, c_in)
    Un, Vn = Ub, Vb
    for sweep in range(sweeps):
        Vn = warm_subspace(Y1.mT, Vn)
        Y2 = _times_columns(E3, Vn).reshape(c_out, p * g) + DU1 @ (DZ3 @ Vn).reshape(-1, p * g)
        Un = warm_subspace(Y2, Un)
        if sweep + 1 < sweeps:
            Y1 = (Un.mT @ E2 + (Un.mT @ DU1) @ DZ1).reshape(tb * p, c_in)
    Kn = (Un.mT @ Y2).reshape(tb, p, g)
    Zn = (Kn.reshape(tb * p, g) @ Vn.mT).reshape(tb, pc)
    DU[:, n + tb:n + 2 * tb] = Un
    torch.neg(Zn, out=DZ[n + tb:n + 2 * tb])
    U[b], K[b], V[b], Z[b] = Un, Kn, Vn, Zn


def chunk_size(tb):
    """Blocks refitted between dense residual updates: about 64 columns of U per chunk.

    Small blocks make every per-block product with the dense residual a memory-bound
    matrix-vector product; delaying the residual update over a chunk replaces three of the four
    per-block passes over it by one matrix product per chunk.
    """
    return max(1, 64 // tb)


def _polar(M):
    """The orthogonal polar factor of each matrix in a batch (nearest orthogonal matrix)."""
    P, _, Rh = torch.linalg.svd(M)
    return P @ Rh


def _extrapolate(prev, blocks, step):
    """Blocks moved `step` times further along the last pass's change, back in Tucker-2 form.

    eigh returns each block's bases up to a rotation, so the new bases are first rotated
    (orthogonal Procrustes) onto the previous pass's before the factors are extrapolated.
    """
    Qu = _polar(blocks.U.mT @ prev.U)
    Qv = _polar(blocks.V.mT @ prev.V)
    U, V = blocks.U @ Qu, blocks.V @ Qv
    K = torch.einsum("bts,btpg,bgh->bsph", Qu, blocks.K, Qv)
    Ut, Ru = torch.linalg.qr(U + step * (U - prev.U))
    Vt, Rv = torch.linalg.qr(V + step * (V - prev.V))
    Kt = K + step * (K - prev.K)
    return Blocks(Ut, torch.einsum("bst,btpg,bhg->bsph", Ru, Kt, Rv), Vt)


def hooi(W3, blocks, tol, max_iter):
    """PCI for a single block, which is plain HOOI of the weight; returns (blocks, rel_error, iterations).

    With one block the residual of the others is the weight itself, so a pass is one HOOI sweep
    (exact eigendecompositions) with none of the residual bookkeeping or extrapolation that the
    many-block iteration needs; the per-call overhead of those dominated small single-block layers.
    Same stopping rule as `pci`.
    """
    c_out, p, c_in = W3.shape
    tb, g = blocks.U.shape[-1], blocks.V.shape[-1]
    U = blocks.U[0]
    W2, Wc = W3.reshape(c_out, p * c_in), W3.reshape(c_out * p, c_in)
    norm_w = torch.linalg.vector_norm(W3)
    last, it = math.inf, 0
    for it in range(1, max_iter + 1):
        V = top_subspace((U.mT @ W2).reshape(tb * p, c_in).mT, g)
        Y2 = (Wc @ V).reshape(c_out, p * g)
        U = top_subspace(Y2, tb)
        K = U.mT @ Y2
        err = (torch.linalg.vector_norm(W2 - U @ (K.reshape(tb * p, g) @ V.mT).reshape(tb, p * c_in))
               / norm_w).item()
        if abs(last - err) <= tol:
            break
        last = err
    return Blocks(U[None], K.reshape(1, tb, p, g), V[None]), err, it


def _residual(W2, U, Z):
    """The dense residual `W2 - Σ_b U_b Z_b` as `(C_out, p*C_in)`, from bases U and block products Z."""
    return W2 - _sum_blocks(U, Z)


def _rel_norm(E, norm_w):
    """‖E‖ / norm_w as a float: row norms in E's dtype, combined in float64.

    A row's float32 rounding is far below the stopping rule's tolerance, and `vector_norm(E,
    dtype=float64)` would first copy all of E to float64 (bench/RESULTS.md, "Notes").
    """
    rows = torch.linalg.vector_norm(E.reshape(E.shape[0], -1), dim=1)
    return (torch.linalg.vector_norm(rows, dtype=torch.float64) / norm_w).item()


def pci(W3, blocks, tol, max_iter, sweeps=1, chunk=None, extrapolate=True, dtype=None, refresh=10):
    """Principal component iteration from `blocks`; returns (blocks, rel_error, iterations).

    Gauss-Seidel over blocks: each block in turn is refitted to the residual of all the others
    (exactly; the dense residual is brought up to date once per `chunk` blocks, the blocks in
    between see it corrected by their predecessors' low-rank changes). PCI creeps through long
    flat stretches, where the stopping rule would end it early; with `extrapolate`, after each
    pass the change over that pass is extrapolated (factor (it+1)^(1/3), as in ALS line search)
    and kept when it lowers the error.
    `dtype` is the working precision of the iteration (default W3's). In float32 the passes
    over the dense residual move half the bytes, and MKL's float64 products with a few columns
    were measured several times slower (bench/RESULTS.md, "Notes"); the incrementally updated residual is recomputed from the weight every `refresh` passes so that
    rounding does not accumulate, errors are summed in float64, and the final error is computed
    exactly in W3's precision from the returned (float64) factors.
    Stops when the relative error changes by at most `tol` over one pass, or after `max_iter` passes.
    A single block goes to `hooi`.
    """
    c_out, p, c_in = W3.shape
    nb, _, tb = blocks.U.shape
    if nb == 1:
        return hooi(W3, blocks, tol, max_iter)
    exact_dtype = W3.dtype
    dtype = dtype or exact_dtype
    chunk = chunk or chunk_size(tb)
    norm_w = torch.linalg.vector_norm(W3).item()
    W2 = W3.reshape(c_out, p * c_in).to(dtype)
    blocks = Blocks(*(t.to(dtype) for t in blocks))
    Z = block_products(blocks)
    E2 = _residual(W2, blocks.U, Z)
    DU = E2.new_empty(c_out, 2 * chunk * tb)
    DZ = E2.new_empty(2 * chunk * tb, p * c_in)
    last, it, prev = math.inf, 0, None
    for it in range(1, max_iter + 1):
        if extrapolate:
            prev = Blocks(*(t.clone() for t in blocks))
        for b0 in range(0, nb, chunk):
            b1 = min(nb, b0 + chunk)
            P = (blocks.U[b0:b1].permute(0, 2, 1).reshape(-1, c_out) @ E2).reshape(b1 - b0, tb, -1)
            for b in range(b0, b1):
                _update_block(E2, DU, DZ, 2 * (b - b0) * tb, P[b - b0], blocks, Z, b, sweeps)
            n = 2 * (b1 - b0) * tb
            E2.addmm_(DU[:, :n], DZ[:n])
        if dtype != exact_dtype and it % refresh == 0:
            E2 = _residual(W2, blocks.U, block_products(blocks))
        err = _rel_norm(E2, norm_w)
        if extrapolate and it > 1:
            trial = _extrapolate(prev, blocks, (it + 1) ** (1 / 3))
            Z_trial = block_products(trial)
            E_trial = _residual(W2, trial.U, Z_trial)
            trial_err = _rel_norm(E_trial, norm_w)
            if trial_err < err:
                blocks, Z, E2, err = trial, Z_trial, E_trial, trial_err
        if abs(last - err) <= tol:
            break
        last = err
    # Back in W3's precision with bases orthonormal to that precision (an exact re-expression),
    # and the final error from an exact reconstruction, not the incrementally updated residual.
    blocks = Blocks(*(t.to(exact_dtype) for t in blocks))
    if dtype != exact_dtype:
        blocks = merge(blocks, 1)
    err = _rel_norm(W3 - reconstruct(blocks), norm_w)
    return blocks, err, it


def _core_gram_apply(B, Gc4, Ga4):
    """The normal-equation operator of the cores: block (b) of Gc · Bbd · Ga for every spatial p."""
    Z = torch.einsum("xuph,xhbg->xubpg", B, Ga4)
    return torch.einsum("btxu,xubpg->btpg", Gc4, Z)


def _ridge(M):
    """M plus a relative ridge, so degenerate blocks (all-zero cores) keep the solves defined."""
    scale = torch.diagonal(M).mean().clamp_min(torch.finfo(M.dtype).tiny)
    return M + 1e-12 * scale * torch.eye(M.shape[0], dtype=M.dtype, device=M.device)


def _ridge_batched(M):
    """`_ridge` for a batch of square matrices."""
    scale = torch.diagonal(M, dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(M.dtype).tiny)
    return M + 1e-12 * scale[:, None, None] * torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)


class _ALSState(NamedTuple):
    A: torch.Tensor   # (S, C_in)
    B: torch.Tensor   # (nb, tb, p, G)
    C: torch.Tensor   # (C_out, T)


def _als_error(Wc, norm2, s, nb, tb, G, PA=None):
    """Relative error of the factors s from Gram matrices; PA = W ×_c A (computed if not given)."""
    c_out = s.C.shape[0]
    p = s.B.shape[2]
    if PA is None:
        PA = (Wc @ s.A.mT).reshape(c_out, p, nb, G)
    rhs = torch.einsum("obt,opbg->btpg", s.C.reshape(c_out, nb, tb), PA)
    model2 = (s.B * _core_gram_apply(s.B, (s.C.mT @ s.C).reshape(nb, tb, nb, tb),
                                     (s.A @ s.A.mT).reshape(nb, G, nb, G))).sum()
    return (torch.clamp(norm2 - 2 * (rhs * s.B).sum() + model2, min=0) / norm2).sqrt().item()


def _als_step(W2, Wc, s, nb, tb, G, cg_iter):
    """One pass of exact least-squares updates of A, then C, then the block-diagonal cores (PCG).

    Returns the new factors and W ×_c A for them (reused by the error computation).
    """
    c_out, T = s.C.shape
    S, c_in = s.A.shape
    p = s.B.shape[2]
    B = s.B
    # A: W ≈ (C·B) ×_s A; normal equations with the S×S Gram Σ_p B_pᵀ (CᵀC) B_p.
    Gc4 = (s.C.mT @ s.C).reshape(nb, tb, nb, tb)
    QC = (s.C.mT @ W2).reshape(nb, tb, p, c_in)
    rhs_a = torch.einsum("btpg,btpc->bgc", B, QC).reshape(S, c_in)
    gram_a = torch.einsum("btpg,btxph->bgxh", B, torch.einsum("btxu,xuph->btxph", Gc4, B)).reshape(S, S)
    A = torch.linalg.solve(_ridge(gram_a), rhs_a)
    # C: W ≈ C ×_t (B·A); the T×T Gram is Σ_p B_p (AAᵀ) B_pᵀ.
    PA = (Wc @ A.mT).reshape(c_out, p, nb, G)
    Ga4 = (A @ A.mT).reshape(nb, G, nb, G)
    rhs_c = torch.einsum("opbg,btpg->obt", PA, B).reshape(c_out, T)
    gram_c = torch.einsum("btpg,xubpg->btxu", B, torch.einsum("xuph,xhbg->xubpg", B, Ga4)).reshape(T, T)
    C = torch.linalg.solve(_ridge(gram_c), rhs_c.mT).mT
    # Cores: block-diagonal least squares, solved by CG preconditioned with each block's own
    # Kronecker factor (exact when the blocks' bases are mutually orthogonal), warm-started.
    Gc4 = (C.mT @ C).reshape(nb, tb, nb, tb)
    rhs_b = torch.einsum("obt,opbg->btpg", C.reshape(c_out, nb, tb), PA)
    inv_c = torch.linalg.inv(_ridge_batched(torch.diagonal(Gc4, dim1=0, dim2=2).permute(2, 0, 1)))
    inv_a = torch.linalg.inv(_ridge_batched(torch.diagonal(Ga4, dim1=0, dim2=2).permute(2, 0, 1)))

    def precondition(R):
        return torch.einsum("btu,bupg,bgh->btph", inv_c, R, inv_a)

    r = rhs_b - _core_gram_apply(B, Gc4, Ga4)
    z = precondition(r)
    d, rz, r0 = z, (r * z).sum(), torch.linalg.vector_norm(rhs_b)
    for _ in range(cg_iter):
        if torch.linalg.vector_norm(r) <= 1e-12 * r0:
            break
        Ld = _core_gram_apply(d, Gc4, Ga4)
        alpha = rz / (d * Ld).sum()
        B = B + alpha * d
        r = r - alpha * Ld
        z = precondition(r)
        rz_next = (r * z).sum()
        d, rz = z + (rz_next / rz) * d, rz_next
    return _ALSState(A, B, C), PA


def als(W3, blocks, tol, max_iter, cg_iter=25):
    """Alternating least squares on all blocks at once, with extrapolation; returns (blocks, rel_error, iterations).

    Each pass solves exactly for A (all blocks), C (all blocks) and the block-diagonal cores; the
    dense weight is touched by two matrix products per pass, whatever the number of blocks, which
    is what makes many small blocks cheap. After each pass the step from the previous pass is
    extrapolated (factor (it+1)^(1/3)) and kept when it lowers the error. Same stopping rule as `pci`.
    """
    c_out, p, c_in = W3.shape
    U, K, V = blocks
    nb, _, tb = U.shape
    G = K.shape[-1]
    W2, Wc = W3.reshape(c_out, p * c_in), W3.reshape(c_out * p, c_in)
    norm2 = (W3 * W3).sum()
    s = _ALSState(V.mT.reshape(nb * G, c_in), K, U.permute(1, 0, 2).reshape(c_out, nb * tb))
    last, prev, it = math.inf, None, 0
    for it in range(1, max_iter + 1):
        s, PA = _als_step(W2, Wc, s, nb, tb, G, cg_iter)
        err = _als_error(Wc, norm2, s, nb, tb, G, PA)
        if prev is not None:
            step = (it + 1) ** (1 / 3)
            trial = _ALSState(*(old + step * (new - old) for old, new in zip(prev, s)))
            trial_err = _als_error(Wc, norm2, trial, nb, tb, G)
            if trial_err < err:
                s, err = trial, trial_err
        prev = s
        if abs(last - err) <= tol:
            break
        last = err
    # Back to per-block Tucker-2 form (orthonormal bases), exactly.
    Qu, Ru = torch.linalg.qr(s.C.reshape(c_out, nb, tb).permute(1, 0, 2))
    Qv, Rv = torch.linalg.qr(s.A.reshape(nb, G, c_in).mT)
    blocks = Blocks(Qu, torch.einsum("bst,btpg,bhg->bsph", Ru, s.B, Rv), Qv)
    err = (torch.linalg.vector_norm(W3 - reconstruct(blocks)) / torch.linalg.vector_norm(W3)).item()
    return blocks, err, it
