"""Megatron tensor-parallel shards, stepped on their own or as parts of the whole matrix.

Megatron marks a sharded weight with ``tensor_model_parallel=True`` and ``partition_dim``: 0 for a
column-parallel layer (the weight's rows are split between the TP ranks), 1 for a row-parallel one
(its columns).  A group's ``tensor_parallel`` key chooses what an optimizer makes of them:

- ``"local"`` (the default): each shard is a matrix of its own, with its own subspace (or
  factorization), and nothing is communicated.  Results depend on the TP size.
- ``"global"``: a shard is the rows or columns this rank holds of the whole matrix; the
  algorithms' small sums go over the TP group, as for a ZeRO partition, so every TP size gives the
  result of one process stepping the whole matrix.

MicroAdam is elementwise; its shards are always stepped on their own.

Under DeepSpeed's ZeRO (``mpu=parallel_state``) each TP rank's shards are flattened and
partitioned over its data-parallel group, so a ZeRO rank owns whole rows of its shard
(``zero_layout.owned_rows``).  In global mode those become rows of the whole matrix
(``WholeRows``): a column-parallel shard's rows are the whole matrix's already; a row-parallel
shard's rows hold one block of the columns, and the TP ranks at the same data-parallel position
own the same rows of it, so each of them takes its part of those rows with every column
(``rows_to_whole``, an all-to-all over the TP group) and sends the update back after the step.
The matrix stepped is then split by rows only, over every (TP, DP) rank owning rows of it.

The same two modes apply to torch's tensor parallelism under FSDP2 (``parallelize_module`` with
``ColwiseParallel`` / ``RowwiseParallel``, then ``fully_shard``), whose DTensor placements say
what Megatron's attributes say here; ``optim.fsdp2`` reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .comm import all_reduce, all_to_all
from .phases import SplitRunner
from .zero_layout import LayoutError, owned_rows

MODES = ("local", "global")


def shard_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The shape of a parameter as its model made it (ZeRO-3 empties ``p`` and keeps it in ``ds_shape``)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def is_shard(p: torch.Tensor) -> bool:
    """A Megatron tensor-parallel shard of a matrix."""
    return bool(getattr(p, "tensor_model_parallel", False)) and len(shard_shape(p)) == 2


def megatron_group():
    """Megatron's tensor-parallel process group, once ``megatron.core.parallel_state`` has one."""
    try:
        from megatron.core import parallel_state
    except ImportError:
        return None
    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_tensor_model_parallel_group()


def rows_in_whole(dim: int, shard_rows: int, first: int, count: int, rank: int, world: int) -> tuple[int, int]:
    """``(first, count)`` of the whole matrix's rows that TP rank ``rank`` of ``world`` steps in
    ``"global"`` mode under ZeRO, where its data-parallel position owns rows ``[first, first +
    count)`` of its shard of ``shard_rows`` rows, split along ``dim`` (``partition_dim``): a
    column-parallel shard's own rows, where the shard lies in the whole matrix; a row-parallel
    shard's rows are the whole matrix's, shared out between the TP ranks (``rows_to_whole``).
    Pure arithmetic: the placement binds with it, the checkpoint tools read saved pieces with it."""
    if dim == 0:
        return rank * shard_rows + first, count
    lo, hi = first + count * rank // world, first + count * (rank + 1) // world
    return lo, hi - lo


