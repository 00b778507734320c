"""Megatron-style tensor-parallel shards against one process (launched by torchrun).

Usage: torchrun --nproc_per_node N tests/dist/tp_worker.py OUT.json
Each rank holds a shard of every matrix, marked as Megatron marks them (``tensor_model_parallel``,
``partition_dim``: 0 for a column-parallel layer's rows, 1 for a row-parallel layer's columns), and
its slice of the same full gradients; rank 0 writes what it measured to OUT.json.
"""

import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import finish  # noqa: E402

from ds_lowrank import Adapprox, GaLoreAdamW, LDAdam  # noqa: E402
from ds_lowrank.distributed import comm  # noqa: E402

# name -> (full shape, partition_dim); every split dimension divides by 2 and by 3
MATRICES = {"wide_col": ((6, 24), 0), "tall_col": ((24, 12), 0), "wide_row": ((12, 30), 1),
            "tall_row": ((36, 12), 1), "square_row": ((18, 18), 1),
            # gradients in 2 of its rows (see full_grads): rank 2, below the optimizers' rank 4
            "deficient_col": ((48, 60), 0), "deficient_row": ((48, 60), 1)}
DEFICIENT_ROWS = [5, 40]
STEPS = 6
OPTIMIZERS = {
    "ldadam": lambda groups, **kw: LDAdam(groups, lr=1e-2, weight_decay=0.01, rank=4, **kw),
    "ldadam_svd": lambda groups, **kw: LDAdam(groups, lr=1e-2, rank=4, basis_init="svd", **kw),
    "galore": lambda groups, **kw: GaLoreAdamW(groups, lr=1e-2, rank=4, update_proj_gap=2, **kw),
    "galore_randomized": lambda groups, **kw: GaLoreAdamW(groups, lr=1e-2, rank=4, update_proj_gap=2,
                                                          proj_method="randomized", **kw),
    "adapprox": lambda groups, **kw: Adapprox(groups, lr=1e-2, weight_decay=0.01, rank_min=1, rank_init=2,
                                              rank_max=4, rank_interval=2, **kw),
    # small enough for every shard at 3 ranks, for the local mode
    "ldadam_r2": lambda groups, **kw: LDAdam(groups, lr=1e-2, weight_decay=0.01, rank=2, **kw),
}


def full_weights():
    gen = torch.Generator().manual_seed(0)
    out = {name: torch.randn(shape, generator=gen) for name, (shape, _) in MATRICES.items()}
    out["norm"] = torch.randn(12, generator=gen)
    return out


def full_grads(step):
    gen = torch.Generator().manual_seed(100 + step)
    out = {name: torch.randn(shape, generator=gen) + 0.3 for name, (shape, _) in MATRICES.items()}
    for name in ("deficient_col", "deficient_row"):
        rows = torch.zeros(MATRICES[name][0][0], dtype=torch.bool)
        rows[DEFICIENT_ROWS] = True
        out[name] = out[name] * rows[:, None]
    out["norm"] = torch.randn(12, generator=gen)
    return out


def shard(t, dim, rank, world):
    return t.chunk(world, dim)[rank].clone()


def groups_of(params, mode):
    matrices = [(n, params[n]) for n in MATRICES]
    # within_adamw=False: every matrix compressed, although some of these small ones would cost
    # more than AdamW that way (and be kept dense by default)
    return [{"params": matrices, "tensor_parallel": mode, "within_adamw": False},
            {"params": [("norm", params["norm"])], "compress": False}]


def one_process(name, steps=STEPS):
    params = {n: torch.nn.Parameter(w) for n, w in full_weights().items()}
    opt = OPTIMIZERS[name](groups_of(params, "local"))
    for t in range(steps):
        for n, g in full_grads(t).items():
            params[n].grad = g
        opt.step()
    return {n: p.detach() for n, p in params.items()}


def sharded(name, mode, poison=None, steps=STEPS):
    """The run on shards; ``poison`` = (step, matrix): that shard's gradient is NaN on rank 0 only."""
    rank, world = dist.get_rank(), dist.get_world_size()
    params = {}
    for n, w in full_weights().items():
        if n in MATRICES:
            dim = MATRICES[n][1]
            p = torch.nn.Parameter(shard(w, dim, rank, world))
            p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, 1
        else:
            p = torch.nn.Parameter(w)
        params[n] = p
    opt = OPTIMIZERS[name](groups_of(params, mode))
    opt.set_tensor_parallel_group(dist.group.WORLD)
    comm.SENT.clear()
    for t in range(steps):
        for n, g in full_grads(t).items():
            params[n].grad = shard(g, MATRICES[n][1], rank, world) if n in MATRICES else g
        if poison is not None and t == poison[0] and rank == 0:
            params[poison[1]].grad[0, 0] = float("nan")
        opt.step()
    gathered = {}
    for n, p in params.items():
        if n in MATRICES:
            parts = [torch.empty_like(p.detach()) for _ in range(world)]
            dist.all_gather(parts, p.detach().contiguous())
            gathered[n] = torch.cat(parts, MATRICES[n][1])
        else:
            gathered[n] = p.detach()
    return gathered, dict(comm.SENT), opt


