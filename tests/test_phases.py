"""Buckets run together share one collective per round (distributed.phases), in one process."""

import pytest
import torch
import torch.distributed as dist

from ds_lowrank.distributed import comm
from ds_lowrank.distributed.phases import run_together


@pytest.fixture(scope="module")
def group():
    """A world of one over gloo: each all-reduce returns its input, and is still counted."""
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    if started:
        dist.destroy_process_group()


def job(sums, results, scale):
    """A bucket asking for ``sums`` sums of tensors of different sizes and dtypes."""
    def run(sum_):
        out = []
        for i in range(sums):
            dtype = torch.float64 if i % 2 else torch.float32
            t = torch.full((i + 1, 2), scale * (i + 1), dtype=dtype)
            got = sum_(t)
            assert got.dtype == dtype and got.shape == t.shape
            out.append(got.clone())
        results[scale] = out
    return run


def test_each_round_is_one_collective_and_results_go_back_to_their_bucket(group):
    results = {}
    comm.SENT.clear()
    run_together([job(2, results, 1.0), job(5, results, 10.0), job(3, results, 100.0)], group,
                 torch.device("cpu"))
    assert comm.SENT["reduce"] == 5                     # the longest bucket's sums, not 2 + 5 + 3
    for scale, count in ((1.0, 2), (10.0, 5), (100.0, 3)):
        assert len(results[scale]) == count
        for i, t in enumerate(results[scale]):
            assert torch.equal(t, torch.full((i + 1, 2), scale * (i + 1), dtype=t.dtype))


def test_threads_run_without_autograd(group):
    w = torch.nn.Parameter(torch.ones(3))
    seen = []

    def update(sum_):
        seen.append(torch.is_grad_enabled())
        w.add_(sum_(torch.ones(3)))          # in place on a leaf that requires grad

    run_together([update, update], group, torch.device("cpu"))
    assert seen == [False, False] and torch.equal(w.detach(), torch.full((3,), 3.0))


def test_a_failing_bucket_raises_instead_of_hanging(group):
    def broken(sum_):
        sum_(torch.ones(2))
        raise FloatingPointError("bucket 1 failed")

    results = {}
    with pytest.raises(FloatingPointError, match="bucket 1 failed"):
        run_together([job(4, results, 1.0), broken], group, torch.device("cpu"))
