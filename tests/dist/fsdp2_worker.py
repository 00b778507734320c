"""FSDP2 (``fully_shard``) models against one process (launched by torchrun).

Usage: torchrun --nproc_per_node N tests/dist/fsdp2_worker.py OUT.json CKPT_DIR CHECK...
Every rank builds the same model from the same seed and trains it on the same batches, so
FSDP2's averaged gradients are the single-process ones; rank 0 writes what it measured to
OUT.json.  Checks:

- ``equal``: every optimizer on an FSDP2 model equals one process training the unsharded copy,
  and so does its state (each tensor's placement, what each rank holds of it, its whole value);
  each rank's state bytes against ``ds_lowrank.memory.estimate_fsdp2``;
- ``allocated``: the same after ``get_optimizer_state_dict`` created the state before the first step;
- ``hsdp``: the same on 2-D (replicate × shard) meshes;
- ``bf16``: MixedPrecisionPolicy (bf16 compute, fp32 sharded parameters) stays close to fp32;
- ``save``: a DCP checkpoint in the middle of a run (under CKPT_DIR), the run's end, and an exact
  continuation from the checkpoint at this size;
- ``load``: continue from the checkpoint ``save`` wrote (at another size) and compare the end;
- ``adam``: torch's AdamW on an FSDP2 model, checkpointed with DCP, starts LDAdam and GaLore,
  and LDAdam's state goes back to a DCP checkpoint torch's AdamW loads;
- ``refuse``: the messages of what is not supported.
"""

import math
import functools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
import common  # noqa: E402
from common import finish, layout_report  # noqa: E402
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,  # noqa: E402
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402

from ds_lowrank import Adapprox, GaLoreAdamW, LDAdam, MicroAdam, memory  # noqa: E402
from ds_lowrank.distributed import comm  # noqa: E402

STEPS = 6
OPTIMIZERS = {
    "ldadam": lambda ps: LDAdam(ps, lr=1e-2, weight_decay=0.01, rank=2),
    "ldadam_int4": lambda ps: LDAdam(ps, lr=1e-2, rank=2, ef_dtype="int4", ef_bucket_size=4),
    "ldadam_svd": lambda ps: LDAdam(ps, lr=1e-2, rank=2, basis_init="svd"),
    "galore": lambda ps: GaLoreAdamW(ps, lr=1e-2, weight_decay=0.01, rank=2, update_proj_gap=2),
    "galore_randomized": lambda ps: GaLoreAdamW(ps, lr=1e-2, rank=2, update_proj_gap=2,
                                                proj_method="randomized"),
    "adapprox": lambda ps: Adapprox(ps, lr=1e-2, weight_decay=0.01, rank_min=1, rank_init=1, rank_max=2,
                                    rank_interval=2),
    "microadam": lambda ps: MicroAdam(ps, lr=1e-2, weight_decay=0.01, block_size=8, bucket_size=4,
                                      density=0.25, window=3, value_dtype="float32"),
}


