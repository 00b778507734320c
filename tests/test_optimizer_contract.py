"""The invariants every ds_lowrank optimizer keeps (algorithms.md §7, common 1–8),
checkpoint resume, schedulers, and the refusal of bad hyperparameters."""

import copy

import pytest
import torch

from ds_lowrank import LDAdam, lowrank_param_groups
from helpers import (assert_same_state, grad_sequence, make_ldadam, mlp_batches, roundtrip,
                     run_steps, snapshot, tiny_mlp, train)


def test_1_zero_lr_leaves_weights_unchanged():
    model = tiny_mlp()
    before = copy.deepcopy(model.state_dict())
    opt = make_ldadam(model.parameters(), lr=0.0, weight_decay=0.1)
    train(model, opt, mlp_batches(5))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(torch.isfinite(t).all() for st in opt.state.values() for t in st.values())


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
def test_2_3_zero_or_nonfinite_gradient_changes_nothing(bad):
    """DeepSpeed's dummy step (zeros) and overflow steps (inf/nan) are skipped and counted."""
    model = tiny_mlp()
    opt = make_ldadam(model.parameters(), weight_decay=0.1)
    params = list(model.parameters())
    # before any state exists (DeepSpeed's construction-time dummy step) ...
    run_steps(opt, params, [[torch.zeros_like(p) for p in params]])
    assert len(opt.state) == 0 and opt.skipped_steps == len(params)
    train(model, opt, mlp_batches(3))
    weights, state = copy.deepcopy(model.state_dict()), snapshot(opt)
    # ... and after: zero gradients, or one bad element in each gradient
    grads = [torch.zeros_like(p) for p in params]
    if bad != 0.0:
        for g in grads:
            g.view(-1)[0] = bad
    run_steps(opt, params, [grads])
    assert_same_state(state, snapshot(opt))
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert opt.skipped_steps == 2 * len(params)


