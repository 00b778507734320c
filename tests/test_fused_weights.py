"""Fused weights under tensor parallelism: SwiGLU's linear_fc1 (partition_stride 2) and a GQA fused
QKV, stepped as their logical blocks.  Multi-rank runs (tests/dist/fused_worker.py) at TP 1, 2
and 3; single-process checks of the blocks, their state and what is refused at construction."""

import os

import pytest
import torch

from ds_lowrank import GaLoreAdamW, LDAdam, MicroAdam
from ds_lowrank.training.diagnostics import LowRankProbe
from helpers import torchrun

WORKER = os.path.join(os.path.dirname(__file__), "dist", "fused_worker.py")


@pytest.fixture(scope="module", params=[1, 2, 3], ids=["tp1", "tp2", "tp3"])
def run(request, tmp_path_factory):
    return torchrun(request.param, WORKER, tmp_path_factory.mktemp(f"fused{request.param}") / "result.json",
                    timeout=600)


def test_global_mode_equals_one_process_stepping_the_logical_matrices(run):
    """gate, up; q, k, v of every TP rank, as the rows of the whole logical matrices."""
    for name in ("ldadam", "galore", "adapprox"):
        r = run[f"global:{name}"]
        assert r["rel_err"] < 1e-5 and r["moved"] > 1e-3, (name, r)
        assert r["reduce"] > 0, (name, r)          # its sums go through the TP group


def test_blocks_too_small_to_compress_take_adamw_as_separate_parameters_would(run):
    r = run["global:dense_blocks"]
    assert r["rel_err"] < 1e-5, r
    assert "basis" in r["kinds"]["q"] and r["kinds"]["k"] == r["kinds"]["v"] == ["exp_avg", "exp_avg_sq", "step"]


def test_local_mode_steps_each_block_of_each_shard_alone(run):
    for name in ("ldadam", "galore"):
        r = run[f"local:{name}"]
        assert r["rel_err"] < 1e-6 and r["sent"] == {}, (name, r)


def test_checkpoint_round_trip_is_exact(run):
    assert run["checkpoint"] == {"global": 0.0, "local": 0.0}


def test_megatron_swiglu_fc1_trains_as_separate_gate_and_up(run):
    """megatron-core's ColumnParallelLinear(stride=2) and RowParallelLinear through SwiGLU's forward
    and backward, in global mode: one process training gate, up and down separately."""
    r = run["megatron_swiglu"]
    assert r["stride"] == 2 and r["rel_err"] < 1e-5, r


def test_megatron_attention_qkv_is_recognised_and_cut_as_its_forward_splits_it(run):
    r = run["megatron_qkv"]
    assert r["marked"] == ["self_attention.linear_qkv.weight"] and r["attribute"] == [12, 6, 2], r
    assert r["split_err"] < 1e-5 and r["fc1_stride"] == 2 and r["built"] == "LDAdam", r


# -- single process ------------------------------------------------------------------------------


def fc1(rows=8, cols=6, stride=2, dim=0):
    p = torch.nn.Parameter(torch.randn(rows, cols))
    p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, stride
    return p


def qkv(heads=4, groups=2, d=3, cols=6, rows=None):
    p = torch.nn.Parameter(torch.randn(rows or groups * (heads // groups + 2) * d, cols))
    p.fused_qkv = (heads, groups, d)
    return p


def test_state_is_per_block_and_counted():
    torch.manual_seed(0)
    p = qkv()
    opt = LDAdam([{"params": [("w", p)], "within_adamw": False}], rank=2)
    p.grad = torch.randn_like(p)
    opt.step()
    assert sorted(opt.state[p]) == ["k", "q", "v"]
    assert opt.state[p]["q"]["error"].shape == (12, 6) and opt.state[p]["k"]["error"].shape == (6, 6)
    expected = sum(t.numel() * t.element_size() for st in opt.state[p].values() for t in st.values())
    assert opt.state_bytes()["total"] == expected


def test_diagnostics_see_each_block():
    torch.manual_seed(0)
    p = fc1(rows=16, cols=12)
    opt = LDAdam([{"params": [("fc1", p)], "within_adamw": False}], rank=2)
    probe = LowRankProbe(opt)
    for t in range(3):
        probe.arm()
        p.grad = torch.randn_like(p)
        opt.step()
        metrics = probe.collect()
    assert set(probe.opt.state[p]) == {"gate", "up"}
    assert 0 < metrics["ef_to_grad"] and 0 <= metrics["basis_drift"] <= 1, metrics


def test_microadam_steps_a_fused_weight_whole():
    """Elementwise: the blocks change nothing, and its state stays the parameter's."""
    p = fc1()
    opt = MicroAdam([("fc1", p)], lr=1e-3)
    p.grad = torch.randn_like(p)
    opt.step()
    assert "step" in opt.state[p] and not any(isinstance(v, dict) for v in opt.state[p].values())


@pytest.mark.parametrize("make, message", [
    (lambda: qkv(rows=20), r"w: 20 rows are not whole query groups of 12 rows"),
    (lambda: qkv(heads=5), r"w: fused_qkv: 5 attention heads do not split into 2 query groups"),
    (lambda: fc1(rows=7), r"w: partition_stride=2 must be a positive integer dividing the shard's 7 rows"),
    (lambda: fc1(dim=1), r"w: a fused weight split .* along its columns \(partition_dim=1\) is not supported"),
    (lambda: setattr(p := fc1(rows=12), "fused_qkv", (4, 2, 1)) or p, r"w: both partition_stride=2 and fused_qkv"),
])
def test_unsupported_layouts_are_refused_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        LDAdam([{"params": [("w", make())], "within_adamw": False}], rank=1)


def test_a_rank_too_large_for_a_block_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"rank=4 is larger than w\[k\]'s projected dimension 3"):
        LDAdam([{"params": [("w", qkv(heads=2, groups=1, d=3, cols=8))], "within_adamw": False}], rank=4)
    GaLoreAdamW([{"params": [("w", qkv(d=3, cols=8))], "compress": False}], rank=4)      # dense: nothing to check


def test_state_saved_without_the_fused_layout_is_refused():
    p = qkv()
    opt = LDAdam([("w", torch.nn.Parameter(p.detach().clone()))], rank=2)
    opt.param_groups[0]["within_adamw"] = False
    opt.param_groups[0]["params"][0].grad = torch.randn_like(p)
    opt.step()
    fused = LDAdam([{"params": [("w", p)], "within_adamw": False}], rank=2)
    fused.load_state_dict(opt.state_dict())
    p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match=r"w: its state \[.*\] is of the whole fused weight"):
        fused.step()


def test_checkpoint_tools_read_per_block_state_by_its_recorded_layout():
    """The optimizer records how each fused weight is laid out; the checkpoint tools read its
    per-block state with it (tests/test_fused_checkpoint.py), and refuse state saved without it."""
    from ds_lowrank.checkpoint.universal import CheckpointError, _whole_states_of_stage0

    p = qkv()
    opt = LDAdam([{"params": [("w", p)], "within_adamw": False}], rank=2)
    p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    assert sd["fused"]["w"]["fused_qkv"] == (4, 2, 3)
    states, _ = _whole_states_of_stage0(sd)
    assert sorted(states["w"]) == ["k", "q", "v"] and states["w"]["q"]["basis"].equal(opt.state[p]["q"]["basis"])
    del sd["fused"]
    with pytest.raises(CheckpointError, match=r"w: its state is per block of a fused weight .* saved without the "
                                              r"fused layout .* engine.load_checkpoint"):
        _whole_states_of_stage0(sd)
