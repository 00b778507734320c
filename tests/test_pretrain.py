"""launch/pretrain.py: a 2-rank ZeRO-2 run, exact resume, AdamW in one process, and bad input.

The runs are few and short (each launch costs ~15 s of start-up on CPU); the checks on bad
input call the script's own input checks in this process, plus one real command line.
"""

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port

from ds_lowrank.training import run_inputs, run_logs, run_settings

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "pretrain.py"
STEPS = 30
# Short and fp32 (exact resume); rank 16 < the tiny model's 128 so that LDAdam really compresses.
RUN_FLAGS = ["--seq_len", "32", "--max_steps", str(STEPS), "--warmup_steps", "5", "--eval_interval", "10",
             "--eval_iters", "4", "--save_interval", "10", "--log_interval", "5"]


def launch(args, cwd, ranks=2):
    """Run the script (torchrun with ``ranks`` processes, or plain python for 0) and return it."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    if ranks:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
               f"--master_port={free_port()}", str(SCRIPT), *args]
    else:
        cmd = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc


def read_jsonl(path, keep_time=False):
    """The records of a log file; without their wall-clock "time" (never the same twice) unless asked."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    return records if keep_time else [{k: v for k, v in r.items() if k != "time"} for r in records]


def scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A scratch directory, an fp32 variant of the shipped ZeRO-2 config, and a corpus cache
    shared by the launches (the first one builds the built-in corpus)."""
    root = tmp_path_factory.mktemp("pretrain")
    config = json.loads((REPO / "configs" / "ldadam_zero2.json").read_text())
    config["bf16"]["enabled"] = False
    config["train_micro_batch_size_per_gpu"] = 4
    config["optimizer"]["params"]["rank"] = 16
    (root / "fp32.json").write_text(json.dumps(config))
    return root


def common(work):
    return ["--deepspeed_config", str(work / "fp32.json"), "--data_cache", str(work / "cache"), *RUN_FLAGS]


@pytest.fixture(scope="module")
def straight(work):
    """30 steps in one go, 2 ranks, ZeRO-2, on the built-in corpus."""
    proc = ok(launch([*common(work), "--out_dir", str(work / "straight")], cwd=work))
    return work / "straight", proc


# --------------------------------------------------------------------------- a 2-rank run

def test_run_trains_evaluates_logs_and_checkpoints(straight):
    out, proc = straight
    assert "built-in corpus" in proc.stdout + proc.stderr
    losses = read_jsonl(out / "losses.jsonl")
    assert [r["step"] for r in losses] == list(range(1, STEPS + 1))
    first, last = [r["loss"] for r in losses[:5]], [r["loss"] for r in losses[-5:]]
    assert sum(last) / 5 < sum(first) / 5 - 0.3, (first, last)

    evals = read_jsonl(out / "eval.jsonl")
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]

    # warmup, then the cosine decay the config's WarmupCosineLR gives over --max_steps
    lrs = [r["lr"] for r in losses]
    assert lrs[2] < lrs[4] and max(lrs) == pytest.approx(1e-3) and lrs[-1] < 0.2e-3

    tb = scalars(out / "tensorboard")
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/mfu",
                "memory/peak_MiB", "memory/optimizer_state_MiB", "memory/optimizer_state_MiB_max_rank",
                "memory/optimizer_state/error_feedback_MiB", "lowrank/ef_to_grad", "lowrank/ef_to_grad_max",
                "lowrank/basis_drift", "lowrank/basis_drift_max", "val/loss", "val/perplexity"):
        assert tag in tb, tag
    assert [s for s, _ in tb["train/loss"]] == [5, 10, 15, 20, 25, 30]
    assert all(v > 0 for _, v in tb["perf/tokens_per_s"] + tb["memory/peak_MiB"] + tb["train/grad_norm"])
    assert all(0 < v < 10 for _, v in tb["lowrank/ef_to_grad"])
    assert all(0 < v < 1 for _, v in tb["lowrank/basis_drift"])

    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"step{STEPS}"
    for tag in ("step10", "step20", "step30"):
        files = sorted(p.name for p in (checkpoints / tag).iterdir())
        assert "mp_rank_00_model_states.pt" in files
        assert sum("optim_states" in f for f in files) == 2, files    # one partition per rank


# --------------------------------------------------------------------------- resume

def test_resume_reproduces_the_uninterrupted_run_exactly(work, straight):
    out = work / "interrupted"
    first = ok(launch([*common(work), "--out_dir", str(out), "--stop_at_step", "15"], cwd=work))
    assert "stopped at step 15" in first.stdout + first.stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == "step15"
    assert len(read_jsonl(out / "losses.jsonl")) == 15

    second = ok(launch([*common(work), "--out_dir", str(out), "--resume"], cwd=work))
    assert "resume: step 15" in second.stdout + second.stderr
    resumed = read_jsonl(out / "losses.jsonl")
    reference = read_jsonl(straight[0] / "losses.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert resumed[:15] == reference[:15]                          # same seeds, same run
    for got, want in zip(resumed[15:], reference[15:]):
        assert got["loss"] == want["loss"], (got, want)          # bit for bit, steps 16-30
        assert got["lr"] == want["lr"] and got["grad_norm"] == want["grad_norm"]


# --------------------------------------------------------------------------- another world size

@pytest.fixture(scope="module")
def consolidated(work, straight):
    """The 2-rank run's step-20 checkpoint, consolidated."""
    whole = work / "consolidated"
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"),
                           str(straight[0] / "checkpoints"), str(whole), "--tag", "step20"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return whole


def test_resume_from_a_consolidated_checkpoint_on_one_rank(work, straight, consolidated):
    """The 2-rank run's step-20 checkpoint, consolidated, finishes on one rank with accumulation 2
    (the same global batch): steps 21-30 follow the uninterrupted run."""
    whole = consolidated
    config = json.loads((work / "fp32.json").read_text())
    config["gradient_accumulation_steps"] = 2          # 1 rank × 4 × 2 = 2 ranks × 4
    (work / "fp32_one_rank.json").write_text(json.dumps(config))
    out = work / "one_rank"
    args = [*common(work), "--deepspeed_config", str(work / "fp32_one_rank.json"), "--resume_from", str(whole),
            "--out_dir", str(out)]
    proc = ok(launch(args, cwd=work, ranks=0))
    assert "resume: step 20, 160 samples consumed" in proc.stdout + proc.stderr
    assert "resume: data-parallel ranks changed from 2 to 1; applied" in proc.stdout + proc.stderr
    resumed = read_jsonl(out / "losses.jsonl")
    reference = read_jsonl(straight[0] / "losses.jsonl")[20:]
    assert [r["step"] for r in resumed] == list(range(21, STEPS + 1))
    for got, want in zip(resumed, reference):
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), (got, want)


