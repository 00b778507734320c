"""FSDP2 combined with torch's tensor parallelism against one process (launched by torchrun).

Usage: torchrun --nproc_per_node N tests/dist/fsdp2_tp_worker.py OUT.json CKPT_DIR DPxTP CHECK...
The model is ``parallelize_module``d over ``mesh["tp"]`` (column-wise, row-wise, column-wise,
row-wise layers) then ``fully_shard``ed over ``mesh["dp"]``, the torchtitan recipe.  Every rank
trains on the same batches, so the gradients are the single-process ones; rank 0 writes what it
measured to OUT.json.  Checks:

- ``equal``: every projection optimizer, in both ``tensor_parallel`` modes, equals one process:
  stepping the whole matrices (``"global"``) or each TP shard as a matrix of its own
  (``"local"``, one process holding the shards as separate parameters); MicroAdam likewise in
  local mode; in global mode the state, gathered whole, equals one process's; every rank's
  ``state_bytes()`` against ``ds_lowrank.memory.estimate_fsdp2`` with ``tp``, to the byte;
- ``save``: a DCP checkpoint in the middle of a run (each mode; MicroAdam's in local mode), the
  run's end, and an exact continuation at this layout;
- ``load``: the checkpoints ``save`` wrote at dp2×tp2 continued at DPxTP (local mode's where
  the TP size is the same);
- ``meshes``: matrices split over different groups whose holders look alike;
- ``diagnostics``: ``LowRankProbe``'s metrics against the same probe on one process, in both
  modes (local mode: each TP shard a matrix of its own);
- ``plain``: a checkpoint of ``fully_shard`` alone continued on the tensor-parallel model;
- ``refuse``: the messages of what is not supported.
"""

import functools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
import common  # noqa: E402
from common import finish  # noqa: E402
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,  # noqa: E402
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module  # noqa: E402

from ds_lowrank import Adapprox, GaLoreAdamW, LDAdam, MicroAdam, memory  # noqa: E402
from ds_lowrank.distributed import comm  # noqa: E402
from ds_lowrank.training.diagnostics import LowRankProbe  # noqa: E402

STEPS, HALF = 6, 3
OPTIMIZERS = {
    "ldadam": lambda ps: LDAdam(ps, lr=1e-2, weight_decay=0.01, rank=2),
    "ldadam_int4": lambda ps: LDAdam(ps, lr=1e-2, rank=2, ef_dtype="int4", ef_bucket_size=4),
    "galore": lambda ps: GaLoreAdamW(ps, lr=1e-2, weight_decay=0.01, rank=2, update_proj_gap=2),
    "galore_randomized": lambda ps: GaLoreAdamW(ps, lr=1e-2, rank=2, update_proj_gap=2,
                                                proj_method="randomized"),
    "adapprox": lambda ps: Adapprox(ps, lr=1e-2, weight_decay=0.01, rank_min=1, rank_init=1, rank_max=2,
                                    rank_interval=2),
    # blocks of 8 cut by the dp split of every TP shard at dp 2 (its rows' spans: 36 | 24 of the
    # up's 60 elements, 20 | 15 of the mid's 35, ...), so cut blocks are exchanged
    "microadam": lambda ps: MicroAdam(ps, lr=1e-2, weight_decay=0.01, block_size=8, bucket_size=4,
                                      density=0.25, window=3, value_dtype="float32"),
}
# elementwise: the whole matrix adds nothing, so global mode refuses it
LOCAL_ONLY = ("microadam",)


def modes(name: str) -> tuple[str, ...]:
    return ("local",) if name in LOCAL_ONLY else ("global", "local")
PLAN = {"up": ColwiseParallel, "mid": RowwiseParallel, "head": ColwiseParallel, "back": RowwiseParallel}
# the axis PLAN shards each parameter along (the others are replicated over tp)
AXES = {"up.weight": 0, "up.bias": 0, "mid.weight": 1, "head.weight": 0, "head.bias": 0, "back.weight": 1}


class Net(torch.nn.Module):
    """At dp2×tp2 the column-wise ``up``'s 5 rows a shard split 3 and 2, and the row-wise
    ``back``'s 3 rows, split over all four ranks in global mode, leave one rank none (the
    activations between TP layers must split evenly: torch's tensor parallelism assumes it).
    Every TP shard is at least 2 × 2 (the rank)."""

    def __init__(self, head: int = 4) -> None:
        super().__init__()
        self.up = torch.nn.Linear(12, 10)
        self.mid = torch.nn.Linear(10, 7, bias=False)
        self.norm = torch.nn.LayerNorm(7)
        self.head = torch.nn.Linear(7, head)
        self.back = torch.nn.Linear(head, 3)

    def forward(self, x):
        h = torch.tanh(self.up(x))
        h = self.norm(torch.tanh(self.mid(h)))
        return self.back(torch.tanh(self.head(h)))


