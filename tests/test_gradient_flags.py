"""The validity check of every step: the 2-norm fast path gives the flags max|g| gives."""

import math

import pytest
import torch

from ds_lowrank.linalg import gradient_flags


def exact(grads, limits):
    """The definition: over = max|g| past the limit or not finite; nonzero = max|g| > 0."""
    over, nonzero = [], []
    for g, lim in zip(grads, limits):
        if not g.numel():
            over.append(False), nonzero.append(True)
            continue
        amax = torch.linalg.vector_norm(g.float(), math.inf).item()
        over.append(not amax <= lim)
        nonzero.append(amax > 0)
    return over, nonzero


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_flags_equal_the_largest_magnitude_rule(dtype):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, 32, generator=gen)
    grads = [base, torch.zeros(5, 5), base * 1e20, torch.empty(0, 4), base.clone(), base.clone(),
             torch.full((100, 100), 1.0), base.clone()]
    grads[4][3, 3] = float("nan")
    grads[5][0, 1] = -float("inf")
    grads[7][2, 2] = -7.0           # the largest entry is negative
    grads = [g.to(dtype) for g in grads]
    amax = [torch.linalg.vector_norm(g.float(), math.inf).item() if g.numel() else 0.0 for g in grads]
    norm = [torch.linalg.vector_norm(g.float()).item() if g.numel() else 0.0 for g in grads]
    # limits chosen around both bounds: within the 2-norm (fast path), between max|g| and the
    # 2-norm (the exact fallback must still let it step), and just below max|g| (refused)
    for limits in ([1e30] * len(grads),
                   [(a + n) / 2 if a < n else 2 * n + 1 for a, n in zip(amax, norm)],
                   [a * (1 - 1e-3) if a else 1.0 for a in amax],
                   [a for a in amax]):
        assert gradient_flags(grads, limits) == exact(grads, limits), limits
    over, nonzero = gradient_flags(grads, [1e30] * len(grads))
    assert over == [False, False, False, False, True, True, False, False]
    assert nonzero == [True, False, True, True, False, True, True, True]
