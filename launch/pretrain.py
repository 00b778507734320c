"""Pretrain a Llama model from scratch with DeepSpeed and a ds_lowrank optimizer, from a clone.

    deepspeed launch/pretrain.py --deepspeed_config configs/ldadam_zero2.json

The job is ``ds_lowrank.jobs.pretrain`` (see its docstring and ``--help``); from an installed
package run it as ``deepspeed --module ds_lowrank.jobs.pretrain`` or ``ds-lowrank-pretrain``.
This file only makes the checkout's ``ds_lowrank`` the one imported, whatever is installed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_lowrank.jobs.pretrain import main  # noqa: E402

if __name__ == "__main__":
    main()
