"""Checkpoints consolidated per parameter and resumed at another world size and ZeRO stage.

The pieces' merge and cut are checked in this process on random partitions; the whole path
runs in three launches: 2 ranks at ZeRO-2 save half way through, tools/convert_checkpoint.py
consolidates, and 3 ranks (ZeRO-3, ZeRO-1) and 1 rank (stage 0) finish the run.
"""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from ds_lowrank import Adapprox, GaLoreAdamW, LDAdam, MicroAdam
from ds_lowrank.checkpoint import CheckpointError, Consolidated, consolidate, load, save
from ds_lowrank.checkpoint.universal import adam_states
from ds_lowrank.checkpoint.pieces import merge
from ds_lowrank.optim.placements.zero import cut_for_piece
from ds_lowrank.distributed.zero_layout import Piece
from helpers import make_adapprox, make_galore, make_ldadam, make_microadam, torchrun
from test_zero import WORKER

REPO = os.path.join(os.path.dirname(__file__), "..")
NAMES = ("ldadam", "galore", "adapprox", "microadam", "ldadam_int4")
# the same runs saved at ZeRO-3, where every matrix is split and LDAdam and GaLore keep their
# r × n state, Adapprox its column factor, in blocks of columns
ZERO3 = ("ldadam@zero3", "galore@zero3", "adapprox@zero3")


# --------------------------------------------------------------------------- merge and cut

