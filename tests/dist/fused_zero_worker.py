"""Fused weights under DeepSpeed ZeRO with megatron-core's tensor parallelism (torchrun).

Usage: torchrun --nproc_per_node W tests/dist/fused_zero_worker.py OUT.json TP [few]

(``few``: LDAdam only, local mode at ZeRO 2 and 3 and global at ZeRO 2, for a layout whose
point is its process groups: with 3 or more DP ranks, blocks held by some of them.)

W ranks as TP × (W / TP) DP.  A SwiGLU ``linear_fc1`` (ColumnParallelLinear, stride 2), its
``linear_fc2`` (RowParallelLinear) and a GQA fused QKV (ColumnParallelLinear marked
``fused_qkv``) train through ``ds_lowrank.initialize(mpu=parallel_state)`` at ZeRO 1, 2 and 3 with
LDAdam, GaLore and Adapprox in both tensor-parallel modes.  The reference on every rank is one
process training the same network built from separate matrices on the whole global batch:
in ``"global"`` mode the whole logical matrices (gate, up; q, k, v; fc2), in ``"local"`` mode
each TP rank's blocks of them (and its fc2 columns) as matrices of their own.  The network's
loss is a sum of squares of the QKV outputs, so each TP rank's share of it is the sum over its
own query groups and their total is the reference's.  A replicated vector in the same group,
ahead of the matrices, moves ZeRO 1/2's cut off the rows' boundaries: into a row of a block.  A
matrix TP leaves whole (``mix``, in a group of its own, with a loss term of its own) is one matrix
every TP rank steps alike.
``LowRankProbe`` measures the engine's optimizer at ``MEASURED`` steps, and the same probe the
reference's; every rank's probe takes part in ``collect``.  Rank 0 writes what it measured to
OUT.json.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import finish, held_bytes  # noqa: E402
from fused_worker import FFN, GROUPS, HEAD_DIM, HEADS, HIDDEN, fuse, logical, unfuse  # noqa: E402
from tp_zero_worker import OPTIMIZERS as TP_OPTIMIZERS  # noqa: E402
from tp_zero_worker import rel_err, trained  # noqa: E402

import ds_lowrank  # noqa: E402
from ds_lowrank import LDAdam  # noqa: E402
from ds_lowrank.distributed import comm  # noqa: E402
from ds_lowrank.distributed.zero_layout import cut_rows  # noqa: E402
from ds_lowrank.optim.ldadam import dense_error  # noqa: E402
from ds_lowrank.training.diagnostics import LowRankProbe  # noqa: E402

STEPS, MICRO = 4, 6
# the inputs ``mix`` reads: its gradient has rank MIX, which the optimizers' rank 4 holds whole, so
# that its steps do not hang on a subspace float rounding could tilt
MIX = 4
MEASURED = (2, 3)       # with a previous basis (drift too); GaLore (update_proj_gap 2) refreshes it at 2
# at the default within_adamw and rank 3, a 12 × 10 block (q of a TP 2 shard) is compressed and the
# 6 × 10 ones are not (their compressed state would exceed AdamW's)
OPTIMIZERS = {**TP_OPTIMIZERS, "ldadam_r3": (LDAdam, {"lr": 1e-2, "rank": 3, "weight_decay": 0.01})}


def start_weights():
    """The logical matrices the network starts from (fc2: HIDDEN × FFN; mix: HIDDEN × MIX)."""
    weights = logical(0)
    weights["fc2"] = torch.randn(HIDDEN, FFN, generator=torch.Generator().manual_seed(1))
    weights["mix"] = 0.3 * torch.randn(HIDDEN, MIX, generator=torch.Generator().manual_seed(2))
    return weights


class Net(torch.nn.Module):
    def __init__(self, tp, weights):
        from megatron.core.model_parallel_config import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        self.shift = torch.nn.Parameter(torch.zeros(HIDDEN))
        cfg = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True)
        whole = fuse(weights, 0, 1)         # megatron's whole fused weights: [gate; up], every group's [q; k; v]

        def init(t):
            return lambda w: w.copy_(t)
        self.fc1 = ColumnParallelLinear(HIDDEN, 2 * FFN, config=cfg, init_method=init(whole["fc1"]), bias=False,
                                        gather_output=False, stride=2)
        self.fc2 = RowParallelLinear(FFN, HIDDEN, config=cfg, init_method=init(weights["fc2"]), bias=False,
                                     input_is_parallel=True, skip_bias_add=True)
        self.qkv = ColumnParallelLinear(HIDDEN, (HEADS + 2 * GROUPS) * HEAD_DIM, config=cfg,
                                        init_method=init(whole["qkv"]), bias=False, gather_output=False)
        self.qkv.weight.fused_qkv = (HEADS, GROUPS, HEAD_DIM)
        # a matrix tensor parallelism leaves whole: every TP rank steps it alike
        self.mix = torch.nn.Linear(MIX, HIDDEN, bias=False)
        with torch.no_grad():
            self.mix.weight.copy_(weights["mix"])

    def forward(self, x):
        x = x + self.shift
        g, u = self.fc1(x)[0].chunk(2, dim=-1)         # megatron's glu: the local output's two halves
        z = torch.tanh(x + self.fc2(torch.nn.functional.silu(g) * u)[0])
        # mix adds a term of its own: every TP rank's loss has it whole, as their gradients of it;
        # on inputs cut from the graph, so that the other weights train as without it
        return self.qkv(z)[0].square().sum(-1).mean() + self.mix(x[..., :MIX].detach()).square().sum(-1).mean()


def separate(weights, mode, tp):
    """The matrices one process steps: the logical ones (global), or each TP rank's part of each
    (local: its rows of a block, its columns of fc2)."""
    if mode == "global":
        return dict(weights)
    out = {"shift": weights["shift"], "mix": weights["mix"]}
    for n, w in weights.items():
        if n in ("shift", "mix"):
            continue
        for r, part in enumerate(w.chunk(tp, dim=1 if n == "fc2" else 0)):
            out[f"{n}@{r}"] = part
    return out


def joined(params):
    """The logical matrices from ``separate``'s parts."""
    names = sorted({n.split("@")[0] for n in params})
    return {n: params[n] if n in params else
            torch.cat([params[k] for k in sorted(k for k in params if k.split("@")[0] == n)],
                      dim=1 if n == "fc2" else 0) for n in names}


