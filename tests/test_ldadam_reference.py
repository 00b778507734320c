"""LDAdam against the plain float64 reference of algorithms.md §1, over 25 steps."""

import pytest
import torch

from ds_lowrank import LDAdam
from helpers import grad_sequence, run_steps
from reference_ldadam import ReferenceLDAdam

HP = dict(lr=1e-2, betas=(0.908, 0.99), eps=1e-8, weight_decay=0.1, rank=3, rho=0.908)


@pytest.mark.parametrize("shape,side", [((8, 14), "left"), ((14, 8), "right"), ((10, 10), "left"),
                                         ((9, 13), "right"), ((13, 9), "left")])
@pytest.mark.parametrize("error_feedback", [True, False])
def test_matches_reference_float64(shape, side, error_feedback):
    steps = 25
    W0 = torch.randn(shape, dtype=torch.float64)
    grads = grad_sequence(shape, steps)
    auto = "left" if shape[0] <= shape[1] else "right"
    p = torch.nn.Parameter(W0.clone())
    opt = LDAdam([p], **HP, error_feedback=error_feedback, basis_init="svd",
                 proj_side="auto" if side == auto else side)
    ref = ReferenceLDAdam(shape, **HP, error_feedback=error_feedback, side=side)
    W = W0.clone()
    for t, g in enumerate(grads):
        run_steps(opt, [p], [[g]])
        W = ref.step(W, g)
        torch.testing.assert_close(p.data, W, rtol=1e-9, atol=1e-11, msg=f"step {t + 1}")
    st = opt.state[p]
    torch.testing.assert_close(st["proj_exp_avg_sq"], ref.V, rtol=1e-8, atol=1e-12)
    if error_feedback:
        torch.testing.assert_close(st["error"], ref.e, rtol=1e-8, atol=1e-10)
    else:
        assert "error" not in st


def test_float32_tracks_reference():
    """The float32 path (float64 Gram only inside Cholesky-QR) stays close to the exact run."""
    shape = (16, 24)
    W0 = torch.randn(shape, dtype=torch.float64)
    grads = grad_sequence(shape, 20)
    p = torch.nn.Parameter(W0.float())
    opt = LDAdam([p], **HP, basis_init="svd")
    ref = ReferenceLDAdam(shape, **HP, error_feedback=True, side="left")
    W = W0.clone()
    for g in grads:
        run_steps(opt, [p], [[g]])
        W = ref.step(W, g)
    assert (p.data.double() - W).abs().max() / W.abs().max() < 1e-4
