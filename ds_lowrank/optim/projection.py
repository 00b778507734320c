"""The projection layer LDAdam and GaLore share: a basis of ``rank`` columns on one side of each
matrix, Adam's moments kept in the subspace it spans.

- The side rule: ``projects_right(group, shape)`` (each optimizer's own), named by ``side_key``
  when a change of it is refused.  A right projection keeps an ``r × n`` basis and ``m × r``
  moments; a left one an ``m × r`` basis and ``r × n`` moments.
- The state's layout: ``state_shapes`` (basis, two moments, step), how it splits with the rows
  (``row_axes``) and which part lies along the columns (``column_axes``, kept in blocks by the
  ranks sharing a matrix).
- ``_check_state``: state the group's settings no longer fit is refused.
- ``_project_adam``: Adam's moments carried into a subspace, for starting from an AdamW
  checkpoint.

Adapprox (a factored second moment) and MicroAdam (top-k error feedback) derive from
``CompressedOptimizer`` directly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .adam_subspace import adam_to_subspace
from .base import CompressedOptimizer
from .dense_adamw import StateShapes
from .matrix import Matrix


class ProjectionOptimizer(CompressedOptimizer):
    """Base of the optimizers that project each matrix onto a low-rank subspace."""

    @staticmethod
    def projects_right(group: dict, shape: tuple[int, ...]) -> bool:
        """Whether a matrix of ``shape`` is projected on the right (its basis spans its rows)."""
        raise NotImplementedError

    # the group key choosing the projection side, named when a change of it is refused
    side_key = "proj_side"

    def _check_state(self, group: dict, m: Matrix) -> None:
        """Refuse projected state the group's settings no longer fit (of the rows held here); a
        ZeRO piece's ``r × n`` state saved whole (before pieces kept a block of it) is cut to
        its block."""
        st = m.state
        if "step" not in st:
            return
        if "basis" not in st:
            raise ValueError(
                f"{m.label}: it has taken dense AdamW steps, so its group cannot project it now "
                f"(its state has no basis)"
            )
        rank, (h, n) = group["rank"], m.weight.shape
        right = self.projects_right(group, m.shape)
        lo, hi = self.held_columns(m)
        for key in ("basis",) if right else ("proj_exp_avg", "proj_exp_avg_sq"):
            if hi - lo < n and key in st and tuple(st[key].shape) == (rank, n):
                # whole, as each owner kept it in checkpoints written before ZeRO pieces kept
                # their block of it
                st[key] = st[key][:, lo:hi].clone()
        expected = (rank, hi - lo) if right else (h, rank)
        if tuple(st["basis"].shape) != expected:
            raise ValueError(
                f"{m.label}: the group's rank/{self.side_key} no longer match its state (basis "
                f"{tuple(st['basis'].shape)}, expected {expected}); they cannot change once "
                f"the parameter has taken a step"
            )

    @classmethod
    def state_shapes(cls, group: dict, shape: tuple[int, ...], held: tuple[int, ...] | None = None,
                     dtype: torch.dtype = torch.float32, first_row: int | None = None,
                     columns: tuple[int, int] | None = None) -> StateShapes:
        """The compressed state of the rows ``held`` (``h × n``; default: all) of a matrix of
        whole ``shape`` and ``dtype``, as ``_init_state`` allocates it; ``first_row``: the rows
        are a ZeRO piece's, from that row on; ``columns``: the block of the ``r × n`` part kept
        here when the placement chooses it (``Matrix.columns``): the basis and two moments, and
        the step.  Of the ``r × n`` part (a left projection's moments, a right one's basis) a ZeRO piece
        keeps its block of columns (``piece_columns``)."""
        h, n = tuple(shape if held is None else held)
        r = group["rank"]
        sdt = torch.promote_types(dtype, torch.float32)      # as _state_dtype
        right = cls.projects_right(group, shape)
        wide = (r, n)
        if columns is not None or first_row is not None:
            lo, hi = columns or cls.piece_columns(shape, first_row, h)
            wide = (r, hi - lo)
        moment = ((h, r) if right else wide, sdt)
        return {"step": ((), torch.float32), "basis": (wide if right else (h, r), sdt),
                "proj_exp_avg": moment, "proj_exp_avg_sq": moment}

    @classmethod
    def row_axes(cls, group: dict, shape: tuple[int, ...]) -> dict[str, tuple[int, Callable[[int], int]]]:
        """How the state of a parameter splits with its rows: per state key that holds a part per
        row, its dimension and where row ``r`` starts along it; every other key is the same on
        each rank holding rows (replicated).  Checkpoint tools merge and re-cut state with it.

        Here (``_init_state``): the error feedback by rows, and the
        basis (left projection) or the moments (right projection) by rows; the ``r × n`` rest
        (the moments, or the basis) by blocks of columns in proportion to the rows
        (``column_axes``)."""
        def rows(r: int) -> int:
            return r
        by_rows = ("proj_exp_avg", "proj_exp_avg_sq") if cls.projects_right(group, shape) else ("basis",)
        return {"error": (0, rows), **{key: (0, rows) for key in by_rows},
                **cls.column_block_axes(group, shape)}

    @classmethod
    def column_axes(cls, group: dict, shape: tuple[int, ...]) -> dict[str, int]:
        """The state keys of a matrix that lie along its columns (the weight's dim 1) and the
        axis of each that does: the same on every rank holding rows, so the ranks holding rows
        of a split matrix keep them in blocks of columns (a ZeRO piece ``piece_columns``, an FSDP2
        rank torch.chunk's block).  Here the ``r × n`` part, a left projection's moments or a
        right one's basis, along their dim 1."""
        if cls.projects_right(group, shape):
            return {"basis": 1}
        return {"proj_exp_avg": 1, "proj_exp_avg_sq": 1}

    def _project_adam(self, group: dict, shape: tuple[int, ...], adam: dict) -> tuple[dict, torch.Tensor]:
        """Adam's moments carried into the subspace
        (``adam_subspace``), as the state ``_init_state`` lays out, and the momentum the
        subspace cannot hold, in the weight's layout."""
        right = self.projects_right(group, shape)
        m, v = adam["exp_avg"].reshape(shape), adam["exp_avg_sq"].reshape(shape)
        if right:
            m, v = m.mT, v.mT
        step = int(adam["step"])
        P, M, V, lost = adam_to_subspace(m, v, step, group["rank"], group["betas"], self._state_dtype(m))

        def laid_out(t: torch.Tensor) -> torch.Tensor:
            return t.mT.contiguous() if right else t
        state = {"step": torch.tensor(float(step)), "basis": laid_out(P), "proj_exp_avg": laid_out(M),
                 "proj_exp_avg_sq": laid_out(V)}
        return state, laid_out(lost)
