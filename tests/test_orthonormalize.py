"""Orthonormalization of rank-deficient blocks whose independent columns are ill-conditioned."""

import torch

from ds_lowrank.distributed.reducer import run_local
from ds_lowrank.linalg import orthonormalize


def test_rank_deficient_blocks_with_an_ill_conditioned_span_come_out_orthonormal():
    """Rank 4 in 16 columns, the fourth direction 1e-2 off the span of the first three: the
    Gram matrix's rounding, magnified by that conditioning, can make a dependent column look
    independent; it must be dropped and completed, not kept as noise (which failed the second
    Cholesky-QR pass for about 1 block in 30 of these)."""
    d, k, r = 48, 4, 16
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        B = torch.randn(d, k, generator=g, dtype=torch.float64)
        B[:, 3] = B[:, :3] @ torch.randn(3, generator=g, dtype=torch.float64) + 1e-2 * B[:, 3]
        B[k:] = 0
        Y = (B @ torch.randn(k, r, generator=g, dtype=torch.float64))[None]
        Q = run_local(orthonormalize(Y, seeds=[seed]))[0]
        torch.testing.assert_close(Q.mT @ Q, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-10)
        # the span of Y is that of its first k columns of Q (the completion is orthogonal to it)
        inside = Q[:, :k]
        torch.testing.assert_close(inside @ (inside.mT @ B), B, rtol=0, atol=1e-9)


def test_float32_blocks_take_the_second_pass_only_when_their_conditioning_needs_it(monkeypatch):
    """One float64 Cholesky-QR pass leaves a well-conditioned float32 block orthonormal to float32
    precision, so it skips the second; an ill-conditioned one (κ = 1e6, where one pass loses
    about 1e-4 of orthogonality) still takes it.  Either way the result is orthonormal and spans Y."""
    module = __import__("sys").modules["ds_lowrank.linalg.orthonormalize"]
    passes = []
    second = module._cholesky_qr_pass

    def counted(Y, reduce):
        passes.append(1)
        return (yield from second(Y, reduce))

    monkeypatch.setattr(module, "_cholesky_qr_pass", counted)
    g = torch.Generator().manual_seed(0)
    d, r = 96, 12
    for kappa, second_pass in ((1.0, False), (1e2, False), (1e6, True)):
        U, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
        W, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
        Y = (U * torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), r, dtype=torch.float64)) @ W
        passes.clear()
        Y32 = Y.float()
        Q = run_local(orthonormalize(Y32[None]))[0].double()
        assert bool(passes) == second_pass, kappa
        torch.testing.assert_close(Q.mT @ Q, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-6)
        # the span is that of the float32 block given (an exact basis of it, by float64 QR)
        exact, _ = torch.linalg.qr(Y32.double())
        torch.testing.assert_close(Q @ (Q.mT @ exact), exact, rtol=0, atol=1e-5)
