"""Randomized low-rank factorizations ``A ≈ Q·Uᵀ`` that know their own error at every rank.

Adapprox keeps a matrix only as such factors and chooses their rank from the approximation
error.  Randomized subspace iteration gives an orthonormal ``Q`` (``d × w``) whose span holds
the dominant directions of ``A``; a Rayleigh–Ritz rotation inside that span orders its columns
by singular value, so the first ``j`` columns are the best rank-``j`` approximation available
in ``span(Q)`` for *every* ``j``, and the oversampling columns improve the leading ones
instead of being cut off.  With ``U = Aᵀ·Q``, any orthonormal prefix ``Q_j`` satisfies

    ‖A - Q_j·U_jᵀ‖_F² = ‖A‖_F² - ‖U_j‖_F²,

so the error of every prefix rank follows from ``‖A‖_F²`` and the column norms of ``U``
(the Ritz values), with no further pass over ``A``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..distributed.reducer import LOCAL, Reducer, Steps
from .subspace import range_finder


def matrix_inner(X: torch.Tensor, Y: torch.Tensor, reduce: Reducer = LOCAL,
                 dtype: torch.dtype | None = None) -> Steps[torch.Tensor]:
    """``⟨X, Y⟩_F`` of each matrix of a batch ``(k, d, c)``, summed over every holder: ``(k,)``.

    Row sums are partial over the columns a rank holds, their total over the rows it holds;
    ``dtype`` is the accumulation dtype (float64 where a difference of norms follows).
    """
    rows = yield from reduce.free_axis((X * Y).sum(-1, dtype=dtype))
    return (yield from reduce.basis_axis(rows.sum(-1)))


class Factorization(NamedTuple):
    """A batch of factorizations ``A ≈ Q·Uᵀ`` with their Ritz values.

    ``Q`` ``(k, d, w)``: orthonormal columns, by decreasing singular value.
    ``U`` ``(k, c, w)``: ``Aᵀ·Q``; column ``j`` has norm ``σ_j``.
    ``sq_singular`` ``(k, w)``, float64: ``σ_j²``.
    ``sq_norm`` ``(k,)``, float64: ``‖A‖_F²``.
    """

    Q: torch.Tensor
    U: torch.Tensor
    sq_singular: torch.Tensor
    sq_norm: torch.Tensor

    def prefix_errors(self) -> torch.Tensor:
        """``(k, w)`` float64: ``‖A - Q_j·U_jᵀ‖_F / ‖A‖_F`` for the first ``j = 1..w`` columns.

        A zero matrix has error 0 at every rank: there is nothing to approximate.
        """
        total = self.sq_norm[:, None]
        residual = (total - self.sq_singular.cumsum(-1)).clamp(min=0)
        safe = torch.where(total > 0, total, torch.ones_like(total))
        return torch.where(total > 0, (residual / safe).sqrt(), torch.zeros_like(residual))


def randomized_factorization(
    A: torch.Tensor,
    width: int,
    seeds: Sequence[int],
    power_iters: int = 5,
    reduce: Reducer = LOCAL,
) -> Steps[Factorization]:
    """Factor each matrix of ``A`` ``(k, d, c)`` at rank ``width`` by randomized subspace iteration.

    ``range_finder`` (a seeded Gaussian sketch and ``power_iters`` rounds of subspace iteration),
    then the Rayleigh–Ritz rotation described in the module docstring.
    ``width`` (target rank plus oversampling) is at most the smaller dimension.  Truncate by keeping
    the first columns of ``Q`` and ``U``; ``prefix_errors()`` tells what each truncation costs.
    A zero matrix gives zero factors.
    """
    k, d, c = A.shape
    limit = min(reduce.held("basis", 0, d)[2], reduce.held("free", 0, c)[2])
    if not 1 <= width <= limit:
        raise ValueError(f"randomized_factorization: width={width} must be in [1, {limit}], the "
                         f"smaller dimension of the matrices")
    Q = yield from range_finder(A, width, seeds, power_iters, reduce)
    # Rayleigh–Ritz: the eigenvectors of B·Bᵀ (B = Qᵀ·A) rotate Q onto A's singular directions
    # within span(Q); the eigenvalues are the σ_j², in float64 because errors are differences.
    # B = Qᵀ·A and ‖A‖_F² are sums over the same rows: one sum carries both, the norm as one
    # more column of B (a matrix split between holders pays one collective, not two).
    sq_rows = (yield from reduce.free_axis((A * A).sum(-1, dtype=torch.float64))).sum(-1)
    both = torch.cat([(Q.mT @ A).double(), torch.zeros_like(sq_rows)[:, None, None].expand(k, width, 1)], dim=-1)
    both[:, 0, c] = sq_rows
    both = yield from reduce.basis_axis(both)
    B, sq_norm = both[..., :c], both[:, 0, c]
    evals, vecs = torch.linalg.eigh((yield from reduce.free_axis(B @ B.mT)))
    sq_singular = evals.flip(-1).clamp(min=0)
    rotation = vecs.flip(-1)
    # The sign of each eigenvector is arbitrary, and rounding (one process summing in another
    # order than several holders) can flip it: fix it, largest entry positive, so that the
    # factors, not only Q·Uᵀ, are the same however the matrix is split.
    rotation = rotation * rotation.gather(-2, rotation.abs().argmax(-2, keepdim=True)).sign()
    Q = Q @ rotation.to(A.dtype)
    U = (B.mT @ rotation).to(A.dtype)
    # A zero matrix still gets an orthonormal Q from the rank-deficiency completion; it carries
    # nothing, so drop it rather than store an arbitrary basis.
    Q = torch.where((sq_norm > 0)[:, None, None], Q, torch.zeros_like(Q))
    return Factorization(Q, U, sq_singular, sq_norm)
