"""MicroAdam's compiled step (``compiled=True``) against the eager PyTorch functions it compiles.

The state (window indices and values, 4-bit codes, bucket statistics) depends on the gradients
alone, so with the same gradients it must be bitwise equal.  The update may differ by one ulp on
CPU: eager's float32 ``sqrt`` there is not always correctly rounded, inductor's is; the weights
are compared within a few ulps of the step, far below what one misplaced entry or bucket moves.
Shapes are few and tiny: every distinct segment size costs a compilation.
"""

import warnings

import pytest
import torch

from ds_lowrank.optim import microadam
from ds_lowrank.optim.microadam import MicroAdam, microadam_update, topk_layout
from ds_lowrank.utils import compiled as compiled_mod
from helpers import MICROADAM_SMALL, assert_bad_group_refused, make_microadam, roundtrip, run_steps

LR = 1e-2
# tall, wide (the same 60 elements: one graph), and 63 = 3 whole blocks of 16 and a partial one,
# with an odd number of 4-bit codes and a partial bucket
SHAPES = [(12, 5), (3, 20), (7, 9)]


@pytest.fixture(scope="module", autouse=True)
def fresh_compile_caches():
    """Graphs compiled by earlier test modules count toward torch's recompile limit per function,
    past which new sizes would silently run eager; start this module from none."""
    import torch._dynamo

    torch._dynamo.reset()


@pytest.fixture
def needs_compile():
    reason = compiled_mod.compile_unavailable()
    if reason:
        pytest.skip(f"torch.compile unavailable here: {reason}")


def grads(steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[0.1 + torch.randn(s, generator=gen) for s in SHAPES] for _ in range(steps)]


def pair(**kw):
    w0 = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(SHAPES)]
    out = []
    for flag in (True, False):
        ps = [torch.nn.Parameter(w.clone()) for w in w0]
        out.append((ps, make_microadam(ps, lr=LR, weight_decay=0.1, compiled=flag, **kw)))
    return out


def assert_compiled_ran():
    """The compiled functions compiled (no fallback to eager, which would make the comparison
    eager against eager)."""
    for fn in microadam._kernels(True):
        assert fn.fallback_reason is None, fn.fallback_reason


def assert_equal_states(opt_a, opt_b, params_a, params_b, steps):
    for pa, pb in zip(params_a, params_b):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
        # each step's update is within an ulp of |u| ≲ 1; lr·(2 ulp) per step
        torch.testing.assert_close(pa.data, pb.data, rtol=0, atol=steps * LR * 2 * 2**-23)


@pytest.mark.parametrize("value_dtype,alpha", [("bfloat16", 0.0), ("float32", 0.1)])
def test_compiled_equals_eager_over_steps(needs_compile, value_dtype, alpha):
    """Five steps (the window of 4 wraps around) on tall, wide and uneven shapes: the state
    bitwise, the weights within ulps; the densified update (α) too."""
    from torch._dynamo.utils import counters

    (pc, oc), (pe, oe) = pair(value_dtype=value_dtype, alpha=alpha)
    for t, g in enumerate(grads(5), start=1):
        graphs = counters["stats"]["unique_graphs"]
        run_steps(oc, pc, [g])
        if t == 1:      # compiled for these sizes and dtypes, not run eager past the recompile limit
            assert counters["stats"]["unique_graphs"] > graphs
        run_steps(oe, pe, [g])
        assert_equal_states(oc, oe, pc, pe, t)
    assert_compiled_ran()
    # the comparison can fail: the eager run with the gradients of another seed moves the state
    run_steps(oe, pe, grads(1, seed=1))
    run_steps(oc, pc, grads(1, seed=2))
    assert not torch.equal(oc.state[pc[2]]["error"], oe.state[pe[2]]["error"])


