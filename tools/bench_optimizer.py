#!/usr/bin/env python
"""Optimizer step time and state memory on the parameters of the Llama presets.

Compares ds_lowrank's optimizers (LDAdam, GaLoreAdamW, Adapprox, MicroAdam) with torch's AdamW
(fused on GPU, foreach on CPU), always measured in the same run as the baseline, on the
parameter shapes of a model preset from configs/models (or ``KxMxN``: K low-rank M × N matrices).
Parameters are grouped as in pretraining: embeddings, LM head and norms dense, every other matrix
low-rank.  Steps are interleaved (AdamW, LDAdam, …, AdamW, LDAdam, …) so that a machine whose speed
drifts affects every optimizer alike; every optimizer steps on the same weights and gradients.
Prints a table and writes JSON with each optimizer's median step time and state_bytes() and
their ratios to AdamW's.

    python tools/bench_optimizer.py                                   # CPU: 60m and 130m, every optimizer
    python tools/bench_optimizer.py --model 60m --steps 3 --optimizer ldadam galore
    python tools/bench_optimizer.py --model 130m --state_only         # state bytes only, no timing
    python tools/bench_optimizer.py --model 350m 1b --rank 256 --tf32 # on a GPU
    python tools/bench_optimizer.py --model 1b --state_only --optimizer ldadam --ef_dtype int4
    python tools/bench_optimizer.py --model 8x1024x1024 --rank 64 --optimizer galore --peers
    python tools/bench_optimizer.py --model 130m --steps 2 --profile  # where each step goes
    python tools/bench_optimizer.py --model 60m --optimizer microadam --compiled   # torch.compile vs eager

--peers adds the published implementations, configured like ours: galore-torch's GaLoreAdamW
(``pip install ds_lowrank[bench]``) as ``galore_torch``, and with ``--ldadam_ref PATH`` (a checkout
of IST-DASLab/LDAdam) its LDAdamW as ``ldadam_ref``.  --profile runs torch.profiler over a few more
steps of each optimizer and prints the time of each phase of the step (see
ds_lowrank/utils/profiling.py), with the share of the step.  --compiled runs MicroAdam twice in the
same run, ``compiled=True`` and ``compiled=False`` (``microadam/compiled``, ``microadam/eager``);
the compilation falls in the first step, and each row records how many graphs torch.compile built
during the timed steps (``recompiles_timed``: 0 when shapes do not trigger recompiles).

Hyperparameters are the classes' defaults (GaLore: update_proj_gap 200, scale 0.25, exact SVD;
Adapprox: rank_max 128; MicroAdam: density 0.01, window 10), with --rank for LDAdam and GaLore.
The first step, which creates the state (and the first bases), is reported separately from
the median of the following steps; GaLore's refresh every update_proj_gap steps (and
galore-torch's) is therefore outside the median.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import os
import re
import statistics
import sys
import time
import types

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ds_lowrank import Adapprox, GaLoreAdamW, LDAdam, MicroAdam, lowrank_param_groups  # noqa: E402
from ds_lowrank.training.models import available_presets, build_model, load_preset  # noqa: E402
from ds_lowrank.linalg.precision import PRECISIONS  # noqa: E402

OPTIMIZERS = ("adamw", "ldadam", "galore", "adapprox", "microadam")
PEERS = ("galore_torch", "ldadam_ref")
BASELINE = "adamw"
GALORE_DEFAULTS = dict(update_proj_gap=200, scale=0.25, proj_type="std")   # GaLoreAdamW's
MiB = 2**20


# ----------------------------------------------------------------------------- parameters

class Matrices(torch.nn.Module):
    """``count`` weight matrices of one shape: the ``KxMxN`` stand-in for a model."""

    def __init__(self, count: int, rows: int, cols: int, device="meta") -> None:
        super().__init__()
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.empty(rows, cols, device=device)) for _ in range(count)])


def matrices_spec(preset: str) -> tuple[int, int, int] | None:
    """``(K, M, N)`` of a ``KxMxN`` model name, else ``None``."""
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", preset)
    return tuple(int(v) for v in m.groups()) if m else None


def meta_model(preset: str) -> torch.nn.Module:
    spec = matrices_spec(preset)
    return Matrices(*spec) if spec else build_model(load_preset(preset), 1, device="meta")


def preset_model(preset: str, device, dtype) -> torch.nn.Module:
    """The preset's Llama model with real, randomly filled parameters on ``device``.

    Built on the meta device and then materialized, so no time goes into Hugging Face's
    initialisation; only the shapes and the parameter names (which decide the grouping) matter.
    """
    model = meta_model(preset).to_empty(device=device).to(dtype)
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
    lowrank = [g for g in lowrank_param_groups(model) if g["compress"]]
    return min(min(p.shape) for g in lowrank for _, p in g["params"])


# ----------------------------------------------------------------------------- optimizers

def options(name: str, rank: int, ef_dtype: str = "float32") -> dict:
    """Constructor options beyond the class defaults; ``ldadam/P`` is LDAdam with
    ``proj_precision=P``, ``microadam/compiled`` and ``microadam/eager`` MicroAdam with
    ``compiled=True`` / ``False``."""
    name, _, precision = name.partition("/")
    if name == "microadam":
        return {"compiled": precision == "compiled"} if precision else {}
    ldadam = {"rank": rank, **({"ef_dtype": ef_dtype} if ef_dtype != "float32" else {}),
              **({"proj_precision": precision} if precision else {})}
    return {"ldadam": ldadam, "galore": {"rank": rank}, "ldadam_ref": {"rank": rank},
            "galore_torch": {"rank": rank, **GALORE_DEFAULTS}}.get(name, {})


@functools.lru_cache(maxsize=None)
def galore_torch_adamw():
    """galore-torch's GaLoreAdamW class, or ``None`` if galore-torch is not installed.

    The package's ``__init__`` also imports its 8-bit optimizer, which needs bitsandbytes; when
    that is missing, the AdamW module is imported on its own."""
    try:
        return importlib.import_module("galore_torch").GaLoreAdamW
    except ModuleNotFoundError as err:
        if err.name == "galore_torch":
            return None
    spec = importlib.util.find_spec("galore_torch")
    package = types.ModuleType("galore_torch")
    package.__path__ = list(spec.submodule_search_locations)
    saved = sys.modules.get("galore_torch")
    sys.modules["galore_torch"] = package
    try:
        return importlib.import_module("galore_torch.adamw").AdamW
    finally:
        if saved is None:
            del sys.modules["galore_torch"]
        else:
            sys.modules["galore_torch"] = saved


def ldadam_reference(path: str):
    """The official LDAdamW class from a checkout of IST-DASLab/LDAdam at ``path``."""
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module("ldadamw_torch").LDAdamW


def peer_groups(model: torch.nn.Module, lowrank_key: str, lowrank_options: dict) -> list[dict]:
    """Our parameter grouping (``lowrank_param_groups``) in a peer's terms: plain tensors, the
    low-rank group marked by ``lowrank_options`` (and ``lowrank_key`` when given)."""
    groups = []
    for g in lowrank_param_groups(model):
        group = {"params": [p for _, p in g["params"]]}
        if lowrank_key:
            group[lowrank_key] = g["compress"]
        if g["compress"]:
            group.update(lowrank_options)
        groups.append(group)
    return groups


def build(name: str, model: torch.nn.Module, rank: int, ldadam_ref: str | None = None,
          ef_dtype: str = "float32"):
    if name == "adamw":
        params = list(model.parameters())
        fused = params[0].is_cuda
        return torch.optim.AdamW(params, lr=1e-3, fused=fused, foreach=not fused)
    if name == "galore_torch":
        # galore-torch projects the groups that carry a rank; its defaults otherwise match ours
        # (lr 1e-3, betas (0.9, 0.999), eps 1e-6, no weight decay).
        return galore_torch_adamw()(peer_groups(model, "", options(name, rank)), lr=1e-3,
                                    no_deprecation_warning=True)
    if name == "ldadam_ref":
        return ldadam_reference(ldadam_ref)(peer_groups(model, "enable_lowrank", {}), lr=1e-3, rank=rank)
    cls = {"ldadam": LDAdam, "galore": GaLoreAdamW, "adapprox": Adapprox, "microadam": MicroAdam}[name.partition("/")[0]]
    return cls(lowrank_param_groups(model), **options(name, rank, ef_dtype))


def state_bytes(opt) -> dict[str, int]:
    """Persistent state by category and ``total``; torch's AdamW has only its two moments
    (its 0-dim step counters are left out, as negligible).  For a peer, every tensor of its
    state, and its projectors' bases (galore-torch's ``ortho_matrix``)."""
    if hasattr(opt, "state_bytes"):
        return opt.state_bytes()

    def size(t) -> int:
        return t.numel() * t.element_size() if torch.is_tensor(t) and t.dim() > 0 else 0

    moments = sum(size(t) for st in opt.state.values() for t in st.values())
    bases = sum(size(getattr(t, "ortho_matrix", None)) for st in opt.state.values() for t in st.values())
    out = {"dense_moments": moments, "total": moments + bases}
    if bases:
        out["bases"] = bases
    return out


# ----------------------------------------------------------------------------- measuring

def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (0 if it never ran)."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    return dynamo.counters["stats"]["unique_graphs"] if dynamo else 0


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


def profile_steps(opt, steps: int, device) -> dict:
    """Per step, the milliseconds of each ``ds_lowrank/<phase>`` range over ``steps`` profiled
    steps (a phase's own time: phases nested in it are counted apart), ``(other)`` for the
    rest of the step, and ``step``.  CPU time on CPU; on a GPU, the time of the kernels each
    phase launched."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from ds_lowrank.utils.profiling import PREFIX

    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function("bench/step"):
                opt.step()
            sync(device)
    us: dict[str, float] = {}

    def own(event) -> float:
        return event.self_device_time_total if gpu else event.self_cpu_time_total

    def walk(event, current: str) -> None:
        name = event.name
        if name.startswith(PREFIX):
            current = name[len(PREFIX):]
        us[current] = us.get(current, 0.0) + own(event)
        for child in event.cpu_children:
            walk(child, current)

    for event in prof.events():
        if event.name == "bench/step":
            walk(event, "(other)")
    ms = {name: t / 1e3 / steps for name, t in us.items()}
    ms["step"] = sum(ms.values())
    return ms


class Runner:
    """One optimizer of the comparison, with its step times."""

    def __init__(self, name: str, model, rank: int, device, ldadam_ref: str | None,
                 ef_dtype: str = "float32") -> None:
        self.name, self.model, self.device, self.ef_dtype = name, model, device, ef_dtype
        self.opt = build(name, model, rank, ldadam_ref, ef_dtype)
        self.times: list[float] = []
        self.first = timed_step(self.opt, device)     # creates the state (and the first bases)
        self.recompiles = 0      # graphs torch.compile builds during the timed steps

    def row(self, preset: str, rank: int) -> dict:
        by_category = state_bytes(self.opt)
        return dict(optimizer=self.name, preset=preset, options=options(self.name, rank, self.ef_dtype),
                    params=sum(p.numel() for p in self.model.parameters()),
                    first_step_ms=1e3 * self.first,
                    step_ms=1e3 * statistics.median(self.times) if self.times else None,
                    state_bytes=by_category["total"], state_bytes_by_category=by_category,
                    **({"recompiles_timed": self.recompiles} if self.name.endswith("/compiled") else {}))


def bench_preset(preset, names, rank, steps, warmup, device, dtype, *, profile: int = 0,
                 ldadam_ref: str | None = None, ef_dtype: str = "float32") -> list[dict]:
    """Every optimizer of ``names`` on one preset, AdamW first as the baseline, their steps
    interleaved.  They share the weights and the gradients, except the official LDAdam, which
    keeps its error feedback in the gradients and gets a model of its own."""
    model = preset_model(preset, device, dtype)
    set_gradients(model, seed=0)
    runners = []
    for name in names:
        own = name == "ldadam_ref"
        if own:
            own_model = preset_model(preset, device, dtype)
            set_gradients(own_model, seed=0)
        runners.append(Runner(name, own_model if own else model, rank, device, ldadam_ref, ef_dtype))
    for _ in range(warmup if steps else 0):
        for r in runners:
            r.opt.step()
    for _ in range(steps):
        for r in runners:
            before = compiled_graphs()
            r.times.append(timed_step(r.opt, device))
            r.recompiles += compiled_graphs() - before
    rows = []
    for r in runners:
        row = with_ratios(r.row(preset, rank), rows[0] if rows else None)
        if profile:
            row["profile_ms"] = profile_steps(r.opt, profile, device)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    del runners, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def with_ratios(row: dict, base: dict | None) -> dict:
    base = base or row
    row["state_vs_adamw"] = row["state_bytes"] / base["state_bytes"]
    if row["step_ms"] is not None:
        row["step_vs_adamw"] = row["step_ms"] / base["step_ms"]
    return row


# ----------------------------------------------------------------------------- command line

def selected_optimizers(requested: list[str], peers: bool = False, ldadam_ref: str | None = None,
                        precisions: tuple[str, ...] = (), compiled: bool = False) -> list[str]:
    """The requested optimizers in a fixed order, AdamW always included and first; with
    ``peers``, each peer after ours (galore-torch's GaLore after ours, the official LDAdam too
    when ``ldadam_ref`` points at it), if that optimizer is requested; with ``precisions``,
    LDAdam once per ``proj_precision`` (``ldadam/bfloat16``...); with ``compiled``, MicroAdam
    compiled and eager (``microadam/compiled``, ``microadam/eager``)."""
    wanted = set(OPTIMIZERS) if "all" in requested else set(requested) | {BASELINE}
    if peers:
        if "galore" in wanted:
            wanted.add("galore_torch")
        if "ldadam" in wanted and ldadam_ref:
            wanted.add("ldadam_ref")
    order = ("adamw", "ldadam", "ldadam_ref", "galore", "galore_torch", "adapprox", "microadam")
    names = [name for name in order if name in wanted]
    if precisions and "ldadam" in names:
        at = names.index("ldadam")
        names[at:at + 1] = [f"ldadam/{p}" for p in precisions]
    if compiled and "microadam" in names:
        at = names.index("microadam")
        names[at:at + 1] = ["microadam/compiled", "microadam/eager"]
    return names


def effective_rank(preset: str, rank: int) -> int:
    """``rank``, or the largest the preset's smallest matrix allows, with a note."""
    cap = largest_rank(meta_model(preset))
    if rank > cap:
        print(f"note: --rank {rank} exceeds the smallest low-rank matrix side of {preset!r}; "
              f"LDAdam and GaLore use rank {cap} there", file=sys.stderr)
    return min(rank, cap)


def print_table(rows: list[dict], state_only: bool) -> None:
    if state_only:
        header = f"{'preset':>6} {'optimizer':>16} {'params':>8} {'state MiB':>10} {'x AdamW':>8} {'first ms':>9}"
    else:
        header = f"{'preset':>6} {'optimizer':>16} {'params':>8} {'step ms':>9} {'x AdamW':>8} " \
                 f"{'first ms':>9} {'state MiB':>10} {'x AdamW':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        lead = f"{r['preset']:>6} {r['optimizer']:>16} {r['params'] / 1e6:>7.1f}M"
        state = f"{r['state_bytes'] / MiB:>10.1f} {r['state_vs_adamw']:>8.3f}"
        if state_only:
            print(f"{lead} {state} {r['first_step_ms']:>9.1f}")
        else:
            print(f"{lead} {r['step_ms']:>9.1f} {r['step_vs_adamw']:>8.2f} {r['first_step_ms']:>9.1f} {state}")


def print_profile(rows: list[dict]) -> None:
    """Per preset, one column per optimizer: each phase's ms per step and share of the step."""
    for preset in dict.fromkeys(r["preset"] for r in rows):
        prof = [r for r in rows if r["preset"] == preset and "profile_ms" in r]
        if not prof:
            continue
        phases = sorted({k for r in prof for k in r["profile_ms"] if k != "step"},
                        key=lambda k: (k == "(other)", k))
        width = 18
        print(f"\n{preset}: ms per step (% of step), profiled")
        print(f"{'phase':>16} " + " ".join(f"{r['optimizer']:>{width}}" for r in prof))
        for ph in [*phases, "step"]:
            cells = []
            for r in prof:
                t, step = r["profile_ms"].get(ph), r["profile_ms"]["step"]
                cells.append(f"{'-':>{width}}" if t is None else f"{t:>10.1f} ({100 * t / step:>4.1f}%)")
            print(f"{ph:>16} " + " ".join(cells))


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
    ap.add_argument("--peers", action="store_true",
                    help="also the published implementations of the requested optimizers: galore-torch's "
                         "GaLoreAdamW next to galore, the official LDAdam next to ldadam (with --ldadam_ref)")
    ap.add_argument("--ldadam_ref", default=None, metavar="PATH",
                    help="a checkout of IST-DASLab/LDAdam (the directory holding ldadamw_torch/), for --peers")
    ap.add_argument("--profile", type=int, nargs="?", const=2, default=0, metavar="STEPS",
                    help="profile STEPS more steps of each optimizer (default 2) and print the time by phase")
    ap.add_argument("--ef_dtype", default="float32", choices=("float32", "bfloat16", "int8", "int4"),
                    help="LDAdam's error-feedback storage (default: float32)")
    ap.add_argument("--proj_precision", nargs="+", default=[], choices=PRECISIONS, metavar="P",
                    help=f"LDAdam's proj_precision ({', '.join(PRECISIONS)}); several: LDAdam once per "
                         f"value, in the same run (default: the class default, auto)")
    ap.add_argument("--compiled", action="store_true",
                    help="MicroAdam twice in the same run: compiled=True (torch.compile) and compiled=False")
    ap.add_argument("--rank", type=int, default=256,
                    help="rank of LDAdam and GaLore, capped at the preset's smallest matrix side (default: 256)")
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
    if args.profile and args.state_only:
        ap.error("--profile times steps: it cannot go with --state_only")
    if args.ldadam_ref and not os.path.isdir(os.path.join(args.ldadam_ref, "ldadamw_torch")):
        ap.error(f"--ldadam_ref {args.ldadam_ref}: no ldadamw_torch/ there (a checkout of IST-DASLab/LDAdam)")
    if args.peers and "galore" in args.optimizers + (["galore"] if "all" in args.optimizers else []) \
            and galore_torch_adamw() is None:
        ap.error("--peers needs galore-torch: pip install 'ds_lowrank[bench]'")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    presets = args.presets or (["130m"] if args.state_only else ["350m", "1b"] if gpu else ["60m", "130m"])
    steps = 0 if args.state_only else args.steps or (20 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    names = selected_optimizers(args.optimizers, args.peers, args.ldadam_ref, tuple(args.proj_precision),
                                args.compiled)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32

    rows = []
    for preset in presets:
        rank = effective_rank(preset, args.rank)
        rows += bench_preset(preset, names, rank, steps, warmup, device, torch.float32,
                             profile=args.profile, ldadam_ref=args.ldadam_ref, ef_dtype=args.ef_dtype)

    dev_name = torch.cuda.get_device_name(device) if gpu else f"CPU ({os.cpu_count()} cores)"
    what = "state after one step" if args.state_only else f"median of {steps} steps"
    print(f"\n{dev_name}, fp32 weights, TF32 {'on' if args.tf32 else 'off'}, rank {args.rank}, {what}\n")
    print_table(rows, args.state_only)
    if args.profile:
        print_profile(rows)
    write_json(args.out, dict(device=dev_name, mode="state_only" if args.state_only else "timed",
                              tf32=args.tf32, rank=args.rank, steps=steps, warmup=warmup if steps else 0,
                              profile_steps=args.profile,
                              optimizers=names, presets=presets, results=rows))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
