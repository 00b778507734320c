"""FSDP2 combined with torch's tensor parallelism (``parallelize_module`` over ``mesh["tp"]``, then
``fully_shard`` over ``mesh["dp"]``): every projection optimizer equals one process in both
``tensor_parallel`` modes, MicroAdam in local mode, DCP checkpoints continue exactly and, in
global mode, at other layouts; what is not supported is refused (real torchrun launches over gloo,
tests/dist/fsdp2_tp_worker.py)."""

import os

import pytest

from helpers import torchrun

WORKER = os.path.join(os.path.dirname(__file__), "dist", "fsdp2_tp_worker.py")
# (ranks, dp×tp, checks); the 2-rank launch loads what the 4-rank one saved
LAUNCHES = {4: ("2x2", ["equal", "meshes", "diagnostics", "save", "refuse"]),
            2: ("1x2", ["equal", "diagnostics", "load:1x2", "load:2x1", "plain"])}
OPTIMIZERS = ("ldadam", "ldadam_int4", "galore", "galore_randomized", "adapprox")


def launch(world: int, root) -> dict:
    layout, checks = LAUNCHES[world]
    return torchrun(world, WORKER, root / f"result{world}.json", root / "checkpoints", layout, *checks)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp2_tp")


@pytest.fixture(scope="module")
def run4(root):
    return launch(4, root)


@pytest.fixture(scope="module")
def run2(root, run4):           # loads the checkpoints the 4-rank launch saved
    return launch(2, root)


@pytest.mark.parametrize("world", [4, 2])
@pytest.mark.parametrize("mode", ["global", "local"])
def test_every_projection_optimizer_equals_one_process(world, mode, request):
    """dp2×tp2 and dp1×tp2: global mode equals one process stepping the whole matrices, local
    mode one process stepping each TP shard as a parameter of its own.  The sums go over the
    ranks holding rows: all four in global mode, the dp ranks in local mode (none at dp 1)."""
    run = request.getfixturevalue(f"run{world}")
    for name in OPTIMIZERS:
        r = run[f"equal:{mode}:{name}"]
        assert r["rel_err"] < 1e-5 and r["skipped"] == 0, (name, r)
        assert (r["reduce"] > 0) == (mode == "global" or world == 4), (name, r)


@pytest.mark.parametrize("world", [4, 2])
@pytest.mark.parametrize("mode", ["global", "local"])
def test_memory_estimate_is_each_ranks_state(world, mode, request):
    """``ds_lowrank.memory.estimate_fsdp2(..., tp=...)`` gives every rank's state bytes, to the
    byte, from the shapes alone: rows split over the flattened mesh (one rank holding none of a
    matrix, its ``r × n`` state whole) in global mode, over ``dp`` per TP shard in local mode."""
    run = request.getfixturevalue(f"run{world}")
    for name in OPTIMIZERS:
        r = run[f"equal:{mode}:{name}"]
        assert r["state_estimated"] == r["state_per_rank"], (name, r["state_estimated"], r["state_per_rank"])


@pytest.mark.parametrize("world", [4, 2])
def test_microadam_local_equals_one_process_per_tp_shard(world, request):
    """MicroAdam in local mode: each TP shard's flattening in top-k blocks, its rows split over
    ``dp`` as on a 1-D mesh, equals one process holding each TP shard as a parameter of its own.
    At dp2 the dp split cuts blocks, which are exchanged; nothing is summed; per-rank state to the
    byte against the estimate."""
    r = request.getfixturevalue(f"run{world}")["equal:local:microadam"]
    assert r["rel_err"] < 1e-5 and r["skipped"] == 0, r
    assert r["reduce"] == 0 and (r["exchange"] > 0) == (world == 4), r
    assert r["state_estimated"] == r["state_per_rank"], r


@pytest.mark.parametrize("world", [4, 2])
def test_global_state_is_the_whole_matrices_state(world, request):
    """In global mode each DTensor state tensor, gathered whole, is one process's state."""
    run = request.getfixturevalue(f"run{world}")
    for name in OPTIMIZERS:
        r = run[f"equal:global:{name}"]
        assert r["state_keys"] > 0 and r["state_err"] < 1e-4, (name, r)


@pytest.mark.parametrize("world", [4, 2])
@pytest.mark.parametrize("mode", ["global", "local"])
def test_diagnostics_equal_one_process(world, mode, request):
    """``LowRankProbe`` on the tensor-parallel model (error feedback against gradient norms,
    basis drift) equals the probe on one process stepping the same matrices: the whole ones in
    global mode, each TP shard as a matrix of its own in local mode, at dp2×tp2 (rows and
    column blocks split over the ranks, one holding none of a matrix) and dp1×tp2."""
    run = request.getfixturevalue(f"run{world}")
    for name in ("ldadam", "ldadam_int4", "galore"):
        r = run[f"diagnostics:{mode}:{name}"]
        assert "basis_drift" not in r["want"]["0"] and "basis_drift" in r["want"]["5"], (name, r)
        for step, want in r["want"].items():
            got = r["got"][step]
            assert set(got) == set(want), (name, step, got, want)
            for key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (name, mode, step, key)


