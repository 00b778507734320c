"""The invariants every ds_lowrank optimizer keeps (algorithms.md §7, common 1–8), checked on
each of LDAdam, GaLoreAdamW, Adapprox and MicroAdam: lr = 0, skipped zero and non-finite
gradients, checkpoint resume, replicas, per-group hyperparameters, schedulers, lazy state,
state accounting, and the refusal of bad AdamW hyperparameters."""

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pytest
import torch

from ds_lowrank import Adapprox, GaLoreAdamW, LDAdam, MicroAdam, lowrank_param_groups
from ds_lowrank.optim.microadam import topk_layout
from helpers import (assert_bad_group_refused, MICROADAM_SMALL, assert_same_state, grad_sequence, make_adapprox, make_galore,
                     make_ldadam, make_microadam, mlp_batches, roundtrip, run_steps, snapshot,
                     tiny_mlp, train)

ROW, COL = "exp_avg_sq_row_factor", "exp_avg_sq_col_factor"


@dataclass(frozen=True)
class Spec:
    """What the shared tests need to know about one optimizer."""

    cls: type
    make: Callable                 # (params, **overrides) -> optimizer sized for small matrices
    randomized: dict               # options that switch on its seeded random sketches
    group_shape: tuple             # the per-group test: parameter shape,
    groups: tuple                  # its two groups' hyperparameters,
    group_change: dict             # and what group 0 changes to mid-run
    added_group: dict              # a group added after training has started,
    added_shapes: dict             # and its state shapes for tiny_mlp's 40×12 weight


def ldadam_spec(**ef) -> Spec:
    """LDAdam, with its error feedback stored as ``ef`` says (dense float32 by default)."""
    return Spec(
        cls=partial(LDAdam, **ef), make=partial(make_ldadam, **ef), randomized=dict(basis_init="randomized"),
        group_shape=(6, 10),
        groups=(dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-6, rank=2, rho=0.5),
                dict(lr=3e-3, betas=(0.8, 0.999), eps=1e-8, rank=3, weight_decay=0.1, proj_side="right")),
        group_change=dict(betas=(0.5, 0.9)),
        added_group=dict(rank=2), added_shapes={"basis": (2, 12)},     # tall: right projection
    )


SPECS = {
    "ldadam": ldadam_spec(),
    # buckets of 6 and 4 cut tiny_mlp's rows of 24, 12 and 40 into several, some partial
    "ldadam_int8": ldadam_spec(ef_dtype="int8", ef_bucket_size=6),
    "ldadam_int4": ldadam_spec(ef_dtype="int4", ef_bucket_size=4, ef_rounding="stochastic"),
    # the products with the gradient in bfloat16: every guarantee still holds
    "ldadam_bf16_products": ldadam_spec(proj_precision="bfloat16"),
    "galore": Spec(
        cls=GaLoreAdamW, make=make_galore, randomized=dict(proj_method="randomized"),
        group_shape=(6, 10),
        groups=(dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-6, rank=2, update_proj_gap=2, scale=0.5),
                dict(lr=3e-3, betas=(0.8, 0.999), eps=1e-8, rank=3, update_proj_gap=4, weight_decay=0.1,
                     proj_type="right")),
        group_change=dict(betas=(0.5, 0.9), scale=2.0, update_proj_gap=3),
        added_group=dict(rank=2), added_shapes={"basis": (2, 12)},
    ),
    "adapprox": Spec(
        cls=Adapprox, make=make_adapprox, randomized={},             # it always sketches
        group_shape=(12, 10),
        groups=(dict(lr=1e-2, betas=(0.9, 0.95), rank_max=3, rank_interval=1, error_threshold=0.2),
                dict(lr=3e-3, betas=(0.0, 0.999), eps=1e-6, rank_max=6, weight_decay=0.1,
                     clip_threshold=None, bias_correction=True, oversample=2, power_iters=1)),
        group_change=dict(betas=(0.5, 0.9), error_threshold=0.05, clip_threshold=0.3),
        added_group=dict(rank_max=2), added_shapes={ROW: (40, 2), COL: (12, 2)},
    ),
    "microadam": Spec(
        cls=MicroAdam, make=make_microadam, randomized={},           # deterministic top-k
        group_shape=(50,),
        groups=(dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-6, window=3, density=0.2, block_size=16,
                     bucket_size=4),
                dict(lr=3e-3, betas=(0.8, 0.999), eps=1e-8, window=5, density=0.5, block_size=32,
                     bucket_size=8, weight_decay=0.1, alpha=0.2, value_dtype="float32")),
        group_change=dict(betas=(0.5, 0.9), eps=1e-3, alpha=0.5),
        added_group=dict(window=2, density=0.5),
        added_shapes={"window_indices": (2, topk_layout(40 * 12, 16, 0.5).k)},
    ),
}