def test_resume_from_needs_a_consolidated_checkpoint(pretrain, tmp_path):
    msg = refused(pretrain, "--resume_from", str(tmp_path))
    assert "not a consolidated checkpoint" in msg and "tools/convert_checkpoint.py" in msg
    msg = refused(pretrain, "--resume_from", str(tmp_path), "--resume")
    assert "exclude each other" in msg


# --------------------------------------------------------------------------- AdamW, one process

def test_deepspeed_adamw_in_one_process_with_csv_and_tensorboard_monitors(work):
    """A DeepSpeed-native optimizer passes through; plain `python launch/pretrain.py` is a world of one.
    The config's csv_monitor and tensorboard sections get the job's events, AdamW's state bytes
    (8 per parameter: its two fp32 moments) included."""
    config = json.loads((REPO / "configs" / "adamw_zero2.json").read_text())
    config["csv_monitor"] = {"enabled": True}                       # into --out_dir/csv_monitor
    config["tensorboard"] = {"enabled": True, "job_name": "tb"}     # into --out_dir/tb
    (work / "adamw_csv.json").write_text(json.dumps(config))
    out = work / "adamw"
    proc = ok(launch(["--deepspeed_config", str(work / "adamw_csv.json"),
                      "--data_cache", str(work / "cache"), "--seq_len", "32", "--max_steps", "6",
                      "--eval_iters", "2", "--log_interval", "3", "--out_dir", str(out)], cwd=work, ranks=0))
    assert "optimizer: AdamW" in proc.stdout + proc.stderr
    losses = read_jsonl(out / "losses.jsonl", keep_time=True)
    assert [r["tokens"] for r in losses] == [8 * 32 * s for s in range(1, 7)]
    assert all(b["time"] > a["time"] > 0 for a, b in zip(losses, losses[1:]))

    def csv(name):
        rows = (out / "csv_monitor" / f"{name}.csv").read_text().splitlines()
        assert rows[0].startswith("step,")
        return [(int(step), float(value)) for step, value in (row.split(",") for row in rows[1:])]

    assert [s for s, _ in csv("train_loss")] == [3, 6] and [s for s, _ in csv("train_lr")] == [3, 6]
    assert csv("val_loss")[-1][0] == 6
    n_params = tiny_parameter_count(work / "cache")
    for _, mib in csv("memory_optimizer_state_MiB"):
        assert mib * 2**20 == pytest.approx(8 * n_params, rel=1e-3)          # exp_avg + exp_avg_sq, fp32
    assert csv("memory_optimizer_state_dense_moments_MiB")[-1][1] > 0
    assert not (out / "csv_monitor" / "Train_Samples_lr.csv").exists()         # one step axis
    tb = scalars(out / "tb")
    assert "train/loss" in tb and "val/loss" in tb and "memory/optimizer_state_MiB" in tb
    assert not any(tag.startswith("lowrank/") for tag in tb)
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [3, 6]
    assert metrics[-1]["state_bytes_by_rank"]["dense_moments"] == [8 * n_params]


def tiny_parameter_count(cache):
    """Parameters of the runs' model: the tiny preset at the built-in corpus's vocabulary."""
    from ds_lowrank.training.models import build_model, load_preset
    meta = json.loads(next(Path(cache).glob("*/meta.json")).read_text())
    model = build_model(load_preset("tiny"), 32, vocab_size=meta["vocab_size"], device="meta")
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def pretrain():
    import ds_lowrank.jobs.pretrain
    return ds_lowrank.jobs.pretrain


def refused(pretrain, *argv):
    with pytest.raises(pretrain.InputError) as err:
        run_inputs.check_inputs(pretrain.parse_args(list(argv)))
    return str(err.value)


def write_config(path, change):
    config = json.loads((REPO / "configs" / "ldadam_zero2.json").read_text())
    change(config)
    path.write_text(json.dumps(config))
    return str(path)


def test_missing_or_empty_data(pretrain, tmp_path):
    msg = refused(pretrain, "--data", str(tmp_path / "nowhere"))
    assert "does not exist" in msg and "tools/prepare_data.py" in msg
    (tmp_path / "empty").mkdir()
    msg = refused(pretrain, "--data", str(tmp_path / "empty"))
    assert "empty directory" in msg and "tools/prepare_data.py" in msg
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a dataset")
    msg = refused(pretrain, "--data", str(tmp_path / "other"))
    assert "no meta.json" in msg and "tools/prepare_data.py" in msg


def test_config_without_optimizer(pretrain, tmp_path):
    path = write_config(tmp_path / "c.json", lambda c: c.pop("optimizer"))
    msg = refused(pretrain, "--deepspeed_config", path)
    assert 'no "optimizer" section' in msg and '"type": "LDAdam"' in msg


def test_unknown_optimizer_type(pretrain, tmp_path):
    path = write_config(tmp_path / "c.json", lambda c: c["optimizer"].update(type="SuperAdam"))
    msg = refused(pretrain, "--deepspeed_config", path)
    assert "unknown optimizer type 'SuperAdam'" in msg and "LDAdam" in msg


def test_rank_larger_than_a_matrix(pretrain, tmp_path):
    path = write_config(tmp_path / "c.json", lambda c: c["optimizer"]["params"].update(rank=200))
    msg = refused(pretrain, "--deepspeed_config", path)
    assert "rank=200" in msg and "model.layers.0.self_attn.q_proj.weight" in msg and "at most 128" in msg


def test_unknown_model_preset(pretrain):
    msg = refused(pretrain, "--model", "giant")
    assert "unknown model preset 'giant'" in msg and "tiny" in msg and "60m" in msg


def test_sequence_longer_than_the_model_allows(pretrain):
    msg = refused(pretrain, "--seq_len", "512")
    assert "--seq_len 512" in msg and "max_position_embeddings 256" in msg


def test_schedule_and_checkpoint_flags(pretrain, tmp_path):
    # the shipped configs warm up for 10% of --max_steps (at least one step), whatever its length
    for steps, warmup in ((10, 1), (60, 6), (200, 20), (5000, 500)):
        run = run_inputs.check_inputs(pretrain.parse_args(["--max_steps", str(steps)]))
        params = run.ds_config["scheduler"]["params"]
        assert params["warmup_num_steps"] == warmup and params["total_num_steps"] == steps
        assert "warmup_ratio" not in params                      # DeepSpeed's scheduler does not know it
    run = run_inputs.check_inputs(pretrain.parse_args(["--max_steps", "60", "--warmup_steps", "3"]))
    assert run.ds_config["scheduler"]["params"]["warmup_num_steps"] == 3
    fixed = write_config(tmp_path / "fixed.json", lambda c: c["scheduler"]["params"].update(warmup_num_steps=100))
    assert "--warmup_steps between 1 and 9" in refused(pretrain, "--deepspeed_config", fixed, "--max_steps", "10")
    bad = write_config(tmp_path / "bad.json", lambda c: c["scheduler"]["params"].update(warmup_ratio=1.5))
    assert "warmup_ratio must be a number in [0, 1)" in refused(pretrain, "--deepspeed_config", bad)
    msg = refused(pretrain, "--resume", "--out_dir", str(tmp_path / "fresh"))
    assert "no checkpoint" in msg
    (tmp_path / "used" / "checkpoints").mkdir(parents=True)
    (tmp_path / "used" / "checkpoints" / "latest").write_text("step5")
    msg = refused(pretrain, "--out_dir", str(tmp_path / "used"))
    assert "--resume" in msg and "--overwrite" in msg


