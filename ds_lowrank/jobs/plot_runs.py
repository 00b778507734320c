"""Plot pretraining runs side by side (needs matplotlib: pip install "ds_lowrank[plot]").

    python tools/plot_runs.py runs/tiny-ldadam_zero2 runs/tiny-adamw_zero2 --out plots/

reads what ``launch/pretrain.py`` writes into each run directory (``losses.jsonl``,
``eval.jsonl``, ``metrics.jsonl``) and writes PNGs into ``--out`` (default: ``plots``):

- ``loss.png``: training loss against steps, tokens and wall-clock time;
- ``val_loss.png``: validation loss against steps;
- ``memory.png``: optimizer state per rank by category (MiB, at the last logged step), one
  stacked bar per rank of each run;
- ``lowrank.png``: the low-rank diagnostics (``ef_to_grad``, ``basis_drift`` and their maxima),
  for the runs that log them.

Prints the files written.  Runs are labelled by their directory name (``--labels`` to change).

    python tools/plot_runs.py runs/tiny-adamw_zero2 runs/tiny-ldadam_zero2 --summary

prints a table instead, with no plotting (no matplotlib needed): per run, the steps logged, the
training throughput in tokens per second over the steps after the first ``--skip`` (default 10:
start-up, the first bases and warmup are left out; evaluation and checkpoints are not in the
logged step times), the last training and validation losses, and the throughput as a ratio to
the first run's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MiB = 2**20
CATEGORIES = ("lowrank_moments", "bases", "error_feedback", "dense_moments", "counters")
LOWRANK = ("ef_to_grad", "ef_to_grad_max", "basis_drift", "basis_drift_max")


class PlotError(Exception):
    """A run directory that cannot be plotted; the message names it."""


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:      # a line cut short by a killed run
            continue
    return records


def read_run(directory: str | Path) -> dict:
    directory = Path(directory)
    if not (directory / "losses.jsonl").is_file():
        raise PlotError(f"{directory} is not a run directory of launch/pretrain.py (no losses.jsonl)")
    return {"losses": read_jsonl(directory / "losses.jsonl"), "evals": read_jsonl(directory / "eval.jsonl"),
            "metrics": read_jsonl(directory / "metrics.jsonl")}


def _labels(run_dirs, labels) -> list[str]:
    labels = list(labels) if labels else [Path(d).resolve().name for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise PlotError(f"{len(labels)} labels for {len(run_dirs)} runs")
    return labels


def throughput(losses: list[dict], skip: int) -> tuple[int, float]:
    """``(steps, tokens/s)`` of a run's logged steps after the first ``skip``: the tokens trained
    between step ``skip`` and the last step over the wall time between them (``losses.jsonl``'s
    cumulative ``tokens`` and ``time``)."""
    steps = [r for r in losses if "time" in r and "tokens" in r]
    if not steps or steps[-1]["step"] <= skip:
        raise PlotError(f"{steps[-1]['step'] if steps else 0} steps logged: throughput after the first "
                        f"{skip} needs more (a longer run, or a smaller --skip)")
    first = next((r for r in steps if r["step"] == skip), None) if skip else {"tokens": 0, "time": 0.0}
    if first is None:
        raise PlotError(f"step {skip} is not in losses.jsonl (a line lost to a killed run?): "
                        f"choose another --skip")
    last = steps[-1]
    return last["step"], (last["tokens"] - first["tokens"]) / (last["time"] - first["time"])


def summarize_runs(run_dirs, labels=None, skip: int = 10) -> list[dict]:
    """One row per run: ``label``, ``steps``, ``tokens_per_s`` (after the first ``skip`` steps),
    ``train_loss`` and ``val_loss`` (the last logged; ``None`` without one) and ``vs_first``,
    the throughput as a ratio to the first run's."""
    labels = _labels(run_dirs, labels)
    rows = []
    for directory, label in zip(run_dirs, labels):
        run = read_run(directory)
        try:
            steps, tokens_per_s = throughput(run["losses"], skip)
        except PlotError as err:
            raise PlotError(f"{directory}: {err}") from None
        losses = [r["loss"] for r in run["losses"] if r.get("loss") is not None]
        rows.append({"label": label, "steps": steps, "tokens_per_s": tokens_per_s,
                     "train_loss": losses[-1] if losses else None,
                     "val_loss": run["evals"][-1]["val_loss"] if run["evals"] else None})
    for row in rows:
        row["vs_first"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


def print_summary(rows: list[dict], skip: int) -> None:
    width = max(len("run"), *(len(r["label"]) for r in rows))
    print(f"{'run':<{width}}  {'steps':>6}  {'tokens/s':>10}  {'x first':>7}  {'train loss':>10}  {'val loss':>8}")
    for r in rows:
        val = "-" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
        train = "-" if r["train_loss"] is None else f"{r['train_loss']:.4f}"
        print(f"{r['label']:<{width}}  {r['steps']:>6}  {r['tokens_per_s']:>10.1f}  {r['vs_first']:>7.3f}  "
              f"{train:>10}  {val:>8}")
    print(f"(tokens/s over the steps after the first {skip})")


def plot_runs(run_dirs, out_dir, labels=None) -> list[Path]:
    """Write the PNGs for ``run_dirs`` into ``out_dir``; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = _labels(run_dirs, labels)
    runs = [read_run(d) for d in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # training loss against steps, tokens, time
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for (key, title, scale) in (("step", "steps", 1), ("tokens", "tokens (millions)", 1e6), ("time", "wall time (s)", 1)):
        ax = axes[("step", "tokens", "time").index(key)]
        for run, label in zip(runs, labels):
            points = [(r[key] / scale, r["loss"]) for r in run["losses"] if key in r and r.get("loss") is not None]
            if points:
                ax.plot(*zip(*points), label=label, linewidth=1.2)
        ax.set_xlabel(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss")
    axes[0].legend()
    fig.suptitle("training loss")
    save(fig, "loss.png")

    # validation loss
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for run, label in zip(runs, labels):
        points = [(r["step"], r["val_loss"]) for r in run["evals"]]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xlabel("steps")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("validation loss")
    save(fig, "val_loss.png")

    # optimizer state per rank, by category, at the last logged step
    bars = []   # (label, {category: MiB})
    for run, label in zip(runs, labels):
        last = next((r for r in reversed(run["metrics"]) if "state_bytes_by_rank" in r), None)
        if last is None:
            continue
        by_rank = last["state_bytes_by_rank"]
        ranks = len(by_rank.get("total", []))
        for r in range(ranks):
            name = label if ranks == 1 else f"{label}\nrank {r}"
            bars.append((name, {c: by_rank.get(c, [0] * ranks)[r] / MiB for c in CATEGORIES}))
    if bars:
        fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(bars) + 2), 4.5))
        bottom = [0.0] * len(bars)
        for category in CATEGORIES:
            values = [b[1][category] for b in bars]
            if any(values):
                ax.bar(range(len(bars)), values, bottom=bottom, label=category)
                bottom = [x + y for x, y in zip(bottom, values)]
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels([b[0] for b in bars], fontsize=8)
        ax.set_ylabel("optimizer state per rank (MiB)")
        ax.set_title("optimizer state by category")
        ax.set_ylim(0, max(bottom) * 1.35 or 1)      # room for the legend above the bars
        ax.legend(fontsize=8, ncol=2, loc="upper center")
        ax.grid(axis="y", alpha=0.3)
        save(fig, "memory.png")

    # low-rank diagnostics
    if any(f"lowrank/{LOWRANK[0]}" in r for run in runs for r in run["metrics"]):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        for ax, name in zip(axes, ("ef_to_grad", "basis_drift")):
            for i, (run, label) in enumerate(zip(runs, labels)):
                for suffix, style in (("", "-"), ("_max", ":")):
                    points = [(r["step"], r[f"lowrank/{name}{suffix}"]) for r in run["metrics"]
                              if f"lowrank/{name}{suffix}" in r]
                    if points:
                        ax.plot(*zip(*points), style, color=f"C{i}", label=f"{label} ({name}{suffix})")
            ax.set_xlabel("steps")
            ax.set_title({"ef_to_grad": "error feedback / gradient norm",
                          "basis_drift": "subspace movement per step (0: none, 1: orthogonal)"}[name])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        save(fig, "lowrank.png")
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (--out_dir of launch/pretrain.py)")
    ap.add_argument("--out", default="plots", help="folder for the PNGs (default: plots)")
    ap.add_argument("--labels", nargs="+", default=None, help="one label per run (default: the directory names)")
    ap.add_argument("--summary", action="store_true",
                    help="print throughput and losses per run instead of plotting")
    ap.add_argument("--skip", type=int, default=10,
                    help="with --summary: steps left out of the throughput at the start (default: 10)")
    args = ap.parse_args(argv)
    if args.skip < 0:
        ap.error("--skip must be 0 or more")
    if args.summary:
        try:
            print_summary(summarize_runs(args.runs, args.labels, args.skip), args.skip)
        except PlotError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        return 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print('error: plotting needs matplotlib: pip install matplotlib (or "ds_lowrank[plot]")', file=sys.stderr)
        return 1
    try:
        for path in plot_runs(args.runs, args.out, args.labels):
            print(path)
    except PlotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
