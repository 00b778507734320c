#!/usr/bin/env python
"""Consolidate a DeepSpeed checkpoint of a ds_lowrank optimizer, or convert it for DeepSpeed's Adam: ``ds_lowrank.jobs.convert_checkpoint`` run from a clone (installed: ``ds-lowrank-convert-checkpoint``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's ds_lowrank

from ds_lowrank.jobs.convert_checkpoint import *  # noqa: E402,F401,F403
from ds_lowrank.jobs.convert_checkpoint import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