def test_groups_whose_holders_look_alike_sum_over_their_own_ranks(run4):
    """A column-wise head of 2 rows held by flattened ranks 0 and 1 and the norm held by dp ranks
    0 and 1 (Adapprox compresses it): each matrix's sums go over its own group."""
    r = run4["meshes:adapprox"]
    assert r["head_rows"] == [1, 1, 0, 0] and r["rel_err"] < 1e-5, r


def test_state_placements(run4):
    """Global mode: rows as the rows stepped (a column-wise weight's own placements, a row-wise
    one's moved to (Shard(0), Shard(0))), the r × n state in blocks along both mesh dimensions.
    Local mode: the TP shards' states side by side along tp."""
    glob = run4["equal:global:ldadam"]["placements"]
    assert "up.weight:error:(_StridedShard(dim=0, sf=2), Shard(dim=0))" in glob
    assert "mid.weight:error:(Shard(dim=0), Shard(dim=0))" in glob
    assert "mid.weight:proj_exp_avg:(Shard(dim=1), Shard(dim=1))" in glob
    loc = run4["equal:local:ldadam"]["placements"]
    assert "mid.weight:error:(Shard(dim=0), Shard(dim=1))" in loc
    assert "mid.weight:basis:(_StridedShard(dim=1, sf=2), Shard(dim=1))" in loc
    assert "up.weight:proj_exp_avg:(Shard(dim=1), Shard(dim=0))" in loc


@pytest.mark.parametrize("mode", ["global", "local"])
def test_dcp_checkpoint_continues_exactly(run4, mode):
    for name in ("ldadam", "galore", "adapprox", "microadam")[:3 if mode == "global" else 4]:
        assert run4[f"save:{mode}:{name}"]["rel_err"] == 0.0, (name, run4[f"save:{mode}:{name}"])


def test_microadam_local_state_is_saved_by_tp_shard(run4):
    """MicroAdam's block state goes out in each TP shard's coordinates, the shards side by side
    along ``tp``, each split over ``dp``: the up's TP shard of 5 × 12 = 60 elements is 7 blocks
    of 8 and one of 4 (2 entries kept of each, 1 of the last; a window of 3), 30 bytes of 4-bit
    codes, 15 buckets of 4."""
    saved = run4["saved:local:microadam"]
    strided = "(_StridedShard(dim={}, sf=2), Shard(dim={}))"
    assert f"up.weight:window_indices:{strided.format(1, 1)}:[3, 30]" in saved, saved
    assert f"up.weight:error:{strided.format(0, 0)}:[60]" in saved, saved
    assert f"up.weight:error_min:{strided.format(0, 0)}:[30]" in saved, saved


@pytest.mark.parametrize("layout", ["1x2", "2x1"])
def test_global_checkpoint_loads_at_another_layout(run2, layout):
    """Saved at dp2×tp2, continued at dp1×tp2 and dp2×tp1: the uninterrupted run's end; a fresh
    optimizer on the same weights is far from it, so the state was loaded."""
    for name in ("ldadam", "galore", "adapprox"):
        r = run2[f"load:{layout}:{name}"]
        assert r["rel_err"] < 1e-5 and r["without_state"] > 1e-2, (name, r)


def test_local_checkpoint_loads_at_another_dp_size(run2):
    """Local mode's state is each TP shard's: saved at dp2×tp2, it continues at dp1×tp2."""
    for name in ("ldadam", "galore", "adapprox", "microadam"):
        r = run2[f"load:1x2:local:{name}"]
        assert r["rel_err"] < 1e-5 and r["without_state"] > 1e-2, (name, r)


def test_fully_shard_checkpoint_continues_with_tensor_parallelism(run2):
    for name in ("ldadam", "galore"):
        assert run2[f"plain:{name}"]["rel_err"] < 1e-5, run2[f"plain:{name}"]


def test_what_is_not_supported_is_refused(run4):
    msg = run4["refuse:microadam"]
    assert "MicroAdam with tensor_parallel='global' does not run on FSDP2 combined with tensor" in msg, msg
    assert "use tensor_parallel='local'" in msg, msg
    msg = run4["refuse:microadam_uneven"]
    assert "w: MicroAdam with tensor_parallel='local' needs tensor-parallel shards of one size" in msg, msg
    assert "(4, 7)" in msg and "multiple of 2" in msg, msg
    msg = run4["refuse:local_rank"]
    assert "head.weight (its tensor-parallel shard, tensor_parallel='local')" in msg and "(1, 7)" in msg, msg
    msg = run4["refuse:layout"]
    assert "(Shard(dim=1), Shard(dim=0))" in msg and "parallelize_module" in msg, msg
    msg = run4["refuse:from_adamw"]
    assert "tensor parallelism" in msg and "fully_shard alone" in msg, msg