class TensorParallel:
    """The TP group and what a shard is of the whole matrix."""

    def __init__(self, group) -> None:
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.holders = tuple(range(self.world))

    def full_shape(self, label: str, p: torch.Tensor) -> tuple[int, int]:
        dim = getattr(p, "partition_dim", None)
        if dim not in (0, 1):
            raise ValueError(f"{label}: a tensor-parallel shard must have partition_dim 0 or 1, not {dim!r}")
        shape = list(p.shape)
        shape[dim] *= self.world
        return tuple(shape)

    def first(self, p: torch.Tensor) -> int:
        """The first row (column, for a row-parallel shard) of the whole matrix held here."""
        return self.rank * p.shape[p.partition_dim]

    def agree(self, flags: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum of ``flags`` over the TP ranks, so all skip the same shards."""
        return all_reduce(flags, self.group, op=dist.ReduceOp.MAX, purpose="valid")

    def runner(self) -> SplitRunner:
        return SplitRunner(lambda holders: self.group)

    # -- a shard's rows under ZeRO: rows of the whole matrix (see the module docstring) --------

    def whole_rows(self, dim: int, shard_rows: int, first: int, count: int, rank: int | None = None
                   ) -> tuple[int, int]:
        """``rows_in_whole`` at this TP size, of TP rank ``rank`` (default: this one)."""
        return rows_in_whole(dim, shard_rows, first, count, self.rank if rank is None else rank, self.world)

    def _cuts(self, rows: int) -> list[int]:
        return [rows * t // self.world for t in range(self.world + 1)]

    def rows_to_whole(self, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Of row-parallel blocks (``h × w``: rows a data-parallel position owns of this rank's
        columns, the same rows on every TP rank), this rank's part of the rows (``whole_rows``)
        with the columns of every TP rank: ``(h_t × w·world)`` each, new tensors.  One
        all-to-all over the TP group; collective."""
        world, me = self.world, self.rank
        cuts = [self._cuts(b.shape[0]) for b in blocks]
        mine = [b.new_empty(c[me + 1] - c[me], b.shape[1] * world) for b, c in zip(blocks, cuts)]
        if not blocks:
            return mine
        send = torch.cat([b[c[t]:c[t + 1]].reshape(-1) for t in range(world) for b, c in zip(blocks, cuts)])
        in_sizes = [sum((c[t + 1] - c[t]) * b.shape[1] for b, c in zip(blocks, cuts)) for t in range(world)]
        share = sum(m.numel() for m in mine) // world
        got = send.new_empty(share * world)
        all_to_all(got, send, [share] * world, in_sizes, self.group)
        at = 0
        for t in range(world):
            for out, b in zip(mine, blocks):
                h, w = out.shape[0], b.shape[1]
                out[:, t * w:(t + 1) * w] = got[at:at + h * w].view(h, w)
                at += h * w
        return mine

    def whole_to_rows(self, whole: list[torch.Tensor], blocks: list[torch.Tensor]) -> None:
        """The inverse of ``rows_to_whole``: each rank's rows of ``whole`` back into ``blocks``
        (in place) on the ranks holding their columns.  Collective."""
        if not blocks:
            return
        world = self.world
        cuts = [self._cuts(b.shape[0]) for b in blocks]
        send = torch.cat([m[:, t * b.shape[1]:(t + 1) * b.shape[1]].reshape(-1)
                          for t in range(world) for m, b in zip(whole, blocks)])
        out_sizes = [sum((c[t + 1] - c[t]) * b.shape[1] for b, c in zip(blocks, cuts)) for t in range(world)]
        share = send.numel() // world
        got = send.new_empty(sum(out_sizes))
        all_to_all(got, send, out_sizes, [share] * world, self.group)
        at = 0
        for t in range(world):
            for b, c in zip(blocks, cuts):
                h, w = c[t + 1] - c[t], b.shape[1]
                b[c[t]:c[t + 1]] = got[at:at + h * w].view(h, w)
                at += h * w


@dataclass(frozen=True)
class ShardRows:
    """What a ZeRO rank steps of a global shard: rows ``[first, first + count)`` of the whole
    matrix of ``shape``; ``holders`` (global ranks) and ``split`` (``(rank, first, count)`` of each,
    by row) over every (TP, DP) rank owning rows of it."""

    shape: tuple[int, int]
    dim: int                            # the shard's ``partition_dim``
    first: int
    count: int
    holders: tuple[int, ...]
    split: tuple[tuple[int, int, int], ...]


@dataclass
class WholeRows:
    """The global shards of one ZeRO flat tensor as rows of their whole matrices (``ShardRows``
    by label), with the process groups their sums and skip decisions go over."""

    tensor_parallel: TensorParallel
    rows: dict[str, ShardRows]          # those compressed (cut into rows)
    shapes: dict[str, tuple[int, int]]  # the whole matrix of each, those left to AdamW too
    grid: object                        # every rank holding pieces of them: TP × DP
    # by global ranks: every group made so far, those this rank is not in included (the same
    # keys on every rank, so that later bindings make the same missing ones)
    groups: dict[tuple[int, ...], object] = field(default_factory=dict)

    def group_for(self, holders: tuple[int, ...]):
        return self.groups[holders]


def _global_rank(group, rank: int) -> int:
    return dist.get_global_rank(group, rank) if group is not None else rank


def bind_whole_rows(layout, shards: dict[str, tuple[int, tuple[int, int]]], tensor_parallel: TensorParallel,
                    known: dict | None = None, backend: str | None = None) -> WholeRows:
    """The ``WholeRows`` of the global shards ``shards`` (label -> ``(partition_dim, whole shape)``)
    of a bound ZeRO ``layout`` (``zero_layout.FlatLayout``, its rows cut; a fused weight's
    ``rows`` are those of its blocks, by block label, ``layout.blocks``): the TP ranks' layouts
    gathered, and the process groups of their holders made, but for those in ``known`` (the
    ``groups`` of earlier bindings; collective over the whole world, as every ``new_group`` is).
    Refuses a row-parallel shard whose TP ranks' partitions own different rows of it, which no
    move of rows over the TP group makes whole rows of."""
    mine, stepped = {}, {}
    for label, (dim, shape) in shards.items():
        if label in layout.blocks:
            # a fused weight (column-parallel) stepped as its blocks: TP rank t's block is rows
            # t·h ... (t+1)·h of the whole logical matrix
            for name, block in layout.blocks[label].items():
                mine[name] = [tuple(r) for r in layout.block_rows[name]]
                stepped[name] = (0, (block.rows * tensor_parallel.world, shape[1]))
        elif label in layout.row_length:
            n = layout.row_length[label]
            mine[label] = [(q.rank, *_rows(q, n)) for q in layout.holders[label]]
            stepped[label] = (dim, shape)
    dp_ranks = [_global_rank(layout.group, r) for r in range(layout.world)]
    everyone: list = [None] * tensor_parallel.world
    dist.all_gather_object(everyone, (mine, dp_ranks), group=tensor_parallel.group)
    rows = {}
    for label, (dim, shape) in stepped.items():
        spans = []
        for t, (theirs, ranks) in enumerate(everyone):
            if dim == 1 and [tuple(x) for x in theirs.get(label, ())] != mine[label]:
                raise LayoutError(
                    f"{label}: its row-parallel shards are partitioned differently on the tensor-parallel "
                    f"ranks (ZeRO owns other rows of them), so tensor_parallel='global' cannot step its "
                    f"whole rows; give every TP rank the same parameters in the same groups")
            shard_rows = shape[0] // tensor_parallel.world if dim == 0 else shape[0]
            for r, f, c in theirs.get(label, ()):
                first, count = tensor_parallel.whole_rows(dim, shard_rows, f, c, t)
                if count:
                    spans.append((ranks[r], first, count))
        spans.sort(key=lambda s: s[1])
        me = next(((f, c) for r, f, c in spans if r == dist.get_rank()), (0, 0))
        rows[label] = ShardRows(tuple(shape), dim, me[0], me[1], tuple(sorted(r for r, _, _ in spans)),
                                tuple(spans))
    grid = tuple(sorted({r for _, ranks in everyone for r in ranks}))
    wanted = {grid} | {s.holders for s in rows.values() if len(s.holders) > 1}
    # every rank makes every group, in one order, as ``new_group`` asks (the other TP × DP grids' too)
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, sorted(wanted))
    groups = dict(known or {})
    for ranks in sorted({tuple(r) for theirs in every for r in theirs} - set(groups)):
        groups[ranks] = dist.new_group(list(ranks), backend=backend)
    shapes = {label: whole for label, (_, whole) in shards.items() if label in layout.holders}
    return WholeRows(tensor_parallel, rows, shapes, groups[grid], groups)


