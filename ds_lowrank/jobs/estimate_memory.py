#!/usr/bin/env python
"""Per-GPU memory of a Llama preset's training state, AdamW against a ds_lowrank optimizer,
before renting the GPUs.

    python tools/estimate_memory.py --model 7b --optimizer ldadam --zero 3 --dp 64 --rank 256 --ef bfloat16
    python tools/estimate_memory.py --model 1b --optimizer galore --zero 2 --dp 8 --tp 2 --rank 512
    python tools/estimate_memory.py --model 350m --optimizer adapprox --opt rank_max=64 --opt betas=[0.0,0.999]
    python tools/estimate_memory.py --model 1b --engine fsdp2 --dp 4 --tp 2 --rank 256 --tensor_parallel global

Prints, for the GPU that holds the most, the bytes of bf16 weights, bf16 gradients, fp32 master
weights and optimizer state, side by side for AdamW and the chosen optimizer, with ratios.  The
optimizer state is each optimizer's own layout (its ``state_shapes``) applied to the model built
on the meta device and cut as DeepSpeed's ZeRO cuts it; nothing is allocated.  See
``ds_lowrank/memory.py`` for what is counted and how (including how the state of a matrix split
by ZeRO is shared between the ranks holding its rows, and what each keeps whole).

``--engine fsdp2``: PyTorch FSDP2 instead (fp32 sharded weights and gradients, no master copy,
torch's AdamW on the DTensors), over ``--dp`` ranks, with ``--tp`` > 1 combined with torch's
tensor parallelism on a ``(dp, tp)`` mesh, the optimizer in ``--tensor_parallel`` mode.
"""

from __future__ import annotations

import argparse
import json
import sys

from ds_lowrank import memory
from ds_lowrank.optim.base import CATEGORIES

NAMES = {"adamw": "AdamW", "ldadam": "LDAdam", "galore": "GaLore", "adapprox": "Adapprox",
         "microadam": "MicroAdam"}
GiB = 2**30


def options_of(args) -> dict:
    opts = {}
    if args.rank is not None:
        if args.optimizer in ("ldadam", "galore"):
            opts["rank"] = args.rank
        elif args.optimizer == "adapprox":
            opts["rank_max"] = args.rank
        else:
            raise SystemExit(f"--rank does not apply to {args.optimizer}")
    if args.ef is not None:
        if args.optimizer != "ldadam":
            raise SystemExit("--ef applies to ldadam only")
        opts["ef_dtype"] = args.ef
    for item in args.opt:
        key, _, value = item.partition("=")
        try:
            opts[key] = json.loads(value)
        except json.JSONDecodeError:
            opts[key] = value
        if key == "betas":
            opts[key] = tuple(opts[key])
    if args.optimizer == "galore" and "rank" not in opts:
        raise SystemExit("GaLore projects only with a rank: pass --rank")
    return opts


def report(args) -> dict:
    opts = options_of(args)
    if args.engine == "fsdp2":
        if args.zero is not None:
            raise SystemExit("--zero is DeepSpeed's: FSDP2 shards parameters, gradients and state (drop --zero)")
        if args.tensor_parallel != "local" and args.optimizer != "adamw":
            opts["tensor_parallel"] = args.tensor_parallel
        params = memory.model_params(args.model)          # whole shapes, each with its TP axis
        world = args.dp * args.tp
        adamw = memory.worst(memory.estimate_fsdp2(args.model, "adamw", world, params=params, tp=args.tp))
        ours = memory.worst(memory.estimate_fsdp2(args.model, args.optimizer, world, params=params, tp=args.tp,
                                                  **opts))
    else:
        if args.tensor_parallel != "local":
            raise SystemExit("--tensor_parallel global: the DeepSpeed estimate splits the projections as "
                             "Megatron's shards stepped each as a matrix of its own (local); use --engine fsdp2")
        args.zero = 2 if args.zero is None else args.zero
        params = memory.model_params(args.model, args.tp)
        adamw = memory.worst(memory.estimate(args.model, "adamw", args.zero, args.dp, args.tp, params=params))
        ours = memory.worst(memory.estimate(args.model, args.optimizer, args.zero, args.dp, args.tp, params=params,
                                            **opts))
    groups = memory.optimizer_groups(args.optimizer, **opts)
    compressed = kept_dense = 0
    if groups is not None:
        cls = memory.OPTIMIZERS[args.optimizer]
        for p in params:
            if p.group == 0:
                if cls.is_compressed_shape(groups[0], p.shape):
                    compressed += 1
                elif cls.is_compressed_shape({**groups[0], "within_adamw": False}, p.shape):
                    kept_dense += 1
    numel = sum(p.numel for p in params)
    return {"model": args.model, "optimizer": args.optimizer, "engine": args.engine, "zero": args.zero,
            "dp": args.dp, "tp": args.tp, "tensor_parallel": args.tensor_parallel, "options": opts,
            "params": numel if args.engine == "fsdp2" else numel * args.tp,
            "params_per_tp_rank": numel // args.tp if args.engine == "fsdp2" else numel,
            "compressed_params": compressed, "kept_dense_params": kept_dense,
            "adamw": vars_of(adamw), "ours": vars_of(ours)}


