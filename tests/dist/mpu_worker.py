"""ds_lowrank.initialize(mpu=megatron.core.parallel_state): TP 2 × DP 2 on 4 ranks (torchrun).

Usage: torchrun --nproc_per_node 4 tests/dist/mpu_worker.py OUT.json

A model of megatron-core's ColumnParallelLinear and RowParallelLinear trains under ZeRO 1, 2 and 3
with tensor_parallel "local" (the default).  The reference on every rank is the same TP layout
without ZeRO or DeepSpeed: the same layers, the optimizer stepping this rank's shards directly,
on the gradient of the whole global batch (which is the average of the two DP replicas'
gradients, DeepSpeed's data-parallel average).  Rank 0 writes what it measured to OUT.json.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import finish  # noqa: E402

import ds_lowrank  # noqa: E402
from ds_lowrank import LDAdam, lowrank_param_groups  # noqa: E402

TP, STEPS, MICRO = 2, 5, 3
CLIP = 1.0          # DeepSpeed's default gradient_clipping, stated: its norm spans the TP shards
OPTIONS = {"lr": 1e-2, "rank": 2, "weight_decay": 0.01}


class Net(torch.nn.Module):
    def __init__(self):
        from megatron.core.model_parallel_config import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        torch.manual_seed(0)        # megatron's CPU initialization draws the whole weight on every rank
        cfg = ModelParallelConfig(tensor_model_parallel_size=TP, use_cpu_initialization=True)
        init = torch.nn.init.xavier_normal_
        self.col = ColumnParallelLinear(8, 12, config=cfg, init_method=init, bias=True, gather_output=False)
        self.row = RowParallelLinear(12, 6, config=cfg, init_method=init, bias=True, input_is_parallel=True,
                                     skip_bias_add=False)

    def forward(self, x):
        return self.row(torch.tanh(self.col(x)[0]))[0]


def batches():
    gen = torch.Generator().manual_seed(5)
    dp = 2
    return [(torch.randn(dp * MICRO, 8, generator=gen), torch.randn(dp * MICRO, 6, generator=gen))
            for _ in range(STEPS)]


def weights(model):
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):          # ZeRO-3: each rank holds a partition
        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().clone() for n, p in model.named_parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def clip_whole_model(model):
    """Scale the gradients as clipping the whole (unsharded) model's gradient norm to CLIP does:
    a TP shard's squares summed over the TP group, a replicated parameter's counted once."""
    from megatron.core import parallel_state

    sharded = sum(p.grad.square().sum() for p in model.parameters() if getattr(p, "tensor_model_parallel", False))
    dist.all_reduce(sharded, group=parallel_state.get_tensor_model_parallel_group())
    replicated = sum(p.grad.square().sum() for p in model.parameters()
                     if not getattr(p, "tensor_model_parallel", False))
    norm = float((sharded + replicated).sqrt())
    if norm + 1e-6 > CLIP:
        for p in model.parameters():
            p.grad.mul_(CLIP / (norm + 1e-6))


def reference():
    model = Net()
    opt = LDAdam(lowrank_param_groups(model, within_adamw=False), **OPTIONS)
    for x, y in batches():
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        clip_whole_model(model)
        opt.step()
    return weights(model)


def with_zero(stage):
    from megatron.core import parallel_state

    model = Net()
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": stage}, "steps_per_print": 10**9, "gradient_clipping": CLIP,
           "optimizer": {"type": "LDAdam", "params": {**OPTIONS, "within_adamw": False}}}
    engine, _, _, _ = ds_lowrank.initialize(model=model, config=cfg, mpu=parallel_state)
    opt = engine.basic_optimizer         # ours, inside DeepSpeed's ZeRO wrapper
    dp_rank = parallel_state.get_data_parallel_rank()
    for x, y in batches():
        lo = dp_rank * MICRO
        loss = torch.nn.functional.mse_loss(engine(x[lo:lo + MICRO]), y[lo:lo + MICRO])
        engine.backward(loss)
        engine.step()
    got = weights(engine.module)
    # the two DP replicas of every shard, bit for bit
    dp_group = parallel_state.get_data_parallel_group()
    replicas = 0.0
    for t in got.values():
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(dp_group))]
        dist.all_gather(parts, t, group=dp_group)
        replicas = max(replicas, max(float((p - parts[0]).abs().max()) for p in parts))
    want = reference()
    err = max(float((got[n] - want[n]).abs().max() / want[n].abs().max()) for n in want)
    moved = max(float((want[n] - w).abs().max()) for n, w in weights(Net()).items())
    errs = [None] * dist.get_world_size()
    dist.all_gather_object(errs, err)
    layouts = sorted({dist.get_world_size(layout.group) for layout in opt._layouts.values()})
    count = getattr(engine.optimizer, "partition_count", [])     # ZeRO-3's: one int
    return {"rel_err": max(errs), "replicas": replicas, "moved": moved, "dp_world": engine.dp_world_size,
            "partition_count": [count] if isinstance(count, int) else list(count), "layout_groups": layouts,
            "tp_group": dist.get_process_group_ranks(opt._tp_group)}


def refused_pipeline():
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    try:
        ds_lowrank.initialize(model=torch.nn.Linear(4, 4), mpu=parallel_state,
                              config={"train_micro_batch_size_per_gpu": 1,
                                      "optimizer": {"type": "LDAdam", "params": {"rank": 2}}})
        return None
    except ValueError as err:
        return f"{type(err).__name__}: {err}"
    finally:
        parallel_state.destroy_model_parallel()


def main():
    from megatron.core import parallel_state

    out_path = sys.argv[1]
    deepspeed.init_distributed(dist_backend="gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP)
    results = {"world": dist.get_world_size()}
    for stage in (0, 1, 2, 3):
        results[f"zero{stage}"] = with_zero(stage)
    results["pipeline"] = refused_pipeline()
    finish(out_path, results)


if __name__ == "__main__":
    main()
