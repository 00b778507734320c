"""Fused weights' per-block state through the checkpoint tools (tests/dist/fused_checkpoint_worker.py):
a SwiGLU linear_fc1 (partition_stride 2) and a GQA fused QKV saved with LDAdam at TP 2 × DP 2
(ZeRO stage 0, 2 and 3 in global mode, ZeRO 2 in local mode), consolidated, compared with one
process, resumed at TP 2 × DP 2 and at TP 1 × DP 3, and carried through DeepSpeed's Adam."""

import os

import pytest

from helpers import torchrun

WORKER = os.path.join(os.path.dirname(__file__), "dist", "fused_checkpoint_worker.py")
GLOBAL = ("global:0", "global:2", "global:3")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused_checkpoint")
    saved = torchrun(4, WORKER, root / "save.json", root, 2, "save")
    resumed = torchrun(3, WORKER, root / "resume.json", root, 1, "resume")
    return saved, resumed


def test_consolidated_blocks_are_one_process_state(runs):
    """Global mode: each block's state joined over the TP and DP ranks is that of one process
    stepping the whole logical matrices (gate, up; q, k, v); local mode: each TP rank's blocks'
    state is that of one process stepping them as matrices of their own.  (Relative to each
    tensor's largest entry: second moments square the gradients' rounding, up to 2e-5 here.)"""
    saved, _ = runs
    for case in (*GLOBAL, "local:2"):
        r = saved[case]
        assert r["state_err"][0] < 1e-4 and r["blocks"] == ["gate", "up"] and r["reread"], (case, r)


def test_resume_through_the_tools_at_the_saving_layout_is_exact(runs):
    saved, _ = runs
    for case in (*GLOBAL, "local:2"):
        assert saved[case]["same_layout"] < 1e-5, (case, saved[case])


def test_global_mode_resumes_at_another_tp_and_dp_size_as_the_uninterrupted_run(runs):
    _, resumed = runs
    assert (resumed["tp"], resumed["dp"]) == (1, 3)
    for case in GLOBAL:
        assert resumed[case]["rel_err"] < 1e-5, (case, resumed[case])


def test_local_mode_at_another_tp_size_carries_the_momentum_through_adam(runs):
    """Each TP rank's blocks had their own subspaces: at another TP size the new blocks start from
    the old ones' momentum (Adam's moments) in subspaces of their own, close to but not the
    uninterrupted run."""
    _, resumed = runs
    r = resumed["local:2"]
    assert 0 < r["rel_err"] < 0.5, r


def test_adam_conversion_of_fused_weights_starts_the_logical_matrices(runs):
    """--to adam puts each block's moments at its rows of the fused weight; LDAdam started from
    that checkpoint at TP 1 × DP 3 equals one process starting the logical matrices from the same
    moments, unfused by the test's own code."""
    _, resumed = runs
    for mode in ("global", "local"):
        r = resumed[f"fromadam:{mode}"]
        assert r["rel_err"] < 1e-5 and r["moved"] > 1e-3, (mode, r)


def test_a_checkpoint_without_the_fused_layout_is_refused_saying_why(runs):
    saved, _ = runs
    for case in (*GLOBAL, "local:2"):
        message = saved[case]["old"]
        assert message and "fused layout" in message and "engine.load_checkpoint" in message, (case, message)
