"""The collectives issued inside ``step()``, counted so tests can check what was sent."""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist

from ..utils.profiling import phase
from .reducer import Reducer

# Calls and elements of every collective ds_lowrank's optimizers issue, by purpose:
# "reduce" (the algorithms' sums), "exchange" (cut rows), "valid" (skip decisions).
SENT: Counter = Counter()


def all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM, purpose: str = "reduce") -> torch.Tensor:
    """In-place all-reduce of a contiguous tensor over ``group``, counted in ``SENT``."""
    SENT[purpose] += 1
    SENT[purpose + "_elements"] += t.numel()
    with phase("collectives"):
        dist.all_reduce(t, op=op, group=group)
    return t


class SplitMatrixReducer(Reducer):
    """Sums over the ranks holding blocks of the same matrices, cut along one axis of the weight
    (the rows of a ZeRO partition or a column-parallel layer, the columns of a row-parallel one).

    ``left`` says whether the cut axis is the math's basis axis (rows with a left projection,
    columns with a right one, which the math sees transposed); otherwise it is the free axis.
    ``rows[i]`` is ``(first, count, total)`` of matrix ``i`` along the cut axis; ``sum_`` sums a
    tensor over the holders (possibly together with other buckets' sums, see ``phases``).
    """

    def __init__(self, sum_, left: bool, rows: list[tuple[int, int, int]]) -> None:
        self.sum_, self.left, self.rows = sum_, left, rows

    def basis_axis(self, t: torch.Tensor) -> torch.Tensor:
        return self.sum_(t) if self.left else t

    def free_axis(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.left else self.sum_(t)

    def held(self, axis: str, index: int, local: int) -> tuple[int, int, int]:
        if (axis == "basis") == self.left:
            return self.rows[index]
        return 0, local, local

    def whole(self, t: torch.Tensor) -> torch.Tensor:
        split = -2 if self.left else -1            # the axis cut between the holders
        full = list(t.shape)
        full[split] = self.rows[0][2]
        out = t.new_zeros(full)
        for i, (first, count, _) in enumerate(self.rows):
            out[i].narrow(split, first, count).copy_(t[i])
        return self.sum_(out)
