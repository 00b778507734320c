"""Fused weights under DeepSpeed ZeRO 1, 2 and 3 with megatron-core's tensor parallelism
(``mpu=parallel_state``): a SwiGLU linear_fc1 (partition_stride 2) and a GQA fused QKV, in both
tensor-parallel modes, with LDAdam, GaLore and Adapprox, against one process stepping the same
blocks (tests/dist/fused_zero_worker.py).  4 ranks as TP 2 × DP 2, 3 ranks as TP 3 × DP 1, and
2 ranks as TP 1 × DP 2; with more than one DP rank ZeRO 1/2 cut a row of a block between them.  A
shorter launch on 6 ranks as TP 2 × DP 3 checks blocks held by 2 of 3 DP ranks (process groups of
part of each TP rank's DP group).  In the same launches ``LowRankProbe`` (LDAdam, GaLore) reports
what it reports for the one process."""

import os

import pytest

from helpers import torchrun

WORKER = os.path.join(os.path.dirname(__file__), "dist", "fused_zero_worker.py")
NAMES = ("ldadam", "galore", "adapprox")
BLOCKS = {f"{w}.weight[{b}]" for w, bs in (("fc1", ("gate", "up")), ("qkv", "qkv")) for b in bs}


@pytest.fixture(scope="module", params=[(2, 4), (3, 3), (1, 2)], ids=["tp2xdp2", "tp3xdp1", "tp1xdp2"])
def run(request, tmp_path_factory):
    tp, world = request.param
    out = tmp_path_factory.mktemp(f"fused_tp{tp}zero") / "result.json"
    return torchrun(world, WORKER, out, tp)


def runs(run, mode):
    out = {k: v for k, v in run.items() if k.startswith(f"{mode}:")}
    assert len(out) == 3 * len(NAMES)
    return out


def test_local_mode_equals_one_process_stepping_each_shards_blocks_apart(run):
    """Each block of each TP shard its own matrix, its rows split between the DP ranks (a row
    cut between them inside a block at ZeRO 1/2), as one process stepping them as separate
    parameters; it is not the whole logical matrices' optimization (at TP 2)."""
    for key, r in runs(run, "local").items():
        assert r["rel_err"] < 1e-5 and r["moved"] > 1e-3 and r["shift_diff"] < 1e-5, (key, r)
        cut = run["dp"] > 1 and not key.endswith("zero3")
        assert r["block_holders"] == run["dp"] and r["fused_cut"] == cut, (key, r)
        assert BLOCKS <= set(r["state_labels"]) and r["counted"], (key, r)
        if run["tp"] > 1:
            assert r["vs_global"] > 1e-3, (key, r)


def test_global_mode_equals_one_process_stepping_the_logical_matrices(run):
    """Each block part of the whole logical matrix: its sums span every (TP, DP) rank owning rows
    of it, more of them than in local mode when TP > 1."""
    local = runs(run, "local")
    for key, r in runs(run, "global").items():
        assert r["rel_err"] < 1e-5 and r["moved"] > 1e-3 and r["shift_diff"] < 1e-5, (key, r)
        assert r["block_holders"] == run["world"] and BLOCKS <= set(r["state_labels"]), (key, r)
        same = local["local:" + key.split(":", 1)[1]]
        assert (r["reduce"] > same["reduce"]) == (run["tp"] > 1), (key, r, same)


def probed(run):
    """The runs whose ``LowRankProbe`` was compared with one process's (every one with a basis)."""
    out = {k: r["probe"] for k, r in run.items() if isinstance(r, dict) and "probe" in r}
    assert {f"{mode}:ldadam:zero{stage}" for mode in ("local", "global") for stage in (2, 3)} <= set(out)
    return out


