"""PyTorch FSDP2 (``fully_shard``): every optimizer equals one process, HSDP, bf16 mixed precision,
DCP checkpoints saved at 2 ranks and loaded at 2, 3 and 1, and torch's AdamW <-> LDAdam/GaLore
(real torchrun launches over gloo, tests/dist/fsdp2_worker.py)."""

import os

import pytest
import torch

from ds_lowrank import GaLoreAdamW, LDAdam, MicroAdam
from ds_lowrank.checkpoint.torch_adamw import from_adamw, to_adamw
from ds_lowrank.checkpoint.universal import Consolidated, adam_states
from helpers import assert_same_state, mlp_batches, tiny_mlp, train
from helpers import torchrun

WORKER = os.path.join(os.path.dirname(__file__), "dist", "fsdp2_worker.py")
CHECKS = {2: ["equal", "hsdp", "hsdp_save", "bf16", "save", "adam", "refuse"], 3: ["equal", "allocated", "load"],
          1: ["load"]}
PROJECTION = ("ldadam", "ldadam_int4", "ldadam_svd", "galore", "galore_randomized", "adapprox")


def launch(world: int, root) -> dict:
    return torchrun(world, WORKER, root / f"result{world}.json", root / "checkpoints", *CHECKS[world])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp2")


@pytest.fixture(scope="module")
def run2(root):
    return launch(2, root)


@pytest.fixture(scope="module")
def run3(root, run2):           # loads the checkpoints the 2-rank launch saved
    return launch(3, root)


@pytest.fixture(scope="module")
def run1(root, run2):
    return launch(1, root)


@pytest.mark.parametrize("world", [2, 3])
def test_every_optimizer_equals_one_process(world, request):
    """Rows 10, 7, 2, 11 (none divides by 2 or 3; at 3 ranks one holds none of the head), biases
    and a norm: the projection methods sum over the holders, MicroAdam exchanges cut blocks."""
    run = request.getfixturevalue(f"run{world}")
    assert run["world"] == world
    for name in (*PROJECTION, "microadam"):
        r = run[f"equal:{name}"]
        assert r["rel_err"] < 1e-5 and r["skipped"] == 0, (name, r)
        if name == "microadam":
            assert r["exchange"] > 0 and r["reduce"] == 0, r
        else:
            assert r["reduce"] > 0, (name, r)
    assert (0 in run["equal:ldadam"]["head_rows"]) == (world == 3)


@pytest.mark.parametrize("world", [2, 3])
def test_memory_estimate_is_each_ranks_state(world, request):
    """``ds_lowrank.memory.estimate_fsdp2`` gives every rank's state bytes, to the byte, from the
    shapes alone: rows held, column blocks where every rank holds rows (whole where, at 3 ranks,
    one holds none of the head), MicroAdam's blocks as ZeRO pieces."""
    run = request.getfixturevalue(f"run{world}")
    for name in (*PROJECTION, "microadam"):
        r = run[f"equal:{name}"]
        assert r["state_estimated"] == r["state_per_rank"], (name, r)


@pytest.mark.parametrize("world", [2, 3])
def test_state_layout_walks_what_state_bytes_counts_and_the_estimate_lays_out(world, request):
    """``optim.state_layout`` reads FSDP2 state (DTensors' local parts, MicroAdam's owned blocks):
    per rank, what it walks by parameter and state key is what ``state_bytes`` counts, category
    by category, and what ``memory.fsdp2_state`` lays out from the shapes alone, key by key."""
    run = request.getfixturevalue(f"run{world}")
    for name in (*PROJECTION, "microadam"):
        lay = run[f"layout:{name}"]
        for rank, (held, counted, estimated) in enumerate(zip(lay["held"], lay["state_bytes"], lay["estimated"])):
            assert {lk: n for lk, n in held.items() if n} == {lk: n for lk, n in estimated.items() if n}, \
                (name, rank)
            walked: dict = {}
            for label_key, n in held.items():
                c = lay["categories"][label_key.rsplit("|", 1)[1]]
                walked[c] = walked.get(c, 0) + n
            assert {c: n for c, n in counted.items() if n and c != "total"} == {c: n for c, n in walked.items() if n}, \
                (name, rank)


SHAPES = {"up.weight": (10, 12), "mid.weight": (7, 10), "head.weight": (2, 7), "back.weight": (11, 2)}


def _chunk_sizes(n: int, world: int) -> list[int]:
    """The columns of each rank under ``Shard(1)``: torch.chunk's split, ranks past the last chunk none."""
    sizes = [len(c) for c in torch.arange(n).chunk(world)]
    return sizes + [0] * (world - len(sizes))


