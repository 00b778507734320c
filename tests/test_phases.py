"""Buckets run together share one collective per round (distributed.phases), in one thread; the
rounds are checked, so ranks that post different rounds raise instead of hanging (a real 2-rank
launch, tests/dist/rounds_worker.py)."""

import os

import pytest
import torch
import torch.distributed as dist

from ds_lowrank import Adapprox
from ds_lowrank.distributed import comm, phases
from ds_lowrank.distributed.phases import SplitRunner, run_together, sum_together
from ds_lowrank.distributed.reducer import LOCAL, done, run_local
from ds_lowrank.optim.matrix import Matrix
from helpers import torchrun

WORKER = os.path.join(os.path.dirname(__file__), "dist", "rounds_worker.py")


@pytest.fixture(scope="module")
def group():
    """A world of one over gloo: each all-reduce returns its input, and is still counted."""
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    if started:
        dist.destroy_process_group()


def bucket(sums, results, scale):
    """A bucket's steps, posting ``sums`` tensors of different sizes and dtypes."""
    out = []
    for i in range(sums):
        dtype = torch.float64 if i % 2 else torch.float32
        t = torch.full((i + 1, 2), scale * (i + 1), dtype=dtype)
        got = yield t
        assert got.dtype == dtype and got.shape == t.shape
        out.append(got.clone())
    results[scale] = out
    return scale


def test_each_round_is_one_collective_and_results_go_back_to_their_bucket(group):
    results = {}
    comm.SENT.clear()
    run_together([bucket(2, results, 1.0), bucket(5, results, 10.0), bucket(3, results, 100.0)], group)
    assert comm.SENT["reduce"] == 5                     # the longest bucket's sums, not 2 + 5 + 3
    # each post carries its tag, two pairs (t, t²), at the front of the round's buffer
    data = sum(2 * (i + 1) for n in (2, 5, 3) for i in range(n))
    assert comm.SENT["reduce_elements"] == data + 4 * (2 + 5 + 3)
    for scale, count in ((1.0, 2), (10.0, 5), (100.0, 3)):
        assert len(results[scale]) == count
        for i, t in enumerate(results[scale]):
            assert torch.equal(t, torch.full((i + 1, 2), scale * (i + 1), dtype=t.dtype))


def test_one_process_runs_the_same_steps_with_no_collective():
    def steps():
        a = yield from LOCAL.basis_axis(torch.ones(2))
        (b,) = yield from LOCAL.gather_free(torch.full((2,), 2.0))
        return a + b + (yield from done(torch.ones(2)))

    assert torch.equal(run_local(steps()), torch.full((2,), 4.0))
    with pytest.raises(RuntimeError, match=r"a sum over ranks \(a \(3,\) torch.float32 tensor\) was posted "
                                           r"to a one-process run"):
        run_local(x for x in [torch.ones(3)])


def test_a_failing_bucket_raises_and_the_others_are_closed(group):
    closed = []

    def waiting():
        try:
            for _ in range(4):
                yield torch.ones(2)
        finally:
            closed.append(True)

    def broken():
        yield torch.ones(2)
        raise FloatingPointError("bucket 1 failed")

    with pytest.raises(FloatingPointError, match="bucket 1 failed"):
        run_together([waiting(), broken()], group)
    assert closed == [True]


def test_a_post_that_is_not_a_tensor_is_refused(group):
    def wrong():
        yield 3.0

    with pytest.raises(TypeError, match="posted float, not a tensor.*yield from reduce.basis_axis"):
        run_together([wrong()], group)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("holders", [2, 3, 8, 1000])
def test_tags_agree_exactly_when_every_holder_posted_the_same(dtype, holders):
    """The verdict from (Σt, Σt²), summed in the round's dtype: true for equal tags however large,
    false when one holder differs by one, however the sums are ordered."""
    bits = phases._tag_bits(dtype, holders)
    if bits < 1:            # bfloat16's 8 digits leave no room over 1000 holders: no tags then
        assert dtype == torch.bfloat16 and holders == 1000
        return
    for t in (1, 2 ** bits - 1, 2 ** bits):
        for other in (t - 1, t + 1):
            if not 1 <= other <= 2 ** bits:
                continue
            for tags in ([t] * holders, [t] * (holders - 1) + [other], [other] + [t] * (holders - 1)):
                acc = torch.zeros(2, dtype=dtype)
                for v in tags:                                  # an all-reduce adds in some order
                    acc += torch.tensor([v, v * v], dtype=dtype)
                assert phases._agreed(acc.tolist(), holders) == (len(set(tags)) == 1), (t, other, tags)


