"""The Megatron placement: tensor-parallel shards stepped as parts of the whole matrix, and fused
weights stepped as their logical blocks.

- A shard of a group with ``tensor_parallel="global"`` is the rows (column-parallel) or columns
  (row-parallel) this rank holds of the whole matrix: the algorithms' sums go over the TP group
  (``TensorParallel.runner``), so every TP size steps what one process steps on the whole
  matrix.  Whether it is compressed, and its gradient limit, are the whole matrix's; the TP
  ranks agree on which shards step.  (A shard of a ``"local"`` group is a matrix of its own: the
  whole-tensor placement.)
- A fused weight (``distributed.fused``: SwiGLU's gate and up, QKV) is stepped as its blocks:

  - ``tensor_parallel="local"`` (and any parameter not split between TP ranks): each block of a
    shard (``gate``, ``up``; ``q``, ``k``, ``v``) is a matrix of its own, with its own subspace and
    state, as if the shard's blocks were separate parameters.
  - ``"global"``: each block is the rows this rank holds of the whole logical matrix, summed over
    the TP group like any global shard, so every TP size steps what one process steps on the
    unfused logical matrices.

  A block is compressed or kept dense (AdamW) by its own shape, as a separate parameter of that
  shape would be.  Its state is ``optimizer.state[p][<block>]``; blocks whose rows are not one
  span of the parameter (``q`` of several query groups) are worked on as copies, written back
  after the step.  A fused parameter is checked and skipped as a whole (its gradient limit is the
  fused matrix's, below each block's).
"""

from __future__ import annotations

import torch

from ...distributed import fused
from ...distributed import tensor_parallel as tp
from ...distributed.reducer import LOCAL_RUNNER
from ...distributed.tensor_parallel import TensorParallel
from ...linalg import gradient_flags
from ...utils.profiling import phase
from ..blocks import block_label, block_shape
from ..dense_adamw import adamw_step
from ..matrix import Matrix
from ..state_layout import METADATA
from .method import Method, Placement, check_dense_state


def stepped_as_blocks(rules, p: torch.Tensor) -> bool:
    """Whether the optimizer class ``rules`` steps ``p`` as the blocks of a fused weight."""
    return rules.splits_fused and fused.is_fused(p)


class MegatronShards(Placement):
    """A group's global tensor-parallel shards and fused weights, for one step.

    ``items``: ``(label, p, whole_shape)`` of the parameters with a gradient, ``whole_shape``
    the whole matrix's for a global shard, ``None`` for a fused weight held as it is here;
    ``tensor_parallel``: the TP group when any is a global shard."""

    def __init__(self, method: Method, group: dict, items: list, tensor_parallel: TensorParallel | None) -> None:
        self.group = group
        limits = [method.rules.gradient_limit(group, shape or tuple(p.shape), p.dtype) for _, p, shape in items]
        with phase("checks"):
            over, nonzero = gradient_flags([p.grad for _, p, _ in items], limits)
        valid = [not o and nz for o, nz in zip(over, nonzero)]
        shards = [k for k, (_, _, shape) in enumerate(items) if shape is not None]
        if shards:
            # a global shard's flags are the whole matrix's, agreed by its TP ranks (they take
            # the step's sums together): past the limit on any rank, or zero on every rank (a
            # shard alone may be all zero)
            flags = torch.tensor([[float(over[k]), float(nonzero[k])] for k in shards])
            for k, (o, nz) in zip(shards, tensor_parallel.agree(flags).tolist()):
                valid[k] = o == 0 and nz > 0
        self.skipped = valid.count(False)
        self.matrices, self.dense, self.blocks = [], [], BlockStep()
        for (label, p, shape), ok in zip(items, valid):
            if not ok:
                continue
            if stepped_as_blocks(method.rules, p):
                held_by = tensor_parallel if shape is not None else None
                self.matrices += block_matrices(method, group, label, p, held_by, self.blocks)
            elif not method.rules.is_compressed_shape(group, shape):
                # compressed, the whole matrix would cost more than AdamW: AdamW, elementwise
                check_dense_state(label, method.state[p])
                self.dense.append((p, method.state[p]))
            else:
                method.check_compressed(group, label, p, False)
                method.check_shape(group, label, torch.empty(shape, device="meta"))
                m = Matrix(label, p, p.grad, method.state[p], shape, tensor_parallel.first(p),
                           tensor_parallel.holders, ("tp", p.partition_dim), p.partition_dim)
                method.check_state(group, m)
                self.matrices.append(m)
        self.runner = tensor_parallel.runner() if tensor_parallel is not None else LOCAL_RUNNER

    def rows(self) -> list[tuple[list[Matrix], object]]:
        return [(self.matrices, self.runner)]

    def finish(self) -> None:
        self.blocks.finish(self.group)
        with phase("dense_adamw"):
            adamw_step([p for p, _ in self.dense], [st for _, st in self.dense], self.group)


# -- fused weights' blocks -------------------------------------------------------------------