def model(seed: int = 0, head: int = 4) -> Net:
    torch.manual_seed(seed)
    return Net(head)


def batch(step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 12, generator=gen), torch.randn(16, 3, generator=gen)


class Reference:
    """One process: the model with each tensor-parallel parameter held as ``shards`` separate
    parameters (torch.chunk's split, as DTensor's) under the same name, so that each shard is a
    matrix of its own (``shards`` 1: the whole model)."""

    def __init__(self, shards: int, seed: int = 0, head: int = 4) -> None:
        self.net = model(seed, head)
        self.parts = {}
        for n, p in self.net.named_parameters():
            axis = AXES.get(n)
            chunks = [p.detach()] if axis is None or shards == 1 else p.detach().chunk(shards, axis)
            self.parts[n] = (axis, [torch.nn.Parameter(c.clone()) for c in chunks])
        self.named = [(n, leaf) for n, (_, leaves) in self.parts.items() for leaf in leaves]

    def whole(self) -> dict:
        return {n: leaves[0] if len(leaves) == 1 else torch.cat(leaves, axis)
                for n, (axis, leaves) in self.parts.items()}

    def __call__(self, x):
        return torch.func.functional_call(self.net, self.whole(), (x,))

    def full(self) -> dict:
        return {n: v.detach().clone() for n, v in self.whole().items()}


def groups(named, mode: str):
    return [{"params": list(named), "within_adamw": False, "tensor_parallel": mode}]


def build(mesh, seed: int = 0, head: int = 4) -> Net:
    net = model(seed, head)
    parallelize_module(net, mesh["tp"], {name: style() for name, style in PLAN.items()})
    for layer in (net.up, net.mid, net.norm, net.head, net.back, net):
        fully_shard(layer, mesh=mesh["dp"])
    return net


train = functools.partial(common.train, batch=batch)
full = common.full_state


def rel_err(a: dict, b: dict) -> float:
    return max(((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-30)).item()
               for k in b)


def gathered(v: DTensor) -> torch.Tensor:
    """DTensor ``v`` whole, each rank's block put where DTensor's layout says it lies (what DCP
    writes; torch 2.13's ``full_tensor`` misplaces uneven blocks of ``(Shard(1), Shard(1))``)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    size, offset = compute_local_shape_and_global_offset(v.shape, v.device_mesh, v.placements)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (v.to_local(), offset))
    out = v.to_local().new_zeros(v.shape)
    for local, at in parts:
        out[tuple(slice(a, a + s) for a, s in zip(at, local.shape))] = local
    return out


def whole_state(net, opt) -> dict:
    """Each DTensor state tensor gathered whole, by parameter name and key."""
    return {f"{n}:{k}": gathered(v) for n, p in net.named_parameters()
            for k, v in opt.state[p].items() if isinstance(v, DTensor)}


def check_equal(out: dict, mesh) -> None:
    tp = mesh.size(1)
    for mode in ("global", "local"):
        for name, make in OPTIMIZERS.items():
            if mode not in modes(name):
                continue
            ref = Reference(1 if mode == "global" else tp)
            ref_opt = make(groups(ref.named, mode))
            train(ref, ref_opt, 0, STEPS)
            net = build(mesh)
            comm.SENT.clear()
            opt = make(groups(net.named_parameters(), mode))
            train(net, opt, 0, STEPS)
            result = {"rel_err": rel_err(full(net), ref.full()), "skipped": opt.skipped_steps,
                      "reduce": comm.SENT["reduce"], "exchange": comm.SENT["exchange"],
                      "placements": sorted({f"{n}:{k}:{tuple(v.placements)}" for n, p in net.named_parameters()
                                            if n in AXES for k, v in opt.state[p].items()
                                            if isinstance(v, DTensor)})}
            per_rank: list = [None] * dist.get_world_size()
            dist.all_gather_object(per_rank, opt.state_bytes()["total"])
            params = [memory.Param(n, tuple(p.shape), 0, AXES.get(n)) for n, p in net.named_parameters()]
            estimated = memory.estimate_fsdp2(None, type(opt), dist.get_world_size(), params=params,
                                              groups=opt.param_groups, tp=tp)
            result.update(state_per_rank=per_rank, state_estimated=[m.state for m in estimated])
            if mode == "global":
                mine = whole_state(net, opt)
                one = {f"{n}:{k}": v for n, (_, leaves) in ref.parts.items()
                       for k, v in ref_opt.state[leaves[0]].items()}
                result["state_err"] = max(rel_err({0: v}, {0: one[key]}) for key, v in mine.items())
                result["state_keys"] = len(mine)
            out[f"equal:{mode}:{name}"] = result


def check_meshes(out: dict, mesh) -> None:
    """Matrices split over the flattened mesh and over ``dp`` alone (the norm, on the 1-D ``dp``
    mesh of ``fully_shard``, which Adapprox compresses) whose holders are the same positions of
    different ranks (at dp2×tp2 a column-wise head of 2 rows is held by flattened ranks 0 and 1,
    the norm by dp ranks 0 and 1): each sums over its own."""
    make = OPTIMIZERS["adapprox"]
    ref = Reference(1, head=2)
    train(ref, make(groups(ref.named, "global")), 0, STEPS)
    net = build(mesh, head=2)
    opt = make(groups(net.named_parameters(), "global"))
    train(net, opt, 0, STEPS)
    out["meshes:adapprox"] = {"rel_err": rel_err(full(net), ref.full()),
                              "head_rows": gather_rows(net.head.weight)}


MEASURED = (0, 2, 5)        # the first step (no previous basis: no drift) and later ones


def probed(net, opt) -> dict:
    """``LowRankProbe``'s metrics at the ``MEASURED`` steps of a ``STEPS``-step run."""
    probe = LowRankProbe(opt)
    out = {}
    for step in range(STEPS):
        if step in MEASURED:
            probe.arm()
        train(net, opt, step, step + 1)
        if step in MEASURED:
            out[step] = probe.collect()
    return out