def test_opt_in_size_check_is_one_more_collective_per_round(group, monkeypatch):
    monkeypatch.setenv(phases.CHECK_ROUNDS, "1")
    comm.SENT.clear()
    run_together([bucket(2, {}, 1.0), bucket(3, {}, 2.0)], group)
    assert comm.SENT["reduce"] == 3 and comm.SENT["check"] == 3 + 1       # and one after the last


def test_guidance_sums_at_once_through_a_split_reducer(group):
    """Adapprox's guidance hook cannot post, so its inner products are collectives of their own:
    a matrix "split" over a world of one steps as in one process."""
    seen = []

    def guidance(direction, update, inner):
        seen.append(inner(direction, update).flatten())
        return direction

    g = torch.randn(6, 8, dtype=torch.float64)
    runs = []
    for holders in ((), (0,)):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(6, 8, dtype=torch.float64))
        opt = Adapprox([("w", w)], lr=1e-2, rank_max=3, guidance=guidance)
        group_ = opt.param_groups[0]
        m = Matrix("w", w.data, g, opt.state[w], (6, 8), 0, holders, ((0, 0, 6),) if holders else ())
        comm.SENT.clear()
        runner = SplitRunner(lambda h: group)
        for _ in range(2):
            opt._matrix_step(group_, [m], runner)
        runs.append((w.detach().clone(), comm.SENT["reduce"]))
    (local, none_sent), (split, sent) = runs
    assert none_sent == 0 and sent > 0
    torch.testing.assert_close(split, local, rtol=1e-12, atol=1e-14)
    assert len(seen) == 4 and torch.equal(seen[0], seen[2])


def test_sum_together_keeps_each_dtype_and_sums_in_the_widest(group):
    a, b = torch.full((3,), 1.5, dtype=torch.float32), torch.full((2, 2), 2.5, dtype=torch.float64)
    (sa, sb), bad = sum_together([a, b], group, ["a", "b"])
    assert bad == [] and sa.dtype == torch.float32 and sb.dtype == torch.float64
    assert torch.equal(sa, a) and torch.equal(sb, b)


# -- ranks that post different rounds: a real launch -------------------------------------------

@pytest.fixture(scope="module")
def mismatches(tmp_path_factory):
    # a hang is a failure: the launch is killed and the test fails
    return torchrun(2, WORKER, tmp_path_factory.mktemp("rounds") / "result.json",
                    env={phases.CHECK_ROUNDS: None}, timeout=240)


def test_without_a_mismatch_two_ranks_equal_one_process_with_or_without_the_size_check(mismatches):
    r = mismatches["agree"]
    assert r["rel_err"] < 1e-5 and r["reduce"] > 0 and r["check"] == 0, r
    checked = mismatches["agree_checked"]
    assert checked["rel_err"] == r["rel_err"] and checked["reduce"] == r["reduce"], checked
    assert checked["check"] == r["reduce"] + r["runs"], checked       # a header per round, one per run


def test_another_phase_on_one_rank_raises_on_both_naming_the_matrix_and_the_line(mismatches):
    """Rank 1 posts an extra sum of the same size before warm_basis's first: the tags differ."""
    errors = mismatches["phase"]
    assert len(errors) == 2, errors
    for rank, message in enumerate(errors):
        assert message.startswith("RoundMismatch: the holders (ranks 0, 1) of a step's split matrices "
                                  "disagree at round"), message
        assert "matrix 'wide'" in message, message
        line = "rounds_worker.py" if rank == 1 else "warm_basis (ds_lowrank/optim/ldadam.py:"
        assert line in message, message
    # and both ranks go on: the next collective is summed as usual
    assert mismatches["after_phase"] == 2.0


def test_another_size_or_more_rounds_raise_with_the_opt_in_check(mismatches):
    for case in ("size", "rounds"):
        errors = mismatches[case]
        assert len(errors) == 2 and all(e.startswith("RoundMismatch: the holders (ranks 0, 1)") for e in errors), \
            (case, errors)
    assert all("disagree on the number of rounds" in e or "disagree at round" in e for e in mismatches["rounds"])
    assert any("finished after" in e for e in mismatches["rounds"]), mismatches["rounds"]
