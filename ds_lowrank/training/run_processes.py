"""The processes of a pretraining run: starting them, one run per output folder, the built-in
corpus built once, stopping all of them with one message, and the small collectives the job's
loop needs."""

from __future__ import annotations

import fcntl
import json
import os
import resource
import socket
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from .data import default_corpus

MiB = 2**20


def init_distributed() -> tuple[int, int, int]:
    """Rank, world size and local rank; a plain ``python launch/pretrain.py`` is a world of one."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ["LOCAL_RANK"])
    get_accelerator().set_device(local_rank)  # before any collective: NCCL binds to the current GPU
    deepspeed.init_distributed()
    return dist.get_rank(), dist.get_world_size(), local_rank


def prepare_default_corpus(cache: str, rank: int, local_rank: int) -> Path:
    """The built-in corpus, built by rank 0 while the others wait.  A node that cannot see rank
    0's copy (a node-local cache) builds its own, with the same result."""
    if rank == 0:
        default_corpus(cache)
    dist.barrier()
    if local_rank == 0:
        default_corpus(cache)
    dist.barrier()
    return default_corpus(cache)


def fail(message) -> None:
    # Every rank finds the same problem; one message per node is enough.
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / MiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def mean_over_ranks(value: torch.Tensor, world: int) -> float:
    value = value.detach().float().clone()
    dist.all_reduce(value)
    return value.item() / world


# ----------------------------------------------------------------------------- one run per --out_dir

class RunLock:
    """An exclusive lock on --out_dir, taken by rank 0 for the run's lifetime (``flock`` on
    ``run.lock``; the OS drops it when the process ends, however it ends).  The file says who
    holds it."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / "run.lock"
        self.file = None

    def acquire(self) -> str | None:
        """None when taken; else the refusal, naming the run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                holder = json.loads(f.read() or "{}")
            except json.JSONDecodeError:
                holder = {}
            f.close()
            return (f"{self.path.parent} is in use by another run (pid {holder.get('pid', '?')} on host "
                    f"{holder.get('host', '?')}, started {holder.get('started', '?')}): wait for it to end "
                    f"or stop it, or choose another --out_dir")
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n")
        f.flush()
        self.file = f
        return None

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


def lock_out_dir(out_dir: Path, master: bool) -> RunLock:
    """Rank 0 takes the run's lock; every rank stops with the message when another run holds it."""
    lock = RunLock(out_dir)
    refusal = [lock.acquire() if master else None]
    dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        fail(refusal[0])
    return lock
