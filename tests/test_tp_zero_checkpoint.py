"""Checkpoints of tensor_parallel="global" runs under DeepSpeed ZeRO with megatron-core's tensor
parallelism, through tools/convert_checkpoint.py: consolidated into the whole matrices' state
(against one process), resumed at another TP and DP size (against the uninterrupted run), and
converted to and from DeepSpeed's Adam (tests/dist/tp_zero_checkpoint_worker.py)."""

import os
import re

import pytest
import torch

from helpers import torchrun

from ds_lowrank import LDAdam
from ds_lowrank.checkpoint import CheckpointError, adam_states, load
from ds_lowrank.checkpoint.pieces import merge_rows
from ds_lowrank.distributed.tensor_parallel import ShardRows, rows_in_whole
from ds_lowrank.distributed.zero_layout import Piece, owned_rows
from ds_lowrank.jobs.convert_checkpoint import main as convert
from ds_lowrank.optim.placements.zero import cut_for_piece

WORKER = os.path.join(os.path.dirname(__file__), "dist", "tp_zero_checkpoint_worker.py")
# saved at TP 2 × DP 2 in global mode (ZeRO stage last), and a local-mode control
GLOBAL = ["ldadam:2", "galore:2", "adapprox:2", "ldadam:1", "ldadam:3"]
LOCAL = "local:adapprox:2"
RESUMES = ([f"resume:{case}:2" for case in GLOBAL] + ["resume:ldadam:2:3", "resume:ldadam:2:0", "fresh:ldadam:2:2",
                                                      f"resume:{LOCAL}:2", "fromadam:ldadam:2", "dsadam:ldadam:2",
                                                      "aslocal:ldadam:2:2"])


def folder(tmp, case):
    return tmp / case.replace(":", "-")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tpzero")
    saved = torchrun(4, WORKER, tmp / "save.json", tmp, 2, *(f"save:{case}" for case in GLOBAL + [LOCAL]))
    for case in GLOBAL + [LOCAL]:
        assert convert([str(folder(tmp, case) / "checkpoint"), str(folder(tmp, case) / "whole")]) == 0, case
    source = folder(tmp, "ldadam:2")
    assert convert([str(source / "checkpoint"), str(source / "adam"), "--to", "adam"]) == 0
    whole = load(source / "whole")
    adam = adam_states(whole)
    torch.save({n: {"fp32": w, **{k: adam[n][k].reshape(w.shape) for k in ("exp_avg", "exp_avg_sq")}}
                for n, w in whole.weights.items()}, source / "adam_expected.pt")
    return {"dir": tmp, "saved": saved, "tp1": torchrun(3, WORKER, tmp / "tp1.json", tmp, 1, *RESUMES),
            "tp2": torchrun(2, WORKER, tmp / "tp2.json", tmp, 2, *RESUMES)}


@pytest.mark.parametrize("case", GLOBAL)
def test_consolidated_state_is_the_whole_matrices_one_process_holds(runs, case):
    """TP 2 × DP 2 at ZeRO 1, 2 and 3 (a row-parallel shard's rows moved over the TP group, a row
    cut between DP ranks): every state tensor of every parameter as one process training the
    whole layers holds it after the same steps, and the weights as the ranks held them."""
    c = load(folder(runs["dir"], case) / "whole")
    ref = torch.load(folder(runs["dir"], case) / "reference.pt")
    assert c.tp_size == 2 and not c.shard_states and c.global_steps == 3
    for name, w in ref["at_save"].items():
        assert torch.equal(c.weights[name], w), name
    one = ref["one_process"]["states"]
    assert sorted(c.states) == sorted(one)
    for name, want in one.items():
        got = c.states[name]
        assert sorted(got) == sorted(want), name
        for key, v in want.items():
            assert got[key].shape == v.shape and got[key].dtype == v.dtype, (name, key)
            err = float((got[key].double() - v.double()).abs().max() / v.double().abs().max().clamp_min(1e-30))
            assert err < 1e-5, (name, key, err)


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_resumes_at_another_tp_and_dp_size_as_the_uninterrupted_run(runs, layout):
    """TP 1 × DP 3 and TP 2 × DP 1 (ZeRO 2; the LDAdam checkpoint also at ZeRO 3 and 0): within
    1e-6 of the run that went on at TP 2 × DP 2, where the same run without its optimizer state
    is not."""
    r = runs[layout]
    for command in RESUMES:
        if command.startswith("resume:") and LOCAL not in command:
            assert r[command]["rel_err"] < 1e-6 and r[command]["moved"] > 1e-2, (command, r[command])
            assert r[command]["global_steps"] == 3, (command, r[command])
    assert r["fresh:ldadam:2:2"]["rel_err"] > 1e-2, r["fresh:ldadam:2:2"]


