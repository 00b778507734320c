"""Orthonormal bases by Cholesky-QR.

Householder QR of a tall ``d × r`` block is slow on GPUs and does not decompose over rows.
Cholesky-QR needs only the ``r × r`` Gram matrix ``YᵀY`` (one reduction over the rows a rank
holds) and a triangular solve, so it is both faster and distributable.  Its weakness is
conditioning: the Gram matrix squares ``κ(Y)``.  The power iteration's output routinely has
``κ`` of 1e4–1e6, beyond what a float32 Gram matrix can carry, so the first pass forms the
Gram matrix in float64 (good to ``κ ≈ 1e7``) and a second pass restores orthogonality to
working precision (CholeskyQR2).  A float32 block conditioned well enough for the first pass
alone to reach float32 precision (a warm basis usually is) skips the second.

A block that is numerically rank-deficient (a gradient of rank below ``r``: dead units, few
tokens) has no usable Cholesky factor: it fails, or succeeds on rounding noise and turns the
noise into basis columns.  Such a block takes ``_complete``: the columns that determine its
span are orthonormalized in place, and the others are replaced by seeded random columns made
orthogonal to that span.  The completion must be orthogonal to the *whole* determined span, not
merely independent of it: Adam normalizes each basis coordinate on its own, so a completion
column holding a sliver of the gradient would take a full-size step along its arbitrary
direction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..distributed.reducer import LOCAL, Reducer, Steps
from ..utils.seeding import held_normal, stable_seed

# A column whose squared distance from the span of the columns before it is below this
# fraction of its squared length is numerically dependent on them (sin² of the angle).  A
# float64 Gram matrix resolves angles down to about 1e-7 (κ ≈ 1e7); what lies below is rounding.
_DEPENDENT = 1e-13
# A column (or the part of it off the columns before it) whose squared length is below this
# fraction of the block's largest column's is rounding residue, whatever its direction: scaled
# up to unit length it would be a basis column pointing anywhere (such as a basis column the
# gradient does not reach, times the sliver of gradient its rounding gives it).
_NEGLIGIBLE = 1e-20


def _inverse_factor(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L⁻¹, L, ok)`` for the Cholesky factor ``L`` of each Gram matrix; identity where it fails."""
    L, info = torch.linalg.cholesky_ex(gram)
    ok = info == 0
    # A failed factor is garbage; use the identity there so no NaN can leak out.
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
    L = torch.where(ok[:, None, None], L, eye)
    # Q = Y·L⁻ᵀ as a GEMM with the small inverse: batched triangular solves with a tall
    # right-hand side are many times slower on GPUs.
    return torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False), L, ok


def _cholesky_qr_pass(Y: torch.Tensor, reduce: Reducer) -> Steps[tuple[torch.Tensor, torch.Tensor]]:
    """One Cholesky-QR pass on a batch ``(k, d, r)``; returns ``(Q, ok)`` with ``ok`` per matrix."""
    L_inv, _, ok = _inverse_factor((yield from reduce.basis_axis(Y.mT @ Y)))
    return Y @ L_inv.mT, ok


def _project_out(R: torch.Tensor, Q: torch.Tensor, reduce: Reducer) -> Steps[torch.Tensor]:
    """``R`` less its components along the orthonormal columns of ``Q``, twice: once leaves what
    the rounding of the first projection put back ("twice is enough", Kahan–Parlett)."""
    for _ in range(2):
        R = R - Q @ (yield from reduce.basis_axis(Q.mT @ R))
    return R


