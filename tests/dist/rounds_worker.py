"""Ranks that post different rounds of sums raise instead of hanging (launched by torchrun, 2 ranks).

Usage: torchrun --nproc_per_node 2 tests/dist/rounds_worker.py OUT.json
Two column-parallel matrices stepped by LDAdam in tensor_parallel="global" mode (the rows split
between the ranks, so each phase of their math is a round of sums over both).  Rank 1 is then
made to post a round rank 0 does not (a test hook: an extra sum patched into the math), and
every rank records the error it raised; rank 0 writes them all to OUT.json.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import finish  # noqa: E402

import ds_lowrank.optim.ldadam as ldadam_mod  # noqa: E402
from ds_lowrank import LDAdam  # noqa: E402
from ds_lowrank.distributed import comm, phases  # noqa: E402

# column-parallel (rows split), both projected on the left: the split axis is the basis axis
SHAPES = {"wide": (8, 24), "wide2": (12, 30)}
STEPS = 4


def weights_and_grads(steps):
    gen = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    grads = [{n: torch.randn(s, generator=gen) + 0.2 for n, s in SHAPES.items()} for _ in range(steps)]
    return weights, grads


def run(steps=STEPS, world=None):
    """``steps`` steps on this rank's rows (all rows with ``world=1``): the weights and the counts."""
    rank, world = (0, 1) if world == 1 else (dist.get_rank(), dist.get_world_size())
    weights, grads = weights_and_grads(steps)
    params = {}
    for n, w in weights.items():
        params[n] = torch.nn.Parameter(w.chunk(world, 0)[rank].clone())
        if world > 1:
            params[n].tensor_model_parallel, params[n].partition_dim, params[n].partition_stride = True, 0, 1
    opt = LDAdam([{"params": list(params.items()), "tensor_parallel": "global" if world > 1 else "local"}],
                 lr=1e-2, rank=3)
    if world > 1:
        opt.set_tensor_parallel_group(dist.group.WORLD)
    runs = [0]
    together = phases.run_together

    def counted(*args, **kwargs):
        runs[0] += 1
        return together(*args, **kwargs)
    phases.run_together = counted
    comm.SENT.clear()
    try:
        for g in grads:
            for n, p in params.items():
                p.grad = g[n].chunk(world, 0)[rank].clone()
            opt.step()
    finally:
        phases.run_together = together
    return params, dict(comm.SENT), runs[0]


def agree():
    whole, _, _ = run(world=1)
    params, sent, runs = run()
    err = 0.0
    for n, p in params.items():
        parts = [torch.empty_like(p.detach()) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, p.detach().contiguous())
        err = max(err, float((torch.cat(parts) - whole[n].detach()).abs().max() / whole[n].detach().abs().max()))
    return {"rel_err": err, "reduce": sent.get("reduce", 0), "check": sent.get("check", 0), "runs": runs}


def mismatch(hook) -> list[str]:
    """Two steps (a first and a warm one) with ``hook`` patched into rank 1's math; every rank's
    error."""
    ours = hook() if dist.get_rank() == 1 else {}
    originals = {name: getattr(ldadam_mod, name) for name in ours}
    error = None
    try:
        for name, fn in ours.items():
            setattr(ldadam_mod, name, fn)
        run(steps=2)
    except phases.RoundMismatch as err:
        error = f"{type(err).__name__}: {err}"
    finally:
        for name, fn in originals.items():
            setattr(ldadam_mod, name, fn)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return errors


def same_size_before_warm_basis():
    """An extra sum of the size of warm_basis's first one, posted before it."""
    warm_basis = ldadam_mod.warm_basis

    def hooked(A, P_prev, M, bc1, rho, reduce, seeds):
        yield from reduce.basis_axis(torch.zeros(A.shape[0], A.shape[-1], P_prev.shape[-1]))
        return (yield from warm_basis(A, P_prev, M, bc1, rho, reduce, seeds))
    return {"warm_basis": hooked}


def other_size_before_warm_basis():
    warm_basis = ldadam_mod.warm_basis

    def hooked(A, P_prev, M, bc1, rho, reduce, seeds):
        yield from reduce.basis_axis(torch.zeros(A.shape[0], A.shape[-1] + 5, P_prev.shape[-1]))
        return (yield from warm_basis(A, P_prev, M, bc1, rho, reduce, seeds))
    return {"warm_basis": hooked}


def one_more_round():
    """An extra sum after the last of LDAdam's step."""
    ldadam_update = ldadam_mod.ldadam_update

    def hooked(*args, **kwargs):
        out = yield from ldadam_update(*args, **kwargs)
        yield from kwargs["reduce"].basis_axis(torch.zeros(3))
        return out
    return {"ldadam_update": hooked}


def main():
    out_path = sys.argv[1]
    dist.init_process_group("gloo")
    results = {"agree": agree()}
    os.environ[phases.CHECK_ROUNDS] = "1"
    results["agree_checked"] = agree()
    del os.environ[phases.CHECK_ROUNDS]
    results["phase"] = mismatch(same_size_before_warm_basis)
    after = torch.ones(1)
    dist.all_reduce(after)
    results["after_phase"] = after.item()
    os.environ[phases.CHECK_ROUNDS] = "1"
    results["size"] = mismatch(other_size_before_warm_basis)
    results["rounds"] = mismatch(one_more_round)
    finish(out_path, results)


if __name__ == "__main__":
    main()
