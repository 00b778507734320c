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
from ..utils.seeding import held_normal

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


def _fill(Y: torch.Tensor, bad: torch.Tensor, seeds: Sequence[int], reduce: Reducer) -> torch.Tensor:
    """Add a seeded random completion to the matrices flagged in ``bad``."""
    noise = held_normal(reduce, "basis", seeds, Y.shape[-2], Y.shape[-1], Y.device, Y.dtype)
    # Scale by the block's RMS, summed over every holder so all agree.
    sq = reduce.basis_axis(Y.square().sum(dim=(-2, -1), keepdim=True))
    full = torch.tensor([reduce.held("basis", i, Y.shape[-2])[2] for i in range(Y.shape[0])],
                        dtype=Y.dtype, device=Y.device).view(-1, 1, 1)
    scale = (sq / (full * Y.shape[-1])).sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(bad[:, None, None], Y + _FILL * scale * noise, Y)


def orthonormalize(
    Y: torch.Tensor,
    reduce: Reducer = LOCAL,
    seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """Orthonormal columns spanning ``Y``'s, for a batch ``Y`` of shape ``(k, d, r)``.

    ``seeds`` (one per matrix) seed the completion of rank-deficient blocks.  Returns a
    tensor of ``Y``'s dtype whose columns are orthonormal to working precision.
    """
    dtype = Y.dtype
    Y64 = Y.double()
    Q, ok = _cholesky_qr_pass(Y64, reduce)
    if not bool(ok.all()):
        if seeds is None:
            seeds = range(Y.shape[0])
        Q, ok = _cholesky_qr_pass(_fill(Y64, ~ok, list(seeds), reduce), reduce)
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