def label(name):
    """The optimizer's label of ``separate``'s part ``name``: its parameter's, with its block."""
    name = name.split("@")[0]
    if name == "shift":
        return name
    weight, _, block = name.partition("[")
    return f"{weight}.weight" + (f"[{block}" if block else "")


def reference_loss(w, x):
    x = x + w["shift"]
    h = torch.nn.functional.silu(x @ w["fc1[gate]"].T) * (x @ w["fc1[up]"].T)
    z = torch.tanh(x + h @ w["fc2"].T)
    return sum((z @ w[f"qkv[{b}]"].T).square().sum(-1) for b in "qkv").mean() + \
        (x[..., :MIX].detach() @ w["mix"].T).square().sum(-1).mean()


def batches(dp):
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(dp * MICRO, HIDDEN, generator=gen) for _ in range(STEPS)]


def reference(name, mode, tp, dp, within_adamw=False, probed=None):
    """The weights one process trains; ``probed``: a dict it fills with its ``LowRankProbe``'s
    metrics at the ``MEASURED`` steps (``metrics``) and, for a control, the error-feedback norm
    of its matrices that are no fused weight's blocks (``unfused_ef_norm``)."""
    cls, options = OPTIMIZERS[name]
    weights = {**start_weights(), "shift": torch.zeros(HIDDEN)}
    params = {n: torch.nn.Parameter(t.clone()) for n, t in separate(weights, mode, tp).items()}
    # named as the network's optimizer labels them (``fc1.weight[gate]`` on every TP rank in local
    # mode), so that the sketches seeded by a matrix's name (Adapprox) draw the same numbers
    named = [(label(n), p) for n, p in params.items()]
    opt = cls([{"params": named, "within_adamw": within_adamw}], **options)
    probe = LowRankProbe(opt) if probed is not None else None
    metrics = {}
    for t, x in enumerate(batches(dp)):
        if probe is not None and t in MEASURED:
            probe.arm()
        opt.zero_grad()
        reference_loss(joined(params), x).backward()
        opt.step()
        if probe is not None and t in MEASURED:
            metrics[t] = probe.collect()
    if probed is not None:
        errors = [dense_error(opt.state[p]) for n, p in params.items() if "[" not in n and p in opt.state]
        probed["metrics"] = metrics
        probed["unfused_ef_norm"] = sum(float(e.double().square().sum()) for e in errors if e is not None) ** 0.5
    return {n: w.detach() for n, w in joined(params).items()}


