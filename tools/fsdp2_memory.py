#!/usr/bin/env python
"""Per-rank optimizer state of a Llama preset under FSDP2, torch's AdamW against ds_lowrank's,
measured: the model is built and sharded with ``fully_shard`` (each decoder layer, then the
root), every parameter gets a random gradient, each optimizer takes one step, and each rank
counts the bytes of the state it holds (a DTensor's local part).

    torchrun --nproc_per_node 2 tools/fsdp2_memory.py --model 130m --rank 256

Rank 0 prints one JSON line per optimizer, with the largest per-rank total and its ratio to
AdamW's.  Parameter groups are ``lowrank_param_groups``' (embeddings and the LM head dense).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's ds_lowrank

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from ds_lowrank import Adapprox, GaLoreAdamW, LDAdam  # noqa: E402
from ds_lowrank.optim.base import CATEGORIES  # noqa: E402
from ds_lowrank.training.diagnostics import tensor_state_bytes  # noqa: E402
from ds_lowrank.param_groups import lowrank_param_groups  # noqa: E402
from ds_lowrank.training.models import build_model, load_preset  # noqa: E402


def sharded_model(preset: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = build_model(load_preset(preset), 1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    gen = torch.Generator().manual_seed(dist.get_rank())
    for p in model.parameters():
        p.grad = DTensor.from_local(torch.randn(p.to_local().shape, generator=gen), p.device_mesh, p.placements,
                                    shape=p.shape, stride=p.stride())
    return model


def state_bytes(opt) -> dict:
    if hasattr(opt, "state_bytes"):
        return opt.state_bytes()
    return tensor_state_bytes(opt)          # torch's AdamW: its tensors, DTensors' local parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="130m")
    parser.add_argument("--rank", type=int, default=256, help="LDAdam's and GaLore's rank, Adapprox's rank_max")
    parser.add_argument("--ef", default="float32", help="LDAdam's ef_dtype (float32, bfloat16, int8, int4)")
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "ldadam", "galore", "adapprox"])
    args = parser.parse_args()
    dist.init_process_group("gloo")
    makers = {
        "adamw": lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3),
        "ldadam": lambda model: LDAdam(lowrank_param_groups(model), rank=args.rank, ef_dtype=args.ef),
        "galore": lambda model: GaLoreAdamW(lowrank_param_groups(model), rank=args.rank),
        "adapprox": lambda model: Adapprox(lowrank_param_groups(model), rank_max=args.rank),
    }
    rows = {}
    for name in args.optimizers:
        model = sharded_model(args.model)
        opt = makers[name](model)
        opt.step()
        mine = state_bytes(opt)
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        rows[name] = {"per_rank_total": [b["total"] for b in everyone],
                      **{c: max(b.get(c, 0) for b in everyone) for c in CATEGORIES if c in mine}}
        del model, opt
    if dist.get_rank() == 0:
        adamw = max(rows["adamw"]["per_rank_total"]) if "adamw" in rows else None
        for name, row in rows.items():
            worst = max(row["per_rank_total"])
            print(json.dumps({"model": args.model, "world": dist.get_world_size(), "optimizer": name,
                              "rank": None if name == "adamw" else args.rank,
                              **({"ef_dtype": args.ef} if name == "ldadam" else {}), "max_per_rank_bytes": worst,
                              "vs_adamw": round(worst / adamw, 3) if adamw else None, **row}))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
