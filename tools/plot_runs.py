#!/usr/bin/env python
"""Plot pretraining runs side by side: ``ds_lowrank.jobs.plot_runs`` run from a clone (installed: ``ds-lowrank-plot-runs``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's ds_lowrank

from ds_lowrank.jobs.plot_runs import *  # noqa: E402,F401,F403
from ds_lowrank.jobs.plot_runs import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
