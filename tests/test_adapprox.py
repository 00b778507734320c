"""Adapprox: invariants A1–A6 of algorithms.md §7, the rank rule, the dense path for
non-matrices, the guidance hook, its state accounting and the refusal of bad Adapprox
hyperparameters (the invariants every optimizer keeps are in test_optimizer_contract.py)."""

import math

import pytest
import torch

import ds_lowrank.optim.adapprox as adapprox_mod
from ds_lowrank.distributed.reducer import run_local
from ds_lowrank.linalg.factorization import matrix_inner, randomized_factorization
from ds_lowrank.optim.adapprox import Adapprox, adapprox_update, rank_expansion, select_rank
from helpers import (full_size, assert_bad_group_refused, assert_change_refused, grad_sequence, make_adapprox,
                     run_steps)

ROW, COL = "exp_avg_sq_row_factor", "exp_avg_sq_col_factor"


def _nonneg(shape, seed, k=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((k, *shape), generator=gen, dtype=torch.float64).square() + 0.1


def _recon(st):
    return st[ROW] @ st[COL].T


def _rms(x):
    return (x.square().mean()).sqrt().item()


# -- A1, A2: the factorization -----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 11), (11, 7)])
def test_A1_full_width_reconstructs_exactly(shape):
    A = _nonneg(shape, 0, k=2)
    f = run_local(randomized_factorization(A, min(shape), seeds=[1, 2], power_iters=5))
    torch.testing.assert_close(f.Q @ f.U.mT, A, rtol=0, atol=1e-12 * A.abs().max().item())
    assert f.prefix_errors()[:, -1].max() < 1e-7
    torch.testing.assert_close(f.Q.mT @ f.Q, torch.eye(min(shape), dtype=A.dtype).expand(2, -1, -1),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(30, 45), (45, 30)])
def test_A2_error_identity_and_every_prefix_error(shape):
    """‖A - Q_j·U_jᵀ‖² = ‖A‖² - ‖U_j‖² for each prefix j, and prefix_errors() gives it."""
    A = _nonneg(shape, 3, k=2)
    f = run_local(randomized_factorization(A, 9, seeds=[5, 6], power_iters=2))
    errors = f.prefix_errors()
    for j in range(1, 10):
        Qj, Uj = f.Q[..., :j], f.U[..., :j]
        direct = (A - Qj @ Uj.mT).square().sum((-2, -1))
        identity = A.square().sum((-2, -1)) - Uj.square().sum((-2, -1))
        torch.testing.assert_close(direct, identity, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(errors[:, j - 1], (direct / A.square().sum((-2, -1))).sqrt(),
                                   rtol=1e-7, atol=1e-12)
    assert (errors[:, 1:] <= errors[:, :-1]).all()


def test_A2_rayleigh_ritz_truncation_uses_the_oversampling():
    """Slow spectral decay: k columns kept out of k + p beat a k-column sketch, near the optimum."""
    m, n, k, p = 60, 80, 4, 8
    gen = torch.Generator().manual_seed(7)
    U = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))[0]
    Vt = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))[0].T
    A = (U @ torch.diag(1.0 / torch.arange(1, m + 1, dtype=torch.float64) ** 0.5) @ Vt)[None]
    s = torch.linalg.svdvals(A[0])
    optimal = (s[k:].square().sum() / s.square().sum()).sqrt().item()
    wide = run_local(randomized_factorization(A, k + p, seeds=[0], power_iters=1)).prefix_errors()[0, k - 1].item()
    narrow = run_local(randomized_factorization(A, k, seeds=[0], power_iters=1)).prefix_errors()[0, k - 1].item()
    assert optimal <= wide < narrow
    assert wide < 1.01 * optimal


# -- A3: full rank reduces to AdamW(β1 = 0) or RMSprop -----------------------------------------


