"""One optimizer step on PyTorch FSDP2 parameters (``torch.distributed.fsdp.fully_shard``).

FSDP2 hands the optimizer DTensor parameters sharded ``Shard(0)`` over a 1-D device mesh (or
``(Replicate(), Shard(0))`` over HSDP's 2-D mesh, whose replicas step alike): each rank holds a
block of whole rows of every parameter, split as ``torch.chunk`` splits (``⌈m/W⌉`` rows per
rank, so the last ranks may hold fewer or none).  That is the placement the algorithms are
written for:

- a parameter the optimizer compresses is a ``Matrix`` of the rows held here (``first_row``),
  its holders the ranks holding rows; the runner gives its buckets a reducer summing over them
  (the mesh dimension's group, or a subgroup when some ranks hold none), so the step equals one
  process stepping the whole matrix.  A parameter that is not a matrix (Adapprox's dense
  second moment) is split along its first dimension the same way;
- MicroAdam's unit is a top-k block of the flattening, which a shard boundary may cut: as on a
  ZeRO partition, each block belongs to the rank holding its first element, which receives the
  rest of it before the step and sends its update back after (``placements.zero``);
- parameters left to AdamW step as the DTensors they are, with torch's AdamW kernel, so their
  moments are DTensors laid out like the parameter.

Combined with torch's tensor parallelism (``parallelize_module`` over ``mesh["tp"]`` of a 2-D
``(dp, tp)`` mesh, then ``fully_shard`` over ``mesh["dp"]``, torchtitan's recipe), a
``ColwiseParallel`` weight is placed ``(_StridedShard(0), Shard(0))`` (each rank a block of
rows of the whole matrix) and a ``RowwiseParallel`` one ``(Shard(0), Shard(1))`` (a block of
rows of its TP shard's columns); a parameter tensor parallelism leaves whole is ``(Shard(0),
Replicate())``, a row split over ``dp`` that every TP rank steps alike.  The group's
``tensor_parallel`` key chooses what the sharded ones are, as for Megatron's shards
(``distributed.tensor_parallel``):

- ``"global"``: the whole matrix, its rows split over every rank of the mesh (the reducer sums
  over the flattened mesh), so results and state do not depend on the TP size and a checkpoint
  loads at any ``dp × tp``.  A row-wise weight's rows and gradient are moved to ``(Shard(0),
  Shard(0))`` for the step (an all-to-all over ``tp``) and its update back, and its state kept
  there;
- ``"local"`` (the default): each TP shard a matrix of its own, its rows split over ``dp``,
  as one process per TP shard would step it; its state lies along ``tp`` side by side with the
  other shards' (a checkpoint loads at the same TP size only).

MicroAdam's update is elementwise, so the whole matrix adds nothing to it, and its blocks follow
the flattening of the matrix stepped: it runs in local mode only (each TP shard's flattening, its
rows split over ``dp``, exactly as on a 1-D mesh) and is refused in global mode.

State: each state tensor that splits with the parameter's rows (``row_axes``: error feedback,
codes and bucket statistics, left-projection bases, right-projection moments, Adapprox's row
factor) is kept as a DTensor placed like the parameter; the state that lies along the
matrix's columns (``column_axes``: the right-projection basis and left-projection moments
along their dim 1, Adapprox's column factor along its dim 0) in blocks of columns, a DTensor
``Shard`` of that dim over the same mesh dimension (``column_block``: torch.chunk's split, so
per-rank state stays below AdamW's), where every rank of that dimension holds rows of the
matrix, and replicated where some holds none (it takes no part in the step's sums, so it
could not gather its block); scalars (step counters) as plain tensors, the same on every rank.  So
``torch.distributed.checkpoint`` saves and loads them through ``get_optimizer_state_dict`` /
``set_optimizer_state_dict``, at any world size.  A rank holding no rows of a matrix keeps the
same layout (no rows, and the replicated tensors, received after each step from the rank
holding the first rows), so whichever rank a checkpoint takes them from is right.

MicroAdam's state is kept by the blocks each rank owns, which no DTensor placement describes
(the blocks follow the flattening, torch.chunk's split does not).  Its ``state_dict()`` hands
each tensor out in the whole parameter's coordinates instead, the tensors one process holds
(the window's entries, the error's codes and bucket statistics of every block in order), as a
DTensor ``Shard`` of torch.chunk's split along the blocks' axis, and ``load_state_dict`` moves
them back to the blocks each rank owns (``blocks_saved`` / ``blocks_loaded``: point-to-point
copies between the ranks of the mesh dimension).  The saved tensors do not depend on the world
size, so ``torch.distributed.checkpoint`` reshards them as any other.  With tensor parallelism
(local mode) the coordinates are each TP shard's, the shards' tensors side by side along ``tp``
(``(_StridedShard, Shard)`` of the blocks' axis), so such a checkpoint loads at the same TP size,
any ``dp``.

Those functions create an optimizer's state before loading into it with an all-zero-gradient
step at lr 0, which every optimizer here skips; a skipped parameter without state therefore gets
zero state of its full layout here, which the next real step takes exactly as it takes no state.

Every rank walks the same parameters in the same order, so collectives line up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..distributed.comm import all_reduce
from ..distributed.phases import SplitRunner
from ..distributed.zero_layout import FlatLayout, Piece, owned_rows
from ..linalg import gradient_flags
from .dense_adamw import adamw_step, dense_state
from .matrix import Matrix
from .placements.method import Method, Placement, check_dense_state, param_label
from .placements.zero import OwnedRows
from .state_layout import local


def is_sharded(p: torch.Tensor) -> bool:
    """A DTensor parameter (FSDP2's, or any other wrapper's: ``layout`` refuses what it cannot step)."""
    if not dist.is_available():                 # a torch build without distributed support
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def holds_dtensors(group: dict) -> bool:
    """Whether the group's parameters are DTensors; refuses a group mixing them with plain tensors."""
    sharded = [is_sharded(p) for p in group["params"]]
    if any(sharded) and not all(sharded):
        raise ValueError(
            "a parameter group mixes DTensor (FSDP2) parameters with plain tensors; apply "
            "fully_shard to the root module as well (so every parameter is sharded), or put the "
            "plain ones in a group of their own")
    return bool(sharded) and all(sharded)


