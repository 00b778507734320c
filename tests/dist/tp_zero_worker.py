"""tensor_parallel="global" under DeepSpeed ZeRO with megatron-core's tensor parallelism (torchrun).

Usage: torchrun --nproc_per_node W tests/dist/tp_zero_worker.py OUT.json TP

W ranks as TP × (W / TP) DP.  A model of megatron-core's ColumnParallelLinear and RowParallelLinear
trains through ``ds_lowrank.initialize(mpu=parallel_state)`` at ZeRO 1, 2 and 3 with LDAdam,
GaLore and Adapprox in global mode; the reference on every rank is one process training the
whole (unsharded) layers on the whole global batch (DeepSpeed averages the DP ranks'
gradients).  Clipping is off, so the reference needs no norm across the TP shards.  Rank 0
writes what it measured to OUT.json.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import finish  # noqa: E402

import ds_lowrank  # noqa: E402
from ds_lowrank import Adapprox, GaLoreAdamW, LDAdam, MicroAdam, lowrank_param_groups  # noqa: E402
from ds_lowrank.distributed import comm  # noqa: E402
from ds_lowrank.distributed.zero_layout import gloo_mirror  # noqa: E402
from ds_lowrank.optim.state_layout import layout_key  # noqa: E402

# a micro-batch above the rank 4: a gradient of lower rank leaves the last basis vectors to rounding
STEPS, MICRO = 4, 6
# (in, out) of each layer, alternately column- and row-parallel; every split size divides by 2 and 3
LAYERS = [(16, 24), (24, 12), (12, 18), (18, 12)]
OPTIMIZERS = {
    "ldadam": (LDAdam, {"lr": 1e-2, "rank": 4, "weight_decay": 0.01}),
    "galore": (GaLoreAdamW, {"lr": 1e-2, "rank": 4, "update_proj_gap": 2}),
    "adapprox": (Adapprox, {"lr": 1e-2, "weight_decay": 0.01, "rank_min": 1, "rank_init": 2, "rank_max": 4,
                            "rank_interval": 2}),
}


class Net(torch.nn.Module):
    def __init__(self, tp):
        from megatron.core.model_parallel_config import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        torch.manual_seed(0)        # megatron's CPU initialization draws the whole weight on every rank
        cfg = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True)
        init = torch.nn.init.xavier_normal_
        layers = []
        for i, (n_in, n_out) in enumerate(LAYERS):
            if i % 2 == 0:
                layers.append(ColumnParallelLinear(n_in, n_out, config=cfg, init_method=init, bias=True,
                                                   gather_output=False))
            else:
                layers.append(RowParallelLinear(n_in, n_out, config=cfg, init_method=init, bias=True,
                                                input_is_parallel=True, skip_bias_add=False))
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)[0]
            if i % 2 == 0:
                x = torch.tanh(x)
        return x


class Whole(torch.nn.Module):
    """The same layers unsharded: what one process trains."""

    def __init__(self, weights):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(n_in, n_out) for n_in, n_out in LAYERS)
        with torch.no_grad():
            for n, p in self.named_parameters():
                p.copy_(weights[n])

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i % 2 == 0:
                x = torch.tanh(x)
        return x


def batches(dp):
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(dp * MICRO, LAYERS[0][0], generator=gen),
             torch.randn(dp * MICRO, LAYERS[-1][1], generator=gen)) for _ in range(STEPS)]


def whole_weights(model):
    """The model's parameters joined over the TP group (a replicated one as it is)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for n, p in model.named_parameters():
        t = p.detach().clone()
        if getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, t.contiguous(), group=group)
            t = torch.cat(parts, p.partition_dim)
        out[n] = t
    return out


def reference(name, weights, dp):
    cls, options = OPTIMIZERS[name]
    model = Whole(weights)
    opt = cls(lowrank_param_groups(model, within_adamw=False), **options)
    for x, y in batches(dp):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}


def engine_of(name, stage, mode, tp):
    from megatron.core import parallel_state

    cls, options = OPTIMIZERS[name]
    model = Net(tp)
    start = whole_weights(model)
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": stage}, "steps_per_print": 10**9, "gradient_clipping": 0.0,
           "zero_allow_untested_optimizer": True}
    groups = lowrank_param_groups(model, within_adamw=False, tensor_parallel=mode)
    opt = cls(groups, **options)
    engine, _, _, _ = ds_lowrank.initialize(model=model, config=cfg, mpu=parallel_state, optimizer=opt)
    return engine, opt, start


def train(engine, steps, dp):
    from megatron.core import parallel_state

    dp_rank = parallel_state.get_data_parallel_rank()
    for x, y in steps:
        lo = dp_rank * MICRO
        loss = torch.nn.functional.mse_loss(engine(x[lo:lo + MICRO]), y[lo:lo + MICRO])
        engine.backward(loss)
        engine.step()


def trained(engine, stage):
    params = list(engine.module.parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters(params):
            return whole_weights(engine.module)
    return whole_weights(engine.module)


def rel_err(got, want):
    err = max(float((got[n] - want[n]).abs().max() / want[n].abs().max()) for n in want)
    errs = [None] * dist.get_world_size()
    dist.all_gather_object(errs, err)
    return max(errs)


def layouts(opt):
    """How the global shards lay over the ranks: the most ranks holding rows of one whole matrix,
    and whether ZeRO cut one of them between data-parallel ranks (a cut row), over every rank."""
    most, cut = 0, False
    for layout in opt._layouts.values():
        if layout.whole_rows is not None:
            most = max([most] + [len(r.holders) for r in layout.whole_rows.rows.values()])
            cut = cut or any(lb in layout.splits for lb in layout.whole_rows.rows)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (most, cut))
    return {"most_holders": max(m for m, _ in everyone), "dp_cut": any(c for _, c in everyone)}


