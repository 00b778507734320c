"""The LDAdam invariants L1–L9 of algorithms.md §7, its state accounting (§1(a)) and the refusal
of bad LDAdam hyperparameters."""

import math

import pytest
import torch

import ds_lowrank.optim.ldadam as ldadam_mod
from ds_lowrank import LDAdam
from ds_lowrank.distributed.reducer import done, run_local
from ds_lowrank.optim.ldadam import dense_error, error_state_shapes, ldadam_update
from ds_lowrank.optim.matrix import Matrix
from helpers import (full_size, assert_bad_group_refused, assert_change_refused, assert_same_state,
                     full_momentum, grad_sequence, outside_rows_fraction, run_steps)

B1, B2 = 0.908, 0.99
# the error feedback's storage: dense (a float64 parameter keeps it in float64), or compressed
EF_OPTIONS = {"dense": {}, "int8": dict(ef_dtype="int8", ef_bucket_size=4),
              "int4": dict(ef_dtype="int4", ef_bucket_size=4),
              "int4-stochastic": dict(ef_dtype="int4", ef_bucket_size=4, ef_rounding="stochastic")}


def quantization_step(st):
    """Per element of a compressed error feedback, the step ``u`` of its bucket."""
    bits, q, n = st["error_layout"].tolist()
    u = (st["error_max"].double() - st["error_min"].double()) / (2**bits - 1)
    return u.repeat_interleave(q, dim=-1)[..., :n]


@pytest.mark.parametrize("ef", list(EF_OPTIONS))
def test_L1_identity_basis_is_adamw(monkeypatch, ef):
    """With a fixed identity basis LDAdam is AdamW: same betas, eps, decoupled weight decay."""
    d, c = 6, 9
    monkeypatch.setattr(ldadam_mod, "randomized_top_subspace",
                        lambda A, r, *a, **k: done(torch.eye(d, r, dtype=A.dtype).expand(A.shape[0], d, r)))
    monkeypatch.setattr(ldadam_mod, "warm_basis", lambda A, P_prev, *a, **k: done(P_prev))
    W0 = torch.randn(d, c, dtype=torch.float64)
    p, q = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone())
    opt = LDAdam(full_size([p]), lr=1e-2, weight_decay=0.1, rank=d, **EF_OPTIONS[ef])
    ref = torch.optim.AdamW([q], lr=1e-2, betas=(B1, B2), eps=1e-8, weight_decay=0.1)
    for g in grad_sequence((d, c), 30):
        run_steps(opt, [p], [[g]])
        run_steps(ref, [q], [[g]])
    torch.testing.assert_close(p.data, q.data, rtol=1e-12, atol=1e-14)
    assert dense_error(opt.state[p], torch.float64).abs().max() < 1e-13


@pytest.mark.parametrize("ef", list(EF_OPTIONS))
@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_L2_momentum_and_error_are_conserved(shape, ef):
    """P_t·M_t + (1-β1)·e_{t+1} = β1·P_{t-1}·M_{t-1} + (1-β1)·(g_t + e_t), at every step.

    A compressed error feedback stores e_{t+1} within its quantization error: half a step of its
    bucket with nearest rounding, a step with stochastic rounding; e_t is what it stored."""
    p = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
    opt = LDAdam([p], rank=2, lr=1e-2, **EF_OPTIONS[ef])
    right = shape[0] > shape[1]
    prev_m = torch.zeros(shape, dtype=torch.float64)
    prev_e = torch.zeros(shape, dtype=torch.float64)
    worst = 0.0
    for g in grad_sequence(shape, 30):
        run_steps(opt, [p], [[g]])
        st = opt.state[p]
        error = dense_error(st, torch.float64)
        lhs = full_momentum(st, right) + (1 - B1) * error
        rhs = B1 * prev_m + (1 - B1) * (g + prev_e)
        if ef == "dense":
            torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
        else:
            assert st["error"].dtype == torch.uint8 and st["error_min"].dtype == torch.float64
            exact = (rhs - full_momentum(st, right)) / (1 - B1)
            u = quantization_step(st)
            bound = u if ef.endswith("stochastic") else u / 2
            assert ((error - exact).abs() <= bound + 1e-12).all()
            worst = max(worst, float(((error - exact).abs() / u.clamp_min(1e-300)).max()))
        prev_m, prev_e = full_momentum(st, right), error.clone()
    assert ef == "dense" or worst > 0.3      # the quantization error is really there