class Net(torch.nn.Module):
    """Rows 10, 7, 2 and 11: none divides by 2 or 3 and the head's 2 rows leave a third rank
    without any; a bias-free layer and a norm (a vector) besides."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(12, 10)
        self.mid = torch.nn.Linear(10, 7, bias=False)
        self.norm = torch.nn.LayerNorm(7)
        self.head = torch.nn.Linear(7, 2)
        self.back = torch.nn.Linear(2, 11)

    def forward(self, x):
        h = torch.tanh(self.up(x))
        h = self.norm(torch.tanh(self.mid(h)))
        return self.back(torch.tanh(self.head(h)))


def model(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def batch(step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 12, generator=gen), torch.randn(16, 11, generator=gen)


def groups(net):
    """Every matrix compressed whatever its size (these are tiny), the rest in the same group."""
    return [{"params": list(net.named_parameters()), "within_adamw": False}]


def shard(net, mp=None):
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    kw = {"mesh": mesh} if mp is None else {"mesh": mesh, "mp_policy": mp}
    for layer in (net.up, net.mid, net.head, net.back):
        fully_shard(layer, **kw)
    fully_shard(net, **kw)
    return net


train = functools.partial(common.train, batch=batch)
full = common.full_state


def rel_err(a: dict, b: dict) -> float:
    return max(((a[k].float() - b[k].float()).norm() / b[k].float().norm().clamp_min(1e-30)).item() for k in b)


def check_equal(out: dict) -> None:
    for name, make in OPTIMIZERS.items():
        ref = model()
        ref_opt = make(groups(ref))
        train(ref, ref_opt, 0, STEPS)
        net = shard(model())
        comm.SENT.clear()
        opt = make(groups(net))
        train(net, opt, 0, STEPS)
        rows: list = [None] * dist.get_world_size()
        dist.all_gather_object(rows, net.head.weight.to_local().shape[0])
        per_rank: list = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, opt.state_bytes()["total"])
        params = [memory.Param(n, tuple(p.shape), 0) for n, p in net.named_parameters()]
        estimated = memory.estimate_fsdp2(None, type(opt), dist.get_world_size(), params=params,
                                          groups=opt.param_groups)
        out[f"equal:{name}"] = {"rel_err": rel_err(full(net), full(ref)), "reduce": comm.SENT["reduce"],
                                "exchange": comm.SENT["exchange"], "skipped": opt.skipped_steps,
                                "head_rows": rows, "state_per_rank": per_rank,
                                "state_estimated": [m.state for m in estimated]}
        out[f"layout:{name}"] = {**layout_report(opt), "estimated": [
            {f"{n}|{k}": math.prod(shape) * dtype.itemsize
             for n, p in net.named_parameters()
             for k, (shape, dtype) in memory.fsdp2_state(type(opt), opt.param_groups[0], tuple(p.shape),
                                                         dist.get_world_size(), rank).items()}
            for rank in range(dist.get_world_size())]}
        if name in STATE_COMPARED:
            out[f"state:{name}"] = state_layout(net, opt, ref, ref_opt)
        if name == "microadam":
            out["state:microadam"] = saved_blocks(net, opt, ref, ref_opt)


# optimizers whose whole state is compared with one process's (float state: no codes)
STATE_COMPARED = ("ldadam", "galore", "adapprox")


def state_layout(net, opt, ref, ref_opt) -> dict:
    """Per parameter and state key: its placements, the elements each rank holds, its axis along
    the matrix's columns if it has one (``column_axes``), and its whole value against one
    process's."""
    from torch.distributed.tensor import DTensor

    ref_params = dict(ref.named_parameters())
    group = opt.param_groups[0]
    out = {}
    for n, p in net.named_parameters():
        by_columns = opt.column_axes(group, tuple(p.shape)) if opt.is_compressed(group, p) and p.dim() == 2 else {}
        for key, v in opt.state[p].items():
            if not isinstance(v, DTensor):
                continue
            held: list = [None] * dist.get_world_size()
            dist.all_gather_object(held, v.to_local().numel())
            whole = v.full_tensor()
            one = ref_opt.state[ref_params[n]][key]
            err = ((whole.double() - one.double()).norm() / one.double().norm().clamp_min(1e-30)).item()
            out[f"{n}:{key}"] = {"placements": str(tuple(v.placements)), "held": held, "numel": whole.numel(),
                                 "by_columns": by_columns.get(key), "lowrank": opt.is_compressed(group, p),
                                 "rel_err": err}
    return out


