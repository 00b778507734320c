"""MicroAdam: the invariants M1–M8 of algorithms.md §7, its state accounting (§3(a)), bf16, and
the refusal of bad MicroAdam hyperparameters (the invariants every optimizer keeps are in
test_optimizer_contract.py)."""

import math

import pytest
import torch

from ds_lowrank.optim.microadam import MicroAdam, TopkLayout, kept_per_block, microadam_update, topk_layout
from ds_lowrank.optim.quantize import bucket_codes, dequantize, num_buckets, quantize, unpack_codes
from helpers import (full_size, assert_bad_group_refused, assert_change_refused, assert_same_state,
                     make_microadam, mlp_batches, run_steps, tiny_mlp, train)

def gen_grads(d, steps, seed=0, dtype=torch.float64, mean=0.3):
    gen = torch.Generator().manual_seed(seed)
    return [mean + torch.randn(d, generator=gen, dtype=dtype) for _ in range(steps)]


def global_rows(rel, numel, block_size, density):
    """Global indices of window rows (``rel``: ``(rows, k)`` block-relative), recomputed here
    from the layout rule: full blocks keep ⌈B·ρ⌉ entries each, in block order, then the tail."""
    n_full, kb = numel // block_size, math.ceil(round(block_size * density, 9))
    starts = [(j // kb) * block_size if j < n_full * kb else n_full * block_size
              for j in range(rel.shape[-1])]
    return rel.long() + torch.tensor(starts)


def bucket_steps(lo, hi, numel, bucket_size, dtype=torch.float64):
    """The quantization step u of every element's bucket."""
    u = (hi.to(dtype) - lo.to(dtype)) / 15
    return u.repeat_interleave(bucket_size)[:numel]


# -- M1–M8 -----------------------------------------------------------------------------------


def test_M1_density_one_within_the_window_is_adamw():
    """density 1, t ≤ m, α = 0: Adam exactly (fp64), decoupled weight decay included; the
    35-element weight spans two full blocks and a partial one."""
    shapes = [(5, 7), (13,)]
    w0 = [torch.randn(s, dtype=torch.float64) for s in shapes]
    ps = [torch.nn.Parameter(w.clone()) for w in w0]
    qs = [torch.nn.Parameter(w.clone()) for w in w0]
    m = 8
    opt = MicroAdam(full_size(ps), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, window=m, density=1.0,
                    block_size=16, bucket_size=8)
    ref = torch.optim.AdamW(qs, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, foreach=False)
    grads = list(zip(*[gen_grads(s, m, seed=i) for i, s in enumerate(shapes)]))
    for g in grads:
        run_steps(opt, ps, [g])
        run_steps(ref, qs, [g])
        for p, q in zip(ps, qs):
            torch.testing.assert_close(p.data, q.data, rtol=1e-13, atol=1e-15)
    # beyond the window the two differ (the window forgets): the test can tell them apart
    run_steps(opt, ps, [[2 * g for g in grads[0]]])
    run_steps(ref, qs, [[2 * g for g in grads[0]]])
    assert not torch.allclose(ps[0].data, qs[0].data, rtol=1e-9, atol=0)


@pytest.mark.parametrize("dtype,value_dtype", [(torch.float64, "bfloat16"), (torch.float32, "float32")])
def test_M2_density_one_keeps_the_error_zero(dtype, value_dtype):
    """Whenever the window stores values exactly (float64 parameters always do).  A bfloat16
    window on float32 weights leaves its rounding in the error instead (M5 covers that case)."""
    d = 37
    p = torch.nn.Parameter(torch.randn(d, dtype=dtype))
    opt = make_microadam([p], density=1.0, value_dtype=value_dtype)
    for g in gen_grads(d, 10, dtype=dtype):
        run_steps(opt, [p], [[g]])
        st = opt.state[p]
        assert not st["error"].any() and not st["error_min"].any() and not st["error_max"].any()
    # with density < 1 the same run does carry an error
    q = torch.nn.Parameter(torch.randn(d, dtype=dtype))
    opt = make_microadam([q], density=0.5, value_dtype=value_dtype)
    run_steps(opt, [q], [gen_grads(d, 1, dtype=dtype)])
    assert opt.state[q]["error"].any()


@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_M3_update_is_sparse_but_weight_decay_is_dense(eps):
    d, B, rho, m = 110, 20, 0.1, 4          # 5 full blocks keep 2 each, the tail of 10 keeps 1
    lr, wd = 1e-2, 0.05
    p = torch.nn.Parameter(torch.randn(d, dtype=torch.float64))
    opt = MicroAdam([p], lr=lr, eps=eps, weight_decay=wd, window=m, density=rho, block_size=B,
                    bucket_size=8)
    k = 5 * 2 + 1
    for t, g in enumerate(gen_grads(d, 10), start=1):
        before = p.detach().clone()
        run_steps(opt, [p], [[g]])
        decayed = before * (1 - lr * wd)
        u = (decayed - p.detach()) / lr
        assert torch.isfinite(u).all()
        st = opt.state[p]
        n = min(t, m)
        selected = torch.zeros(d, dtype=torch.bool)
        selected[global_rows(st["window_indices"][:n], d, B, rho).view(-1)] = True
        assert int(selected.sum()) <= n * k
        assert torch.equal(p.detach()[~selected], decayed[~selected])   # u = 0, decay applied
        assert (u[selected] != 0).all()
        assert int((u != 0).sum()) <= n * k


@pytest.mark.parametrize("stats_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,q", [(1000, 64), (999, 64), (37, 8), (5, 8)])
def test_M4_quantization_error_is_within_half_a_step(n, q, stats_dtype):
    gen = torch.Generator().manual_seed(n)
    x = 3.0 + torch.randn(n, generator=gen) * torch.linspace(0.01, 2.0, n)
    packed, lo, hi = quantize(x, q, stats_dtype)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    assert lo.numel() == hi.numel() == num_buckets(n, q) == math.ceil(n / q)
    assert lo.dtype == hi.dtype == stats_dtype
    y = dequantize(packed, lo, hi, n, q, torch.float32)
    u = bucket_steps(lo, hi, n, q)
    err = (y.double() - x.double()).abs()
    assert (err <= u / 2 + 4 * torch.finfo(torch.float32).eps * x.abs().double()).all()
    assert (err / (u / 2)).max() > 0.5      # the bound is tight, not vacuous
    # the stored statistics bracket every element of their bucket (rounded outwards in bf16)
    xb = torch.nn.functional.pad(x, (0, lo.numel() * q - n), value=float("nan")).view(-1, q)
    assert (lo.float() <= xb.nan_to_num(float("inf")).amin(1)).all()
    assert (hi.float() >= xb.nan_to_num(float("-inf")).amax(1)).all()


def test_M4_constant_buckets_round_trip_exactly_and_codes_are_packed_high_nibble_first():
    q = 16
    x = torch.cat([torch.full((q,), 0.75), torch.zeros(q), torch.full((q,), -2.5),
                   torch.arange(16.0) / 15, torch.full((3,), 1.25)])   # the last bucket is partial
    for stats in (torch.float32, torch.bfloat16):
        packed, lo, hi = quantize(x, q, stats)
        y = dequantize(packed, lo, hi, x.numel(), q, torch.float32)
        assert torch.isfinite(y).all()
        const = torch.ones(x.numel(), dtype=torch.bool)
        const[48:64] = False
        assert torch.equal(y[const], x[const])
        codes = unpack_codes(packed, x.numel())
        assert not codes[const].any()
        assert torch.equal(codes[48:64], torch.arange(16, dtype=torch.uint8))
        # element 2i in the high nibble of byte i, 2i+1 in the low one; the odd last element's
        # partner nibble is zero
        assert packed[24].item() == (0 << 4) | 1 and packed[31].item() == (14 << 4) | 15
        assert packed[-1].item() & 0x0F == 0
        # before the cast to uint8 too: a NaN code would be cast to an undefined byte
        nb = lo.numel()
        padded = torch.cat([x, x[-1:].expand(nb * q - x.numel())]).view(nb, q)
        assert torch.equal(bucket_codes(padded, lo, hi)[torch.tensor([0, 1, 2, 4])],
                           torch.zeros(4, q))


@pytest.mark.parametrize("value_dtype", ["bfloat16", "float32"])
def test_M5_kept_values_plus_error_reconstruct_the_accumulator(value_dtype):
    d, B, rho, q, m = 150, 32, 0.1, 8, 3
    p = torch.nn.Parameter(torch.randn(d))
    opt = MicroAdam([p], window=m, density=rho, block_size=B, bucket_size=q, value_dtype=value_dtype)
    for t, g in enumerate(gen_grads(d, 8, dtype=torch.float32), start=1):
        st = opt.state.get(p)
        e_t = (dequantize(st["error"], st["error_min"], st["error_max"], d, q, torch.float32)
               if st else torch.zeros(d))
        a = g + e_t
        run_steps(opt, [p], [[g]])
        st = opt.state[p]
        row = (t - 1) % m
        kept = torch.zeros(d)
        kept[global_rows(st["window_indices"][row:row + 1], d, B, rho)[0]] = st["window_values"][row].float()
        e_next = dequantize(st["error"], st["error_min"], st["error_max"], d, q, torch.float32)
        u = bucket_steps(st["error_min"], st["error_max"], d, q, torch.float32)
        err = (kept + e_next - a).abs()
        assert (err <= u / 2 + 1e-6 * a.abs()).all(), t


def test_M6_steady_state_scale_for_a_constant_gradient():
    """Always-selected, constant gradient: |u| = 1 while t ≤ m, then the window mismatch
    (1-β1^m)/(1-β1^t) / sqrt((1-β2^m)/(1-β2^t)), 6.07 at t = 2000."""
    b1, b2, m = 0.9, 0.999, 10
    g = torch.tensor([0.5, -2.0, 3.0, -1e-3], dtype=torch.float64)
    d = g.numel()
    idx = torch.zeros(m, d, dtype=torch.int16)
    val = torch.zeros(m, d, dtype=torch.float64)
    err = torch.zeros(2, dtype=torch.uint8)
    lo, hi = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    layout = topk_layout(d, 4, 1.0)
    for t in range(1, 2001):
        u = microadam_update(g, idx, val, err, lo, hi, t, layout=layout, bucket_size=4,
                             beta1=b1, beta2=b2, eps=0.0)
        scale = 1.0 if t <= m else (1 - b1**m) / (1 - b1**t) / math.sqrt((1 - b2**m) / (1 - b2**t))
        torch.testing.assert_close(u, scale * g.sign(), rtol=1e-12, atol=0)
    assert round(u.abs().max().item(), 2) == 6.07
    assert (1 - b1**m) / math.sqrt(1 - b2**m) == pytest.approx(6.53, abs=5e-3)


def test_M7_ring_ages():
    """Step s writes row (s-1) mod m; at step t the row written at step s has age t - s, so
    the oldest row is m-1 old once the ring has wrapped."""
    d, m = 6, 4
    p = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))
    opt = MicroAdam(full_size([p]), window=m, density=1.0, block_size=8, bucket_size=2, lr=0.0)
    for t in range(1, 11):
        run_steps(opt, [p], [[torch.full((d,), float(t), dtype=torch.float64)]])
        vals = opt.state[p]["window_values"][:, 0]
        for r in range(min(t, m)):
            age = (t - 1 - r) % m
            assert vals[r].item() == t - age
        if t > m:
            assert sorted(t - vals.numpy()) == list(range(m))          # ages 0 … m-1