@pytest.mark.parametrize("world", [2, 3])
def test_state_along_the_columns_is_kept_in_column_blocks(world, request):
    """LDAdam's and GaLore's ``r × n`` state (a left projection's moments, a right one's basis)
    is a DTensor ``Shard(1)``, Adapprox's ``n × K`` column factor a DTensor ``Shard(0)``: each
    rank holds torch.chunk's block of the ``n`` columns, the blocks add up to the whole, which
    equals one process's state, as does the rest of Adapprox's. Where a rank of the mesh holds
    no rows of the matrix (the head at 3 ranks) it stays whole on every rank. The rest of the
    state is split by rows (each element held once) or is a counter."""
    run = request.getfixturevalue(f"run{world}")
    # the axis along the columns, and how many tensors are kept in blocks (2 ranks, 3 ranks):
    # LDAdam's and GaLore's moments of up, mid and head (left projections) and the basis of back
    # (right); Adapprox's column factor of every matrix
    kept = {"ldadam": (1, 7, 5), "galore": (1, 7, 5), "adapprox": (0, 4, 3)}
    for name, (dim, at2, at3) in kept.items():
        in_blocks = 0
        for key, s in run[f"state:{name}"].items():
            param = key.split(":")[0]
            # (LDAdam's error feedback of a full-rank matrix is rounding noise: not compared)
            assert s["rel_err"] < 1e-5 or (s["by_columns"] is None and name != "adapprox"), (name, key, s)
            if s["by_columns"] is None:
                assert s["placements"] == "(Shard(dim=0),)" and sum(s["held"]) == s["numel"], (name, key, s)
                continue
            assert s["by_columns"] == dim, (name, key, s)
            if world == 3 and param == "head.weight":
                assert s["placements"] == "(Replicate(),)" and s["held"] == [s["numel"]] * world, (name, key, s)
                continue
            n = SHAPES[param][1]
            assert s["numel"] == 2 * n                                  # rank 2, rank_max 2
            assert s["placements"] == f"(Shard(dim={dim}),)", (name, key, s)
            assert s["held"] == [2 * c for c in _chunk_sizes(n, world)], (name, key, s)
            in_blocks += 1
        assert in_blocks == (at2 if world == 2 else at3), (name, in_blocks)


@pytest.mark.parametrize("world", [2, 3])
def test_microadam_state_is_saved_in_the_whole_parameters_coordinates(world, request):
    """MicroAdam keeps the state of the blocks each rank owns; ``get_optimizer_state_dict`` hands it
    out as DTensors of the tensors one process holds (window, codes, bucket statistics), each rank
    torch.chunk's block along the blocks' axis, and leaves the state the step uses as it was."""
    run = request.getfixturevalue(f"run{world}")
    saved = run["state:microadam"]
    assert saved.pop("unchanged") is True
    kinds = {}
    for key, s in saved.items():
        name = key.split(":")[1]
        kinds.setdefault(name, set()).add(s["kind"])
        if s["kind"] != "DTensor":
            assert s["equal"], (key, s)                          # the step counter and the layout
            continue
        dim = 1 if name.startswith("window") else 0
        assert s["placements"] == f"(Shard(dim={dim}),)" and s["shape"] == s["one_shape"], (key, s)
        rows = s["shape"][0] if dim else 1
        assert s["held"] == [rows * c for c in _chunk_sizes(s["shape"][dim], world)], (key, s)
        if name in ("window_indices", "error"):                  # indices and 4-bit codes: exact
            assert s["equal"] == 1.0, (key, s)
        else:
            assert s["rel_err"] < 1e-5, (key, s)
    assert kinds == {"step": {"Tensor"}, "layout": {"Tensor"}, "window_indices": {"DTensor"},
                     "window_values": {"DTensor"}, "error": {"DTensor"}, "error_min": {"DTensor"},
                     "error_max": {"DTensor"}}, kinds


def test_state_created_before_the_first_step_changes_nothing(run3):
    """``get_optimizer_state_dict`` on a fresh optimizer creates its state (a zero-gradient step,
    skipped); the run from that zero state equals one process (3 ranks: one holds no head rows)."""
    for name in ("ldadam_int4", "galore", "adapprox", "microadam"):
        r = run3[f"allocated:{name}"]
        assert r["allocated"] > 0 and r["rel_err"] < 1e-5, (name, r)


def test_hsdp_equals_one_process(run2):
    """A 2-D mesh: one replica of two shards, and two replicas of one."""
    for mesh in ("1x2", "2x1"):
        for name in ("ldadam", "adapprox", "microadam"):
            assert run2[f"hsdp:{mesh}:{name}"] < 1e-5, (mesh, name)
    # LDAdam's r × n state in column blocks within a replica; whole with one shard per replica
    assert run2["hsdp:1x2:placements"] == ["(Replicate(), Shard(dim=1))"]
    assert run2["hsdp:2x1:placements"] == ["(Replicate(), Replicate())"]


def test_microadam_dcp_checkpoint_on_hsdp_resumes_exactly(run2):
    """On a 2-D mesh its state goes out replicated over the replicas and in chunks over the shards."""
    for mesh in ("1x2", "2x1"):
        r = run2[f"hsdp_save:{mesh}"]
        assert r["rel_err"] == 0.0, (mesh, r)
        assert r["placements"] == ["(Replicate(), Shard(dim=0))", "(Replicate(), Shard(dim=1))"], (mesh, r)