@pytest.fixture(params=list(SPECS), ids=list(SPECS))
def spec(request):
    return SPECS[request.param]


def _states_finite(opt):
    return all(torch.isfinite(t.float()).all() for st in opt.state.values() for t in st.values())


def _dtypes(opt):
    return [{k: v.dtype for k, v in st.items()} for st in opt.state.values()]


# -- 1: lr = 0 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_1_zero_lr_leaves_weights_unchanged(spec, weight_decay):
    """Decay is decoupled and scaled by lr, so it vanishes too; the state still advances."""
    model = tiny_mlp()
    before = copy.deepcopy(model.state_dict())
    opt = spec.make(model.parameters(), lr=0.0, weight_decay=weight_decay)
    train(model, opt, mlp_batches(5))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert len(opt.state) == len(before) and _states_finite(opt)
    assert all(int(st["step"]) == 5 for st in opt.state.values())


# -- 2, 3: zero and non-finite gradients ---------------------------------------------------------


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf"), 1e20], ids=["zero", "nan", "inf", "huge"])
def test_2_3_zero_or_nonfinite_gradient_changes_nothing(spec, bad):
    """DeepSpeed's dummy step (zeros) and overflow steps (inf/nan) are skipped and counted:
    no weight decay, no counter, basis, rank or ring pointer moves.  So is a finite gradient
    too large for the step's arithmetic (its squares overflow float32)."""
    model = tiny_mlp()
    opt = spec.make(model.parameters(), weight_decay=0.1)
    params = list(model.parameters())
    # before any state exists (DeepSpeed's construction-time dummy step) ...
    run_steps(opt, params, [[torch.zeros_like(p) for p in params]])
    assert len(opt.state) == 0 and opt.skipped_steps == len(params)
    grads = [torch.zeros_like(p) for p in params]
    if bad != 0.0:
        for g in grads:
            g.view(-1)[0] = bad
    # ... and after 3 and 4 steps: a refresh (GaLore), rank evaluation (Adapprox) or ring
    # wrap (MicroAdam) is due at one of them
    batches = mlp_batches(4)
    for skipped, warm in enumerate((batches[:3], batches[3:]), start=2):
        train(model, opt, warm)
        weights, state = copy.deepcopy(model.state_dict()), snapshot(opt)
        run_steps(opt, params, [grads])
        after = snapshot(opt)
        assert after.keys() == state.keys()
        assert_same_state(state, after)
        for k, v in model.state_dict().items():
            assert torch.equal(v, weights[k]), k
        assert opt.skipped_steps == skipped * len(params)


def test_2_3_skipped_steps_do_not_change_the_run(spec):
    """A dummy step before the first and an overflow step in the middle leave the run bitwise
    what it is without them."""
    batches = mlp_batches(6)
    m1, m2 = tiny_mlp(), tiny_mlp()
    o1, o2 = spec.make(m1.parameters(), lr=1e-2), spec.make(m2.parameters(), lr=1e-2)
    p2 = list(m2.parameters())
    train(m1, o1, batches)
    run_steps(o2, p2, [[torch.zeros_like(p) for p in p2]])
    train(m2, o2, batches[:3])
    run_steps(o2, p2, [[torch.full_like(p, float("nan")) for p in p2]])
    train(m2, o2, batches[3:4])
    grads = _grads(m2, mlp_batches(1, seed=9)[0])
    run_steps(o2, p2, [[1e20 * g for g in grads]])
    train(m2, o2, batches[4:])
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert_same_state(o1.state, o2.state)
    assert o2.skipped_steps == 3 * len(p2) and o1.skipped_steps == 0