def test_2_dummy_step_does_not_change_the_run():
    batches = mlp_batches(6)
    m1, m2 = tiny_mlp(), tiny_mlp()
    o1, o2 = make_ldadam(m1.parameters()), make_ldadam(m2.parameters())
    p2 = list(m2.parameters())
    run_steps(o2, p2, [[torch.zeros_like(p) for p in p2]])
    train(m1, o1, batches)
    train(m2, o2, batches)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("ef_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("basis_init", ["randomized", "svd"])
def test_4_resume_is_bit_exact(ef_dtype, basis_init):
    """N steps, save, load into a fresh optimizer (weights_only), N more == 2N straight."""
    n = 6
    batches = mlp_batches(2 * n)
    kw = dict(rank=3, weight_decay=0.05, ef_dtype=ef_dtype, basis_init=basis_init)

    def build(model):
        opt = LDAdam(lowrank_param_groups(model, **kw), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        return opt, sched

    straight = tiny_mlp()
    opt, sched = build(straight)
    train(straight, opt, batches, sched)

    first = tiny_mlp()
    opt, sched = build(first)
    train(first, opt, batches[:n], sched)
    saved = roundtrip({"model": first.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})

    resumed = tiny_mlp(seed=123)
    resumed.load_state_dict(saved["model"])
    opt, sched = build(resumed)
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    train(resumed, opt, batches[n:], sched)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_4_load_keeps_state_dtypes_on_a_bf16_model():
    model = tiny_mlp(dtype=torch.bfloat16)
    opt = make_ldadam(model.parameters(), ef_dtype="float32")
    train(model, opt, mlp_batches(3, dtype=torch.bfloat16))
    saved = roundtrip(opt.state_dict())
    fresh = make_ldadam(model.parameters(), ef_dtype="float32")
    fresh.load_state_dict(saved)
    dtypes = {(i, k): v.dtype for i, st in enumerate(opt.state.values()) for k, v in st.items()}
    loaded = {(i, k): v.dtype for i, st in enumerate(fresh.state.values()) for k, v in st.items()}
    assert loaded == dtypes
    assert torch.float32 in {dt for (_, k), dt in dtypes.items() if k == "error"}
    assert fresh.skipped_steps == opt.skipped_steps


def test_5_replicas_are_bitwise_identical():
    batches = mlp_batches(8)
    m1, m2 = tiny_mlp(), tiny_mlp()
    o1, o2 = make_ldadam(m1.parameters()), make_ldadam(m2.parameters())
    train(m1, o1, batches)
    train(m2, o2, batches)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    for (a, sa), (b, sb) in zip(o1.state.items(), o2.state.items()):
        for k in sa:
            assert torch.equal(sa[k], sb[k])


def test_6_per_group_hyperparameters_are_read_every_step():
    shape = (6, 10)
    grads = grad_sequence(shape, 8, dtype=torch.float32)
    hp = [dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-6, rank=2, rho=0.5),
          dict(lr=3e-3, betas=(0.8, 0.999), eps=1e-8, rank=3, weight_decay=0.1, proj_side="right")]
    w0 = [torch.randn(shape), torch.randn(shape)]
    ps = [torch.nn.Parameter(w.clone()) for w in w0]
    # named, so the seeds of the randomized first basis agree between the two set-ups
    both = LDAdam([{"params": [(f"w{i}", p)], **h} for i, (p, h) in enumerate(zip(ps, hp))])
    alone = [torch.nn.Parameter(w.clone()) for w in w0]
    singles = [LDAdam([(f"w{i}", q)], **h) for i, (q, h) in enumerate(zip(alone, hp))]
    for t, g in enumerate(grads):
        if t == 4:   # changes take effect at the next step
            both.param_groups[1]["lr"] = singles[1].param_groups[0]["lr"] = 0.0
            both.param_groups[0]["betas"] = singles[0].param_groups[0]["betas"] = (0.5, 0.9)
        run_steps(both, ps, [[g, 2 * g]])
        for q, o, gg in zip(alone, singles, [g, 2 * g]):
            run_steps(o, [q], [[gg]])
        if t == 4:
            frozen = ps[1].detach().clone()
    for a, b in zip(ps, alone):
        assert torch.equal(a, b)
    # lr 0 in group 1 from step 5 on: only the (zero) update is applied, no weight decay either
    assert torch.equal(ps[1].detach(), frozen)


def test_6_scheduler_changes_the_step():
    batches = mlp_batches(5)
    runs = {}
    for mode in ("sched", "manual", "constant"):
        model = tiny_mlp()
        opt = make_ldadam(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) if mode == "sched" else None
        for t, (x, y) in enumerate(batches):
            if mode == "manual":
                opt.param_groups[0]["lr"] = 1e-2 * 0.5**t
            train(model, opt, [(x, y)], sched)
        runs[mode] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(runs["sched"], runs["manual"])
    assert not torch.allclose(runs["sched"], runs["constant"])


def test_7_lazy_state_add_param_group_and_swapped_parameters():
    model = tiny_mlp()
    opt = make_ldadam(list(model.parameters())[:2])
    assert len(opt.state) == 0
    train(model, opt, mlp_batches(2))
    opt.add_param_group({"params": list(model.parameters())[2:], "rank": 2})
    # swap a parameter object before it ever steps, as DeepSpeed's wrappers do
    old = opt.param_groups[1]["params"][0]
    new = torch.nn.Parameter(old.detach().clone())
    opt.param_groups[1]["params"][0] = new
    model.zero_grad(set_to_none=True)
    new.grad = torch.randn_like(new)
    opt.step()
    assert old not in opt.state and opt.state[new]["basis"].shape[-1] in (2, new.shape[1])
    assert len(opt.state) == 3


def test_8_state_bytes_match_the_formulas():
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


@pytest.mark.parametrize("kw,key", [
    (dict(lr=-1.0), "lr"), (dict(betas=(1.0, 0.99)), "betas"), (dict(betas=(0.9,)), "betas"),
    (dict(eps=-1e-8), "eps"), (dict(weight_decay=-0.1), "weight_decay"), (dict(rank=0), "rank"),
    (dict(rank=2.5), "rank"), (dict(rho=1.5), "rho"), (dict(proj_side="top"), "proj_side"),
    (dict(basis_init="qr"), "basis_init"), (dict(ef_dtype="float16"), "ef_dtype"),
    (dict(error_feedback="yes"), "error_feedback"), (dict(power_iters=-1), "power_iters"),
])
def test_bad_hyperparameters_are_refused(kw, key):
    p = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match=rf"invalid {key}=.*expected"):
        LDAdam([p], **kw)
    opt = LDAdam([p], rank=2)   # the same check when a group is changed later
    opt.param_groups[0].update(kw)
    p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match=rf"invalid {key}="):
        opt.step()


def test_rank_cannot_change_after_the_first_step():
    p = torch.nn.Parameter(torch.randn(8, 10))
    opt = LDAdam([("w", p)], rank=2)
    run_steps(opt, [p], [[torch.randn(8, 10)]])
    opt.param_groups[0]["rank"] = 3
    p.grad = torch.randn(8, 10)
    with pytest.raises(ValueError, match="w: the group's rank/proj_side no longer match"):
        opt.step()


def test_closure_is_evaluated_and_returned():
    model = tiny_mlp()
    opt = make_ldadam(model.parameters())
    x, y = mlp_batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    assert torch.is_tensor(opt.step(closure))
    assert len(opt.state) == len(list(model.parameters()))
