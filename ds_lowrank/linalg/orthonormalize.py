"""Orthonormal bases by Cholesky-QR.

Householder QR of a tall ``d × r`` block is slow on GPUs and does not decompose over rows.
Cholesky-QR needs only the ``r × r`` Gram matrix ``YᵀY`` (one reduction over the rows a rank
holds) and a triangular solve, so it is both faster and distributable.  Its weakness is
conditioning: the Gram matrix squares ``κ(Y)``.  The power iteration's output routinely has
``κ`` of 1e4–1e6, beyond what a float32 Gram matrix can carry, so the first pass forms the
Gram matrix in float64 (good to ``κ ≈ 1e7``) and a second pass restores orthogonality to
working precision (CholeskyQR2).

A block that is numerically rank-deficient (a gradient of rank below ``r``: dead units, few
tokens) has no usable Cholesky factor: it fails, or succeeds on rounding noise and turns the
noise into basis columns.  Such a block takes ``_complete``: an orthonormal basis of the span
the block does determine, then seeded random columns made orthogonal to that span.  The
completion must be orthogonal to the *whole* determined span, not merely independent of it:
Adam normalizes each basis coordinate on its own, so a completion column holding a sliver of
the gradient would take a full-size step along its arbitrary direction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..distributed.reducer import LOCAL, Reducer
from ..utils.seeding import held_normal, stable_seed

# A column whose squared distance from the span of the columns before it is below this
# fraction of its squared length is numerically dependent on them (sin² of the angle).  A
# float64 Gram matrix resolves angles down to about 1e-7 (κ ≈ 1e7); what lies below is rounding.
_DEPENDENT = 1e-13


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


def _cholesky_qr_pass(Y: torch.Tensor, reduce: Reducer) -> tuple[torch.Tensor, torch.Tensor]:
    """One Cholesky-QR pass on a batch ``(k, d, r)``; returns ``(Q, ok)`` with ``ok`` per matrix."""
    L_inv, _, ok = _inverse_factor(reduce.basis_axis(Y.mT @ Y))
    return Y @ L_inv.mT, ok


def _project_out(R: torch.Tensor, Q: torch.Tensor, reduce: Reducer) -> torch.Tensor:
    """``R`` less its components along the orthonormal columns of ``Q``, twice: once leaves what
    the rounding of the first projection put back ("twice is enough", Kahan–Parlett)."""
    for _ in range(2):
        R = R - Q @ reduce.basis_axis(Q.mT @ R)
    return R


def _complete(Y: torch.Tensor, gram: torch.Tensor, seeds: Sequence[int], reduce: Reducer) -> torch.Tensor:
    """Orthonormal columns for a numerically rank-deficient batch ``Y`` (float64) with Gram
    matrices ``gram`` (summed over every holder, so identical on each, and so is every decision
    below): first an orthonormal basis of the span ``Y`` determines, then seeded random columns
    orthogonal to it, drawn by global row so that every holder draws what one process draws.
    """
    if not bool(torch.isfinite(gram).all()):
        raise FloatingPointError("orthonormalize: the block is not finite")
    r = Y.shape[-1]
    # The determined span: eigenvectors of the column-scaled Gram matrix (scaling makes the
    # threshold an angle, as in the Cholesky check) whose eigenvalue is not rounding noise,
    # largest first.  Zero columns stay zero under the scaling and determine nothing.
    norm = gram.diagonal(dim1=-2, dim2=-1).sqrt()
    norm = torch.where(norm > 0, norm, torch.ones_like(norm))
    evals, vecs = torch.linalg.eigh(gram / (norm[:, :, None] * norm[:, None, :]))
    evals, vecs = evals.flip(-1), vecs.flip(-1)
    kept = evals > _DEPENDENT * evals[:, :1].clamp(min=0)                 # (k, r), a prefix
    scale = torch.where(kept, evals, torch.ones_like(evals)).rsqrt() * kept
    P = Y @ (vecs / norm[:, :, None] * scale[:, None, :])                # zero past the kept ones
    # Re-orthonormalize the kept columns (the first pass carries the Gram matrix's rounding);
    # the identity stands in for the empty ones.
    fill = torch.diag_embed((~kept).to(Y.dtype))
    L_inv, _, _ = _inverse_factor(reduce.basis_axis(P.mT @ P) + fill)
    P = P @ L_inv.mT
    # The completion: random columns where nothing was kept, off the kept span, orthonormalized.
    seeds = [stable_seed("orthonormalize.complete", s) for s in seeds]
    R = held_normal(reduce, "basis", seeds, Y.shape[-2], r, Y.device, Y.dtype) * (~kept)[:, None, :]
    R = _project_out(R, P, reduce)
    L_inv, _, ok = _inverse_factor(reduce.basis_axis(R.mT @ R) + torch.diag_embed(kept.to(Y.dtype)))
    if not bool(ok.all()):
        raise FloatingPointError("orthonormalize: the random completion of a rank-deficient block failed")
    return P + R @ L_inv.mT


def _well_conditioned(gram: torch.Tensor, L: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Per matrix: the factor exists and no column is numerically dependent on those before it
    (``L_jj²`` is column ``j``'s squared distance from the span of the columns before it)."""
    dist = L.diagonal(dim1=-2, dim2=-1).square()
    return ok & (dist > _DEPENDENT * gram.diagonal(dim1=-2, dim2=-1)).all(-1)


def orthonormalize(
    Y: torch.Tensor,
    reduce: Reducer = LOCAL,
    seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """Orthonormal columns spanning ``Y``'s, for a batch ``Y`` of shape ``(k, d, r)``.

    A full-rank block is Cholesky-QR2 of ``Y``: column ``j`` of the result spans what column
    ``j`` of ``Y`` adds to the columns before it.  A rank-deficient one is completed (see the
    module docstring); ``seeds`` (one per matrix) seed its completion.  Returns a tensor of
    ``Y``'s dtype whose columns are orthonormal to working precision.
    """
    dtype = Y.dtype
    Y64 = Y.double()
    gram = reduce.basis_axis(Y64.mT @ Y64)
    L_inv, L, ok = _inverse_factor(gram)
    good = _well_conditioned(gram, L, ok)
    if bool(good.all()):
        Q = Y64 @ L_inv.mT
    else:
        if seeds is None:
            seeds = range(Y.shape[0])
        Q = torch.where(good[:, None, None], Y64 @ L_inv.mT, _complete(Y64, gram, list(seeds), reduce))
    Q, ok = _cholesky_qr_pass(Q, reduce)
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