def trained(make, **kw):
    """An optimizer with state, over a model with a tall, a wide matrix and vectors."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 40), torch.nn.Tanh(), torch.nn.Linear(40, 7))
    opt = make([{"params": list(model.named_parameters())}], **kw)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 12)).square().mean().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("make,kw", [(make_ldadam, {}), (make_ldadam, dict(proj_side="right")),
                                     (make_ldadam, dict(ef_dtype="int4", ef_bucket_size=4)),
                                     (make_ldadam, dict(ef_dtype="int8", ef_bucket_size=6, proj_side="right")),
                                     (make_galore, {}), (make_adapprox, {}),
                                     (make_microadam, dict(block_size=16, bucket_size=8, density=0.3))],
                         ids=["ldadam", "ldadam-right", "ldadam-int4", "ldadam-int8-right", "galore", "adapprox",
                              "microadam"])
def test_pieces_cut_anywhere_merge_back_to_the_whole_state(make, kw):
    model, opt = trained(make, **kw)
    group = opt.param_groups[0]
    rng = random.Random(0)
    for name, p in model.named_parameters():
        whole = opt.state[p]
        numel = p.numel()
        for world in (2, 3, 5):
            bounds = sorted(rng.sample(range(1, numel), world - 1))
            ranges = list(zip([0, *bounds], [*bounds, numel]))
            pieces = []
            for start, stop in ranges:
                q = Piece(name, tuple(p.shape), start, stop, 0, -1)
                st = cut_for_piece(type(opt), group, q, whole, torch.device("cpu"))
                st.update(range=torch.tensor([start, stop]), shape=torch.tensor(p.shape))
                pieces.append(st)
            rebuilt = merge(type(opt), group, name, tuple(p.shape), pieces[::-1])
            assert sorted(rebuilt) == sorted(whole), (name, world)
            for key in whole:
                assert rebuilt[key].dtype == whole[key].dtype and torch.equal(rebuilt[key], whole[key]), (name, key)


@pytest.mark.parametrize("side", ["left", "right"])
def test_pieces_with_their_block_kept_whole_still_merge_and_step(side):
    """Checkpoints written before ZeRO pieces kept a block of the r × n state (a left
    projection's moments, a right one's basis) have it whole in every piece: merged, each piece
    gives its block; resumed directly, a piece keeps its block of it."""
    from ds_lowrank.optim.matrix import Matrix
    model, opt = trained(make_ldadam, proj_side=side)
    group = opt.param_groups[0]
    name, p = "0.weight", model[0].weight                          # 40 × 12
    whole = opt.state[p]
    wide = ("proj_exp_avg", "proj_exp_avg_sq") if side == "left" else ("basis",)
    pieces = []
    for start, stop in ((0, 100), (100, 300), (300, 480)):
        st = cut_for_piece(type(opt), group, Piece(name, tuple(p.shape), start, stop, 0, -1), whole, torch.device("cpu"))
        assert all(st[key].shape[1] < whole[key].shape[1] for key in wide)      # a block of columns
        st.update({key: whole[key].clone() for key in wide}, range=torch.tensor([start, stop]),
                  shape=torch.tensor(p.shape))
        pieces.append(st)
    rebuilt = merge(type(opt), group, name, tuple(p.shape), pieces)
    for key in whole:
        assert torch.equal(rebuilt[key], whole[key]), key
    # the piece owning rows 9..24 (elements 100..300 of rows of 12), resumed as it was saved
    st = {k: v.clone() for k, v in pieces[1].items()}
    m = Matrix(name, p.detach()[9:25], p.detach()[9:25], st, tuple(p.shape), 9, (0, 1, 2), (), piece=True)
    opt._check_state(group, m)
    want = cut_for_piece(type(opt), group, Piece(name, tuple(p.shape), 100, 300, 0, -1), whole, torch.device("cpu"))
    for key in wide:
        assert torch.equal(st[key], want[key]), key


def test_adapprox_pieces_with_the_column_factor_whole_still_merge_and_step():
    """Checkpoints written before ZeRO pieces kept a block of Adapprox's n × K column factor have
    it whole in every piece: merged, each piece gives its block; resumed directly, a piece keeps
    its block of it (along the factor's dim 0, the weight's columns)."""
    from ds_lowrank.optim.matrix import Matrix
    model, opt = trained(make_adapprox)
    group = opt.param_groups[0]
    name, p = "0.weight", model[0].weight                          # 40 × 12
    whole = opt.state[p]
    key = "exp_avg_sq_col_factor"
    pieces = []
    for start, stop in ((0, 100), (100, 300), (300, 480)):
        st = cut_for_piece(type(opt), group, Piece(name, tuple(p.shape), start, stop, 0, -1), whole, torch.device("cpu"))
        assert st[key].shape[0] < whole[key].shape[0] == 12 and st[key].shape[1] == whole[key].shape[1]
        st.update({key: whole[key].clone()}, range=torch.tensor([start, stop]), shape=torch.tensor(p.shape))
        pieces.append(st)
    rebuilt = merge(type(opt), group, name, tuple(p.shape), pieces)
    for k in whole:
        assert torch.equal(rebuilt[k], whole[k]), k
    # the piece owning rows 9..24 (elements 100..300 of rows of 12), resumed as it was saved
    st = {k: v.clone() for k, v in pieces[1].items()}
    m = Matrix(name, p.detach()[9:25], p.detach()[9:25], st, tuple(p.shape), 9, (0, 1, 2), (), piece=True)
    opt._check_state(group, m)
    want = cut_for_piece(type(opt), group, Piece(name, tuple(p.shape), 100, 300, 0, -1), whole, torch.device("cpu"))
    assert torch.equal(st[key], want[key]) and st[key].shape[0] < 12


def test_missing_pieces_are_named():
    model, opt = trained(make_ldadam)
    name, p = next(iter(model.named_parameters()))
    q = Piece(name, tuple(p.shape), 0, 100, 0, -1)
    st = cut_for_piece(type(opt), opt.param_groups[0], q, opt.state[p], torch.device("cpu"))
    st.update(range=torch.tensor([0, 100]), shape=torch.tensor(p.shape))
    # elements 0:100 own rows 0-8 (row length 12), whose state is whole: 108 elements
    with pytest.raises(CheckpointError, match=rf"{name}: the ranks' pieces cover 108 of its 480 elements"):
        merge(type(opt), opt.param_groups[0], name, tuple(p.shape), [st])


# --------------------------------------------------------------------------- across world sizes

def launch(world, checks, out, tmp):
    return torchrun(world, WORKER, out, *checks, env={"RESHARD_DIR": str(tmp)})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Half of a 2-rank ZeRO-2 run saved by each optimizer (and one of DeepSpeed's AdamW), and
    of ZeRO-3 runs (``ZERO3``)."""
    tmp = tmp_path_factory.mktemp("reshard")
    launch(2, [f"save:2:{name}" for name in NAMES] + [f"save:3:{name}" for name in ZERO3] + ["saveadamw:2"],
           tmp / "save.json", tmp)
    return tmp


