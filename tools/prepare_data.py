#!/usr/bin/env python
"""Tokenize text into a memory-mapped pretraining dataset: ``ds_lowrank.jobs.prepare_data`` run from a clone (installed: ``ds-lowrank-prepare-data``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's ds_lowrank

from ds_lowrank.jobs.prepare_data import *  # noqa: E402,F401,F403
from ds_lowrank.jobs.prepare_data import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
