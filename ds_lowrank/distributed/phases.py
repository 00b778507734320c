"""Several buckets' math sharing one collective per phase.

An optimizer step works on buckets of same-shape matrices, and each bucket's math sums small
tensors over the ranks holding its matrices a few times (the phases of the algorithm).  Run
one after another, ``b`` buckets cost ``b`` times the collectives, and on a ZeRO-3 Llama every
matrix is split, so the latency of the collectives dominates.  Here the buckets held by the
same ranks run together, each in its own thread: round by round, every unfinished bucket posts
the tensor it wants summed (or finishes), and the main thread sums the whole round in one
all-reduce.  The math itself stays sequential and unaware of it.

The rounds line up across ranks because every holder runs the same buckets, in the same
order, with the same sequence of sums: sizes and branch decisions depend only on the global
shapes and on values that are already summed (hence identical on every holder).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from .comm import SplitMatrixReducer, all_reduce
from .reducer import LOCAL, free_share

Sum = Callable[[torch.Tensor], torch.Tensor]


def sum_together(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Sum each tensor over ``group`` with one all-reduce, in the widest dtype among them (a
    float32 sum carried in float64 is rounded once, at the end)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    all_reduce(flat, group)
    parts = flat.split([t.numel() for t in tensors])
    return [part.view(t.shape).to(t.dtype) for part, t in zip(parts, tensors)]


class _Rounds:
    """The meeting point of the bucket threads and the thread that issues the collectives."""

    def __init__(self, count: int) -> None:
        self.cond = threading.Condition()
        self.live = set(range(count))
        self.posted: dict[int, torch.Tensor] = {}
        self.answers: dict[int, torch.Tensor] = {}
        self.error: BaseException | None = None

    def post(self, i: int, t: torch.Tensor) -> torch.Tensor:
        with self.cond:
            self.posted[i] = t.contiguous()
            self.cond.notify_all()
            self.cond.wait_for(lambda: i in self.answers or self.error is not None)
            if i not in self.answers:
                raise RuntimeError("another bucket of this step failed")
            return self.answers.pop(i)

    def work(self, i: int, job: Callable[[Sum], None], context: Callable) -> None:
        try:
            with context():
                job(lambda t: self.post(i, t))
        except BaseException as err:  # handed to the main thread, which raises it
            with self.cond:
                self.error = self.error or err
        finally:
            with self.cond:
                self.live.discard(i)
                self.cond.notify_all()

    def next_round(self) -> dict[int, torch.Tensor]:
        """The tensors of the next round, in bucket order; empty when every bucket is done."""
        with self.cond:
            self.cond.wait_for(lambda: self.error is not None or all(i in self.posted for i in self.live))
            if self.error is not None:
                self.cond.notify_all()
                return {}
            posted = dict(sorted(self.posted.items()))
            self.posted.clear()
            return posted

    def answer(self, sums: dict[int, torch.Tensor]) -> None:
        with self.cond:
            self.answers.update(sums)
            self.cond.notify_all()


def _thread_context(device: torch.device) -> Callable:
    """What a worker thread must share with the caller: no autograd (the step's weights are
    leaves that require grad), and on a GPU the caller's device and stream."""
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

    class Context:
        def __enter__(self):
            self.stack = [torch.no_grad()]
            if stream is not None:
                self.stack += [torch.cuda.device(device), torch.cuda.stream(stream)]
            for c in self.stack:
                c.__enter__()

        def __exit__(self, *exc):
            for c in reversed(self.stack):
                c.__exit__(*exc)

    return Context


def run_together(jobs: list[Callable[[Sum], None]], group, device: torch.device) -> None:
    """Run ``job(sum_)`` for each job, where ``sum_(t)`` returns ``t`` summed over ``group``;
    the sums of all jobs are issued together, one all-reduce per round."""
    if len(jobs) == 1:
        jobs[0](lambda t: all_reduce(t.contiguous(), group))
        return
    rounds = _Rounds(len(jobs))
    context = _thread_context(device)
    threads = [threading.Thread(target=rounds.work, args=(i, job, context), daemon=True)
               for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    try:
        while posted := rounds.next_round():
            rounds.answer(dict(zip(posted, sum_together(list(posted.values()), group))))
    except BaseException as err:
        with rounds.cond:
            rounds.error = rounds.error or err
            rounds.cond.notify_all()
    for t in threads:
        t.join()
    if rounds.error is not None:
        raise rounds.error


class SplitRunner:
    """Runs an optimizer's buckets: those held whole here locally, those split between ranks
    with a reducer over their holders (``group_for(holders)``), all buckets of the same holders
    together so that each phase of their math is one collective.

    A bucket's matrices (``optim.matrix.Matrix``) are split along ``split_dim`` of the weight: rows
    (ZeRO partitions, Megatron's column-parallel layers) or columns (row-parallel layers).  The
    reducer sums over the basis axis when that is the split one, else over the free axis.
    """

    def __init__(self, group_for: Callable, device: torch.device) -> None:
        self.group_for, self.device = group_for, device

    def run(self, jobs) -> None:
        shared: dict[tuple, list] = {}
        for bucket, right, job in jobs:
            if bucket[0].holders:
                shared.setdefault(bucket[0].holders, []).append((bucket, right, job))
            else:
                job(LOCAL)
        for holders in sorted(shared):      # the same order on every rank
            tasks = [self._task(*item) for item in shared[holders]]
            run_together(tasks, self.group_for(holders), self.device)

    @staticmethod
    def _task(bucket: list, right: bool, job):
        dim = bucket[0].split_dim
        spans = [(m.first_row, m.weight.shape[dim], m.shape[dim]) for m in bucket]
        basis_split = (not right) if dim == 0 else right
        share = None
        if bucket[0].columns is not None:
            # the placement's block (the same shape, hence the same block, for the whole bucket)
            share = (*bucket[0].columns, bucket[0].shape[1 - dim])
        elif bucket[0].piece:
            # the same rows, hence the same block, for every matrix of the bucket (its key)
            first, count, rows = spans[0]
            width = bucket[0].shape[1 - dim]
            share = (*free_share(rows, width, first, count), width)
        return lambda sum_: job(SplitMatrixReducer(sum_, basis_split, spans, share))
