#!/usr/bin/env python
"""Per-GPU memory of a Llama preset's training state, AdamW against a ds_lowrank optimizer: ``ds_lowrank.jobs.estimate_memory`` run from a clone (installed: ``ds-lowrank-estimate-memory``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's ds_lowrank

from ds_lowrank.jobs.estimate_memory import *  # noqa: E402,F401,F403
from ds_lowrank.jobs.estimate_memory import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
