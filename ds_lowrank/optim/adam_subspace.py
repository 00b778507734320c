"""Adam's moments carried into a rank-r subspace, to start a projection optimizer (LDAdam,
GaLore) where an Adam run stopped.

This is LDAdam's projection-aware re-estimation (``algorithms.md`` §1(b) steps 4–6) with the
old basis being the identity, i.e. every coordinate.  For a ``d × c`` matrix (a right
projection is the same on the transposes), Adam's ``m``, ``v`` after ``k`` steps, and the
bias corrections ``b1 = 1-β1^k``, ``b2 = 1-β2^k``:

- ``P``: the top-``r`` left singular vectors of ``m``, the directions the momentum lives in;
- ``M = Pᵀ·m``: exact, ``P·M`` is ``m``'s projection;
- ``V = b2·|(Pᵀ⊙Pᵀ)·S + (M/b1)²|`` with ``S = v/b2 - (m/b1)²``, the per-coordinate variance:
  the second moment of the new coordinates if the old ones were independent (an estimate);
- ``m - P·M``: the momentum the subspace cannot hold, which LDAdam's error feedback keeps as
  ``β1/(1-β1)·(m - P·M)``, so that no momentum is lost (exact).

At full rank ``M`` carries all of ``m``; ``V`` is an estimate at every rank.
"""

from __future__ import annotations

import torch


def adam_to_subspace(m: torch.Tensor, v: torch.Tensor, step: int, rank: int, betas: tuple[float, float],
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(P, M, V, lost)`` for a ``d × c`` matrix's Adam moments ``m``, ``v`` after ``step``
    steps: the ``d × r`` basis, the ``r × c`` moments, and the ``d × c`` momentum outside."""
    if step < 1:
        raise ValueError(f"Adam's state has taken {step} steps; there is no momentum to carry over")
    m, v = m.to(torch.float64), v.to(torch.float64)
    b1, b2 = 1 - betas[0] ** step, 1 - betas[1] ** step
    U, _, _ = torch.linalg.svd(m, full_matrices=False)
    P = U[:, :rank]
    M = P.mT @ m
    S = v / b2 - (m / b1) ** 2
    V = b2 * ((P.mT ** 2) @ S + (M / b1) ** 2).abs()
    lost = m - P @ M
    return P.to(dtype), M.to(dtype), V.to(dtype), lost.to(dtype)


def subspace_to_adam(P: torch.Tensor, M: torch.Tensor, V: torch.Tensor, error: torch.Tensor | None, step: int,
                     betas: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's ``(m, v)`` for a ``d × c`` matrix from a projection optimizer's basis ``P`` (``d × r``),
    moments ``M``, ``V`` (``r × c``) and LDAdam's error feedback (``d × c`` or ``None``).

    The inverse of ``adam_to_subspace``: ``m = P·M + (1-β1)/β1·e`` (exact round trip), and
    ``v = b2·|(P⊙P)·S + (m/b1)²|`` with ``S = V/b2 - (M/b1)²``, whose ``(m/b1)²`` term uses the whole
    ``m`` so that no coordinate outside the subspace is left with momentum and no variance.
    """
    P, M, V = P.to(torch.float64), M.to(torch.float64), V.to(torch.float64)
    b1, b2 = 1 - betas[0] ** step, 1 - betas[1] ** step
    m = P @ M
    if error is not None:
        m = m + (1 - betas[0]) / betas[0] * error.to(torch.float64)
    S = V / b2 - (M / b1) ** 2
    v = b2 * ((P ** 2) @ S + (m / b1) ** 2).abs()
    return m.float(), v.float()
