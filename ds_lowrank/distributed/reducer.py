"""The reducer: how the algorithms sum small tensors over every holder of a matrix.

Every algorithm is written in one orientation: a matrix ``X`` of shape ``d × c`` whose
basis ``P`` (``d × r``) spans the *basis axis* ``d``; the other axis ``c`` is the *free axis*.
(For a right projection ``X`` is the weight's transpose.)  A product that contracts over an
axis that may be split between ranks goes through the reducer:

- ``basis_axis(t)``: ``t`` is a partial sum over the rows of ``X`` this rank holds
  (``Xᵀ·P``, ``Pᵀ·X``, ``Yᵀ·Y``);
- ``free_axis(t)``: ``t`` is a partial sum over the columns this rank holds (``X·Z``, ``M·Z``).

In one process both are the identity, and the single-process optimizer is exactly the
algorithm of the papers.  Distributed reducers sum over the ranks holding pieces of the
same matrices, so distributed runs equal single-process runs.

A sum is an explicit step of the algorithm: the reducer's sums are generators, and the math
that uses them is a generator too, written ``S = yield from reduce.basis_axis(t)``.  A sum over
ranks *posts* its tensor (yields it) and resumes with the total; a sum with nothing to add
(one process, an axis held whole) returns at once without posting.  Whoever runs the math
answers the posts: ``run_local`` in one process, where nothing is ever posted, and
``distributed.phases`` between ranks, which sums the posts of many buckets in one collective.
The math never sees which.

Of a matrix split along one axis, the state that lies along the other one would be the same
on every holder: the ``r × c`` moments when the basis axis is split, the ``d × r`` basis when
the free axis is.  A ZeRO placement keeps that state in blocks of that other axis instead
(``free_share``; an FSDP2 one in torch.chunk's blocks, ``optim.fsdp2.column_block``), and the
algorithms bracket their step with two more operations per axis:

- ``gather_free(*ts)`` / ``gather_basis(*ts)``: the whole tensors from each holder's block
  of their last (free) or second-to-last (basis) axis (an all-gather; a step);
- ``free_block(t)`` / ``basis_block(t)``: this rank's block of a whole tensor (a slice; a
  plain call).

All four are the identity in one process, and wherever the state is kept whole.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, TypeVar

import torch

T = TypeVar("T")
# A step of the math: a generator that posts (yields) the tensors it wants summed over the
# holders, is sent back each sum, and returns its result.
Steps = Generator[torch.Tensor, torch.Tensor, T]


def done(value: T) -> Steps[T]:
    """A step that returns ``value`` at once, posting nothing (a sum with nothing to add)."""
    return value
    yield  # never reached: it makes this function a generator


def drive(steps: Steps[T], answer: Callable[[torch.Tensor], torch.Tensor]) -> T:
    """Run ``steps`` to its end, answering each tensor it posts with ``answer(t)``; its result."""
    sent = None
    while True:
        try:
            posted = steps.send(sent)
        except StopIteration as end:
            return end.value
        try:
            sent = answer(posted)
        except BaseException:
            steps.close()           # leave no step suspended inside its ``with`` blocks
            raise


def _nothing_to_sum(t: torch.Tensor) -> Any:
    raise RuntimeError(
        f"a sum over ranks (a {tuple(t.shape)} {t.dtype} tensor) was posted to a one-process run: "
        f"the math was given a distributed reducer (run it with distributed.phases, or give it LOCAL), "
        f"or a step returned a tensor where the math takes steps (`yield from` a tensor posts its "
        f"rows; wrap a value at hand in reducer.done)")


def run_local(steps: Steps[T]) -> T:
    """The math of one process, run to its end: every sum is the identity, nothing is posted.

    ``run_local(orthonormalize(Y))`` is ``orthonormalize``'s result."""
    return drive(steps, _nothing_to_sum)


