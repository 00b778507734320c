"""Dominant singular subspaces of a batch of matrices (used to start a basis)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..distributed.reducer import LOCAL, Reducer
from ..utils.seeding import held_normal
from .orthonormalize import orthonormalize


def exact_top_subspace(A: torch.Tensor, rank: int, reduce: Reducer = LOCAL) -> torch.Tensor:
    """The top-``rank`` left singular vectors of each matrix of ``A`` ``(k, d, c)``, by full SVD.

    Exact but costly (the reference's first step spends ~40 s here on a 1B model), and it does
    not decompose over rows: split matrices are gathered whole, and each holder keeps its rows.
    """
    d = A.shape[-2]
    U, _, _ = torch.linalg.svd(reduce.whole(A), full_matrices=False)
    return reduce.rows_held(U[..., :rank], d).contiguous()


def randomized_top_subspace(
    A: torch.Tensor,
    rank: int,
    seeds: Sequence[int],
    oversample: int = 8,
    power_iters: int = 2,
    reduce: Reducer = LOCAL,
) -> torch.Tensor:
    """An orthonormal ``(k, d, rank)`` basis close to the top-``rank`` left singular subspace.

    Randomized subspace iteration (Halko, Martinsson & Tropp 2011) with a Rayleigh–Ritz
    truncation, so the ``oversample`` extra columns sharpen the estimate instead of being
    discarded.  Every sketch is seeded per matrix (``seeds``), so all holders of a matrix draw
    the same one and a resumed run draws what the uninterrupted run drew.
    """
    k, d, c = A.shape
    full_d = reduce.held("basis", 0, d)[2]     # d is only this rank's share when rows are split
    width = max(rank, min(rank + oversample, full_d))
    omega = held_normal(reduce, "free", seeds, c, width, A.device, A.dtype)
    Q = orthonormalize(reduce.free_axis(A @ omega), reduce, seeds)
    for _ in range(power_iters):
        Q = orthonormalize(reduce.free_axis(A @ reduce.basis_axis(A.mT @ Q)), reduce, seeds)
    # Rayleigh–Ritz: the best rank-``rank`` subspace inside span(Q).
    B = reduce.basis_axis(Q.mT @ A)
    H = reduce.free_axis(B @ B.mT).double()
    _, vecs = torch.linalg.eigh(H)
    top = vecs[..., -rank:].flip(-1).to(A.dtype)
    return Q @ top