@pytest.mark.parametrize("shape", [(6, 9), (9, 6)])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_A3_full_rank_unclipped_is_adamw_or_rmsprop(shape, bias_correction):
    d, b2, lr, eps = min(shape), 0.99, 1e-2, 1e-8
    W0 = torch.randn(shape, dtype=torch.float64)
    p, q = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone())
    wd = 0.1 if bias_correction else 0.0
    opt = Adapprox(full_size([p]), lr=lr, betas=(0.0, b2), eps=eps, weight_decay=wd, rank_init=d,
                   rank_min=d, rank_max=d, clip_threshold=None, bias_correction=bias_correction)
    if bias_correction:
        ref = torch.optim.AdamW([q], lr=lr, betas=(0.0, b2), eps=eps, weight_decay=wd)
    else:
        ref = torch.optim.RMSprop([q], lr=lr, alpha=b2, eps=eps)
    for g in grad_sequence(shape, 25):
        run_steps(opt, [p], [[g]])
        run_steps(ref, [q], [[g]])
    torch.testing.assert_close(p.data, q.data, rtol=1e-9, atol=1e-11)
    assert "exp_avg" not in opt.state[p]


# -- A4: the rank ------------------------------------------------------------------------------


def test_rank_expansion_is_a_sigmoid_from_one_to_its_cap():
    thr, growth = 0.01, 8
    values = [rank_expansion(thr * x, thr, growth, 1.0) for x in (1.0001, 1.5, 2, 3, 5, 10, 100)]
    assert values[0] == 1 and values[-1] == growth
    assert values == sorted(values) and len(set(values)) > 3
    assert rank_expansion(thr * 3, thr, growth, 1.0) == math.ceil(8 * (2 / (1 + math.exp(-2)) - 1))
    assert rank_expansion(0.5, 0.0, growth, 1.0) == growth


def test_select_rank_grows_by_the_expansion_and_shrinks_to_the_smallest_sufficient():
    errors = [0.5, 0.3, 0.2, 0.12, 0.08, 0.05, 0.03, 0.02, 0.0]
    # from rank 1 (error 0.5 = 5×thr): +ceil(4·tanh(2)) = +4 -> rank 5 (0.08 ≤ 0.1): stop
    assert select_rank(errors, 1, 1, 9, 0.1, growth=4, sharpness=1.0) == 5
    # growth 1 steps one at a time and lands on the smallest sufficient rank
    assert select_rank(errors, 1, 1, 9, 0.1, growth=1, sharpness=1.0) == 5
    assert select_rank(errors, 1, 1, 3, 0.1, growth=4, sharpness=1.0) == 3       # capped
    assert select_rank(errors, 8, 1, 9, 0.1, growth=4, sharpness=1.0) == 5       # shrinks
    assert select_rank(errors, 8, 6, 9, 0.1, growth=4, sharpness=1.0) == 6       # not below rank_min
    assert select_rank([0.0] * 5, 4, 2, 5, 0.1, growth=4, sharpness=1.0) == 2    # zero matrix


@pytest.mark.parametrize("interval", [1, 3])
def test_A4_rank_bounds_and_error_at_every_evaluation(interval):
    shape, thr, k_min, k_max, b2 = (20, 30), 0.25, 1, 8, 0.9
    grads = (grad_sequence(shape, 12, mean=0.5)
             + [3 * g for g in grad_sequence(shape, 8, seed=5, mean=0.0)])
    p = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
    opt = Adapprox([p], betas=(0.9, b2), rank_min=k_min, rank_max=k_max, rank_interval=interval,
                   error_threshold=thr, rank_growth=3)
    ranks, prev_V = [], torch.zeros(shape, dtype=torch.float64)
    for t, g in enumerate(grads):
        V = b2 * prev_V + (1 - b2) * g * g
        run_steps(opt, [p], [[g]])
        st = opt.state[p]
        k = int(st["rank"])
        assert k_min <= k <= k_max
        assert not st[ROW][:, k:].any() and not st[COL][:, k:].any()
        error = ((V - _recon(st)).norm() / V.norm()).item()
        if t % interval == 0:
            assert k == k_max or error <= thr + 1e-12, f"step {t}: rank {k}, error {error}"
        else:
            assert k == ranks[-1], f"step {t}: the rank changed between evaluations"
        ranks.append(k)
        prev_V = _recon(st).clamp(min=0)
    down = any(b < a for a, b in zip(ranks, ranks[1:]))
    up = any(b > a for a, b in zip(ranks[1:], ranks[2:]))
    assert down and up, ranks


