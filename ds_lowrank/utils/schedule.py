"""Warmup as a fraction of the run: ``"warmup_ratio"`` in a DeepSpeed config's scheduler params.

DeepSpeed's schedulers (``WarmupCosineLR``, ``WarmupDecayLR``, ``WarmupLR``) take the warmup as
a number of steps, which does not fit a run of another length.  ds_lowrank's configs give
``"warmup_ratio": 0.1`` instead; :func:`resolve_warmup` turns it into ``warmup_num_steps`` (at
least 1) for a run of ``total_steps`` steps (default: the section's ``total_num_steps``) and
removes the key DeepSpeed does not know.  An explicit ``warmup_num_steps`` in the same section
wins over the ratio.  ``ds_lowrank.initialize`` and the pretraining job call it; a script that
passes such a config to ``deepspeed.initialize`` itself calls it first.
"""

from __future__ import annotations

import math

from .validation import is_int, is_number

KEY = "warmup_ratio"


def resolve_warmup(config: dict, total_steps: int | None = None) -> dict:
    """Replace the scheduler's ``warmup_ratio`` by ``warmup_num_steps``, in place; returns ``config``.

    Raises ``ValueError`` for a ratio outside [0, 1) or a run length that is not known.
    """
    scheduler = config.get("scheduler") if isinstance(config, dict) else None
    params = scheduler.get("params") if isinstance(scheduler, dict) else None
    if not isinstance(params, dict) or KEY not in params:
        return config
    ratio = params.pop(KEY)
    if not (is_number(ratio) and 0 <= ratio < 1):
        raise ValueError(f'scheduler.params.{KEY} must be a number in [0, 1), the fraction of the run spent '
                         f'warming up, got {ratio!r}')
    if "warmup_num_steps" in params:           # an explicit number of steps wins
        return config
    total = total_steps if total_steps is not None else params.get("total_num_steps")
    if not (is_int(total) and total >= 1):
        raise ValueError(f'scheduler.params.{KEY} needs the run\'s length: set "total_num_steps" in the '
                         f'scheduler params (or give "warmup_num_steps" instead)')
    params["warmup_num_steps"] = max(1, math.floor(ratio * total + 0.5))
    return config
