"""8- and 4-bit asymmetric bucket quantization (MicroAdam's error feedback, ``algorithms.md``
§3(b) step 4; LDAdam's compressed error feedback, ``ef_dtype="int8"``/``"int4"``).

A tensor is quantized along its last dimension: each vector ``x[..., :]`` of length ``L`` is cut
into buckets of ``bucket_size`` consecutive elements counted from its first element (the last
one may be partial); a 1-D tensor is one such vector.  Each bucket keeps its minimum ``δ`` and
maximum ``Δ``; an element ``x`` is stored as the code ``c = ⌊(x - δ)/u + ½⌋ ∈ {0, …, 2^b - 1}``
with ``u = (Δ - δ)/(2^b - 1)``: one code per byte for ``b = 8``, two per byte for ``b = 4`` (the
even element in the high nibble, each vector padded to whole bytes).  Dequantization is
``δ + c·u``, within ``u/2`` of ``x``.

Stochastic rounding replaces the ``½`` by a uniform ``r ∈ [0, 1)`` per element (``noise``):
``E[δ + c·u] = x``, and the error stays below ``u``.  ``uniform_noise`` draws ``r`` from a
counter-based hash of a seed and each element's index, so that a caller can give every element
the same draw whatever part of a tensor it quantizes.

Layouts (``L`` the vector length, ``q`` the bucket size, which must be even):

- codes: ``(..., ⌈L/2⌉)`` uint8 for 4 bits, ``(..., L)`` for 8 bits (``packed_numel``);
- statistics: ``(..., ⌈L/q⌉)`` each (``num_buckets``), in their own dtype.

The statistics may be stored in a narrower dtype than the values (bfloat16 for float32 data).
They are then rounded *outwards* (the minimum down, the maximum up), so every element still lies
in ``[δ, Δ]`` and the ``u/2`` bound holds for the stored ``u``.  A bucket whose stored minimum
equals its maximum holds one repeated value: its codes are 0 and it dequantizes exactly.
"""

from __future__ import annotations

import torch

BITS = (4, 8)


def levels(bits: int) -> int:
    """The largest code: 15 for 4 bits, 255 for 8."""
    return (1 << bits) - 1



