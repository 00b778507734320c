"""The order in which data-parallel ranks read samples, resumable from a sample count."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from ...utils.validation import is_count

class ResumableSampler(Sampler[int]):
    """Sample indices for one data-parallel rank, in an order every rank agrees on, resumable exactly.

    The ranks share one global stream: epoch after epoch, a permutation of the ``num_samples``
    indices drawn from ``(seed, epoch)`` (or the identity with ``shuffle=False``).  Rank ``r`` of
    ``world_size`` takes the stream's positions ``consumed_samples + r + k * world_size`` for
    ``k = 0, 1, ...``: together the ranks consume consecutive positions, and ``consumed_samples``
    (samples taken by all ranks so far, e.g. ``steps * global_batch_size``) is all a checkpoint
    needs to continue the same stream, even with a different world size.

    The stream is endless unless ``num_epochs`` bounds it.  Bounded, ranks may get counts that
    differ by one; ``drop_last=True`` cuts the stream to a multiple of ``world_size`` so every
    rank runs the same number of forward passes (required where those passes communicate,
    e.g. under ZeRO-3).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        consumed_samples: int = 0,
        num_epochs: int | None = None,
        drop_last: bool = False,
    ):
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be non-negative, got {consumed_samples}")
        if not is_count(seed):
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.rank, self.world_size, self.consumed_samples = rank, world_size, consumed_samples
        self.end = None
        if num_epochs is not None:
            self.end = num_epochs * num_samples
            if drop_last:
                self.end -= self.end % world_size
        self._epoch, self._order = None, None

    def order(self, epoch: int) -> np.ndarray:
        """The sample indices of ``epoch`` in stream order."""
        if self._epoch != epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            else:
                self._order = np.arange(self.num_samples)
            self._epoch = epoch
        return self._order

    def __iter__(self) -> Iterator[int]:
        position = self.consumed_samples + self.rank
        while self.end is None or position < self.end:
            epoch, offset = divmod(position, self.num_samples)
            yield int(self.order(epoch)[offset])
            position += self.world_size

    def __len__(self) -> int:
        if self.end is None:
            raise TypeError("an endless ResumableSampler has no length; pass num_epochs to bound it")
        return max(0, math.ceil((self.end - self.consumed_samples - self.rank) / self.world_size))