@pytest.mark.parametrize("ef", list(EF_OPTIONS))
def test_L3_full_rank_keeps_error_near_zero(ef):
    shape = (7, 11)
    p = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
    opt = LDAdam(full_size([p]), rank=7, **EF_OPTIONS[ef])
    for g in grad_sequence(shape, 30):
        run_steps(opt, [p], [[g]])
        assert dense_error(opt.state[p], torch.float64).abs().max() < 1e-10


def _one_update(P, *, A=None, P_prev=None, M=None, V=None, k=5, ef=True, seed=0):
    """Call ldadam_update once on a 1-matrix batch with the basis forced to ``P``."""
    gen = torch.Generator().manual_seed(seed)
    d, r = P.shape
    c = 7
    A = torch.randn(1, d, c, generator=gen, dtype=torch.float64) if A is None else A
    P_prev = P_prev if P_prev is not None else torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))[0]
    M = torch.randn(1, r, c, generator=gen, dtype=torch.float64) if M is None else M
    V = torch.rand(1, r, c, generator=gen, dtype=torch.float64) + 0.1 if V is None else V
    a = A.clone()
    P_state, M_state, V_state = P_prev[None].clone(), M.clone(), V.clone()
    orig = ldadam_mod.warm_basis
    ldadam_mod.warm_basis = lambda *args, **kw: done(P[None])
    try:
        _, N = run_local(ldadam_update(A, P_state, M_state, V_state, [k], beta1=B1, beta2=B2, eps=1e-8,
                                       rho=0.5, error_feedback=ef, first_basis=None, seeds=[0]))
    finally:
        ldadam_mod.warm_basis = orig
    return a, P_prev, M, V, A, (P_state, M_state, V_state, N)