def test_M7_a_parameter_that_skips_steps_keeps_its_own_clock():
    d = 20
    p, q = (torch.nn.Parameter(torch.randn(d, dtype=torch.float64)) for _ in range(2))
    q_alone = torch.nn.Parameter(q.detach().clone())
    opt = make_microadam([p, q], lr=1e-2)
    alone = make_microadam([q_alone], lr=1e-2)
    gp, gq = gen_grads(d, 12, seed=1), gen_grads(d, 12, seed=2)
    fed = 0
    for t in range(12):
        p.grad = gp[t].clone()
        if t in (2, 3, 7):
            q.grad = None
        elif t == 5:
            q.grad = torch.zeros(d, dtype=torch.float64)    # skipped by the zero-gradient rule
        else:
            q.grad = gq[t].clone()
            run_steps(alone, [q_alone], [[gq[t]]])
            fed += 1
        opt.step()
    assert torch.equal(q.detach(), q_alone.detach())
    assert int(opt.state[q]["step"]) == fed == 8 and int(opt.state[p]["step"]) == 12
    assert_same_state({0: opt.state[q]}, {0: alone.state[q_alone]})


@pytest.mark.parametrize("d,B,rho", [(3 * 40 + 17, 40, 0.1), (80, 40, 0.3), (25, 40, 0.2), (100, 100, 0.07)])
def test_M8_blockwise_topk_counts_bounds_and_selection(d, B, rho):
    gen = torch.Generator().manual_seed(d)
    g = torch.randperm(d, generator=gen).double() + 1.0       # distinct magnitudes
    g *= torch.where(torch.rand(d, generator=gen) < 0.5, -1.0, 1.0).double()
    p = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))
    opt = MicroAdam([p], window=3, density=rho, block_size=B, bucket_size=8)
    run_steps(opt, [p], [[g]])
    st = opt.state[p]
    n_full, tail = d // B, d % B
    kb, kt = math.ceil(round(B * rho, 9)), (math.ceil(round(tail * rho, 9)) if tail else 0)
    row = st["window_indices"][0]
    assert row.dtype == torch.int16 and row.numel() == n_full * kb + kt == topk_layout(d, B, rho).k
    blocks = [(i * B, B, row[i * kb:(i + 1) * kb]) for i in range(n_full)]
    if tail:
        blocks.append((n_full * B, tail, row[n_full * kb:]))
    for start, size, rel in blocks:
        assert rel.numel() == kept_per_block(size, rho)
        assert (rel >= 0).all() and (rel < size).all()
        assert rel.unique().numel() == rel.numel()
        mags = g[start:start + size].abs()
        chosen = torch.zeros(size, dtype=torch.bool)
        chosen[rel.long()] = True
        if not chosen.all():
            assert mags[chosen].min() > mags[~chosen].max()
    kept = global_rows(row[None], d, B, rho)[0]
    assert torch.equal(st["window_values"][0], g[kept])


