"""What a placement may ask of the optimizer it serves, and what every placement gives back.

A placement never sees the optimizer: the optimizer hands it a ``Method``, the rules of its
algorithm (the optimizer class, whose public classmethods are pure functions of a group's
settings and a whole shape: ``is_compressed``, ``row_length``, ``row_axes``, ``gradient_limit``...)
and, bound to this optimizer, its per-parameter state and the few things only an instance can
do to a matrix (refuse it, create its state).
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

import torch

from ..matrix import Matrix


@dataclass(frozen=True)
class Method:
    rules: type                     # the optimizer class
    state: MutableMapping           # parameter -> its state (torch's ``Optimizer.state``)
    # (group, label, p, whole): refuse a parameter the group would compress but cannot (a
    # complex one; with ``whole``, settings that do not fit its shape, e.g. a rank too large)
    check_compressed: Callable[[dict, str, torch.Tensor, bool], None]
    # (group, label, p): the settings against a whole matrix's shape (``p`` may be on "meta")
    check_shape: Callable[[dict, str, torch.Tensor], None]
    # (group, m): refuse state the group's settings no longer fit
    check_state: Callable[[dict, Matrix], None]
    # (group, m): zero state of the rows of ``m`` as the first step creates it, its lazily made
    # keys included (``complete``), or as ``state_shapes`` lays it out (``allocate``)
    init_state: Callable[[dict, Matrix], None]
    complete_state: Callable[[dict, Matrix], None]
    allocate_state: Callable[[dict, Matrix], dict]


def check_dense_state(label: str, state: dict) -> None:
    """Refuse to take AdamW steps on a parameter whose state is a compressed one."""
    extra = sorted(set(state) - {"step", "exp_avg", "exp_avg_sq"})
    if extra:
        raise ValueError(
            f"{label}: its group now keeps it dense (compress=False, or settings at which its "
            f"compressed state would exceed AdamW's), but it has taken compressed steps (state "
            f"{extra}); the settings that decide this cannot change once it has taken a step")


def param_label(group: dict, group_index: int, index: int) -> str:
    """The parameter's name if the group carries names, else its position."""
    names = group.get("param_names")
    if names is not None:
        return names[index]
    return f"param_groups[{group_index}]['params'][{index}]"


class Placement:
    """The rows one parameter group holds in one placement, for one step.

    Built (and checked) before any parameter of any group moves; then ``rows()`` (which may
    communicate, e.g. a ZeRO partition's cut rows) gives the ``Matrix`` objects for the
    algorithm's matrix step, in batches each with the runner of its sums (one batch, but for
    FSDP2 with tensor parallelism: one per group of ranks rows are split over), and ``finish()``
    completes the step: write-back, cut-row exchange, AdamW on the parameters left dense.  ``skipped``: parameters
    whose gradient was not valid this step, known once ``rows()`` has run."""

    group: dict
    skipped: int = 0

    def rows(self) -> list[tuple[list[Matrix], object]]:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError
