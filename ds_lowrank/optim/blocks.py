"""Fused weights stepped as their logical blocks (``distributed.fused`` says where the blocks are).

- ``tensor_parallel="local"`` (and any parameter not split between TP ranks): each block of a
  shard (``gate``, ``up``; ``q``, ``k``, ``v``) is a matrix of its own, with its own subspace and
  state, as if the shard's blocks were separate parameters.
- ``"global"``: each block is the rows this rank holds of the whole logical matrix, summed over
  the TP group like any global shard, so every TP size steps what one process steps on the
  unfused logical matrices.

A block is compressed or kept dense (AdamW) by its own shape, as a separate parameter of that
shape would be.  Its state is ``optimizer.state[p][<block>]``; blocks whose rows are not one span
of the parameter (``q`` of several query groups) are worked on as copies, written back after
the step.  A fused parameter is checked and skipped as a whole (its gradient limit is the fused
matrix's, below each block's).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..distributed import fused
from ..distributed.tensor_parallel import TensorParallel, megatron_group
from . import state_layout
from .matrix import Matrix


def block_label(label: str, block: fused.Block) -> str:
    return state_layout.block_label(label, block.name)


def block_shape(block: fused.Block, p: torch.Tensor, world: int | None) -> tuple[int, int]:
    """The matrix a block is: its rows of ``p``, or (``world``: global mode) the whole logical one."""
    return (block.rows * (world or 1), p.shape[1])


def _known_world(opt, group: dict, p: torch.Tensor) -> int | None:
    """The TP size of a global shard if its group is known yet (Megatron's, or one set), else None."""
    if not opt._global_shard(group, p):
        return None
    tp_group = opt._tp_group if opt._tp_group is not None else megatron_group()
    return None if tp_group is None else dist.get_world_size(tp_group)


def check_blocks(opt, group: dict, label: str, p: torch.Tensor) -> None:
    """At construction: the layout, and every block the group would compress checked as the
    matrix it is (in global mode the whole logical one, once the TP group is known: else again
    at ``set_tensor_parallel_group`` and at the first step)."""
    layout = fused.blocks(label, p)
    world = _known_world(opt, group, p)
    if world is not None:
        fused.check_world(label, p, world)
    elif opt._global_shard(group, p):
        return
    for b in layout:
        shape = block_shape(b, p, world)
        if opt.is_lowrank_shape(group, shape):
            opt._check_compressed(group, block_label(label, b), torch.empty(shape, device="meta", dtype=p.dtype))


def check_groups(opt) -> None:
    """``check_blocks`` on every compressed fused weight of ``opt`` (its TP group has changed)."""
    for group, originals in zip(opt.param_groups, opt._originals):
        for label, p in originals:
            if opt._splits(p) and opt.is_lowrank(group, p):
                check_blocks(opt, group, label, p)


def refuse_on_partitions(opt, group: dict, originals: list) -> None:
    """ZeRO cuts its flat partitions at any element, not at the blocks of a fused weight."""
    found = [label for label, p in originals if opt._splits(p) and opt.is_lowrank(group, p)]
    if found:
        raise NotImplementedError(
            f"{found[0]}: fused weights (partition_stride > 1, {fused.QKV_ATTRIBUTE}) are stepped as their "
            f"blocks, which ZeRO's flat partitions do not keep apart: use ZeRO stage 0 with tensor "
            f"parallelism, or put them in a group with lowrank=False")


def block_matrices(opt, group: dict, label: str, p: torch.Tensor, tensor_parallel: TensorParallel | None,
                   step: "BlockStep") -> list[Matrix]:
    """The compressed blocks of ``p`` as ``Matrix`` objects (``tensor_parallel``: global mode);
    the others go to ``step``'s AdamW."""
    from .base import _check_dense_state

    state = opt.state[p]
    loose = sorted(k for k, v in state.items() if not isinstance(v, dict))
    if loose:
        raise ValueError(f"{label}: its state {loose} is of the whole fused weight, but its blocks are now "
                         f"stepped as separate matrices; load state saved with its fused layout declared")
    world = None
    if tensor_parallel is not None:
        world = tensor_parallel.world
        fused.check_world(label, p, world)
    matrices = []
    for b in fused.blocks(label, p):
        name, shape = block_label(label, b), block_shape(b, p, world)
        st = state.setdefault(b.name, {})
        weight, grad = step.rows(p, b)
        if not opt.is_lowrank_shape(group, shape):
            _check_dense_state(name, st)
            step.add_dense(weight, grad, st)
            continue
        opt._check_compressed(group, name, torch.empty(shape, device="meta", dtype=p.dtype))
        if tensor_parallel is None:
            m = Matrix(name, weight, grad, st, shape)
        else:
            m = Matrix(name, weight, grad, st, shape, tensor_parallel.rank * b.rows, tensor_parallel.holders,
                       ("tp", 0), 0)
        opt._check_state(group, m)
        matrices.append(m)
    return matrices


class BlockStep:
    """The blocks of one step's fused parameters: the rows each block works on (a view where the
    block is one span of rows, else a copy written back after the step), and AdamW on the blocks
    kept dense."""

    def __init__(self) -> None:
        self.copies: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.dense: list[tuple[torch.Tensor, torch.Tensor, dict]] = []

    def rows(self, p: torch.Tensor, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's weight rows (updated in place) and gradient rows."""
        if len(block.spans) == 1:
            start, stop = block.spans[0]
            return p.detach()[start:stop], p.grad[start:stop]
        index = block.index(p.device)
        weight = p.detach().index_select(0, index)
        self.copies.append((p, index, weight))
        return weight, p.grad.index_select(0, index)

    def add_dense(self, weight: torch.Tensor, grad: torch.Tensor, state: dict) -> None:
        self.dense.append((weight, grad, state))

    def finish(self, group: dict) -> None:
        from .dense_adamw import adamw_step

        weights = [w for w, _, _ in self.dense]
        for w, g, _ in self.dense:
            w.grad = g
        adamw_step(weights, [st for _, _, st in self.dense], group)
        for w in weights:
            w.grad = None
        for p, index, weight in self.copies:
            p.detach().index_copy_(0, index, weight)