# -- zero-range buckets, the plain AdamW group, state accounting ---------------------------------


def test_zero_gradients_on_a_fresh_error_feedback_give_no_nan():
    """Zero-range buckets (all-zero error and residual) quantize without NaN."""
    d = 40
    p = torch.nn.Parameter(torch.randn(d))
    opt = make_microadam([p], density=0.25)
    g = torch.zeros(d)
    g[::8] = 1.0     # exactly what the top-k keeps: every residual bucket is constant 0
    run_steps(opt, [p], [[g], [g]])
    st = opt.state[p]
    assert not st["error"].any() and not st["error_min"].any() and not st["error_max"].any()
    assert torch.isfinite(p).all()


def test_plain_adamw_group_and_compressed_1d_parameters():
    w0, b0 = torch.randn(6, 9), torch.randn(9)
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    ref = torch.nn.Parameter(b0.clone())
    opt = make_microadam([{"params": [w], "compress": False}, {"params": [b]}], lr=1e-2, weight_decay=0.1)
    adamw = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1, foreach=True)
    wref = torch.nn.Parameter(w0.clone())
    adamw_w = torch.optim.AdamW([wref], lr=1e-2, weight_decay=0.1, foreach=True)
    for gw, gb in zip(gen_grads(54, 5, dtype=torch.float32), gen_grads(9, 5, dtype=torch.float32)):
        run_steps(opt, [w, b], [[gw.view(6, 9), gb]])
        run_steps(adamw_w, [wref], [[gw.view(6, 9)]])
        run_steps(adamw, [ref], [[gb]])
    assert torch.equal(w, wref)
    assert set(opt.state[w]) == {"step", "exp_avg", "exp_avg_sq"}
    assert "window_indices" in opt.state[b]      # a 1-D parameter is compressed by default
    assert not torch.allclose(b, ref)