@pytest.fixture(scope="module")
def resumed(saved):
    """Each checkpoint consolidated (the command line for LDAdam), then resumed elsewhere."""
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"),
                           str(saved / "ldadam" / "checkpoint"), str(saved / "ldadam" / "whole")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "LDAdam at step 4" in proc.stdout
    for name in NAMES[1:] + ZERO3:
        save(consolidate(saved / name / "checkpoint"), saved / name / "whole")
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(saved / "adamw" / "t"), "--output_folder", str(saved / "universal"),
                           "--inject_missing_state"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    whole = load(saved / "ldadam" / "whole")
    adam = adam_states(whole)
    torch.save({n: {"fp32": w, **{k: adam[n][k].reshape(w.shape) for k in ("exp_avg", "exp_avg_sq")}}
                for n, w in whole.weights.items()}, saved / "adam_expected.pt")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"),
                           str(saved / "ldadam" / "checkpoint"), str(saved / "adam_universal"), "--to", "adam"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "for DeepSpeed's Adam" in proc.stdout, proc.stderr[-4000:]
    three = launch(3, ["reshard:3:ldadam", "reshard:3:galore", "reshard:1:adapprox", "reshard:3:microadam",
                       "reshard:2:ldadam_int4", "fromadam:3:ldadam", "fromadam:2:galore", "fromadam:3:ldadam_int4",
                       "toadam:3", "toadam:1", "reshard:3:ldadam@zero3", "reshard:2:galore@zero3",
                       "reshard:3:adapprox@zero3"],
                   saved / "three.json", saved)
    one = launch(1, [f"reshard:0:{name}" for name in NAMES + ZERO3] + ["fromadam:0:ldadam"], saved / "one.json",
                 saved)
    return {**{f"3 ranks {k}": v for k, v in three.items() if k != "world"},
            **{f"1 rank {k}": v for k, v in one.items() if k != "world"}}


def test_resumed_elsewhere_equals_the_uninterrupted_run(resumed):
    reshard = {name: r for name, r in resumed.items() if "reshard" in name}
    assert len(reshard) == 16
    for name, r in reshard.items():
        assert r["rel_err"] < 1e-5, (name, r)
        assert r["fresh_rel_err"] > 100 * max(r["rel_err"], 1e-7), (name, r)   # the state mattered
        assert r["global_steps"] == 8, (name, r)


def test_consolidated_layout(resumed, saved):
    whole = saved / "ldadam" / "whole"
    meta = json.loads((whole / "ds_lowrank.json").read_text())
    assert meta["optimizer"] == "LDAdam" and meta["global_steps"] == 4
    fp32 = torch.load(whole / "zero" / "2.weight" / "fp32.pt", weights_only=True)
    assert fp32["cat_dim"] == 0 and fp32["param"].shape == (13, 13)
    adam = torch.load(whole / "zero" / "0.bias" / "exp_avg.pt", weights_only=True)   # dense: AdamW's
    assert adam["param"].shape == (13,)
    error = torch.load(whole / "lowrank" / "2.weight" / "error.pt", weights_only=True)
    assert error.shape == (13, 13)
    # a 4-bit error feedback: each row's 13 codes in 7 bytes, 4 buckets of 4 elements per row
    compressed = {key: torch.load(saved / "ldadam_int4" / "whole" / "lowrank" / "2.weight" / f"{key}.pt",
                                  weights_only=True) for key in ("error", "error_min", "error_max", "error_layout")}
    assert compressed["error"].dtype == torch.uint8 and compressed["error"].shape == (13, 7)
    assert compressed["error_min"].dtype == torch.bfloat16 and compressed["error_max"].shape == (13, 4)
    assert compressed["error_layout"].tolist() == [4, 4, 13]
    # each file holds its own tensor, not the whole flat buffer it was a view of
    for universal in (whole, saved / "adam_universal" / "half"):
        small, big = (os.path.getsize(universal / "zero" / n / "fp32.pt") for n in ("0.bias", "2.weight"))
        assert small + 13 * 13 * 4 - 13 * 4 <= big + 64, (universal, small, big)


