"""A pretraining run's checkpoints: what each one holds besides DeepSpeed's state (the
``client_state`` written by ``save`` and read back by ``restore``, the one resume path), and the
guards that keep "latest" pointing at a finite one."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import checkpoint
from ..optim import state_layout
from ..optim.state_layout import local
from .run_processes import fail
from .run_settings import apply_hyperparameters


def save(engine, args, run, step: int, consumed: int, log) -> bool:
    """Save a checkpoint of ``step`` and make it ``latest`` unless a weight or optimizer state is
    NaN or infinite (collective); whether it was made ``latest``."""
    # DeepSpeed writes client_state from the first data-parallel rank (ZeRO-1/2), so it
    # carries every rank's random state.
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    finite = all_finite(engine)
    tag = f"step{step}"
    # sealed with checksums once every rank has written; then "latest" names it if finite
    checkpoint.integrity.save_checkpoint(engine, run.checkpoints, tag, publish=finite, client_state={
        "step": step, "consumed_samples": consumed, "rng": states, "max_steps": args.max_steps,
        "seq_len": args.seq_len, "seed": args.seed, "data": str(run.data_dir),
        "run_settings": json.dumps(run.settings),
        "model_config": engine.module.config.to_json_string()})    # for tools/export_hf.py
    if not finite:
        log(f"step {step}: the checkpoint in {run.checkpoints / tag} holds non-finite weights or "
            f"optimizer state; 'latest' is left at the last finite one")
        return False
    log(f"step {step}: checkpoint saved in {run.checkpoints / tag}")
    return True


def restore(engine, args, run, consolidated, log) -> tuple[int, int]:
    """Where the run continues: ``(step, consumed samples)``, ``(0, 0)`` for a new run.

    ``--resume`` loads the newest checkpoint of ``--out_dir`` whose files verify into ``engine``
    (weights, optimizer, LR schedule) and restores every rank's random streams;
    ``--resume_from`` (``consolidated``, already in ``engine``) and a resume at another world
    size cannot restore them and reseed.  Either way the data stream continues at the sample
    count, and the hyperparameters this run changes (``run.resume_changes``) are applied."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.resume:
        origin, client = load_latest(engine, run.checkpoints, log)
        streams = client["rng"]
    elif consolidated is not None:
        origin = f"the consolidated {args.resume_from}"
        client = {"step": consolidated.global_steps, "consumed_samples": 0, **consolidated.client_state}
        streams = None
    else:
        return 0, 0
    step, consumed = client["step"], client["consumed_samples"]
    if streams is not None and len(streams) == world:
        set_rng_state(streams[rank])
    else:
        written = "a consolidated checkpoint" if streams is None else \
            f"the checkpoint was written by {len(streams)} ranks, not {world}"
        log(f"resume: {written}: random streams are reseeded, the data stream continues exactly")
        torch.manual_seed(args.seed + rank + 1_000_003 * step)  # not a stream already used
    if client.get("max_steps", args.max_steps) != args.max_steps:
        log(f"resume: --max_steps changed from {client['max_steps']} to {args.max_steps}; the LR "
            f"schedule continues as if the run had always been {args.max_steps} steps long")
    if client.get("seq_len", args.seq_len) != args.seq_len:
        log(f"resume: --seq_len changed from {client['seq_len']} to {args.seq_len}; the data "
            f"stream continues at the same sample count, not the same tokens")
    log(f"resume: step {step}, {consumed} samples consumed, from {origin}")
    if run.resume_changes:
        apply_hyperparameters(engine, run.ds_config["optimizer"])
        for change in run.resume_changes:
            log(f"resume: {change}; applied")
    return step, consumed


def load_latest(engine, checkpoints: Path, log) -> tuple[str, dict]:
    """Load the newest checkpoint in ``checkpoints`` whose files verify (a damaged one is named
    and moved aside) into ``engine``: its path and ``client_state``."""
    try:
        tag = checkpoint.integrity.resume_tag(checkpoints, log)
    except checkpoint.CheckpointError as err:
        fail(err)
    try:
        with checkpoint.integrity.naming_load_errors(engine):
            path, client = engine.load_checkpoint(str(checkpoints), tag=tag)
    except checkpoint.CheckpointError as err:   # a file without checksums, unreadable on this rank
        print(f"error: rank {dist.get_rank()}: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    if path is None:
        fail(f"could not load the checkpoint in {checkpoints}")
    return path, client


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def all_finite(engine) -> bool:
    """Whether the weights and optimizer state of every rank are finite (collective)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    tensors = list(engine.module.parameters())
    for group in getattr(inner, "param_groups", []):
        tensors += group["params"]
    tensors = [local(t) for t in tensors]     # an FSDP2 (DTensor) parameter: this rank's shard
    for st in getattr(inner, "state", {}).values():
        tensors += [t for _, _, t in state_layout.tensors(st)]
    finite = all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point() and t.numel())
    flag = torch.tensor(0.0 if finite else 1.0, device=engine.device)
    dist.all_reduce(flag)
    return flag.item() == 0


class NonFiniteLoss:
    """Counts consecutive steps whose loss is NaN or infinite."""

    def __init__(self, limit: int):
        self.limit, self.count, self.first = limit, 0, None

    def update(self, step: int, loss: float) -> bool:
        """Record ``step``'s loss; True when the run must stop."""
        if math.isfinite(loss):
            self.count = 0
            return False
        if self.count == 0:
            self.first = step
        self.count += 1
        return self.count >= self.limit

    def message(self, step: int, loss: float, checkpoints: Path) -> str:
        latest = checkpoints / "latest"
        where = (f"the last finite checkpoint is {latest.read_text().strip()} in {checkpoints}: continue from "
                 f"it with --resume" if latest.is_file() else "no checkpoint was written: start again")
        return (f"the training loss has been {loss} for {self.count} consecutive steps ({self.first}-{step}, "
                f"--max_nonfinite_steps {self.limit}); the run is stopped without a checkpoint. Lower the "
                f"learning rate (or lengthen the warmup); {where}")
