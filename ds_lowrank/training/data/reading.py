"""Reading a prepared dataset: its token and offset files, memory-mapped, and the fixed-length
windows a causal LM trains on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .format import PREPARE_AGAIN, DataError, check_split, load_metadata

def read_tokens(data_dir: str | Path, split: str) -> np.ndarray:
    """All token ids of a split, memory-mapped (read-only); the file's size must be what
    ``meta.json`` says (a truncated or foreign file is refused)."""
    check_split(split)
    meta = load_metadata(data_dir)
    count, dtype = meta["splits"][split]["tokens"], np.dtype(meta["dtype"]).newbyteorder("<")
    if count == 0:
        return np.zeros(0, dtype=meta["dtype"])  # mmap cannot map an empty file
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise DataError(f"{path} is missing (meta.json counts {count} {split} tokens); {PREPARE_AGAIN}")
    size = path.stat().st_size
    if size != count * dtype.itemsize:
        raise DataError(f"{path} holds {size} bytes, but meta.json counts {count} {dtype.name} tokens "
                        f"({count * dtype.itemsize} bytes): the file is truncated or belongs to another "
                        f"dataset; {PREPARE_AGAIN}")
    return np.memmap(path, dtype=dtype, mode="r")


# At most this many token ids of a split are compared with the vocabulary when it is opened:
# all of a small split, evenly spaced stretches of a large one.
CHECKED_TOKENS = 1 << 24


def _check_token_ids(tokens: np.ndarray, vocab_size: int, path: Path) -> None:
    """Refuse token ids outside the vocabulary (the embedding lookup would fail mid-run)."""
    n = len(tokens)
    if n <= CHECKED_TOKENS:
        spans = [(0, n)]
    else:
        chunk = CHECKED_TOKENS // 64
        spans = [(int(a), int(a) + chunk) for a in np.linspace(0, n - chunk, 64)]
    for a, b in spans:
        part = tokens[a:b]
        if len(part) and int(part.max()) >= vocab_size:
            where = a + int(np.argmax(part >= vocab_size))
            raise DataError(f"{path}: token id {int(tokens[where])} at position {where} is outside the "
                            f"vocabulary (meta.json vocab_size {vocab_size}): the token file does not "
                            f"match meta.json or is damaged; {PREPARE_AGAIN}")


def read_offsets(data_dir: str | Path, split: str) -> np.ndarray:
    """The document offsets of a split: document ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``."""
    check_split(split)
    return np.load(Path(data_dir) / f"{split}.idx", mmap_mode="r")


class TokenDataset(Dataset):
    """Fixed-length windows of a split for causal LM training.

    Sample ``i`` is the int64 tensor ``tokens[i * seq_len : i * seq_len + seq_len + 1]``: inputs
    are ``sample[:-1]``, targets ``sample[1:]``, and consecutive samples share one token so every
    token but the first is a target exactly once per epoch.  Windows run across document
    boundaries, which the end-of-document token marks.  The token file is mapped lazily in each
    process, so the dataset can be sent to DataLoader workers.
    """

    def __init__(self, data_dir: str | Path, split: str, seq_len: int):
        check_split(split)
        if seq_len < 1:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        self.data_dir, self.split, self.seq_len = Path(data_dir), split, seq_len
        self.meta = load_metadata(data_dir)
        self.vocab_size = self.meta["vocab_size"]
        self.eos_token_id = self.meta["eos_token_id"]
        self.num_tokens = self.meta["splits"][split]["tokens"]
        self.num_samples = max(0, (self.num_tokens - 1) // seq_len)
        if self.num_samples == 0:
            raise DataError(f"the {split} split of {data_dir} has {self.num_tokens} tokens, fewer than "
                            f"one sample of seq_len + 1 = {seq_len + 1}; use a shorter sequence length, "
                            f"more data, or a larger --val_fraction")
        # Checked now rather than at the sample that would fail: the file's size, and its ids.
        _check_token_ids(read_tokens(data_dir, split), self.vocab_size, self.data_dir / f"{split}.bin")
        self._tokens = None

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = read_tokens(self.data_dir, self.split)
        return self._tokens

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for {self.num_samples} samples")
        start = (index % self.num_samples) * self.seq_len
        return torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}