def test_L4_signed_permutation_transports_state_exactly():
    d, r = 8, 4
    gen = torch.Generator().manual_seed(1)
    P_prev = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))[0]
    perm = torch.tensor([2, 0, 3, 1])
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    Q = torch.eye(r, dtype=torch.float64)[:, perm] * signs          # P = P_prev·Q
    a, _, M, V, E, (P, M_new, V_new, _) = _one_update(P_prev @ Q, P_prev=P_prev)
    g_hat = P.mT @ a
    torch.testing.assert_close(M_new, B1 * (Q.T @ M) + (1 - B1) * g_hat, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(V_new, B2 * (Q.T.abs() @ V) + (1 - B2) * g_hat**2, rtol=1e-12, atol=1e-14)
    # the re-projection loses no momentum, so the error is only the compression error
    torch.testing.assert_close(E, a - P @ g_hat, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spectrum", ["random", "ill_conditioned", "rank_one"])
def test_L5_basis_orthonormal_and_residual_orthogonal(spectrum):
    m, n, r = 40, 64, 8
    gen = torch.Generator().manual_seed(2)
    p = torch.nn.Parameter(torch.randn(m, n))
    opt = LDAdam([p], rank=r, error_feedback=False)
    for t in range(6):
        if spectrum == "random":
            g = torch.randn(m, n, generator=gen)
        elif spectrum == "ill_conditioned":
            U = torch.linalg.qr(torch.randn(m, m, generator=gen))[0]
            Vt = torch.linalg.qr(torch.randn(n, m, generator=gen))[0].T
            g = U @ torch.diag(torch.logspace(0, -7, m)) @ Vt
        else:
            g = torch.outer(torch.randn(m, generator=gen), torch.randn(n, generator=gen))
        run_steps(opt, [p], [[g]])
        P = opt.state[p]["basis"]
        torch.testing.assert_close(P.T @ P, torch.eye(r), rtol=0, atol=1e-5)
        residual = g - P @ (P.T @ g)
        assert (P.T @ residual).abs().max() <= 1e-5 * g.abs().max()
        assert torch.isfinite(p).all()


def test_L6_second_moment_reestimate_uses_abs():
    d, r = 6, 2
    P_prev = torch.eye(d, r, dtype=torch.float64)
    th = 0.6
    rot = torch.tensor([[torch.cos(torch.tensor(th)), -torch.sin(torch.tensor(th))],
                        [torch.sin(torch.tensor(th)), torch.cos(torch.tensor(th))]], dtype=torch.float64)
    c = 7
    M = torch.full((1, r, c), 0.5, dtype=torch.float64)
    M[0, 1] = -0.5
    V = torch.full((1, r, c), 1e-4, dtype=torch.float64)   # tiny V: S = V/b2 - (M/b1)² < 0
    k = 5
    b1, b2 = 1 - B1**k, 1 - B2**k
    S = V / b2 - (M / b1) ** 2
    assert (S < 0).all()
    a, _, _, _, _, (P, M_new, V_new, _) = _one_update(P_prev @ rot, P_prev=P_prev, M=M, V=V, k=k)
    C = P.mT @ P_prev
    inner = (C * C) @ S + (C @ M / b1) ** 2
    assert (inner < 0).any(), "the case must exercise a negative re-estimate"
    g_hat = P.mT @ a
    expected = B2 * b2 * inner.abs() + (1 - B2) * g_hat**2
    torch.testing.assert_close(V_new, expected, rtol=1e-12, atol=1e-15)
    assert (V_new >= 0).all()


@pytest.mark.parametrize("init,tol", [("svd", 1e-5), ("randomized", 1e-3)])
@pytest.mark.parametrize("shape", [(30, 50), (50, 30)])
def test_L7_first_basis_is_top_singular_subspace(init, tol, shape):
    m, n = shape
    r = 4
    gen = torch.Generator().manual_seed(4)
    U = torch.linalg.qr(torch.randn(m, min(m, n), generator=gen))[0]
    Vt = torch.linalg.qr(torch.randn(n, min(m, n), generator=gen))[0].T
    s = torch.cat([torch.tensor([10.0, 8.0, 6.0, 5.0]), torch.full((min(m, n) - 4,), 0.5)])
    g = U @ torch.diag(s) @ Vt
    p = torch.nn.Parameter(torch.randn(shape))
    opt = LDAdam([p], rank=r, basis_init=init)
    run_steps(opt, [p], [[g]])
    basis = opt.state[p]["basis"]
    if m > n:   # right projection: the basis spans the top right singular vectors
        est, true = basis.T, Vt[:r].T
    else:
        est, true = basis, U[:, :r]
    torch.testing.assert_close(est @ est.T, true @ true.T, rtol=0, atol=tol)


@pytest.mark.parametrize("shape,side,basis,moment", [
    ((12, 5), "right", (3, 5), (12, 3)),
    ((5, 12), "left", (5, 3), (3, 12)),
    ((7, 7), "left", (7, 3), (3, 7)),
])
def test_L8_projection_side_rule(shape, side, basis, moment):
    p = torch.nn.Parameter(torch.randn(shape))
    opt = LDAdam(full_size([p]), rank=3)
    assert LDAdam.projects_right(opt.param_groups[0], p.shape) == (side == "right")
    run_steps(opt, [p], [[torch.randn(shape)]])
    st = opt.state[p]
    assert tuple(st["basis"].shape) == basis
    assert tuple(st["proj_exp_avg"].shape) == moment == tuple(st["proj_exp_avg_sq"].shape)


@pytest.mark.parametrize("shape,side", [((12, 5), "auto"), ((5, 12), "auto"), ((12, 5), "left")])
def test_L8_rank_above_projected_dimension_is_refused(shape, side):
    lin = torch.nn.Linear(shape[1], shape[0])
    with pytest.raises(ValueError) as err:
        LDAdam([("encoder.proj.weight", lin.weight)], rank=6 if side == "auto" else 13, proj_side=side)
    msg = str(err.value)
    assert "encoder.proj.weight" in msg and str(tuple(shape)) in msg and "lower the rank" in msg


def test_L9_without_error_feedback_update_depends_only_on_gradient():
    shape = (10, 16)
    grads = grad_sequence(shape, 8)
    p = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
    opt = LDAdam([p], rank=3, error_feedback=False)
    for g in grads:
        run_steps(opt, [p], [[g]])
        assert "error" not in opt.state[p]
    assert opt.state_bytes()["error_feedback"] == 0
    # Turning it off mid-run drops the buffer; turning it on starts from zero.
    q = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
    opt2 = LDAdam([q], rank=3)
    run_steps(opt2, [q], [[grads[0]]])
    assert opt2.state[q]["error"].abs().max() > 0
    opt2.param_groups[0]["error_feedback"] = False
    run_steps(opt2, [q], [[grads[1]]])
    assert "error" not in opt2.state[q]
    # a compressed one drops its statistics too
    opt3 = LDAdam([q], rank=3, ef_dtype="int4")
    run_steps(opt3, [q], [[grads[0]]])
    assert {"error", "error_min", "error_max", "error_layout"} <= set(opt3.state[q])
    opt3.param_groups[0]["error_feedback"] = False
    run_steps(opt3, [q], [[grads[1]]])
    assert not any(k.startswith("error") for k in opt3.state[q])
    assert opt3.state_bytes()["error_feedback"] == 0


def test_state_bytes_match_the_formulas():
    m, n, r = 12, 40, 3   # left: basis m×r, moments 2·r×n, error m×n
    tall = torch.nn.Parameter(torch.randn(40, 12))      # right: basis r×12, moments 2·40×r
    wide = torch.nn.Parameter(torch.randn(m, n))
    bias = torch.nn.Parameter(torch.randn(n))
    opt = LDAdam([wide, tall, bias], rank=r, ef_dtype="bfloat16")
    run_steps(opt, [wide, tall, bias], [[torch.randn(m, n), torch.randn(40, 12), torch.randn(n)]])
    b = opt.state_bytes()
    assert b["lowrank_moments"] == 4 * (2 * r * n + 2 * 40 * r)
    assert b["bases"] == 4 * (m * r + r * 12)
    assert b["error_feedback"] == 2 * (m * n + 40 * 12)
    assert b["dense_moments"] == 4 * 2 * n
    assert b["counters"] == 3 * 4
    assert b["total"] == sum(v for k, v in b.items() if k != "total")


@pytest.mark.parametrize("ef_dtype,bucket", [("int8", 8), ("int4", 8), ("int4", 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_state_bytes_of_a_compressed_error_feedback(ef_dtype, bucket, dtype):
    """Codes (one or two per byte, each row packed on its own) and two bfloat16 statistics per
    bucket of each row, whatever the weights' dtype; the layout (3 int64) is a counter."""
    shapes = [(12, 40), (40, 12), (7, 13)]     # 13: odd rows, a partial bucket per row
    ps = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
    opt = LDAdam(ps, rank=3, ef_dtype=ef_dtype, ef_bucket_size=bucket)
    run_steps(opt, ps, [[torch.randn(s) for s in shapes]])
    bits = 8 if ef_dtype == "int8" else 4
    codes = sum(m * (n if bits == 8 else -(-n // 2)) for m, n in shapes)
    stats = sum(2 * 2 * m * -(-n // bucket) for m, n in shapes)
    b = opt.state_bytes()
    assert b["error_feedback"] == codes + stats
    assert b["counters"] == len(shapes) * (4 + 3 * 8)
    for p, (m, n) in zip(ps, shapes):
        st = opt.state[p]
        expected = error_state_shapes(ef_dtype, m, n, bucket)
        assert {k: (tuple(v.shape), v.dtype) for k, v in st.items() if k.startswith("error")} == expected
    # the 1B shapes: 4-bit codes and 64-element buckets are 0.5625 bytes per element
    if (ef_dtype, bucket) == ("int4", 64):
        per_element = sum(math.prod(s) * torch.empty((), dtype=d).element_size()
                          for s, d in error_state_shapes("int4", 2048, 5461, 64).values()
                          if len(s) == 2) / (2048 * 5461)
        assert abs(per_element - 0.5625) < 0.002


def test_changing_the_error_feedback_storage_converts_it():
    """float32 -> int4 -> int8 (another bucket size) -> bfloat16: the buffer is converted, within
    each quantization's error, and training goes on."""
    shape = (6, 10)
    p = torch.nn.Parameter(torch.randn(shape))
    opt = LDAdam([("w", p)], rank=2)
    grads = grad_sequence(shape, 6, dtype=torch.float32)
    run_steps(opt, [p], [grads[:1]])
    last = dense_error(opt.state[p])
    for ef_dtype, bucket in (("int4", 4), ("int8", 6), ("bfloat16", 6)):
        opt.param_groups[0].update(ef_dtype=ef_dtype, ef_bucket_size=bucket)
        lr, opt.param_groups[0]["lr"] = opt.param_groups[0]["lr"], 0.0
        ldadam_mod_update = ldadam_mod.ldadam_update
        seen = {}

        def spy(A, *args, **kw):
            seen["e"] = A.clone()            # the accumulator g + e, before the step
            return ldadam_mod_update(A, *args, **kw)
        ldadam_mod.ldadam_update = spy
        try:
            before = {k: v.clone() for k, v in opt.state[p].items()}
            run_steps(opt, [p], [[torch.zeros(shape)]])            # skipped: nothing converts
            assert_same_state({0: before}, {0: opt.state[p]})
            run_steps(opt, [p], [[grads[1]]])
        finally:
            ldadam_mod.ldadam_update = ldadam_mod_update
        converted = seen["e"][0] - grads[1]
        # within half a step of a bucket spanning at most [-max|e|, max|e|] (bfloat16: 2^-8 relative)
        relative = {"int4": 1 / 15, "int8": 1 / 255, "bfloat16": 2**-8}[ef_dtype]
        assert (converted - last).abs().max() <= relative * last.abs().amax() + 1e-6, ef_dtype
        st = opt.state[p]
        if ef_dtype == "bfloat16":
            assert st["error"].dtype == torch.bfloat16 and "error_min" not in st and "error_layout" not in st
        else:
            assert st["error_layout"].tolist() == [4 if ef_dtype == "int4" else 8, bucket, 10]
        opt.param_groups[0]["lr"] = lr
        last = dense_error(opt.state[p])


def test_compressed_buckets_must_not_straddle_tensor_parallel_shards():
    """A column-split shard (tensor_parallel='global') whose width the bucket size does not
    divide is refused on every rank, before any collective."""
    opt = LDAdam([torch.nn.Parameter(torch.randn(4, 6))], rank=2, ef_dtype="int4", ef_bucket_size=4)
    w = torch.randn(4, 6)
    m = Matrix("layer.weight", w, w, {}, (4, 12), 6, (0, 1), ("tp", 1), 1)
    with pytest.raises(ValueError, match=r"layer.weight: .* 6 columns wide, not a multiple of ef_bucket_size=4"):
        opt._sync_error_buffer(opt.param_groups[0], m)
    opt.param_groups[0]["ef_bucket_size"] = 6
    opt._sync_error_buffer(opt.param_groups[0], m)
    assert m.state["error"].shape == (4, 3)


@pytest.mark.parametrize("kw,key", [
    (dict(ef_dtype="int2"), "ef_dtype"), (dict(ef_bucket_size=7), "ef_bucket_size"),
    (dict(ef_bucket_size=0), "ef_bucket_size"), (dict(ef_bucket_size=True), "ef_bucket_size"),
    (dict(ef_rounding="up"), "ef_rounding"),
    (dict(proj_precision="float16"), "proj_precision"), (dict(proj_precision=None), "proj_precision"),
    (dict(rank=0), "rank"), (dict(rank=2.5), "rank"), (dict(rho=1.5), "rho"),
    (dict(proj_side="top"), "proj_side"), (dict(basis_init="qr"), "basis_init"),
    (dict(ef_dtype="float16"), "ef_dtype"), (dict(error_feedback="yes"), "error_feedback"),
    (dict(power_iters=-1), "power_iters"), (dict(rho=True), "rho"), (dict(ef_dtype=[]), "ef_dtype"),
])
def test_bad_hyperparameters_are_refused(kw, key):
    """LDAdam's own keys; the AdamW ones are checked for every optimizer in
    test_optimizer_contract.py."""
    assert_bad_group_refused(lambda params: LDAdam(params, rank=2), kw, key)


def test_rank_cannot_change_after_the_first_step():
    p = torch.nn.Parameter(torch.randn(8, 10))
    assert_change_refused(LDAdam(full_size([("w", p)]), rank=2), p, dict(rank=3),
                          "w: the group's rank/proj_side no longer match")


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("ef", [True, False], ids=["ef", "no_ef"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-2), (torch.float64, 1e-8)], ids=["float32", "float64"])
def test_rank_deficient_gradient_moves_only_its_rows(dtype, tol, ef, side):
    """Gradients of rank 4 < r = 8, confined to 4 rows: the basis columns the gradient does not
    determine are completed orthogonally to those it does, so Adam's per-coordinate scaling
    cannot blow a sliver of gradient in them up into a step outside the 4 rows (a completion
    merely independent of the determined span put ~70% of each update there)."""
    def make(params):
        return LDAdam(full_size(params), lr=1e-2, rank=8, error_feedback=ef, proj_side=side)
    assert outside_rows_fraction(make, dtype) < tol


def test_a_batch_of_matrices_at_different_steps_steps_each_as_alone():
    """Same-shape matrices share a batch whatever their step counts; each one's bias
    corrections are its own (per-matrix scalars in the moment arithmetic)."""
    shape, steps = (6, 10), 4
    grads = [grad_sequence(shape, steps, seed=s) for s in (0, 1)]
    W0 = [torch.randn(shape, dtype=torch.float64) for _ in range(2)]
    together = [torch.nn.Parameter(w.clone()) for w in W0]
    opt = LDAdam(full_size(together), lr=1e-2, rank=3, weight_decay=0.1)
    for t in range(steps):
        # the second matrix starts a step late, then steps beside the first (one batch)
        together[0].grad = grads[0][t].clone()
        together[1].grad = grads[1][t - 1].clone() if t else None
        opt.step()
    for w0, g, n, p in zip(W0, grads, (steps, steps - 1), together):
        alone = torch.nn.Parameter(w0.clone())
        run_steps(LDAdam(full_size([alone]), lr=1e-2, rank=3, weight_decay=0.1), [alone], [[x] for x in g[:n]])
        torch.testing.assert_close(p.data, alone.data, rtol=1e-10, atol=1e-12)
