"""Several buckets' math sharing one collective per round, in one thread.

An optimizer step works on buckets of same-shape matrices, and each bucket's math sums small
tensors over the ranks holding its matrices a few times (the phases of the algorithm).  Run
one after another, ``b`` buckets cost ``b`` times the collectives, and on a ZeRO-3 Llama every
matrix is split, so the latency of the collectives dominates.  The math is written as steps
(``distributed.reducer``): a generator that posts each tensor it wants summed and resumes with
the sum.  Here the buckets held by the same ranks run together: the driver advances every
unfinished bucket to its next post (or to its end), sums the whole round with one all-reduce,
and sends each bucket its part.  The math itself stays sequential and unaware of it.

The rounds line up across ranks because every holder runs the same buckets, in the same
order, with the same sequence of sums: sizes and branch decisions depend only on the global
shapes and on values that are already summed (hence identical on every holder).

A bug that breaks this (a rank posting another phase, or another number of tensors) must not
sum the wrong tensors or hang, so each round is checked, inside its own buffer: every post
carries a tag (a hash of its bucket, the line of the math that posted it, its shape and dtype)
as pairs ``(t, t²)`` of small integers at the front of the buffer.  After the sum every holder
has ``Σt`` and ``Σt²`` over the ``n`` holders, and ``n·Σt² = (Σt)²`` exactly when every holder's
``t`` is the same (Cauchy–Schwarz).  The integers are small enough for the sums to be exact in
the round's dtype, so every holder reaches the same verdict and all raise together, naming the
matrix and the line.  Posts of different sizes are beyond that: gloo aborts the rank whose
buffer is the smaller (a C++ abort, which Python cannot catch) and NCCL may hang.  Setting
``DS_LOWRANK_CHECK_ROUNDS=1`` compares the count, sizes and tags of each round in a small
all-reduce before it (and the end of the run after the last one), so that these raise too, and
so does a rank with more rounds than the others: one more collective per round, off by default.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from . import comm, reducer
from .comm import SplitMatrixReducer, all_reduce
from .reducer import LOCAL, Steps, free_share, run_local

# the opt-in check of each round's sizes before it is summed (see the module docstring)
CHECK_ROUNDS = "DS_LOWRANK_CHECK_ROUNDS"
# tag pairs (t, t²) per post in a round's buffer, of up to 16 bits each
_PAIRS = 2
# the files of the reducers and of this driver: not the math that posts
_OWN = {os.path.abspath(m.__file__) for m in (reducer, comm)} | {os.path.abspath(__file__)}


class RoundMismatch(RuntimeError):
    """The holders of a group of buckets posted different rounds of sums."""


def _tag_bits(dtype: torch.dtype, holders: int) -> int:
    """Bits ``b`` of a tag ``t`` in ``[1, 2^b]`` such that every partial sum of ``t²`` over
    ``holders`` ranks is an integer exact in ``dtype`` (a float: the rounds are)."""
    digits = round(-math.log2(torch.finfo(dtype).eps)) + 1      # float32: 24
    return min(16, (digits - holders.bit_length()) // 2)


def _tag_pairs(key: str, bits: int, pairs: int) -> list[int]:
    """``[t, t², ...]``: ``pairs`` tags of ``bits`` bits from a stable hash of ``key`` (the same
    in every process)."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    out = []
    for _ in range(pairs):
        t = h % (1 << bits) + 1
        out += [t, t * t]
        h >>= bits
    return out


def _agreed(sums: list[float], holders: int) -> bool:
    """Whether pairs ``(Σt, Σt²)`` summed over ``holders`` ranks come from one ``t`` on all."""
    return all(holders * round(s2) == round(s1) ** 2 for s1, s2 in zip(sums[0::2], sums[1::2]))