def _rows(q, n: int) -> tuple[int, int]:
    r = owned_rows(q, n)
    return r.first, r.count


# -- Megatron's parallel_state as DeepSpeed's ``mpu`` ------------------------------------------

# what DeepSpeed's engine, ZeRO and checkpointing call on an ``mpu`` (Megatron-DeepSpeed's names)
DEEPSPEED_MPU = ("get_model_parallel_world_size", "get_model_parallel_rank", "get_model_parallel_group",
                 "get_data_parallel_world_size", "get_data_parallel_rank", "get_data_parallel_group",
                 "get_tensor_model_parallel_world_size", "get_tensor_model_parallel_rank",
                 "get_tensor_model_parallel_group")


class MegatronMPU:
    """megatron-core's ``parallel_state`` answering as DeepSpeed asks an ``mpu``.

    DeepSpeed reads the data-parallel group (what ZeRO partitions over and averages gradients
    in), the tensor-parallel group (gradient norms of sharded parameters, checkpoints) and a
    "model-parallel" group, which in Megatron-DeepSpeed is the tensor-parallel one (checkpoint
    files ``mp_rank_XX``, the model-parallel reduction of gradient norms).  megatron-core's own
    ``get_model_parallel_group`` also spans the pipeline stages; with the pipeline size 1 that
    :func:`as_deepspeed_mpu` requires, the two are the same ranks.
    """

    def __init__(self, parallel_state) -> None:
        self.ps = parallel_state

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_src_rank()

    get_model_parallel_group = get_tensor_model_parallel_group
    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.ps.get_pipeline_model_parallel_world_size()