def _grads(model, batch):
    model.zero_grad()
    x, y = batch
    torch.nn.functional.mse_loss(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_2_3_an_overflowing_parameter_is_skipped_alone(spec):
    """One matrix's gradient × 1e20 (finite, but the step's squares overflow float32): that
    matrix is skipped and untouched, error feedback included, the others step, and later
    steps train it normally (nothing huge was kept)."""
    model = tiny_mlp()
    opt = spec.make(model.parameters(), weight_decay=0.1)
    params = list(model.parameters())
    train(model, opt, mlp_batches(3))
    grads = _grads(model, mlp_batches(1, seed=9)[0])
    grads[2] = grads[2] * 1e20                     # the 40×12 weight
    weights, state = [p.detach().clone() for p in params], snapshot(opt)
    run_steps(opt, params, [grads])
    after = snapshot(opt)
    assert opt.skipped_steps == 1
    assert torch.equal(params[2], weights[2])
    assert_same_state({0: state[id(params[2])]}, {0: after[id(params[2])]})
    assert all(not torch.equal(p, w) for k, (p, w) in enumerate(zip(params, weights)) if k != 2)
    train(model, opt, mlp_batches(3, seed=11))
    assert opt.skipped_steps == 1 and _states_finite(opt)
    assert not torch.equal(params[2], weights[2]) and all(torch.isfinite(p).all() for p in params)


def test_2_3_a_refused_step_moves_no_parameter(spec):
    """A step refused by a check (here: parameters that took dense AdamW steps, their group
    turned compressed) raises before any parameter moves, in its group or another."""
    v, w, b = (torch.nn.Parameter(torch.randn(shape)) for shape in ((10,), (8, 10), (10,)))
    opt = spec.make([{"params": [("v", v)], "compress": False},
                     {"params": [("w", w), ("b", b)], "compress": False}])
    run_steps(opt, [v, w, b], [[torch.randn(10), torch.randn(8, 10), torch.randn(10)]])
    opt.param_groups[1]["compress"] = True
    before, state = [t.detach().clone() for t in (v, w, b)], snapshot(opt)
    for t in (v, w, b):
        t.grad = torch.randn_like(t)
    with pytest.raises(ValueError, match="w: it has taken dense"):
        opt.step()
    for t, t0 in zip((v, w, b), before):
        assert torch.equal(t, t0)
    assert_same_state(state, snapshot(opt))


def test_the_earlier_group_key_lowrank_is_read_as_compress(spec):
    """``lowrank``, the group key's earlier name: given when a group is added, and in a saved
    state dict, it is read as ``compress``; set on a live group (where nothing would read it) or
    beside a ``compress`` that says otherwise, it is refused naming the key to use."""
    w, b = torch.nn.Parameter(torch.randn(8, 10)), torch.nn.Parameter(torch.randn(10))
    opt = spec.make([{"params": [("w", w)], "lowrank": False}, {"params": [("b", b)]}])
    assert opt.param_groups[0]["compress"] is False and "lowrank" not in opt.param_groups[0]
    run_steps(opt, [w, b], [[torch.randn(8, 10), torch.randn(10)]])
    # dense AdamW's state, whole: the group was not compressed
    assert set(opt.state[w]) == {"step", "exp_avg", "exp_avg_sq"} and opt.state[w]["exp_avg"].shape == w.shape
    saved = opt.state_dict()
    for g in saved["param_groups"]:                # as a checkpoint of the earlier name holds it
        g["lowrank"] = g.pop("compress")
    again = spec.make([{"params": [("w", torch.nn.Parameter(w.detach().clone()))], "compress": False},
                       {"params": [("b", torch.nn.Parameter(b.detach().clone()))]}])
    again.load_state_dict(saved)
    assert [g["compress"] for g in again.param_groups] == [False, True]
    assert all("lowrank" not in g for g in again.param_groups)
    opt.param_groups[0]["lowrank"] = True
    with pytest.raises(ValueError, match="sets 'lowrank' after the optimizer was built.*'compress'"):
        opt.step()
    with pytest.raises(ValueError, match="both compress=True and lowrank=False.*keep only 'compress'"):
        spec.make([{"params": [("w2", torch.nn.Parameter(torch.randn(8, 10)))], "compress": True, "lowrank": False}])


# -- zero-size and complex parameters -------------------------------------------------------------


def test_zero_size_parameters_step_as_torch_adamw(spec):
    """A 0×N matrix and an empty vector beside a real matrix: no crash, no refusal for the rank,
    and the AdamW state torch's AdamW gives them."""
    empty = [torch.nn.Parameter(torch.zeros(0, 6)), torch.nn.Parameter(torch.zeros(0))]
    w = torch.nn.Parameter(torch.randn(8, 10))
    opt = spec.make([("empty_matrix", empty[0]), ("empty_vector", empty[1]), ("w", w)])
    ref = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in empty])
    for _ in range(3):
        run_steps(opt, [*empty, w], [[torch.zeros(0, 6), torch.zeros(0), torch.randn(8, 10)]])
        for q in ref.param_groups[0]["params"]:
            q.grad = torch.zeros_like(q)
        ref.step()
    for p, q in zip(empty, ref.param_groups[0]["params"]):
        assert opt.state[p].keys() == ref.state[q].keys() and int(opt.state[p]["step"]) == 3
    assert opt.skipped_steps == 0 and int(opt.state[w]["step"]) == 3