def run(name, stage, mode, tp, dp):
    comm.SENT.clear()
    engine, opt, start = engine_of(name, stage, mode, tp)
    train(engine, batches(dp), dp)
    sent = dict(comm.SENT)
    got = trained(engine, stage)
    want = reference(name, start, dp)
    moved = max(float((want[n] - start[n]).abs().max()) for n in want)
    return {"rel_err": rel_err(got, want), "moved": moved, "reduce": sent.get("reduce", 0),
            "move": sent.get("move", 0), **layouts(opt)}


def resumed(name, stage, tp, dp, directory):
    """Half the steps, ``save_checkpoint``, the rest; a new engine loading that checkpoint takes
    the rest again: the largest difference between the two, and what the checkpoint tools say of
    the checkpoint."""
    from ds_lowrank.checkpoint.universal import consolidate

    steps = batches(dp)
    half = len(steps) // 2
    engine, _, _ = engine_of(name, stage, "global", tp)
    train(engine, steps[:half], dp)
    engine.save_checkpoint(directory, tag="half")
    train(engine, steps[half:], dp)
    straight = trained(engine, stage)
    again, _, _ = engine_of(name, stage, "global", tp)
    again.load_checkpoint(directory, tag="half")
    train(again, steps[half:], dp)
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


def skipped(tp, dp, label="layers.1.weight"):
    """A gradient made infinite in one rank's piece of one row-parallel matrix, at the second step:
    every TP and DP rank skips that whole matrix (its weights unchanged on all), and steps the
    others."""
    engine, opt, _ = engine_of("ldadam", 2, "global", tp)
    steps = batches(dp)
    train(engine, steps[:1], dp)
    before = trained(engine, 2)
    step = opt.step

    def poisoned(*args, **kwargs):
        from megatron.core import parallel_state

        for flat in (p for g in opt.param_groups for p in g["params"] if p.grad is not None):
            layout = opt._layouts.get(layout_key(flat))
            for q in layout.pieces if layout is not None else ():
                # the first element of TP rank 0's shard: one rank of the grid
                first = q.start == 0 and parallel_state.get_tensor_model_parallel_rank() == 0
                if q.label == label and q.numel and first:
                    flat.grad[q.offset] = float("inf")
        return step(*args, **kwargs)
    opt.step = poisoned
    train(engine, steps[1:2], dp)
    after = trained(engine, 2)
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, opt.skipped_steps)
    return {"unchanged": float((after[label] - before[label]).abs().max()) == 0.0,
            "others_moved": all(float((after[n] - before[n]).abs().max()) > 0 for n in after if n != label),
            "skipped": counts}


def refused(name, tp):
    """An optimizer refused in global mode on ZeRO partitions: the message, at its first step."""
    from megatron.core import parallel_state

    cls, options = {"microadam": (MicroAdam, {"lr": 1e-3})}[name]
    model = Net(tp)
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "zero_optimization": {"stage": 2}, "steps_per_print": 10**9,
           "zero_allow_untested_optimizer": True}
    opt = cls(lowrank_param_groups(model, tensor_parallel="global"), **options)
    engine, _, _, _ = ds_lowrank.initialize(model=model, config=cfg, mpu=parallel_state, optimizer=opt)
    x, y = batches(1)[0]
    engine.backward(torch.nn.functional.mse_loss(engine(x[:MICRO]), y[:MICRO]))
    try:
        engine.step()
        return None
    except NotImplementedError as err:
        return f"{type(err).__name__}: {err}"


def mirrored(parallel_state) -> dict:
    """Sums over the gloo mirrors of this rank's TP and DP groups (which differ between ranks):
    each must be its own group's."""
    out = {}
    for name, group in (("tp", parallel_state.get_tensor_model_parallel_group()),
                        ("dp", parallel_state.get_data_parallel_group())):
        t = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(t, group=gloo_mirror(group))
        out[name] = [t.item(), float(sum(r + 1 for r in dist.get_process_group_ranks(group)))]
    return out


def main():
    from megatron.core import parallel_state

    out_path, tp = sys.argv[1], int(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    dp = dist.get_world_size() // tp
    results = {"world": dist.get_world_size(), "tp": tp, "dp": dp}
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mirrored(parallel_state))
    results["mirror"] = every
    for stage in (1, 2, 3):
        for name in OPTIMIZERS:
            results[f"global:{name}:zero{stage}"] = run(name, stage, "global", tp, dp)
    # the control: each shard its own matrix differs from one process on the whole ones
    results["local:ldadam:zero2"] = run("ldadam", 2, "local", tp, dp)
    directory = os.path.join(os.path.dirname(os.path.abspath(out_path)), "checkpoints")
    for stage in (2, 3):
        results[f"resume:zero{stage}"] = resumed("ldadam", stage, tp, dp, os.path.join(directory, f"zero{stage}"))
    results["skip"] = skipped(tp, dp)
    results["refused:microadam"] = refused("microadam", tp)
    finish(out_path, results)


if __name__ == "__main__":
    main()
