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
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import all_reduce
from .phases import SplitRunner

MODES = ("local", "global")


def is_shard(p: torch.Tensor) -> bool:
    """A Megatron tensor-parallel shard of a matrix."""
    return bool(getattr(p, "tensor_model_parallel", False)) and p.dim() == 2


def megatron_group():
    """Megatron's tensor-parallel process group, once ``megatron.core.parallel_state`` has one."""
    try:
        from megatron.core import parallel_state
    except ImportError:
        return None
    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_tensor_model_parallel_group()


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

    def runner(self, device: torch.device) -> SplitRunner:
        return SplitRunner(lambda holders: self.group, device)
