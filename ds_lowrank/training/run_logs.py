"""What a pretraining run records under ``--out_dir`` (rank 0): ``losses.jsonl`` (one line per
step), ``eval.jsonl``, ``metrics.jsonl`` (each monitor point's scalars and every rank's optimizer
state by category), the effective config and flags, and the same points in the config's
DeepSpeed monitors.  A resumed run drops whatever was recorded after its checkpoint."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from ..utils.files import atomic_write
from .diagnostics import engine_state_bytes_by_rank
from .run_inputs import InputError
from .run_processes import MiB, fail, peak_memory_mib

LOGS = ("losses.jsonl", "eval.jsonl", "metrics.jsonl")


class RunLogs:
    """The run's log files and monitors, written by rank 0; on the other ranks every method
    does nothing.  Times are wall-clock seconds of the run, continued over resumes."""

    def __init__(self, args, run, monitor, step: int, master: bool):
        self.monitor, self.master, self.files = monitor, master, {}
        elapsed = 0.0
        if master:
            run.out_dir.mkdir(parents=True, exist_ok=True)
            if args.resume:
                try:
                    for name in LOGS:
                        keep_lines_until(run.out_dir / name, step)
                except InputError as err:
                    fail(err)
                elapsed = last_record(run.out_dir / "losses.jsonl").get("time", 0.0)
            self.files = {name: open(run.out_dir / name, "a" if args.resume else "w") for name in LOGS}
            atomic_write(run.out_dir / "ds_config.json", json.dumps(run.ds_config, indent=2))
            atomic_write(run.out_dir / "args.json", json.dumps(vars(args), indent=2, default=str))
            tb = monitor.tb_monitor
            if tb is not None and tb.summary_writer is not None:
                # Events after the checkpoint, from a run that went on past it, are hidden.
                tb.summary_writer.close()
                tb.summary_writer = SummaryWriter(tb.summary_writer.get_logdir(), purge_step=step + 1)
        self.started = time.perf_counter() - elapsed

    def _write(self, name: str, record: dict, flush: bool = False) -> None:
        f = self.files[name]
        f.write(json.dumps(record) + "\n")
        if flush:
            f.flush()

    def _time(self) -> float:
        return round(time.perf_counter() - self.started, 3)

    def step(self, step: int, tokens: int, loss: float, lr: float, grad_norm: float | None) -> None:
        if self.master:
            self._write("losses.jsonl", {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                         "tokens": tokens, "time": self._time()})

    def measurements(self, step: int, tokens: int, scalars: dict, by_rank: dict) -> None:
        if self.master:
            self.monitor.write_events([(name, value, step) for name, value in scalars.items()])
            self._write("metrics.jsonl", {"step": step, "tokens": tokens, "time": self._time(), **scalars,
                                          "state_bytes_by_rank": by_rank}, flush=True)
            self.files["losses.jsonl"].flush()

    def evaluation(self, step: int, tokens: int, val_loss: float) -> None:
        if self.master:
            self.monitor.write_events([("val/loss", val_loss, step),
                                       ("val/perplexity", math.exp(min(val_loss, 50)), step)])
            self._write("eval.jsonl", {"step": step, "val_loss": val_loss, "tokens": tokens,
                                       "time": self._time()}, flush=True)

    def close(self, monitors: bool = True) -> None:
        """Close the log files, and flush what the monitors hold unless ``monitors`` is false."""
        for f in self.files.values():
            f.close()
        if self.master and monitors:
            tb = self.monitor.tb_monitor
            if tb is not None and tb.summary_writer is not None:
                tb.summary_writer.close()


class Throughput:
    """Training time since the last monitor point: evaluation and saving stay out."""

    def __init__(self):
        self.seconds, self.steps = 0.0, 0

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        self.steps += 1

    def tokens_per_s(self, tokens_per_step: int) -> float:
        """Over the steps since the last call, which starts a new interval."""
        value = self.steps * tokens_per_step / self.seconds
        self.seconds, self.steps = 0.0, 0
        return value


def measurements(engine, probe, rank: int, *, loss: float, lr: float, grad_norm: float | None,
                 tokens_per_s: float, mfu: float) -> tuple[dict, dict]:
    """A monitor point's scalars, and every rank's optimizer state bytes by category
    (collective: every rank takes part)."""
    scalars = {"train/loss": loss, "train/lr": lr, "perf/tokens_per_s": tokens_per_s, "perf/mfu": mfu,
               "memory/peak_MiB": peak_memory_mib()}
    if grad_norm is not None:
        scalars["train/grad_norm"] = grad_norm
    # every optimizer's state per rank: state_bytes(), or the tensors of DeepSpeed's own
    by_rank = engine_state_bytes_by_rank(engine)
    scalars["memory/optimizer_state_MiB"] = by_rank["total"][rank] / MiB
    scalars["memory/optimizer_state_MiB_max_rank"] = max(by_rank["total"]) / MiB
    for category, values in by_rank.items():
        if category != "total":
            scalars[f"memory/optimizer_state/{category}_MiB"] = values[rank] / MiB
    if probe is not None:
        for name, value in probe.collect().items():
            scalars[f"lowrank/{name}"] = value
    return scalars, by_rank


def keep_lines_until(path: Path, step: int) -> None:
    """Drop the records a resumed run is about to write again (steps after its checkpoint).  The
    file is replaced atomically: a kill midway leaves the old one.  A last line cut short (the
    previous run was killed while writing it) is dropped."""
    if not path.is_file():
        return
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            lines.pop()
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line else None
        except json.JSONDecodeError:
            raise InputError(f"{path}, line {number}, is not a JSON record: {line[:80]!r}; repair or remove "
                             f"the line, then resume again") from None
        if record is not None and record["step"] <= step:
            kept.append(line)
    atomic_write(path, "".join(line + "\n" for line in kept))


def last_record(path: Path) -> dict:
    """The last JSON record of a log file ({} when there is none)."""
    if not path.is_file():
        return {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else {}
