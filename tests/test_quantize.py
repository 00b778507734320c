"""The bucket quantizer shared by MicroAdam's and LDAdam's error feedback (optim/quantize.py):
8 and 4 bits, vectors and rows, nearest and stochastic rounding, zero-range buckets, and noise
that depends on an element's index alone."""

import pytest
import torch

from ds_lowrank.optim.quantize import (dequantize, levels, num_buckets, packed_numel, quantize,
                                       uniform_noise, unpack_codes)


def steps_of(lo, hi, length, q, bits):
    """Per element, the step ``u`` of its bucket (float64)."""
    u = (hi.double() - lo.double()) / levels(bits)
    return u.repeat_interleave(q, dim=-1)[..., :length]


def noise_like(x, seed=0):
    return uniform_noise(seed, torch.arange(x.numel()).view(x.shape))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("stats_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,q", [((999,), 64), ((5, 37), 8), ((2, 3, 13), 4), ((4, 6), 8)])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_round_trip_error_is_within_the_bound(bits, stats_dtype, shape, q, rounding):
    """Nearest: within u/2 of x; stochastic: within u.  The statistics bracket their bucket."""
    gen = torch.Generator().manual_seed(sum(shape))
    x = 3.0 + torch.randn(shape, generator=gen) * torch.linspace(0.01, 2.0, shape[-1])
    noise = noise_like(x) if rounding == "stochastic" else None
    packed, lo, hi = quantize(x, q, stats_dtype, bits, noise)
    length = shape[-1]
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], packed_numel(length, bits))
    assert lo.shape == hi.shape == (*shape[:-1], num_buckets(length, q)) and lo.dtype == stats_dtype
    y = dequantize(packed, lo, hi, length, q, torch.float32, bits)
    assert y.shape == x.shape
    u = steps_of(lo, hi, length, q, bits)
    err = (y.double() - x.double()).abs()
    bound = (u / 2 if rounding == "nearest" else u) + 4 * torch.finfo(torch.float32).eps * x.abs().double()
    assert (err <= bound).all()
    assert (err / u)[u > 0].max() > 0.4      # the bound is tight, not vacuous
    # each row is quantized on its own: buckets start at each row's first element
    for i, row in enumerate(x.reshape(-1, length)):
        n_row = None if noise is None else noise.reshape(-1, length)[i]
        p1, l1, h1 = quantize(row, q, stats_dtype, bits, n_row)
        assert torch.equal(p1, packed.reshape(-1, packed.shape[-1])[i])
        assert torch.equal(l1, lo.reshape(-1, lo.shape[-1])[i]) and torch.equal(h1, hi.reshape(-1, hi.shape[-1])[i])


@pytest.mark.parametrize("bits", [8, 4])
def test_zero_range_buckets_round_trip_exactly(bits):
    """Constant and all-zero buckets: codes 0, no NaN, the value back exactly."""
    q = 8
    x = torch.cat([torch.full((q,), 0.75), torch.zeros(q), torch.full((q,), -2.5),
                   torch.linspace(-1, 1, q), torch.full((3,), 1.25)]).view(1, -1).repeat(2, 1)
    for stats in (torch.float32, torch.bfloat16):
        for noise in (None, noise_like(x)):
            packed, lo, hi = quantize(x, q, stats, bits, noise)
            y = dequantize(packed, lo, hi, x.shape[-1], q, torch.float32, bits)
            assert torch.isfinite(y).all()
            const = torch.ones(x.shape[-1], dtype=torch.bool)
            const[3 * q:4 * q] = False
            assert torch.equal(y[:, const], x[:, const])
            codes = unpack_codes(packed, x.shape[-1], bits)
            assert not codes[:, const].any()
            assert codes[:, 3 * q].eq(0).all() and codes[:, 4 * q - 1].eq(levels(bits)).all()
    zeros = torch.zeros(3, 10)
    packed, lo, hi = quantize(zeros, 4, torch.bfloat16, bits)
    assert not packed.any() and not lo.any() and not hi.any()
    assert torch.equal(dequantize(packed, lo, hi, 10, 4, torch.float32, bits), zeros)


def test_four_bit_codes_are_packed_per_row_high_nibble_first():
    codes = torch.tensor([*range(14), 15.0])     # one bucket per row: codes 0..13 and 15
    x = (codes / 15).view(1, 15).repeat(2, 1)
    packed, lo, hi = quantize(x, 16, torch.float32, 4)
    assert packed.shape == (2, 8)
    assert packed[0, 0].item() == (0 << 4) | 1 and packed[1, 6].item() == (12 << 4) | 13
    assert packed[:, -1].eq(15 << 4).all()    # the odd last element's partner nibble is zero


def test_stochastic_rounding_is_unbiased():
    x = torch.linspace(0.0, 1.0, 16).repeat(1, 1) + 0.013 * torch.arange(16) % 0.05
    draws = []
    for seed in range(400):
        packed, lo, hi = quantize(x, 16, torch.float32, 4, noise_like(x, seed))
        draws.append(dequantize(packed, lo, hi, 16, 16, torch.float64, 4))
    mean = torch.stack(draws).mean(0)
    u = float(hi.max() - lo.min()) / 15
    assert (mean - x.double()).abs().max() < 0.1 * u
    nearest = dequantize(*quantize(x, 16, torch.float32, 4), 16, 16, torch.float64, 4)
    assert (nearest - x.double()).abs().max() > 0.3 * u    # nearest rounding is biased there


def test_noise_depends_on_seed_and_index_only():
    index = torch.arange(3 * 2**32 - 50, 3 * 2**32 + 50000)     # across a 2^32 boundary too
    full = uniform_noise(123, index)
    assert full.dtype == torch.float32 and (full >= 0).all() and (full < 1).all()
    assert torch.equal(uniform_noise(123, index[777:4321]), full[777:4321])
    assert torch.equal(uniform_noise(123, index.flip(0)), full.flip(0))
    assert abs(full.mean().item() - 0.5) < 0.01 and abs(full.std().item() - 12 ** -0.5) < 0.01
    other = uniform_noise(124, index)
    assert (other != full).float().mean() > 0.99
    assert abs(torch.corrcoef(torch.stack([full, other]))[0, 1].item()) < 0.02
    # neighbours are not correlated
    assert abs(torch.corrcoef(torch.stack([full[1:], full[:-1]]))[0, 1].item()) < 0.02