def saved_blocks(net, opt, ref, ref_opt) -> dict:
    """MicroAdam's state as ``get_optimizer_state_dict`` hands it out (by blocks, in the whole
    parameter's coordinates): per parameter and key, its placements, what each rank holds, and
    the share of its whole value equal to one process's state, which the step left in place."""
    from torch.distributed.tensor import DTensor

    before = {p: {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}
    saved = get_optimizer_state_dict(net, opt)["state"]
    ref_params = dict(ref.named_parameters())
    out = {"unchanged": all(torch.equal(v, opt.state[p][k]) for p, st in before.items() for k, v in st.items())}
    for n, st in saved.items():
        one = ref_opt.state[ref_params[n]]
        for key, v in st.items():
            if not isinstance(v, DTensor):
                out[f"{n}:{key}"] = {"kind": type(v).__name__, "equal": bool(torch.equal(v, one[key]))}
                continue
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, v.to_local())     # gloo gathers no int16 (full_tensor)
            held = [t.numel() for t in parts]
            whole = torch.cat(parts, dim=v.placements[0].dim)
            out[f"{n}:{key}"] = {"kind": "DTensor", "placements": str(tuple(v.placements)), "held": held,
                                 "shape": list(whole.shape), "one_shape": list(one[key].shape),
                                 "equal": (whole == one[key]).double().mean().item()
                                 if whole.shape == one[key].shape else 0.0,
                                 "rel_err": rel_err({0: whole}, {0: one[key]})
                                 if whole.shape == one[key].shape else 1.0}
    return out


def check_allocated(out: dict) -> None:
    """State created by ``get_optimizer_state_dict`` before the first step (its zero-gradient step
    at lr 0, skipped) is taken as no state: the run still equals one process."""
    for name in ("ldadam_int4", "galore", "adapprox", "microadam"):
        make = OPTIMIZERS[name]
        ref = model()
        train(ref, make(groups(ref)), 0, STEPS)
        net = shard(model())
        opt = make(groups(net))
        get_optimizer_state_dict(net, opt)
        allocated = sum(len(st) for st in opt.state.values())
        train(net, opt, 0, STEPS)
        out[f"allocated:{name}"] = {"rel_err": rel_err(full(net), full(ref)), "allocated": allocated}


def check_bf16(out: dict) -> None:
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    ends = {}
    for key, policy in (("fp32", None), ("bf16", mp)):
        net = shard(model(), policy)
        losses = train(net, LDAdam(groups(net), lr=1e-2, rank=2), 0, 20)
        ends[key] = (full(net), losses)
    out["bf16"] = {"rel_err": rel_err(ends["bf16"][0], ends["fp32"][0]),
                   "dtypes": sorted({str(v.dtype) for v in ends["bf16"][0].values()}),
                   "first": ends["bf16"][1][0], "last": ends["bf16"][1][-1]}


def state_dicts(net, opt) -> dict:
    return {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)}


def load(net, opt, path) -> None:
    sd = state_dicts(net, opt)
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(net, sd["model"])
    set_optimizer_state_dict(net, opt, sd["optim"])


CHECKPOINTED = ("ldadam", "ldadam_int4", "galore", "adapprox", "microadam")
HALF = 3


def check_save(out: dict, root: str) -> None:
    for name in CHECKPOINTED:
        make = OPTIMIZERS[name]
        net = shard(model())
        opt = make(groups(net))
        train(net, opt, 0, HALF)
        dcp.save(state_dicts(net, opt), checkpoint_id=os.path.join(root, name))
        train(net, opt, HALF, STEPS)
        end = full(net)
        if dist.get_rank() == 0:
            torch.save(end, os.path.join(root, name + ".end.pt"))
        resumed = shard(model(seed=1))             # other weights: the checkpoint must set them
        opt = make(groups(resumed))
        load(resumed, opt, os.path.join(root, name))
        train(resumed, opt, HALF, STEPS)
        out[f"save:{name}"] = {"rel_err": rel_err(full(resumed), end),
                               "dtensors": sorted({type(v).__name__ for st in opt.state.values()
                                                   for v in st.values()})}


def check_load(out: dict, root: str) -> None:
    for name in CHECKPOINTED:
        make = OPTIMIZERS[name]
        net = shard(model(seed=1))
        opt = make(groups(net))
        load(net, opt, os.path.join(root, name))
        train(net, opt, HALF, STEPS)
        end = torch.load(os.path.join(root, name + ".end.pt"))
        ref = model()                               # one process, uninterrupted
        train(ref, make(groups(ref)), 0, STEPS)
        fresh = shard(model(seed=1))                # the weights alone, a fresh optimizer
        opt = make(groups(fresh))
        sd = {"model": get_model_state_dict(fresh)}
        dcp.load(sd, checkpoint_id=os.path.join(root, name))
        set_model_state_dict(fresh, sd["model"])
        train(fresh, opt, HALF, STEPS)
        out[f"load:{name}"] = {"rel_err": rel_err(full(net), end), "vs_one_process": rel_err(full(net), full(ref)),
                               "without_state": rel_err(full(fresh), end)}