def test_A4_bounds_are_capped_by_the_shape():
    p = torch.nn.Parameter(torch.randn(5, 12))
    opt = Adapprox(full_size([p]), rank_init=4, rank_min=3, rank_max=64)
    run_steps(opt, [p], [[torch.randn(5, 12)]])
    st = opt.state[p]
    assert st[ROW].shape == (5, 5) and st[COL].shape == (12, 5)
    assert 3 <= int(st["rank"]) <= 5


def test_factor_width_is_capped_at_the_break_even_width():
    """By default the factors (and their rank counter) take no more bytes than the dense
    second moment: K <= (4·m·n - 8) // (4·(m + n)), 3 for 5 × 12 (68 float32 per column
    against 60 dense); the rank bounds follow."""
    p = torch.nn.Parameter(torch.randn(5, 12))
    opt = Adapprox([p], rank_init=4, rank_min=3, rank_max=64)
    run_steps(opt, [p], [[torch.randn(5, 12)]])
    st = opt.state[p]
    assert st[ROW].shape == (5, 3) and st[COL].shape == (12, 3) and int(st["rank"]) == 3
    assert Adapprox.rank_bounds(opt.param_groups[0], (5, 12)) == (3, 3, 3)
    # 64 × 256 at the default rank_max=128: 51 columns, not 64 (9.0 bytes per parameter)
    assert Adapprox.factor_width(opt.param_groups[0], (64, 256)) == 51


@pytest.mark.parametrize("shape", [(1, 9), (9, 1), (2, 2), (2, 3)])
def test_a_matrix_whose_factors_would_be_larger_keeps_a_dense_second_moment(shape):
    """Where not even one column fits, the matrix takes the vectors' update: the same as a
    vector of its elements (the dense second moment the factors stand for)."""
    W0 = torch.randn(shape)
    p, v = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone().reshape(-1))
    opt = Adapprox([p, v], lr=1e-2, weight_decay=0.1)
    for g in grad_sequence(shape, 4):
        run_steps(opt, [p, v], [[g, g.reshape(-1)]])
    assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
    torch.testing.assert_close(p.data.reshape(-1), v.data, rtol=0, atol=0)
    assert opt.state_bytes()["total"] <= 2 * (8 * p.numel() + 4)
    # a change that would turn it factored is refused, not silently reinterpreted
    opt.param_groups[0]["within_adamw"] = False
    p.grad = torch.randn(shape)
    v.grad = None
    with pytest.raises(ValueError, match="it has taken dense steps"):
        opt.step()


# -- A5: non-negativity, finiteness, clipping -------------------------------------------------


def test_A5_negative_reconstruction_is_clamped():
    gen = torch.Generator().manual_seed(0)
    k, d, c, K = 2, 6, 8, 2
    Q_prev = torch.randn(k, d, K, generator=gen, dtype=torch.float64)
    U_prev = torch.randn(k, c, K, generator=gen, dtype=torch.float64)
    assert (Q_prev @ U_prev.mT < 0).any()
    G = torch.randn(k, d, c, generator=gen, dtype=torch.float64)
    G[:, 0] = 0.0     # where the reconstruction is negative and g = 0, V would be ≤ 0
    b2, eps, clip = 0.999, 1e-8, 1.0
    Q, U, ranks, M, D = run_local(adapprox_update(
        G, Q_prev, U_prev, None, [3, 3], [2, 2], width=4, rank_rule=None, seeds=[0, 1], power_iters=2,
        beta1=0.0, beta2=b2, eps=eps, clip_threshold=clip, bias_correction=False))
    V = b2 * (Q_prev @ U_prev.mT).clamp(min=0) + (1 - b2) * G * G
    assert (V >= 0).all() and (V == 0).any()
    u = G / (V.sqrt() + eps)
    rms = u.square().mean((-2, -1), keepdim=True).sqrt()
    torch.testing.assert_close(D, u / (rms / clip).clamp(min=1), rtol=1e-12, atol=0)
    assert torch.isfinite(D).all() and torch.isfinite(Q).all() and torch.isfinite(U).all()
    assert ranks == [2, 2] and M is None