def rel_err(a, b):
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max()) for n in b)


def megatron_layers(steps=5):
    """Megatron-core's own column- and row-parallel layers, trained through their forward and
    backward, the TP group taken from megatron's parallel_state: the same as one process."""
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    world = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    torch.manual_seed(0)
    cfg = ModelParallelConfig(tensor_model_parallel_size=world, use_cpu_initialization=True)
    col = ColumnParallelLinear(8, 12, config=cfg, init_method=torch.nn.init.xavier_normal_, bias=False)
    row = RowParallelLinear(12, 6, config=cfg, init_method=torch.nn.init.xavier_normal_, bias=False,
                            input_is_parallel=True, skip_bias_add=True)

    def gathered(p, dim):
        parts = [torch.empty_like(p.detach()) for _ in range(world)]
        dist.all_gather(parts, p.detach().contiguous())
        return torch.cat(parts, dim)

    full = torch.nn.Sequential(torch.nn.Linear(8, 12, bias=False), torch.nn.Linear(12, 6, bias=False))
    with torch.no_grad():
        full[0].weight.copy_(gathered(col.weight, 0))
        full[1].weight.copy_(gathered(row.weight, 1))
    ours = LDAdam([{"params": [("col", col.weight), ("row", row.weight)], "tensor_parallel": "global"}],
                  lr=1e-2, rank=4)
    ref = LDAdam([("col", full[0].weight), ("row", full[1].weight)], lr=1e-2, rank=4)
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(5, 8, generator=gen)
        for opt, loss in ((ours, lambda: row(col(x)[0])[0]), (ref, lambda: full(x))):
            opt.zero_grad()
            loss().square().mean().backward()
            opt.step()
    got = {"col": gathered(col.weight, 0), "row": gathered(row.weight, 1)}
    want = {"col": full[0].weight.detach(), "row": full[1].weight.detach()}
    parallel_state.destroy_model_parallel()
    return {"rel_err": rel_err(got, want), "attributes": [col.weight.partition_dim, row.weight.partition_dim]}


def main():
    out_path = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"world": world}
    for name in OPTIMIZERS:
        if name == "ldadam_r2":
            continue
        got, sent, _ = sharded(name, "global")
        results[f"global:{name}"] = {"rel_err": rel_err(got, one_process(name)), "reduce": sent.get("reduce", 0)}
    # local mode: each shard on its own, with nothing sent; rank 0's shards equal one process
    # stepping those shards as whole matrices
    got, sent, _ = sharded("ldadam_r2", "local")
    mine = {n: shard(w, MATRICES[n][1], rank, world) if n in MATRICES else w for n, w in got.items()}
    params = {n: torch.nn.Parameter(shard(w, MATRICES[n][1], rank, world) if n in MATRICES else w)
              for n, w in full_weights().items()}
    opt = OPTIMIZERS["ldadam_r2"](groups_of(params, "local"))
    for t in range(STEPS):
        for n, g in full_grads(t).items():
            params[n].grad = shard(g, MATRICES[n][1], rank, world) if n in MATRICES else g
        opt.step()
    alone = {n: p.detach() for n, p in params.items()}
    results["local:ldadam"] = {"rel_err": rel_err(mine, alone), "sent": sent,
                               "vs_one_process": rel_err(got, one_process("ldadam_r2"))}
    # a shard whose gradient is not finite on one rank: every rank skips that matrix
    got, _, opt = sharded("ldadam", "global", poison=(3, "tall_row"))
    results["skip"] = {"skipped": opt.skipped_steps,
                       "finite": all(bool(torch.isfinite(v).all()) for v in got.values())}
    # the whole matrices' sizes a shard was checked against: a rank too large for the shard but
    # not for the whole matrix is accepted in global mode
    ok = True
    try:
        sharded_params = {n: torch.nn.Parameter(shard(w, MATRICES[n][1], rank, world))
                          for n, w in full_weights().items() if n in MATRICES}
        for n, p in sharded_params.items():
            p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, MATRICES[n][1], 1
        opt = LDAdam([{"params": [("wide_col", sharded_params["wide_col"])], "tensor_parallel": "global"}],
                     rank=math.ceil(6 / world) + 1)
        opt.set_tensor_parallel_group(dist.group.WORLD)
        sharded_params["wide_col"].grad = torch.randn_like(sharded_params["wide_col"])
        opt.step()
    except ValueError:
        ok = False
    results["rank_checked_whole"] = ok
    results["megatron"] = megatron_layers()
    finish(out_path, results)


if __name__ == "__main__":
    main()
