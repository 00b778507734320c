"""tools/bench_optimizer.py on the tiny preset: every optimizer against AdamW, timed and state-only."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "bench_optimizer.py"
ALL = ["adamw", "ldadam", "galore", "adapprox", "microadam"]


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT, "bench_optimizer")


def by_optimizer(report):
    return {r["optimizer"]: r for r in report["results"]}


def test_command_line_times_every_optimizer_against_adamw(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny", "--steps", "2", "--warmup", "0",
                           "--rank", "16", "--optimizer", "all", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "timed" and report["steps"] == 2
    rows = by_optimizer(report)
    assert list(rows) == ALL
    for name, row in rows.items():
        assert row["preset"] == "tiny" and row["params"] > 0
        assert row["step_ms"] > 0 and row["first_step_ms"] > 0 and row["step_vs_adamw"] > 0, name
        assert row["state_bytes"] > 0 and row["state_vs_adamw"] > 0, name
    adamw = rows["adamw"]
    assert adamw["step_vs_adamw"] == 1 and adamw["state_vs_adamw"] == 1
    assert adamw["state_bytes"] == 8 * adamw["params"]          # two fp32 moments
    assert rows["ldadam"]["options"] == {"rank": 16} and rows["galore"]["options"] == {"rank": 16}
    assert "microadam" in proc.stdout and "x AdamW" in proc.stdout


def test_state_only_reports_bytes_without_timing(bench, tmp_path):
    out = tmp_path / "state.json"
    bench.main(["--model", "tiny", "--state_only", "--optimizer", "galore", "microadam", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["mode"] == "state_only" and report["steps"] == 0
    rows = by_optimizer(report)
    assert list(rows) == ["adamw", "galore", "microadam"]       # the baseline comes along
    for row in rows.values():
        assert row["step_ms"] is None and "step_vs_adamw" not in row
        assert row["state_bytes"] == row["state_bytes_by_category"]["total"] > 0
    # 1% of each block kept over a window of 10, and a 4-bit error: far below AdamW's 8 bytes
    assert rows["microadam"]["state_vs_adamw"] < 1


def test_rank_is_capped_at_the_smallest_matrix(bench, capsys):
    assert bench.effective_rank("tiny", 256) == 128      # hidden size 128
    assert "exceeds" in capsys.readouterr().err
    assert bench.effective_rank("tiny", 8) == 8


def test_adamw_is_always_the_first_optimizer(bench):
    assert bench.selected_optimizers(["microadam", "ldadam"]) == ["adamw", "ldadam", "microadam"]
    assert bench.selected_optimizers(["all"]) == ALL


def test_profile_splits_each_step_by_phase(bench, tmp_path, capsys):
    out = tmp_path / "profile.json"
    bench.main(["--model", "4x24x16", "--rank", "4", "--steps", "1", "--warmup", "0", "--profile", "1",
                "--optimizer", "ldadam", "galore", "--out", str(out)])
    rows = by_optimizer(json.loads(out.read_text()))
    assert list(rows) == ["adamw", "ldadam", "galore"]
    assert rows["ldadam"]["params"] == 4 * 24 * 16
    for name in ("ldadam", "galore"):
        prof = rows[name]["profile_ms"]
        assert {"checks", "project", "moments", "update"} <= set(prof), name
        assert prof["step"] == pytest.approx(sum(v for k, v in prof.items() if k != "step"))
    assert {"basis", "orthonormalize", "error_feedback"} <= set(rows["ldadam"]["profile_ms"])
    assert set(rows["adamw"]["profile_ms"]) == {"(other)", "step"}     # torch's: no phases
    assert "% of step" in capsys.readouterr().out


def test_peers_come_after_ours(bench):
    assert bench.selected_optimizers(["galore"], peers=True) == ["adamw", "galore", "galore_torch"]
    assert bench.selected_optimizers(["ldadam"], peers=True) == ["adamw", "ldadam"]     # no checkout given
    assert bench.selected_optimizers(["all"], peers=True, ldadam_ref="LDAdam") == [
        "adamw", "ldadam", "ldadam_ref", "galore", "galore_torch", "adapprox", "microadam"]


def test_compiled_runs_microadam_compiled_and_eager_in_one_run(bench, tmp_path):
    assert bench.selected_optimizers(["microadam"], compiled=True) == [
        "adamw", "microadam/compiled", "microadam/eager"]
    assert bench.selected_optimizers(["ldadam"], compiled=True) == ["adamw", "ldadam"]
    assert bench.options("microadam/compiled", 8) == {"compiled": True}
    assert bench.options("microadam/eager", 8) == {"compiled": False}
    assert bench.options("microadam", 8) == {}
    from ds_lowrank.utils.compiled import compile_unavailable
    if compile_unavailable():
        pytest.skip(f"torch.compile unavailable here: {compile_unavailable()}")
    out = tmp_path / "compiled.json"
    bench.main(["--model", "2x16x8", "--steps", "2", "--warmup", "0", "--optimizer", "microadam",
                "--compiled", "--out", str(out)])
    rows = by_optimizer(json.loads(out.read_text()))
    assert list(rows) == ["adamw", "microadam/compiled", "microadam/eager"]
    assert rows["microadam/compiled"]["options"] == {"compiled": True}
    assert rows["microadam/compiled"]["recompiles_timed"] == 0      # graphs built at the first step only
    assert "recompiles_timed" not in rows["microadam/eager"]
