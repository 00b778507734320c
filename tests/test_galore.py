"""GaLoreAdamW: the float64 reference of algorithms.md §4, invariants G1–G2, galore-torch's
parameter groups, its state accounting and the refusal of bad GaLore hyperparameters (the
invariants every optimizer keeps are in test_optimizer_contract.py)."""

import math

import pytest
import torch

import ds_lowrank.optim.galore as galore_mod
from ds_lowrank import lowrank_param_groups
from ds_lowrank.distributed.reducer import done
from ds_lowrank.optim.galore import GaLoreAdamW
from helpers import (full_size, assert_bad_group_refused, assert_change_refused, grad_sequence, mlp_batches,
                     outside_rows_fraction, run_steps, tiny_mlp, train)
from reference_galore import ReferenceGaLore

HP = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1, rank=3, update_proj_gap=5, scale=0.25)


def _projector(basis, right):
    B = basis.T if right else basis
    return B @ B.T


# -- the reference ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape,proj_type,side", [
    ((14, 8), "std", "right"), ((8, 14), "std", "left"), ((10, 10), "std", "right"),
    ((9, 13), "reverse_std", "right"), ((13, 9), "reverse_std", "left"),
    ((13, 9), "left", "left"), ((8, 14), "right", "right"),
])
def test_matches_reference_float64_over_three_refreshes(shape, proj_type, side):
    steps = 13   # refreshes at steps 0, 5 and 10
    W0 = torch.randn(shape, dtype=torch.float64)
    grads = grad_sequence(shape, steps)
    p = torch.nn.Parameter(W0.clone())
    opt = GaLoreAdamW([p], **HP, proj_type=proj_type)
    ref = ReferenceGaLore(shape, **HP, side=side)
    W = W0.clone()
    for t, g in enumerate(grads):
        run_steps(opt, [p], [[g]])
        W = ref.step(W, g)
        torch.testing.assert_close(p.data, W, rtol=1e-10, atol=1e-12, msg=f"step {t + 1}")
    st = opt.state[p]
    torch.testing.assert_close(st["basis"], ref.P, rtol=0, atol=1e-12)
    torch.testing.assert_close(st["proj_exp_avg"], ref.M, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(st["proj_exp_avg_sq"], ref.V, rtol=1e-10, atol=1e-15)
    assert int(st["step"]) == steps


def test_float32_tracks_reference():
    shape = (16, 24)
    W0 = torch.randn(shape, dtype=torch.float64)
    grads = grad_sequence(shape, 8)
    p = torch.nn.Parameter(W0.float())
    opt = GaLoreAdamW([p], **{**HP, "update_proj_gap": 4})
    ref = ReferenceGaLore(shape, **{**HP, "update_proj_gap": 4}, side="left")
    W = W0.clone()
    for g in grads:
        run_steps(opt, [p], [[g]])
        W = ref.step(W, g)
    assert (p.data.double() - W).abs().max() / W.abs().max() < 1e-5


# -- G1, G2 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 9), (9, 6)])
def test_G1_identity_basis_is_hf_adamw(monkeypatch, shape):
    """P = I, α = 1, T = ∞: HF AdamW (ε on the uncorrected √V, decay after the update)."""
    d = min(shape)
    monkeypatch.setattr(galore_mod, "exact_top_subspace",
                        lambda A, r, *args, **kwargs: done(torch.eye(d, dtype=A.dtype).expand(A.shape[0], d, d)))
    lr, (b1, b2), eps, wd = 1e-2, (0.9, 0.999), 1e-6, 0.1
    W0 = torch.randn(shape, dtype=torch.float64)
    p = torch.nn.Parameter(W0.clone())
    opt = GaLoreAdamW(full_size([p]), lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, rank=d, scale=1.0,
                      update_proj_gap=10**9)
    W, m, v = W0.clone(), torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    for t, g in enumerate(grad_sequence(shape, 30), start=1):
        run_steps(opt, [p], [[g]])
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        W = W - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (v.sqrt() + eps)
        W = W - lr * wd * W
    torch.testing.assert_close(p.data, W, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("proj_method", ["svd", "randomized"])
def test_G2_basis_refreshes_exactly_at_steps_0_T_2T(proj_method):
    T, shape, r = 4, (10, 16), 3
    grads = grad_sequence(shape, 11, dtype=torch.float32)
    p = torch.nn.Parameter(torch.randn(shape))
    opt = GaLoreAdamW([p], rank=r, update_proj_gap=T, proj_method=proj_method, oversample=6, power_iters=3)
    prev = None
    for t, g in enumerate(grads):
        run_steps(opt, [p], [[g]])
        basis = opt.state[p]["basis"].clone()
        if t % T == 0:
            U = torch.linalg.svd(g, full_matrices=False)[0][:, :r]
            tol = 1e-5 if proj_method == "svd" else 1e-2
            torch.testing.assert_close(_projector(basis, False), U @ U.T, rtol=0, atol=tol)
            if prev is not None:
                assert not torch.equal(basis, prev)
        else:
            assert torch.equal(basis, prev), f"step {t}: the basis moved between refreshes"
        prev = basis


def test_G2_refresh_follows_each_parameters_own_counter():
    """A parameter that skips steps (zero gradient) refreshes at its own steps 0, T, 2T."""
    T, shape = 3, (6, 10)
    grads = grad_sequence(shape, 9, dtype=torch.float32)
    a, b = torch.nn.Parameter(torch.randn(shape)), torch.nn.Parameter(torch.randn(shape))
    opt = GaLoreAdamW([a, b], rank=2, update_proj_gap=T)
    changed = {"a": [], "b": []}
    prev = {}
    for t, g in enumerate(grads):
        gb = torch.zeros_like(g) if t in (1, 2) else 2 * g      # b skips global steps 1 and 2
        run_steps(opt, [a, b], [[g, gb]])
        for name, q in (("a", a), ("b", b)):
            basis = opt.state[q]["basis"].clone()
            if name not in prev or not torch.equal(basis, prev[name]):
                changed[name].append(t)
            prev[name] = basis
    assert changed["a"] == [0, 3, 6]
    assert changed["b"] == [0, 5, 8]          # its own steps 0, 3, 6 fall on global 0, 5, 8
    assert int(opt.state[b]["step"]) == 7 and opt.skipped_steps == 2


def test_randomized_basis_finds_a_gapped_subspace():
    m, n, r = 30, 50, 4
    gen = torch.Generator().manual_seed(4)
    U = torch.linalg.qr(torch.randn(m, m, generator=gen))[0]
    Vt = torch.linalg.qr(torch.randn(n, m, generator=gen))[0].T
    s = torch.cat([torch.tensor([10.0, 8.0, 6.0, 5.0]), torch.full((m - 4,), 0.5)])
    g = U @ torch.diag(s) @ Vt
    p = torch.nn.Parameter(torch.randn(m, n))
    opt = GaLoreAdamW([p], rank=r, proj_method="randomized")
    run_steps(opt, [p], [[g]])
    basis = opt.state[p]["basis"]
    torch.testing.assert_close(basis.T @ basis, torch.eye(r), rtol=0, atol=1e-5)
    torch.testing.assert_close(_projector(basis, False), U[:, :r] @ U[:, :r].T, rtol=0, atol=1e-3)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-10)], ids=["float32", "float64"])
