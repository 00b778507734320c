"""tensor_parallel="global" under DeepSpeed ZeRO 1, 2 and 3 with megatron-core's tensor parallelism
(``mpu=parallel_state``): 4 ranks as TP 2 × DP 2 and 3 ranks as TP 3 × DP 1, each launch training
LDAdam, GaLore and Adapprox at every stage against one process training the whole layers
(tests/dist/tp_zero_worker.py)."""

import os

import pytest

from helpers import torchrun

WORKER = os.path.join(os.path.dirname(__file__), "dist", "tp_zero_worker.py")


@pytest.fixture(scope="module", params=[(2, 4), (3, 3)], ids=["tp2xdp2", "tp3xdp1"])
def run(request, tmp_path_factory):
    tp, world = request.param
    out = tmp_path_factory.mktemp(f"tp{tp}zero") / "result.json"
    return torchrun(world, WORKER, out, tp)


def test_global_mode_under_zero_equals_one_process_stepping_the_whole_matrices(run):
    """Every stage and optimizer: the whole layers one process trains, within the tolerance of the
    stage-0 global mode; the sums span the TP group and the DP partition (up to all TP × DP ranks
    on one matrix, a row cut between DP ranks at TP 2 × DP 2), and the row-parallel shards' rows
    move over the TP group twice a step."""
    runs = {k: v for k, v in run.items() if k.startswith("global:")}
    assert len(runs) == 9
    for name, r in runs.items():
        assert r["rel_err"] < 1e-5 and r["moved"] > 1e-3, (name, r)
        assert r["reduce"] > 0 and r["move"] == 8 and r["most_holders"] == run["world"], (name, r)
        assert r["dp_cut"] == (run["dp"] > 1), (name, r)


def test_local_mode_under_zero_is_not_the_whole_matrix(run):
    """The control: each shard its own matrix, as before, differs from one process (so the
    comparison above can fail) and moves nothing over the TP group."""
    r = run["local:ldadam:zero2"]
    assert r["rel_err"] > 1e-3 and r["move"] == 0, r


def test_resume_from_the_engine_checkpoint_is_exact(run):
    """save_checkpoint half-way, load_checkpoint in a new engine: the same weights to the bit, at
    ZeRO 2 and 3; the checkpoint tools read such a checkpoint (what they make of it:
    tests/test_tp_zero_checkpoint.py)."""
    for stage in (2, 3):
        r = run[f"resume:zero{stage}"]
        assert r["max_diff"] == 0.0, (stage, r)
        assert r["tools"] is None, r


def test_a_matrix_skipped_on_one_rank_is_skipped_on_every_tp_and_dp_rank(run):
    r = run["skip"]
    assert r["unchanged"] and r["others_moved"] and r["skipped"] == [1] * run["world"], r


def test_microadam_global_mode_is_refused_on_zero_partitions(run):
    assert run["refused:microadam"].startswith(
        "NotImplementedError: MicroAdam with tensor_parallel='global' does not run on ZeRO flat partitions"), run


def test_each_rank_gets_the_gloo_mirror_of_its_own_group(run):
    """Offloaded partitions sum on the CPU over a gloo mirror of the (NCCL) data- or
    tensor-parallel group; each rank passes its own group, which differs between ranks, and the
    mirror it gets back sums over exactly that group's ranks."""
    assert len(run["mirror"]) == run["world"]
    for rank, sums in enumerate(run["mirror"]):
        for name, (got, want) in sums.items():
            assert got == want, (rank, name)
