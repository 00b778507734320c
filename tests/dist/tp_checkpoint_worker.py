"""Tensor-parallel checkpoints: saved at one TP × DP layout, resumed at another (torchrun).

Usage: torchrun --nproc_per_node N tests/dist/tp_checkpoint_worker.py OUT.json DIR TP COMMAND...

A megatron-core model (ColumnParallelLinear, RowParallelLinear) trains under
``ds_lowrank.initialize(mpu=parallel_state)`` with TP ranks × (N / TP) DP ranks on the same
global batches, whatever the layout.  Commands:

- ``save:<case>``: train ``BEFORE`` steps, save to DIR/<case>/checkpoint, train ``AFTER`` more;
  DIR/<case>/reference.pt gets the whole weights at the save and at the end, and the whole
  momentum at the save (stage 0: read from the optimizer's state);
- ``resume:<case>:<stage>``: start from DIR/<case>/whole (consolidated by the test) at this
  layout and stage, train ``AFTER`` steps; report the distance to the reference, and what the
  optimizer holds when it starts (momentum, AdamW state);
- ``fromadam:<source>``: LDAdam (global, stage 0) from DIR/<source>/adam (``--to adam``);
- ``dsadam:<source>``: DeepSpeed's own AdamW (ZeRO-1) loading DIR/<source>/adam.

A case is ``<mode><stage>``: tensor_parallel "global" or "local" at that ZeRO stage.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import adam_loaded_error, finish, train_data_parallel  # noqa: E402

import ds_lowrank  # noqa: E402
from ds_lowrank import LDAdam, lowrank_param_groups  # noqa: E402
from ds_lowrank.checkpoint import resume  # noqa: E402
from ds_lowrank.checkpoint.tensor_parallel import whole_of  # noqa: E402
from ds_lowrank.distributed.tensor_parallel import as_deepspeed_mpu  # noqa: E402
from ds_lowrank.optim.ldadam import dense_error  # noqa: E402

BEFORE, AFTER, BATCH = 3, 3, 6
OPTIONS = {"lr": 1e-2, "rank": 2, "weight_decay": 0.01}


def net(tp):
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)    # megatron's CPU initialization draws the whole weight on every rank
            cfg = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True)
            init = torch.nn.init.xavier_normal_
            self.col = ColumnParallelLinear(8, 12, config=cfg, init_method=init, bias=True, gather_output=False)
            self.row = RowParallelLinear(12, 6, config=cfg, init_method=init, bias=True, input_is_parallel=True,
                                         skip_bias_add=False)

        def forward(self, x):
            return self.row(torch.tanh(self.col(x)[0]))[0]
    return Net()


def batches(steps, skip=0):
    gen = torch.Generator().manual_seed(5)
    out = [(torch.randn(BATCH, 8, generator=gen), torch.randn(BATCH, 6, generator=gen)) for _ in range(skip + steps)]
    return out[skip:]


def config(stage, dp):
    return {"train_micro_batch_size_per_gpu": BATCH // dp, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, "steps_per_print": 10**9, "gradient_clipping": 0.0,
            "zero_allow_untested_optimizer": True}


def optimizer(model, mode):
    return LDAdam(lowrank_param_groups(model, tensor_parallel=mode, within_adamw=False), **OPTIONS)


def mpu():
    from megatron.core import parallel_state
    return as_deepspeed_mpu(parallel_state)


def train(engine, data):
    return train_data_parallel(engine, data, BATCH)


def tp_info():
    from megatron.core import parallel_state
    return parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_world_size()


def whole(name, t, p):
    """The whole parameter from this TP group's shards of it."""
    group, world = tp_info()
    if not getattr(p, "tensor_model_parallel", False) or world == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return whole_of(parts, p.partition_dim, getattr(p, "partition_stride", 1))


def momentum(opt, p, state, shape):
    """Adam's first moment of the shard held whole in ``state`` (LDAdam: ``P·M`` plus the error
    feedback's ``(1-β1)/β1·e``, oriented as it projects)."""
    group = opt.param_groups[0]
    if "basis" not in state:
        return state["exp_avg"].reshape(p.shape)
    right = type(opt).projects_right(group, shape)
    P, M = state["basis"], state["proj_exp_avg"]
    m = (M @ P) if right else (P @ M)
    e = dense_error(state)
    beta1 = group["betas"][0]
    return m + (1 - beta1) / beta1 * e if e is not None else m


def global_shape(opt, p):
    group, world = tp_info()
    shape = list(p.shape)
    mode = opt.param_groups[0]["tensor_parallel"]
    if getattr(p, "tensor_model_parallel", False) and p.dim() == 2 and mode == "global":
        shape[p.partition_dim] *= world
    return tuple(shape)


