"""Fused weights in checkpoints: the per-block state of a weight stepped as its logical blocks
(``optim.blocks``), joined, cut and carried to and from Adam's moments.

A fused weight's state is ``{block name: {key: tensor}}``.  Where each block's rows lie comes from
the layout the optimizer records with its state (``state_dict()["fused"]``, read by
``distributed.fused.blocks_of``), so the tools need no model:

- ``tensor_parallel="global"``: each block is part of the whole logical matrix (gate, up; q, k,
  v), TP rank ``t`` holding its rows ``t·h ... (t+1)·h``; the consolidated state is the whole
  logical matrices' (what one process stepping them holds), joined and cut per block as any
  global shard's (``checkpoint.tensor_parallel``) and, on ZeRO pieces, by the rows of the logical
  matrix each piece owned (``fused.Block.within``, ``rows_in_whole``);
- ``"local"``: each block of a shard is a matrix of its own, so the state stays per TP rank;
- Adam's moments are elementwise: each block's (its AdamW state, or carried out of its
  subspace) is put back at the block's rows of the fused weight.
"""

from __future__ import annotations

import torch

from . import tensor_parallel as shard_tp
from .adam import adam_of_subspace
from .pieces import CheckpointError, merge_rows
from ..distributed import fused
from ..distributed.tensor_parallel import rows_in_whole
from ..distributed.zero_layout import Piece, owned_rows
from ..optim.state_layout import block_label, piece_range


def blocks(label: str, rows: int, layout: dict) -> tuple[fused.Block, ...]:
    """The blocks of fused weight ``label`` (or its shard) of ``rows`` rows; refusals as
    ``CheckpointError``."""
    try:
        return fused.blocks_of(label, rows, layout)
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def is_global(group: dict, sharded: bool) -> bool:
    """Whether a fused weight's blocks are parts of the whole logical matrices (a TP shard in a
    ``"global"`` group)."""
    return sharded and group.get("tensor_parallel", "local") == "global"


def _dense_axes(state: dict) -> dict:
    # AdamW's state of a block kept dense: a row of moments per row of the block
    return {key: (0, lambda r: r) for key, v in state.items() if torch.is_tensor(v) and v.dim()}


def _axes(cls, group: dict, shape: tuple[int, int], state: dict) -> dict:
    return cls.row_axes(group, shape) if cls.is_compressed_shape(group, shape) else _dense_axes(state)


def rows_of_pieces(label: str, layout: dict, shard: tuple[int, int], pieces: list[dict], tp_rank: int,
                   tp_size: int, global_mode: bool) -> dict[str, list[tuple[int, int, dict]]]:
    """Per block: ``(first, count, state)`` of every ZeRO piece of one TP rank's shard (of
    ``shard`` shape): the rows of the block's matrix whose state it holds (in global mode rows of
    the whole logical matrix, else of the shard's block)."""
    out: dict[str, list] = {}
    for st in pieces:
        start, stop = piece_range(st)
        owned = owned_rows(Piece(label, shard, start, stop, 0, -1), shard[1])
        for b in blocks(label, shard[0], layout):
            at, spans = b.within(owned.first, owned.count)
            count = sum(hi - lo for lo, hi in spans)
            if not count or b.name not in st:
                continue
            first = rows_in_whole(0, b.rows, at, count, tp_rank, tp_size)[0] if global_mode else at
            out.setdefault(b.name, []).append((first, count, st[b.name]))
    return out


def merge_pieces(cls, group: dict, label: str, layout: dict, rows: int, width: int,
                 parts: dict[str, list[tuple[int, int, dict]]]) -> dict[str, dict]:
    """The state of every block of a fused weight of ``rows`` × ``width`` (the whole one, or a
    local shard) from ``rows_of_pieces``' parts (every rank's)."""
    out = {}
    for b in blocks(label, rows, layout):
        held = parts.get(b.name, [])
        if not held:
            raise CheckpointError(f"{block_label(label, b.name)}: no rank holds its state; pass every rank's "
                                  f"optimizer file of the checkpoint")
        shape = (b.rows, width)
        out[b.name] = merge_rows(cls, group, block_label(label, b.name), shape, held,
                                 axes=_axes(cls, group, shape, held[0][2]))
    return out


def join(cls, group: dict, label: str, layout: dict, shard: tuple[int, int], states: list[dict]) -> dict:
    """The whole logical matrices' state of a global fused weight from every TP rank's (stage 0:
    each the state of its rows of them)."""
    out = {}
    for b in blocks(label, shard[0], layout):
        whole = (b.rows * len(states), shard[1])
        joined, _ = shard_tp.join_state(cls, group, block_label(label, b.name), whole, 0, 1,
                                        [st[b.name] for st in states])
        out[b.name] = joined
    return out


def cut(cls, group: dict, label: str, layout: dict, whole: tuple[int, int], rank: int, world: int,
        state: dict) -> dict:
    """TP rank ``rank``'s state of a global fused weight of ``whole`` shape (``join``'s inverse)."""
    _check_tp_size(label, layout, whole[0], world)
    return {b.name: shard_tp.cut_state(cls, group, block_label(label, b.name), (b.rows, whole[1]), 0, 1, rank,
                                       world, state[b.name])
            for b in blocks(label, whole[0], layout)}


def _check_tp_size(label: str, layout: dict, rows: int, world: int) -> None:
    # each block must split into whole rows (QKV: whole query groups) per TP rank
    if rows % world:
        raise CheckpointError(f"{label}: its {rows} rows do not split between {world} tensor-parallel ranks")
    blocks(label, rows // world, layout)


def to_adam(cls, group: dict, label: str, layout: dict, shape: tuple[int, int], state: dict
            ) -> dict[str, torch.Tensor]:
    """Adam's moments of a fused weight (or local shard) of ``shape`` from its blocks' state:
    each block's at its rows."""
    out = {"exp_avg": torch.zeros(shape), "exp_avg_sq": torch.zeros(shape)}
    step = 0
    for b in blocks(label, shape[0], layout):
        st, rows = state[b.name], (b.rows, shape[1])
        if cls.is_compressed_shape(group, rows):
            try:
                st = adam_of_subspace(cls, group, rows, st)
            except ValueError as err:
                raise CheckpointError(f"{cls.__name__}'s state of {block_label(label, b.name)}: {err}") from None
        index = b.index(torch.device("cpu"))
        for key in ("exp_avg", "exp_avg_sq"):
            out[key][index] = st[key].reshape(rows).float()
        step = max(step, int(st["step"]))
    out["step"] = torch.tensor(float(step))
    return out


def from_adam(optimizer, group: dict, label: str, layout: dict, adam: dict) -> dict:
    """The optimizer's state of each block of a fused weight (or local shard) from Adam's of it
    (``adam``: ``exp_avg``, ``exp_avg_sq`` of its rows, ``step``): ``state_from_adam`` on each
    block as the matrix it is."""
    shape = tuple(adam["exp_avg"].shape)
    out = {}
    for b in blocks(label, shape[0], layout):
        index = b.index(torch.device("cpu"))
        rows = {k: v if v.dim() == 0 else v.index_select(0, index) for k, v in adam.items()}
        out[b.name] = optimizer.state_from_adam(group, block_label(label, b.name), (b.rows, shape[1]), rows)
    return out
