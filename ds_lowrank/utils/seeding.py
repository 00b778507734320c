"""Seeds that are the same in every process.

Python's ``hash()`` of a string is randomized per process, so anything random that must
agree across ranks or across a resume is seeded from a stable digest instead.
"""

from __future__ import annotations

import hashlib

import torch


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from the ``str()`` of each part, identical in every process."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def seeded_randn(shape: tuple[int, ...], seed: int, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """A standard normal tensor drawn from a generator seeded with ``seed`` on ``device``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.randn(shape, generator=gen, device=device, dtype=dtype)


def held_normal(reduce, axis: str, seeds, local: int, width: int, device, dtype) -> torch.Tensor:
    """A ``(k, local, width)`` batch: for matrix ``i``, the rows this rank holds along ``axis`` of
    a standard normal ``full × width`` matrix seeded with ``seeds[i]``, zero past the held rows.

    Drawing the whole matrix and slicing keeps every holder's rows identical to the rows a
    single process would draw.
    """
    out = torch.zeros((len(seeds), local, width), device=device, dtype=dtype)
    for i, seed in enumerate(seeds):
        offset, count, full = reduce.held(axis, i, local)
        if count:
            out[i, :count] = seeded_randn((full, width), seed, device, dtype)[offset:offset + count]
    return out
