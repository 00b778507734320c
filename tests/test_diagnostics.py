"""LowRankProbe: error-feedback and subspace diagnostics, in one process and under ZeRO 0-3."""

import math
import os

import pytest
import torch

from ds_lowrank import LDAdam, lowrank_param_groups
from ds_lowrank.optim.ldadam import dense_error
from ds_lowrank.training.diagnostics import LowRankProbe, lowrank_optimizer, state_bytes_by_rank
from helpers import mlp_batches, tiny_mlp, torchrun

WORKER = os.path.join(os.path.dirname(__file__), "dist", "diagnostics_worker.py")
RANK = 4


def setup(**kw):
    model = tiny_mlp()
    opt = LDAdam(lowrank_param_groups(model, rank=RANK, within_adamw=False), lr=1e-2, **kw)
    return model, opt, LowRankProbe(opt)


def step(model, opt, batch):
    x, y = batch
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def lowrank_params(opt):
    return [(g, p) for g in opt.param_groups if g["compress"] for p in g["params"]]


def expected(opt, old_bases, grads):
    """The diagnostics recomputed from the state after a step, the pre-step bases and the grads."""
    err_sq = sum(float(dense_error(opt.state[p]).double().square().sum()) for _, p in lowrank_params(opt))
    grad_sq = sum(float(g.double().square().sum()) for g in grads)
    ratios = [float(dense_error(opt.state[p]).double().norm() / g.double().norm())
              for (_, p), g in zip(lowrank_params(opt), grads)]
    drifts = []
    for (group, p), old in zip(lowrank_params(opt), old_bases):
        new = opt.state[p]["basis"].double()
        right = LDAdam.projects_right(group, p.shape)
        prod = old.double() @ new.mT if right else old.double().mT @ new
        drifts.append(1 - float(prod.square().sum()) / RANK)
    return {"ef_norm": math.sqrt(err_sq), "lowrank_grad_norm": math.sqrt(grad_sq),
            "ef_to_grad": math.sqrt(err_sq / grad_sq), "ef_to_grad_max": max(ratios),
            "basis_drift": sum(drifts) / len(drifts), "basis_drift_max": max(drifts)}


@pytest.mark.parametrize("ef_dtype", ["float32", "bfloat16", "int4"])
def test_matches_state_computed_by_hand(ef_dtype):
    model, opt, probe = setup(ef_dtype=ef_dtype)
    batches = mlp_batches(5)
    for b in batches[:4]:
        step(model, opt, b)
    old = [opt.state[p]["basis"].clone() for _, p in lowrank_params(opt)]
    probe.arm()
    step(model, opt, batches[4])
    got = probe.collect()
    want = expected(opt, old, [p.grad for _, p in lowrank_params(opt)])
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    assert 0 < got["ef_to_grad"] and 0 < got["basis_drift"] < 1


def test_unarmed_steps_measure_nothing_and_keep_no_copies():
    model, opt, probe = setup()
    for b in mlp_batches(3):
        step(model, opt, b)
        assert probe._old_bases == {} and probe._measured == {}
    assert probe.collect() == {}


def test_copies_live_only_during_the_armed_step():
    model, opt, probe = setup()
    batches = mlp_batches(3)
    step(model, opt, batches[0])
    copies = []
    opt.register_step_post_hook(lambda *a: copies.append(len(probe._old_bases)))
    probe.arm()
    step(model, opt, batches[1])
    # The probe's own post-hook ran first and consumed every copy it had made.
    assert copies == [0]
    probe.collect()
    step(model, opt, batches[2])
    assert probe._old_bases == {} and probe._measured == {}


def test_first_step_reports_error_but_no_drift():
    model, opt, probe = setup()
    probe.arm()
    step(model, opt, mlp_batches(1)[0])
    got = probe.collect()
    assert "ef_to_grad" in got and "basis_drift" not in got


def test_probe_does_not_change_training():
    batches = mlp_batches(6)
    model_a, opt_a, _ = setup()
    model_b, opt_b, probe = setup()
    for i, b in enumerate(batches):
        step(model_a, opt_a, b)
        if i % 2:
            probe.arm()
        step(model_b, opt_b, b)
        if i % 2:
            probe.collect()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


def test_without_error_feedback():
    model, opt, probe = setup(error_feedback=False)
    batches = mlp_batches(2)
    step(model, opt, batches[0])
    probe.arm()
    step(model, opt, batches[1])
    got = probe.collect()
    assert "ef_norm" not in got and "ef_to_grad" not in got and "basis_drift" in got