@pytest.mark.parametrize("change,needle", [
    (lambda c: c.update(optimizer=[c["optimizer"]]), r'"optimizer" section must be one object'),
    (lambda c: c["optimizer"]["params"].update(betas=0.9), r"invalid betas=0\.9: expected two floats"),
    (lambda c: c["optimizer"]["params"].update(eps=True), r"invalid eps=True"),
    (lambda c: c["optimizer"]["params"].update(dense_patterns=["mlp("]), r"dense_patterns: 'mlp\(' is not a valid"),
    (lambda c: c["zero_optimization"].update(stage="2"), r"zero_optimization\.stage='2' is not a ZeRO stage"),
    (lambda c: c["zero_optimization"].update(stage=7), r"zero_optimization\.stage=7 is not a ZeRO stage"),
    (lambda c: c.update(optimizer={"type": "AdamW", "params": None}), r'"optimizer\.params" must be an object'),
    (lambda c: c.update(zero_optimization=True), r'"zero_optimization" must be an object'),
])
def test_malformed_config_is_bad_input(pretrain, tmp_path, change, needle):
    path = write_config(tmp_path / "c.json", change)
    msg = refused(pretrain, "--deepspeed_config", path)
    assert re.search(needle, msg), msg
    assert msg.startswith(f"DeepSpeed config {path}: ")


def test_negative_seed_is_bad_input(pretrain):
    assert "--seed must be 0 or positive, got -1" in refused(pretrain, "--seed", "-1")


def test_garbage_model_file_is_bad_input(pretrain, tmp_path):
    (tmp_path / "blob.json").write_bytes(bytes(range(256)))
    assert "is not a JSON text file" in refused(pretrain, "--model", str(tmp_path / "blob.json"))
    msg = refused(pretrain, "--model", str(REPO / "configs" / "ldadam_zero2.json"))
    assert "is not a LlamaConfig" in msg and "--deepspeed_config" in msg


def fake_dataset(directory, tokens=1000, vocab_size=4096):
    """A dataset directory as prepare_data.py lays it out, without a tokenizer (the reader
    needs none)."""
    directory.mkdir()
    ids = np.arange(tokens, dtype="<u2") % vocab_size
    for split in ("train", "val"):
        (directory / f"{split}.bin").write_bytes(ids.tobytes())
    meta = {"format": "ds_lowrank.tokens", "version": 1, "dtype": "uint16", "vocab_size": vocab_size,
            "eos_token_id": 0, "splits": {s: {"tokens": tokens, "documents": 1} for s in ("train", "val")}}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def test_damaged_data_is_bad_input(pretrain, tmp_path):
    data = fake_dataset(tmp_path / "data")
    (data / "train.bin").write_bytes((data / "train.bin").read_bytes()[:999])
    msg = refused(pretrain, "--data", str(data))
    assert msg.startswith("--data: ") and "train.bin holds 999 bytes" in msg and "prepare_data.py" in msg
    (data / "meta.json").write_text("garbage")
    assert "meta.json is not valid JSON" in refused(pretrain, "--data", str(data))
    other = fake_dataset(tmp_path / "other", vocab_size=60000)
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "vocab_size": 500}))
    assert "token id 500 at position 500 is outside the vocabulary" in refused(pretrain, "--data", str(other))


def test_command_line_reports_bad_input_before_deepspeed_starts(tmp_path):
    proc = launch(["--data", str(tmp_path / "nowhere")], cwd=tmp_path, ranks=0)
    assert proc.returncode == 1
    assert "error: --data" in proc.stderr and "does not exist" in proc.stderr
    assert "Initializing TorchBackend" not in proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []      # nothing written


# --------------------------------------------------------------------------- the other optimizers

@pytest.mark.parametrize("name", ["galore", "adapprox", "microadam"])
def test_shipped_config_of_each_optimizer_trains_on_two_ranks(work, name):
    """configs/<name>_zero2.json as shipped (bf16, ZeRO-2) drives the job on 2 ranks."""
    out = work / name
    proc = ok(launch(["--deepspeed_config", str(REPO / "configs" / f"{name}_zero2.json"),
                      "--data_cache", str(work / "cache"), "--seq_len", "32", "--max_steps", "12",
                      "--warmup_steps", "2", "--eval_interval", "12", "--eval_iters", "2",
                      "--log_interval", "4", "--save_interval", "12", "--out_dir", str(out)], cwd=work))
    expected = {"galore": "GaLore", "adapprox": "Adapprox", "microadam": "MicroAdam"}[name]
    assert f"optimizer: {expected}" in proc.stdout + proc.stderr
    losses = [r["loss"] for r in read_jsonl(out / "losses.jsonl")]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]), losses
    tb = scalars(out / "tensorboard")
    assert all(v > 0 for _, v in tb["memory/optimizer_state_MiB"])
    files = [p.name for p in (out / "checkpoints" / "step12").iterdir()]
    assert sum("optim_states" in f for f in files) == 2, files


# --------------------------------------------------------------------------- the resume-time log rewrite

