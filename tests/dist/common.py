"""What every multi-rank test worker does at the end."""

import json
import os

import torch.distributed as dist


def finish(out_path: str, results: dict) -> None:
    """Rank 0 writes ``results`` to ``out_path`` (atomically); then every rank leaves."""
    if dist.get_rank() == 0:
        with open(out_path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(out_path + ".tmp", out_path)
    dist.barrier()
    # Tear the process groups down before exit: gloo's threads dying with the interpreter
    # can abort a process that has finished its work.
    dist.destroy_process_group()
