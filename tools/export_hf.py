#!/usr/bin/env python
"""Export a checkpoint as a Hugging Face model directory: ``ds_lowrank.jobs.export_hf`` run from a clone (installed: ``ds-lowrank-export-hf``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's ds_lowrank

from ds_lowrank.jobs.export_hf import *  # noqa: E402,F401,F403
from ds_lowrank.jobs.export_hf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