def check_diagnostics(out: dict, mesh) -> None:
    """The probe on the tensor-parallel model equals the probe on one process stepping the same
    matrices: the whole ones in global mode, each TP shard as a parameter of its own in local
    mode (the right projections' bases in blocks of columns over the ranks holding rows)."""
    tp = mesh.size(1)
    for mode in ("global", "local"):
        for name in ("ldadam", "ldadam_int4", "galore"):
            make = OPTIMIZERS[name]
            ref = Reference(1 if mode == "global" else tp)
            want = probed(ref, make(groups(ref.named, mode)))
            net = build(mesh)
            got = probed(net, make(groups(net.named_parameters(), mode)))
            out[f"diagnostics:{mode}:{name}"] = {"got": got, "want": want}


def gather_rows(p) -> list:
    rows: list = [None] * dist.get_world_size()
    dist.all_gather_object(rows, p.to_local().shape[0])
    return rows


CHECKPOINTED = ("ldadam", "galore", "adapprox", "microadam")


def state_dicts(net, opt) -> dict:
    return {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)}


def load(net, opt, path) -> None:
    sd = state_dicts(net, opt)
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(net, sd["model"])
    set_optimizer_state_dict(net, opt, sd["optim"])


def check_save(out: dict, mesh, root: str) -> None:
    """Both modes: the global checkpoints are those ``load`` continues at other layouts."""
    for mode in ("global", "local"):
        for name in CHECKPOINTED:
            if mode not in modes(name):
                continue
            make = OPTIMIZERS[name]
            net = build(mesh)
            opt = make(groups(net.named_parameters(), mode))
            train(net, opt, 0, HALF)
            path = os.path.join(root, name if mode == "global" else f"{name}_{mode}")
            dcp.save(state_dicts(net, opt), checkpoint_id=path)
            train(net, opt, HALF, STEPS)
            end = full(net)
            if dist.get_rank() == 0:
                torch.save(end, path + ".end.pt")
            resumed = build(mesh, seed=1)              # other weights: the checkpoint must set them
            opt = make(groups(resumed.named_parameters(), mode))
            load(resumed, opt, path)
            train(resumed, opt, HALF, STEPS)
            out[f"save:{mode}:{name}"] = {"rel_err": rel_err(full(resumed), end)}
            if name in LOCAL_ONLY:
                out[f"saved:{mode}:{name}"] = saved_placements(resumed, opt)


def saved_placements(net, opt) -> list[str]:
    """``parameter:key:placements:shape`` of the DTensors ``get_optimizer_state_dict`` hands out
    for the tensor-parallel parameters (MicroAdam's, by blocks; collective)."""
    saved = get_optimizer_state_dict(net, opt)["state"]
    return sorted(f"{n}:{k}:{tuple(v.placements)}:{list(v.shape)}" for n, st in saved.items() if n in AXES
                  for k, v in st.items() if isinstance(v, DTensor))


