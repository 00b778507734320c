"""LDAdam's step on a matrix split between holders that keep its r × n state in blocks of
columns (``reducer.free_share``), against one process, in one process: each holder's step is
run with a ``SplitMatrixReducer``, in lock-step with the others, each sum answered with the total
of every holder's part.

The ZeRO launches (tests/test_zero.py) check the same through DeepSpeed; this checks the math
and the reducer alone, on both orientations, at 2 and 3 holders, with holders of few rows.
"""

import pytest
import torch

from ds_lowrank.distributed.comm import SplitMatrixReducer
from ds_lowrank.distributed.reducer import LOCAL, free_share, run_local
from ds_lowrank.linalg import randomized_top_subspace
from ds_lowrank.optim.ldadam import ldadam_update

B1, B2, RANK = 0.9, 0.99, 3


def run_holders(steps: list) -> list:
    """Each holder's steps, round by round: every holder posts its part and every one gets the
    total, added in holder order (the same bits on every holder, as an all-reduce gives).
    Returns their results."""
    answers, results = [None] * len(steps), [None] * len(steps)
    while True:
        posts = []
        for i, s in enumerate(steps):
            try:
                posts.append(s.send(answers[i]))
            except StopIteration as end:
                results[i] = end.value
                posts.append(None)
        if all(p is None for p in posts):
            return results
        assert all(p is not None for p in posts), "the holders posted different numbers of sums"
        total = posts[0].clone()
        for part in posts[1:]:
            total += part
        answers = [total.clone() for _ in steps]


def state(d: int, c: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(2, d, c, generator=gen, dtype=torch.float64)
    P = torch.linalg.qr(torch.randn(2, d, RANK, generator=gen, dtype=torch.float64))[0]
    M = torch.randn(2, RANK, c, generator=gen, dtype=torch.float64) * 0.1
    V = torch.rand(2, RANK, c, generator=gen, dtype=torch.float64) * 0.01 + 1e-4
    return A, P, M, V


def step(A, P, M, V, k, reduce):
    def first_basis(A0):
        return randomized_top_subspace(A0, RANK, [11, 12], 2, 1, reduce)
    return ldadam_update(A, P, M, V, [k, k], beta1=B1, beta2=B2, eps=1e-8, rho=0.5, error_feedback=True,
                         first_basis=first_basis, seeds=[11, 12], reduce=reduce)


def bounds(total: int, k: int) -> list[tuple[int, int]]:
    """``k`` consecutive spans of ``total`` rows, uneven (the first holder has one row)."""
    cuts = [0, 1] + [1 + (total - 1) * j // (k - 1) for j in range(1, k)]
    return [(cuts[j], cuts[j + 1] - cuts[j]) for j in range(k)]


@pytest.mark.parametrize("holders", [2, 3])
@pytest.mark.parametrize("basis_split", [True, False], ids=["rows-split", "columns-split"])
@pytest.mark.parametrize("k", [0, 3], ids=["first", "warm"])
def test_holders_keeping_blocks_equal_one_process(holders, basis_split, k):
    """``basis_split``: the basis axis ``d`` is cut (a left projection of a ZeRO piece), the
    moments are kept in blocks of ``c``; else the free axis ``c`` is cut (a right projection),
    the basis in blocks of ``d``."""
    d, c = 11, 7
    A, P, M, V = state(d, c, seed=holders + 10 * k)
    ref = [t.clone() for t in (A, P, M, V)]
    P_ref, N_ref = run_local(step(*ref, k, reduce=LOCAL))
    spans = bounds(d if basis_split else c, holders)

    def work(i):
        """Holder ``i``'s step (a generator) and what it is given and keeps."""
        first, count = spans[i]
        lo, hi = free_share(d if basis_split else c, c if basis_split else d, first, count)
        if basis_split:
            mine = (A[:, first:first + count], P[:, first:first + count], M[..., lo:hi], V[..., lo:hi])
            width = c
        else:
            mine = (A[..., first:first + count], P[:, lo:hi], M[..., first:first + count],
                    V[..., first:first + count])
            width = d
        mine = [t.clone() for t in mine]
        reduce = SplitMatrixReducer(basis_split, [(first, count, spans[-1][0] + spans[-1][1])] * 2,
                                    (lo, hi, width))
        return step(*mine, k, reduce), mine, (lo, hi)

    works = [work(i) for i in range(holders)]
    news = run_holders([steps for steps, _, _ in works])
    results = [(mine, P_new, N, blocks) for (_, mine, blocks), (P_new, N) in zip(works, news)]
    A_ref, P_state_ref, M_ref, V_ref = ref
    for i, ((A_i, P_i, M_i, V_i), P_new, N, (lo, hi)) in enumerate(results):
        first, count = spans[i]
        tol = dict(rtol=1e-9, atol=1e-11)
        if basis_split:
            torch.testing.assert_close(A_i, A_ref[:, first:first + count], **tol)      # error feedback
            torch.testing.assert_close(P_i, P_state_ref[:, first:first + count], **tol)
            torch.testing.assert_close(P_new, P_ref[:, first:first + count], **tol)
            torch.testing.assert_close(M_i, M_ref[..., lo:hi], **tol)
            torch.testing.assert_close(V_i, V_ref[..., lo:hi], **tol)
            torch.testing.assert_close(N, N_ref, **tol)
        else:
            torch.testing.assert_close(A_i, A_ref[..., first:first + count], **tol)
            torch.testing.assert_close(P_i, P_state_ref[:, lo:hi], **tol)
            torch.testing.assert_close(P_new, P_ref, **tol)
            torch.testing.assert_close(M_i, M_ref[..., first:first + count], **tol)
            torch.testing.assert_close(N, N_ref[..., first:first + count], **tol)
    # the blocks cover the axis once
    covered = sorted(blocks for *_, blocks in results)
    assert covered[0][0] == 0 and covered[-1][1] == (c if basis_split else d)
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))


def test_free_share_blocks_are_consecutive_and_cover_the_axis():
    for rows, width in ((13, 29), (29, 13), (7, 7), (4096, 768), (3, 1)):
        for k in (1, 2, 3, 5):
            spans = [(rows * j // k, rows * (j + 1) // k - rows * j // k) for j in range(k)]
            blocks = [free_share(rows, width, first, count) for first, count in spans]
            assert blocks[0][0] == 0 and blocks[-1][1] == width
            assert all(a[1] == b[0] and a[0] <= a[1] for a, b in zip(blocks, blocks[1:]))