def test_A5_first_update_is_clipped_from_31_6_to_d():
    """No bias correction, zero initial V: RMS(û_1) = 1/√(1-β2) ≈ 31.62 unclipped."""
    shape, lr = (8, 12), 1e-3
    g = torch.randn(shape, dtype=torch.float64)
    for clip, expected in ((None, 1 / math.sqrt(1 - 0.999)), (1.0, 1.0), (0.5, 0.5)):
        W0 = torch.randn(shape, dtype=torch.float64)
        p = torch.nn.Parameter(W0.clone())
        opt = Adapprox([p], lr=lr, betas=(0.0, 0.999), clip_threshold=clip, rank_max=3)
        run_steps(opt, [p], [[g]])
        assert _rms((W0 - p.data) / lr) == pytest.approx(expected, rel=1e-5)   # ε shifts it


def test_A5_update_rms_stays_within_d_and_everything_is_finite():
    shape, lr, clip = (16, 10), 1e-2, 0.7
    W0 = torch.randn(shape, dtype=torch.float64)
    p = torch.nn.Parameter(W0.clone())
    opt = Adapprox([p], lr=lr, betas=(0.9, 0.99), clip_threshold=clip, rank_max=3, rank_interval=2)
    for g in grad_sequence(shape, 15):
        g[0] = 0.0                                   # a dead row
        before = p.detach().clone()
        run_steps(opt, [p], [[g]])
        assert _rms((before - p.data) / lr) <= clip * (1 + 1e-12)
        assert all(torch.isfinite(t).all() for t in opt.state[p].values())
        assert (_recon(opt.state[p]).clamp(min=0) >= 0).all()


# -- A6: seeds and the zero matrix (replicas: test_optimizer_contract.py) -------------------------


def test_A6_same_seeds_same_factors_and_different_seeds_differ():
    A = _nonneg((20, 30), 4, k=2)
    f1 = run_local(randomized_factorization(A, 4, seeds=[11, 12], power_iters=1))
    f2 = run_local(randomized_factorization(A.clone(), 4, seeds=[11, 12], power_iters=1))
    f3 = run_local(randomized_factorization(A, 4, seeds=[13, 12], power_iters=1))
    assert torch.equal(f1.Q, f2.Q) and torch.equal(f1.U, f2.U)
    assert not torch.equal(f1.Q[0], f3.Q[0]) and torch.equal(f1.Q[1], f3.Q[1])


def test_A6_zero_matrix_gives_rank_min_and_no_nan():
    A = torch.zeros(2, 6, 9)
    f = run_local(randomized_factorization(A, 5, seeds=[0, 1]))
    assert torch.equal(f.Q, torch.zeros_like(f.Q)) and torch.equal(f.U, torch.zeros_like(f.U))
    errors = f.prefix_errors()
    assert torch.equal(errors, torch.zeros_like(errors))
    k = [select_rank(e, 4, 2, 5, 0.01, 8, 1.0) for e in errors.tolist()]
    assert k == [2, 2]
    G = torch.zeros(2, 6, 9)
    Q, U, ranks, _, D = run_local(adapprox_update(
        G, torch.zeros(2, 6, 5), torch.zeros(2, 9, 5), torch.zeros(2, 6, 9), [0, 0], [4, 4], width=5,
        rank_rule=lambda e, r: select_rank(e, r, 2, 5, 0.01, 8, 1.0), seeds=[0, 1], power_iters=5,
        beta1=0.9, beta2=0.999, eps=1e-8, clip_threshold=1.0, bias_correction=False))
    assert ranks == [2, 2]
    assert all(torch.isfinite(t).all() and not t.any() for t in (Q, U, D))