def _dependent(gram: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Per column of a batch: numerically dependent on the columns before it, or negligible
    (``L_jj²`` is column ``j``'s squared distance from the span of the columns before it)."""
    dist = L.diagonal(dim1=-2, dim2=-1).square()
    sq = gram.diagonal(dim1=-2, dim2=-1)
    return (dist <= _DEPENDENT * sq) | (dist <= _NEGLIGIBLE * sq.amax(-1, keepdim=True))


def _lost_columns(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L⁻¹, lost)`` for Gram matrices of columns meant to be orthonormal: ``lost`` marks, per
    matrix, the first column at which the Cholesky factor fails or that is dependent on the
    columns before it (the factor is valid only up to there)."""
    L, info = torch.linalg.cholesky_ex(gram)
    r = gram.shape[-1]
    cols = torch.arange(r, device=gram.device)
    failed = torch.where(info > 0, info - 1, r)
    dependent = _dependent(gram, L) & (cols < failed[:, None])
    first = torch.minimum(failed, torch.where(dependent.any(-1), dependent.int().argmax(-1), r))
    L_inv, _, _ = _inverse_factor(gram)
    return L_inv, cols == first[:, None]


def _independent(gram: torch.Tensor) -> torch.Tensor:
    """``(k, r)``: the columns that determine each matrix's span, chosen in column order: a column
    is kept unless it is negligible or dependent on the kept columns before it.

    Each round factors the kept columns; those before the first one found wanting are sure, and
    every later column that depends on them is dropped with it (in exact arithmetic it depends on
    them whatever lies between), so the rounds number about the rank, not the columns dropped."""
    k, r = gram.shape[:2]
    sq = gram.diagonal(dim1=-2, dim2=-1)
    top = sq.amax(-1, keepdim=True)
    keep = sq > _NEGLIGIBLE * top
    cols = torch.arange(r, device=gram.device)

    def factor(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = mask.to(gram.dtype)
        return torch.linalg.cholesky_ex(gram * (m[:, :, None] * m[:, None, :]) + torch.diag_embed(1 - m))

    for _ in range(r):
        L, info = factor(keep)
        # a failed factor is valid only before its failing column
        failed = torch.where(info > 0, info - 1, r)
        bad = keep & _dependent(gram, L)
        first = torch.minimum(failed, torch.where(bad.any(-1), bad.int().argmax(-1), r))
        if bool((first == r).all()):
            return keep
        # the squared distance of every column from the span of the sure ones
        sure = keep & (cols < first[:, None])
        L, _ = factor(sure)
        coef = torch.linalg.solve_triangular(L, gram * sure.to(gram.dtype)[:, :, None], upper=False)
        dist = sq - coef.square().sum(-2)
        dropped = (dist <= _DEPENDENT * sq) | (dist <= _NEGLIGIBLE * top) | (cols == first[:, None])
        keep &= ~(dropped & (cols >= first[:, None]))
    return keep


def _complete(Y: torch.Tensor, gram: torch.Tensor, seeds: Sequence[int], reduce: Reducer) -> Steps[torch.Tensor]:
    """Orthonormal columns for a numerically rank-deficient batch ``Y`` (float64) with Gram
    matrices ``gram`` (summed over every holder, so identical on each, and so is every decision
    below).  The columns that determine the span (``_independent``) are orthonormalized in
    place, as Cholesky-QR does with all of them; the others are replaced by seeded random
    columns orthogonal to that span, drawn by global row so that every holder draws what one
    process draws.
    """
    if not bool(torch.isfinite(gram).all()):
        raise FloatingPointError("orthonormalize: the block is not finite")
    keep = _independent(gram)
    for _ in range(Y.shape[-1]):
        m = keep.to(Y.dtype)
        fill = torch.diag_embed(1 - m)
        L_inv, _, _ = _inverse_factor(gram * (m[:, :, None] * m[:, None, :]) + fill)
        P = (Y * m[:, None, :]) @ L_inv.mT            # zero where a column was dropped
        # Re-orthonormalize (the first pass carries the Gram matrix's rounding) before projecting.
        gram_P = (yield from reduce.basis_axis(P.mT @ P)) + fill
        L_inv, weak = _lost_columns(gram_P)
        # A column the Gram matrix's rounding let through (its distance from the kept ones
        # before it is rounding, magnified by an ill-conditioned block) comes out of the first
        # pass as noise: drop it and orthonormalize again, on every holder alike (gram_P is summed).
        weak &= keep
        if not bool(weak.any()):
            break
        keep &= ~weak
    m = keep.to(Y.dtype)
    fill, hole = torch.diag_embed(1 - m), torch.diag_embed(m)
    P = P @ L_inv.mT
    seeds = [stable_seed("orthonormalize.complete", s) for s in seeds]
    R = held_normal(reduce, "basis", seeds, Y.shape[-2], Y.shape[-1], Y.device, Y.dtype) * (1 - m)[:, None, :]
    R = yield from _project_out(R, P, reduce)
    L_inv, _, ok = _inverse_factor((yield from reduce.basis_axis(R.mT @ R)) + hole)
    if not bool(ok.all()):
        raise FloatingPointError("orthonormalize: the random completion of a rank-deficient block failed")
    return P + R @ L_inv.mT


def _one_pass_enough(gram: torch.Tensor, L_inv: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether one float64 Cholesky-QR pass already leaves every block of the batch orthonormal
    to ``dtype``'s precision, so the second pass would change nothing ``dtype`` can hold.

    One pass loses about ``u·κ²`` of orthogonality (``u`` float64's unit roundoff, ``κ`` the
    block's condition number).  ``κ²`` is bounded above, from what the pass computed, by
    ``‖G‖_∞·‖L⁻¹‖_F²`` (``λ_max(G) ≤ ‖G‖_∞``, ``1/λ_min(G) ≤ trace(G⁻¹)``), at most ``r``
    times too high.  A float64 result always takes the second pass; a float32 one skips it
    for blocks up to ``κ`` of about 1e3 (warm bases, whose columns were orthonormal a step
    ago, are usually far below)."""
    if dtype == torch.float64:
        return False
    kappa_sq = gram.abs().sum(-1).amax(-1) * L_inv.square().sum((-2, -1))
    return bool((kappa_sq * torch.finfo(torch.float64).eps <= torch.finfo(dtype).eps / 8).all())


def orthonormalize(
    Y: torch.Tensor,
    reduce: Reducer = LOCAL,
    seeds: Sequence[int] | None = None,
) -> Steps[torch.Tensor]:
    """Orthonormal columns spanning ``Y``'s, for a batch ``Y`` of shape ``(k, d, r)`` (a step:
    ``Q = yield from orthonormalize(Y, reduce)``; ``run_local(orthonormalize(Y))`` in one process).

    A full-rank block is Cholesky-QR2 of ``Y`` (one pass where it is enough for ``Y``'s dtype:
    ``_one_pass_enough``): column ``j`` of the result spans what column ``j`` of ``Y`` adds to
    the columns before it.  A rank-deficient one is completed (see the
    module docstring); ``seeds`` (one per matrix) seed its completion.  Returns a tensor of
    ``Y``'s dtype whose columns are orthonormal to working precision.
    """
    dtype = Y.dtype
    Y64 = Y.double()
    gram = yield from reduce.basis_axis(Y64.mT @ Y64)
    L_inv, L, ok = _inverse_factor(gram)
    good = ok & ~_dependent(gram, L).any(-1)
    if bool(good.all()):
        Q = Y64 @ L_inv.mT
        # gram is summed over every holder, so each takes the same branch
        if _one_pass_enough(gram, L_inv, dtype):
            return Q.to(dtype)
    else:
        if seeds is None:
            seeds = range(Y.shape[0])
        completed = yield from _complete(Y64, gram, list(seeds), reduce)
        Q = torch.where(good[:, None, None], Y64 @ L_inv.mT, completed)
    Q, ok = yield from _cholesky_qr_pass(Q, reduce)
    if not bool(ok.all()):
        raise FloatingPointError("orthonormalize: the second Cholesky-QR pass failed")
    return Q.to(dtype)


def add_product_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``out += alpha · a @ b`` in place, batched; ``out`` may be a transposed view.

    A right projection works on the transpose of a row-major buffer; writing through the
    transpose of the product keeps the big write coalesced instead of strided.
    """
    if out.mT.is_contiguous() and not out.is_contiguous():
        out.mT.baddbmm_(b.mT, a.mT, alpha=alpha)
    else:
        out.baddbmm_(a, b, alpha=alpha)
    return out
