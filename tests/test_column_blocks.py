"""LDAdam's and Adapprox's steps on a matrix split between holders that keep the state along
its columns (LDAdam's r × n moments or basis, Adapprox's n × K column factor) in blocks of
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
from ds_lowrank.optim.adapprox import adapprox_update, select_rank
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


def adapprox_step(G, Q, U, M, k, reduce):
    """Adapprox at width 4 (rank 3 + 1) on 11 × 7 matrices, re-evaluating the ranks when ``k``
    is even."""
    rule = (lambda errors, rank: select_rank(errors, rank, 1, 3, 0.05, 2, 1.0)) if k % 2 == 0 else None
    return adapprox_update(G, Q, U, M, [k, k], [2, 3], width=4, rank_rule=rule, seeds=[5, 6], power_iters=2,
                           beta1=B1, beta2=0.999, eps=1e-8, clip_threshold=1.0, bias_correction=False,
                           size=11 * 7, reduce=reduce)


@pytest.mark.parametrize("holders", [2, 3])
@pytest.mark.parametrize("k", [0, 3, 4], ids=["first", "warm", "evaluate"])
def test_adapprox_holders_keeping_column_factor_blocks_equal_one_process(holders, k):
    """Adapprox's basis axis is the weight's rows: the holders of rows keep the row factor and
    the first moment by rows and the column factor ``U`` (``c × K``) in blocks of its ``c``
    rows; each gets its block of the new ``U`` and its rows of everything else."""
    d, c = 11, 7
    gen = torch.Generator().manual_seed(holders + 10 * k)
    G = torch.randn(2, d, c, generator=gen, dtype=torch.float64)
    Q = torch.zeros(2, d, 3, dtype=torch.float64)
    U = torch.zeros(2, c, 3, dtype=torch.float64)
    if k:
        Q[..., :2] = torch.linalg.qr(torch.randn(2, d, 2, generator=gen, dtype=torch.float64))[0]
        U[..., :2] = torch.rand(2, c, 2, generator=gen, dtype=torch.float64)
    M = torch.randn(2, d, c, generator=gen, dtype=torch.float64) * 0.1
    Q_ref, U_ref, ranks_ref, M_ref, D_ref = run_local(adapprox_step(G, Q, U, M.clone(), k, LOCAL))
    spans = bounds(d, holders)

    def work(i):
        first, count = spans[i]
        lo, hi = free_share(d, c, first, count)
        reduce = SplitMatrixReducer(True, [(first, count, d)] * 2, (lo, hi, c))
        rows = slice(first, first + count)
        return adapprox_step(G[:, rows], Q[:, rows], U[:, lo:hi], M[:, rows].clone(), k, reduce), (lo, hi)

    works = [work(i) for i in range(holders)]
    results = list(zip(run_holders([steps for steps, _ in works]), [blocks for _, blocks in works]))
    tol = dict(rtol=1e-9, atol=1e-11)
    for i, ((Q_i, U_i, ranks_i, M_i, D_i), (lo, hi)) in enumerate(results):
        rows = slice(spans[i][0], spans[i][0] + spans[i][1])
        assert ranks_i == ranks_ref
        assert U_i.shape == (2, hi - lo, 4)
        torch.testing.assert_close(U_i, U_ref[:, lo:hi], **tol)
        torch.testing.assert_close(Q_i, Q_ref[:, rows], **tol)
        torch.testing.assert_close(M_i, M_ref[:, rows], **tol)
        torch.testing.assert_close(D_i, D_ref[:, rows], **tol)
    covered = sorted(blocks for _, blocks in results)
    assert covered[0][0] == 0 and covered[-1][1] == c
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))


def test_free_share_blocks_are_consecutive_and_cover_the_axis():
    for rows, width in ((13, 29), (29, 13), (7, 7), (4096, 768), (3, 1)):
        for k in (1, 2, 3, 5):
            spans = [(rows * j // k, rows * (j + 1) // k - rows * j // k) for j in range(k)]
            blocks = [free_share(rows, width, first, count) for first, count in spans]
            assert blocks[0][0] == 0 and blocks[-1][1] == width
            assert all(a[1] == b[0] and a[0] <= a[1] for a, b in zip(blocks, blocks[1:]))