def test_randomized_basis_of_a_rank_deficient_gradient_moves_only_its_rows(dtype, tol, side):
    """Gradients of rank 4 < r = 8 confined to 4 rows, a refresh at every step: the basis
    columns the gradient does not determine are completed orthogonally to those it does, so no
    sliver of gradient in them becomes a step outside the 4 rows."""
    def make(params):
        return GaLoreAdamW(full_size(params), lr=1e-2, rank=8, update_proj_gap=1, proj_method="randomized",
                           proj_type=side)
    assert outside_rows_fraction(make, dtype) < tol


@pytest.mark.parametrize("shape,proj_type,basis,moment", [
    ((12, 5), "std", (3, 5), (12, 3)), ((5, 12), "std", (5, 3), (3, 12)), ((7, 7), "std", (3, 7), (7, 3)),
    ((12, 5), "reverse_std", (12, 3), (3, 5)), ((7, 7), "reverse_std", (7, 3), (3, 7)),
    ((5, 12), "right", (3, 12), (5, 3)), ((12, 5), "left", (12, 3), (3, 5)),
])
def test_side_rule_and_state_shapes(shape, proj_type, basis, moment):
    p = torch.nn.Parameter(torch.randn(shape))
    opt = GaLoreAdamW([p], rank=3, proj_type=proj_type)
    run_steps(opt, [p], [[torch.randn(shape)]])
    st = opt.state[p]
    assert tuple(st["basis"].shape) == basis
    assert tuple(st["proj_exp_avg"].shape) == moment == tuple(st["proj_exp_avg_sq"].shape)


# -- galore-torch's parameter groups -----------------------------------------------------------


