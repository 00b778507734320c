"""GaLore: Adam in a rank-r subspace of each gradient, refreshed every T steps (Zhao et al., ICML 2024).

The math is ``GaLoreAdamW._update_bucket`` and ``galore_moments_`` below, in the order of
``algorithms.md`` §4(b).  Like LDAdam it works on a batch of same-shape matrices; the math is
written in the *left* orientation (``A`` is ``d × c``, the basis ``P`` is ``d × r``, the moments
are ``r × c``), a right projection being the same math on the weight's transpose, while the
products are taken in the weight's own layout.  Sums over an axis that may be split between ranks go through a reducer,
the identity in one process; each is a step of the generator ``_update_bucket``
(``yield from reduce.basis_axis(...)``, see ``distributed.reducer``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from functools import partial

import torch

from ..distributed.reducer import Reducer, Steps
from ..linalg import exact_top_subspace, randomized_top_subspace
from ..utils.profiling import phase
from ..utils.seeding import stable_seed
from ..utils.validation import check, is_int, is_number
from .base import Matrix, as_betas, check_adam_hparams
from .packing import packed_state
from .projection import ProjectionOptimizer

PROJ_TYPES = ("std", "reverse_std", "left", "right")
PROJ_METHODS = ("svd", "randomized")


def galore_moments_(
    R: torch.Tensor,
    M: torch.Tensor,
    V: torch.Tensor,
    steps: list[int],
    *,
    beta1: float,
    beta2: float,
    eps: float,
) -> tuple[torch.Tensor, list[float]]:
    """Adam on the projected gradient ``R`` of a batch of matrices, ``M`` and ``V`` (its raw
    moments, laid out like ``R``) updated in place; ``steps`` are the completed steps per
    matrix.  Returns ``(N, step_sizes)``: the direction ``N = M / (√V + ε)`` (ε added to the
    uncorrected ``√V``, as HF's and galore-torch's AdamW) and, per matrix, the bias correction
    ``sqrt(1-β2^t)/(1-β1^t)`` that scales it; the weight moves by ``-lr·scale·step_size·P·N``.

    The moments are not rotated at a refresh: their coordinates are read in the new basis
    (galore-torch's choice, which LDAdam fixes).  Everything is elementwise, so the layout of
    the batch (the weight's or the transposed one) does not matter.
    """
    M.lerp_(R, 1 - beta1)
    V.mul_(beta2).addcmul_(R, R, value=1 - beta2)
    denom = V.sqrt().add_(eps)
    N = torch.div(M, denom, out=denom)
    step_sizes = [math.sqrt(1 - beta2 ** (k + 1)) / (1 - beta1 ** (k + 1)) for k in steps]
    return N, step_sizes


class GaLoreAdamW(ProjectionOptimizer):
    r"""GaLore's AdamW: Adam moments kept in a rank-``rank`` subspace of each matrix's gradient.

    A group is projected when its ``rank`` is set (and its ``lowrank`` key is not false):
    its 2-D parameters keep their moments in the subspace of the top ``rank`` singular vectors
    of their gradient, recomputed at steps 0, T, 2T, … (``T = update_proj_gap``) of each
    parameter's own step counter; every other parameter uses the dense AdamW path.  ``rank``
    defaults to ``None``, so galore-torch's parameter groups work unchanged::

        GaLoreAdamW([{"params": other_params},
                     {"params": matrices, "rank": 128, "update_proj_gap": 200,
                      "scale": 0.25, "proj_type": "std"}], lr=0.01)

    projects only the second group; ``GaLoreAdamW(model.parameters(), rank=128)`` projects
    every 2-D parameter, and a group can opt out with ``rank=None`` or ``compress=False``.

    The projected parameters follow galore-torch's update exactly: step size
    ``lr·sqrt(1-β2^t)/(1-β1^t)``, ε added to the uncorrected ``√V``, the back-projected
    direction multiplied by ``scale``, and the weight decay applied after the update
    (``W ← W - lr·λ·W``).  The dense parameters use torch's AdamW (ε after the bias-corrected
    square root, decay before the update), shared with the other ds_lowrank optimizers; this
    differs from galore-torch's AdamW on them by the ε scaling and an ``O(lr²·λ)`` term.

    Args:
        params: parameters or parameter groups (named parameters are used in messages).
        lr, betas, eps, weight_decay: as in AdamW; ``eps`` defaults to galore-torch's 1e-6.
        rank: dimension ``r`` of the subspace, at most ``min(m, n)``; ``None`` keeps a group dense.
        update_proj_gap: ``T``, the steps between two subspace refreshes.
        scale: ``α``, the factor of the back-projected update (0.25 in GaLore's pretraining).
        proj_type: the side: ``"std"`` projects on the right if ``m >= n`` (square matrices go
            right) and on the left otherwise, ``"reverse_std"`` the opposite, ``"left"`` and
            ``"right"`` force a side.  The two-sided ``"full"`` is not implemented.
        proj_method: ``"svd"`` (exact, as GaLore; needs each matrix whole) or ``"randomized"``
            (randomized subspace iteration with ``oversample`` extra columns and
            ``power_iters`` iterations, seeded per parameter and step).

    Every argument is also a per-group key, read at every step.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        rank: int | None = None,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        proj_method: str = "svd",
        oversample: int = 8,
        power_iters: int = 2,
    ) -> None:
        defaults = dict(lr=lr, betas=as_betas(betas), eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                        proj_method=proj_method, oversample=oversample, power_iters=power_iters,
                        compress=True)
        super().__init__(params, defaults)

    # -- hyperparameters -------------------------------------------------------------------

    def _check_group(self, group: dict) -> None:
        check_adam_hparams(group)
        rank = group["rank"]
        check(rank is None or (is_int(rank) and rank >= 1),
              "rank", rank, "a positive int, or None to keep the group dense")
        gap = group["update_proj_gap"]
        check(is_int(gap) and gap >= 1, "update_proj_gap",
              gap, "a positive int")
        scale = group["scale"]
        check(is_number(scale) and 0 < scale < math.inf,
              "scale", scale, "a positive float")
        proj_type = group["proj_type"]
        check(proj_type != "full", "proj_type", proj_type,
              f"one of {PROJ_TYPES}; the two-sided 'full' projection is not implemented")
        check(proj_type in PROJ_TYPES, "proj_type", proj_type, f"one of {PROJ_TYPES}")
        check(group["proj_method"] in PROJ_METHODS, "proj_method", group["proj_method"],
              f"one of {PROJ_METHODS}")
        for key in ("oversample", "power_iters"):
            v = group[key]
            check(is_int(v) and v >= 0, key, v,
                  "a non-negative int")

    side_key = "proj_type"

    @classmethod
    def is_compressed_shape(cls, group: dict, shape: tuple[int, ...]) -> bool:
        """Matrices of a group with a rank (galore-torch's convention: no rank, no projection)."""
        return group.get("rank") is not None and super().is_compressed_shape(group, shape)

    @staticmethod
    def projects_right(group: dict, shape: torch.Size) -> bool:
        """GaLore's side rule: ``std`` projects tall and square matrices on the right."""
        proj_type = group["proj_type"]
        if proj_type in ("left", "right"):
            return proj_type == "right"
        return (shape[0] >= shape[1]) == (proj_type == "std")

    @classmethod
    def _refuses_shape(cls, group: dict, shape: tuple[int, ...]) -> bool:
        return group["rank"] > min(shape)

    def _check_param(self, group: dict, label: str, p: torch.Tensor) -> None:
        rank, limit = group["rank"], min(p.shape)
        if self._refuses_shape(group, tuple(p.shape)):
            raise ValueError(
                f"rank={rank} is larger than {label}'s smaller dimension {limit} (shape "
                f"{tuple(p.shape)}), the most singular vectors its gradient has: lower the rank "
                f"to at most {limit}, or keep this parameter dense in a group without a rank"
            )

    # -- state -----------------------------------------------------------------------------

    def _state_from_adam(self, group: dict, label: str, shape: tuple[int, ...], adam: dict) -> dict:
        """Adam's moments in the subspace of its momentum, until the next refresh."""
        return self._project_adam(group, shape, adam)[0]

    # -- the step --------------------------------------------------------------------------

    def _matrix_step(self, group: dict, matrices: list[Matrix], runner) -> None:
        # Same-shape matrices refreshing (or not) at this step, split the same way between
        # ranks, share one batch.
        buckets = defaultdict(list)
        for m in matrices:
            self._check_state(group, m)
            if "step" not in m.state:
                self._init_state(group, m)
            refresh = int(m.state["step"]) % group["update_proj_gap"] == 0
            buckets[(tuple(m.weight.shape), m.shape, m.weight.dtype, m.weight.device, refresh,
                     m.split)].append(m)
        runner.run([(bucket, self.projects_right(group, bucket[0].shape),
                     partial(self._update_bucket, group, bucket, key[4]))
                    for key, bucket in buckets.items()])

    def _basis_rule(self, group: dict, bucket: list[Matrix], steps: list[int], right: bool,
                    reduce: Reducer) -> Callable[[torch.Tensor], Steps[torch.Tensor]]:
        """How a refresh finds the basis of the (oriented) gradient batch."""
        rank = group["rank"]
        if group["proj_method"] == "svd":
            # of the gradient as laid out, not of its transpose: LAPACK's signs differ between the
            # two, and galore-torch takes U or Vh of the gradient, as this does
            return lambda A: exact_top_subspace(A, rank, reduce, transposed=right)
        seeds = [stable_seed(m.label, k) for m, k in zip(bucket, steps)]
        return lambda A: randomized_top_subspace(A, rank, seeds, group["oversample"],
                                                 group["power_iters"], reduce)

    def _update_bucket(self, group: dict, bucket: list[Matrix], refresh: bool, reduce: Reducer) -> Steps[None]:
        """One step of a bucket, in the weight's layout: for a right projection the basis is
        ``r × n`` and the moments ``h × r``; for a left one ``h × r`` and ``r × n``.

        The state of a bucket is packed (one buffer per key, see ``packing``), so the moment
        arithmetic runs on the whole batch without copies; the gradients are not copied: each
        matrix's projection is one GEMM into the batch, and its update one GEMM into its weight
        (decay and step size folded into the GEMM's scalars) where the dtypes agree.
        """
        states = [m.state for m in bucket]
        weights = [m.weight for m in bucket]
        right = self.projects_right(group, bucket[0].shape)
        beta1, beta2 = group["betas"]
        steps = [int(st["step"]) for st in states]
        dtype = self._state_dtype(weights[0])

        def oriented(t: torch.Tensor) -> torch.Tensor:
            return t.mT if right else t

        with phase("pack"):
            B = packed_state(states, "basis")
            M = packed_state(states, "proj_exp_avg")
            V = packed_state(states, "proj_exp_avg_sq")
            grads = [g if g.dtype == dtype else g.to(dtype) for g in (m.grad for m in bucket)]
        # ``B`` may be this rank's block of the basis (``reduce.basis_block``): the step uses it
        # whole, and the block is what it keeps.
        if refresh:
            # The subspace of the current gradient: the SVD (or range finder) wants the batch.
            with phase("pack"):
                G = torch.stack(grads)
            with phase("basis"):
                rule = self._basis_rule(group, bucket, steps, right, reduce)
                B_all = oriented((yield from rule(oriented(G))))
                B.copy_(oriented(reduce.basis_block(oriented(B_all))))
            del G
        else:
            B_all = oriented((yield from reduce.gather_basis(oriented(B)))[0])
        B = B_all
        with phase("project"):
            # R = Pᵀ·A in the math's orientation: G·Bᵀ (h × r) on the right, Bᵀ·G (r × n) on the left.
            h, n = grads[0].shape
            R = M.new_empty(len(bucket), *((h, group["rank"]) if right else (group["rank"], n)))
            for i, g in enumerate(grads):
                if right:
                    torch.mm(g, B[i].mT, out=R[i])
                else:
                    torch.mm(B[i].mT, g, out=R[i])
            R = oriented((yield from reduce.basis_axis(oriented(R))))
        with phase("moments"):
            # The moments may be this rank's block of columns (``reduce.free_block``): Adam is
            # elementwise, so it runs on the block, and the direction is gathered whole.
            N, step_sizes = galore_moments_(oriented(reduce.free_block(oriented(R))), M, V, steps,
                                            beta1=beta1, beta2=beta2, eps=group["eps"])
            N = oriented((yield from reduce.gather_free(oriented(N)))[0])
        with phase("update"):
            # W ← (W - lr·scale·s·P·N)·(1 - lr·λ): the decay of the updated weight.
            lr, wd, scale = group["lr"], group["weight_decay"], group["scale"]
            decay = 1 - lr * wd
            for i, w in enumerate(weights):
                a, b = (N[i], B[i]) if right else (B[i], N[i])
                alpha = -lr * scale * step_sizes[i]
                if w.dtype == dtype:
                    w.addmm_(a, b, beta=decay, alpha=alpha * decay)
                else:
                    w.add_((a @ b).to(w.dtype), alpha=alpha)
                    if wd != 0:
                        w.mul_(decay)
        for st in states:
            st["step"] += 1