def test_diagnostics_measure_the_blocks_inside_zero_partitions_as_one_process(run):
    """``LowRankProbe`` on the engine's optimizer (every (TP, DP) rank's pieces of each block, cut
    rows included) reports what the same probe reports for one process stepping the blocks as
    separate matrices: each TP shard's blocks in local mode, the whole logical ones in global
    mode.  Controls: the blocks count (the error feedback of the other matrices alone is not the
    total), and in local mode at TP 2 the whole logical matrices report otherwise."""
    for key, p in probed(run).items():
        for t, want in p["metrics"].items():
            got = p["got"][t]
            # (at TP 3 the dense run's blocks are all too small to compress: nothing to measure)
            assert set(got) == set(want) and ("basis_drift" in want or key.startswith("dense:")), (key, t, got, want)
            for k in want:
                # (measured: norms and ratios within 6.3e-6 relative, drifts within 6.5e-7; abs:
                # a drift near 0 is 1 - ‖P_oldᵀP_new‖²/r of float32 bases, ~1e-6 from 0)
                assert got[k] == pytest.approx(want[k], rel=2e-5, abs=1e-5), (key, t, k, got, want)
        if key.split(":")[:2] in (["local", "ldadam"], ["global", "ldadam"]):
            last = p["got"][max(p["got"])]
            assert last["ef_norm"] > 1.01 * p["unfused_ef_norm"], (key, last, p["unfused_ef_norm"])
        if "global_metrics" in p and key.startswith("local:"):
            got, other = p["got"], p["global_metrics"]
            assert any(abs(got[t][k] - other[t][k]) > 1e-3 * abs(other[t][k]) for t in other for k in other[t]), key


def test_blocks_kept_dense_take_adamw_as_separate_parameters_would(run):
    r = run["dense:ldadam:zero2"]
    assert r["rel_err"] < 1e-5, r
    if run["tp"] == 2:     # the 6 × 10 blocks of a TP 2 shard would cost more than AdamW compressed
        assert r["compressed"] == {"gate": False, "up": False, "q": True, "k": False, "v": False}, r


def test_resume_from_the_engine_checkpoint_is_exact(run):
    """save_checkpoint half-way, load_checkpoint in a new engine: the same weights to the bit
    (local mode at ZeRO 2, global at ZeRO 3); the checkpoint tools consolidate it
    (tests/test_fused_checkpoint.py)."""
    for key in ("resume:local:zero2", "resume:global:zero3"):
        r = run[key]
        assert r["max_diff"] == 0.0, (key, r)
        assert r["tools"] is None, (key, r)


def test_blocks_held_by_some_data_parallel_ranks_under_tensor_parallelism(tmp_path):
    """TP 2 × DP 3: a block's rows owned by 2 of the 3 DP ranks of each TP rank, whose groups every
    rank of the world makes (the TP ranks' DP groups hold other ranks)."""
    run = torchrun(6, WORKER, tmp_path / "result.json", 2, "few")
    assert len(run) == 3 + 3, run
    for key, r in run.items():
        if isinstance(r, dict):
            assert r["rel_err"] < 1e-5 and r["moved"] > 1e-3, (key, r)
    assert run["local:ldadam:zero2"]["block_holders"] == 2 and run["local:ldadam:zero2"]["fused_cut"], run
    assert run["global:ldadam:zero2"]["block_holders"] == 4 and run["local:ldadam:zero3"]["block_holders"] == 3, run
    for key, r in run.items():
        if isinstance(r, dict):
            for t, want in r["probe"]["metrics"].items():
                assert set(r["probe"]["got"][t]) == set(want), (key, t)
                for k in want:
                    assert r["probe"]["got"][t][k] == pytest.approx(want[k], rel=2e-5, abs=1e-5), (key, t, k)


def test_a_range_of_a_fused_weights_rows_holds_one_range_of_each_blocks_rows():
    """What a ZeRO piece owns of a block (``Block.within``) is that block's rows ``at ...`` in the
    block's order, for every range of the shard's rows (a GQA QKV of 3 query groups: blocks of
    3 spans each, and a stride-2 fc1)."""
    import torch

    from ds_lowrank.distributed import fused

    qkv = torch.nn.Parameter(torch.arange(24.0).view(24, 1))
    qkv.fused_qkv = (6, 3, 2)           # per group: 4 query rows, a key and a value head of 2
    fc1 = torch.nn.Parameter(torch.arange(12.0).view(12, 1))
    fc1.tensor_model_parallel, fc1.partition_dim, fc1.partition_stride = True, 0, 2
    for p in (qkv, fc1):
        rows = p.shape[0]
        for block in fused.blocks("w", p):
            whole = p.detach()[block.index(p.device)]
            for first in range(rows):
                for count in range(rows - first + 1):
                    at, spans = block.within(first, count)
                    got = [p.detach()[first + i] for a, b in spans for i in range(a, b)]
                    n = len(got)
                    assert n == sum(first <= r < first + count for a, b in block.spans for r in range(a, b))
                    if n:
                        assert torch.equal(torch.stack(got), whole[at:at + n]), (block.name, first, count)
