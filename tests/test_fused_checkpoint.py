"""Fused weights' per-block state through the checkpoint tools (tests/dist/fused_checkpoint_worker.py):
a SwiGLU linear_fc1 (partition_stride 2) and a GQA fused QKV saved with LDAdam at TP 2 × DP 2
(ZeRO stage 0, 2 and 3 in global mode, 0 and 2 in local mode; GaLore too in global mode at ZeRO 2),
consolidated, compared with one
process, resumed at TP 2 × DP 2 and at TP 1 × DP 3, and carried through DeepSpeed's Adam."""

import os

import pytest

from helpers import torchrun

WORKER = os.path.join(os.path.dirname(__file__), "dist", "fused_checkpoint_worker.py")
GLOBAL = ("global:0", "global:2", "global:3", "global:2:galore")
LOCAL = ("local:0", "local:2")


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
    for case in (*GLOBAL, *LOCAL):
        r = saved[case]
        assert r["state_err"][0] < 1e-4 and r["blocks"] == ["gate", "up"] and r["reread"], (case, r)
        # blocks kept on AdamW (within_adamw: gate, up, k, v at ZeRO 0 and 3) and compressed ones
        # (every block at ZeRO 2) are both checked
        blocks = {f"{w}[{b}]" for w, bs in (("fc1", ("gate", "up")), ("qkv", "qkv")) for b in bs}
        if case in ("global:0", "global:3"):
            assert r["compressed"] == ["qkv[q]"], (case, r)
        else:
            per_rank = blocks if case.startswith("global") else {f"{b}@{t}" for b in blocks for t in (0, 1)}
            assert per_rank <= set(r["compressed"]), (case, r)


def test_resume_through_the_tools_at_the_saving_layout_is_exact(runs):
    saved, _ = runs
    for case in (*GLOBAL, *LOCAL):
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
    for case in LOCAL:
        r = resumed[case]
        assert 0 < r["rel_err"] < 0.5, (case, r)


def test_adam_conversion_of_fused_weights_starts_the_logical_matrices(runs):
    """--to adam puts each block's moments at its rows of the fused weight; LDAdam started from
    that checkpoint at TP 1 × DP 3 equals one process starting the logical matrices from the same
    moments, unfused by the test's own code."""
    _, resumed = runs
    for mode in ("global", "local"):
        r = resumed[f"fromadam:{mode}"]
        assert r["rel_err"] < 1e-5 and r["moved"] > 1e-3, (mode, r)


def test_another_tensor_parallel_mode_is_refused_naming_the_ways_out(runs):
    _, resumed = runs
    message = resumed["aslocal"]
    assert message and "saved with tensor_parallel='global'" in message and "--to adam" in message, message


def test_a_checkpoint_without_the_fused_layout_is_refused_saying_why(runs):
    saved, _ = runs
    for case in (*GLOBAL, *LOCAL):
        message = saved[case]["old"]
        assert message and "fused layout" in message and "engine.load_checkpoint" in message, (case, message)


# -- one process: Adam's moments of a fused QKV, and what is refused -------------------------------


def _trained_qkv(cls, **options):
    """A GQA fused QKV (2 query groups of 2 heads, head_dim 3) stepped twice as its blocks."""
    import torch

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(2 * (2 + 2) * 3, 8))
    p.fused_qkv = (4, 2, 3)
    opt = cls([{"params": [("w", p)], "within_adamw": False}], **options)
    for _ in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
    return p, opt


def _consolidated(p, opt):
    from ds_lowrank.checkpoint import Consolidated
    from ds_lowrank.checkpoint.universal import _whole_states_of_stage0

    sd = opt.state_dict()
    states, group_of = _whole_states_of_stage0(sd)
    groups = [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in sd["param_groups"]]
    return Consolidated(sd["optimizer"], groups, group_of, {"w": p.detach().clone()}, states,
                        fused={"w": {k: list(v) if isinstance(v, tuple) else v for k, v in sd["fused"]["w"].items()}})


def test_adam_moments_of_a_fused_qkv_lie_at_each_blocks_rows():
    """Each block's moments (carried out of its subspace) at its rows of the fused weight: every
    group's [q heads; k head; v head], as the test lays them out."""
    import torch

    from ds_lowrank import LDAdam
    from ds_lowrank.checkpoint import adam_states
    from ds_lowrank.checkpoint.adam import adam_of_subspace

    p, opt = _trained_qkv(LDAdam, rank=2)
    c = _consolidated(p, opt)
    got = adam_states(c)["w"]
    group = c.param_groups[0]
    rows = {"q": [0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16, 17], "k": [6, 7, 8, 18, 19, 20],
            "v": [9, 10, 11, 21, 22, 23]}
    for block, index in rows.items():
        want = adam_of_subspace(LDAdam, group, (len(index), 8), opt.state[p][block])
        assert torch.allclose(got["exp_avg"][index], want["exp_avg"]), block
        assert torch.allclose(got["exp_avg_sq"][index], want["exp_avg_sq"]), block
    assert int(got["step"]) == 2


def test_state_without_a_counterpart_in_adam_is_refused_naming_the_block():
    from ds_lowrank import Adapprox
    from ds_lowrank.checkpoint import CheckpointError, adam_states

    p, opt = _trained_qkv(Adapprox, rank_min=1, rank_init=2, rank_max=2)
    with pytest.raises(CheckpointError, match=r"Adapprox's state of w\[q\]: it has no counterpart in Adam's"):
        adam_states(_consolidated(p, opt))


def test_local_blocks_without_a_counterpart_in_adam_keep_their_tp_size():
    """Each TP rank's blocks' own state (local mode) goes to another TP size only through Adam's
    moments: Adapprox's is refused, naming the block and the ways out."""
    from ds_lowrank import Adapprox
    from ds_lowrank.checkpoint import CheckpointError, adam_states

    p, opt = _trained_qkv(Adapprox, rank_min=1, rank_init=2, rank_max=2)
    c = _consolidated(p, opt)
    c.shard_states, c.tensor_parallel = {"w": [c.states.pop("w")]}, {"w": [0, 1]}
    with pytest.raises(CheckpointError, match=r"Adapprox's state of w\[q\]: it has no counterpart in Adam's.*; its "
                                              r"tensor_parallel='local' shards .* resume at the saved size \(1\)"):
        adam_states(c)


def test_a_whole_weights_state_is_refused_for_a_model_that_fuses_it():
    from ds_lowrank import LDAdam
    from ds_lowrank.checkpoint import CheckpointError
    from ds_lowrank.checkpoint.universal import _states_here
    from ds_lowrank.distributed.fused import record

    p, opt = _trained_qkv(LDAdam, rank=2)
    c = _consolidated(p, opt)
    c.states["w"], c.fused = {"step": c.states["w"]["q"]["step"]}, {}      # saved unfused
    with pytest.raises(CheckpointError, match=r"w: the checkpoint holds the state of the whole weight, but this "
                                              r"model fuses it .* --to adam"):
        _states_here(c, opt, {}, set(), {"w": record(p)})