def test_state_bytes_match_the_formulas():
    """Per parameter of d elements: indices 2mk, values 2mk (bf16), error ⌈d/2⌉, min and max
    2⌈d/q⌉ each, step 8, layout 24; AdamW parameters 8d + a 4-byte step."""
    m, B, rho, q = 4, 16, 0.25, 8
    shapes = [(5, 7), (33,), (16,)]
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    dense = torch.nn.Parameter(torch.randn(10))
    opt = MicroAdam([{"params": ps}, {"params": [dense], "compress": False}], window=m, density=rho,
                    block_size=B, bucket_size=q)
    run_steps(opt, ps + [dense], [[torch.randn(s) for s in shapes] + [torch.randn(10)]])
    ds = [p.numel() for p in ps]
    ks = [(d // B) * math.ceil(B * rho) + (math.ceil((d % B) * rho) if d % B else 0) for d in ds]
    assert ks == [9, 9, 4]
    b = opt.state_bytes()
    assert b["lowrank_moments"] == sum(2 * m * k + 2 * m * k for k in ks)
    assert b["error_feedback"] == sum(math.ceil(d / 2) + 2 * 2 * math.ceil(d / q) for d in ds)
    assert b["dense_moments"] == 2 * 4 * 10
    assert b["counters"] == len(ps) * (8 + 24) + 4
    assert b["bases"] == 0
    assert b["total"] == sum(v for k, v in b.items() if k != "total")
    assert b["total"] == sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values())


@pytest.mark.parametrize("value_dtype,per_value", [("bfloat16", 2), ("float32", 4)])
def test_state_bytes_per_parameter_at_scale(value_dtype, per_value):
    """§3(a): (2+2)·m·ρ + 1/2 + 4/q bytes per parameter with bf16 values (≈0.9625 at the
    defaults m=10, ρ=0.01, q=64)."""
    d = 200_000
    p = torch.nn.Parameter(torch.zeros(d))
    opt = MicroAdam([p])
    p.grad = torch.randn(d)
    opt.param_groups[0]["value_dtype"] = value_dtype
    opt.step()
    m, rho, q = 10, 0.01, 64
    expected = (2 + per_value) * m * rho + 0.5 + 2 * per_value / q
    assert opt.state_bytes()["total"] / d == pytest.approx(expected, rel=2e-3)
    if value_dtype == "bfloat16":
        assert expected == pytest.approx(0.9625)


# -- bf16 ------------------------------------------------------------------------------------


def test_bf16_parameters_compute_in_fp32():
    """Fed the same (bf16-exact) gradients, a bf16 and an fp32 parameter keep identical state;
    the bf16 weight is the fp32 update of its own value, rounded once."""
    d, lr, wd = 70, 1e-2, 0.1
    w0 = torch.randn(d).bfloat16()
    pb = torch.nn.Parameter(w0.clone())
    pf = torch.nn.Parameter(w0.float())
    ob, of = make_microadam([pb], lr=lr, weight_decay=wd), make_microadam([pf], lr=lr, weight_decay=wd)
    for t, g in enumerate(gen_grads(d, 6, dtype=torch.bfloat16)):
        before = pb.detach().float()
        run_steps(ob, [pb], [[g]])
        run_steps(of, [pf], [[g.float()]])
        assert_same_state({0: ob.state[pb]}, {0: of.state[pf]})
        if t == 0:
            assert torch.equal(pb.detach(), pf.detach().bfloat16())
    st = ob.state[pb]
    assert st["window_values"].dtype == torch.bfloat16 and st["error_min"].dtype == torch.bfloat16
    assert pb.dtype == torch.bfloat16 and not torch.equal(pb.detach().float(), before)


def test_bf16_model_trains():
    model = tiny_mlp(dtype=torch.bfloat16)
    opt = make_microadam(model.parameters(), lr=1e-2, density=0.5, window=8)
    batches = mlp_batches(1, dtype=torch.bfloat16) * 40
    losses = train(model, opt, batches)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())