def vars_of(m: memory.RankMemory) -> dict:
    return {"weights": m.weights, "gradients": m.gradients, "master": m.master, "state": m.state,
            "replicated": m.replicated, "total": m.total, "state_by_category": dict(m.state_by_category)}


def print_table(r: dict) -> None:
    name = NAMES[r["optimizer"]]
    opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "class defaults"
    gpus = r["dp"] * r["tp"]
    fsdp2 = r["engine"] == "fsdp2"
    if fsdp2:
        mode = f", tensor_parallel={r['tensor_parallel']!r}" if r["tp"] > 1 else ""
        print(f"Llama-{r['model']}: {r['params'] / 1e9:.2f}B parameters; FSDP2, DP {r['dp']} x TP {r['tp']} = "
              f"{gpus} GPUs{mode}; fp32 sharded weights and gradients, no master copy")
    else:
        print(f"Llama-{r['model']}: {r['params'] / 1e9:.2f}B parameters; ZeRO-{r['zero']}, "
              f"DP {r['dp']} x TP {r['tp']} = {gpus} GPUs; bf16 weights and gradients, fp32 master weights")
    print(f"{name}: {opts}")
    if r["optimizer"] != "adamw":
        print(f"compressed matrices: {r['compressed_params']}; kept dense because compressed they would "
              f"cost more than AdamW: {r['kept_dense_params']}; embeddings, LM head and norms: AdamW")
    print("\nper GPU (the data-parallel rank holding the most), GiB")
    a, o = r["adamw"], r["ours"]
    w = max(len(name), 8)
    print(f"{'':<28}{'AdamW':>10}{name:>{w + 2}}{'ratio':>8}")

    def row(label, x, y):
        ratio = f"{y / x:8.2f}" if x else f"{'-':>8}"
        print(f"{label:<28}{x / GiB:>10.3f}{y / GiB:>{w + 2}.3f}{ratio}")
    precision = "fp32" if fsdp2 else "bf16"
    row(f"weights ({precision})", a["weights"], o["weights"])
    row(f"gradients ({precision})", a["gradients"], o["gradients"])
    if not fsdp2:
        row("master weights (fp32)", a["master"], o["master"])
    row("optimizer state", a["state"], o["state"])
    for c in CATEGORIES:
        if o["state_by_category"][c] or a["state_by_category"][c]:
            row(f"  {c}", a["state_by_category"][c], o["state_by_category"][c])
    if o["replicated"]:
        row("  of it whole on each owner", 0, o["replicated"])
    row("total", a["total"], o["total"])
    print(f"\n{name}'s optimizer state is {o['state'] / a['state']:.3f}x AdamW's; all of the above "
          f"{o['total'] / a['total']:.3f}x.  Not counted: activations, communication buffers.")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="7b", help="a preset of configs/models or a LlamaConfig JSON file")
    ap.add_argument("--optimizer", default="ldadam", choices=sorted(NAMES))
    ap.add_argument("--engine", default="deepspeed", choices=("deepspeed", "fsdp2"),
                    help="DeepSpeed ZeRO, or PyTorch FSDP2 (fully_shard; with --tp, torch's tensor parallelism)")
    ap.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="the ZeRO stage (DeepSpeed; default 2)")
    ap.add_argument("--dp", type=int, default=1, help="data-parallel size (ZeRO or FSDP2 partitions over it)")
    ap.add_argument("--tp", type=int, default=1,
                    help="tensor-parallel size (Megatron's split under DeepSpeed, torch's with FSDP2)")
    ap.add_argument("--tensor_parallel", default="local", choices=("local", "global"),
                    help="the optimizer's tensor_parallel mode (global: FSDP2 only)")
    ap.add_argument("--rank", type=int, help="LDAdam's and GaLore's rank, Adapprox's rank_max")
    ap.add_argument("--ef", help="LDAdam's ef_dtype (e.g. bfloat16)")
    ap.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                    help="any other optimizer argument, VALUE as JSON (repeatable)")
    ap.add_argument("--json", help="also write the figures (bytes) to this file")
    args = ap.parse_args(argv)
    try:
        r = report(args)
    except NotImplementedError as err:     # what the optimizer refuses at this layout, said as it says it
        raise SystemExit(str(err)) from None
    print_table(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return r


def cli(argv=None) -> int:
    """The console script ``ds-lowrank-estimate-memory``."""
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
