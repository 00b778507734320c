"""The collectives issued inside ``step()``, counted so tests can check what was sent."""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist

from ..utils.profiling import phase
from .reducer import Reducer, Steps, done, drive

# Calls and elements of every collective ds_lowrank's optimizers issue, by purpose:
# "reduce" (the algorithms' sums), "exchange" (cut rows), "valid" (skip decisions), "move" (rows
# of tensor-parallel shards brought to the rank stepping them, ``tensor_parallel.WholeRows``).
SENT: Counter = Counter()


def all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM, purpose: str = "reduce") -> torch.Tensor:
    """In-place all-reduce of a contiguous tensor over ``group``, counted in ``SENT``."""
    SENT[purpose] += 1
    SENT[purpose + "_elements"] += t.numel()
    with phase("collectives"):
        dist.all_reduce(t, op=op, group=group)
    return t


def all_to_all(out: torch.Tensor, t: torch.Tensor, out_sizes: list[int], in_sizes: list[int], group,
               purpose: str = "move") -> torch.Tensor:
    """``out`` (contiguous) receives from each rank of ``group`` its part of ``t`` for this rank
    (``out_sizes[r]`` elements from rank ``r``; ``in_sizes[r]`` of ``t`` go to rank ``r``), counted in
    ``SENT``."""
    SENT[purpose] += 1
    SENT[purpose + "_elements"] += t.numel()
    with phase("collectives"):
        dist.all_to_all_single(out, t, out_sizes, in_sizes, group=group)
    return out


class SplitMatrixReducer(Reducer):
    """Sums over the ranks holding blocks of the same matrices, cut along one axis of the weight
    (the rows of a ZeRO partition or a column-parallel layer, the columns of a row-parallel one).

    ``left`` says whether the cut axis is the math's basis axis (rows with a left projection,
    columns with a right one, which the math sees transposed); otherwise it is the free axis.
    ``rows[i]`` is ``(first, count, total)`` of matrix ``i`` along the cut axis.  A sum over the
    holders posts its tensor (``phases`` sums the posts of the buckets of the same holders
    together); ``sum_now(t)`` sums one tensor at once, for ``at_once``.  ``share`` is
    ``(lo, hi, width)`` when the holders keep the state along the axis that is not cut in blocks
    of it (the placement's rule: ``reducer.free_share`` on a ZeRO partition,
    ``optim.fsdp2.column_block`` on FSDP2; the same block for every matrix of the bucket; the
    blocks of the holders cover the axis), else ``None`` (every holder keeps it whole).
    """

    def __init__(self, left: bool, rows: list[tuple[int, int, int]],
                 share: tuple[int, int, int] | None = None, sum_now=None) -> None:
        self.left, self.rows, self.share, self.sum_now = left, rows, share, sum_now

    @staticmethod
    def _sum(t: torch.Tensor) -> Steps[torch.Tensor]:
        return (yield t.contiguous())

    def basis_axis(self, t: torch.Tensor) -> Steps[torch.Tensor]:
        return self._sum(t) if self.left else done(t)

    def free_axis(self, t: torch.Tensor) -> Steps[torch.Tensor]:
        return done(t) if self.left else self._sum(t)

    def at_once(self, steps):
        if self.sum_now is None:
            raise RuntimeError("this reducer was made without sum_now, so it cannot sum at once")
        return drive(steps, self.sum_now)

    def held(self, axis: str, index: int, local: int) -> tuple[int, int, int]:
        if (axis == "basis") == self.left:
            return self.rows[index]
        return 0, local, local

    def _block(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        if self.share is None:
            return t
        lo, hi, _ = self.share
        return t.narrow(axis, lo, hi - lo)

    def _gather(self, ts: tuple[torch.Tensor, ...], axis: int) -> Steps[tuple[torch.Tensor, ...]]:
        # An all-gather written as the sum of zero-padded blocks: one collective of the kind
        # every other round uses, so it batches with other buckets' sums (``phases``) and runs
        # on gloo.  A sum of one value and zeros is exact.
        if self.share is None or not ts:
            return ts
        lo, hi, width = self.share
        size = list(ts[0].shape)
        size[axis] = width
        padded = ts[0].new_zeros(len(ts), *size)
        for i, t in enumerate(ts):
            padded[i].narrow(axis, lo, hi - lo).copy_(t)
        return tuple((yield from self._sum(padded)).unbind(0))

    # the cut axis is the basis axis (``left``): the free axis is kept in blocks, else the basis axis
    def free_block(self, t: torch.Tensor) -> torch.Tensor:
        return self._block(t, -1) if self.left else t

    def basis_block(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.left else self._block(t, -2)

    def gather_free(self, *ts: torch.Tensor) -> Steps[tuple[torch.Tensor, ...]]:
        return self._gather(ts, -1) if self.left else done(ts)

    def gather_basis(self, *ts: torch.Tensor) -> Steps[tuple[torch.Tensor, ...]]:
        return done(ts) if self.left else self._gather(ts, -2)

    def whole(self, t: torch.Tensor) -> Steps[torch.Tensor]:
        split = -2 if self.left else -1            # the axis cut between the holders
        full = list(t.shape)
        full[split] = self.rows[0][2]
        out = t.new_zeros(full)
        for i, (first, count, _) in enumerate(self.rows):
            out[i].narrow(split, first, count).copy_(t[i])
        return (yield from self._sum(out))