def check_blocks(method: Method, group: dict, label: str, p: torch.Tensor, world: int | None,
                 global_shard: bool) -> None:
    """At construction: the layout, and every block the group would compress checked as the
    matrix it is (in global mode the whole logical one, once the TP size ``world`` is known:
    else again when the TP group is set and at the first step)."""
    layout = fused.blocks(label, p)
    if world is not None:
        fused.check_world(label, p, world)
    elif global_shard:
        return
    for b in layout:
        shape = block_shape(b, p, world)
        if method.rules.is_compressed_shape(group, shape):
            method.check_compressed(group, block_label(label, b), torch.empty(shape, device="meta", dtype=p.dtype),
                                    True)


def fused_weights(rules, group: dict, originals: list) -> dict[str, tuple[torch.Tensor, tuple[fused.Block, ...]]]:
    """The fused weights of ``originals`` that the optimizer class ``rules`` steps as their blocks
    in ``group``, label -> ``(parameter, blocks)``; from the shapes the model made (ZeRO-3 empties
    the parameters), so it holds on a ZeRO partition too."""
    return {label: (p, fused.blocks(label, p)) for label, p in originals
            if stepped_as_blocks(rules, p)
            and rules.is_compressed_shape({**group, "within_adamw": False}, tp.shard_shape(p))}


def refuse_on_partitions(rules, group: dict, originals: list) -> None:
    """An optimizer whose rows are top-k blocks of each rank's flattening (MicroAdam) has no whole
    matrix to step in ``tensor_parallel="global"`` mode on ZeRO flat partitions.  (Fused weights
    run there: a partition's rows are cut into their blocks, ``placements.zero``.)"""
    if (getattr(rules, "rows_are_blocks", False) and group.get("tensor_parallel", "local") == "global"
            and any(tp.is_shard(p) for _, p in originals)):
        name = rules.__name__ if isinstance(rules, type) else type(rules).__name__
        raise NotImplementedError(
            f"{name} with tensor_parallel='global' does not run on ZeRO flat partitions: its top-k blocks "
            f"follow each rank's flattening, which a row-parallel shard's columns cut into pieces of other "
            f"blocks, and its update is elementwise, so the whole matrix adds nothing; use "
            f"tensor_parallel='local'")


def check_block_state(label: str, state: dict) -> None:
    """Refuse to step as its blocks a fused weight whose state is the whole weight's (``state``:
    its entry, or its ZeRO piece's, whose metadata is not state)."""
    loose = sorted(k for k, v in state.items() if k not in METADATA and not isinstance(v, dict))
    if loose:
        raise ValueError(f"{label}: its state {loose} is of the whole fused weight, but its blocks are now "
                         f"stepped as separate matrices; load state saved with its fused layout declared")


def block_matrices(method: Method, group: dict, label: str, p: torch.Tensor, tensor_parallel: TensorParallel | None,
                   step: "BlockStep") -> list[Matrix]:
    """The compressed blocks of ``p`` as ``Matrix`` objects (``tensor_parallel``: global mode);
    the others go to ``step``'s AdamW."""
    state = method.state[p]
    check_block_state(label, state)
    world = None
    if tensor_parallel is not None:
        world = tensor_parallel.world
        fused.check_world(label, p, world)
    matrices = []
    for b in fused.blocks(label, p):
        name, shape = block_label(label, b), block_shape(b, p, world)
        st = state.setdefault(b.name, {})
        weight, grad = step.rows(p.detach(), p.grad, b.spans)
        if not method.rules.is_compressed_shape(group, shape):
            check_dense_state(name, st)
            step.add_dense(weight, grad, st)
            continue
        method.check_compressed(group, name, torch.empty(shape, device="meta", dtype=p.dtype), True)
        if tensor_parallel is None:
            m = Matrix(name, weight, grad, st, shape)
        else:
            m = Matrix(name, weight, grad, st, shape, tensor_parallel.rank * b.rows, tensor_parallel.holders,
                       ("tp", 0), 0)
        method.check_state(group, m)
        matrices.append(m)
    return matrices


class BlockStep:
    """The blocks of one step's fused parameters: the rows each block works on (a view where the
    block is one span of rows, else a copy written back after the step), and AdamW on the blocks
    kept dense.  Shared with ZeRO partitions, whose rows of a fused weight are cut the same way
    (``placements.zero.FusedBlockRows``)."""

    def __init__(self) -> None:
        self.copies: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.dense: list[tuple[torch.Tensor, torch.Tensor, dict]] = []

    def rows(self, weight: torch.Tensor, grad: torch.Tensor, spans: tuple[tuple[int, int], ...]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``spans`` of ``weight`` (updated in place, through a copy where they are not one
        range) and of ``grad``."""
        if len(spans) == 1:
            start, stop = spans[0]
            return weight[start:stop], grad[start:stop]
        index = fused.span_index(spans, weight.device)
        rows = weight.index_select(0, index)
        self.copies.append((weight, index, rows))
        return rows, grad.index_select(0, index)

    def add_dense(self, weight: torch.Tensor, grad: torch.Tensor, state: dict) -> None:
        self.dense.append((weight, grad, state))

    def finish(self, group: dict) -> None:
        weights = [w for w, _, _ in self.dense]
        for w, g, _ in self.dense:
            w.grad = g
        adamw_step(weights, [st for _, _, st in self.dense], group)
        for w in weights:
            w.grad = None
        for weight, index, rows in self.copies:
            weight.index_copy_(0, index, rows)
