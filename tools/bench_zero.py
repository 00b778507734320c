#!/usr/bin/env python
"""Communication and per-rank optimizer state of ds_lowrank's optimizers under ZeRO, against
DeepSpeed's AdamW.

Launch with one process per rank, e.g. two CPU ranks:

    DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 tools/bench_zero.py \\
        --model 130m --stage 2 --rank 256 --optimizer ldadam galore adapprox microadam

``--ef_dtype int4`` gives LDAdam a 4-bit error feedback.

For each optimizer it trains a few steps of the Llama preset (fp32, random tokens) and reports,
per rank: the elements ds_lowrank's collectives sent in one step (after the first), against the
model's gradient elements, how many collectives that took, and the optimizer-state bytes, against
AdamW's at the same stage.
Rank 0 prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not os.environ.get("CUDA_VISIBLE_DEVICES") else "")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import ds_lowrank  # noqa: E402
from ds_lowrank.distributed import comm  # noqa: E402
from ds_lowrank.training.models import build_model, load_preset  # noqa: E402


def optimizer_state_bytes(opt) -> int:
    """This rank's optimizer-state bytes: ds_lowrank's own count, or every state tensor."""
    inner = opt
    while hasattr(inner, "optimizer") and not hasattr(inner, "state_bytes"):
        inner = inner.optimizer
    if hasattr(inner, "state_bytes"):
        return inner.state_bytes()["total"]

    def size(v):
        if isinstance(v, dict):
            return sum(size(x) for x in v.values())
        return v.numel() * v.element_size() if torch.is_tensor(v) and v.dim() > 0 else 0
    return sum(size(st) for st in inner.state.values())


def run(args, kind: str) -> dict:
    config = load_preset(args.model)
    model = build_model(config, args.seq_len, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    params = {"lr": 1e-4, **({"rank": args.rank} if kind in ("ldadam", "galore") else {}),
              **({"ef_dtype": args.ef_dtype} if kind == "ldadam" and args.ef_dtype else {})}
    optimizer = {"type": TYPES[kind], "params": params}
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": args.stage}, "optimizer": optimizer, "steps_per_print": 10**9}
    engine, opt, _, _ = ds_lowrank.initialize(model=model, config=cfg)
    gen = torch.Generator().manual_seed(dist.get_rank())
    sent, calls = [], []
    for _ in range(args.steps):
        ids = torch.randint(0, config.vocab_size, (1, args.seq_len), generator=gen).to(engine.device)
        comm.SENT.clear()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        sent.append(sum(v for k, v in comm.SENT.items() if k.endswith("_elements")))
        calls.append(sum(v for k, v in comm.SENT.items() if not k.endswith("_elements")))
    return {"optimizer": kind, "params": n_params, "sent_elements": sent[-1], "collectives": calls[-1],
            "state_bytes": optimizer_state_bytes(opt)}


TYPES = {"adamw": "AdamW", "ldadam": "LDAdam", "galore": "GaLore", "adapprox": "Adapprox",
         "microadam": "MicroAdam"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="130m")
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--seq_len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ef_dtype", default=None, help="LDAdam's error feedback (default: the class's, float32)")
    ap.add_argument("--optimizer", nargs="+", default=["ldadam"], choices=sorted(set(TYPES) - {"adamw"}),
                    help="the optimizers compared with AdamW (default: ldadam)")
    ap.add_argument("--out", default="bench_zero.json")
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args()
    deepspeed.init_distributed()
    rows = [run(args, kind) for kind in ("adamw", *args.optimizer)]
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, rows)
    if dist.get_rank() == 0:
        world = dist.get_world_size()
        ef = f", LDAdam ef_dtype {args.ef_dtype}" if args.ef_dtype else ""
        print(f"\nLlama-{args.model}, ZeRO-{args.stage}, {world} ranks, rank {args.rank} "
              f"(LDAdam, GaLore), fp32{ef}\n")
        print(f"{'rank':>4} {'optimizer':>9} {'sent/step':>12} {'x grads':>8} {'calls':>6} {'state MiB':>10} "
              f"{'x AdamW':>8}")
        for r, (adamw, *others) in enumerate(per_rank):
            for row in (adamw, *others):
                print(f"{r:>4} {row['optimizer']:>9} {row['sent_elements']:>12,} "
                      f"{row['sent_elements'] / row['params']:>8.4f} {row['collectives']:>6} "
                      f"{row['state_bytes'] / 2**20:>10.1f} {row['state_bytes'] / adamw['state_bytes']:>8.3f}")
        with open(args.out + ".tmp", "w") as f:
            json.dump({"model": args.model, "stage": args.stage, "world": world, "rank": args.rank,
                       "ef_dtype": args.ef_dtype,
                       "per_rank": per_rank}, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
    dist.barrier()
    # Tear the process groups down before exit: gloo's threads dying with the interpreter
    # can abort a process that has finished its work.
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