def engine_of(name, stage, mode, tp, within_adamw=False):
    from megatron.core import parallel_state

    cls, options = OPTIMIZERS[name]
    model = Net(tp, start_weights())
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": stage}, "steps_per_print": 10**9, "gradient_clipping": 0.0,
           "zero_allow_untested_optimizer": True}
    # one group: the vector and the matrices share ZeRO 1/2's flat partitions; mix in a group
    # of its own, which leaves the fused weights' layout in them as it is
    named = list(model.named_parameters())
    opt = cls([{"params": [(n, p) for n, p in named if n != "mix.weight"], "within_adamw": within_adamw,
                "tensor_parallel": mode},
               {"params": [(n, p) for n, p in named if n == "mix.weight"], "within_adamw": within_adamw,
                "tensor_parallel": mode}], **options)
    engine, _, _, _ = ds_lowrank.initialize(model=model, config=cfg, mpu=parallel_state, optimizer=opt)
    return engine, opt


def train(engine, xs, probe=None):
    """Steps on the global batches ``xs``; with ``probe``, its metrics at the ``MEASURED`` steps."""
    from megatron.core import parallel_state

    lo = parallel_state.get_data_parallel_rank() * MICRO
    metrics = {}
    for t, x in enumerate(xs):
        if probe is not None and t in MEASURED:
            probe.arm()
        engine.backward(engine(x[lo:lo + MICRO]))
        engine.step()
        if probe is not None and t in MEASURED:
            metrics[t] = probe.collect()
    return metrics


def logical_weights(engine, stage, tp):
    """The logical matrices of the trained network, joined over the TP group."""
    got = trained(engine, stage)
    shards = [{"fc1": f, "qkv": q} for f, q in zip(got["fc1.weight"].chunk(tp), got["qkv.weight"].chunk(tp))]
    return {**unfuse(shards, tp), "fc2": got["fc2.weight"], "mix": got["mix.weight"], "shift": got["shift"]}


def layouts(opt):
    """How the fused weights lay over the ranks, over every rank: the most ranks holding rows of
    one block, and whether ZeRO cut a row of a fused weight between data-parallel ranks."""
    most, cut = 0, False
    for layout in opt._layouts.values():
        for label, blocks in layout.blocks.items():
            cut = cut or bool(cut_rows(layout.holders[label], layout.row_length[label]))
            for name in blocks:
                whole = layout.whole_rows
                holders = whole.rows[name].holders if whole is not None and name in whole.rows else \
                    layout.owners[name]
                most = max(most, len(holders))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (most, cut))
    return {"block_holders": max(m for m, _ in everyone), "fused_cut": any(c for _, c in everyone)}