def test_only_groups_with_a_rank_are_projected():
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(8, 14, dtype=torch.float64))
    dense_w = torch.nn.Parameter(torch.randn(6, 5, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.randn(8, dtype=torch.float64))
    twins = [torch.nn.Parameter(t.detach().clone()) for t in (dense_w, bias)]
    opt = GaLoreAdamW([{"params": [dense_w, bias]},
                       {"params": [w], "rank": 3, "update_proj_gap": 5, "scale": 0.25, "proj_type": "std"}],
                      lr=1e-2, weight_decay=0.1)
    adamw = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1, eps=1e-6, foreach=True)
    ref = ReferenceGaLore(w.shape, **HP, side="left")
    W = w.detach().clone()
    for g, gd, gb in zip(grad_sequence((8, 14), 8), grad_sequence((6, 5), 8, seed=2),
                         grad_sequence((8,), 8, seed=3)):
        run_steps(opt, [w, dense_w, bias], [[g, gd, gb]])
        run_steps(adamw, twins, [[gd, gb]])
        W = ref.step(W, g)
    torch.testing.assert_close(w.data, W, rtol=1e-10, atol=1e-12)
    for a, b in zip((dense_w, bias), twins):
        torch.testing.assert_close(a.data, b.data, rtol=1e-14, atol=1e-15)
    assert "basis" not in opt.state[dense_w] and "exp_avg" in opt.state[dense_w]
    assert opt.param_groups[0]["rank"] is None


def test_rank_given_to_the_constructor_projects_every_matrix():
    model = tiny_mlp()
    opt = GaLoreAdamW(lowrank_param_groups(model, rank=3))
    train(model, opt, mlp_batches(2))
    kinds = {name: "basis" in opt.state[p] for name, p in model.named_parameters()}
    assert kinds == {name: p.dim() == 2 for name, p in model.named_parameters()}
    opt2 = GaLoreAdamW([{"params": list(model.parameters()), "rank": None}], rank=3)
    train(model, opt2, mlp_batches(1))
    assert not any("basis" in st for st in opt2.state.values())


def test_full_projection_is_refused_clearly():
    p = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match=r"invalid proj_type='full'.*'full' projection is not implemented"):
        GaLoreAdamW([{"params": [p], "rank": 2, "proj_type": "full"}])


# -- state accounting and GaLore's own hyperparameters ------------------------------------------


def test_state_bytes_match_the_formulas():
    r = 3
    wide = torch.nn.Parameter(torch.randn(12, 40))     # left: basis 12×r, moments 2·r×40
    tall = torch.nn.Parameter(torch.randn(40, 12))     # right: basis r×12, moments 2·40×r
    bias = torch.nn.Parameter(torch.randn(40))
    opt = GaLoreAdamW([wide, tall, bias], rank=r)
    run_steps(opt, [wide, tall, bias], [[torch.randn(12, 40), torch.randn(40, 12), torch.randn(40)]])
    b = opt.state_bytes()
    assert b["lowrank_moments"] == 4 * (2 * r * 40 + 2 * 40 * r)
    assert b["bases"] == 4 * (12 * r + r * 12)
    assert b["dense_moments"] == 4 * 2 * 40
    assert b["error_feedback"] == 0 and b["counters"] == 3 * 4
    assert b["total"] == sum(v for k, v in b.items() if k != "total")


@pytest.mark.parametrize("kw,key", [
    (dict(rank=0), "rank"), (dict(rank=2.5), "rank"),
    (dict(rank=True), "rank"), (dict(update_proj_gap=0), "update_proj_gap"),
    (dict(update_proj_gap=1.5), "update_proj_gap"), (dict(scale=0.0), "scale"), (dict(scale=-1), "scale"),
    (dict(proj_type="top"), "proj_type"), (dict(proj_type="full"), "proj_type"),
    (dict(proj_method="qr"), "proj_method"), (dict(oversample=-1), "oversample"),
    (dict(power_iters=1.0), "power_iters"),
])
def test_bad_hyperparameters_are_refused(kw, key):
    """GaLore's own keys; the AdamW ones are checked for every optimizer in
    test_optimizer_contract.py."""
    assert_bad_group_refused(lambda params: GaLoreAdamW(params, rank=2), kw, key)


def test_rank_above_the_smaller_dimension_is_refused():
    lin = torch.nn.Linear(5, 12)
    with pytest.raises(ValueError) as err:
        GaLoreAdamW([("encoder.proj.weight", lin.weight)], rank=6)
    msg = str(err.value)
    assert "encoder.proj.weight" in msg and "(12, 5)" in msg and "lower the rank" in msg


def test_rank_and_side_cannot_change_after_the_first_step():
    p = torch.nn.Parameter(torch.randn(8, 10))
    opt = GaLoreAdamW([("w", p)], rank=2)
    for change in (dict(rank=3), dict(proj_type="right")):
        assert_change_refused(opt, p, change, "w: the group's rank/proj_type no longer match")