@pytest.mark.parametrize("name", ZERO3)
def test_zero3_checkpoint_consolidates_to_the_whole_state(resumed, saved, name):
    """The pieces of a ZeRO-3 checkpoint, whose r × n state each rank keeps a block of, merge
    into the state one process holds: that of the same run saved at ZeRO-2 (up to the order
    of the ranks' sums)."""
    got, want = load(saved / name / "whole"), load(saved / name.split("@")[0] / "whole")
    assert sorted(got.states) == sorted(want.states) and got.global_steps == want.global_steps == 4
    for label, state in want.states.items():
        assert sorted(got.states[label]) == sorted(state), label
        for key, value in state.items():
            other = got.states[label][key]
            assert other.shape == value.shape and other.dtype == value.dtype, (label, key)
            scale = float(value.double().abs().max()) or 1.0
            assert float((other.double() - value.double()).abs().max()) <= 1e-4 * scale, (label, key)


def test_bad_checkpoints_are_refused(saved, resumed, tmp_path):
    with pytest.raises(CheckpointError, match="not a ds_lowrank optimizer's.*ds_to_universal"):
        consolidate(saved / "adamw")
    with pytest.raises(CheckpointError, match="does not exist"):
        consolidate(saved / "ldadam" / "checkpoint", tag="nope")
    partial = tmp_path / "partial"
    shutil.copytree(saved / "ldadam" / "checkpoint", partial)
    os.remove(partial / "half" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match="pass every rank's optimizer file"):
        consolidate(partial)
    shutil.copy(partial / "half" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                partial / "half" / "zero_pp_rank_0_mp_rank_01_optim_states.pt")
    with pytest.raises(CheckpointError, match=r"written by 1 tensor-parallel .* files of mp_rank_01 are extra"):
        consolidate(partial)
    with pytest.raises(CheckpointError, match="exists"):
        save(consolidate(saved / "galore" / "checkpoint"), saved / "galore" / "whole")
    assert not (saved / "galore" / "whole.tmp").exists()


def test_ldadam_checkpoint_continues_as_deepspeed_adam(resumed):
    """LDAdam's checkpoint (2 ranks, ZeRO-2) written as a universal checkpoint of DeepSpeed's
    AdamW: DeepSpeed loads it at 3 ranks (ZeRO-3, ZeRO-1) to the bit and trains on."""
    runs = {name: r for name, r in resumed.items() if "toadam" in name}
    assert len(runs) == 2
    for name, r in runs.items():
        assert r["max_err"] == 0.0 and r["finite"] and r["global_steps"] == 4 + 3, (name, r)


def test_adam_checkpoint_starts_a_projection_optimizer_at_any_world_size(resumed):
    """DeepSpeed AdamW's universal checkpoint (2 ranks, ZeRO-2) starts LDAdam and GaLore at 3
    ranks (ZeRO-3, ZeRO-2) and in one process exactly as one process converting it does."""
    runs = {name: r for name, r in resumed.items() if "fromadam" in name}
    assert len(runs) == 4
    for name, r in runs.items():
        assert r["rel_err"] < 1e-5 and r["moved"] > 1e-3 and r["global_steps"] == 3 + r["steps"], (name, r)


# --------------------------------------------------------------------------- from Adam

