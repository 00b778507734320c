"""Checkpoints of ds_lowrank optimizers: consolidated per parameter, resumed at any world size."""

from . import integrity
from .integrity import IntegrityError
from .pieces import CheckpointError
from .universal import Consolidated, adam_states, consolidate, load, resume, save, save_adam_universal

__all__ = ["CheckpointError", "Consolidated", "IntegrityError", "adam_states", "consolidate", "integrity", "load",
           "resume", "save", "save_adam_universal"]
