#!/usr/bin/env python
"""Optimizer step time and state memory on the matrices of Llama presets.

Compares ds_lowrank's optimizers with torch's AdamW (fused on GPU, foreach on CPU) on the
parameter shapes of the Llama models of the GaLore/LDAdam papers, embeddings and LM head
dense as in pretraining.  Prints a table and writes JSON.

    python tools/bench_optimizer.py                         # CPU: the small presets
    python tools/bench_optimizer.py --presets 350m 1b --rank 256   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ds_lowrank import LDAdam  # noqa: E402

# hidden, intermediate, layers (vocabulary 32000), as in the GaLore / LDAdam Llama configs
LLAMA_SHAPES = {
    "60m": (512, 1376, 8),
    "130m": (768, 2048, 12),
    "350m": (1024, 2736, 24),
    "1b": (2048, 5461, 24),
    "7b": (4096, 11008, 32),
}
VOCAB = 32000


def llama_parameters(preset: str, device, dtype) -> tuple[list, list]:
    """(matrices of the blocks, dense parameters) of a Llama preset, as named tensors."""
    h, f, layers = LLAMA_SHAPES[preset]

    def new(*shape):
        return torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype).normal_(0, 0.02))

    matrices, dense = [], [("embed_tokens.weight", new(VOCAB, h)), ("lm_head.weight", new(VOCAB, h)),
                           ("norm.weight", new(h))]
    for i in range(layers):
        for name, shape in [("q_proj", (h, h)), ("k_proj", (h, h)), ("v_proj", (h, h)), ("o_proj", (h, h)),
                            ("gate_proj", (f, h)), ("up_proj", (f, h)), ("down_proj", (h, f))]:
            matrices.append((f"layers.{i}.{name}.weight", new(*shape)))
        dense += [(f"layers.{i}.input_layernorm.weight", new(h)),
                  (f"layers.{i}.post_attention_layernorm.weight", new(h))]
    return matrices, dense


def build(name: str, matrices, dense, rank: int):
    params = [p for _, p in matrices + dense]
    if name == "adamw":
        fused = params[0].is_cuda
        return torch.optim.AdamW(params, lr=1e-3, fused=fused, foreach=not fused)
    if name == "ldadam":
        return LDAdam([{"params": matrices, "rank": rank}, {"params": dense, "lowrank": False}], lr=1e-3)
    raise ValueError(f"unknown optimizer {name!r}: expected adamw or ldadam")


def state_bytes(opt) -> int:
    if hasattr(opt, "state_bytes"):
        return opt.state_bytes()["total"]
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if torch.is_tensor(t) and t.dim() > 0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_optimizer(name, preset, rank, steps, warmup, device, dtype):
    matrices, dense = llama_parameters(preset, device, dtype)
    for _, p in matrices + dense:
        p.grad = torch.randn_like(p) * 1e-3
    opt = build(name, matrices, dense, rank)
    sync(device)
    t0 = time.perf_counter()
    opt.step()          # the first step creates state (and LDAdam's first basis)
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    n_params = sum(p.numel() for _, p in matrices + dense)
    result = dict(optimizer=name, preset=preset, rank=rank if name != "adamw" else None,
                  params=n_params, first_step_ms=1e3 * first, step_ms=1e3 * statistics.median(times),
                  state_bytes=state_bytes(opt))
    if device.type == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    del opt, matrices, dense
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", choices=sorted(LLAMA_SHAPES), default=None,
                    help="Llama presets (default: 60m 130m on CPU, 350m 1b on GPU)")
    ap.add_argument("--optimizers", nargs="+", default=["adamw", "ldadam"])
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on GPU, 3 on CPU)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (GPU)")
    ap.add_argument("--out", default="bench_optimizer.json", help="JSON output path")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    presets = args.presets or (["350m", "1b"] if gpu else ["60m", "130m"])
    steps = args.steps or (20 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.manual_seed(0)

    rows = []
    for preset in presets:
        base = None
        for name in args.optimizers:
            r = time_optimizer(name, preset, args.rank, steps, warmup, device, torch.float32)
            if name == "adamw":
                base = r
            if base is not None:
                r["step_vs_adamw"] = r["step_ms"] / base["step_ms"]
                r["state_vs_adamw"] = r["state_bytes"] / base["state_bytes"]
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)

    dev_name = torch.cuda.get_device_name(device) if gpu else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{dev_name}, fp32 weights, TF32 {'on' if args.tf32 else 'off'}, rank {args.rank}, "
          f"median of {steps} steps\n")
    header = f"{'preset':>6} {'optimizer':>9} {'params':>8} {'step ms':>9} {'x AdamW':>8} " \
             f"{'first ms':>9} {'state MiB':>10} {'x AdamW':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['preset']:>6} {r['optimizer']:>9} {r['params'] / 1e6:>7.0f}M {r['step_ms']:>9.1f} "
              f"{r.get('step_vs_adamw', float('nan')):>8.2f} {r['first_step_ms']:>9.1f} "
              f"{r['state_bytes'] / 2**20:>10.1f} {r.get('state_vs_adamw', float('nan')):>8.2f}")
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(device=dev_name, tf32=args.tf32, rank=args.rank, steps=steps, results=rows), f, indent=1)
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