def free_share(rows: int, width: int, first: int, count: int) -> tuple[int, int]:
    """``(lo, hi)``: the block ``[lo, hi)`` of an axis of ``width`` that is not split, kept by
    the holder of ``[first, first + count)`` of the split axis of ``rows``.

    In proportion to what is held, so that each holder computes its own block from its rows
    alone (as do checkpoint tools and the memory estimator, from a piece's element range): the
    blocks of holders of consecutive rows are consecutive and cover the axis, and a ZeRO
    partition's balance of rows carries over to the state kept in blocks."""
    return first * width // rows, (first + count) * width // rows


class Reducer:
    """Interface; see the module docstring.  The sums (``basis_axis``, ``free_axis``, the
    gathers and ``whole``) are steps (``S = yield from reduce.basis_axis(t)``); the rest are
    plain calls."""

    def basis_axis(self, t: torch.Tensor) -> Steps[torch.Tensor]:
        raise NotImplementedError

    def free_axis(self, t: torch.Tensor) -> Steps[torch.Tensor]:
        raise NotImplementedError

    def held(self, axis: str, index: int, local: int) -> tuple[int, int, int]:
        """``(offset, count, full)``: which entries of matrix ``index`` along ``axis`` (``"basis"``
        or ``"free"``) this rank holds, as the first ``count`` of its ``local`` entries.

        Random draws use it so that every holder of a matrix sees the same numbers for the
        same global rows.
        """
        return 0, local, local

    def free_block(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's block (``free_share``) of the last axis of a whole ``(…, c)`` tensor: a view."""
        return t

    def basis_block(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's block of the second-to-last axis of a whole ``(…, d, r)`` tensor: a view."""
        return t

    def gather_free(self, *ts: torch.Tensor) -> Steps[tuple[torch.Tensor, ...]]:
        """The whole ``(…, c)`` tensors (all of one shape) of which each holder has its block
        (``free_block``)."""
        return done(ts)

    def gather_basis(self, *ts: torch.Tensor) -> Steps[tuple[torch.Tensor, ...]]:
        """The whole ``(…, d, r)`` tensors (all of one shape) of which each holder has its block
        (``basis_block``)."""
        return done(ts)

    def whole(self, t: torch.Tensor) -> Steps[torch.Tensor]:
        """The whole matrices of a batch ``(k, d, c)`` of which this rank holds some rows or
        columns, on every holder: for what does not decompose, such as an exact SVD.  It moves
        whole matrices, so it is for rare steps."""
        raise NotImplementedError

    def at_once(self, steps: Steps[T]) -> T:
        """``steps`` run to its end inside a plain call, each of its sums a collective of its own
        (not batched with other buckets'): for code that cannot post, such as a user's hook.
        Every holder calls it at the same point of the same step, so the sums still line up."""
        return run_local(steps)

    def rows_held(self, t: torch.Tensor, local: int) -> torch.Tensor:
        """Of a batch ``(k, full, …)`` along the basis axis, the ``local`` rows this rank holds."""
        parts = []
        for i in range(t.shape[0]):
            offset, count, _ = self.held("basis", i, local)
            parts.append(t[i, offset:offset + count])
        return torch.stack(parts)


class LocalReducer(Reducer):
    """One process holds every matrix whole: nothing to sum, nothing split."""

    def basis_axis(self, t: torch.Tensor) -> Steps[torch.Tensor]:
        return done(t)

    def free_axis(self, t: torch.Tensor) -> Steps[torch.Tensor]:
        return done(t)

    def whole(self, t: torch.Tensor) -> Steps[torch.Tensor]:
        return done(t)


LOCAL = LocalReducer()


class LocalRunner:
    """Runs an optimizer's buckets one after another, each with the local reducer.

    ``run`` takes ``(bucket, right, job)`` triples, ``right`` telling which axis of the weight
    is the basis axis, and runs the steps ``job(reducer)`` to their end.  ZeRO partitions use a
    runner that gives split buckets a reducer over their holders and batches their collectives
    (``phases.SplitRunner``).
    """

    def run(self, jobs) -> None:
        for _, _, job in jobs:
            run_local(job(LOCAL))


LOCAL_RUNNER = LocalRunner()