def test_complex_parameters_refused_where_compressed_and_adamw_where_dense(spec):
    z = torch.nn.Parameter(torch.randn(8, 10, dtype=torch.complex64))
    with pytest.raises(ValueError, match="z: .* cannot compress a complex parameter.*compress=False"):
        spec.make([("z", z)])
    # in a dense group: torch's AdamW, which steps the real and imaginary parts as reals
    ref = torch.nn.Parameter(z.detach().clone())
    opt = spec.make([{"params": [("z", z)], "compress": False}], weight_decay=0.1)
    group = opt.param_groups[0]
    adamw = torch.optim.AdamW([ref], lr=group["lr"], betas=group["betas"], eps=group["eps"],
                              weight_decay=0.1, foreach=True)
    for g in grad_sequence((8, 10), 3, dtype=torch.complex64):
        run_steps(opt, [z], [[g]])
        run_steps(adamw, [ref], [[g]])
    assert torch.equal(z, ref)
    # a group turned compressed refuses it at the next step, before anything moves
    opt.param_groups[0]["compress"] = True
    z.grad = torch.randn_like(z)
    with pytest.raises(ValueError, match="z: .* cannot compress a complex parameter"):
        opt.step()
    assert torch.equal(z, ref)


# -- 4: checkpoints ----------------------------------------------------------------------------


def _one_group(model, **kw):
    """Every parameter in one group: vectors take the method's own dense path where it has one."""
    return [{"params": list(model.named_parameters()), **kw}]


@dataclass(frozen=True)
class Resume:
    """One optimizer set-up whose state must survive a checkpoint."""

    cls: type
    groups: Callable               # (model, **options) -> parameter groups
    options: dict
    steps: int                     # N, past a refresh, rank evaluation or window wrap
    kept: dict                     # state key -> the dtype it is stored in, on any model