# -- alpha and refusals ----------------------------------------------------------------------


def test_alpha_adds_a_fraction_of_the_error_and_keeps_the_rest():
    d, q = 64, 8
    layout = topk_layout(d, 16, 0.25)
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(d, generator=gen)

    def fresh():
        return (torch.zeros(4, layout.k, dtype=torch.int16), torch.zeros(4, layout.k, dtype=torch.bfloat16),
                torch.zeros(d // 2, dtype=torch.uint8), torch.zeros(d // q, dtype=torch.bfloat16),
                torch.zeros(d // q, dtype=torch.bfloat16))

    s0, s1 = fresh(), fresh()
    hp = dict(layout=layout, bucket_size=q, beta1=0.9, beta2=0.999, eps=1e-8)
    u0 = microadam_update(g, *s0, 1, **hp)
    u1 = microadam_update(g, *s1, 1, alpha=0.4, **hp)
    e0 = dequantize(s0[2], s0[3], s0[4], d, q, torch.float32)
    assert e0.abs().max() > 0
    torch.testing.assert_close(u1 - u0, 0.4 * e0, rtol=1e-6, atol=1e-7)
    packed, lo, hi = quantize(0.6 * e0, q, torch.bfloat16)
    assert torch.equal(s1[2], packed) and torch.equal(s1[3], lo) and torch.equal(s1[4], hi)


@pytest.mark.parametrize("kw,key", [
    (dict(window=0), "window"), (dict(window=2.0), "window"),
    (dict(density=0.0), "density"), (dict(density=1.5), "density"), (dict(density="1%"), "density"),
    (dict(block_size=0), "block_size"), (dict(block_size=40_000), "block_size"),
    (dict(bucket_size=7), "bucket_size"), (dict(bucket_size=0), "bucket_size"),
    (dict(alpha=-0.1), "alpha"), (dict(alpha=1.0), "alpha"), (dict(value_dtype="float16"), "value_dtype"),
    (dict(value_dtype={}), "value_dtype"),
])
def test_bad_hyperparameters_are_refused(kw, key):
    """MicroAdam's own keys; the AdamW ones are checked for every optimizer in
    test_optimizer_contract.py."""
    assert_bad_group_refused(MicroAdam, kw, key)


@pytest.mark.parametrize("key,value", [("window", 5), ("density", 0.5), ("block_size", 8),
                                       ("bucket_size", 4), ("value_dtype", "float32")])
def test_state_shaping_hyperparameters_cannot_change_after_the_first_step(key, value):
    p = torch.nn.Parameter(torch.randn(40))
    assert_change_refused(make_microadam([("layer.w", p)]), p, {key: value},
                          rf"layer\.w: {key}={value!r} does not match")


def test_layout_helpers():
    assert kept_per_block(100, 0.07) == 7 and kept_per_block(29_056, 0.01) == 291
    lay = topk_layout(2 * 29_056 + 1000, 29_056, 0.01)
    assert lay == TopkLayout(2 * 29_056 + 1000, 29_056, 291, 10) and lay.k == 592
    off = lay.offsets(torch.device("cpu"))
    assert off[:291].eq(0).all() and off[291:582].eq(29_056).all() and off[582:].eq(58_112).all()
