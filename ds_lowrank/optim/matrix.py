"""What the matrix optimizers work on."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Matrix:
    """The rows of a weight matrix this process updates: all of them in one process, a row block
    of a ZeRO partition otherwise."""

    label: str
    weight: torch.Tensor        # (h, n), updated in place
    grad: torch.Tensor          # (h, n)
    state: dict
    shape: tuple[int, int]      # the whole matrix's (m, n)
    first_row: int = 0
    holders: tuple[int, ...] = ()   # ranks holding part of the matrix, () when held whole here


def per_matrix(values: list[float], like: torch.Tensor) -> float | torch.Tensor:
    """A scalar if every matrix of the batch shares the value, else a ``(k, 1, 1)`` tensor."""
    if all(v == values[0] for v in values):
        return values[0]
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1)