RESUME_CASES = {
    **{f"ldadam-ef_{ef}-{init}": Resume(
        LDAdam, lowrank_param_groups, dict(rank=3, weight_decay=0.05, ef_dtype=ef, basis_init=init), 6,
        {"error": getattr(torch, ef), "basis": torch.float32, "proj_exp_avg": torch.float32})
       for ef in ("float32", "bfloat16") for init in ("randomized", "svd")},
    **{f"ldadam-ef_{ef}-{rounding}": Resume(
        LDAdam, lowrank_param_groups,
        dict(rank=3, weight_decay=0.05, ef_dtype=ef, ef_bucket_size=6, ef_rounding=rounding), 6,
        {"error": torch.uint8, "error_min": torch.bfloat16, "error_max": torch.bfloat16,
         "error_layout": torch.int64, "basis": torch.float32})
       for ef in ("int8", "int4") for rounding in ("nearest", "stochastic")},
    **{f"galore-{method}": Resume(
        GaLoreAdamW, lowrank_param_groups,
        dict(rank=3, update_proj_gap=4, weight_decay=0.05, proj_method=method), 6,
        {"basis": torch.float32, "proj_exp_avg": torch.float32, "proj_exp_avg_sq": torch.float32})
       for method in ("svd", "randomized")},
    **{f"adapprox-beta1_{b[0]}": Resume(
        Adapprox, _one_group,
        dict(betas=b, rank_max=5, rank_interval=2, error_threshold=0.05, weight_decay=0.05), 5,
        {"rank": torch.int64, ROW: torch.float32, COL: torch.float32})
       for b in ((0.9, 0.999), (0.0, 0.99))},
    **{f"microadam-{name}": Resume(
        MicroAdam, lowrank_param_groups, dict(MICROADAM_SMALL, **options), 6,
        {"window_indices": torch.int16, "error": torch.uint8})
       for name, options in (("default", {}),
                             ("alpha", dict(alpha=0.3, value_dtype="float32", weight_decay=0.05)))},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_4_resume_is_bit_exact(case, dtype):
    """N steps, save, load into a fresh optimizer (weights_only), N more == 2N straight.  The
    load keeps every state tensor's dtype: torch's loader alone would cast floating state to
    the parameter's dtype, rounding the float32 state of a bf16 model."""
    c = RESUME_CASES[case]
    n = c.steps
    batches = mlp_batches(2 * n, dtype=dtype)

    def build(model):
        opt = c.cls(c.groups(model, **c.options), lr=1e-2)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))

    straight = tiny_mlp(dtype)
    opt, sched = build(straight)
    train(straight, opt, batches, sched)

    first = tiny_mlp(dtype)
    opt, sched = build(first)
    params = list(first.parameters())
    run_steps(opt, params, [[torch.zeros_like(p) for p in params]])   # a skip count to carry over
    train(first, opt, batches[:n], sched)
    saved = roundtrip({"model": first.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    dtypes = _dtypes(opt)
    for key, expected in c.kept.items():
        found = {d[key] for d in dtypes if key in d}
        assert found == {expected}, key

    resumed = tiny_mlp(dtype, seed=123)
    resumed.load_state_dict(saved["model"])
    opt, sched = build(resumed)
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    assert _dtypes(opt) == dtypes and opt.skipped_steps == len(params)
    train(resumed, opt, batches[n:], sched)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


# -- 5: replicas -----------------------------------------------------------------------------


def test_5_replicas_are_bitwise_identical(spec):
    """Random sketches and bases come from seeds, not from a global generator."""
    batches = mlp_batches(8)
    runs = []
    for rank in range(2):
        model = tiny_mlp()
        torch.manual_seed(1000 + rank)    # data-parallel ranks' global generators differ
        opt = spec.make(model.parameters(), lr=1e-2, **spec.randomized)
        train(model, opt, batches)
        runs.append((model, opt))
    (m1, o1), (m2, o2) = runs
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert_same_state(o1.state, o2.state)


# -- 6: per-group hyperparameters, schedulers ---------------------------------------------------


def test_6_per_group_hyperparameters_are_read_every_step(spec):
    """Two groups stepped together match each stepped alone, before and after their settings
    change mid-run; the change takes effect (lr 0: neither update nor decay)."""
    grads = grad_sequence(spec.group_shape, 9, dtype=torch.float32)
    w0 = [torch.randn(spec.group_shape), torch.randn(spec.group_shape)]
    changes = (spec.group_change, dict(lr=0.0))

    def run(change):
        # named, so that seeds drawn from the names agree between the two set-ups
        ps = [torch.nn.Parameter(w.clone()) for w in w0]
        both = spec.cls([{"params": [(f"w{i}", p)], **h} for i, (p, h) in enumerate(zip(ps, spec.groups))])
        alone = [torch.nn.Parameter(w.clone()) for w in w0]
        singles = [spec.cls([(f"w{i}", q)], **h) for i, (q, h) in enumerate(zip(alone, spec.groups))]
        for t, g in enumerate(grads):
            if t == 4 and change:   # changes take effect at the next step
                for i, c in enumerate(changes):
                    both.param_groups[i].update(c)
                    singles[i].param_groups[0].update(c)
            run_steps(both, ps, [[g, 2 * g]])
            for q, o, gg in zip(alone, singles, [g, 2 * g]):
                run_steps(o, [q], [[gg]])
            if t == 4:
                frozen = ps[1].detach().clone()
        for a, b in zip(ps, alone):
            assert torch.equal(a, b)
        return ps, frozen

    ps, frozen = run(True)
    assert torch.equal(ps[1].detach(), frozen)
    unchanged, _ = run(False)
    assert not torch.equal(ps[0], unchanged[0]) and not torch.equal(ps[1], unchanged[1])


def test_6_scheduler_changes_the_step(spec):
    batches = mlp_batches(5)
    runs = {}
    for mode in ("sched", "manual", "constant"):
        model = tiny_mlp()
        opt = spec.make(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) if mode == "sched" else None
        for t, batch in enumerate(batches):
            if mode == "manual":
                opt.param_groups[0]["lr"] = 1e-2 * 0.5**t
            train(model, opt, [batch], sched)
        runs[mode] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(runs["sched"], runs["manual"])
    assert not torch.allclose(runs["sched"], runs["constant"])


# -- 7: lazy state -----------------------------------------------------------------------------


def test_7_lazy_state_add_param_group_and_swapped_parameters(spec):
    model = tiny_mlp()
    params = list(model.parameters())
    opt = spec.make(params[:2])
    assert len(opt.state) == 0
    train(model, opt, mlp_batches(2))
    assert len(opt.state) == 2
    opt.add_param_group({"params": params[2:], **spec.added_group})
    old = opt.param_groups[1]["params"][0]
    assert old.shape == (40, 12)
    new = torch.nn.Parameter(old.detach().clone())
    opt.param_groups[1]["params"][0] = new    # swapped before its first step, as DeepSpeed's wrappers do
    model.zero_grad(set_to_none=True)
    new.grad = torch.randn_like(new)
    opt.step()
    assert old not in opt.state and len(opt.state) == 3
    st = opt.state[new]
    assert int(st["step"]) == 1
    for key, shape in spec.added_shapes.items():   # the added group's own settings apply
        assert tuple(st[key].shape) == shape, key


# -- 8: memory accounting ------------------------------------------------------------------------


def test_8_state_bytes_add_up_to_every_state_tensor(spec):
    """The categories sum to the total, and the total is every byte of state (each method's
    per-category formulas are checked in its own tests)."""
    model = tiny_mlp()
    opt = spec.make(model.parameters())
    train(model, opt, mlp_batches(3))
    b = opt.state_bytes()
    assert b["total"] == sum(v for k, v in b.items() if k != "total")
    assert b["total"] == sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values())
    assert b["lowrank_moments"] > 0 and b["counters"] > 0


# -- the AdamW hyperparameters and step() ------------------------------------------------------


@pytest.mark.parametrize("kw,key", [
    (dict(lr=-1.0), "lr"), (dict(betas=(1.0, 0.99)), "betas"), (dict(betas=(0.9,)), "betas"),
    (dict(eps=-1e-8), "eps"), (dict(weight_decay=-0.1), "weight_decay"), (dict(compress="yes"), "compress"),
    *[(dict(lr=v), "lr") for v in (math.inf, math.nan)],
    *[(dict(weight_decay=v), "weight_decay") for v in (math.inf, math.nan)],
    *[(dict(eps=v), "eps") for v in (math.inf, math.nan)],
    (dict(betas=(math.nan, 0.99)), "betas"), (dict(betas=(0.9, math.inf)), "betas"),
])
def test_bad_hyperparameters_are_refused(spec, kw, key):
    p = torch.nn.Parameter(torch.randn(8, 8))
    if key != "compress":    # a group key, not a constructor argument
        with pytest.raises(ValueError, match=rf"invalid {key}=.*expected"):
            spec.make([p], **kw)
    assert_bad_group_refused(spec.make, kw, key)


@pytest.mark.parametrize("kw,key", [
    (dict(betas=0.9), "betas"), (dict(betas=None), "betas"), (dict(betas="ab"), "betas"),
    (dict(betas=(False, 0.99)), "betas"), (dict(eps=True), "eps"), (dict(eps=math.inf), "eps"),
])
def test_wrong_kinds_of_values_are_refused(spec, kw, key):
    """A single beta, a bool where a number is expected (Python counts it as an int), an
    infinite eps: refused by the constructor and as group keys, naming the key."""
    p = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match=rf"invalid {key}=.*expected"):
        spec.make([p], **kw)
    assert_bad_group_refused(spec.make, kw, key)


def test_a_single_beta_names_the_pair():
    with pytest.raises(ValueError, match=r"invalid betas=0\.9: expected two floats.*\[0\.908, 0\.99\]"):
        LDAdam([torch.nn.Parameter(torch.randn(8, 8))], betas=0.9)


def test_closure_is_evaluated_and_returned(spec):
    model = tiny_mlp()
    opt = spec.make(model.parameters())
    x, y = mlp_batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and math.isfinite(loss.item())
    assert len(opt.state) == len(list(model.parameters()))


def test_a_parameter_with_dense_state_cannot_turn_compressed(spec):
    """A parameter that took AdamW steps in a ``compress=False`` group is refused, with the
    reason, once its group turns compressed: AdamW's moments are not this optimizer's state."""
    p = torch.nn.Parameter(torch.randn(8, 10))
    opt = spec.make([{"params": [("w", p)], "compress": False}])
    p.grad = torch.randn_like(p)
    opt.step()
    opt.param_groups[0]["compress"] = True
    p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match="w: it has taken dense"):
        opt.step()
