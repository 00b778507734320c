#!/usr/bin/env python
"""Optimizer step time and state memory on the parameters of the Llama presets.

Compares ds_lowrank's optimizers (LDAdam, GaLoreAdamW, Adapprox, MicroAdam) with torch's AdamW
(fused on GPU, foreach on CPU), always measured in the same run as the baseline, on the
parameter shapes of a model preset from configs/models.  Parameters are grouped as in
pretraining: embeddings, LM head and norms dense, every other matrix low-rank.  Prints a table
and writes JSON with each optimizer's median step time and state_bytes() and their ratios to
AdamW's.

    python tools/bench_optimizer.py                                   # CPU: 60m and 130m, every optimizer
    python tools/bench_optimizer.py --model 60m --steps 3 --optimizer ldadam galore
    python tools/bench_optimizer.py --model 130m --state_only         # state bytes only, no timing
    python tools/bench_optimizer.py --model 350m 1b --rank 256 --tf32 # on a GPU
    python tools/bench_optimizer.py --model 1b --state_only --optimizer ldadam --ef_dtype int4

Hyperparameters are the classes' defaults (GaLore: update_proj_gap 200, scale 0.25, exact SVD;
Adapprox: rank_max 128; MicroAdam: density 0.01, window 10), with --rank for LDAdam and GaLore.
The first step, which creates the state (and the first bases), is reported separately from
the median of the following steps; GaLore's refresh every update_proj_gap steps is therefore
outside the median.
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
from ds_lowrank import Adapprox, GaLoreAdamW, LDAdam, MicroAdam, lowrank_param_groups  # noqa: E402
from ds_lowrank.training.models import available_presets, build_model, load_preset  # noqa: E402

OPTIMIZERS = ("adamw", "ldadam", "galore", "adapprox", "microadam")
BASELINE = "adamw"
MiB = 2**20


# ----------------------------------------------------------------------------- parameters

def preset_model(preset: str, device, dtype) -> torch.nn.Module:
    """The preset's Llama model with real, randomly filled parameters on ``device``.

    Built on the meta device and then materialized, so no time goes into Hugging Face's
    initialisation; only the shapes and the parameter names (which decide the grouping) matter.
    """
    model = build_model(load_preset(preset), 1, device="meta").to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def set_gradients(model: torch.nn.Module, seed: int) -> None:
    """The same random gradients for every optimizer of a preset."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) * 1e-3


def largest_rank(model: torch.nn.Module) -> int:
    """The largest rank every low-rank matrix of the model accepts (its smallest side)."""
    lowrank = [g for g in lowrank_param_groups(model) if g["lowrank"]]
    return min(min(p.shape) for g in lowrank for _, p in g["params"])


# ----------------------------------------------------------------------------- optimizers

def options(name: str, rank: int, ef_dtype: str = "float32") -> dict:
    """Constructor options beyond the class defaults."""
    ldadam = {"rank": rank, **({"ef_dtype": ef_dtype} if ef_dtype != "float32" else {})}
    return {"ldadam": ldadam, "galore": {"rank": rank}}.get(name, {})


def build(name: str, model: torch.nn.Module, rank: int, ef_dtype: str = "float32"):
    if name == "adamw":
        params = list(model.parameters())
        fused = params[0].is_cuda
        return torch.optim.AdamW(params, lr=1e-3, fused=fused, foreach=not fused)
    cls = {"ldadam": LDAdam, "galore": GaLoreAdamW, "adapprox": Adapprox, "microadam": MicroAdam}[name]
    return cls(lowrank_param_groups(model), **options(name, rank, ef_dtype))


def state_bytes(opt) -> dict[str, int]:
    """Persistent state by category and ``total``; torch's AdamW has only its two moments
    (its 0-dim step counters are left out, as negligible)."""
    if hasattr(opt, "state_bytes"):
        return opt.state_bytes()
    moments = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                  if torch.is_tensor(t) and t.dim() > 0)
    return {"dense_moments": moments, "total": moments}


# ----------------------------------------------------------------------------- measuring

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_step(opt, device) -> float:
    """Seconds one ``opt.step()`` takes, the device included."""
    sync(device)
    t0 = time.perf_counter()
    opt.step()
    sync(device)
    return time.perf_counter() - t0


