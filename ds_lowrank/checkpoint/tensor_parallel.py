"""Megatron tensor-parallel shards in checkpoints: the whole parameter from its shards, and back.

Megatron cuts a sharded parameter along ``partition_dim`` into ``world × partition_stride`` equal
blocks; TP rank ``t`` holds blocks ``t, t + world, …`` side by side (with stride 2, its part of a
SwiGLU weight's gate and its part of the up projection).  The optimizer records each shard's
``[partition_dim, partition_stride]`` in its ``state_dict`` (``"tensor_parallel"``), so that the
ranks' files can be joined without the model.

What joins and how depends on the state (``tensor_parallel`` group key, ``optim.base``):

- weights, and the AdamW state of a parameter the optimizer keeps dense, are elementwise: they
  join and cut exactly as the weight does;
- the compressed state of a ``"global"`` shard is the rows (or columns) held here of the whole
  matrix's state: keys that grow with the shard join along the axis they grow on
  (``split_axes``), the rest (the factor along the unsharded side) is the same on every TP rank;
- the compressed state of a ``"local"`` shard is the shard's own (its own subspace): it is kept
  per TP rank (``Consolidated.shard_states``) and carried to another TP size only through
  Adam's moments (``universal``).
"""

from __future__ import annotations

import torch

from .pieces import CheckpointError


def whole_of(shards: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """The whole parameter (or elementwise state) from every TP rank's shard, in rank order."""
    world = len(shards)
    blocks = [s.chunk(stride, dim) for s in shards]
    return torch.cat([blocks[t][k] for k in range(stride) for t in range(world)], dim)


def check_divides(label: str, shape: tuple[int, ...], dim: int, stride: int, world: int) -> None:
    size = shape[dim]
    if size % (world * stride):
        blocks = f" × {stride} blocks (partition_stride)" if stride > 1 else ""
        raise CheckpointError(
            f"{label}: its dimension {dim} has {size} entries (shape {tuple(shape)}), which do not split into "
            f"{world} tensor-parallel shards{blocks}: choose a tensor-parallel size dividing {size // stride} "
            f"(for attention, one dividing the number of heads)")


def shard_of(whole: torch.Tensor, label: str, dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
    """TP rank ``rank``'s shard of ``whole`` (Megatron's cut), a tensor of its own."""
    check_divides(label, tuple(whole.shape), dim, stride, world)
    blocks = whole.chunk(world * stride, dim)
    return torch.cat([blocks[k * world + rank] for k in range(stride)], dim).clone()


def split_axes(cls, group: dict, whole: tuple[int, int], shard: tuple[int, int]) -> dict[str, int]:
    """Per state key of a ``"global"`` shard, the axis along which it grows with the shard: the
    keys whose size ``state_shapes`` gives differently for the shard and for the whole matrix.
    Keys absent are the same on every TP rank."""
    held, full = cls.state_shapes(group, whole, shard), cls.state_shapes(group, whole, whole)
    axes = {}
    for key, (size, _) in held.items():
        grown = [i for i, (a, b) in enumerate(zip(size, full[key][0])) if a != b]
        if grown:
            axes[key] = grown[0]
    return axes


def is_global_shard(cls, group: dict, shard: tuple[int, ...]) -> bool:
    """Whether the optimizer stepped this shard as a part of its whole matrix (``_global_shard``)."""
    return (group.get("tensor_parallel", "local") == "global" and len(shard) == 2
            and cls.row_length({**group, "within_adamw": False}, shard) is not None)


def kept_dense(cls, group: dict, whole: tuple[int, ...], shard: tuple[int, ...]) -> bool:
    """Whether the optimizer left the shard to AdamW (elementwise state)."""
    if is_global_shard(cls, group, shard):
        return not cls.is_compressed_shape(group, whole)
    return cls.row_length(group, shard) is None


def _elementwise(states: list[dict], dim: int, stride: int) -> dict:
    return {key: v.clone() if v.dim() == 0 else whole_of([st[key] for st in states], dim, stride)
            for key, v in states[0].items()}


def join_state(cls, group: dict, label: str, whole: tuple[int, ...], dim: int, stride: int,
               states: list[dict]) -> tuple[dict | None, list[dict] | None]:
    """The state of a sharded parameter from every TP rank's: ``(whole state, None)`` when it
    joins (AdamW's; a global shard's), ``(None, per-rank states)`` for a local shard's."""
    shard = list(whole)
    shard[dim] //= len(states)
    shard = tuple(shard)
    if kept_dense(cls, group, whole, shard):
        return _elementwise(states, dim, stride), None
    if not is_global_shard(cls, group, shard):
        return None, [dict(st) for st in states]
    if "error_layout" in states[0] and dim == 1:
        raise CheckpointError(f"{label}: a compressed error feedback (ef_dtype) of a row-parallel shard in "
                              f"tensor_parallel='global' mode records the shard's width; the checkpoint tools "
                              f"join only a dense one (ef_dtype float32 or bfloat16)")
    axes = split_axes(cls, group, whole, shard)
    return {key: torch.cat([st[key] for st in states], axes[key]) if key in axes else v.clone()
            for key, v in states[0].items()}, None


def cut_state(cls, group: dict, label: str, whole: tuple[int, ...], dim: int, stride: int, rank: int,
              world: int, state: dict) -> dict:
    """TP rank ``rank``'s part of a joined state (``join_state``'s whole one)."""
    check_divides(label, whole, dim, stride, world)
    shard = list(whole)
    shard[dim] //= world
    shard = tuple(shard)
    if kept_dense(cls, group, whole, shard):
        return {key: v.clone() if v.dim() == 0 else shard_of(v, label, dim, stride, rank, world)
                for key, v in state.items()}
    if "error_layout" in state and dim == 1 and world > 1:
        raise CheckpointError(f"{label}: a compressed error feedback (ef_dtype) cannot be cut for a row-parallel "
                              f"shard; resume with ef_dtype float32 or bfloat16")
    axes = split_axes(cls, group, whole, shard)
    out = {}
    for key, v in state.items():
        if key in axes:
            size = v.shape[axes[key]] // world
            v = v.narrow(axes[key], rank * size, size)
        out[key] = v.clone()
    return out
