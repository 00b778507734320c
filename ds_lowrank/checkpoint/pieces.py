"""A parameter's optimizer state, whole or as the pieces ZeRO ranks hold of it.

Each rank's state of a piece records the elements it holds of the parameter's flattening and
the parameter's shape (``optim.state_layout``'s metadata).  With the optimizer's ``row_length``
(which rows the piece owns) and ``row_axes`` (how each state tensor splits with those rows), that
is enough to rebuild the state one process would hold (``merge``) and to cut it again for any
other partition (``optim.placements.zero.cut_for_piece``, where a ZeRO rank takes its pieces'
state).  Parameters the optimizer leaves to AdamW split elementwise.  The pieces of a
``tensor_parallel="global"`` shard hold rows of the whole matrix instead, which ``merge_rows``
joins once the caller has placed them (``checkpoint.universal``).
"""

from __future__ import annotations

import math

import torch

from ..distributed.zero_layout import Piece, Rows, owned_rows
from ..optim.state_layout import optimizer_state, piece_range


class CheckpointError(ValueError):
    """A checkpoint that cannot be merged or cut as asked."""


def merge(cls, group: dict, label: str, shape: tuple[int, ...], pieces: list[dict]) -> dict[str, torch.Tensor]:
    """The whole state of parameter ``label`` from every rank's pieces of it."""
    n = cls.row_length(group, shape)
    numel = math.prod(shape)
    pieces = sorted(pieces, key=lambda st: piece_range(st)[0])
    covered = 0
    whole: dict[str, torch.Tensor] = {}
    for st in pieces:
        start, stop = piece_range(st)
        st = optimizer_state(st)
        if n is not None:
            # a row belongs to the rank holding its first element, which keeps its state whole:
            # a piece covers the rows it owns, past its last element when it ends in a cut row
            rows = owned_rows(Piece(label, shape, start, stop, 0, -1), n)
            start, stop = min(numel, max(start, rows.first * n)), min(numel, (rows.first + rows.count) * n)
        if start != covered:
            raise CheckpointError(f"{label}: no rank holds its elements {covered}:{start}; pass every "
                                  f"rank's optimizer file of the checkpoint")
        covered = stop
        if n is None:
            _merge_elementwise(whole, st, start, stop, numel)
        else:
            _merge_rows(whole, st, rows, cls.row_axes(group, shape), -(-numel // n))
    if covered != numel:
        raise CheckpointError(f"{label}: the ranks' pieces cover {covered} of its {numel} elements; "
                              f"pass every rank's optimizer file of the checkpoint")
    if n is None:
        whole = {k: v.view(shape) if v.dim() else v for k, v in whole.items()}
    return whole


def merge_rows(cls, group: dict, label: str, shape: tuple[int, int], parts: list[tuple[int, int, dict]],
               axes: dict | None = None) -> dict[str, torch.Tensor]:
    """The whole state of the matrix ``label`` of ``shape`` from ``(first, count, state)``: the state
    of rows ``[first, first + count)`` of it, as each holder kept them (a ``tensor_parallel="global"``
    shard's ZeRO pieces, which hold rows of the whole matrix rather than of the shard; a fused
    weight's blocks).  ``axes``: how the state splits with rows, if not ``cls.row_axes``'s."""
    whole: dict[str, torch.Tensor] = {}
    covered = 0
    axes = cls.row_axes(group, shape) if axes is None else axes
    for first, count, st in sorted((p for p in parts if p[1]), key=lambda p: p[0]):
        if first != covered:
            raise CheckpointError(f"{label}: no rank holds the state of its rows {covered}:{first}; pass every "
                                  f"rank's optimizer file of the checkpoint (every tensor-parallel rank's)")
        _merge_rows(whole, optimizer_state(st), Rows(first, count, 0, 0, 0), axes, shape[0])
        covered = first + count
    if covered != shape[0]:
        raise CheckpointError(f"{label}: the ranks' pieces hold the state of {covered} of its {shape[0]} rows; "
                              f"pass every rank's optimizer file of the checkpoint (every tensor-parallel rank's)")
    return whole


def _merge_elementwise(whole: dict, st: dict, start: int, stop: int, numel: int) -> None:
    for key, v in st.items():
        if v.dim() == 0:
            whole.setdefault(key, v.clone())
        else:
            whole.setdefault(key, v.new_zeros(numel))[start:stop] = v.reshape(-1)


def _merge_rows(whole: dict, st: dict, rows, axes: dict, total_rows: int) -> None:
    if not rows.count:
        return
    for key, v in st.items():
        if key not in axes:
            whole.setdefault(key, v.clone())        # replicated on every rank owning rows
            continue
        dim, at = axes[key]
        if key not in whole:
            size = list(v.shape)
            size[dim] = at(total_rows)
            whole[key] = v.new_zeros(size)
        lo, hi = at(rows.first), at(rows.first + rows.count)
        if v.shape[dim] != hi - lo and v.shape[dim] == at(total_rows):
            # whole, as each owner kept it in checkpoints written before it was kept in blocks
            v = v.narrow(dim, lo, hi - lo)
        whole[key].narrow(dim, lo, hi - lo).copy_(v)
