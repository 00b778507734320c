"""Checkpoints of ds_lowrank optimizers: consolidated per parameter, resumed at any world size."""

from .pieces import CheckpointError
from .universal import Consolidated, consolidate, load, resume, save

__all__ = ["CheckpointError", "Consolidated", "consolidate", "load", "resume", "save"]