def adam_trained(steps=5, betas=(0.9, 0.99)):
    """A model with a tall (right-projected) and a wide (left-projected) matrix after AdamW."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 40), torch.nn.Tanh(), torch.nn.Linear(40, 7))
    adam = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=betas)
    for _ in range(steps):
        adam.zero_grad()
        model(torch.randn(5, 12)).square().mean().backward()
        adam.step()
    states = {name: {k: v.clone() for k, v in adam.state[p].items()} for name, p in model.named_parameters()}
    return model, states


def groups(model, full_rank, **kw):
    """Each matrix in its own group, at rank 3 or at its full projected rank (compressed although
    that costs more than AdamW: within_adamw=False)."""
    named = dict(model.named_parameters())
    full = {"within_adamw": False}
    return [{"params": [("0.weight", named["0.weight"])], "rank": 12 if full_rank else 3, **full, **kw},
            {"params": [("2.weight", named["2.weight"])], "rank": 7 if full_rank else 3, **full, **kw},
            {"params": [(n, named[n]) for n in ("0.bias", "2.bias")], "compress": False}]


@pytest.mark.parametrize("cls", [LDAdam, GaLoreAdamW], ids=["ldadam", "galore"])
@pytest.mark.parametrize("full_rank", [False, True], ids=["rank3", "full"])
def test_adam_moments_carried_into_the_subspace(cls, full_rank):
    """P orthonormal, M = Pᵀm, V ≥ 0; LDAdam's error feedback holds exactly the momentum the
    subspace cannot (P·M + (1-β1)/β1·e = m); at full rank M holds all of it.  The dense
    parameters keep Adam's state as it is."""
    model, adam = adam_trained()
    opt = cls(groups(model, full_rank), betas=(0.9, 0.99))
    opt.load_whole_state(adam, from_adam=True)
    for gi, name in ((0, "0.weight"), (1, "2.weight")):
        p = dict(model.named_parameters())[name]
        st, m = opt.state[p], adam[name]["exp_avg"]
        right = opt.projects_right(opt.param_groups[gi], tuple(p.shape))
        P = st["basis"].mT if right else st["basis"]
        M = st["proj_exp_avg"].mT if right else st["proj_exp_avg"]
        back = (P @ M).mT if right else P @ M
        assert torch.allclose(P.mT @ P, torch.eye(P.shape[1]), atol=1e-5)
        assert (st["proj_exp_avg_sq"] >= 0).all() and int(st["step"]) == 5
        if cls is LDAdam:
            assert torch.allclose(back + st["error"] / 9.0, m, atol=1e-6)
        if full_rank:
            assert torch.allclose(back, m, atol=1e-6)
        else:
            assert not torch.allclose(back, m, atol=1e-4)      # rank 3 really drops momentum
    for name in ("0.bias", "2.bias"):
        p = dict(model.named_parameters())[name]
        assert all(torch.equal(opt.state[p][k], adam[name][k]) for k in adam[name])
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(5, 12)).square().mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("cls", [Adapprox, MicroAdam])
def test_optimizers_without_a_subspace_refuse_adam_state(cls):
    model, adam = adam_trained()
    opt = cls(list(model.named_parameters()))
    with pytest.raises(ValueError, match=rf"{cls.__name__} cannot start from Adam's state .*weights alone"):
        opt.load_whole_state(adam, from_adam=True)


def test_momentum_round_trips_through_ldadam_back_to_adam():
    """Adam → LDAdam (rank 3) → Adam gives Adam's momentum back (the error feedback kept the rest)
    and a non-negative second moment; the dense parameters' state comes back as it was."""
    model, adam = adam_trained()
    opt = LDAdam(groups(model, False), betas=(0.9, 0.99))
    opt.load_whole_state(adam, from_adam=True)
    named = dict(model.named_parameters())
    group_of = {label: gi for gi, g in enumerate(opt.param_groups) for label in g["param_names"]}
    c = Consolidated("LDAdam", [{k: v for k, v in g.items() if k not in ("params", "param_names")}
                                for g in opt.param_groups], group_of,
                     {n: p.detach() for n, p in named.items()}, {n: opt.state[p] for n, p in named.items()})
    back = adam_states(c)
    for name in named:
        assert torch.allclose(back[name]["exp_avg"], adam[name]["exp_avg"], atol=1e-6), name
        assert (back[name]["exp_avg_sq"] >= 0).all() and int(back[name]["step"]) == 5
    for name in ("0.bias", "2.bias"):
        assert torch.equal(back[name]["exp_avg_sq"], adam[name]["exp_avg_sq"])


