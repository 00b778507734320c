"""Warmup as a fraction of the run: the scheduler's "warmup_ratio" (ds_lowrank/utils/schedule.py)."""

import json
from pathlib import Path

import pytest
import torch

from ds_lowrank.utils.schedule import resolve_warmup

REPO = Path(__file__).resolve().parents[1]


def config(**params):
    return {"scheduler": {"type": "WarmupCosineLR", "params": params}}


@pytest.mark.parametrize("total,expected", [(1, 1), (10, 1), (60, 6), (200, 20), (1000, 100), (15, 2)])
def test_ratio_of_the_run(total, expected):
    c = resolve_warmup(config(warmup_ratio=0.1, total_num_steps=1000), total)
    assert c["scheduler"]["params"] == {"total_num_steps": 1000, "warmup_num_steps": expected}


def test_ratio_of_the_sections_total_explicit_steps_win_and_bad_values():
    assert resolve_warmup(config(warmup_ratio=0.25, total_num_steps=40))["scheduler"]["params"]["warmup_num_steps"] == 10
    assert resolve_warmup(config(warmup_ratio=0.1, warmup_num_steps=7), 100)["scheduler"]["params"] == {"warmup_num_steps": 7}
    assert resolve_warmup({"optimizer": {}}) == {"optimizer": {}}
    for bad in (1.0, -0.1, "0.1", True):
        with pytest.raises(ValueError, match=r"warmup_ratio must be a number in \[0, 1\)"):
            resolve_warmup(config(warmup_ratio=bad), 100)
    with pytest.raises(ValueError, match="needs the run's length"):
        resolve_warmup(config(warmup_ratio=0.1))


@pytest.mark.parametrize("name", ["ldadam_zero2", "adamw_zero2"])
def test_initialize_hands_deepspeed_a_schedule_it_accepts(monkeypatch, name):
    """ds_lowrank.initialize resolves the shipped config's ratio before DeepSpeed builds the schedule."""
    import deepspeed
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    import ds_lowrank

    seen = {}
    monkeypatch.setattr(deepspeed, "initialize", lambda **kwargs: seen.update(kwargs) or (None, None, None, None))
    model = torch.nn.Sequential(torch.nn.Embedding(50, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 50))
    shipped = json.loads((REPO / "configs" / f"{name}.json").read_text())
    assert shipped["scheduler"]["params"]["warmup_ratio"] == 0.1
    ds_lowrank.initialize(model=model, config=str(REPO / "configs" / f"{name}.json"))
    params = seen["config"]["scheduler"]["params"]
    assert params["warmup_num_steps"] == round(0.1 * params["total_num_steps"]) and "warmup_ratio" not in params
    WarmupCosineLR(torch.optim.SGD(model.parameters(), lr=1e-3), **params)