def num_buckets(numel: int, bucket_size: int) -> int:
    return -(-numel // bucket_size)


def packed_numel(numel: int, bits: int = 4) -> int:
    """Bytes holding the codes of ``numel`` elements."""
    return -(-numel // 2) if bits == 4 else numel


def _buckets(x: torch.Tensor, bucket_size: int) -> torch.Tensor:
    """``x`` as a ``(..., buckets, bucket_size)`` tensor, each vector's partial last bucket
    padded with its own last element so that the padding cannot move that bucket's minimum or
    maximum."""
    length = x.shape[-1]
    pad = num_buckets(length, bucket_size) * bucket_size - length
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.reshape(*x.shape[:-1], -1, bucket_size)


_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _next_toward(y: torch.Tensor, toward: float) -> torch.Tensor:
    """``torch.nextafter(y, ±inf)`` for finite ``y``, from the bits: a float's neighbour away
    from zero is its bit pattern + 1, toward zero - 1, and past ±0 the smallest subnormal of
    the other sign.  torch.compile computes ``nextafter`` on bfloat16 in float32 and rounds back,
    which returns ``y`` itself; integer arithmetic on the bits is exact in both."""
    bits = y.view(_SAME_WIDTH_INT[y.element_size()])
    away = (y > 0) if toward > 0 else (y < 0)
    step = torch.where(away, 1, -1).to(bits.dtype)
    # the bit pattern of the smallest subnormal of the sign of ``toward``: 1, or the sign bit and 1
    tiny = 1 if toward > 0 else torch.iinfo(bits.dtype).min + 1
    moved = torch.where(y == 0, torch.full_like(bits, tiny), bits + step)
    return moved.view(y.dtype)


def _round_outward(x: torch.Tensor, dtype: torch.dtype, toward: float) -> torch.Tensor:
    """``x`` in ``dtype``, rounded toward ``toward`` (±inf) where the cast is inexact."""
    y = x.to(dtype)
    if dtype == x.dtype:
        return y
    wrong_side = y.to(x.dtype) > x if toward < 0 else y.to(x.dtype) < x
    return torch.where(wrong_side, _next_toward(y, toward), y)


def _step(lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    lo = lo.to(dtype)
    return lo, (hi.to(dtype) - lo) / levels(bits)


def bucket_codes(xb: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int = 4,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
    """The codes of the ``(..., buckets, bucket_size)`` tensor ``xb``, as floats in
    ``[0, 2^bits - 1]``: rounded to nearest, or stochastically with ``noise`` (same shape,
    uniform in ``[0, 1)``)."""
    lo_x, u = _step(lo, hi, xb.dtype, bits)
    # A zero-range bucket holds one value, equal to δ: any non-zero divisor gives code 0 there,
    # where u = 0 would give 0/0 (and casting NaN to uint8 is undefined).
    u = torch.where(u > 0, u, torch.ones_like(u))
    y = (xb - lo_x[..., None]).div_(u[..., None])
    y = y.add_(0.5) if noise is None else y.add_(noise)
    return y.floor_().clamp_(0, levels(bits))


def quantize_(x: torch.Tensor, bucket_size: int, packed: torch.Tensor, lo: torch.Tensor,
              hi: torch.Tensor, bits: int = 4, noise: torch.Tensor | None = None) -> None:
    """Quantize ``x`` (``(..., L)``) into the existing buffers ``packed`` (uint8,
    ``(..., packed_numel(L, bits))``) and ``lo``/``hi`` (the per-bucket statistics,
    ``(..., ⌈L/bucket_size⌉)`` each, in their own dtype).  ``noise``: stochastic rounding
    (a tensor shaped like ``x``, uniform in ``[0, 1)``); ``None``: nearest.

    ``bucket_size`` must be even, so that no byte straddles two buckets.
    """
    length = x.shape[-1]
    xb = _buckets(x, bucket_size)
    mn, mx = xb.aminmax(dim=-1)
    lo.copy_(_round_outward(mn, lo.dtype, float("-inf")))
    hi.copy_(_round_outward(mx, hi.dtype, float("inf")))
    nb = None if noise is None else _buckets(noise, bucket_size)
    # The codes stay floats (whole numbers) until the copy into ``packed`` casts them: a pair's
    # byte ``16·even + odd`` is exact in float32, so packing takes one pass over half the codes
    # instead of a cast, a shift and an or.
    codes = bucket_codes(xb, lo, hi, bits, nb).reshape(*x.shape[:-1], -1)
    if bits == 8:
        packed.copy_(codes[..., :length])
        return
    # The padded length is even (bucket_size is), so pairs can be formed before trimming.
    packed.copy_(torch.add(codes[..., 1::2], codes[..., 0::2], alpha=16)[..., : packed.shape[-1]])
    if length % 2:
        packed[..., -1:].bitwise_and_(0xF0)   # the odd element's partner is padding: a zero code


def quantize(x: torch.Tensor, bucket_size: int, stats_dtype: torch.dtype | None = None, bits: int = 4,
             noise: torch.Tensor | None = None):
    """Functional form of :func:`quantize_`: returns ``(packed, lo, hi)``."""
    lead, length = x.shape[:-1], x.shape[-1]
    dtype = x.dtype if stats_dtype is None else stats_dtype
    packed = torch.empty(*lead, packed_numel(length, bits), dtype=torch.uint8, device=x.device)
    lo = torch.empty(*lead, num_buckets(length, bucket_size), dtype=dtype, device=x.device)
    hi = torch.empty_like(lo)
    quantize_(x, bucket_size, packed, lo, hi, bits, noise)
    return packed, lo, hi


def unpack_codes(packed: torch.Tensor, numel: int, bits: int = 4) -> torch.Tensor:
    """The codes (uint8) of the ``numel`` elements of each vector stored in ``packed``."""
    if bits == 8:
        return packed[..., :numel]
    codes = torch.stack((packed >> 4, packed & 0x0F), dim=-1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :numel]


def dequantize(packed: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, numel: int,
               bucket_size: int, dtype: torch.dtype, bits: int = 4) -> torch.Tensor:
    """``δ + c·u`` for every element, as a new ``(..., numel)`` tensor of ``dtype``."""
    lead = packed.shape[:-1]
    x = unpack_codes(packed, numel, bits).to(dtype, memory_format=torch.contiguous_format)
    lo_x, u = _step(lo, hi, dtype, bits)
    # The whole buckets as a (..., buckets, bucket_size) view, then the partial last one: no
    # padding to slice off afterwards (torch.compile's C++ code for that pattern left the
    # partial bucket unwritten).
    whole = numel // bucket_size
    x[..., : whole * bucket_size].view(*lead, whole, bucket_size) \
        .mul_(u[..., :whole, None]).add_(lo_x[..., :whole, None])
    if whole * bucket_size < numel:
        x[..., whole * bucket_size:].mul_(u[..., whole:]).add_(lo_x[..., whole:])
    return x


# -- stochastic rounding -------------------------------------------------------------------------

_MASK = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x·c mod 2³²`` for int64 ``x`` in ``[0, 2³²)``, without overflowing int64."""
    low = (x * (c & 0xFFFF)) & _MASK
    high = ((x * (c >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer (good avalanche: every input bit moves every output bit)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    return int(_mix32(torch.tensor([x & _MASK], dtype=torch.int64)))


def uniform_noise(seed: int, index: torch.Tensor) -> torch.Tensor:
    """Uniform float32 values in ``[0, 1)`` (24-bit resolution), a function of ``seed`` and of
    each entry of the non-negative int64 ``index`` alone: the same element gets the same value
    whichever part of the tensor is drawn, in any process and on any device."""
    s_lo = _mix32_int(seed ^ 0x9E3779B9)
    s_hi = _mix32_int((seed >> 32) ^ s_lo)
    h = _mix32((index & _MASK) ^ s_lo)
    h = _mix32(h ^ (((index >> 32) + s_hi) & _MASK))
    return (h >> 8).to(torch.float32).mul_(2.0**-24)