@dataclass(frozen=True)
class RowSplit:
    """How a parameter's rows are split over the mesh dimension that shards them: ``(first,
    count)`` per rank of that dimension.  On a 2-D (HSDP) mesh the other dimension replicates:
    each replica steps the same rows the same way, and sums go over the ranks of one replica.

    Combined with tensor parallelism (``tp``), the matrix stepped is either the whole one, its
    rows split over every rank of the mesh (``dim`` None: the mesh flattened), or each TP shard's
    own (``shape``), split over the data-parallel dimension."""

    mesh: object
    dim: int | None                     # the mesh dimension sharding the rows; None: all of them
    spans: tuple[tuple[int, int], ...]
    shape: tuple[int, ...] = ()         # the matrix stepped: the parameter's, or its TP shard's
    tp: TensorParallelShard | None = None

    @property
    def group(self):
        if self.dim is None:
            return _flat_mesh(self.mesh).get_group()
        return self.mesh.get_group(self.dim)

    @property
    def rank(self) -> int:
        if self.dim is None:
            return _flat_rank(self.mesh)
        return self.mesh.get_local_rank(self.dim)

    @property
    def world(self) -> int:
        return len(self.spans)

    @property
    def holders(self) -> tuple[int, ...]:
        return tuple(r for r, (_, count) in enumerate(self.spans) if count)

    @property
    def mine(self) -> tuple[int, int]:
        return self.spans[self.rank]

    def replicas(self, ranks: tuple[int, ...]) -> list[list[int]]:
        """The global ranks of ``ranks`` (of the sharding dimension) in every replica (every
        TP shard, when each is a matrix of its own)."""
        if self.dim is None:
            table = self.mesh.mesh.reshape(1, -1)
        else:
            table = self.mesh.mesh.movedim(self.dim, -1).reshape(-1, self.mesh.size(self.dim))
        return [[int(row[r]) for r in ranks] for row in table]


@dataclass(frozen=True)
class TensorParallelShard:
    """A parameter of a 2-D ``(dp, tp)`` mesh that torch's tensor parallelism shards along
    ``axis`` over the mesh's dimension 1 (``ColwiseParallel``: 0, ``RowwiseParallel``: 1) and
    ``fully_shard`` along its rows over dimension 0, stepped in the group's ``tensor_parallel``
    mode (``distributed.tensor_parallel``)."""

    axis: int
    mode: str
    # the placements of the rows stepped here: the parameter's, or in global mode for a
    # row-wise shard ``(Shard(0), Shard(0))``, to which its weight and gradient are moved
    rows: tuple

    @property
    def moved(self) -> bool:
        return self.mode == "global" and self.axis == 1


def _flat_mesh(mesh):
    """The mesh as one dimension (its ranks in the mesh's order); created once, collectively."""
    return mesh._flatten()


def _flat_rank(mesh) -> int:
    coordinate = mesh.get_coordinate()
    return int(coordinate[0]) * mesh.size(1) + int(coordinate[1])