def adam_groups(net):
    return [{"params": [p for _, p in net.named_parameters()], "lr": 1e-2, "weight_decay": 0.01}]


def check_adam(out: dict, root: str) -> None:
    """AdamW -> LDAdam and GaLore through DCP, against the same conversion in one process
    (``load_whole_state(from_adam=True)``); and LDAdam -> a DCP checkpoint torch's AdamW loads."""
    from ds_lowrank.checkpoint.torch_adamw import from_adamw, to_adamw

    net = shard(model())
    adamw = torch.optim.AdamW(adam_groups(net))
    train(net, adamw, 0, HALF)
    path = os.path.join(root, "adamw")
    dcp.save(state_dicts(net, adamw), checkpoint_id=path)
    ref = model()                                   # the same AdamW run and conversion, one process
    ref_adamw = torch.optim.AdamW(adam_groups(ref))
    train(ref, ref_adamw, 0, HALF)
    names = {p: n for n, p in ref.named_parameters()}
    adam_states = {names[p]: st for p, st in ref_adamw.state.items()}
    for name in ("ldadam", "galore"):
        make = OPTIMIZERS[name]
        net = shard(model(seed=1))
        adamw = torch.optim.AdamW(adam_groups(net))
        load(net, adamw, path)
        opt = make(groups(net))
        from_adamw(adamw, opt)
        train(net, opt, HALF, STEPS)
        one = model()
        one.load_state_dict(ref.state_dict())
        ref_opt = make(groups(one))
        ref_opt.load_whole_state(adam_states, from_adam=True)
        train(one, ref_opt, HALF, STEPS)
        fresh = shard(model(seed=1))                # the weights alone, a fresh optimizer
        adamw = torch.optim.AdamW(adam_groups(fresh))
        load(fresh, adamw, path)
        train(fresh, make(groups(fresh)), HALF, STEPS)
        result = {"rel_err": rel_err(full(net), full(one)), "without_state": rel_err(full(fresh), full(one))}
        if name == "ldadam":
            back = to_adamw(opt)
            ref_back = to_adamw(ref_opt)
            moments = {n: {k: (back.state[p][k].full_tensor()) for k in ("exp_avg", "exp_avg_sq")}
                       for n, p in net.named_parameters()}
            ref_moments = {n: ref_back.state[p] for n, p in one.named_parameters()}
            result["to_adamw"] = max(rel_err({k: m[k] for k in m}, {k: ref_moments[n][k] for k in m})
                                     for n, m in moments.items())
            back_path = os.path.join(root, "back")
            dcp.save(state_dicts(net, back), checkpoint_id=back_path)
            again = shard(model(seed=1))
            adamw = torch.optim.AdamW(adam_groups(again))
            load(again, adamw, back_path)
            train(again, adamw, STEPS, STEPS + 2)
            train(net, back, STEPS, STEPS + 2)
            result["adamw_resumed"] = rel_err(full(again), full(net))
            result["adamw_kind"] = type(adamw.state[next(again.parameters())]["exp_avg"]).__name__
        out[f"adam:{name}"] = result


