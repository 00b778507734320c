"""Orthonormal bases by Cholesky-QR.

Householder QR of a tall ``d × r`` block is slow on GPUs and does not decompose over rows.
Cholesky-QR needs only the ``r × r`` Gram matrix ``YᵀY`` (one reduction over the rows a rank
holds) and a triangular solve, so it is both faster and distributable.  Its weakness is
conditioning: the Gram matrix squares ``κ(Y)``.  The power iteration's output routinely has
``κ`` of 1e4–1e6, beyond what a float32 Gram matrix can carry, so the first pass forms the
Gram matrix in float64 (good to ``κ ≈ 1e7``) and a second pass restores orthogonality to
working precision (CholeskyQR2).

A block that is rank-deficient (a gradient of rank below ``r``) has no Cholesky factor at all.
Such blocks are completed with a small, deterministically seeded random component, which is
what Householder QR does implicitly: the directions the data does not determine are filled
with arbitrary orthonormal ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..distributed.reducer import LOCAL, Reducer
from ..utils.seeding import seeded_randn

# Relative size of the random completion added to a rank-deficient block.  Large enough to
# make the float64 Gram matrix factorizable, small enough to leave the determined directions
# essentially where they are.
_FILL = 1e-3


def _cholesky_qr_pass(Y: torch.Tensor, reduce: Reducer) -> tuple[torch.Tensor, torch.Tensor]:
    """One Cholesky-QR pass on a batch ``(k, d, r)``; returns ``(Q, ok)`` with ``ok`` per matrix."""
    gram = reduce.basis_axis(Y.mT @ Y)
    L, info = torch.linalg.cholesky_ex(gram)
    ok = info == 0
    # A failed factor is garbage; use the identity there so no NaN can leak out.
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
    L = torch.where(ok[:, None, None], L, eye)
    # Q = Y·L⁻ᵀ as a GEMM with the small inverse: batched triangular solves with a tall
    # right-hand side are many times slower on GPUs.
    L_inv = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)
    return Y @ L_inv.mT, ok


def _fill(Y: torch.Tensor, bad: torch.Tensor, seeds: Sequence[int], row_offset: int) -> torch.Tensor:
    """Add a seeded random completion to the matrices flagged in ``bad``."""
    Y = Y.clone()
    d, r = Y.shape[-2:]
    for i in bad.nonzero().flatten().tolist():
        # Draw whole-matrix rows and keep ours, so every holder of a row adds the same values.
        noise = seeded_randn((row_offset + d, r), seeds[i], Y.device, Y.dtype)[row_offset:]
        scale = Y[i].norm() / (d * r) ** 0.5
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        Y[i] += _FILL * scale * noise
    return Y


def orthonormalize(
    Y: torch.Tensor,
    reduce: Reducer = LOCAL,
    seeds: Sequence[int] | None = None,
    row_offset: int = 0,
) -> torch.Tensor:
    """Orthonormal columns spanning ``Y``'s, for a batch ``Y`` of shape ``(k, d, r)``.

    ``seeds`` (one per matrix) seed the completion of rank-deficient blocks; ``row_offset``
    is the index of this rank's first row when rows are split between ranks.  Returns a
    tensor of ``Y``'s dtype whose columns are orthonormal to working precision.
    """
    dtype = Y.dtype
    Y64 = Y.double()
    Q, ok = _cholesky_qr_pass(Y64, reduce)
    if not bool(ok.all()):
        if seeds is None:
            seeds = range(Y.shape[0])
        Q, ok = _cholesky_qr_pass(_fill(Y64, ~ok, seeds, row_offset), reduce)
        if not bool(ok.all()):
            raise FloatingPointError(
                "orthonormalize: a block could not be orthonormalized even after completion; "
                "its entries are probably not finite"
            )
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
