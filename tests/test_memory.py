"""Memory: no optimizer's state exceeds AdamW's for any parameter, and the estimator
(``ds_lowrank.memory``, ``tools/estimate_memory.py``) gives the bytes real optimizers hold.

AdamW's bytes are counted as torch's AdamW keeps them for an fp32 (master) parameter: two
float32 moments, 8 bytes per element, and a float32 step counter, 4 bytes per tensor
(``adamw_state_shapes``).  Every optimizer's counters (steps, Adapprox's rank, MicroAdam's
layout) are counted in its total.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from ds_lowrank import Adapprox, GaLoreAdamW, LDAdam, MicroAdam, lowrank_param_groups, memory
from ds_lowrank.optim.base import CATEGORIES
from ds_lowrank.optim.dense_adamw import adamw_state_shapes, shapes_bytes
from ds_lowrank.training.models import build_model, load_preset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import estimate_memory  # noqa: E402

SHAPES = [(96, 24), (24, 96), (32, 32), (64, 256), (256, 64), (1, 64), (64, 1), (1, 1), (2, 2), (2, 3),
          (3, 5), (5, 3), (8, 8), (64,), (3,)]

SETTINGS = [
    (LDAdam, {}), (LDAdam, dict(rank=4)), (LDAdam, dict(rank=4, ef_dtype="bfloat16")),
    (LDAdam, dict(rank=24)), (LDAdam, dict(rank=24, ef_dtype="bfloat16")),
    (LDAdam, dict(rank=64, ef_dtype="bfloat16")), (LDAdam, dict(rank=8, error_feedback=False)),
    (LDAdam, dict(rank=2, proj_side="right")),
    (GaLoreAdamW, dict(rank=4)), (GaLoreAdamW, dict(rank=24)), (GaLoreAdamW, dict(rank=64)),
    (Adapprox, {}), (Adapprox, dict(rank_max=4)), (Adapprox, dict(betas=(0.0, 0.999))),
    (Adapprox, dict(rank_max=1, rank_init=1)),
    (MicroAdam, {}), (MicroAdam, dict(window=4, density=0.25, block_size=16, bucket_size=8)),
    (MicroAdam, dict(density=1.0, value_dtype="float32")),
]


def adamw_bytes(shape) -> int:
    return shapes_bytes(adamw_state_shapes(tuple(shape)))


def stepped(cls, kw, params, steps=2, seed=0):
    opt = cls(params, **kw)
    gen = torch.Generator().manual_seed(seed)
    plist = [p for g in opt.param_groups for p in g["params"]]
    for _ in range(steps):
        for p in plist:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt


@pytest.mark.parametrize("cls,kw", SETTINGS, ids=lambda x: x.__name__ if isinstance(x, type) else str(x))
def test_no_parameter_costs_more_than_adamw(cls, kw):
    """Tall, wide, square, row and column vectors, tiny matrices, ranks up to and beyond the
    smaller side: each parameter's state is at most AdamW's, and exactly what its optimizer's
    ``param_state_shapes`` says.  A rank a matrix cannot have is refused with the reason."""
    for shape in SHAPES:
        p = torch.nn.Parameter(torch.randn(shape))
        try:
            opt = stepped(cls, kw, [("w", p)])
        except ValueError as err:
            assert "w" in str(err) and "lower the rank" in str(err), (shape, err)
            group = cls([torch.nn.Parameter(torch.zeros(1))], **kw).param_groups[0]
            assert cls._refuses_shape(group, shape) and group["rank"] > min(shape)
            continue
        total = opt.state_bytes()["total"]
        assert total <= adamw_bytes(shape), (shape, total, adamw_bytes(shape))
        group = opt.param_groups[0]
        assert total == shapes_bytes(cls.param_state_shapes(group, shape)), shape


def test_shapes_that_cost_more_than_adamw_without_the_cap():
    """Where the cap bites (bytes per parameter against AdamW's 8): Adapprox's default on
    64 × 256 (9.0 before), LDAdam at a rank close to the smaller side, MicroAdam's window on a
    tiny tensor; ``within_adamw=False`` keeps the old layouts."""
    def per_param(cls, kw, shape, within):
        p = torch.nn.Parameter(torch.randn(shape))
        opt = stepped(cls, kw, [{"params": [p], "within_adamw": within}])
        return opt.state_bytes()["total"] / p.numel()

    assert per_param(Adapprox, {}, (64, 256), False) == pytest.approx(9.0, abs=1e-3)
    assert per_param(Adapprox, {}, (64, 256), True) < 8
    assert per_param(LDAdam, dict(rank=64), (64, 256), False) == pytest.approx(13.0, abs=1e-3)
    assert per_param(LDAdam, dict(rank=64), (64, 256), True) == pytest.approx(8.0, abs=1e-3)
    assert per_param(GaLoreAdamW, dict(rank=64), (256, 64), False) == pytest.approx(9.0, abs=1e-3)
    assert per_param(MicroAdam, {}, (2, 3), False) > 13
    assert per_param(MicroAdam, {}, (2, 3), True) <= adamw_bytes((2, 3)) / 6


def test_ldadam_and_galore_keep_dense_only_what_would_exceed_adamw():
    """The line is the byte count: LDAdam's left projection of an m × n matrix with a float32
    error feedback fits while 4·(m·r + 2·r·n) + 4·m·n <= 8·m·n, i.e. r <= m·n/(m + 2n)."""
    group = dict(LDAdam([torch.nn.Parameter(torch.zeros(1))]).defaults, rank=1)
    for r in range(1, 25):
        fits = 4 * (24 * r + 2 * r * 96) + 4 * 24 * 96 <= 8 * 24 * 96
        assert LDAdam.is_compressed_shape(dict(group, rank=r), (24, 96)) == fits, r
    assert LDAdam.is_compressed_shape(dict(group, rank=10), (24, 96))
    assert not LDAdam.is_compressed_shape(dict(group, rank=11), (24, 96))
    assert LDAdam.is_compressed_shape(dict(group, rank=16, ef_dtype="bfloat16"), (24, 96))


# -- the estimator ---------------------------------------------------------------------------

ESTIMATED = [("adamw", {}), ("ldadam", dict(rank=8)), ("ldadam", dict(rank=8, ef_dtype="bfloat16")),
             ("ldadam", dict(rank=40)), ("galore", dict(rank=8)), ("adapprox", {}),
             ("adapprox", dict(betas=(0.0, 0.999))), ("microadam", {})]


@pytest.mark.parametrize("kind,opts", ESTIMATED, ids=str)
def test_estimate_equals_state_bytes_of_a_stepped_optimizer(kind, opts):
    """The tiny preset in one process: the estimate is what the optimizer holds after two
    steps, to the byte, category by category."""
    model = build_model(load_preset("tiny"), 8, seed=0)
    if kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), foreach=True)
    else:
        opt = memory.OPTIMIZERS[kind](lowrank_param_groups(model, **opts))
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    (est,) = memory.estimate("tiny", kind, zero=0, dp=1, **opts)
    if kind == "adamw":
        held = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values())
        assert est.state == held
        return
    real = opt.state_bytes()
    assert {c: est.state_by_category[c] for c in CATEGORIES} == {c: real[c] for c in CATEGORIES}
    assert est.state == real["total"]
    n = sum(p.numel() for p in model.parameters())
    assert (est.weights, est.gradients, est.master) == (2 * n, 2 * n, 4 * n)


@pytest.mark.parametrize("kind,opts", [("ldadam", dict(rank=8)), ("adapprox", {}), ("microadam", {})], ids=str)
def test_tensor_parallel_shards_are_matrices_of_their_own(kind, opts):
    """TP 2 divides the projections as Megatron does, and each shard's state is what the
    optimizer keeps for a matrix of the shard's shape."""
    params = {p.name: p for p in memory.model_params("tiny", tp=2)}
    whole = {p.name: p for p in memory.model_params("tiny")}
    layer = "model.layers.0."
    assert params[layer + "self_attn.q_proj.weight"].shape == (64, 128)
    assert params[layer + "self_attn.o_proj.weight"].shape == (128, 64)
    assert params[layer + "mlp.up_proj.weight"].shape == (172, 128)
    assert params[layer + "mlp.down_proj.weight"].shape == (128, 172)
    assert params["model.embed_tokens.weight"].shape == (2048, 128)
    assert params["lm_head.weight"].shape == (2048, 128)
    assert params["model.norm.weight"].shape == whole["model.norm.weight"].shape
    gen = torch.Generator().manual_seed(0)
    named = [(p.name, torch.nn.Parameter(torch.randn(p.shape, generator=gen))) for p in params.values()]
    groups = [{"params": [(n, t) for n, t in named if params[n].group == g], "compress": g == 0} for g in (0, 1)]
    opt = stepped(memory.OPTIMIZERS[kind], opts, [dict(g, **(opts if g["compress"] else {})) for g in groups])
    (est,) = memory.estimate("tiny", kind, zero=0, dp=1, tp=2, **opts)
    assert est.state == opt.state_bytes()["total"]


def test_zero_pieces_cover_every_parameter_once():
    params = memory.model_params("tiny")
    for stage in (1, 2, 3):
        for dp in (1, 3, 8):
            covered = {}
            for rank_pieces in memory.pieces(params, stage, dp):
                for q in rank_pieces:
                    covered.setdefault(q.label, []).append((q.start, q.stop))
            for p in params:
                spans = sorted(covered[p.name])
                assert spans[0][0] == 0 and spans[-1][1] == p.numel
                assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_zero_state_is_the_rows_plus_the_replicated_factors():
    """Summed over the ranks, the per-rank state is the one-process state plus, per matrix
    whose rows several ranks own, one copy of what does not split with the rows per extra
    owner.  What lies along the columns (LDAdam's and GaLore's r × n part, a left projection's
    moments or a right one's basis; Adapprox's n × K column factor) is kept in blocks of
    columns, so that copy is their counters: a 4-byte step, and Adapprox's 8-byte rank."""
    params = memory.model_params("tiny")
    dense = {p.name for p in params if p.group == 1}
    for kind, opts in (("ldadam", dict(rank=8)), ("galore", dict(rank=8)), ("adapprox", dict(rank_max=8))):
        (single,) = memory.estimate("tiny", kind, zero=0, dp=1, **opts)
        for stage, dp in ((2, 3), (3, 4)):
            ranks = memory.estimate("tiny", kind, zero=stage, dp=dp, **opts)
            summed = sum(m.state for m in ranks)
            extra = sum(m.replicated for m in ranks)
            # a dense parameter cut into k pieces keeps k step counters
            dense_pieces = sum(1 for rank_pieces in memory.pieces(params, stage, dp) for q in rank_pieces
                               if q.label in dense)
            owners_extra = summed - single.state - 4 * (dense_pieces - len(dense))
            assert 0 <= owners_extra <= extra, (kind, stage)
            split = sum(1 for rank_pieces in memory.pieces(params, stage, dp) for q in rank_pieces
                        if q.label not in dense and q.stop - q.start < math.prod(q.shape))
            counters = 4 + 8 * (kind == "adapprox")
            assert all(m.replicated <= counters * split for m in ranks), (kind, stage)
            if stage == 3:
                # every matrix split four ways: each rank a quarter of the compressed state
                for c in ("lowrank_moments", "bases", "error_feedback"):
                    assert max(m.state_by_category[c] for m in ranks) <= single.state_by_category[c] / dp * 1.02, c


@pytest.mark.parametrize("stage", [2, 3])
def test_ldadam_state_at_zero3_is_that_of_zero2(stage):
    """Llama-130M at rank 256 with a 4-bit error feedback on 2 GPUs: at most 0.70× AdamW's
    state per GPU at ZeRO-2 and at ZeRO-3, where nothing of size r × n is kept on both GPUs."""
    opts = dict(rank=256, ef_dtype="int4")
    ours = memory.worst(memory.estimate("130m", "ldadam", zero=stage, dp=2, **opts))
    adamw = memory.worst(memory.estimate("130m", "adamw", zero=stage, dp=2))
    assert ours.state <= 0.70 * adamw.state
    zero2 = memory.worst(memory.estimate("130m", "ldadam", zero=2, dp=2, **opts))
    assert ours.state <= zero2.state + ours.replicated
    assert ours.replicated < 2**12          # step counters, not moments or bases


# the four optimizers at the settings of the 130M runs: rank 256, defaults otherwise
AT_130M = (("ldadam", dict(rank=256)), ("galore", dict(rank=256)), ("adapprox", dict(rank_max=256)),
           ("microadam", {}))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_no_optimizer_keeps_more_state_per_rank_than_adamw(engine, world):
    """Llama-130M under ZeRO-3 (against DeepSpeed's cut of AdamW) and FSDP2 (against torch's
    AdamW on the DTensors): on every rank, each optimizer's state is at most AdamW's, because
    what lies along a split matrix's columns is kept in blocks, not whole on every rank."""
    def per_rank(kind, opts):
        if engine == "zero3":
            return memory.estimate("130m", kind, zero=3, dp=world, **opts)
        return memory.estimate_fsdp2("130m", kind, world, **opts)
    adamw = per_rank("adamw", {})
    for kind, opts in AT_130M:
        ours = per_rank(kind, opts)
        assert all(o.state <= a.state for o, a in zip(ours, adamw)), (kind, [o.state / a.state for o, a in
                                                                           zip(ours, adamw)])


def test_fsdp2_estimate_splits_what_one_process_holds():
    """Summed over the ranks of an FSDP2 mesh where every rank holds rows of every matrix, the
    state is one process's plus the counters each rank keeps (tests/test_fsdp2.py checks the
    estimate against real FSDP2 runs, to the byte)."""
    for kind, opts in AT_130M[:3]:
        (single,) = memory.estimate("130m", kind, **opts)
        for world in (2, 4):
            ranks = memory.estimate_fsdp2("130m", kind, world, **opts)
            extra = sum(m.state for m in ranks) - single.state
            assert 0 <= extra <= (world - 1) * 12 * len(memory.model_params("130m")), (kind, world, extra)


def test_estimate_memory_tool_prints_the_table(capsys, tmp_path):
    out = tmp_path / "est.json"
    r = estimate_memory.main(["--model", "tiny", "--optimizer", "ldadam", "--zero", "2", "--dp", "4",
                              "--rank", "8", "--ef", "bfloat16", "--json", str(out)])
    text = capsys.readouterr().out
    for label in ("weights (bf16)", "gradients (bf16)", "master weights (fp32)", "optimizer state", "total",
                  "AdamW", "LDAdam", "ratio"):
        assert label in text
    assert out.exists() and r["ours"]["state"] > 0 and r["adamw"]["state"] > 0
    assert r["ours"]["weights"] == r["adamw"]["weights"]
    # ZeRO-2: gradients and master partitioned, weights not
    n = r["params_per_tp_rank"]
    assert r["adamw"]["weights"] == 2 * n and r["adamw"]["master"] < 4 * n


@pytest.mark.parametrize("mode", ["local", "global"])
def test_estimate_memory_tool_on_fsdp2_with_tensor_parallelism(capsys, mode):
    """``--engine fsdp2 --tp N``: the worst rank of ``estimate_fsdp2`` on a ``(dp, tp)`` mesh in the
    chosen mode (tests/test_fsdp2_tp.py checks that against real ranks, to the byte); global mode
    keeps less than local mode, whose shards each keep a rank-``r`` subspace of their own."""
    r = estimate_memory.main(["--model", "tiny", "--engine", "fsdp2", "--dp", "2", "--tp", "2", "--rank", "8",
                              "--tensor_parallel", mode])
    text = capsys.readouterr().out
    assert "FSDP2, DP 2 x TP 2 = 4 GPUs" in text and f"tensor_parallel='{mode}'" in text
    assert "weights (fp32)" in text and "master weights" not in text
    params = memory.model_params("tiny")
    opts = {"rank": 8, **({"tensor_parallel": "global"} if mode == "global" else {})}
    want = memory.worst(memory.estimate_fsdp2("tiny", "ldadam", 4, params=params, tp=2, **opts))
    assert r["ours"]["state"] == want.state and r["ours"]["weights"] == want.weights
    assert r["ours"]["master"] == 0 and r["ours"]["gradients"] == r["ours"]["weights"]
    # tensor parallelism splits the projections: each rank holds about a quarter of the weights
    assert r["ours"]["weights"] < 4 * r["params"] / 2
    other = memory.worst(memory.estimate_fsdp2("tiny", "ldadam", 4, params=params, tp=2, rank=8,
                                               tensor_parallel="local" if mode == "global" else "global"))
    assert (want.state < other.state) == (mode == "global")


def test_estimate_memory_tool_refuses_what_its_engine_does_not_have():
    with pytest.raises(SystemExit, match="--zero is DeepSpeed's"):
        estimate_memory.main(["--model", "tiny", "--engine", "fsdp2", "--zero", "2", "--rank", "8"])
    with pytest.raises(SystemExit, match="use --engine fsdp2"):
        estimate_memory.main(["--model", "tiny", "--tp", "2", "--rank", "8", "--tensor_parallel", "global"])
    # a layout the optimizer itself refuses: its message, not a traceback
    with pytest.raises(SystemExit, match="MicroAdam with tensor_parallel='global'.*use tensor_parallel='local'"):
        estimate_memory.main(["--model", "tiny", "--engine", "fsdp2", "--dp", "2", "--tp", "2", "--optimizer",
                              "microadam", "--tensor_parallel", "global"])


def test_tensor_parallel_local_decides_within_adamw_on_the_whole_matrix():
    """In ``tensor_parallel="local"`` mode (Megatron's shards under DeepSpeed aside, where the
    shard is the parameter) a matrix FSDP2 and torch's tensor parallelism split is compressed or
    not by its whole shape, as the optimizer decides: a 768 × 768 projection at rank 256 fits
    within AdamW, its 384 × 768 TP shard compressed on its own would not, and is compressed."""
    group = memory.optimizer_groups("ldadam", rank=256)[0]
    assert LDAdam.is_compressed_shape(group, (768, 768)) and not LDAdam.is_compressed_shape(group, (384, 768))
    state = memory.fsdp2_tp_state(LDAdam, group, (768, 768), 0, 1, 2, 0, 0)
    assert "basis" in state and shapes_bytes(state) > shapes_bytes(adamw_state_shapes((384, 768)))


def test_within_adamw_from_a_deepspeed_config():
    """``within_adamw`` in the config's params goes to the compressed group (it is a group key)."""
    from ds_lowrank.integration.deepspeed_config import build_optimizer

    model = build_model(load_preset("tiny"), 8, seed=0)
    for value in (False, True):
        opt = build_optimizer(model, {"type": "LDAdam", "params": {"rank": 60, "within_adamw": value}})
        compressed = [g for g in opt.param_groups if g["compress"]][0]
        assert compressed["within_adamw"] is value
        q = next(p for n, p in model.named_parameters() if n.endswith("q_proj.weight"))   # 64 × 64
        assert LDAdam.is_compressed(compressed, q) is not value    # rank 60 costs more than AdamW there


def test_tensor_parallel_global_shards_decide_on_the_whole_matrix(monkeypatch):
    """In ``tensor_parallel="global"`` mode a shard is part of one matrix: it is kept dense when
    the whole matrix would cost more than AdamW compressed, whatever the shard's own shape (here
    a 3 × 24 shard of a 6 × 24 matrix at rank 4: the shard alone would be refused, rank 4 > 3)."""
    import torch.distributed as dist

    from ds_lowrank.distributed import tensor_parallel as tp

    # one process standing for TP rank 0 of 2
    monkeypatch.setattr(tp.TensorParallel, "full_shape",
                        lambda self, label, p: tuple(s * (2 if d == p.partition_dim else 1)
                                                     for d, s in enumerate(p.shape)))
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        p = torch.nn.Parameter(torch.randn(3, 24))
        p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, 0, 1
        opt = LDAdam([{"params": [("w", p)], "tensor_parallel": "global"}], rank=4)
        opt.set_tensor_parallel_group(dist.group.WORLD)
        group = opt.param_groups[0]
        assert not LDAdam.is_compressed_shape(group, (6, 24)) and LDAdam._refuses_shape(group, (3, 24))
        p.grad = torch.randn(3, 24)
        opt.step()
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
        assert opt.state_bytes()["total"] <= adamw_bytes((3, 24))
    finally:
        if started:
            dist.destroy_process_group()