def check_hsdp(out: dict) -> None:
    """HSDP (a 2-D mesh: replicated over dim 0, sharded over dim 1) equals one process, with all
    ranks in one replica or each rank a replica of its own."""
    world = dist.get_world_size()
    meshes = [(1, world), (world, 1)] + ([(2, world // 2)] if world >= 4 and world % 2 == 0 else [])
    for replicas, shards in meshes:
        mesh = init_device_mesh("cpu", (replicas, shards), mesh_dim_names=("replicate", "shard"))
        for name in ("ldadam", "adapprox", "microadam"):
            make = OPTIMIZERS[name]
            ref = model()
            train(ref, make(groups(ref)), 0, STEPS)
            net = model()
            for layer in (net.up, net.mid, net.head, net.back, net):
                fully_shard(layer, mesh=mesh)
            opt = make(groups(net))
            train(net, opt, 0, STEPS)
            out[f"hsdp:{replicas}x{shards}:{name}"] = rel_err(full(net), full(ref))
            if name == "ldadam":                # the placements of the r × n state
                group = opt.param_groups[0]
                out[f"hsdp:{replicas}x{shards}:placements"] = sorted(
                    {str(tuple(v.placements)) for p in net.parameters() for k, v in opt.state[p].items()
                     if opt.is_compressed(group, p) and k in opt.column_axes(group, tuple(p.shape))})


def check_hsdp_save(out: dict, root: str) -> None:
    """MicroAdam's DCP checkpoint on HSDP's 2-D meshes (its state handed out ``(Replicate(), Shard)``)
    resumes exactly."""
    world = dist.get_world_size()
    make = OPTIMIZERS["microadam"]
    for replicas, shards in ((1, world), (world, 1)):
        mesh = init_device_mesh("cpu", (replicas, shards), mesh_dim_names=("replicate", "shard"))

        def hsdp(net):
            for layer in (net.up, net.mid, net.head, net.back, net):
                fully_shard(layer, mesh=mesh)
            return net
        net = hsdp(model())
        opt = make(groups(net))
        train(net, opt, 0, HALF)
        path = os.path.join(root, f"hsdp_{replicas}x{shards}")
        saved = state_dicts(net, opt)
        dcp.save(saved, checkpoint_id=path)
        train(net, opt, HALF, STEPS)
        resumed = hsdp(model(seed=1))
        opt = make(groups(resumed))
        load(resumed, opt, path)
        train(resumed, opt, HALF, STEPS)
        placements = {str(tuple(v.placements)) for st in saved["optim"]["state"].values() for v in st.values()
                      if hasattr(v, "placements")}
        out[f"hsdp_save:{replicas}x{shards}"] = {"rel_err": rel_err(full(resumed), full(net)),
                                                 "placements": sorted(placements)}


def check_refuse(out: dict) -> None:
    """What the optimizers cannot step on FSDP2 is refused with a message saying what to do."""
    def message(fn) -> str:
        try:
            fn()
        except (NotImplementedError, ValueError) as err:
            return str(err)
        return ""

    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    columns = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
    columns.grad = distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)])
    out["refuse:columns"] = message(LDAdam([("w", columns)], rank=2).step)
    net = shard(model())
    plain = torch.nn.Parameter(torch.zeros(3, 3))
    out["refuse:mixed"] = message(lambda: LDAdam([{"params": [*net.parameters(), plain]}], rank=2).step())
    opt = OPTIMIZERS["microadam"](groups(net))
    train(net, opt, 0, 1)
    other = OPTIMIZERS["microadam"](groups(shard(model())))
    saved = opt.state_dict()
    saved["param_groups"][0]["density"] = 0.5           # a state its groups' settings do not describe
    out["refuse:microadam_settings"] = message(lambda: other.load_state_dict(saved))


def main() -> None:
    out_path, root, checks = sys.argv[1], sys.argv[2], sys.argv[3:]
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    out = {"world": dist.get_world_size()}
    for check in checks:
        if check == "equal":
            check_equal(out)
        elif check == "allocated":
            check_allocated(out)
        elif check == "bf16":
            check_bf16(out)
        elif check == "save":
            check_save(out, root)
        elif check == "load":
            check_load(out, root)
        elif check == "hsdp":
            check_hsdp(out)
        elif check == "refuse":
            check_refuse(out)
        elif check == "hsdp_save":
            check_hsdp_save(out, root)
        elif check == "adam":
            check_adam(out, root)
    finish(out_path, out)


if __name__ == "__main__":
    main()
