"""Run LDAdam under DeepSpeed ZeRO and compare with a single-process run (launched by torchrun).

Usage: torchrun --nproc_per_node N tests/dist/zero_worker.py OUT.json [check ...]
Every rank runs every check; rank 0 writes what it measured to OUT.json, and the test asserts.
"""

import json
import os
import sys
import tempfile

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from ds_lowrank import LDAdam, lowrank_param_groups  # noqa: E402
from ds_lowrank.distributed import comm  # noqa: E402
from ds_lowrank.optim.partitioned import cut_rows  # noqa: E402

RANK = 4
GLOBAL_BATCH = 12


def make_model(seed=0):
    """Tall, square, tall and wide matrices whose partitions cut rows at 2 and 3 ranks."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(10, 13), torch.nn.Tanh(),            # 13×10 tall (right)
        torch.nn.Linear(13, 13, bias=False), torch.nn.Tanh(),  # square (left)
        torch.nn.Linear(13, 29), torch.nn.Tanh(),            # 29×13 tall, 29 rows: not divisible
        torch.nn.Linear(29, 7),                              # 7×29 wide (left)
    )


def batches(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(GLOBAL_BATCH, 10, generator=gen), torch.randn(GLOBAL_BATCH, 7, generator=gen))
            for _ in range(steps)]


def optimizer_for(model):
    return LDAdam(lowrank_param_groups(model, rank=RANK), lr=1e-2, weight_decay=0.01)


def single_process(steps):
    model = make_model()
    opt = optimizer_for(model)
    for x, y in batches(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt


def engine_for(stage, model=None):
    model = model or make_model()
    cfg = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // dist.get_world_size(),
           "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
           "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer_for(model), config=cfg)
    return engine, opt


def train(engine, data):
    rank, world = dist.get_rank(), dist.get_world_size()
    per = GLOBAL_BATCH // world
    for x, y in data:
        loss = torch.nn.functional.mse_loss(engine(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per])
        engine.backward(loss)
        engine.step()


def full_weights(engine):
    from deepspeed.utils import safe_get_full_fp32_param
    out = {}
    for n, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)       # None at stage 0: the parameter is the master
        out[n] = (p.detach() if full is None else full).float().clone()
    return out


def inner(opt):
    """Our optimizer behind DeepSpeed's wrapper."""
    return getattr(opt, "optimizer", opt)


def check_equivalence(stage, steps=10):
    ref, ref_opt = single_process(steps)
    engine, opt = engine_for(stage)
    comm.SENT.clear()
    train(engine, batches(steps))
    sent = dict(comm.SENT)
    got = full_weights(engine)
    worst = max(float((got[n] - p.detach()).abs().max() / p.detach().abs().max())
                for n, p in ref.named_parameters())
    # per-rank optimizer state against the single-process total
    ours = inner(opt)
    mine = torch.tensor([ours.state_bytes()[k] for k in STATE_KEYS], dtype=torch.float64)
    dist.all_reduce(mine)
    single = [ref_opt.state_bytes()[k] for k in STATE_KEYS]
    replicated = replicated_bytes(ours)
    return {"rel_err": worst, "state_sum": mine.tolist(), "state_single": single,
            "replicated": replicated, "sent": sent, "cut_rows": count_cut_rows(ours)}


STATE_KEYS = ("lowrank_moments", "bases", "error_feedback", "dense_moments")


def _layouts(opt):
    return list(opt._layouts.values())


def replicated_bytes(opt):
    """Bytes each extra holder of a split matrix keeps a copy of: the moments of a left
    projection (r × n each), the basis of a right one (r × n), by category."""
    out = {k: 0 for k in STATE_KEYS}
    for layout in _layouts(opt):
        for label, qs in layout.holders.items():
            m, n = qs[0].shape if len(qs[0].shape) == 2 else (0, 0)
            if len(qs[0].shape) != 2 or len(qs) < 2:
                continue
            extra = len(qs) - 1
            if m > n:
                out["bases"] += extra * RANK * n * 4
            else:
                out["lowrank_moments"] += extra * 2 * RANK * n * 4
    return [out[k] for k in STATE_KEYS]


def count_cut_rows(opt):
    return sum(len(cut_rows(qs)) for layout in _layouts(opt) for qs in layout.holders.values()
               if len(qs[0].shape) == 2 and len(qs) > 1)


def check_resume(stage, steps=4):
    data = batches(2 * steps, seed=5)
    engine, _ = engine_for(stage)
    train(engine, data)
    straight = full_weights(engine)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = [tmp]
        dist.broadcast_object_list(tmp, src=0)
        engine, _ = engine_for(stage)
        train(engine, data[:steps])
        engine.save_checkpoint(tmp[0], tag="half")
        dist.barrier()
        engine, _ = engine_for(stage, make_model(seed=99))
        engine.load_checkpoint(tmp[0], tag="half")
        train(engine, data[steps:])
        resumed = full_weights(engine)
        dist.barrier()
    return {"bitwise": all(torch.equal(straight[n], resumed[n]) for n in straight),
            "max_diff": max(float((straight[n] - resumed[n]).abs().max()) for n in straight)}


def main():
    out_path, checks = sys.argv[1], sys.argv[2:]
    deepspeed.init_distributed(dist_backend="gloo")
    results = {"world": dist.get_world_size()}
    for check in checks:
        kind, stage = check.split(":")
        fn = {"equiv": check_equivalence, "resume": check_resume}[kind]
        results[check] = fn(int(stage))
    if dist.get_rank() == 0:
        with open(out_path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(out_path + ".tmp", out_path)
    dist.barrier()


if __name__ == "__main__":
    main()