def save(out, case):
    from megatron.core import parallel_state
    mode, stage = case[:-1], int(case[-1])
    model = net(parallel_state.get_tensor_model_parallel_world_size())
    engine, _, _, _ = ds_lowrank.initialize(model=model, optimizer=optimizer(model, mode), mpu=parallel_state,
                                            config=config(stage, parallel_state.get_data_parallel_world_size()))
    opt = engine.basic_optimizer
    train(engine, batches(BEFORE))
    folder = os.path.join(out, case)
    engine.save_checkpoint(os.path.join(folder, "checkpoint"), tag="half")
    ref = {}
    if stage == 0:
        ref["at_save"] = {n: whole(n, p, p) for n, p in engine.module.named_parameters()}
        ref["momentum"] = {}
        for n, p in engine.module.named_parameters():
            m = momentum(opt, p, opt.state[p], global_shape(opt, p))
            # a global shard's momentum is its rows of the whole one; a local one's is its own
            ref["momentum"][n] = whole(n, m, p)
    losses = train(engine, batches(AFTER, skip=BEFORE))
    if stage == 0:
        ref["at_end"] = {n: whole(n, p, p) for n, p in engine.module.named_parameters()}
    if dist.get_rank() == 0:
        torch.save(ref, os.path.join(folder, "reference.pt"))
    return {"losses": losses}


def start_state(opt, model):
    """The whole momentum and AdamW state the optimizer starts from (stage 0: held whole)."""
    out = {}
    for n, p in model.named_parameters():
        st = opt.state[p]
        m = momentum(opt, p, st, global_shape(opt, p))
        out[n] = {"momentum": whole(n, m, p)}
        if "exp_avg_sq" in st:
            out[n]["exp_avg_sq"] = whole(n, st["exp_avg_sq"], p)
    return out


def resumed(out, case, stage):
    from megatron.core import parallel_state
    mode = case[:-1]
    tp, dp = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_data_parallel_world_size()
    model = net(tp)
    engine, _, _, _ = resume(os.path.join(out, case, "whole"), model, config(stage, dp), optimizer(model, mode),
                             mpu=mpu())
    opt = engine.basic_optimizer
    result = {"global_steps": engine.global_steps}
    ref = torch.load(os.path.join(out, case, "reference.pt"))
    if stage == 0:
        start = start_state(opt, engine.module)
        result["momentum_err"] = max(float((start[n]["momentum"] - ref["momentum"][n]).abs().max())
                                     for n in start)
        result["momentum_size"] = max(float(ref["momentum"][n].abs().max()) for n in start)
        if dist.get_rank() == 0:
            torch.save(start, os.path.join(out, case, f"start_tp{tp}.pt"))
    losses = train(engine, batches(AFTER, skip=BEFORE))
    got = {n: whole(n, p, p) for n, p in engine.module.named_parameters()}
    want, before = ref["at_end"], ref["at_save"]
    result["rel_err"] = max(float((got[n] - want[n]).abs().max() / want[n].abs().max()) for n in want)
    result["moved"] = max(float((got[n] - before[n]).abs().max()) for n in want)
    result["losses"] = losses
    if dist.get_rank() == 0:
        torch.save(got, os.path.join(out, case, f"end_tp{tp}_zero{stage}.pt"))
    return result


def from_adam(out, source):
    """LDAdam, global mode, ZeRO 0, from the Adam checkpoint: each shard's momentum is its part
    of Adam's (the round trip LDAdam → Adam → LDAdam keeps the momentum)."""
    from megatron.core import parallel_state
    tp, dp = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_data_parallel_world_size()
    model = net(tp)
    engine, _, _, _ = resume(os.path.join(out, source, "adam", "half"), model, config(0, dp),
                             optimizer(model, "global"), mpu=mpu())
    opt = engine.basic_optimizer
    start = start_state(opt, engine.module)
    ref = torch.load(os.path.join(out, source, "reference.pt"))
    err = max(float((start[n]["momentum"] - ref["momentum"][n]).abs().max()) for n in start)
    losses = train(engine, batches(AFTER, skip=BEFORE))
    return {"momentum_err": err, "global_steps": engine.global_steps, "finite": all(v == v for v in losses)}


def ds_adam(out, source):
    """DeepSpeed's AdamW at ZeRO-1 loads the Adam checkpoint at this TP size: its fp32 weights and
    moments of each shard are that shard's part of the whole ones the test wrote."""
    from megatron.core import parallel_state
    tp, dp = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    expected = torch.load(os.path.join(out, source, "adam_expected.pt"))
    model = net(tp)
    cfg = {"train_micro_batch_size_per_gpu": BATCH // dp, "zero_optimization": {"stage": 1},
           "steps_per_print": 10**9, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
           "checkpoint": {"load_universal": True}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg,
                                           mpu=mpu())
    engine.load_checkpoint(os.path.join(out, source, "adam"))
    worst = adam_loaded_error(engine, expected, rank, tp)
    errs = [None] * dist.get_world_size()
    dist.all_gather_object(errs, worst)
    losses = train(engine, batches(AFTER, skip=BEFORE))
    return {"max_err": max(errs), "finite": all(v == v for v in losses)}


def main():
    from megatron.core import parallel_state
    out_path, out, tp = sys.argv[1], sys.argv[2], int(sys.argv[3])
    deepspeed.init_distributed(dist_backend="gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    results = {"world": dist.get_world_size(), "tp": tp}
    for command in sys.argv[4:]:
        kind, *args = command.split(":")
        print(f"command {command}", file=sys.stderr, flush=True)
        if kind == "save":
            results[command] = save(out, args[0])
        elif kind == "resume":
            results[command] = resumed(out, args[0], int(args[1]))
        elif kind == "fromadam":
            results[command] = from_adam(out, args[0])
        elif kind == "dsadam":
            results[command] = ds_adam(out, args[0])
    finish(out_path, results)


if __name__ == "__main__":
    main()