def test_finds_the_optimizer_behind_wrappers():
    class Wrapper:
        def __init__(self, inner):
            self.optimizer = inner

    class Engine:
        def __init__(self, basic, wrapped):
            self.basic_optimizer, self.optimizer = basic, wrapped

    _, opt, _ = setup()
    assert lowrank_optimizer(opt) is opt
    assert lowrank_optimizer(Wrapper(Wrapper(opt))) is opt
    assert lowrank_optimizer(Engine(opt, Wrapper(opt))) is opt
    assert lowrank_optimizer(Engine(None, Wrapper(opt))) is opt
    adamw = torch.optim.AdamW(tiny_mlp().parameters())
    assert lowrank_optimizer(Engine(adamw, Wrapper(adamw))) is None


def test_state_bytes_by_rank_in_one_process():
    model, opt, _ = setup()
    step(model, opt, mlp_batches(1)[0])
    by_rank = state_bytes_by_rank(opt)
    assert by_rank["total"] == [opt.state_bytes()["total"]] and by_rank["total"][0] > 0


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One 2-rank launch: the probe under ZeRO 0-3, FSDP2 and HSDP, and in one process."""
    return torchrun(2, WORKER, tmp_path_factory.mktemp("diagnostics") / "result.json", 0, 1, 2, 3, "fsdp2", "hsdp",
                    timeout=600)


def _assert_matches_one_process(run, single, where, world=2):
    assert run["found"] == "LDAdam"
    assert all(b > 0 for b in run["state_bytes"]) and len(run["state_bytes"]) == world
    for t, want in single.items():
        got = run["metrics"][t]
        assert set(got) == set(want), (where, t)
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (where, t, key)


def test_zero_stages_match_one_process(launched):
    """Under ZeRO 0-3 on 2 ranks (rows of matrices cut between ranks) the combined diagnostics
    equal those of one process training on the same global batches."""
    single = launched["single"]
    assert "basis_drift" not in single["0"] and "basis_drift" in single["5"]
    for stage, run in launched["zero"].items():
        _assert_matches_one_process(run, single, f"ZeRO-{stage}")


def test_fsdp2_matches_one_process(launched):
    """On FSDP2 (2 ranks, rows 13, 13, 29 and 7: uneven blocks; right projections keep the basis
    in blocks of columns, left ones by rows) the probe reads the DTensor state and sums the
    ranks' parts over the mesh: the same diagnostics as one process."""
    _assert_matches_one_process(launched["fsdp2"], launched["single"], "FSDP2")


def test_hsdp_replicas_count_once(launched):
    """On HSDP with a (2, 1) mesh both ranks hold every matrix whole, as replicas: each matrix is
    counted once (counted twice, the norms would be √2 times one process's)."""
    _assert_matches_one_process(launched["hsdp"], launched["single"], "HSDP")


def test_a_block_whose_rows_it_cannot_place_is_named_once_and_the_rest_measured():
    """A fused weight's block in a ZeRO piece of a partition the optimizer has not bound (its
    state loaded, the partition not stepped since: no gradient) has no known rows: the probe
    warns once, naming the block and why, and measures the other matrices as without it."""
    import warnings

    from ds_lowrank.distributed.zero_layout import Piece
    from ds_lowrank.optim.state_layout import piece_metadata

    batches = mlp_batches(3)
    model_a, opt_a, probe_a = setup()
    model, opt, probe = setup()
    flat = torch.nn.Parameter(torch.zeros(24))          # stands for the partition, never stepped
    opt.add_param_group({"params": [("partition", flat)], "compress": False})
    gate = {"step": torch.tensor(2.0), "basis": torch.eye(3, 2), "proj_exp_avg": torch.zeros(4, 2)}
    opt.state[flat] = {"fc1.weight": {**piece_metadata(Piece("fc1.weight", (8, 3), 0, 24, 0, 0)), "gate": gate}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for b in batches:
            probe_a.arm()
            probe.arm()
            step(model_a, opt_a, b)
            step(model, opt, b)
            assert probe.collect() == probe_a.collect() != {}
    said = [str(w.message) for w in caught if "LowRankProbe" in str(w.message)]
    assert len(said) == 1 and "fc1.weight[gate]" in said[0] and "not known" in said[0], said


def test_a_rank_holding_only_part_of_a_cut_row_adds_its_gradient(tmp_path):
    """At 3 ranks ZeRO 2 cuts the last row of the 13 × 13 matrix: the rank holding its end owns
    no row of that matrix, so keeps no state of it, yet its part of the gradient is part of the
    matrix's (left out, the gradient norm was 1.7e-3 short)."""
    run = torchrun(3, WORKER, tmp_path / "result.json", 2)
    _assert_matches_one_process(run["zero"]["2"], run["single"], "ZeRO-2 on 3 ranks", world=3)