def run(name, stage, mode, tp, dp, within_adamw=False):
    comm.SENT.clear()
    engine, opt = engine_of(name, stage, mode, tp, within_adamw)
    probe = LowRankProbe(opt) if name != "adapprox" else None      # (Adapprox keeps no basis)
    measured = train(engine, batches(dp), probe)
    sent = dict(comm.SENT)
    got = logical_weights(engine, stage, tp)
    probed = {} if probe is not None else None
    want = reference(name, mode, tp, dp, within_adamw, probed)
    start = start_weights()
    # the matrices; the vector, stepped by AdamW, apart: its entries are near zero, so its relative
    # error is that of AdamW's ratio of tiny moments
    shift = float((got.pop("shift") - want.pop("shift")).abs().max())
    out = {"rel_err": rel_err(got, want), "shift_diff": shift,
           "moved": max(float((want[n] - start[n]).abs().max()) for n in start),
           "reduce": sent.get("reduce", 0), **layouts(opt)}
    # the state held here, as state_layout walks it: per block, and all of it in state_bytes()
    held = held_bytes(opt)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (sorted({lk.split("|")[0] for lk in held}),
                                      opt.state_bytes()["total"] == sum(held.values()) > 0))
    out["state_labels"] = sorted({lb for labels, _ in everyone for lb in labels})
    out["counted"] = all(ok for _, ok in everyone)
    if probe is not None:
        out["probe"] = {"got": measured, **probed}
    if mode == "local" and tp > 1:
        # the control: the whole logical matrices are another optimization
        other = {} if probe is not None else None
        want = reference(name, "global", tp, dp, within_adamw, other)
        want.pop("shift")
        out["vs_global"] = rel_err(got, want)
        if probe is not None:
            out["probe"]["global_metrics"] = other["metrics"]
    if within_adamw:
        kinds = {}
        for st in opt.state.values():
            for piece in st.values():
                for block, of_block in piece.items():
                    if isinstance(of_block, dict) and of_block:
                        kinds[block] = "basis" in of_block
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, kinds)
        out["compressed"] = {b: c for k in everyone for b, c in k.items()}
    return out


def resumed(name, stage, mode, tp, dp, directory):
    """Half the steps, ``save_checkpoint``, the rest; a new engine loading that checkpoint takes
    the rest again: the largest difference between the two, and what the checkpoint tools say."""
    from ds_lowrank.checkpoint.universal import consolidate

    xs = batches(dp)
    half = len(xs) // 2
    engine, _ = engine_of(name, stage, mode, tp)
    train(engine, xs[:half])
    engine.save_checkpoint(directory, tag="half")
    train(engine, xs[half:])
    straight = trained(engine, stage)
    again, _ = engine_of(name, stage, mode, tp)
    again.load_checkpoint(directory, tag="half")
    train(again, xs[half:])
    diff = max(float((trained(again, stage)[n] - w).abs().max()) for n, w in straight.items())
    diffs = [None] * dist.get_world_size()
    dist.all_gather_object(diffs, diff)
    tools = None
    if dist.get_rank() == 0:
        try:
            consolidate(directory, "half")
        except ValueError as err:
            tools = f"{type(err).__name__}: {err}"
    return {"max_diff": max(diffs), "tools": tools}


def main():
    from megatron.core import parallel_state

    out_path, tp = sys.argv[1], int(sys.argv[2])
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    dp = dist.get_world_size() // tp
    results = {"world": dist.get_world_size(), "tp": tp, "dp": dp}
    if sys.argv[3:] == ["few"]:
        for mode, stage in (("local", 2), ("global", 2), ("local", 3)):
            results[f"{mode}:ldadam:zero{stage}"] = run("ldadam", stage, mode, tp, dp)
        finish(out_path, results)
        return
    for mode in ("local", "global"):
        for stage in (1, 2, 3):
            for name in TP_OPTIMIZERS:
                results[f"{mode}:{name}:zero{stage}"] = run(name, stage, mode, tp, dp)
    # blocks the group keeps dense (their compressed state would exceed AdamW's) take AdamW
    results["dense:ldadam:zero2"] = run("ldadam_r3", 2, "local", tp, dp, within_adamw=True)
    directory = os.path.join(os.path.dirname(os.path.abspath(out_path)), "checkpoints")
    results["resume:local:zero2"] = resumed("ldadam", 2, "local", tp, dp, os.path.join(directory, "local"))
    results["resume:global:zero3"] = resumed("ldadam", 3, "global", tp, dp, os.path.join(directory, "global"))
    finish(out_path, results)


if __name__ == "__main__":
    main()