def test_bf16_mixed_precision_stays_close_to_fp32(run2):
    """MixedPrecisionPolicy(param_dtype=bf16): the sharded parameters (and the optimizer's state)
    stay fp32, the loss falls, and 20 steps stay within 5% of the fp32 run."""
    r = run2["bf16"]
    assert r["dtypes"] == ["torch.float32"]
    assert r["last"] < 0.9 * r["first"], r
    assert 0 < r["rel_err"] < 0.05, r


def test_dcp_checkpoint_resumes_exactly_at_the_same_size(run2):
    """State saved as DTensors (by rows, or replicated) and scalars; the resumed run starts from
    other weights, so the checkpoint restores both."""
    for name in ("ldadam", "ldadam_int4", "galore", "adapprox"):
        r = run2[f"save:{name}"]
        assert r["rel_err"] == 0.0 and r["dtensors"] == ["DTensor", "Tensor"], (name, r)
    # MicroAdam's DTensors are those it hands out; it steps on the blocks it owns, plain tensors
    assert run2["save:microadam"] == {"rel_err": 0.0, "dtensors": ["Tensor"]}


@pytest.mark.parametrize("world", [3, 1])
def test_dcp_checkpoint_saved_at_2_loads_at_another_size(world, request):
    run = request.getfixturevalue(f"run{world}")
    for name in ("ldadam", "ldadam_int4", "galore", "adapprox", "microadam"):
        r = run[f"load:{name}"]
        assert r["rel_err"] < 1e-5 and r["vs_one_process"] < 1e-5, (name, r)
        assert r["without_state"] > 1e-3, (name, r)          # the optimizer's state mattered


def test_adamw_checkpoint_starts_ldadam_and_galore_and_goes_back(run2):
    """torch AdamW's DCP checkpoint -> LDAdam/GaLore equals the same conversion in one process;
    LDAdam -> torch AdamW gives the one-process moments, and its DCP checkpoint resumes AdamW."""
    for name in ("ldadam", "galore"):
        r = run2[f"adam:{name}"]
        assert r["rel_err"] < 1e-5 and r["without_state"] > 1e-2, (name, r)
    r = run2["adam:ldadam"]
    assert r["to_adamw"] < 1e-5 and r["adamw_resumed"] == 0.0 and r["adamw_kind"] == "DTensor", r


def test_what_fsdp2_cannot_do_is_refused(run2):
    assert "Shard(dim=1)" in run2["refuse:columns"] and "ColwiseParallel / RowwiseParallel" in run2["refuse:columns"]
    assert "apply fully_shard to the root module" in run2["refuse:mixed"]
    msg = run2["refuse:microadam_settings"]
    assert "up.weight: the saved MicroAdam state 'window_indices' is of shape (3, 30)" in msg, msg
    assert "density 0.5" in msg and "load it with the settings it was saved with" in msg, msg


# -- the conversion on plain parameters (one process) -------------------------------------------


def _adamw_run():
    model = tiny_mlp()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    train(model, adamw, mlp_batches(3))
    return model, adamw


@pytest.mark.parametrize("make", [lambda ps: LDAdam(ps, rank=2), lambda ps: GaLoreAdamW(ps, rank=2)],
                         ids=["ldadam", "galore"])
def test_from_adamw_is_the_universal_conversion(make):
    model, adamw = _adamw_run()
    opt = make(list(model.named_parameters()))
    from_adamw(adamw, opt)
    ref = make(list(model.named_parameters()))
    names = {p: n for n, p in model.named_parameters()}
    ref.load_whole_state({names[p]: st for p, st in adamw.state.items()}, from_adam=True)
    params = list(model.parameters())
    assert_same_state({p: opt.state[p] for p in params}, {p: ref.state[p] for p in params})


def test_to_adamw_is_the_universal_conversion():
    model, adamw = _adamw_run()
    opt = LDAdam(list(model.named_parameters()), rank=2, lr=3e-3)
    train(model, opt, mlp_batches(2))
    back = to_adamw(opt)
    assert back.param_groups[0]["lr"] == 3e-3
    names = dict(model.named_parameters())
    c = Consolidated("LDAdam", [{k: v for k, v in opt.param_groups[0].items() if k != "params"}],
                     dict.fromkeys(names, 0), {n: p.detach() for n, p in names.items()},
                     {n: opt.state[p] for n, p in names.items()})
    for name, st in adam_states(c).items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(back.state[names[name]][key], st[key].view_as(names[name]))
    train(model, back, mlp_batches(1))                         # torch's AdamW steps on it


def test_an_optimizer_without_an_adam_counterpart_refuses_adamw_state():
    model, adamw = _adamw_run()
    with pytest.raises(ValueError, match="cannot start from Adam's state"):
        from_adamw(adamw, MicroAdam(list(model.named_parameters())))


def test_an_optimizer_without_an_adam_counterpart_refuses_to_become_adamw():
    from ds_lowrank import Adapprox

    model = tiny_mlp()
    opt = Adapprox(list(model.named_parameters()), rank_max=2)
    train(model, opt, mlp_batches(1))
    with pytest.raises(ValueError, match=r"Adapprox's state of 0\.weight: it has no counterpart in Adam's"):
        to_adamw(opt)
