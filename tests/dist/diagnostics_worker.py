"""LowRankProbe under DeepSpeed ZeRO 0-3 and FSDP2 against the same probe in one process (launched
by torchrun).

Usage: torchrun --nproc_per_node N tests/dist/diagnostics_worker.py OUT.json STAGE [STAGE ...]
Every rank trains the same model on the same global batches under each ZeRO stage (a STAGE of
0-3), FSDP2 (``fsdp2``: fully_shard, DTensor state) or HSDP (``hsdp``: replicas only), measuring some steps; rank 0 also trains a
plain LDAdam on the whole batches and writes both to OUT.json.
"""

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import finish  # noqa: E402

from ds_lowrank import LDAdam, lowrank_param_groups  # noqa: E402
from ds_lowrank.training.diagnostics import LowRankProbe, lowrank_optimizer, state_bytes_by_rank  # noqa: E402

BATCH = 12
STEPS = 6
MEASURED = (0, 2, 5)       # the first step (no previous basis: no drift) and later ones


def make_model():
    """Tall, square and wide matrices with row counts that ZeRO cuts mid-row at 2 and 3 ranks."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(10, 13), torch.nn.Tanh(),
        torch.nn.Linear(13, 13, bias=False), torch.nn.Tanh(),
        torch.nn.Linear(13, 29), torch.nn.Tanh(),
        torch.nn.Linear(29, 7),
    )


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 10, generator=gen), torch.randn(BATCH, 7, generator=gen)) for _ in range(STEPS)]


def optimizer_for(model):
    return LDAdam(lowrank_param_groups(model, rank=4, within_adamw=False), lr=1e-2)   # every matrix compressed


def single_process():
    model = make_model()
    opt = optimizer_for(model)
    probe = LowRankProbe(opt)
    out = {}
    for t, (x, y) in enumerate(batches()):
        if t in MEASURED:
            probe.arm()
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if t in MEASURED:
            out[t] = probe.collect()
    return out


def under_zero(stage):
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    config = {"train_micro_batch_size_per_gpu": BATCH // world, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer_for(model), config=config)
    opt = lowrank_optimizer(engine)
    probe = LowRankProbe(opt)
    out = {}
    per = BATCH // world
    for t, (x, y) in enumerate(batches()):
        if t in MEASURED:
            probe.arm()
        loss = torch.nn.functional.mse_loss(engine(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per])
        engine.backward(loss)
        engine.step()
        if t in MEASURED:
            out[t] = probe.collect()
    return {"metrics": out, "state_bytes": state_bytes_by_rank(opt)["total"], "found": type(opt).__name__}


def under_fsdp2(hsdp: bool = False):
    """The same run on a fully_shard model: each Linear and the root sharded by rows; ``hsdp``:
    on a ``(world, 1)`` mesh instead, every rank a replica holding whole matrices."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    mesh = (init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard")) if hsdp
            else init_device_mesh("cpu", (world,)))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = optimizer_for(model)
    probe = LowRankProbe(opt)
    out = {}
    per = BATCH // world
    for t, (x, y) in enumerate(batches()):
        if t in MEASURED:
            probe.arm()
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per]).backward()
        opt.step()
        if t in MEASURED:
            out[t] = probe.collect()
    return {"metrics": out, "state_bytes": state_bytes_by_rank(opt)["total"], "found": type(opt).__name__}


def main():
    out_path, runs = sys.argv[1], sys.argv[2:]
    deepspeed.init_distributed(dist_backend="gloo")
    results = {"world": dist.get_world_size(), "zero": {}}
    for run in runs:
        if run == "fsdp2":
            results["fsdp2"] = under_fsdp2()
        elif run == "hsdp":
            results["hsdp"] = under_fsdp2(hsdp=True)
        else:
            results["zero"][int(run)] = under_zero(int(run))
    if dist.get_rank() == 0:
        results["single"] = single_process()
    finish(out_path, results)


if __name__ == "__main__":
    main()