# -- parameters that are not matrices, groups, the guidance hook ------------------------------


def test_vectors_keep_a_dense_second_moment_and_the_same_rule():
    n, lr, (b1, b2), eps, wd, clip = 7, 1e-2, (0.9, 0.99), 1e-8, 0.1, 1.0
    w0 = torch.randn(n, dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    opt = Adapprox([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, clip_threshold=clip)
    W, M, V = w0.clone(), torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for g in grad_sequence((n,), 10):
        run_steps(opt, [p], [[g]])
        V = b2 * V + (1 - b2) * g * g
        u = g / (V.sqrt() + eps)
        u = u / max(1.0, _rms(u) / clip)
        M = b1 * M + (1 - b1) * u
        W = (1 - lr * wd) * W - lr * M
    torch.testing.assert_close(p.data, W, rtol=1e-12, atol=1e-14)
    assert sorted(opt.state[p]) == ["exp_avg", "exp_avg_sq", "step"]


def test_groups_with_lowrank_false_use_adamw():
    shapes = [(6, 5), (6,)]
    dense = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in dense]
    matrix = torch.nn.Parameter(torch.randn(6, 8, dtype=torch.float64))
    opt = Adapprox([{"params": [matrix]}, {"params": dense, "compress": False}], lr=1e-2, weight_decay=0.1)
    adamw = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1, foreach=True)
    for t in range(5):
        grads = [torch.randn(s, dtype=torch.float64) for s in shapes]
        run_steps(opt, [*dense, matrix], [[*grads, torch.randn(6, 8, dtype=torch.float64)]])
        run_steps(adamw, twins, [grads])
    for p, q in zip(dense, twins):
        torch.testing.assert_close(p.data, q.data, rtol=1e-14, atol=1e-15)
    assert ROW in opt.state[matrix] and ROW not in opt.state[dense[0]]


def test_guidance_hook_gets_the_first_moment_and_update_and_is_applied():
    shape = (6, 10)
    grads = grad_sequence(shape, 5)
    calls = []

    def double(direction, update, inner):
        calls.append((direction.shape, update.shape))
        torch.testing.assert_close(inner(direction, update).flatten(),
                                   (direction * update).sum((-2, -1)), rtol=1e-12, atol=0)
        return 2 * direction

    W0 = torch.randn(shape, dtype=torch.float64)
    p, q = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone())
    guided = Adapprox([("w", p)], lr=1e-2, rank_max=3, guidance=double)
    plain = Adapprox([("w", q)], lr=2e-2, rank_max=3)
    for g in grads:
        run_steps(guided, [p], [[g]])
        run_steps(plain, [q], [[g]])
    assert torch.equal(p, q)
    assert calls == [((1, *shape), (1, *shape))] * len(grads)
    calls.clear()
    no_m = Adapprox([torch.nn.Parameter(W0.clone())], betas=(0.0, 0.999), rank_max=3, guidance=double)
    run_steps(no_m, no_m.param_groups[0]["params"], [[grads[0]]])
    assert calls == []


def test_chunked_batches_give_the_same_result(monkeypatch):
    """Same-shape matrices are cut into chunks to bound the dense transients; results do not change."""
    shapes = [(6, 10)] * 5 + [(7,)] * 3
    grads = [[torch.randn(s, dtype=torch.float64) for s in shapes] for _ in range(4)]
    runs = []
    for budget in (1 << 26, 70):       # 70 elements: one 6×10 matrix, or ten 7-vectors, per chunk
        monkeypatch.setattr(adapprox_mod, "_BATCH_ELEMENTS", budget)
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
        opt = Adapprox([(f"p{i}", p) for i, p in enumerate(ps)], rank_max=3, rank_interval=2)
        run_steps(opt, ps, grads)
        runs.append(ps)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_matrix_inner_sums_each_matrix():
    X, Y = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    torch.testing.assert_close(run_local(matrix_inner(X, Y)), (X * Y).sum((-2, -1)))


