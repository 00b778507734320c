"""The logical blocks of a fused weight (``distributed.fused`` says where they are) as the
matrices the optimizers step: their names and shapes.  The Megatron placement
(``placements.megatron``) steps them; checkpoint tools and diagnostics name their state."""

from __future__ import annotations

import torch

from ..distributed import fused
from ..distributed.tensor_parallel import shard_shape
from . import state_layout


def block_label(label: str, block: fused.Block) -> str:
    return state_layout.block_label(label, block.name)


def block_shape(block: fused.Block, p: torch.Tensor, world: int | None) -> tuple[int, int]:
    """The matrix a block is: its rows of ``p``, or (``world``: global mode) the whole logical one."""
    return (block.rows * (world or 1), shard_shape(p)[1])
