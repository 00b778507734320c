"""The package as pip installs it: the wheel carries the configs, the model presets and the jobs.

One test builds the wheel, installs it (without dependencies) into a fresh virtual environment
that sees this interpreter's packages (torch, deepspeed), and from a folder outside the checkout,
with PYTHONPATH unset, prepares a small dataset, pretrains the tiny preset a few steps through
DeepSpeed's launcher (``--module ds_lowrank.jobs.pretrain``), exports and plots the run.
"""

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from helpers import free_port
from setuptools import find_packages

REPO = Path(__file__).resolve().parents[1]


def test_every_package_is_in_the_wheel_list():
    """pyproject.toml lists the packages (so that configs/ can be mapped in as ds_lowrank.configs):
    a new subpackage must be added there, or the wheel would lack it."""
    tomllib = pytest.importorskip("tomllib")
    listed = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert sorted(listed) == sorted([*find_packages(str(REPO), include=["ds_lowrank*"]), "ds_lowrank.configs"])


def test_resources_are_the_checkouts_configs():
    from ds_lowrank import resources
    assert resources.configs_dir() == REPO / "configs"
    assert resources.shipped_config("adamw_zero2") == REPO / "configs" / "adamw_zero2.json"
    assert resources.shipped_config("../configs/adamw_zero2.json") is None
    assert {"tiny", "1b"} <= {p.stem for p in resources.presets_dir().glob("*.json")}


def test_wheel_installs_and_runs_the_jobs_outside_the_checkout(tmp_path):
    # the sources a wheel is built from, copied so the build leaves nothing in the checkout
    src = tmp_path / "src"
    src.mkdir()
    for name in ("ds_lowrank", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PIP_NO_INDEX="1", PIP_ROOT_USER_ACTION="ignore")

    def run(*cmd, cwd=tmp_path, timeout=300):
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        return proc

    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src)
    (wheel,) = (tmp_path / "dist").glob("ds_lowrank-*.whl")
    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=True)
    bin_dir = tmp_path / "venv" / "bin"
    python = bin_dir / "python"
    run(python, "-m", "pip", "install", "--no-deps", wheel)

    work = tmp_path / "work"          # outside the checkout; nothing of it on the path
    work.mkdir()
    where = run(python, "-c", "import ds_lowrank, ds_lowrank.resources as r; print(ds_lowrank.__file__); "
                              "print(r.configs_dir())", cwd=work).stdout.split()
    site = tmp_path / "venv" / "lib"
    assert Path(where[0]).is_relative_to(site) and Path(where[1]).is_relative_to(site), where
    assert not Path(where[0]).is_relative_to(REPO)
    assert (Path(where[1]) / "ldadam_zero2.json").is_file() and (Path(where[1]) / "models" / "tiny.json").is_file()

    # data preparation, pretraining through DeepSpeed's launcher, export and plots
    docs = work / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"{i}.txt").write_text(f"Document {i} explains how the optimizer keeps its moments in a "
                                       f"low-rank subspace of every weight matrix, step {i} after step {i}.\n" * 8)
    run(bin_dir / "ds-lowrank-prepare-data", docs, "--output", work / "data", "--vocab_size", "300",
        "--val_fraction", "0.1", cwd=work)
    proc = run(python, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", free_port(),
               "--module", "ds_lowrank.jobs.pretrain", "--data", "data", "--seq_len", "32", "--max_steps", "4",
               "--eval_iters", "1", "--log_interval", "2", "--out_dir", "run", cwd=work, timeout=600)
    text = proc.stdout + proc.stderr
    assert "optimizer: LDAdam, ZeRO stage 2" in text and "done: 4 steps" in text, text[-3000:]
    assert str(Path(where[1]) / "ldadam_zero2.json") in text                 # the packaged default config
    assert len((work / "run" / "losses.jsonl").read_text().splitlines()) == 4
    assert json.loads((work / "run" / "ds_config.json").read_text())["scheduler"]["params"]["warmup_num_steps"] == 1
    assert any((work / "run" / "tensorboard").iterdir())

    run(bin_dir / "ds-lowrank-export-hf", "run", "hf", cwd=work)
    assert (work / "hf" / "config.json").is_file() and (work / "hf" / "tokenizer.json").is_file()
    if _has_matplotlib(python, env):       # the test extra has it; a bare install may not
        plots = run(bin_dir / "ds-lowrank-plot-runs", "run", "--out", "plots", cwd=work).stdout.split()
        assert "plots/loss.png" in plots and "plots/lowrank.png" in plots
    table = run(bin_dir / "ds-lowrank-estimate-memory", "--model", "tiny", "--zero", "2", cwd=work).stdout
    assert "LDAdam's optimizer state is" in table


def _has_matplotlib(python, env):
    return subprocess.run([str(python), "-c", "import matplotlib"], env=env, capture_output=True).returncode == 0