def test_log_rewrite_on_resume_is_atomic(pretrain, tmp_path, monkeypatch):
    """The rewrite of losses.jsonl goes through a temporary file and a rename: a write that fails
    midway (a full disk, a kill) leaves the old file whole.  A last line cut short is dropped."""
    import builtins
    import io

    path = tmp_path / "losses.jsonl"
    records = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 9))
    path.write_text(records)
    real_open = io.open

    def torn_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "w" not in mode or "losses" not in str(file):
            return f

        class Torn:
            def write(self, data):
                f.write(data[:len(data) // 2])
                f.flush()
                raise OSError(28, "No space left on device")

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def __getattr__(self, name):
                return getattr(f, name)
        return Torn()

    monkeypatch.setattr(builtins, "open", torn_open)
    monkeypatch.setattr(io, "open", torn_open)
    with pytest.raises(OSError, match="No space left"):
        run_logs.keep_lines_until(path, 5)
    monkeypatch.undo()
    assert path.read_text() == records
    assert sorted(p.name for p in tmp_path.iterdir()) == ["losses.jsonl"]

    path.write_text(records + '{"step": 9, "lo')                    # killed while writing step 9
    run_logs.keep_lines_until(path, 5)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4, 5]


# --------------------------------------------------------------------------- one run per --out_dir

def test_a_second_run_on_the_same_out_dir_is_refused(work, tmp_path):
    """The run directory's lock is held (here by this process, as a live run holds it): another
    run there stops before writing anything, naming the holder."""
    import fcntl

    out = tmp_path / "busy"
    out.mkdir()
    with open(out / "run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "earlier"}))
        lock.flush()
        proc = launch([*common(work), "--out_dir", str(out)], cwd=work, ranks=0)
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert f"in use by another run (pid {os.getpid()} on host {socket.gethostname()}" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]


# --------------------------------------------------------------------------- a run that diverges

def test_a_diverging_run_stops_and_keeps_latest_finite(work, tmp_path):
    """An enormous learning rate (DeepSpeed's AdamW, no ZeRO: nothing skips the non-finite steps)
    turns the loss and then the weights to NaN: the run stops with status 1 after
    --max_nonfinite_steps, and 'latest' stays at the last checkpoint whose tensors are finite."""
    import torch

    config = json.loads((REPO / "configs" / "adamw_zero2.json").read_text())
    config.update(zero_optimization={"stage": 0}, bf16={"enabled": False}, train_micro_batch_size_per_gpu=4)
    (tmp_path / "adamw.json").write_text(json.dumps(config))
    out = tmp_path / "diverged"
    proc = launch(["--deepspeed_config", str(tmp_path / "adamw.json"), "--data_cache", str(work / "cache"),
                   "--seq_len", "32", "--max_steps", "20", "--warmup_steps", "1", "--eval_interval", "0",
                   "--eval_iters", "2", "--save_interval", "1", "--max_nonfinite_steps", "3", "--lr", "1e20",
                   "--out_dir", str(out)], cwd=work, ranks=0)
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "error: the training loss has been nan for 3 consecutive steps" in proc.stderr
    losses = read_jsonl(out / "losses.jsonl")
    assert len(losses) < 20 and all(math.isnan(r["loss"]) for r in losses[-3:])

    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert f"the last finite checkpoint is {latest}" in proc.stderr

    def finite(tag):
        state = torch.load(out / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)
        return all(bool(torch.isfinite(t).all()) for t in state["module"].values())

    assert finite(latest)
    later = [p.name for p in (out / "checkpoints").glob("step*") if int(p.name[4:]) > int(latest[4:])]
    assert later and not any(finite(tag) for tag in later)       # written, never published


# --------------------------------------------------------------------------- a resume with other settings

def resume_checked(pretrain, monkeypatch, world, *argv):
    """What the script's checks say of a resume at ``world`` ranks: the changes applied, or the refusal."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    try:
        return pretrain.check_run(pretrain.parse_args(list(argv))).resume_changes
    except pretrain.InputError as err:
        return str(err)


def variant(work, name, change):
    config = json.loads((work / "fp32.json").read_text())
    change(config)
    (work / f"{name}.json").write_text(json.dumps(config))
    return str(work / f"{name}.json")


def test_resume_with_other_settings_applies_or_refuses_each(work, straight, consolidated, pretrain, monkeypatch):
    """Every setting the 2-rank checkpoint was written with is compared: the state-shaping ones are
    refused naming the setting, the old and new values and the way forward; hyperparameters are applied."""
    out = str(straight[0])

    def resume(name, change, *flags, world=2):
        return resume_checked(pretrain, monkeypatch, world, *common(work), "--out_dir", out, "--resume",
                              "--deepspeed_config", variant(work, name, change), *flags)

    assert resume("same", lambda c: None) == []
    msg = resume("rank8", lambda c: c["optimizer"]["params"].update(rank=8))
    assert "optimizer param rank: 16 in the checkpoint, 8 now" in msg and '"rank": 16' in msg
    assert "fresh --out_dir" in msg
    msg = resume("ef_bf16", lambda c: c["optimizer"]["params"].update(ef_dtype="bfloat16"))
    assert 'optimizer param ef_dtype: "int4" in the checkpoint, "bfloat16" now' in msg
    msg = resume("galore", lambda c: c["optimizer"].update(type="GaLore", params={"lr": 1e-3, "rank": 16}))
    assert "optimizer type: the checkpoint holds LDAdam state, the config builds GaLoreAdamW" in msg
    msg = resume("adamw", lambda c: c["optimizer"].update(type="AdamW", params={"lr": 1e-3}))
    assert "the config builds AdamW" in msg and "convert_checkpoint.py --to adam" in msg
    msg = resume("zero3", lambda c: c["zero_optimization"].update(stage=3))
    assert "ZeRO stage: 2 in the checkpoint, 3 now" in msg
    assert "tools/convert_checkpoint.py" in msg and "--resume_from" in msg
    msg = resume("bf16", lambda c: c["bf16"].update(enabled=True))
    assert "precision: fp32 in the checkpoint, bf16 now" in msg and "tools/convert_checkpoint.py" in msg
    msg = resume("same", lambda c: None, "--seed", "1")
    assert "--seed: 0 in the checkpoint, 1 now" in msg and "pass --seed 0" in msg
    msg = resume("micro8", lambda c: c.update(train_micro_batch_size_per_gpu=8))
    assert "global batch: 8 samples per step in the checkpoint, 16 now" in msg
    msg = resume("accumulate2", lambda c: c.update(gradient_accumulation_steps=2), world=1)
    assert "data-parallel ranks: 2 in the checkpoint, 1 now" in msg and "global batch" not in msg
    changes = resume("hyper", lambda c: c["optimizer"]["params"].update(betas=[0.9, 0.95], weight_decay=0.1),
                     "--lr", "5e-4", "--warmup_steps", "3")
    assert "optimizer param lr changed from 0.001 to 0.0005" in changes
    assert "optimizer param weight_decay changed from 0.0 to 0.1" in changes
    assert any(c.startswith("scheduler changed") for c in changes)

    # --resume_from a consolidated checkpoint: ZeRO stage, ranks and precision are applied; the
    # optimizer state's own settings, the seed and the global batch are not.
    def resume_from(name, change, *flags, world=1):
        return resume_checked(pretrain, monkeypatch, world, *common(work), "--out_dir", str(work / "elsewhere"),
                              "--resume_from", str(consolidated), "--deepspeed_config",
                              variant(work, name, change), *flags)

    changes = resume_from("z3_bf16", lambda c: (c["zero_optimization"].update(stage=3), c["bf16"].update(enabled=True),
                                                c.update(gradient_accumulation_steps=2)))
    assert changes == ["ZeRO stage changed from 2 to 3", "data-parallel ranks changed from 2 to 1",
                       "precision changed from fp32 to bf16"]
    msg = resume_from("rank8_accumulate2", lambda c: (c["optimizer"]["params"].update(rank=8),
                                                      c.update(gradient_accumulation_steps=2)))
    assert "optimizer param rank: 16 in the checkpoint, 8 now" in msg
    msg = resume_from("same", lambda c: None)
    assert "global batch: 8 samples per step in the checkpoint, 4 now" in msg


def test_a_refused_resume_exits_before_deepspeed_starts(work, straight):
    config = variant(work, "rank8", lambda c: c["optimizer"]["params"].update(rank=8))
    proc = launch([*common(work), "--deepspeed_config", config, "--out_dir", str(straight[0]), "--resume"],
                  cwd=work, ranks=0)
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "error: cannot continue" in proc.stderr and "optimizer param rank: 16 in the checkpoint, 8 now" in proc.stderr
    assert "Initializing TorchBackend" not in proc.stdout + proc.stderr


def test_resume_applies_changed_hyperparameters(work, straight):
    """New betas, weight decay and peak learning rate take effect from the first resumed step (the
    checkpoint's parameter groups would otherwise win), and the run directory records them."""
    import shutil
    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    out = work / "changed_hyper"
    shutil.copytree(straight[0] / "checkpoints", out / "checkpoints", ignore=shutil.ignore_patterns("step10", "step20"))
    config = variant(work, "hyper", lambda c: c["optimizer"]["params"].update(betas=[0.9, 0.95], weight_decay=0.1))
    proc = ok(launch([*common(work), "--deepspeed_config", config, "--lr", "5e-4", "--max_steps", "32",
                      "--out_dir", str(out), "--resume"], cwd=work))
    text = proc.stdout + proc.stderr
    assert "resume: optimizer param weight_decay changed from 0.0 to 0.1; applied" in text
    assert "resume: optimizer param lr changed from 0.001 to 0.0005; applied" in text
    state = torch.load(out / "checkpoints" / "step32" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    for group in state["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]:
        assert group["weight_decay"] == 0.1 and tuple(group["betas"]) == (0.9, 0.95) and group["rank"] == 16
    assert json.loads((out / "ds_config.json").read_text())["optimizer"]["params"]["weight_decay"] == 0.1

    # the rate of step 31 is the new schedule's (peak 5e-4 over 32 steps), not the checkpoint's
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5e-4)
    schedule = WarmupCosineLR(dummy, total_num_steps=32, warmup_num_steps=5, warmup_min_ratio=0.0, cos_min_ratio=0.1,
                              last_batch_iteration=29)     # step k runs at the schedule's iteration k - 2
    first = read_jsonl(out / "losses.jsonl")[0]
    assert first["step"] == 31 and first["lr"] == pytest.approx(schedule.get_lr()[0], rel=1e-12)


def test_resume_of_a_checkpoint_without_recorded_settings(work, pretrain, monkeypatch, tmp_path):
    """A checkpoint from before settings were recorded: what DeepSpeed's own record holds (its
    config, without a client optimizer, and the number of ranks) is still compared."""
    import torch

    saved = json.loads((work / "fp32.json").read_text())
    saved.pop("optimizer")
    saved["scheduler"]["params"].update(total_num_steps=STEPS, warmup_num_steps=5)    # as the run set them
    saved["scheduler"]["params"].pop("warmup_ratio")
    (tmp_path / "old" / "checkpoints" / "step10").mkdir(parents=True)
    torch.save({"ds_config": saved, "dp_world_size": 2, "seed": 0, "step": 10},
               tmp_path / "old" / "checkpoints" / "step10" / "mp_rank_00_model_states.pt")
    (tmp_path / "old" / "checkpoints" / "latest").write_text("step10")
    argv = [*common(work), "--out_dir", str(tmp_path / "old"), "--resume"]
    assert resume_checked(pretrain, monkeypatch, 2, *argv) == []
    config = variant(work, "zero1", lambda c: c["zero_optimization"].update(stage=1))
    msg = resume_checked(pretrain, monkeypatch, 2, *argv, "--deepspeed_config", config, "--seed", "2")
    assert "ZeRO stage: 2 in the checkpoint, 1 now" in msg and "--seed: 0 in the checkpoint, 2 now" in msg

    # DeepSpeed Adam's universal checkpoint from another program: nothing recorded but the optimizer
    new = run_settings.run_settings(json.loads((work / "fp32.json").read_text()), 1, 0)
    assert run_settings.compare_settings({"optimizer": "universal Adam", "seed": None}, new, False, tmp_path) == ([], [])



# --------------------------------------------------------------------------- export to Hugging Face

def test_export_hf_loads_generates_and_holds_the_trained_weights(work, straight, tmp_path):
    """tools/export_hf.py on the 2-rank ZeRO-2 run (fp32: the model states hold the trained weights
    exactly): from_pretrained gives the same weights, with the dataset's tokenizer, and generates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "export_hf.py"), str(straight[0]), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"step{STEPS}: " in proc.stdout and "tokenizer" in proc.stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    trained = torch.load(straight[0] / "checkpoints" / f"step{STEPS}" / "mp_rank_00_model_states.pt",
                         weights_only=False)["module"]
    exported = model.state_dict()
    assert set(trained) == set(exported)
    for name, weight in trained.items():
        assert torch.equal(exported[name], weight.float()), name
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("Return the number of", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5
    assert isinstance(tokenizer.decode(generated[0]), str)

    # a damaged checkpoint is refused naming the file; an existing output is not replaced
    damaged = tmp_path / "damaged"
    import shutil
    shutil.copytree(straight[0] / "checkpoints" / f"step{STEPS}", damaged)
    with open(damaged / "mp_rank_00_model_states.pt", "r+b") as f:
        f.seek(100)
        f.write(b"\0" * 64)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "export_hf.py"), str(damaged), str(tmp_path / "x")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "mp_rank_00_model_states.pt" in proc.stderr and "corrupt" in proc.stderr
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "export_hf.py"), str(straight[0]), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "--overwrite" in proc.stderr


def test_export_hf_from_zero3_gathers_the_partitioned_weights(work, straight, tmp_path):
    """At ZeRO-3 the model-states file holds no weights (each rank holds a partition): the export
    gathers them, and they are the weights the same run trains at ZeRO-2."""
    import torch
    from transformers import AutoModelForCausalLM

    config = variant(work, "zero3", lambda c: c["zero_optimization"].update(stage=3))
    run = tmp_path / "zero3"
    ok(launch([*common(work), "--deepspeed_config", config, "--out_dir", str(run), "--seed", "0"], cwd=work))
    out = tmp_path / "hf3"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "export_hf.py"), str(run), str(out)],
                          env=dict(os.environ, DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    zero2 = torch.load(straight[0] / "checkpoints" / f"step{STEPS}" / "mp_rank_00_model_states.pt",
                       weights_only=False)["module"]
    assert set(exported) == set(zero2)
    # The stages' runs part by rounding over 30 steps (up to a fifth of what the last 20 steps moved
    # each weight, here); an export of other weights (stale, initial, misnamed) would be as far as
    # those steps, or farther.
    earlier = torch.load(straight[0] / "checkpoints" / "step10" / "mp_rank_00_model_states.pt",
                         weights_only=False)["module"]
    for name, weight in zero2.items():
        moved = (earlier[name].float() - weight.float()).norm()
        assert (exported[name] - weight.float()).norm() < 0.5 * moved, name


# --------------------------------------------------------------------------- --engine fsdp2

def fsdp2_flags(work, out):
    return [*common(work), "--engine", "fsdp2", "--out_dir", str(out)]


@pytest.fixture(scope="module")
def fsdp2_straight(work):
    """The same 30 steps as ``straight`` on FSDP2, 2 ranks."""
    proc = ok(launch(fsdp2_flags(work, work / "fsdp2_straight"), cwd=work))
    return work / "fsdp2_straight", proc


def test_fsdp2_run_trains_logs_checkpoints_and_tracks_deepspeed(fsdp2_straight, straight):
    """Same data, initialisation, schedule and clipping as the DeepSpeed run, and optimizers that equal
    one process on either engine: the two runs' losses agree to rounding, the learning rates exactly."""
    out, proc = fsdp2_straight
    assert "FSDP2" in proc.stdout + proc.stderr
    losses, reference = read_jsonl(out / "losses.jsonl"), read_jsonl(straight[0] / "losses.jsonl")
    assert [r["step"] for r in losses] == list(range(1, STEPS + 1))
    first, last = [r["loss"] for r in losses[:5]], [r["loss"] for r in losses[-5:]]
    assert sum(last) / 5 < sum(first) / 5 - 0.3, (first, last)
    assert [r["lr"] for r in losses] == [r["lr"] for r in reference]
    for got, want in zip(losses, reference):
        assert got["loss"] == pytest.approx(want["loss"], abs=2e-3), (got, want)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-2), (got, want)
    assert [r["step"] for r in read_jsonl(out / "eval.jsonl")] == [10, 20, 30]

    tb = scalars(out / "tensorboard")
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "memory/optimizer_state_MiB",
                "memory/optimizer_state/error_feedback_MiB", "val/loss"):
        assert tag in tb, tag
    assert [s for s, _ in tb["train/loss"]] == [5, 10, 15, 20, 25, 30]
    # the optimizer's diagnostics, from the DTensor state summed over the mesh: the DeepSpeed run's
    deepspeed_tb = scalars(straight[0] / "tensorboard")
    # The engines sum in other orders, so the runs part by rounding: the means agree within 3%,
    # the largest basis drift (one matrix's rotation, the most sensitive) within 7% by step 30.
    for tag, rel in (("lowrank/ef_to_grad", 0.05), ("lowrank/ef_to_grad_max", 0.05),
                     ("lowrank/basis_drift", 0.05), ("lowrank/basis_drift_max", 0.12)):
        assert [s for s, _ in tb[tag]] == [s for s, _ in deepspeed_tb[tag]], tag
        for (_, got), (_, want) in zip(tb[tag], deepspeed_tb[tag]):
            assert got == pytest.approx(want, rel=rel, abs=1e-3), (tag, got, want)

    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"step{STEPS}"
    for tag in ("step10", "step20", "step30"):
        files = sorted(p.name for p in (checkpoints / tag).iterdir())
        assert ".metadata" in files and "client_state.pt" in files and "checksums.json" in files, files
        assert sum(f.endswith(".distcp") for f in files) == 2, files     # one shard file per rank


def test_fsdp2_resume_reproduces_the_uninterrupted_run_exactly(work, fsdp2_straight):
    out = work / "fsdp2_interrupted"
    ok(launch([*fsdp2_flags(work, out), "--stop_at_step", "15"], cwd=work))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step15"
    second = ok(launch([*fsdp2_flags(work, out), "--resume"], cwd=work))
    assert "resume: step 15" in second.stdout + second.stderr
    resumed, reference = read_jsonl(out / "losses.jsonl"), read_jsonl(fsdp2_straight[0] / "losses.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for got, want in zip(resumed, reference):
        assert got == want                           # bit for bit: loss, lr, grad_norm, tokens


def test_fsdp2_resume_at_another_world_size(work, fsdp2_straight):
    """torch.distributed.checkpoint reshards: the 2-rank step-20 checkpoint continues on one rank
    (the same global batch through accumulation), close to the 2-rank run."""
    out = work / "fsdp2_one_rank"
    source = fsdp2_straight[0] / "checkpoints"
    (out / "checkpoints").mkdir(parents=True)
    import shutil
    shutil.copytree(source / "step20", out / "checkpoints" / "step20")
    (out / "checkpoints" / "latest").write_text("step20")
    config = variant(work, "fsdp2_accumulate2", lambda c: c.update(gradient_accumulation_steps=2))
    proc = ok(launch([*fsdp2_flags(work, out), "--deepspeed_config", config, "--resume"], cwd=work, ranks=0))
    text = proc.stdout + proc.stderr
    assert "resume: step 20" in text and "data-parallel ranks changed from 2 to 1" in text
    resumed, reference = read_jsonl(out / "losses.jsonl"), read_jsonl(fsdp2_straight[0] / "losses.jsonl")
    assert [r["step"] for r in resumed] == list(range(21, STEPS + 1))
    for got, want in zip(resumed, reference[20:]):
        assert got["lr"] == want["lr"]
        assert got["loss"] == pytest.approx(want["loss"], abs=2e-3), (got, want)


def test_export_hf_from_an_fsdp2_checkpoint(straight, fsdp2_straight, tmp_path):
    """tools/export_hf.py reads the FSDP2 run's DCP checkpoint in one process (every rank's shards):
    the model config and tokenizer the run recorded, and the weights the same run trains under
    DeepSpeed (the two engines' runs part by rounding only, see above)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf_fsdp2"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "export_hf.py"), str(fsdp2_straight[0]), str(out)],
                          env=dict(os.environ, DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"step{STEPS}: " in proc.stdout and "step 30, tokenizer" in proc.stdout, proc.stdout
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    zero2 = torch.load(straight[0] / "checkpoints" / f"step{STEPS}" / "mp_rank_00_model_states.pt",
                       weights_only=False)["module"]
    earlier = torch.load(straight[0] / "checkpoints" / "step10" / "mp_rank_00_model_states.pt",
                         weights_only=False)["module"]
    assert set(exported) == set(zero2)
    for name, weight in zero2.items():
        moved = (earlier[name].float() - weight.float()).norm()
        assert (exported[name] - weight.float()).norm() < 0.5 * moved, name
    assert AutoTokenizer.from_pretrained(out).vocab_size > 0


@pytest.fixture(scope="module")
def fsdp2_microadam(work):
    """MicroAdam on FSDP2, the 30 steps of ``fsdp2_straight``, in blocks of 1024 elements (which the
    shards' row boundaries cut: each rank exchanges the cut blocks' parts with their owner)."""
    config = variant(work, "fsdp2_microadam", lambda c: c["optimizer"].update(type="MicroAdam", params={
        "lr": 1e-3, "density": 0.05, "window": 4, "block_size": 1024, "bucket_size": 64}))
    out = work / "fsdp2_microadam"
    ok(launch([*fsdp2_flags(work, out), "--deepspeed_config", config], cwd=work))
    return out, config


def test_fsdp2_runs_microadam_checkpoints_and_resumes_it_exactly(work, fsdp2_microadam):
    """The loss falls, DCP checkpoints hold MicroAdam's state, and the step-20 checkpoint continues
    bit for bit as the run that was not interrupted."""
    out, config = fsdp2_microadam
    losses = read_jsonl(out / "losses.jsonl")
    assert [r["step"] for r in losses] == list(range(1, STEPS + 1))
    first, last = [r["loss"] for r in losses[:5]], [r["loss"] for r in losses[-5:]]
    assert sum(last) / 5 < sum(first) / 5 - 0.3, (first, last)
    metrics = read_jsonl(out / "metrics.jsonl")
    assert all(m["memory/optimizer_state/error_feedback_MiB"] > 0 for m in metrics)
    files = sorted(p.name for p in (out / "checkpoints" / "step20").iterdir())
    assert ".metadata" in files and sum(f.endswith(".distcp") for f in files) == 2, files

    resumed_dir = work / "fsdp2_microadam_resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    import shutil
    shutil.copytree(out / "checkpoints" / "step20", resumed_dir / "checkpoints" / "step20")
    (resumed_dir / "checkpoints" / "latest").write_text("step20")
    proc = ok(launch([*fsdp2_flags(work, resumed_dir), "--deepspeed_config", config, "--resume"], cwd=work))
    assert "resume: step 20" in proc.stdout + proc.stderr
    resumed = read_jsonl(resumed_dir / "losses.jsonl")
    assert [r["step"] for r in resumed] == list(range(21, STEPS + 1))
    for got, want in zip(resumed, losses[20:]):
        assert got == want                           # bit for bit: loss, lr, grad_norm, tokens


def test_fsdp2_bf16_mixed_precision_stays_close_to_fp32(work, fsdp2_straight):
    """bf16 in the config: FSDP2's MixedPrecisionPolicy (bf16 compute, fp32 parameters and reductions)."""
    out = work / "fsdp2_bf16"
    config = variant(work, "fsdp2_bf16", lambda c: c["bf16"].update(enabled=True))
    proc = ok(launch([*fsdp2_flags(work, out), "--deepspeed_config", config, "--stop_at_step", "10"], cwd=work))
    assert "bf16;" in proc.stdout + proc.stderr
    losses, reference = read_jsonl(out / "losses.jsonl"), read_jsonl(fsdp2_straight[0] / "losses.jsonl")
    assert len(losses) == 10
    gaps = [abs(got["loss"] - want["loss"]) for got, want in zip(losses, reference)]
    assert 0 < max(gaps) < 0.05, gaps           # bf16 rounding shows, but stays small


def test_fsdp2_refuses_what_it_cannot_do(pretrain, tmp_path, work, fsdp2_straight, straight, monkeypatch):
    def fsdp2_refused(change, *flags):
        return refused(pretrain, "--engine", "fsdp2", "--deepspeed_config",
                       write_config(tmp_path / "c.json", change), "--out_dir", str(tmp_path / "out"), *flags)

    msg = fsdp2_refused(lambda c: c["zero_optimization"].update(offload_optimizer={"device": "cpu"}))
    assert "zero_optimization.offload_optimizer" in msg and "remove it" in msg
    msg = fsdp2_refused(lambda c: c["zero_optimization"].update(offload_param={"device": "cpu"}))
    assert "zero_optimization.offload_param" in msg
    msg = fsdp2_refused(lambda c: (c.pop("bf16"), c.update(fp16={"enabled": True})))
    assert '"fp16" needs DeepSpeed\'s loss scaling' in msg
    msg = fsdp2_refused(lambda c: c["optimizer"].update(type="AdamW", params={"lr": 1e-3}))
    assert "one of DeepSpeed's own optimizers" in msg
    msg = fsdp2_refused(lambda c: c["scheduler"].update(type="NoSuchLR"))
    assert 'unknown scheduler type "NoSuchLR"' in msg
    msg = fsdp2_refused(lambda c: c.update(train_batch_size=100))
    assert "train_batch_size 100 is not" in msg
    msg = fsdp2_refused(lambda c: None, "--resume_from", str(tmp_path))
    assert "--resume_from takes DeepSpeed checkpoints" in msg

    # the engines' checkpoints are not each other's; the world size may change under FSDP2 only
    def resume(engine, change=lambda c: None, world=2):
        return resume_checked(pretrain, monkeypatch, world, *common(work), "--out_dir", str(fsdp2_straight[0]),
                              "--resume", "--engine", engine, "--deepspeed_config", variant(work, "v", change))
    assert resume("fsdp2") == []
    msg = resume("deepspeed")
    assert "engine: the checkpoint was written by --engine fsdp2" in msg and "pass --engine fsdp2" in msg
    changes = resume("fsdp2", lambda c: c.update(gradient_accumulation_steps=2), world=1)
    assert changes == ["data-parallel ranks changed from 2 to 1"]
    # and a DeepSpeed checkpoint under --engine fsdp2: the engine named, not the ZeRO stage FSDP2 lacks
    msg = resume_checked(pretrain, monkeypatch, 2, *common(work), "--out_dir", str(straight[0]), "--resume",
                         "--engine", "fsdp2")
    assert "engine: the checkpoint was written by --engine deepspeed" in msg and "ZeRO stage" not in msg


# --------------------------------------------------------------------------- tensor parallelism (AutoTP)

def tp_flags(work, out, *more):
    return [*common(work), "--tensor_parallel", "2", "--out_dir", str(out), *more]


@pytest.fixture(scope="module")
def tp_straight(work):
    """The same 30 steps as ``straight`` on 4 ranks as TP 2 x DP 2 (DeepSpeed's AutoTP, ZeRO-2):
    the same global batch of 8 samples, read by 2 data-parallel ranks."""
    proc = ok(launch(tp_flags(work, work / "tp_straight"), cwd=work, ranks=4))
    return work / "tp_straight", proc


def test_tp2_dp2_run_trains_checkpoints_and_starts_as_the_data_parallel_run(tp_straight, straight):
    """The TP run reads the samples the 2-rank run reads, through a sharded model equal to the whole
    one: its first loss and gradient norm (before any update) are the 2-rank run's; then its shards,
    each with a subspace of its own, train on."""
    out, proc = tp_straight
    assert "TP 2 x DP 2 ranks (AutoTP) x micro-batch 4 x accumulation 1 = 8 samples" in proc.stdout + proc.stderr
    losses, reference = read_jsonl(out / "losses.jsonl"), read_jsonl(straight[0] / "losses.jsonl")
    assert [r["step"] for r in losses] == list(range(1, STEPS + 1))
    assert losses[0]["loss"] == pytest.approx(reference[0]["loss"], rel=1e-6)
    assert losses[0]["grad_norm"] == pytest.approx(reference[0]["grad_norm"], rel=1e-4)
    assert [r["tokens"] for r in losses] == [r["tokens"] for r in reference]
    first, last = [r["loss"] for r in losses[:5]], [r["loss"] for r in losses[-5:]]
    assert sum(last) / 5 < sum(first) / 5 - 0.3, (first, last)
    evals = read_jsonl(out / "eval.jsonl")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]

    files = sorted(p.name for p in (out / "checkpoints" / f"step{STEPS}").iterdir())
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= set(files), files
    assert sum("optim_states" in f for f in files) == 4, files       # a ZeRO partition per rank
    import torch
    state = torch.load(out / "checkpoints" / f"step{STEPS}" / "mp_rank_01_model_states.pt", weights_only=False)
    settings = json.loads(state["run_settings"])
    assert (settings["tensor_parallel"], settings["world_size"], settings["global_batch"]) == (2, 2, 8)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert state["module"][q].shape == (64, 128)                      # this rank's half of the rows


def test_tp2_dp2_resume_reproduces_the_uninterrupted_run_exactly(work, tp_straight):
    out = work / "tp_interrupted"
    ok(launch(tp_flags(work, out, "--stop_at_step", "15"), cwd=work, ranks=4))
    second = ok(launch(tp_flags(work, out, "--resume"), cwd=work, ranks=4))
    assert "resume: step 15, 120 samples consumed" in second.stdout + second.stderr
    resumed, reference = read_jsonl(out / "losses.jsonl"), read_jsonl(tp_straight[0] / "losses.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for got, want in zip(resumed, reference):
        assert got["loss"] == want["loss"] and got["lr"] == want["lr"], (got, want)    # bit for bit
        assert got["grad_norm"] == want["grad_norm"], (got, want)


def test_the_ranks_of_a_tp_group_read_the_same_samples():
    """With an mpu (AutoTP's: ranks 2k and 2k+1 form the TP group of data-parallel rank k) the
    sampler runs at the data-parallel rank and size: both ranks of a TP group read one stream, and
    the two data-parallel ranks together read the next samples of the global stream, once each."""
    from ds_lowrank.training.data import ResumableSampler
    from ds_lowrank.training.run_parallel import data_parallel_position

    class AutoTPGroups:          # deepspeed.utils.groups as the engine's mpu, seen from one rank of 4
        def __init__(self, rank):
            self.rank = rank

        def get_data_parallel_rank(self):
            return self.rank // 2

        def get_data_parallel_world_size(self):
            return 2

    def stream(mpu, consumed=24, n=12):
        rank, size = data_parallel_position(mpu)
        sampler = iter(ResumableSampler(1000, seed=3, rank=rank, world_size=size, consumed_samples=consumed))
        return [next(sampler) for _ in range(n)]

    tp = [stream(AutoTPGroups(r)) for r in range(4)]
    assert tp[0] == tp[1] and tp[2] == tp[3]
    whole = list(ResumableSampler(1000, seed=3, consumed_samples=24, num_epochs=1))[:24]
    assert tp[0] == whole[0::2] and tp[2] == whole[1::2]


def test_tensor_parallel_layouts_the_job_cannot_run_are_refused_before_training(pretrain, tmp_path, monkeypatch):
    def tp_refused(world, *argv, change=lambda c: None):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        return refused(pretrain, "--deepspeed_config", write_config(tmp_path / "c.json", change),
                       "--out_dir", str(tmp_path / "out"), *argv)

    msg = tp_refused(4, "--tensor_parallel", "3")
    assert "--tensor_parallel 3 does not divide the 4 ranks" in msg and "multiple of 3" in msg
    msg = tp_refused(1, change=lambda c: c.update(tensor_parallel={"autotp_size": 2}))
    assert "--tensor_parallel 2 does not divide the 1 ranks" in msg
    msg = tp_refused(8, "--tensor_parallel", "8")              # the tiny preset has 4 heads
    assert "num_attention_heads 4 does not divide by 8" in msg and "whole attention heads" in msg
    gqa = tmp_path / "gqa.json"
    gqa.write_text(json.dumps({**json.loads((REPO / "configs" / "models" / "tiny.json").read_text()),
                               "num_key_value_heads": 2}))
    msg = tp_refused(4, "--tensor_parallel", "4", "--model", str(gqa))
    assert "num_key_value_heads 2 does not divide by 4" in msg
    msg = tp_refused(4, "--tensor_parallel", "2", "--engine", "fsdp2")
    assert "--engine fsdp2" in msg and "use --engine deepspeed" in msg
    msg = tp_refused(4, "--tensor_parallel", "2", change=lambda c: c.update(train_batch_size=32))
    assert '"train_batch_size" with tensor parallelism' in msg and "gradient_accumulation_steps" in msg
    msg = tp_refused(4, "--tensor_parallel", "2",
                     change=lambda c: c["optimizer"]["params"].update(tensor_parallel="global"))
    assert "\"tensor_parallel\": 'global' with AutoTP" in msg and "remove the param" in msg
    msg = tp_refused(4, "--tensor_parallel", "0")
    assert "--tensor_parallel must be at least 1" in msg
    msg = tp_refused(4, "--tensor_parallel", "2", "--resume_from", str(tmp_path))
    assert "--resume_from loads whole matrices" in msg and "--tensor_parallel 1" in msg
    # a size that fits is written where DeepSpeed reads it
    monkeypatch.setenv("WORLD_SIZE", "4")
    run = run_inputs.check_inputs(pretrain.parse_args(["--tensor_parallel", "2", "--out_dir", str(tmp_path / "o")]))
    assert run.tensor_parallel == 2 and run.ds_config["tensor_parallel"] == {"autotp_size": 2}


def test_a_tp_checkpoint_resumes_only_at_its_tp_size_and_is_not_exported(work, tp_straight, pretrain, monkeypatch,
                                                                          tmp_path):
    from ds_lowrank.jobs import export_hf

    out = str(tp_straight[0])
    assert resume_checked(pretrain, monkeypatch, 4, *tp_flags(work, out, "--resume")) == []
    msg = resume_checked(pretrain, monkeypatch, 2, *common(work), "--out_dir", out, "--resume")
    assert "tensor-parallel size: 2 in the checkpoint, 1 now" in msg and "pass --tensor_parallel 2" in msg
    with pytest.raises(export_hf.ExportError, match=r"written with tensor parallelism .* --tensor_parallel 1"):
        export_hf.export(out, tmp_path / "hf", log=lambda m: None)
