"""The whole-tensor placement: parameters this process holds whole (one process, DDP, a
Megatron shard of a ``tensor_parallel="local"`` group, which is a matrix of its own).

Each compressed parameter is one ``Matrix`` of all its rows, stepped with no communication; the
others take AdamW.  This is the case the algorithms are written for: every other placement
reduces to it when one rank holds everything.
"""

from __future__ import annotations

from ...distributed.reducer import LOCAL_RUNNER
from ...linalg import gradient_flags
from ...utils.profiling import phase
from ..dense_adamw import adamw_step
from ..matrix import Matrix
from .method import Method, Placement, check_dense_state


class WholeTensors(Placement):
    """A group's parameters held whole here, for one step (``items``: ``(label, p)`` of those
    with a gradient)."""

    def __init__(self, method: Method, group: dict, items: list) -> None:
        self.group = group
        rules = method.rules
        limits = [rules.gradient_limit(group, tuple(p.shape), p.dtype) for _, p in items]
        with phase("checks"):
            over, nonzero = gradient_flags([p.grad for _, p in items], limits)
        valid = [not o and nz for o, nz in zip(over, nonzero)]
        self.skipped = valid.count(False)
        self.matrices, self.dense = [], []
        for (label, p), ok in zip(items, valid):
            if not ok:
                continue
            if rules.is_compressed(group, p):
                method.check_compressed(group, label, p, True)
                m = Matrix(label, p, p.grad, method.state[p], tuple(p.shape))
                method.check_state(group, m)
                self.matrices.append(m)
            else:
                check_dense_state(label, method.state[p])
                self.dense.append((p, method.state[p]))

    def rows(self) -> list[tuple[list[Matrix], object]]:
        return [(self.matrices, LOCAL_RUNNER)]

    def finish(self) -> None:
        with phase("dense_adamw"):
            adamw_step([p for p, _ in self.dense], [st for _, st in self.dense], self.group)
