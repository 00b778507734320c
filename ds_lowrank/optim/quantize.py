"""4-bit asymmetric bucket quantization of a flat vector (MicroAdam's error feedback,
``algorithms.md`` §3(b) step 4).

The vector is cut into buckets of ``bucket_size`` consecutive elements (the last one may be
partial).  Each bucket keeps its minimum ``δ`` and maximum ``Δ``; an element ``x`` is stored as
the code ``c = ⌊(x - δ)/u + ½⌋ ∈ {0, …, 15}`` with ``u = (Δ - δ)/15``, two codes per byte, the
even element in the high nibble.  Dequantization is ``δ + c·u``, within ``u/2`` of ``x``.

The statistics may be stored in a narrower dtype than the values (bfloat16 for float32 data).
They are then rounded *outwards* (the minimum down, the maximum up), so every element still lies
in ``[δ, Δ]`` and the ``u/2`` bound holds for the stored ``u``.  A bucket whose stored minimum
equals its maximum holds one repeated value: its codes are 0 and it dequantizes exactly.
"""

from __future__ import annotations

import torch

LEVELS = 15   # the largest 4-bit code


def num_buckets(numel: int, bucket_size: int) -> int:
    return -(-numel // bucket_size)


def packed_numel(numel: int) -> int:
    return -(-numel // 2)


def _buckets(x: torch.Tensor, bucket_size: int) -> torch.Tensor:
    """``x`` as a ``(buckets, bucket_size)`` matrix, the partial last bucket padded with its own
    last element so that the padding cannot move that bucket's minimum or maximum."""
    pad = num_buckets(x.numel(), bucket_size) * bucket_size - x.numel()
    if pad:
        x = torch.cat([x, x[-1:].expand(pad)])
    return x.view(-1, bucket_size)


def _round_outward(x: torch.Tensor, dtype: torch.dtype, toward: float) -> torch.Tensor:
    """``x`` in ``dtype``, rounded toward ``toward`` (±inf) where the cast is inexact."""
    y = x.to(dtype)
    if dtype == x.dtype:
        return y
    wrong_side = y.to(x.dtype) > x if toward < 0 else y.to(x.dtype) < x
    return torch.where(wrong_side, torch.nextafter(y, torch.full_like(y, toward)), y)


def _step(lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    lo = lo.to(dtype)
    return lo, (hi.to(dtype) - lo) / LEVELS


def bucket_codes(xb: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The codes of the ``(buckets, bucket_size)`` matrix ``xb``, as floats in ``[0, 15]``."""
    lo_x, u = _step(lo, hi, xb.dtype)
    # A zero-range bucket holds one value, equal to δ: any non-zero divisor gives code 0 there,
    # where u = 0 would give 0/0 (and casting NaN to uint8 is undefined).
    u = torch.where(u > 0, u, torch.ones_like(u))
    return (xb - lo_x[:, None]).div_(u[:, None]).add_(0.5).floor_().clamp_(0, LEVELS)


def quantize_4bit_(x: torch.Tensor, bucket_size: int, packed: torch.Tensor, lo: torch.Tensor,
                   hi: torch.Tensor) -> None:
    """Quantize the 1-D ``x`` into the existing buffers ``packed`` (uint8, ``⌈n/2⌉``) and
    ``lo``/``hi`` (the per-bucket statistics, ``⌈n/bucket_size⌉`` each, in their own dtype).

    ``bucket_size`` must be even, so that no byte straddles two buckets.
    """
    n = x.numel()
    xb = _buckets(x, bucket_size)
    mn, mx = xb.aminmax(dim=1)
    lo.copy_(_round_outward(mn, lo.dtype, float("-inf")))
    hi.copy_(_round_outward(mx, hi.dtype, float("inf")))
    codes = bucket_codes(xb, lo, hi).to(torch.uint8).view(-1)
    # The padded length is even (bucket_size is), so pairs can be formed before trimming.
    packed.copy_(((codes[0::2] << 4) | codes[1::2])[: packed.numel()])
    if n % 2:
        packed[-1:] &= 0xF0   # the odd element's partner is padding: keep it a zero code


def quantize_4bit(x: torch.Tensor, bucket_size: int, stats_dtype: torch.dtype | None = None):
    """Functional form of :func:`quantize_4bit_`: returns ``(packed, lo, hi)``."""
    nb = num_buckets(x.numel(), bucket_size)
    dtype = x.dtype if stats_dtype is None else stats_dtype
    packed = torch.empty(packed_numel(x.numel()), dtype=torch.uint8, device=x.device)
    lo = torch.empty(nb, dtype=dtype, device=x.device)
    hi = torch.empty(nb, dtype=dtype, device=x.device)
    quantize_4bit_(x, bucket_size, packed, lo, hi)
    return packed, lo, hi


def unpack_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The ``numel`` 4-bit codes (uint8) stored in ``packed``."""
    return torch.stack((packed >> 4, packed & 0x0F), dim=1).view(-1)[:numel]


def dequantize_4bit(packed: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, numel: int,
                    bucket_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``δ + c·u`` for every element, as a new 1-D tensor of ``dtype``."""
    nb = lo.numel()
    codes = torch.stack((packed >> 4, packed & 0x0F), dim=1).view(-1)
    codes = torch.nn.functional.pad(codes, (0, nb * bucket_size - codes.numel()))
    lo_x, u = _step(lo, hi, dtype)
    x = codes.view(nb, bucket_size).to(dtype).mul_(u[:, None]).add_(lo_x[:, None])
    return x.view(-1)[:numel]
