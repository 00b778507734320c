"""LDAdam under DeepSpeed ZeRO 0/1/2/3 with 2 and 3 CPU ranks (gloo), against one process.

Each world size is one torchrun launch running many checks (tests/dist/zero_worker.py); the
tests below assert on what it measured.
"""

import os

import pytest
from helpers import torchrun

WORKER = os.path.join(os.path.dirname(__file__), "dist", "zero_worker.py")
CHECKS = {
    2: ["equiv:0", "equiv:1", "equiv:2", "equiv:3", "config:2", "resume:0", "resume:1", "resume:2",
        "resume:3", "bf16:0", "bf16:2", "bf16:3", "bf16opt:1", "gas:1", "gas:2", "gas:3",
        "overflow:1", "overflow:2", "overflow:3", "owned:1", "owned:2", "cfgfile:1", "cfgfile:2",
        "cfgfile:3", "roundrobin:2", "callable:3", "phases:3", "clip:0", "clip:1", "clip:2", "clip:3", "offload:1", "offload:2", "offload:3",
        *[f"{kind}:{stage}:{name}" for name in ("galore", "adapprox", "microadam", "ldadam_int4")
          for kind in ("equiv", "resume") for stage in (1, 2, 3)], "equiv:2:ldadam_int8",
        *[f"deficient:{stage}:{name}" for stage in (2, 3) for name in ("ldadam_r8", "galore_r8")]],
    3: ["equiv:0", "equiv:1", "equiv:2", "equiv:3", "resume:3", "owned:2", "phases:3", "equiv:3:ldadam_svd",
        *[f"equiv:2:{name}" for name in ("galore", "adapprox", "microadam", "ldadam_int4")],
        "equiv:3:ldadam_int8", "resume:2:ldadam_int4", "equiv:3:adapprox",
        *[f"deficient:{stage}:{name}" for stage in (2, 3) for name in ("ldadam_r8", "galore_r8")]],
}


def launch(world, tmp_path_factory):
    return torchrun(world, WORKER, tmp_path_factory.mktemp(f"zero{world}") / "result.json", *CHECKS[world])


@pytest.fixture(scope="module", params=[2, 3], ids=["dp2", "dp3"])
def run(request, tmp_path_factory):
    return launch(request.param, tmp_path_factory)


def _stages(run, kind):
    return [(k, v) for k, v in run.items() if k.startswith(kind + ":")]


def test_equals_single_process(run):
    """Weights after 10 steps match a single-process LDAdam on the same global batch; with a
    compressed error feedback, within what rounding-sized noise does to one process (a code
    flipped by the rounding of a sum), which a misplaced bucket or random draw exceeds."""
    for name, r in _stages(run, "equiv"):
        assert r["rel_err"] < max(1e-5, 3 * r["noise"]), (name, r["rel_err"], r["noise"])
        if not name.endswith(":0"):
            assert r["cut_rows"] > 0, f"{name}: the model must exercise rows cut between ranks"


def test_state_is_partitioned(run):
    """Per-rank state (counters aside) adds up to the single-process state: no rank keeps a copy
    of what another holds, not even of what lies along the columns of a matrix whose rows it
    shares (LDAdam's and GaLore's r × n part, Adapprox's column factor)."""
    for name, r in _stages(run, "equiv"):
        expected = r["state_single"]
        if name.endswith(":0"):   # no partitioning: every rank holds everything
            expected = [run["world"] * s for s in r["state_single"]]
        assert r["state_sum"] == expected, name


def test_memory_estimate_is_each_ranks_state(run):
    """ds_lowrank.memory (tools/estimate_memory.py) gives every rank's state bytes, to the byte,
    from the shapes alone: the rows it owns plus the factors kept whole on each owner."""
    for name, r in _stages(run, "equiv"):
        assert r["state_estimated"] == r["state_per_rank"], name


def _by_category(held: dict, categories: dict) -> dict:
    out: dict = {}
    for label_key, n in held.items():
        c = categories[label_key.rsplit("|", 1)[1]]
        out[c] = out.get(c, 0) + n
    return out