def _blocks(shape: tuple[int, ...], mesh, placements) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``(local shape, global offset)`` of every rank of a 2-D mesh (in the mesh's order) of a
    tensor of ``shape`` placed ``placements``: what DTensor lays out, ``_StridedShard`` included."""
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    return [_compute_local_shape_and_global_offset(shape, tuple(mesh.shape), [d, t], placements)
            for d in range(mesh.size(0)) for t in range(mesh.size(1))]


def _tensor_parallel_axis(placements) -> int | None:
    """The axis torch's tensor parallelism shards a parameter of a 2-D ``(dp, tp)`` mesh along,
    under ``fully_shard`` over ``dp``: ``(_StridedShard(0), Shard(0))`` for ``ColwiseParallel``,
    ``(Shard(0), Shard(1))`` for ``RowwiseParallel``; None for any other placement."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    dp, tp = placements
    if type(tp) is Shard and tp.dim == 1 and type(dp) is Shard and dp.dim == 0:
        return 1
    if type(tp) is Shard and tp.dim == 0 and isinstance(dp, (Shard, _StridedShard)) and dp.dim == 0:
        return 0
    return None


def layout(label: str, p: torch.Tensor, mode: str = "local") -> RowSplit:
    """The row split of DTensor parameter ``p``, checked against what this rank holds; ``mode``:
    the group's ``tensor_parallel``, for a parameter torch's tensor parallelism shards."""
    from torch.distributed.tensor import Replicate, Shard

    mesh = p.device_mesh
    placements = tuple(p.placements)
    if mesh.ndim == 2 and _tensor_parallel_axis(placements) is not None:
        return _tensor_parallel_layout(label, p, mode)
    if mesh.ndim == 1 and placements == (Shard(0),):
        dim = 0
    elif mesh.ndim == 2 and placements == (Replicate(), Shard(0)):
        dim = 1                                 # HSDP: replicated over dim 0, sharded over dim 1
    elif mesh.ndim == 2 and placements == (Shard(0), Replicate()):
        dim = 0                                 # fully_shard over dp, replicated over tp (a norm, a bias)
    else:
        raise NotImplementedError(
            f"{label}: a DTensor parameter placed {placements} on a {mesh.ndim}-D device mesh; "
            f"ds_lowrank steps FSDP2 parameters sharded Shard(0) on a 1-D mesh (fully_shard), "
            f"(Replicate(), Shard(0)) on a 2-D one (HSDP), and on a 2-D (dp, tp) mesh those of "
            f"parallelize_module(ColwiseParallel / RowwiseParallel) over mesh['tp'] then "
            f"fully_shard over mesh['dp'] (or replicated over tp); apply them in that order, on "
            f"a mesh of those two dimensions (HSDP with tensor parallelism is not supported)")
    world = mesh.size(dim)
    spans = []
    for r in range(world):
        count, first = Shard.local_shard_size_and_offset(p.shape[0], world, r)
        spans.append((int(first), int(count)))
    split = RowSplit(mesh, dim, tuple(spans), tuple(p.shape))
    if p.to_local().shape[0] != split.mine[1]:
        raise RuntimeError(
            f"{label}: this rank holds {p.to_local().shape[0]} rows, where torch.chunk's split of "
            f"{p.shape[0]} rows over {world} ranks gives {split.mine[1]}; this FSDP2 version lays "
            f"out shards in a way ds_lowrank does not understand")
    return split


def _tensor_parallel_layout(label: str, p, mode: str) -> RowSplit:
    """The row split of a parameter torch's tensor parallelism shards on a ``(dp, tp)`` mesh.

    Global mode: the whole matrix, its rows split over every rank of the mesh (a column-wise
    shard's rows, ``(_StridedShard(0), Shard(0))``, are such a split already; a row-wise one's
    weight and gradient are moved to ``(Shard(0), Shard(0))`` for the step and back).  Local
    mode: each TP shard a matrix of its own, its rows split over ``dp``."""
    from torch.distributed.tensor import Shard

    mesh, placements = p.device_mesh, tuple(p.placements)
    axis = _tensor_parallel_axis(placements)
    shape = tuple(p.shape)
    rows = (Shard(0), Shard(0)) if mode == "global" and axis == 1 else placements
    tp = TensorParallelShard(axis, mode, rows)
    blocks = _blocks(shape, mesh, placements)
    me = _flat_rank(mesh)
    if tuple(p.to_local().shape) != tuple(blocks[me][0]):
        raise RuntimeError(
            f"{label}: this rank holds a {tuple(p.to_local().shape)} block of the {shape} parameter "
            f"placed {placements}, where DTensor's layout gives {tuple(blocks[me][0])}; this torch "
            f"version lays out tensor-parallel shards in a way ds_lowrank does not understand")
    if mode == "global":
        held = blocks if rows == placements else _blocks(shape, mesh, rows)
        spans = tuple((int(off[0]), int(size[0])) for size, off in held)
        return RowSplit(mesh, None, spans, shape, tp)
    # local: the TP shard of this rank's tp coordinate, its rows over dp
    t, width = mesh.get_local_rank(1), mesh.size(1)
    mine = [blocks[d * width + t] for d in range(mesh.size(0))]
    lo = min(int(off[axis]) for _, off in mine)
    own = list(shape)
    own[axis] = sum(int(size[axis]) for size, _ in mine) if axis == 0 else int(mine[0][0][axis])
    spans = tuple((int(off[0]) - (lo if axis == 0 else 0), int(size[0])) for size, off in mine)
    return RowSplit(mesh, 0, spans, tuple(own), tp)


# -- state as DTensors ---------------------------------------------------------------------------


def _row_keys(opt, group: dict, shape: tuple[int, ...]) -> set[str]:
    """The state keys split with the parameter's rows (``row_axes``, less those it splits by
    columns; MicroAdam's split by blocks is not a row split and is handled apart)."""
    return set(opt.row_axes(group, shape)) - set(_column_keys(opt, group, shape))


def _column_keys(opt, group: dict, shape: tuple[int, ...]) -> dict[str, int]:
    """The state keys that lie along the matrix's columns, with the axis of each that does
    (``column_axes``: the ``r × n`` part of a projection, Adapprox's column factor)."""
    return {} if _uses_blocks(opt) else opt.column_axes(group, shape)


def column_block(opt, group: dict, p, split: RowSplit) -> tuple[int, int] | None:
    """The columns ``[lo, hi)`` of the state along the columns of compressed matrix ``p``
    (``column_axes``) this rank keeps, or ``None`` where that state is whole on every rank
    (replicated).

    The block of ``Shard`` over the mesh dimension sharding the rows (torch.chunk's split of
    ``n`` over all its ranks; over both dimensions of a ``(dp, tp)`` mesh in turn when the rows
    are split over all of them), so that ``torch.distributed.checkpoint`` saves and reshards it as
    any DTensor.  Every rank of that dimension must hold rows: the step gathers the blocks over
    the ranks holding rows, and a rank holding none takes no part in it."""
    from torch.distributed.tensor import Shard

    shape = split.shape
    if split.world < 2 or len(split.holders) < split.world or not _column_keys(opt, group, shape):
        return None
    if split.dim is None:
        # the whole matrix's rows over the flattened mesh: Shard along both of its dimensions
        size, offset = _blocks((shape[1],), split.mesh, (Shard(0), Shard(0)))[split.rank]
        return int(offset[0]), int(offset[0]) + int(size[0])
    count, lo = Shard.local_shard_size_and_offset(shape[1], split.world, split.rank)
    return int(lo), int(lo) + int(count)


def _as_dtensor(key: str, t: torch.Tensor, p, split: RowSplit, rows: set[str],
                columns: dict[str, int] | None = None, tp_state: TensorParallelState | None = None):
    """State tensor ``t`` of this rank as a DTensor of ``p``'s mesh: by rows, by blocks of
    columns (``columns``: the keys kept so and the axis of each along the columns,
    ``column_block``) or replicated; ``tp_state``: what the placements of a parameter torch's
    tensor parallelism shards need besides (``_tensor_parallel_placement``)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    columns = columns or {}
    if t.dim() == 0:
        return t                                # a counter: the same on every rank
    if split.tp is not None:
        placements, shape = _tensor_parallel_placement(key, t, p, split, rows, columns, tp_state)
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        return DTensor.from_local(t, p.device_mesh, placements, run_check=False, shape=tuple(shape),
                                  stride=stride)
    if key in rows or key in columns:
        if key in rows and t.shape[0] != split.mine[1]:
            raise RuntimeError(f"state {key!r} has {t.shape[0]} rows where the parameter has "
                               f"{split.mine[1]} here")
        dim = 0 if key in rows else columns[key]
        shape = list(t.shape)
        shape[dim] = p.shape[0] if key in rows else p.shape[1]
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        placements = [Shard(dim) if isinstance(pl, Shard) else pl for pl in p.placements]
        return DTensor.from_local(t, p.device_mesh, placements, run_check=False, shape=tuple(shape),
                                  stride=stride)
    return DTensor.from_local(t, p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False)


@dataclass(frozen=True)
class TensorParallelState:
    """Of the state of a parameter torch's tensor parallelism shards: the axis along the
    matrix's columns of each key that has one (``column_axes``, kept in blocks or not), and in
    local mode the size along axis ``dim`` of key ``key`` on every TP shard (``sizes(key, dim,
    here)``, ``here`` for a key the shapes do not list: the size this rank has)."""

    along_columns: dict
    sizes: object = None


def tensor_parallel_state(opt, group: dict, p, split: RowSplit) -> TensorParallelState | None:
    """``TensorParallelState`` of ``p`` (None unless torch's tensor parallelism shards it)."""
    if split.tp is None:
        return None
    along = _column_keys(opt, group, split.shape) if opt.is_compressed(group, p) else {}
    if split.tp.mode == "global":
        return TensorParallelState(along)
    from torch.distributed.tensor import Shard

    axis, width = split.tp.axis, p.device_mesh.size(1)
    shards = []
    for t in range(width):
        shape = list(p.shape)
        shape[axis] = int(Shard.local_shard_size_and_offset(p.shape[axis], width, t)[0])
        shards.append(opt.state_shapes(group, tuple(shape), dtype=p.dtype) if opt.is_compressed(group, p) else {})

    def sizes(key: str, dim: int, here: int) -> list[int]:
        return [s[key][0][dim] if key in s else here for s in shards]
    return TensorParallelState(along, sizes)


def _tensor_parallel_placement(key: str, t: torch.Tensor, p, split: RowSplit, rows: set[str],
                               columns: dict[str, int], tp_state: TensorParallelState):
    """The placements and whole shape of state tensor ``t`` of a parameter torch's tensor
    parallelism shards (see the module's docstring).

    Global mode, the rows over every rank of the mesh: what splits with the rows as the rows
    stepped are placed (``TensorParallelShard.rows``), the blocks of columns ``Shard`` along both
    mesh dimensions (``column_block``), the rest replicated: the whole matrix's state, whatever
    the mesh.  Local mode, each TP shard a matrix of its own: along ``dp`` as on a 1-D mesh;
    along ``tp`` ``Shard`` of the axis that follows the one tensor parallelism splits (its
    ``_StridedShard`` along ``dp`` when ``dp`` splits that axis too, as ``fully_shard`` places a
    column-wise weight), or, for a tensor with no such axis, the TP shards' tensors one after
    the other along its first axis that is not the columns."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    tp, mesh = split.tp, p.device_mesh
    along = tp_state.along_columns if tp_state is not None else {}
    shape = list(t.shape)
    if key in rows and t.shape[0] != split.mine[1]:
        raise RuntimeError(f"state {key!r} has {t.shape[0]} rows where the parameter has {split.mine[1]} here")
    if tp.mode == "global":
        if key in rows:
            shape[0] = p.shape[0]
            return tp.rows, shape
        if key in columns:
            c = columns[key]
            shape[c] = p.shape[1]
            return (Shard(c), Shard(c)), shape
        return (Replicate(), Replicate()), shape

    def stacked(dim: int) -> int:
        return sum(tp_state.sizes(key, dim, t.shape[dim]))
    if key in rows:
        shape[0] = p.shape[0]
        if tp.axis == 1 and t.dim() > 1:
            shape[1] = stacked(1)
        return tuple(p.placements), shape
    if key in along:
        c = along[key]
        blocked = key in columns
        if tp.axis == 1:                        # the TP shards split the columns
            shape[c] = p.shape[1]
            dp = _StridedShard(c, split_factor=mesh.size(1)) if blocked else Replicate()
            return (dp, Shard(c)), shape
        shape[c] = split.shape[1]
        o = 1 - c
        shape[o] = stacked(o)
        return (Shard(c) if blocked else Replicate(), Shard(o)), shape
    shape[0] = stacked(0)
    return (Replicate(), Shard(0)), shape


class FSDP2Shards(Placement):
    """A group of FSDP2 DTensor parameters, for one step: built (and checked, with the other
    ranks agreeing which parameters step) before any parameter moves.  ``bindings``: what the
    optimizer keeps between steps for its FSDP2 groups."""

    def __init__(self, method: Method, group: dict, group_index: int, bindings: "Bindings") -> None:
        self.method, self.group, self.group_index, self.bindings = method, group, group_index, bindings
        self.matrices: list = []        # (Matrix, p, split)
        self.blocks: list = []          # MicroAdam: (label, p, split)
        self.fresh: list = []           # (label, p, split): state to create
        self.dense: list = []           # DTensor parameters stepped by AdamW
        rules = method.rules
        items = []
        for i, p in enumerate(group["params"]):
            label = param_label(group, group_index, i)
            if p.grad is not None:
                items.append((label, p, layout(label, p, _mode(group))))
                _refuse_global_blocks(method, group, label, p, items[-1][2])
        limits = [rules.gradient_limit(group, split.shape, p.dtype) for _, p, split in items]
        over, nonzero = gradient_flags([p.grad.to_local() for _, p, _ in items], limits)
        # a rank holding no rows has seen no nonzero entry (gradient_flags calls an empty tensor
        # neither zero nor past its limit)
        nonzero = [nz and bool(split.mine[1]) for nz, (_, _, split) in zip(nonzero, items)]
        valid = _agree(items, over, nonzero)
        for (label, p, split), ok in zip(items, valid):
            if not ok:
                self.skipped += 1
                if not method.state[p]:
                    self.fresh.append((label, p, split))
                continue
            if not rules.is_compressed(group, p):
                check_dense_state(label, method.state[p])
                self.dense.append(p)
                continue
            method.check_compressed(group, label, p, True)
            _check_tensor_parallel(method, group, label, p, split)
            if _uses_blocks(rules):
                self.blocks.append((label, p, split))
                continue
            m = _matrix(method, group, label, p, split)
            method.check_state(group, m)
            self.matrices.append((m, p, split))

    def rows(self) -> list[tuple[list[Matrix], object]]:
        """Fresh state for the skipped parameters that have none; the rows held here of the
        matrices, by family (``_families``), each with a runner summing over their holders, or
        MicroAdam's owned blocks."""
        method, group = self.method, self.group
        self.made = []
        for label, p, split in self.fresh:
            if _uses_blocks(method.rules) and method.rules.is_compressed(group, p):
                method.state[p] = _fresh_blocks(method, group, label, p, split)
                continue
            if method.rules.is_compressed(group, p):
                m = _matrix(method, group, label, p, split)
                _fresh_state(method, group, m)
                self.made.append((m, p, split))
            else:
                fused = p.is_cuda and p.is_floating_point()
                method.state[p].update(dense_state(p, fused))
        if self.blocks:
            # elementwise per block: no sums between ranks, so no runner
            return [(self._owned_blocks(), None)]
        subgroups = self.bindings.subgroups
        subgroups.ensure([split for _, _, split in self.matrices])
        batches = []
        for family in _families(self.matrices):
            by_holders = {split.holders: split for _, _, split in family}
            runner = SplitRunner(lambda holders, by_holders=by_holders: subgroups.of(by_holders[holders], holders))
            batches.append(([m for m, _, split in family if split.mine[1]], runner))
        return batches

    def finish(self) -> None:
        method, group = self.method, self.group
        for m, p, split in self.matrices:
            _write_back(m, p, split)
        for m, _, split in self.matrices:
            if not split.mine[1]:
                _fresh_state(method, group, m)
        _share_replicated(method.rules, group, self.made + self.matrices)
        for m, p, split in self.made + self.matrices:
            _store(method, group, m, p, split)
        if self.blocks:
            self._store_blocks()
        adamw_step(self.dense, [method.state[p] for p in self.dense], group)

    # -- MicroAdam: top-k blocks cut by shard boundaries ---------------------------------------

    def _owned_blocks(self) -> list[Matrix]:
        """MicroAdam's blocks whose first element each rank holds, with the cut-block exchanges
        of a ZeRO partition (``placements.zero.OwnedRows``): each parameter's local rows are its
        piece of the flattening.  The state is that of the blocks owned here, as on a ZeRO rank."""
        method, group, items = self.method, self.group, self.blocks
        lay = self.block_layout = _block_layout(method.rules, group, self.group_index, self.bindings.block_layouts)
        labels = [label for label, _, _ in items]
        flats = {label: (p.to_local().reshape(-1), p.grad.to_local().reshape(-1)) for label, p, _ in items}
        self.block_states = states = {label: {k: local(v) for k, v in method.state[p].items()}
                                      for label, p, _ in items}
        split = [lb for lb in labels if len(lay.holders[lb]) > 1]
        pieces = [q for q in lay.pieces if q.label in flats and q.numel]
        self.owned = OwnedRows(pieces, lambda q: flats[q.label], lambda q: states[q.label], lay, split,
                               flats[labels[0]][0])
        return self.owned.matrices

    def _store_blocks(self) -> None:
        """After the step: the updates of cut blocks sent back; a rank owning no block of a
        parameter keeps the same keys, empty, and the step counter (every rank's is the same, so
        a checkpoint may take it from any)."""
        method, group = self.method, self.group
        self.owned.finish(group["lr"], group["weight_decay"])
        for label, p, split in self.blocks:
            st = self.block_states[label]
            if split.rank not in self.block_layout.owners[label]:
                if not st:
                    st.update(_fresh_blocks(method, group, label, p, split))
                st["step"] += 1
            method.state[p] = st


def _uses_blocks(opt) -> bool:
    """MicroAdam's rows are top-k blocks of the flattening, not matrix rows."""
    return bool(getattr(opt, "rows_are_blocks", False))


def _agree(items: list, over: list[bool], nonzero: list[bool]) -> list[bool]:
    """Per item, whether it steps, agreed by every rank of its mesh: no entry past its limit on
    any rank, and some nonzero entry on some rank (one all-reduce per mesh)."""
    meshes: dict = {}
    for k, (_, _, split) in enumerate(items):
        meshes.setdefault(split.group, []).append(k)
    valid = [False] * len(items)
    for group, ks in meshes.items():
        # on the parameters' device: NCCL carries no host tensors
        device = items[ks[0]][1].to_local().device
        flags = torch.tensor([[float(over[k]), float(nonzero[k])] for k in ks], device=device)
        agreed = all_reduce(flags, group, op=dist.ReduceOp.MAX, purpose="valid").tolist()
        for k, (o, nz) in zip(ks, agreed):
            valid[k] = o == 0 and nz > 0
    return valid


def _mode(group: dict) -> str:
    return group.get("tensor_parallel", "local")


def _refuse_global_blocks(method: Method, group: dict, label: str, p, split: RowSplit) -> None:
    """MicroAdam in global mode, refused at the first step (taken or skipped) before any state is
    made, as under Megatron tensor parallelism on ZeRO (``placements.megatron.refuse_on_partitions``)."""
    if split.tp is None or split.tp.mode != "global" or not _uses_blocks(method.rules):
        return
    if method.rules.is_compressed(group, p):
        raise NotImplementedError(
            f"{label}: {method.rules.__name__} with tensor_parallel='global' does not run on FSDP2 combined "
            f"with tensor parallelism: its update is elementwise, so the whole matrix adds nothing, and "
            f"its top-k blocks follow the flattening of the matrix each rank steps; use "
            f"tensor_parallel='local' (each TP shard stepped as a parameter of its own)")


def _check_tensor_parallel(method: Method, group: dict, label: str, p, split: RowSplit) -> None:
    """Refuse a shard the group's settings do not fit in local mode, and (MicroAdam) TP shards
    of different sizes, whose block state could not be saved side by side."""
    if split.tp is not None and split.tp.mode == "local" and _uses_blocks(method.rules):
        axis, width = split.tp.axis, p.device_mesh.size(1)
        if p.shape[axis] % width:
            raise NotImplementedError(
                f"{label}: {method.rules.__name__} with tensor_parallel='local' needs tensor-parallel shards "
                f"of one size: its block state is saved as the shards' tensors side by side, which a "
                f"DTensor lays out only in equal parts, and dimension {axis} of the {tuple(p.shape)} "
                f"parameter does not divide by the TP size {width}; make it a multiple of {width}, or put "
                f"the parameter in a group with compress=False")
    if split.tp is not None and split.tp.mode == "local":
        # the settings were checked against the whole matrix; here each TP shard is one
        method.check_shape(group, f"{label} (its tensor-parallel shard, tensor_parallel='local')",
                           torch.empty(split.shape, device="meta"))


def _rows(p, split: RowSplit) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and gradient rows stepped here: what this rank holds, or for a row-wise TP
    shard in global mode the rows ``(Shard(0), Shard(0))`` gives it (an all-to-all over ``tp``),
    which ``_write_back`` returns to the parameter after the step."""
    grad = p.grad
    if split.tp is None or not split.tp.moved:
        return p.to_local(), None if grad is None else grad.to_local()
    mesh = p.device_mesh
    weight = p.detach().redistribute(mesh, split.tp.rows).to_local()
    return weight, None if grad is None else grad.redistribute(mesh, split.tp.rows).to_local()


def _write_back(m: Matrix, p, split: RowSplit) -> None:
    """The updated rows ``_rows`` moved, back into the parameter's layout.  Collective over the mesh."""
    from torch.distributed.tensor import DTensor

    if split.tp is None or not split.tp.moved:
        return
    mesh = p.device_mesh
    rows = DTensor.from_local(m.weight, mesh, split.tp.rows, run_check=False, shape=p.shape, stride=p.stride())
    p.to_local().copy_(rows.redistribute(mesh, p.placements).to_local())


def _matrix(method: Method, group: dict, label: str, p, split: RowSplit) -> Matrix:
    """The rows of ``p`` held here, with their state as local tensors (views of the DTensors)
    and the block of columns of its ``r × n`` state kept here (``column_block``)."""
    state = {k: local(v) for k, v in method.state[p].items()}
    first, count = split.mine
    holders = split.holders
    shape = split.shape
    weight, grad = _rows(p, split)
    if grad is None:
        grad = torch.zeros_like(weight)
    if len(holders) < 2:
        return Matrix(label, weight, grad, state, shape)
    return Matrix(label, weight, grad, state, shape, first, holders,
                  tuple((r, *split.spans[r]) for r in holders), columns=column_block(method.rules, group, p, split))


def _fresh_state(method: Method, group: dict, m: Matrix) -> None:
    """Zero state of the full layout, for a matrix with none: what its first step creates on a
    rank holding rows of it; on one holding none, zeros of ``state_shapes`` (the replicated
    tensors then come from the mesh's rank 0, ``_share_replicated``)."""
    if m.state:
        return
    if not m.weight.shape[0]:
        method.allocate_state(group, m)
        return
    method.complete_state(group, m)


class _Subgroups:
    """Process groups of the ranks holding rows of a matrix, when not all of its mesh
    dimension's ranks do."""

    def __init__(self) -> None:
        self.groups: dict[tuple, object] = {}

    @staticmethod
    def _key(split: RowSplit, holders: tuple[int, ...]) -> tuple:
        return (tuple(split.mesh.mesh.reshape(-1).tolist()), -1 if split.dim is None else split.dim, holders)

    def ensure(self, splits: list[RowSplit]) -> None:
        """Create the missing ones; collective (``new_group``): every rank creates every group,
        those of every replica included, in the same order, even those it is not part of."""
        wanted = {self._key(s, s.holders): s for s in splits if 1 < len(s.holders) < s.world}
        for key in sorted(wanted):
            if key in self.groups:
                continue
            split, me = wanted[key], dist.get_rank()
            for ranks in split.replicas(key[2]):
                group = dist.new_group(ranks)
                if me in ranks:
                    self.groups[key] = group
            self.groups.setdefault(key, None)

    def of(self, split: RowSplit, holders: tuple[int, ...]):
        if len(holders) == split.world:
            return split.group
        return self.groups[self._key(split, holders)]


@dataclass
class Bindings:
    """What an optimizer's FSDP2 groups keep between steps (making either is collective): the
    process groups of the ranks holding rows of a matrix, and MicroAdam's block layouts."""

    subgroups: _Subgroups = field(default_factory=_Subgroups)
    block_layouts: dict = field(default_factory=dict)


def _store(method: Method, group: dict, m: Matrix, p, split: RowSplit) -> None:
    rows = _row_keys(method.rules, group, split.shape)
    columns = _column_keys(method.rules, group, split.shape) if m.columns is not None else {}
    extra = tensor_parallel_state(method.rules, group, p, split)
    method.state[p] = {k: _as_dtensor(k, v, p, split, rows, columns, extra) for k, v in m.state.items()}


def _families(matrices: list) -> list[list]:
    """``matrices`` by the ranks of the group their rows are split over (a mesh dimension's, the
    flattened mesh's), in the same order on every rank: a runner knows a bucket's group by its
    holders, which are positions in that group, so each family is stepped with a runner of its
    own."""
    families: dict = {}
    for item in matrices:
        split = item[2]
        families.setdefault(tuple(map(tuple, split.replicas(tuple(range(split.world))))), []).append(item)
    return [families[key] for key in sorted(families)]


def _share_replicated(opt, group: dict, matrices: list) -> None:
    """Send the replicated state of matrices some ranks hold no rows of from the mesh's rank 0
    (which holds rows of every matrix) to every rank: one broadcast per mesh."""
    meshes: dict = {}
    for m, p, split in matrices:
        if len(split.holders) < split.world:
            meshes.setdefault(split.group, []).append((m, p))
    for mesh_group, ms in meshes.items():
        tensors = []
        for m, p in ms:
            rows = _row_keys(opt, group, m.shape)
            tensors += [m.state[k] for k in sorted(m.state) if k not in rows]
        device = ms[0][1].to_local().device     # counters live on the host; NCCL carries no host tensors
        flat = torch.cat([t.reshape(-1).to(device, torch.float64) for t in tensors])
        dist.broadcast(flat, dist.get_global_rank(mesh_group, 0), group=mesh_group)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view(t.shape))


# -- MicroAdam: blocks of the flattening ------------------------------------------------------


def _owned_blocks(opt, group: dict, p, split: RowSplit) -> list[tuple[int, int]]:
    """Per rank of the mesh dimension, ``(first, count)`` of the blocks of ``p``'s flattening it
    owns: those whose first element is in its rows (``zero_layout.owned_rows``); in local
    tensor-parallel mode, of its TP shard's flattening."""
    shape = split.shape
    n, width = opt.row_length(group, shape), math.prod(shape[1:])
    spans = []
    for r, (first, count) in enumerate(split.spans):
        rows = owned_rows(Piece("", shape, first * width, (first + count) * width, 0, r), n)
        spans.append((rows.first, rows.count))
    return spans


def _fresh_blocks(method: Method, group: dict, label: str, p, split: RowSplit) -> dict:
    """The state of a step not yet taken, of the blocks of ``p`` owned here (none: the same keys,
    empty): what the first step would create."""
    first, count = _owned_blocks(method.rules, group, p, split)[split.rank]
    n, numel = method.rules.row_length(group, split.shape), math.prod(split.shape)
    span = min((first + count) * n, numel) - first * n if count else 0
    held = p.to_local().new_zeros(()).expand(span)      # sizes the state; never written
    m = Matrix(label, held, held, {}, split.shape)
    method.init_state(group, m)
    return m.state


def _chunk(size: int, world: int, rank: int) -> tuple[int, int]:
    """``[lo, hi)`` of ``size`` held by ``rank`` under torch.chunk's split (``Shard``)."""
    from torch.distributed.tensor import Shard

    count, lo = Shard.local_shard_size_and_offset(size, world, rank)
    return int(lo), int(lo) + int(count)


def _move(moves: list, split: RowSplit) -> list[torch.Tensor]:
    """Per ``(t, dim, have, want)`` of ``moves``, the part ``want[me]`` along ``dim`` of a tensor of
    which rank ``r`` of the mesh dimension holds ``have[r]`` (``t``: this rank's part), by
    point-to-point copies of the overlaps, all in one batch.  Collective over the mesh
    dimension; bytes are sent as they are (any dtype)."""
    me = split.rank
    ops, received, outs = [], [], []
    for t, dim, have, want in moves:
        lo, hi = want[me]
        shape = list(t.shape)
        shape[dim] = hi - lo
        out = t.new_empty(shape)
        outs.append(out)
        for r in range(split.world):
            if r == me:
                a, b = max(have[me][0], lo), min(have[me][1], hi)
                if a < b:
                    out.narrow(dim, a - lo, b - a).copy_(t.narrow(dim, a - have[me][0], b - a))
                continue
            peer = dist.get_global_rank(split.group, r)
            a, b = max(have[me][0], want[r][0]), min(have[me][1], want[r][1])
            if a < b:
                part = t.narrow(dim, a - have[me][0], b - a).contiguous()
                ops.append(dist.P2POp(dist.isend, _as_bytes(part), peer, split.group))
            a, b = max(have[r][0], lo), min(have[r][1], hi)
            if a < b:
                shape[dim] = b - a
                part = t.new_empty(shape)
                ops.append(dist.P2POp(dist.irecv, _as_bytes(part), peer, split.group))
                received.append((out, dim, a - lo, part))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    for out, dim, at, part in received:
        out.narrow(dim, at, part.shape[dim]).copy_(part)
    return outs


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes (gloo carries not every dtype: int16 indices, bf16 values)."""
    return t.reshape(-1).view(torch.uint8)


def _block_axes(opt, group: dict, p, split: RowSplit):
    """Per state key kept by blocks: its axis, the span of it each rank owns, and its whole size
    (of the matrix stepped: the parameter, or its TP shard)."""
    shape = split.shape
    owned = _owned_blocks(opt, group, p, split)
    total = -(-math.prod(shape) // opt.row_length(group, shape))
    for key, (dim, at) in opt.row_axes(group, shape).items():
        yield key, dim, [(at(first), at(first + count)) for first, count in owned], at(total)


def _block_params(opt):
    """``(label, group, p, split)`` of the DTensor parameters whose state is kept by blocks."""
    for gi, group in enumerate(opt.param_groups):
        for i, p in enumerate(group["params"]):
            if is_sharded(p) and opt.is_compressed(group, p):
                label = param_label(group, gi, i)
                yield label, group, p, layout(label, p, _mode(group))


def blocks_saved(opt, sd: dict) -> dict:
    """``sd`` (``state_dict()``) with the state of each parameter kept by blocks in the whole
    parameter's coordinates: per key, a DTensor ``Shard`` of torch.chunk's split along the axis
    of the blocks, holding what one process holds; the step counter and ``layout`` as they are.
    Collective over each parameter's mesh."""
    if not _uses_blocks(opt):
        return sd
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    for label, group, p, split in _block_params(opt):
        st = opt.state.get(p)
        if not st:
            continue
        saved = {k: v for k, v in st.items() if k not in opt.row_axes(group, split.shape)}
        axes = list(_block_axes(opt, group, p, split))
        parts = _move([(local(st[key]), dim, owned, [_chunk(size, split.world, r) for r in range(split.world)])
                       for key, dim, owned, size in axes], split)
        for (key, dim, _, size), part in zip(axes, parts):
            saved[key] = _sharded(part, p, split, dim, size)
        sd["state"][index[id(p)]] = saved
    return sd


def blocks_loaded(opt) -> None:
    """After ``load_state_dict`` of what ``blocks_saved`` handed out (at this world size or
    another): each parameter's state moved back to the blocks owned here.  Collective."""
    from torch.distributed.tensor import DTensor

    if not _uses_blocks(opt):
        return
    for label, group, p, split in _block_params(opt):
        st = opt.state.get(p)
        if not st or not any(isinstance(v, DTensor) for v in st.values()):
            continue
        kept = {k: v for k, v in st.items() if k not in opt.row_axes(group, split.shape)}
        moves = []
        for key, dim, owned, size in _block_axes(opt, group, p, split):
            v = st.get(key)
            if not isinstance(v, DTensor) or v.shape[dim] != size * _shards(p, split):
                raise ValueError(
                    f"{label}: the saved {type(opt).__name__} state {key!r} is "
                    f"{'missing' if v is None else f'of shape {tuple(v.shape)}'}, where this group's settings "
                    f"(block_size {group['block_size']}, density {group['density']}, bucket_size "
                    f"{group['bucket_size']}, window {group['window']}) keep {size * _shards(p, split)} along "
                    f"dimension {dim}{_per_shard(p, split, size)}; load it with the settings it was saved with"
                    f"{'' if split.tp is None else ', at the TP size it was saved at'}")
            moves.append((key, (v.to_local(), dim, [_chunk(size, split.world, r) for r in range(split.world)],
                                owned)))
        kept.update(zip([key for key, _ in moves], _move([move for _, move in moves], split)))
        opt.state[p] = kept


def _shards(p, split: RowSplit) -> int:
    """How many matrices' block tensors a saved one holds side by side: the TP shards (local mode)."""
    return 1 if split.tp is None else p.device_mesh.size(1)


def _per_shard(p, split: RowSplit, size: int) -> str:
    """What ``blocks_loaded``'s refusal adds for a TP shard: each shard's part of the size it expects."""
    return "" if split.tp is None else f" ({size} for each of the {_shards(p, split)} tensor-parallel shards)"


def _sharded(part: torch.Tensor, p, split: RowSplit, dim: int, size: int):
    """This rank's chunk ``part`` of a tensor of ``size`` along ``dim``, as a DTensor of ``p``'s
    mesh sharded there (replicated over HSDP's other dimension).  For a TP shard (local mode) the
    shards' tensors lie side by side along ``dim`` over ``tp``, each split over ``dp``:
    ``(_StridedShard(dim), Shard(dim))``, torch.chunk's split twice, which needs shards of one
    size (``_check_tensor_parallel``)."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    shape = list(part.shape)
    shape[dim] = size * _shards(p, split)
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    if split.tp is not None:
        placements = [_StridedShard(dim, split_factor=_shards(p, split)), Shard(dim)]
    else:
        placements = [Shard(dim) if isinstance(pl, Shard) else pl for pl in p.placements]
    return DTensor.from_local(part, p.device_mesh, placements, run_check=False, shape=tuple(shape), stride=stride)


def _block_layout(opt, group: dict, group_index: int, cache: dict) -> FlatLayout:
    """The pieces of every rank of the parameters of group ``group_index`` (their rows' span of
    the flattening), bound once per group (``cache``: creating the subgroups is collective)."""
    key = ("blocks", group_index)
    if key in cache:
        return cache[key]
    split0 = None
    pieces, holders = [], {}
    for i, p in enumerate(group["params"]):
        label = param_label(group, group_index, i)
        if not opt.is_compressed(group, p):
            continue
        split = layout(label, p, _mode(group))
        split0 = split0 or split
        shape = split.shape                     # the parameter, or its TP shard (local mode)
        width = math.prod(shape[1:])
        qs = [Piece(label, shape, first * width, (first + count) * width, 0, r)
              for r, (first, count) in enumerate(split.spans)]
        pieces.append(qs[split.rank])
        holders[label] = [q for q in qs if q.numel]
    lay = FlatLayout(pieces, holders, split0.group, split0.rank, split0.world)
    for label, qs in holders.items():
        lay.cut_into_rows(label, opt.row_length(group, qs[0].shape))
    cache[key] = lay
    return lay


# -- whole states (conversions) -----------------------------------------------------------------


def _no_tensor_parallel(label: str, split: RowSplit) -> RowSplit:
    if split.tp is not None:
        raise NotImplementedError(
            f"{label}: converting the state of a parameter torch's tensor parallelism shards (to or "
            f"from torch's AdamW) is not supported; convert on a model sharded by fully_shard alone, "
            f"save it with torch.distributed.checkpoint and load that into the tensor-parallel one "
            f"(tensor_parallel='global')")
    return split


def cut_rows(p: torch.Tensor, label: str, whole: torch.Tensor) -> torch.Tensor:
    """A tensor laid out like parameter ``p`` (whole), as ``p`` is placed: its rows held here as
    a DTensor for a DTensor ``p``, itself otherwise."""
    if not is_sharded(p):
        return whole.to(p.device)
    split = _no_tensor_parallel(label, layout(label, p))
    first, count = split.mine
    held = whole.to(p.to_local().device).narrow(0, first, count).contiguous()
    return _as_dtensor("rows", held, p, split, {"rows"})


def cut_whole_state(opt, group: dict, label: str, p: torch.Tensor, whole: dict) -> dict:
    """The state ``opt`` keeps of parameter ``p`` from the whole state one process holds: for a
    DTensor ``p``, its rows held here of the tensors split with the rows (``row_axes``), its
    block of those along the columns (``column_block``) and the others whole, as DTensors (see the
    module's docstring)."""
    if not is_sharded(p):
        return {k: v.to(p.device).clone() for k, v in whole.items()}
    split = _no_tensor_parallel(label, layout(label, p, _mode(group)))
    first, count = split.mine
    rows = _row_keys(opt, group, tuple(p.shape))
    block = column_block(opt, group, p, split) if opt.is_compressed(group, p) else None
    columns = _column_keys(opt, group, tuple(p.shape)) if block is not None else {}
    device = p.to_local().device
    out = {}
    for key, v in whole.items():
        if key in rows:
            v = v.narrow(0, first, count)
        elif key in columns:
            v = v.narrow(columns[key], block[0], block[1] - block[0])
        v = v.to(device if key not in opt.host_keys else "cpu").clone()
        out[key] = _as_dtensor(key, v.contiguous(), p, split, rows, columns)
    return out
