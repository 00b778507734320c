"""What the matrix optimizers work on."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Matrix:
    """The rows of a parameter this process updates: all of them in one process, a row block of a
    ZeRO partition otherwise.  For the matrix optimizers a row is a matrix row; an elementwise
    optimizer gets a 1-D span of the flattening as ``weight`` and ``grad``."""

    label: str
    weight: torch.Tensor        # (h, n), updated in place
    grad: torch.Tensor          # (h, n)
    state: dict
    shape: tuple[int, int]      # the whole matrix's (m, n)
    first_row: int = 0              # of the rows held here; of the columns when split_dim is 1
    holders: tuple[int, ...] = ()   # ranks owning rows of the matrix, () when all are here
    # (rank, first row, row count) of every holder when split: the same on every holder, so
    # buckets keyed on it are the same on every holder
    split: tuple = ()
    split_dim: int = 0              # the weight's axis cut between the holders
    # a ZeRO piece: the holders of a split matrix keep in blocks (``reducer.free_share``) the
    # state along the free axis that would otherwise be the same on each of them
    piece: bool = False
    # the block ``[lo, hi)`` of the columns of that state kept here when the placement chooses
    # its own rule for it (FSDP2's ``Shard(1)``: torch.chunk's split), instead of a piece's
    columns: tuple[int, int] | None = None


def per_matrix(values: list[float], like: torch.Tensor) -> float | torch.Tensor:
    """A scalar if every matrix of the batch shares the value, else a ``(k, 1, 1)`` tensor."""
    if all(v == values[0] for v in values):
        return values[0]
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1)
