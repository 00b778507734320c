"""Dominant singular subspaces of a batch of matrices: exact (the package's one SVD) and
randomized (the one range finder, which Adapprox's factorizations use too)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..distributed.reducer import LOCAL, Reducer, Steps
from ..utils.seeding import held_normal
from .orthonormalize import orthonormalize


def top_singular_vectors(G: torch.Tensor, rank: int, right: bool = False) -> torch.Tensor:
    """The top-``rank`` singular vectors of each matrix of ``G`` ``(k, m, n)`` by full SVD: the
    left ones ``(k, m, rank)``, or the right ones ``(k, n, rank)``; the package's one SVD.

    The signs are LAPACK's for ``G`` as given, and they differ for ``Gᵀ``: where they matter
    (GaLore does not rotate its moments at a refresh, so a basis vector whose sign flips
    reverses its stale moment coordinate) take the SVD of the matrix as laid out."""
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    return Vh[..., :rank, :].mT if right else U[..., :rank]


def exact_top_subspace(A: torch.Tensor, rank: int, reduce: Reducer = LOCAL,
                       transposed: bool = False) -> Steps[torch.Tensor]:
    """The top-``rank`` left singular vectors of each matrix of ``A`` ``(k, d, c)``, by full SVD.

    Exact but costly (the reference's first step spends ~40 s here on a 1B model), and it does
    not decompose over rows: split matrices are gathered whole, and each holder keeps its rows.
    With ``transposed`` (``A`` is the transpose of the matrix as laid out) the SVD is taken of
    ``Aᵀ`` and its right singular vectors returned: the same subspace, with the layout's signs
    (see ``top_singular_vectors``).
    """
    whole = yield from reduce.whole(A)
    U = top_singular_vectors(whole.mT, rank, right=True) if transposed else top_singular_vectors(whole, rank)
    return reduce.rows_held(U, A.shape[-2]).contiguous()


def range_finder(A: torch.Tensor, width: int, seeds: Sequence[int], power_iters: int,
                 reduce: Reducer = LOCAL) -> Steps[torch.Tensor]:
    """An orthonormal ``(k, d, width)`` basis whose span holds the dominant directions of each
    matrix of ``A`` ``(k, d, c)``, by randomized subspace iteration (Halko, Martinsson & Tropp 2011).

    A Gaussian sketch ``A·Ω`` (``Ω`` is ``c × width``, seeded per matrix by ``seeds`` and drawn
    by held rows, so every holder of a matrix, and a resumed run, draws what one process would
    draw), then ``power_iters`` rounds of ``Q ← orth(A·(Aᵀ·Q))``."""
    omega = held_normal(reduce, "free", seeds, A.shape[-1], width, A.device, A.dtype)
    Q = yield from orthonormalize((yield from reduce.free_axis(A @ omega)), reduce, seeds)
    for _ in range(power_iters):
        Z = yield from reduce.basis_axis(A.mT @ Q)
        Q = yield from orthonormalize((yield from reduce.free_axis(A @ Z)), reduce, seeds)
    return Q


def randomized_top_subspace(
    A: torch.Tensor,
    rank: int,
    seeds: Sequence[int],
    oversample: int = 8,
    power_iters: int = 2,
    reduce: Reducer = LOCAL,
) -> Steps[torch.Tensor]:
    """An orthonormal ``(k, d, rank)`` basis close to the top-``rank`` left singular subspace.

    ``range_finder`` at ``rank + oversample`` columns, then a Rayleigh–Ritz truncation, so the
    ``oversample`` extra columns sharpen the estimate instead of being discarded.
    """
    full_d = reduce.held("basis", 0, A.shape[-2])[2]     # A holds only this rank's share of split rows
    width = max(rank, min(rank + oversample, full_d))
    Q = yield from range_finder(A, width, seeds, power_iters, reduce)
    # Rayleigh–Ritz: the best rank-``rank`` subspace inside span(Q).
    B = yield from reduce.basis_axis(Q.mT @ A)
    H = (yield from reduce.free_axis(B @ B.mT)).double()
    _, vecs = torch.linalg.eigh(H)
    top = vecs[..., -rank:].flip(-1).to(A.dtype)
    return Q @ top
