"""GaLoreAdamW against galore-torch's, the implementation of the GaLore paper: the same weights
and projected moments on the same gradients, across refreshes, and the benchmark's configuration
of galore-torch (tools/bench_optimizer.py --peers) equivalent to ours.

Skipped when galore-torch is not installed (``pip install ds_lowrank[bench]``).  By design the
two differ only on the parameters that are not projected: ours take torch's AdamW (ε after the
bias-corrected square root, decay before the update), galore-torch's its HF-style AdamW; those
are left out of the comparison.
"""

from pathlib import Path

import pytest
import torch

from ds_lowrank import GaLoreAdamW
from helpers import load_script

REPO = Path(__file__).resolve().parents[1]
bench = load_script(REPO / "tools" / "bench_optimizer.py", "bench_optimizer_peer")
PeerGaLore = bench.galore_torch_adamw()
pytestmark = pytest.mark.skipif(PeerGaLore is None, reason="galore-torch is not installed")

HP = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1)
GALORE = dict(rank=4, update_proj_gap=3, scale=0.25, proj_type="std")
# tall and square go right, wide goes left (galore-torch's "std" rule, and ours)
SHAPES = [(24, 16), (16, 24), (20, 20), (24, 16)]


def _gradients(steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[0.3 + torch.randn(s, generator=gen) for s in SHAPES] for _ in range(steps)]


def _step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


def test_same_weights_and_moments_as_galore_torch_across_refreshes():
    torch.manual_seed(0)
    W0 = [torch.randn(s) for s in SHAPES]
    ours = [torch.nn.Parameter(w.clone()) for w in W0]
    theirs = [torch.nn.Parameter(w.clone()) for w in W0]
    opt = GaLoreAdamW([{"params": ours, **GALORE}], **HP)
    peer = PeerGaLore([{"params": theirs, **GALORE}], **HP, no_deprecation_warning=True)
    for t, grads in enumerate(_gradients(7)):        # refreshes at steps 0, 3 and 6
        _step(opt, ours, grads)
        _step(peer, theirs, grads)
        for i, (a, b) in enumerate(zip(ours, theirs)):
            # float32 rounding of a few steps of size lr·scale, not an algorithmic difference
            torch.testing.assert_close(a.data, b.data, rtol=2e-6, atol=2e-6, msg=f"step {t + 1}, matrix {i}")
    for a, b in zip(ours, theirs):
        st, ref = opt.state[a], peer.state[b]
        assert st["basis"].shape == ref["projector"].ortho_matrix.shape
        torch.testing.assert_close(st["basis"], ref["projector"].ortho_matrix, rtol=0, atol=1e-6)
        torch.testing.assert_close(st["proj_exp_avg"], ref["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(st["proj_exp_avg_sq"], ref["exp_avg_sq"], rtol=1e-5, atol=1e-9)
        assert int(st["step"]) == ref["step"] == 7


def test_benchmark_configures_galore_torch_like_ours():
    """``--peers``: the same parameter groups, rank, gap and scale, so between refreshes the two
    benchmarked optimizers do the same work on the projected matrices."""
    rank = 8
    models = [bench.preset_model("3x24x16", "cpu", torch.float32) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [bench.build("galore", models[0], rank), bench.build("galore_torch", models[1], rank)]
    group = next(g for g in opts[1].param_groups if "rank" in g)
    assert {k: group[k] for k in ("rank", "update_proj_gap", "scale", "proj_type")} == \
        {"rank": rank, **bench.GALORE_DEFAULTS}
    for step in range(3):
        for model in models:
            bench.set_gradients(model, seed=step)
        for opt in opts:
            opt.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a.data, b.data, rtol=1e-6, atol=1e-7, msg=name)