def check_load(out: dict, layout: str, root: str) -> None:
    """The global checkpoints at ``layout``; the local ones too where it keeps dp2×tp2's TP size."""
    dp, tp = (int(v) for v in layout.split("x"))
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    for mode in ("global", "local") if tp == 2 else ("global",):
        for name in CHECKPOINTED:
            if mode not in modes(name):
                continue
            make = OPTIMIZERS[name]
            path = os.path.join(root, name if mode == "global" else f"{name}_{mode}")
            net = build(mesh, seed=1)
            opt = make(groups(net.named_parameters(), mode))
            load(net, opt, path)
            train(net, opt, HALF, STEPS)
            end = torch.load(path + ".end.pt")
            fresh = build(mesh, seed=1)                 # the weights alone, a fresh optimizer
            sd = {"model": get_model_state_dict(fresh)}
            dcp.load(sd, checkpoint_id=path)
            set_model_state_dict(fresh, sd["model"])
            train(fresh, make(groups(fresh.named_parameters(), mode)), HALF, STEPS)
            key = f"load:{layout}:{name}" if mode == "global" else f"load:{layout}:{mode}:{name}"
            out[key] = {"rel_err": rel_err(full(net), end), "without_state": rel_err(full(fresh), end)}


def check_plain(out: dict, root: str) -> None:
    """A checkpoint of ``fully_shard`` alone (a 1-D mesh) continues on the tensor-parallel model
    in global mode (1 × world): the state of the whole matrices, the same whatever the layout."""
    world = dist.get_world_size()
    flat = init_device_mesh("cpu", (world,))
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    for name in ("ldadam", "galore"):
        make = OPTIMIZERS[name]
        net = model()
        for layer in (net.up, net.mid, net.norm, net.head, net.back, net):
            fully_shard(layer, mesh=flat)
        opt = make(groups(net.named_parameters(), "global"))
        train(net, opt, 0, HALF)
        path = os.path.join(root, f"plain_{name}")
        dcp.save(state_dicts(net, opt), checkpoint_id=path)
        ref = Reference(1)                          # one process, uninterrupted
        train(ref, make(groups(ref.named, "global")), 0, STEPS)
        tp = build(mesh, seed=1)
        opt = make(groups(tp.named_parameters(), "global"))
        load(tp, opt, path)
        train(tp, opt, HALF, STEPS)
        out[f"plain:{name}"] = {"rel_err": rel_err(full(tp), ref.full())}


def check_refuse(out: dict, mesh) -> None:
    def message(fn) -> str:
        try:
            fn()
        except (NotImplementedError, ValueError) as err:
            return str(err)
        return ""

    net = build(mesh)
    opt = MicroAdam(groups(net.named_parameters(), "global"), lr=1e-2, block_size=8, density=0.25)
    out["refuse:microadam"] = message(lambda: train(net, opt, 0, 1))
    from torch.distributed.tensor import Shard, distribute_tensor

    # a row-wise weight of 7 columns: TP shards of 4 and 3
    uneven = torch.nn.Parameter(distribute_tensor(torch.randn(4, 7), mesh, [Shard(0), Shard(1)]))
    uneven.grad = distribute_tensor(torch.randn(4, 7), mesh, [Shard(0), Shard(1)])
    opt = OPTIMIZERS["microadam"](groups([("w", uneven)], "local"))
    out["refuse:microadam_uneven"] = message(opt.step)
    net = build(mesh, head=2)                       # a 1 × 7 shard of the head, at rank 2
    opt = LDAdam(groups(net.named_parameters(), "local"), lr=1e-2, rank=2)
    out["refuse:local_rank"] = message(lambda: train(net, opt, 0, 1))

    odd = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1), Shard(0)]))
    odd.grad = distribute_tensor(torch.randn(4, 6), mesh, [Shard(1), Shard(0)])
    out["refuse:layout"] = message(LDAdam([("w", odd)], rank=2).step)
    from ds_lowrank.checkpoint.torch_adamw import from_adamw

    net = build(mesh)
    adamw = torch.optim.AdamW(net.parameters())
    train(net, adamw, 0, 1)
    out["refuse:from_adamw"] = message(lambda: from_adamw(adamw, LDAdam(groups(net.named_parameters(), "global"),
                                                                        rank=2)))


def main() -> None:
    out_path, root, layout, checks = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    dist.init_process_group("gloo")
    dp, tp = (int(v) for v in layout.split("x"))
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    out = {"world": dist.get_world_size(), "layout": layout}
    for check in checks:
        if check == "equal":
            check_equal(out, mesh)
        elif check == "save":
            check_save(out, mesh, root)
        elif check.startswith("load:"):
            check_load(out, check.split(":", 1)[1], root)
        elif check == "meshes":
            check_meshes(out, mesh)
        elif check == "diagnostics":
            check_diagnostics(out, mesh)
        elif check == "plain":
            check_plain(out, root)
        elif check == "refuse":
            check_refuse(out, mesh)
    finish(out_path, out)


if __name__ == "__main__":
    main()