def sum_together(tensors: list[torch.Tensor], group, tags: list[str] | None = None
                 ) -> tuple[list[torch.Tensor], list[int]]:
    """Sum each tensor over ``group`` with one all-reduce, in the widest dtype among them (a
    float32 sum carried in float64 is rounded once, at the end).

    ``tags`` (one key per tensor) are carried at the front of the buffer and checked (see the
    module docstring).  Returns the sums and the indices of the tensors whose tags differ
    between the holders (empty when they all agree)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    holders = dist.get_world_size(group)
    bits = _tag_bits(dtype, holders) if tags is not None else 0
    head = [v for key in tags for v in _tag_pairs(key, bits, _PAIRS)] if bits > 0 else []
    sizes = [t.numel() for t in tensors]
    flat = torch.empty(len(head) + sum(sizes), dtype=dtype, device=tensors[0].device)
    if head:
        flat[:len(head)].copy_(torch.tensor(head, dtype=dtype))
    data = flat[len(head):]
    if all(t.dtype == dtype for t in tensors):
        torch.cat([t.reshape(-1) for t in tensors], out=data)
    else:
        at = 0
        for t in tensors:
            data[at:at + t.numel()].copy_(t.reshape(-1))
            at += t.numel()
    all_reduce(flat, group)
    bad = []
    if head:
        summed = flat[:len(head)].tolist()
        step = 2 * _PAIRS
        bad = [i for i in range(len(tensors)) if not _agreed(summed[i * step:(i + 1) * step], holders)]
    parts = data.split(sizes)
    return [part.view(t.shape).to(t.dtype) for part, t in zip(parts, tensors)], bad


def _where(steps: Steps) -> tuple[str, str]:
    """``(name, key)`` of the line of the math whose sum a suspended bucket has posted: the
    innermost of its generators outside the reducers.  ``key`` leaves out the folder, which
    may differ between machines."""
    frame, g = None, steps
    while g is not None and getattr(g, "gi_frame", None) is not None:
        if os.path.abspath(g.gi_frame.f_code.co_filename) not in _OWN:
            frame = g.gi_frame
        g = g.gi_yieldfrom
    if frame is None:
        return "(a reducer)", "reducer"
    path = frame.f_code.co_filename
    short = path[path.rfind("ds_lowrank"):] if "ds_lowrank" in path else os.path.basename(path)
    name = f"{frame.f_code.co_name} ({short}:{frame.f_lineno})"
    return name, f"{frame.f_code.co_name}:{os.path.basename(path)}:{frame.f_lineno}"


def _advance(steps: Steps, answer: torch.Tensor | None) -> torch.Tensor | None:
    """Resume a bucket with ``answer``; the tensor it posts next, ``None`` when it is done."""
    try:
        posted = steps.send(answer)
    except StopIteration:
        return None
    if not isinstance(posted, torch.Tensor):
        raise TypeError(f"a step of the math posted {type(posted).__name__}, not a tensor: sums are "
                        f"taken with `yield from reduce.basis_axis(t)` (or free_axis, gather_*, whole)")
    return posted


def run_together(steps: list[Steps], group, names: list[str] | None = None, holders=None) -> None:
    """Run each of ``steps`` (the buckets' math, ``distributed.reducer``) to its end, summing
    what they post over ``group``: one all-reduce per round, a round being the next post of
    every bucket not yet done, in bucket order.  ``names`` (one per bucket) and ``holders``
    name them in errors.  A bucket that raises stops the others."""
    names = names or [f"bucket {i}" for i in range(len(steps))]
    check_sizes = os.environ.get(CHECK_ROUNDS, "0") not in ("", "0")
    posted: dict[int, torch.Tensor] = {}
    device = None
    try:
        for i, s in enumerate(steps):
            if (t := _advance(s, None)) is not None:
                posted[i] = t
        round_ = 0
        while posted:
            order = sorted(posted)
            wheres = [_where(steps[i]) for i in order]
            tags = [f"{i}|{names[i]}|{key}|{tuple(posted[i].shape)}|{posted[i].dtype}"
                    for i, (_, key) in zip(order, wheres)]

            device = posted[order[0]].device
            if check_sizes and not _agree_on(group, "|".join(tags), device):
                raise _mismatch(holders, round_, [(names[i], posted[i], w) for i, (w, _) in zip(order, wheres)])
            sums, bad = sum_together([posted[i] for i in order], group, tags)
            if bad:
                raise _mismatch(holders, round_, [(names[order[j]], posted[order[j]], wheres[j][0]) for j in bad])
            posted.clear()
            for i, s in zip(order, sums):
                if (t := _advance(steps[i], s)) is not None:
                    posted[i] = t
            round_ += 1
        if check_sizes and not _agree_on(group, "finished", device):
            raise RoundMismatch(
                f"the holders {_ranks(holders)} of a step's split matrices disagree on the number of "
                f"rounds of their sums: here every bucket ({', '.join(names)}) finished after "
                f"{round_} rounds, and another holder posts more.  This is a bug in the optimizer or in "
                f"the rows the ranks were given")
    finally:
        for s in steps:                 # those still suspended, after an error
            s.close()


def _mismatch(holders, round_: int, posts: list[tuple[str, torch.Tensor, str]]) -> RoundMismatch:
    """The error of a round whose ``posts`` (``(bucket, tensor, line)``) other holders did not post."""
    what = "; ".join(f"matrix {name}: a {tuple(t.shape)} {t.dtype} sum from {where}" for name, t, where in posts)
    return RoundMismatch(
        f"the holders {_ranks(holders)} of a step's split matrices disagree at round {round_ + 1} of "
        f"their sums: here {what}, and another holder posted something else (another phase, shape or "
        f"number of sums) in the same round.  Every holder must take the same steps on the same "
        f"buckets; this is a bug in the optimizer or in the rows the ranks were given")


def _agree_on(group, key: str, device: torch.device | None) -> bool:
    """Whether every rank of ``group`` passes the same ``key``: one small all-reduce of float64
    tag pairs, counted as ``"check"``."""
    holders = dist.get_world_size(group)
    values = _tag_pairs(key, _tag_bits(torch.float64, holders), 3)
    if device is None:      # no round: the group's device
        device = torch.device("cpu") if dist.get_backend(group) == "gloo" else \
            torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor(values, dtype=torch.float64, device=device)
    all_reduce(t, group, purpose="check")
    return _agreed(t.tolist(), holders)


def _ranks(holders) -> str:
    return f"(ranks {', '.join(map(str, holders))})" if holders else "(of this group)"


class SplitRunner:
    """Runs an optimizer's buckets: those held whole here locally, those split between ranks
    with a reducer over their holders (``group_for(holders)``), all buckets of the same holders
    together so that each phase of their math is one collective.

    A bucket's matrices (``optim.matrix.Matrix``) are split along ``split_dim`` of the weight: rows
    (ZeRO partitions, Megatron's column-parallel layers) or columns (row-parallel layers).  The
    reducer sums over the basis axis when that is the split one, else over the free axis.
    """

    def __init__(self, group_for: Callable) -> None:
        self.group_for = group_for

    def run(self, jobs) -> None:
        shared: dict[tuple, list] = {}
        for bucket, right, job in jobs:
            if bucket[0].holders:
                shared.setdefault(bucket[0].holders, []).append((bucket, right, job))
            else:
                run_local(job(LOCAL))
        for holders in sorted(shared):      # the same order on every rank
            group = self.group_for(holders)
            items = shared[holders]
            run_together([self._steps(bucket, right, job, group) for bucket, right, job in items], group,
                         [_name(bucket) for bucket, _, _ in items], holders)

    @staticmethod
    def _steps(bucket: list, right: bool, job, group) -> Steps:
        """The bucket's math with the reducer over its holders."""
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

        def sum_now(t: torch.Tensor) -> torch.Tensor:
            return sum_together([t], group)[0][0]
        return job(SplitMatrixReducer(basis_split, spans, share, sum_now))


def _name(bucket: list) -> str:
    more = len(bucket) - 1
    return repr(bucket[0].label) + (f" (and {more} more of its bucket)" if more else "")