def test_zero_like_pieces_take_the_same_path(needs_compile):
    """A ZeRO rank steps the whole blocks starting in its partition as one segment: pieces of
    the 63-element gradient cut at a block boundary (32 + 31 elements), compiled against eager,
    and their state against one process's whole-segment state."""
    q, m = MICROADAM_SMALL["bucket_size"], MICROADAM_SMALL["window"]
    steps = grads(3)

    def run(segments, compiled):
        out = []
        for lo, hi in segments:
            lay = topk_layout(hi - lo, 16, 0.25)
            st = [torch.zeros(m, lay.k, dtype=torch.int16), torch.zeros(m, lay.k, dtype=torch.bfloat16),
                  torch.zeros(-(-(hi - lo) // 2), dtype=torch.uint8),
                  torch.zeros(-(-(hi - lo) // q), dtype=torch.bfloat16),
                  torch.zeros(-(-(hi - lo) // q), dtype=torch.bfloat16)]
            for t, g in enumerate(steps, start=1):
                u = microadam_update(g[2].reshape(-1)[lo:hi], *st, t, layout=lay, bucket_size=q,
                                     beta1=0.9, beta2=0.999, eps=1e-8, compiled=compiled)
            out.append((st, u))
        return out

    pieces = [(0, 32), (32, 63)]
    comp, eager, whole = run(pieces, True), run(pieces, False), run([(0, 63)], False)[0]
    assert_compiled_ran()
    for (sc, uc), (se, ue) in zip(comp, eager):
        for a, b in zip(sc, se):
            assert torch.equal(a, b)
        torch.testing.assert_close(uc, ue, rtol=2**-22, atol=0)
    # the pieces' state is the whole segment's, cut at the block boundary (k = 4 per block)
    assert torch.equal(torch.cat([comp[0][0][1], comp[1][0][1]], dim=1), whole[0][1])
    assert torch.equal(torch.cat([comp[0][0][2], comp[1][0][2]]), whole[0][2])
    torch.testing.assert_close(torch.cat([comp[0][1], comp[1][1]]), whole[1], rtol=2**-22, atol=0)


def test_resume_continues_identically_and_recompiles_nothing(needs_compile):
    """Three compiled steps, state_dict through torch.save into a fresh compiled optimizer, two
    more steps: bitwise the uninterrupted compiled run.  No step after the first builds a graph
    (the sizes do not change)."""
    from torch._dynamo.utils import counters

    g = grads(5)
    (pa, oa), _ = pair()
    run_steps(oa, pa, g[:1])
    graphs = counters["stats"]["unique_graphs"]
    run_steps(oa, pa, g[1:3])
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    ob = make_microadam(pb, lr=LR, weight_decay=0.1, compiled=True)
    ob.load_state_dict(roundtrip(oa.state_dict()))
    run_steps(oa, pa, g[3:])
    run_steps(ob, pb, g[3:])
    assert counters["stats"]["unique_graphs"] == graphs
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
        for key in oa.state[p]:
            assert torch.equal(oa.state[p][key], ob.state[q][key]), key
    assert_compiled_ran()


@pytest.mark.parametrize("bad", ["yes", 1, 0.0])
def test_bad_compiled_option_is_refused(bad):
    assert_bad_group_refused(make_microadam, {"compiled": bad}, "compiled")


def test_default_is_compiled_on_cuda_only():
    assert MicroAdam._compiled({}, torch.device("cuda", 0)) is True       # a group saved before the key
    assert MicroAdam._compiled({"compiled": None}, torch.device("cpu")) is False
    assert MicroAdam._compiled({"compiled": True}, torch.device("cpu")) is True
    assert MicroAdam._compiled({"compiled": False}, torch.device("cuda", 0)) is False


@pytest.mark.parametrize("how", ["unavailable", "backend fails"])
def test_falls_back_to_eager_with_a_warning_naming_the_cause(monkeypatch, how):
    """torch.compile missing, or a backend that cannot build: one warning with the cause per
    function, then the eager functions, with eager's results bitwise."""
    monkeypatch.setattr(microadam, "_compiled_kernels", None)     # fresh wrappers, restored after
    if how == "unavailable":
        monkeypatch.setattr(compiled_mod, "compile_unavailable", lambda: "no dynamo on this test")
    else:
        import torch._dynamo.exc as dynamo_exc

        def broken(fn, **kw):
            def run(*a, **k):
                raise dynamo_exc.Unsupported("no C++ compiler on this test")
            return run
        monkeypatch.setattr(torch, "compile", broken)
    (pc, oc), (pe, oe) = pair()
    with pytest.warns(RuntimeWarning, match="torch.compile of .* failed, using the eager.*on this test") as rec:
        run_steps(oc, pc, grads(1))
    assert len(rec) == 4      # accumulate, select, feed_back, window_moments (no α: no densify)
    run_steps(oe, pe, grads(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # no further warnings: it falls back once
        run_steps(oc, pc, grads(1, seed=1))
    run_steps(oe, pe, grads(1, seed=1))
    for p, q in zip(pc, pe):
        assert torch.equal(p, q)
        assert all(torch.equal(oc.state[p][k], oe.state[q][k]) for k in oc.state[p])
