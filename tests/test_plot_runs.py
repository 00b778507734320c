"""tools/plot_runs.py on two small synthetic run directories: every PNG written and non-empty."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def synthetic_run(directory, lowrank, ranks=2):
    directory.mkdir()
    losses = [{"step": s, "loss": 8.0 - 0.05 * s, "lr": 1e-3, "grad_norm": 1.0, "tokens": 1024 * s, "time": 0.5 * s}
              for s in range(1, 21)]
    evals = [{"step": s, "val_loss": 8.1 - 0.05 * s} for s in (10, 20)]
    metrics = []
    for s in (5, 10, 15, 20):
        state = {"dense_moments": [8 << 20] * ranks, "counters": [64] * ranks}
        if lowrank:
            state.update(lowrank_moments=[1 << 20] * ranks, bases=[1 << 18] * ranks, error_feedback=[2 << 20] * ranks)
        state["total"] = [sum(v[r] for v in state.values()) for r in range(ranks)]
        record = {"step": s, "train/loss": losses[s - 1]["loss"], "state_bytes_by_rank": state}
        if lowrank:
            record.update({"lowrank/ef_to_grad": 0.5 + 0.01 * s, "lowrank/ef_to_grad_max": 1 + 0.1 * s,
                           "lowrank/basis_drift": 0.04, "lowrank/basis_drift_max": 0.07})
        metrics.append(record)
    for name, records in (("losses", losses), ("eval", evals), ("metrics", metrics)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory


def test_plot_runs_writes_every_figure(tmp_path):
    pytest.importorskip("matplotlib")
    ldadam = synthetic_run(tmp_path / "ldadam", lowrank=True)
    adamw = synthetic_run(tmp_path / "adamw", lowrank=False, ranks=1)
    out = tmp_path / "plots"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "plot_runs.py"), str(ldadam), str(adamw),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = ("loss.png", "val_loss.png", "memory.png", "lowrank.png")
    assert proc.stdout.split() == [str(out / n) for n in names]
    for name in names:
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000, name

    # the low-rank figure only for runs that log the diagnostics; a folder that is no run is named
    from ds_lowrank.jobs.plot_runs import PlotError, plot_runs
    assert [p.name for p in plot_runs([adamw], tmp_path / "only_adamw")] == ["loss.png", "val_loss.png", "memory.png"]
    with pytest.raises(PlotError, match="no losses.jsonl"):
        plot_runs([tmp_path / "plots"], tmp_path / "x")


def test_summary_reports_throughput_after_the_skipped_steps_and_the_ratio_to_the_first_run(tmp_path):
    fast = synthetic_run(tmp_path / "fast", lowrank=False, ranks=1)
    slow = synthetic_run(tmp_path / "slow", lowrank=True)
    # the slow run's steps after step 10 take twice as long; its first 10 steps are slower still
    # (start-up), which --skip leaves out
    records = [json.loads(line) for line in (slow / "losses.jsonl").read_text().splitlines()]
    for r in records:
        r["time"] = 3.0 * r["step"] if r["step"] <= 10 else 30.0 + 1.0 * (r["step"] - 10)
    (slow / "losses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    from ds_lowrank.jobs.plot_runs import PlotError, summarize_runs
    rows = summarize_runs([fast, slow], skip=10)
    assert [r["label"] for r in rows] == ["fast", "slow"]
    assert rows[0]["steps"] == 20 and rows[0]["tokens_per_s"] == pytest.approx(1024 / 0.5)
    assert rows[1]["tokens_per_s"] == pytest.approx(1024 / 1.0)
    assert rows[1]["vs_first"] == pytest.approx(0.5)
    assert rows[1]["train_loss"] == pytest.approx(8.0 - 0.05 * 20) and rows[1]["val_loss"] == pytest.approx(7.1)
    # from the start, the slow run's start-up counts
    assert summarize_runs([slow], skip=0)[0]["tokens_per_s"] == pytest.approx(20 * 1024 / 40.0)
    with pytest.raises(PlotError, match="20 steps logged: throughput after the first 20 needs more"):
        summarize_runs([fast], skip=20)
    lines = (fast / "losses.jsonl").read_text().splitlines()
    (fast / "losses.jsonl").write_text("\n".join(lines[:4] + lines[5:]) + "\n")     # step 5 lost
    with pytest.raises(PlotError, match="step 5 is not in losses.jsonl"):
        summarize_runs([fast], skip=5)
    assert summarize_runs([fast], skip=6)[0]["tokens_per_s"] == pytest.approx(1024 / 0.5)
    (fast / "losses.jsonl").write_text("\n".join(lines) + "\n")

    # the command line: a table, no matplotlib needed, and the refusal as an error message
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "plot_runs.py"), str(fast), str(slow),
                           "--summary"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[1].split() == ["fast", "20", "2048.0", "1.000", "7.0000", "7.1000"]
    assert lines[2].split()[:4] == ["slow", "20", "1024.0", "0.500"]
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "plot_runs.py"), str(fast), "--summary",
                           "--skip", "25"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "needs more" in proc.stderr and not proc.stdout