def test_local_mode_keeps_its_tp_size_rule(runs):
    """The local-mode Adapprox checkpoint: at its own TP size (2) every shard takes back its own
    state; at TP 1 it is refused, naming the ways out."""
    assert runs["tp2"][f"resume:{LOCAL}:2"]["rel_err"] < 1e-6, runs["tp2"]
    refused = runs["tp1"][f"resume:{LOCAL}:2"]["refused"]
    assert re.search(r"Adapprox's state of layers\.\d\.weight: .* resume at the saved size \(2\), or train with "
                     r"tensor_parallel='global'", refused), refused


def test_a_checkpoint_resumed_in_the_other_mode_is_refused(runs):
    """A global-mode checkpoint resumed by a run in "local" mode (at its own TP size, where the
    shapes would fit): refused, naming the ways out, rather than read as each shard's own state."""
    refused = runs["tp2"]["aslocal:ldadam:2:2"]["refused"]
    assert re.search(r"layers\.\d\.weight was saved with tensor_parallel='global', but this run steps it with "
                     r"'local': resume with tensor_parallel='global', or start 'local' from the momentum "
                     r"\(tools/convert_checkpoint.py --to adam\)", refused), refused


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_round_trip_through_deepspeeds_adam(runs, layout):
    """``--to adam`` of the TP 2 × DP 2 ZeRO 2 checkpoint: DeepSpeed's AdamW loads each shard's part
    of the whole weights and moments to the bit; LDAdam in global mode under ZeRO 2 started from
    it equals one process started from the same Adam state."""
    r = runs[layout]
    assert r["dsadam:ldadam:2"]["max_err"] == 0.0, r["dsadam:ldadam:2"]
    assert r["fromadam:ldadam:2"]["rel_err"] < 1e-5 and r["fromadam:ldadam:2"]["moved"] > 1e-2, r


def test_whole_rows_cut_for_pieces_merge_back():
    """The geometry alone: a whole matrix's LDAdam state cut for the pieces of 2 TP × 2 DP ranks
    (a column-parallel and a row-parallel split, a row cut between DP ranks) as the placement
    cuts it, and merged back; a missing piece is named."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 6))
    opt = LDAdam([{"params": [w], "within_adamw": False}], rank=2)
    for _ in range(2):
        w.grad = torch.randn(8, 6)
        opt.step()
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    whole = opt.state[w]
    for dim in (0, 1):
        shard = (8 // 2, 6) if dim == 0 else (8, 6 // 2)
        numel = shard[0] * shard[1]
        parts = []
        for t in range(2):
            for start, stop in ((0, numel // 2 + 1), (numel // 2 + 1, numel)):       # a cut row
                owned = owned_rows(Piece("w", shard, start, stop, 0, -1), shard[1])
                first, count = rows_in_whole(dim, shard[0], owned.first, owned.count, t, 2)
                rows = ShardRows((8, 6), dim, first, count, (), ())
                state = cut_for_piece(LDAdam, group, Piece("w", shard, start, stop, 0, -1), whole, "cpu", rows)
                parts.append((first, count, state))
        merged = merge_rows(LDAdam, group, "w", (8, 6), parts)
        assert sorted(merged) == sorted(whole)
        for key, v in whole.items():
            assert torch.equal(merged[key], v), (dim, key)
        with pytest.raises(CheckpointError, match=r"w: no rank holds the state of its rows \d+:\d+; pass every"):
            merge_rows(LDAdam, group, "w", (8, 6), [p for p in parts if p[0] or not p[1]])