@pytest.mark.parametrize("ef_dtype", ["int8", "int4"])
def test_adam_to_ldadam_with_a_compressed_error_feedback_and_back(ef_dtype):
    """Adam's lost momentum is written to the compressed buffer (codes and statistics by rows),
    and comes back to Adam within its quantization error."""
    model, adam = adam_trained()
    opt = LDAdam(groups(model, False, ef_dtype=ef_dtype, ef_bucket_size=4), betas=(0.9, 0.99))
    opt.load_whole_state(adam, from_adam=True)
    named = dict(model.named_parameters())
    for name in ("0.weight", "2.weight"):
        st, shape = opt.state[named[name]], named[name].shape
        bits = 8 if ef_dtype == "int8" else 4
        assert st["error"].dtype == torch.uint8 and st["error"].shape == (shape[0], -(-shape[1] * bits // 8))
        assert st["error_min"].shape == (shape[0], -(-shape[1] // 4))
        assert st["error_layout"].tolist() == [bits, 4, shape[1]]
    group_of = {label: gi for gi, g in enumerate(opt.param_groups) for label in g["param_names"]}
    c = Consolidated("LDAdam", [{k: v for k, v in g.items() if k not in ("params", "param_names")}
                                for g in opt.param_groups], group_of,
                     {n: p.detach() for n, p in named.items()}, {n: opt.state[p] for n, p in named.items()})
    back = adam_states(c)
    for name in ("0.weight", "2.weight"):
        m = adam[name]["exp_avg"]
        scale = (m.abs().amax() * 2 * 9 / (15 if ef_dtype == "int4" else 255)).item()   # (1-β1)/β1·e: u/2 of e
        err = (back[name]["exp_avg"] - m).abs().max().item()
        assert err <= scale / 9 + 1e-6 and err > 0, (name, err)
    # and the state steps on
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(5, 12)).square().mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(model.parameters(), before))


# --------------------------------------------------------------------------- tensor parallelism

TP_WORKER = os.path.join(os.path.dirname(__file__), "dist", "tp_checkpoint_worker.py")
TP_RESUMES = ["resume:global0:0", "resume:local0:0", "resume:local0:1", "fromadam:global0", "dsadam:global0"]


def tp_launch(world, tp, commands, out, tmp):
    return torchrun(world, TP_WORKER, out, tmp, tp, *commands)


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory):
    """A megatron-core model trained at TP 2 × DP 2 (tests/dist/tp_checkpoint_worker.py) and saved
    half way in "global" mode at ZeRO 0 and in "local" mode at ZeRO 0-3; each checkpoint
    consolidated by tools/convert_checkpoint.py (the global one also for DeepSpeed's Adam), then
    resumed at TP 1 × DP 3 and TP 2 × DP 1."""
    tmp = tmp_path_factory.mktemp("tp")
    cases = ["global0", "local0", "local1", "local2", "local3"]
    tp_launch(4, 2, [f"save:{case}" for case in cases], tmp / "save.json", tmp)
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    tool = os.path.join(REPO, "tools", "convert_checkpoint.py")
    for case, out, extra in [*((case, "whole", []) for case in cases), ("global0", "adam", ["--to", "adam"])]:
        proc = subprocess.run([sys.executable, tool, str(tmp / case / "checkpoint"), str(tmp / case / out), *extra],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "LDAdam at step 3: 4 parameters (186 elements), state of 4" in proc.stdout, proc.stdout
    whole = load(tmp / "global0" / "whole")
    adam = adam_states(whole)
    torch.save({n: {"fp32": w, **{k: adam[n][k].reshape(w.shape) for k in ("exp_avg", "exp_avg_sq")}}
                for n, w in whole.weights.items()}, tmp / "global0" / "adam_expected.pt")
    return {"dir": tmp, "tp1": tp_launch(3, 1, TP_RESUMES, tmp / "tp1.json", tmp),
            "tp2": tp_launch(2, 2, TP_RESUMES, tmp / "tp2.json", tmp)}


def test_tp_checkpoint_consolidates_to_the_whole_model_at_every_stage(tp_runs):
    """The TP ranks' files joined: the whole weights as the ranks held them, and at ZeRO 1, 2
    and 3 the same weights and per-shard state as at ZeRO 0 (the runs take the same steps)."""
    tmp = tp_runs["dir"]
    for mode in ("global", "local"):
        ref = torch.load(tmp / f"{mode}0" / "reference.pt")
        c = load(tmp / f"{mode}0" / "whole")
        assert c.tp_size == 2 and c.tensor_parallel == {"col.weight": [0, 1], "col.bias": [0, 1], "row.weight": [1, 1]}
        for name, w in ref["at_save"].items():
            assert torch.equal(c.weights[name], w), name
    assert sorted(c.shard_states) == ["col.weight", "row.weight"] and sorted(c.states) == ["col.bias", "row.bias"]
    base = load(tmp / "local0" / "whole")
    for stage in (1, 2, 3):
        c = load(tmp / f"local{stage}" / "whole")
        for name, w in base.weights.items():
            assert torch.allclose(c.weights[name], w, atol=1e-6), (stage, name)
        for name, shards in base.shard_states.items():
            for a, b in zip(c.shard_states[name], shards):
                assert a.keys() == b.keys()
                for key in a:
                    assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), (stage, name, key)


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_global_mode_resumes_at_another_tp_and_dp_size_as_the_uninterrupted_run(tp_runs, layout):
    r = tp_runs[layout]["resume:global0:0"]
    assert r["momentum_err"] < 1e-6 * r["momentum_size"] and r["global_steps"] == 3, r
    assert r["rel_err"] < 1e-6 and r["moved"] > 1e-2, r


def test_local_mode_at_its_own_tp_size_resumes_exactly(tp_runs):
    """TP 2 × DP 1 (ZeRO 0 and 1): every shard takes back its own state."""
    for command in ("resume:local0:0", "resume:local0:1"):
        r = tp_runs["tp2"][command]
        assert r["rel_err"] < 1e-6 and r["moved"] > 1e-2, (command, r)


def test_local_mode_at_another_tp_size_keeps_the_momentum_and_takes_new_subspaces(tp_runs):
    """TP 1 × DP 3: weights and the dense AdamW state exact; each matrix starts with the momentum
    its old shards held (projected moments and error feedback), in a subspace of its own, so the
    run goes on, but not as the TP 2 run did; ZeRO 1 starts as ZeRO 0 does."""
    tmp = tp_runs["dir"]
    r = tp_runs["tp1"]["resume:local0:0"]
    assert r["momentum_err"] < 1e-6 * r["momentum_size"], r
    assert r["rel_err"] > 1e-3 and r["moved"] > 1e-2 and r["losses"][-1] < r["losses"][0], r
    c = load(tmp / "local0" / "whole")
    start = torch.load(tmp / "local0" / "start_tp1.pt")
    for name in ("col.bias", "row.bias"):
        assert torch.equal(start[name]["exp_avg_sq"], c.states[name]["exp_avg_sq"]), name
    zero0, zero1 = (torch.load(tmp / "local0" / f"end_tp1_zero{s}.pt") for s in (0, 1))
    for name, w in zero0.items():
        assert torch.allclose(zero1[name], w, atol=1e-6), name


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_tp_checkpoint_round_trips_through_deepspeeds_adam(tp_runs, layout):
    """``--to adam``: DeepSpeed's AdamW loads each shard's part of the whole weights and moments
    to the bit, and LDAdam started from it holds the momentum it was saved with."""
    r = tp_runs[layout]
    assert r["dsadam:global0"]["max_err"] == 0.0 and r["dsadam:global0"]["finite"], r
    assert r["fromadam:global0"]["momentum_err"] < 1e-6 and r["fromadam:global0"]["finite"], r


def test_bad_tp_checkpoints_are_refused_and_nothing_is_written(tp_runs, tmp_path):
    from ds_lowrank.jobs.convert_checkpoint import main
    tmp = tp_runs["dir"]
    zero0 = tmp_path / "zero0"
    shutil.copytree(tmp / "local0" / "checkpoint", zero0)
    os.remove(zero0 / "half" / "mp_rank_01_model_states.pt")
    with pytest.raises(CheckpointError, match=r"written by 2 tensor-parallel .* files of mp_rank_01 are missing"):
        consolidate(zero0)
    zero1 = tmp_path / "zero1"
    shutil.copytree(tmp / "local1" / "checkpoint", zero1)
    os.remove(zero1 / "half" / "zero_pp_rank_1_mp_rank_01_optim_states.pt")
    with pytest.raises(CheckpointError, match=r"of mp_rank_01 it holds the optimizer files of data-parallel ranks "
                                              r"\[0\], of 2: pass every rank's optimizer file"):
        consolidate(zero1)
    assert main([str(zero1), str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_a_tp_size_that_does_not_divide_a_parameter_is_refused():
    from ds_lowrank.checkpoint.tensor_parallel import shard_of
    with pytest.raises(CheckpointError, match=r"qkv.weight: its dimension 0 has 24 entries .* do not split into 5 "
                                              r"tensor-parallel shards: .* dividing 24 .*number of heads"):
        shard_of(torch.zeros(24, 8), "qkv.weight", 0, 1, 0, 5)
    with pytest.raises(CheckpointError, match=r"into 4 tensor-parallel shards × 2 blocks"):
        shard_of(torch.zeros(12, 8), "fc1.weight", 0, 2, 0, 4)


def test_shards_are_cut_and_joined_as_megatron_cuts_them():
    """Against megatron-core's own CPU initialization, with a SwiGLU-like stride of 2."""
    from megatron.core.tensor_parallel import layers
    from ds_lowrank.checkpoint.tensor_parallel import shard_of, whole_of
    whole = torch.randn(24, 5)
    for dim, stride in ((0, 2), (1, 1)):
        w = whole if dim == 0 else whole.T.contiguous()
        shards = []
        for t in range(3):
            size = w.shape[dim] // 3
            shard = torch.empty((size, w.shape[1]) if dim == 0 else (w.shape[0], size))
            layers._initialize_affine_weight_cpu(shard, w.shape[0], w.shape[1], size, dim, lambda x: x.copy_(w),
                                                 stride=stride, rank=t, world_size=3)
            assert torch.equal(shard, shard_of(w, "w", dim, stride, t, 3)), (dim, stride, t)
            shards.append(shard)
        assert torch.equal(whole_of(shards, dim, stride), w)


@pytest.mark.parametrize("make,kw", [(make_ldadam, {}), (make_ldadam, dict(proj_side="right")), (make_galore, {}),
                                     (make_adapprox, {})], ids=["ldadam", "ldadam-right", "galore", "adapprox"])
def test_a_global_state_cut_for_tp_ranks_joins_back(make, kw):
    """Cut for 2 TP ranks along either axis (what each rank keeps, ``state_shapes``) and joined:
    the whole state, each rank's part shaped as the optimizer allocates it for its shard."""
    from ds_lowrank.checkpoint.tensor_parallel import cut_state, join_state
    model, opt = trained(make, **kw)
    group = {**opt.param_groups[0], "tensor_parallel": "global"}
    cls = type(opt)
    for name, p in model.named_parameters():
        if p.dim() != 2:
            continue
        whole = opt.state[p]
        for dim in (0, 1):
            if p.shape[dim] % 2:
                continue
            parts = [cut_state(cls, group, name, tuple(p.shape), dim, 1, t, 2, whole) for t in range(2)]
            shard = list(p.shape)
            shard[dim] //= 2
            for key, (size, _) in cls.state_shapes(group, tuple(p.shape), tuple(shard)).items():
                assert tuple(parts[0][key].shape) == tuple(size), (name, dim, key)
            joined, per_rank = join_state(cls, group, name, tuple(p.shape), dim, 1, parts)
            assert per_rank is None and sorted(joined) == sorted(whole), (name, dim)
            for key in whole:
                assert torch.equal(joined[key], whole[key]), (name, dim, key)


def test_local_shards_without_a_momentum_keep_their_tp_size():
    """Adapprox's "local" shards have no Adam counterpart to carry to other shards: refused, naming
    the ways out."""
    model, opt = trained(make_adapprox)
    p = model[0].weight                                    # 40 × 12, as if two TP shards of 80 × 12
    group = {k: v for k, v in opt.param_groups[0].items() if k not in ("params", "param_names")}
    c = Consolidated("Adapprox", [group], {"w": 0}, {"w": torch.cat([p.detach()] * 2)}, {},
                     tensor_parallel={"w": [0, 1]}, tp_size=2, shard_states={"w": [opt.state[p]] * 2})
    with pytest.raises(CheckpointError, match=r"Adapprox's state of w: .* resume at the saved size \(2\), or train "
                                              r"with tensor_parallel='global'"):
        adam_states(c)