def as_deepspeed_mpu(mpu):
    """``mpu`` as DeepSpeed can use it: an object that already answers DeepSpeed's calls as it is,
    megatron-core's ``parallel_state`` through :class:`MegatronMPU`; refused, with the reason,
    when it is neither or when its layout is one this package does not run (pipeline or
    context parallelism)."""
    if mpu is None or all(callable(getattr(mpu, name, None)) for name in DEEPSPEED_MPU):
        return mpu
    if not callable(getattr(mpu, "model_parallel_is_initialized", None)) or not callable(
            getattr(mpu, "get_tensor_model_parallel_group", None)):
        missing = [name for name in DEEPSPEED_MPU if not callable(getattr(mpu, name, None))]
        raise ValueError(f"mpu={mpu!r} is neither megatron.core.parallel_state nor an object with DeepSpeed's "
                         f"mpu methods (it lacks {missing})")
    if not mpu.model_parallel_is_initialized():
        raise ValueError("mpu=parallel_state: megatron-core's model-parallel groups are not set up; call "
                         "parallel_state.initialize_model_parallel(tensor_model_parallel_size=...) first")
    pipeline = mpu.get_pipeline_model_parallel_world_size()
    if pipeline != 1:
        raise ValueError(f"mpu=parallel_state with pipeline_model_parallel_size={pipeline}: ds_lowrank runs "
                         f"tensor and data parallelism only (DeepSpeed trains a pipeline through its own "
                         f"PipelineModule engine, which these optimizers are not tested with); use "
                         f"pipeline_model_parallel_size=1")
    context = mpu.get_context_parallel_world_size() if callable(
        getattr(mpu, "get_context_parallel_world_size", None)) else 1
    if context != 1:
        raise ValueError(f"mpu=parallel_state with context_parallel_size={context}: DeepSpeed's ZeRO would "
                         f"partition over the data-parallel group without the context-parallel ranks that "
                         f"share its gradients; use context_parallel_size=1")
    return MegatronMPU(mpu)