def test_state_layout_walks_what_state_bytes_counts_and_one_process_holds(run):
    """``optim.state_layout`` is the one reader of a ZeRO rank's state: per rank, what it walks
    (by parameter label, from the pieces' own metadata, and state key) is what ``state_bytes``
    counts, category by category; over the ranks, every parameter's every state tensor (counters
    aside: each owner keeps its own) adds up to what one process holds of it, byte for byte."""
    for name, r in _stages(run, "equiv"):
        lay = r["layout"]
        for rank, (held, counted) in enumerate(zip(lay["held"], lay["state_bytes"])):
            walked = _by_category(held, lay["categories"])
            assert {c: n for c, n in counted.items() if n and c != "total"} == {c: n for c, n in walked.items() if n}, \
                (name, rank)
        summed: dict = {}
        for held in lay["held"]:
            for label_key, n in held.items():
                summed[label_key] = summed.get(label_key, 0) + n
        copies = run["world"] if name.endswith(":0") else 1      # stage 0: every rank holds everything
        single = lay["held_single"]
        assert {lk for lk in single if lk.endswith("|step")} == {lk for lk in summed if lk.endswith("|step")}, name

        def moments(d):
            return {lk: n for lk, n in d.items() if lay["categories"].get(lk.rsplit("|", 1)[1]) != "counters"}
        assert moments(summed) == {lk: copies * n for lk, n in moments(single).items()}, name


def test_gradient_clipping_as_deepspeed_adam(run):
    """The clipped run equals one process with clip_grad_norm_, as DeepSpeed's handling of
    torch's AdamW does; every step was clipped."""
    for name, r in _stages(run, "clip"):
        assert r["min_norm"] > r["max_norm"], (name, r)
        assert r["adamw_rel_err"] < 1e-5, (name, r)
        assert r["rel_err"] < 1e-5, (name, r)


def test_cpu_optimizer_offload_equals_single_process(run):
    for name, r in _stages(run, "offload"):
        assert r["offload"] and r["bound"] > 0 and r["rel_err"] < 1e-5, (name, r)


def test_buckets_share_one_collective_per_phase(run):
    for name, r in _stages(run, "phases"):
        assert len(r["bucket_sums"]) >= 2 and sum(r["bucket_sums"]) > r["collectives"], (name, r)
        assert r["collectives"] == r["expected"], (name, r)


def test_no_collectives_for_wholly_owned_matrices(run):
    for name, r in _stages(run, "owned"):
        if r["shared_params"] == 0:
            assert r["sent"] == {}, name
        else:
            assert r["sent"].get("reduce", 0) > 0, name


def test_resume_is_bit_exact(run):
    for name, r in _stages(run, "resume"):
        assert r["bitwise"], (name, r["max_diff"])


def test_config_entry_point_and_callable(run):
    for name, r in _stages(run, "config") + _stages(run, "callable"):
        assert r["rel_err"] < 1e-5, name


def test_bf16_trains_close_to_fp32(run):
    for name, r in _stages(run, "bf16"):
        assert r["last_loss"] < 0.8 * r["first_loss"], name
        assert r["rel_err"] < 0.1, (name, r["rel_err"])
    for name, r in _stages(run, "bf16opt"):
        assert r["wrapper"] == "BF16_Optimizer" and r["bound"] > 0, name
        assert r["last_loss"] < 0.8 * r["first_loss"], name


def test_gradient_accumulation_equals_doubled_micro_batch(run):
    for name, r in _stages(run, "gas"):
        assert r["rel_err"] < 1e-5, (name, r["rel_err"])


def test_overflow_step_changes_nothing(run):
    for name, r in _stages(run, "overflow"):
        assert r["state_unchanged"] and r["weights_unchanged"] and r["finite_after"], (name, r)
        assert r["state_tensors"] > 0


def test_rank_deficient_gradients_stay_in_their_rows(run):
    """Gradients of rank 4 < r = 8 in 4 rows of a 48×64 matrix split between ranks: the update
    stays in the 4 rows (equality with one process is checked on tensor-parallel splits, in
    test_tensor_parallel.py: see check_deficient)."""
    runs = _stages(run, "deficient")
    assert len(runs) == 4
    for name, r in runs:
        assert r["outside"] < 1e-6 and r["split"] > 0, (name, r)


def test_shipped_configs_train(run):
    for name, r in _stages(run, "cfgfile"):
        assert r["optimizer"] == "LDAdam" and r["bound"] > 0, name
        assert r["lrs"][0] < r["lrs"][1] and r["lrs"][-1] < r["lrs"][1], (name, r["lrs"])   # warmup, cosine
        assert r["last_loss"] < r["first_loss"], name


def test_round_robin_layout_is_refused_at_binding(run):
    for name, r in _stages(run, "roundrobin"):
        assert r["error"] and "round_robin_gradients" in r["error"], (name, r)
