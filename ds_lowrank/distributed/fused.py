"""Fused weights: one parameter holding several logical matrices as blocks of its rows.

megatron-core fuses two kinds of weights, and a tensor-parallel rank's shard of each interleaves
the logical matrices:

- ``partition_stride = s > 1`` (SwiGLU's ``linear_fc1``, ``s = 2``): the whole weight is ``s``
  logical matrices stacked (``[gate; up]``), each cut into TP row blocks, and rank ``r`` holds
  ``[rows r of gate; rows r of up]`` (megatron-core's initializers give rank ``r`` the chunks
  ``r, r + world, ...``).  Megatron marks the parameter itself.
- fused QKV of grouped-query attention (``linear_qkv``): the ``G`` query groups are split between
  the TP ranks, and each group is ``[its H/G query heads; its key head; its value head]`` rows of
  ``d`` per head (``get_query_key_value_tensors``).  The parameter carries no mark of this, so the
  optimizer reads the attribute :data:`QKV_ATTRIBUTE`, ``(H, G, d)`` of the whole model:
  ``lowrank_param_groups`` sets it on megatron-core attention modules, users may set it on any
  weight laid out this way.

Each block is named (``gate``, ``up``; ``q``, ``k``, ``v``) and, in the optimizer, labelled
``<parameter>[<block>]``.  A block is the same number of rows on every TP rank, so in
``tensor_parallel="global"`` mode rank ``r``'s block is rows ``r·h ... (r+1)·h`` of the whole
logical matrix (``h`` rows per rank).  This module knows only the layouts; what the optimizer does
with the blocks is in ``optim.base``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tensor_parallel import shard_shape

# (num_attention_heads, num_query_groups, head_dim) of the whole model, on a fused QKV weight
QKV_ATTRIBUTE = "fused_qkv"


@dataclass(frozen=True)
class Block:
    """A logical matrix inside a fused parameter: rows ``spans`` of the parameter (or of this
    rank's shard), in the order of the logical matrix."""

    name: str
    spans: tuple[tuple[int, int], ...]

    @property
    def rows(self) -> int:
        return sum(stop - start for start, stop in self.spans)

    def index(self, device: torch.device) -> torch.Tensor:
        return span_index(self.spans, device)

    def within(self, first: int, count: int) -> tuple[int, tuple[tuple[int, int], ...]]:
        """Of rows ``[first, first + count)`` of the parameter (a ZeRO piece's owned rows): the
        index in the block of the first of its rows among them, and where they lie, as spans
        relative to ``first``.  A range of the parameter's rows holds consecutive rows of each
        block (the spans are in the block's order), so what a piece owns of a block is one
        range of the logical matrix's rows."""
        at = sum(min(max(first - a, 0), b - a) for a, b in self.spans)
        spans = tuple((max(a, first) - first, min(b, first + count) - first) for a, b in self.spans
                      if max(a, first) < min(b, first + count))
        return at, spans


def span_index(spans: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    """The row indices of ``spans``, in order."""
    return torch.cat([torch.arange(a, b, device=device) for a, b in spans])


def is_fused(p: torch.Tensor) -> bool:
    """Whether ``p`` is a matrix declaring a fused layout (Megatron's stride or
    :data:`QKV_ATTRIBUTE`); a stride on a vector (the fused layer's bias) changes nothing for an
    elementwise update."""
    if len(shard_shape(p)) != 2:
        return False
    stride = getattr(p, "partition_stride", 1) if getattr(p, "tensor_model_parallel", False) else 1
    return stride != 1 or getattr(p, QKV_ATTRIBUTE, None) is not None


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def blocks(label: str, p: torch.Tensor) -> tuple[Block, ...] | None:
    """The logical blocks of ``p`` (this rank's shard of it), ``None`` for a parameter that is
    not fused; a ValueError naming ``label`` for a layout the optimizers cannot split."""
    if not is_fused(p):
        return None
    return blocks_of(label, shard_shape(p)[0], record(p))


def record(p: torch.Tensor) -> dict:
    """What says how ``p`` is fused, as plain values: the optimizers save it with their state, so
    that the checkpoint tools find the blocks of a saved shard (:func:`blocks_of`) without the
    model."""
    stride = getattr(p, "partition_stride", 1) if getattr(p, "tensor_model_parallel", False) else 1
    qkv = getattr(p, QKV_ATTRIBUTE, None)
    return {"partition_stride": stride, QKV_ATTRIBUTE: qkv,
            "partition_dim": getattr(p, "partition_dim", 0) if getattr(p, "tensor_model_parallel", False) else 0}


def blocks_of(label: str, rows: int, layout: dict) -> tuple[Block, ...]:
    """The logical blocks of a fused weight (or shard) of ``rows`` rows laid out as ``layout``
    (:func:`record`)."""
    stride, qkv = layout["partition_stride"], layout[QKV_ATTRIBUTE]
    if stride != 1 and qkv is not None:
        raise ValueError(f"{label}: both partition_stride={stride} and {QKV_ATTRIBUTE}={qkv!r}; a fused "
                         f"weight has one layout, remove one of them")
    if layout["partition_dim"] != 0:
        raise ValueError(f"{label}: a fused weight split between tensor-parallel ranks along its columns "
                         f"(partition_dim={layout['partition_dim']}) is not supported; only column-parallel "
                         f"layers (partition_dim=0) fuse their rows")
    if qkv is None:
        if not _positive_int(stride) or rows % stride:
            raise ValueError(f"{label}: partition_stride={stride!r} must be a positive integer dividing "
                             f"the shard's {rows} rows into equal blocks")
        h = rows // stride
        names = ("gate", "up") if stride == 2 else tuple(f"part{i}" for i in range(stride))
        return tuple(Block(name, ((i * h, (i + 1) * h),)) for i, name in enumerate(names))
    if not (isinstance(qkv, (tuple, list)) and len(qkv) == 3 and all(_positive_int(v) for v in qkv)):
        raise ValueError(f"{label}: {QKV_ATTRIBUTE}={qkv!r}: expected (num_attention_heads, "
                         f"num_query_groups, head_dim) of the whole model, three positive integers")
    heads, groups, d = qkv
    if heads % groups:
        raise ValueError(f"{label}: {QKV_ATTRIBUTE}: {heads} attention heads do not split into "
                         f"{groups} query groups")
    per_group = (heads // groups + 2) * d
    local = rows // per_group
    if rows % per_group or local == 0 or groups % local:
        raise ValueError(
            f"{label}: {rows} rows are not whole query groups of {per_group} rows ({heads // groups} query "
            f"heads, a key and a value head of {d}) out of {groups}: check {QKV_ATTRIBUTE}={tuple(qkv)}; a "
            f"tensor-parallel size above the number of query groups (key/value heads replicated) is not "
            f"supported")
    q = heads // groups * d
    return (Block("q", tuple((g * per_group, g * per_group + q) for g in range(local))),
            Block("k", tuple((g * per_group + q, g * per_group + q + d) for g in range(local))),
            Block("v", tuple((g * per_group + q + d, (g + 1) * per_group) for g in range(local))))


def check_world(label: str, p: torch.Tensor, world: int) -> None:
    """Refuse a TP group that is not the one ``p`` was split over, where its layout tells."""
    qkv = getattr(p, QKV_ATTRIBUTE, None)
    if qkv is None:
        return
    heads, groups, d = qkv
    local = shard_shape(p)[0] // ((heads // groups + 2) * d)
    if local * world != groups:
        raise ValueError(f"{label}: holds {local} of {groups} query groups, but the tensor-parallel group "
                         f"has {world} ranks; set the optimizer's group to the one the model is split over "
                         f"(optimizer.set_tensor_parallel_group)")