def measure(name, preset, rank, steps, warmup, device, dtype, ef_dtype="float32") -> dict:
    """One optimizer on one preset: the first step, then ``warmup`` untimed and ``steps``
    timed steps (``steps`` 0: the first step only, for the state)."""
    model = preset_model(preset, device, dtype)
    set_gradients(model, seed=0)
    opt = build(name, model, rank, ef_dtype)
    first = timed_step(opt, device)       # creates the state (and the first bases)
    for _ in range(warmup if steps else 0):
        opt.step()
    times = [timed_step(opt, device) for _ in range(steps)]
    by_category = state_bytes(opt)
    row = dict(optimizer=name, preset=preset, options=options(name, rank, ef_dtype),
               params=sum(p.numel() for p in model.parameters()), first_step_ms=1e3 * first,
               step_ms=1e3 * statistics.median(times) if times else None,
               state_bytes=by_category["total"], state_bytes_by_category=by_category)
    if device.type == "cuda":
        row["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    del opt, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


def with_ratios(row: dict, base: dict) -> dict:
    row["state_vs_adamw"] = row["state_bytes"] / base["state_bytes"]
    if row["step_ms"] is not None:
        row["step_vs_adamw"] = row["step_ms"] / base["step_ms"]
    return row


def bench_preset(preset, names, rank, steps, warmup, device, dtype, ef_dtype="float32") -> list[dict]:
    """Every optimizer of ``names`` on one preset, AdamW first as the baseline."""
    rows = []
    base = None
    for name in names:
        row = measure(name, preset, rank, steps, warmup, device, dtype, ef_dtype)
        if base is None:
            base = row
        rows.append(with_ratios(row, base))
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


# ----------------------------------------------------------------------------- command line

def selected_optimizers(requested: list[str]) -> list[str]:
    """The requested optimizers in a fixed order, AdamW always included and first."""
    wanted = set(OPTIMIZERS) if "all" in requested else set(requested) | {BASELINE}
    return [name for name in OPTIMIZERS if name in wanted]


def effective_rank(preset: str, rank: int) -> int:
    """``rank``, or the largest the preset's smallest matrix allows, with a note."""
    cap = largest_rank(build_model(load_preset(preset), 1, device="meta"))
    if rank > cap:
        print(f"note: --rank {rank} exceeds the smallest low-rank matrix side of {preset!r}; "
              f"LDAdam and GaLore use rank {cap} there", file=sys.stderr)
    return min(rank, cap)


def print_table(rows: list[dict], state_only: bool) -> None:
    if state_only:
        header = f"{'preset':>6} {'optimizer':>9} {'params':>8} {'state MiB':>10} {'x AdamW':>8} {'first ms':>9}"
    else:
        header = f"{'preset':>6} {'optimizer':>9} {'params':>8} {'step ms':>9} {'x AdamW':>8} " \
                 f"{'first ms':>9} {'state MiB':>10} {'x AdamW':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        lead = f"{r['preset']:>6} {r['optimizer']:>9} {r['params'] / 1e6:>7.1f}M"
        state = f"{r['state_bytes'] / MiB:>10.1f} {r['state_vs_adamw']:>8.3f}"
        if state_only:
            print(f"{lead} {state} {r['first_step_ms']:>9.1f}")
        else:
            print(f"{lead} {r['step_ms']:>9.1f} {r['step_vs_adamw']:>8.2f} {r['first_step_ms']:>9.1f} {state}")


def write_json(path: str, report: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)   # a reader never sees a half-written file


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", "--presets", dest="presets", nargs="+", default=None,
                    help=f"model presets ({', '.join(available_presets())}) or LlamaConfig JSON files "
                         f"(default: 60m 130m on CPU, 350m 1b on GPU; 130m with --state_only)")
    ap.add_argument("--optimizer", "--optimizers", dest="optimizers", nargs="+", default=["all"],
                    choices=[*OPTIMIZERS, "all"],
                    help="optimizers to compare (default: all); AdamW is always measured as the baseline")
    ap.add_argument("--rank", type=int, default=256,
                    help="rank of LDAdam and GaLore, capped at the preset's smallest matrix side (default: 256)")
    ap.add_argument("--ef_dtype", default="float32", choices=("float32", "bfloat16", "int8", "int4"),
                    help="LDAdam's error-feedback storage (default: float32)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 on GPU, 3 on CPU)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps after the first (default: 3 on GPU, 1 on CPU)")
    ap.add_argument("--state_only", action="store_true",
                    help="one step per optimizer and its state_bytes(), no step timing")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (GPU)")
    ap.add_argument("--out", default="bench_optimizer.json", help="JSON output path (default: bench_optimizer.json)")
    args = ap.parse_args(argv)
    for name in ("rank", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if args.warmup is not None and args.warmup < 0:
        ap.error("--warmup must be 0 or more")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    presets = args.presets or (["130m"] if args.state_only else ["350m", "1b"] if gpu else ["60m", "130m"])
    steps = 0 if args.state_only else args.steps or (20 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    names = selected_optimizers(args.optimizers)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32

    rows = []
    for preset in presets:
        rank = effective_rank(preset, args.rank)
        rows += bench_preset(preset, names, rank, steps, warmup, device, torch.float32, args.ef_dtype)

    dev_name = torch.cuda.get_device_name(device) if gpu else f"CPU ({os.cpu_count()} cores)"
    what = "state after one step" if args.state_only else f"median of {steps} steps"
    print(f"\n{dev_name}, fp32 weights, TF32 {'on' if args.tf32 else 'off'}, rank {args.rank}, {what}\n")
    print_table(rows, args.state_only)
    write_json(args.out, dict(device=dev_name, mode="state_only" if args.state_only else "timed",
                              tf32=args.tf32, rank=args.rank, steps=steps, warmup=warmup if steps else 0,
                              optimizers=names, presets=presets, results=rows))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