# -- the first moment, state accounting, Adapprox's own hyperparameters ------------------------


def test_first_moment_follows_beta1():
    p = torch.nn.Parameter(torch.randn(6, 8))
    opt = make_adapprox([p])
    run_steps(opt, [p], [[torch.randn(6, 8)]])
    assert "exp_avg" in opt.state[p]
    opt.param_groups[0]["betas"] = (0.0, 0.999)
    run_steps(opt, [p], [[torch.randn(6, 8)]])
    assert "exp_avg" not in opt.state[p]


@pytest.mark.parametrize("beta1", [0.9, 0.0])
def test_state_bytes_match_the_formulas(beta1):
    K = 5
    wide = torch.nn.Parameter(torch.randn(12, 40))
    tall = torch.nn.Parameter(torch.randn(40, 3))       # K capped at (4·120 - 8) // (4·43) = 2
    bias = torch.nn.Parameter(torch.randn(40))
    opt = Adapprox([wide, tall, bias], rank_max=K, betas=(beta1, 0.999))
    run_steps(opt, [wide, tall, bias], [[torch.randn(12, 40), torch.randn(40, 3), torch.randn(40)]])
    b = opt.state_bytes()
    first = beta1 > 0
    assert b["lowrank_moments"] == 4 * ((12 + 40) * K + (40 + 3) * 2)
    assert b["dense_moments"] == 4 * (40 * (1 + first) + first * (12 * 40 + 40 * 3))
    assert b["bases"] == 0 and b["error_feedback"] == 0
    assert b["counters"] == 3 * 4 + 2 * 8              # steps (float32) and ranks (int64)
    assert b["total"] == sum(v for k, v in b.items() if k != "total")


@pytest.mark.parametrize("kw,key", [
    (dict(eps=0.0), "eps"), (dict(rank_min=0), "rank_min"), (dict(rank_max=0), "rank_max"),
    (dict(rank_min=4, rank_max=2), "rank_max"), (dict(rank_init=0), "rank_init"),
    (dict(rank_init=1.5), "rank_init"), (dict(rank_interval=0), "rank_interval"),
    (dict(error_threshold=1.5), "error_threshold"), (dict(error_threshold=-0.1), "error_threshold"),
    (dict(rank_growth=0), "rank_growth"), (dict(rank_growth_sharpness=0.0), "rank_growth_sharpness"),
    (dict(oversample=-1), "oversample"), (dict(power_iters=2.5), "power_iters"),
    (dict(clip_threshold=0.0), "clip_threshold"), (dict(bias_correction="yes"), "bias_correction"),
])
def test_bad_hyperparameters_are_refused(kw, key):
    """Adapprox's own keys, and its stricter eps (> 0: where g = 0 and V = 0, ε = 0 would give
    0/0); the AdamW ones are checked for every optimizer in test_optimizer_contract.py."""
    assert_bad_group_refused(Adapprox, kw, key)


def test_guidance_must_be_a_function():
    p = torch.nn.Parameter(torch.randn(8, 10))
    with pytest.raises(ValueError, match=r"invalid guidance='cosine': expected None or a function"):
        Adapprox([p], guidance="cosine")


def test_rank_max_cannot_change_after_the_first_step():
    p = torch.nn.Parameter(torch.randn(8, 10))
    opt = Adapprox([("w", p)], rank_max=3)
    assert_change_refused(opt, p, dict(rank_max=5), "w: the group's rank_max=5 no longer matches")
    opt.param_groups[0].update(rank_max=3, rank_min=2, rank_init=3)   # the other bounds may change
    opt.step()
    assert 2 <= int(opt.state[p]["rank"]) <= 3
