"""LDAdam: Adam in a rank-r subspace re-estimated at every step (Robert et al., ICLR 2025).

The math is ``ldadam_update`` below, numbered like ``algorithms.md`` §1(b).  It works on a
batch of same-shape matrices in the *left* orientation (``A`` is ``d × c``, the basis ``P`` is
``d × r``, the moments are ``r × c``); a right projection is the same math on the weight's
transpose.  Sums over an axis that may be split between ranks go through a reducer, the
identity in one process; each is a step of the generator ``ldadam_update``
(``yield from reduce.basis_axis(...)``), run to its end by the optimizer's runner.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from functools import partial

import torch

from ..distributed.reducer import LOCAL, Reducer, Steps
from ..linalg import add_product_, exact_top_subspace, orthonormalize, randomized_top_subspace
from ..linalg.precision import PRECISIONS, matmul_precision, mixed_matmul, operand_dtype, resolve
from ..utils.profiling import phase
from ..utils.seeding import stable_seed
from ..utils.validation import check, is_int, is_number
from .base import STATE_CATEGORIES, as_betas, check_adam_hparams
from .matrix import Matrix, per_matrix
from .packing import packed_state
from .projection import ProjectionOptimizer
from .quantize import dequantize, num_buckets, packed_numel, quantize_, uniform_noise

PROJ_SIDES = ("auto", "left", "right")
BASIS_INITS = ("randomized", "svd")
EF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# compressed error feedback: ef_dtype -> bits per element (quantize.py, buckets within rows)
EF_BITS = {"int8": 8, "int4": 4}
EF_ROUNDINGS = ("nearest", "stochastic")
# the bucket statistics' dtype (float64 for a float64 parameter)
EF_STATS_DTYPE = torch.bfloat16


# the error-feedback state keys (the codes and their bucket statistics when compressed)
ERROR_KEYS = ("error", "error_min", "error_max", "error_layout")


def error_state_shapes(ef_dtype: str, rows: int, row_length: int, bucket_size: int,
                       dtype: torch.dtype = torch.float32) -> dict:
    """Shape and dtype of each error-feedback state tensor of ``rows`` rows of ``row_length``
    elements of a ``dtype`` parameter: a float64 parameter keeps its buffer (or its bucket
    statistics) in float64."""
    wide = dtype == torch.float64
    if ef_dtype in EF_DTYPES:
        return {"error": ((rows, row_length), torch.float64 if wide else EF_DTYPES[ef_dtype])}
    bits, nb = EF_BITS[ef_dtype], num_buckets(row_length, bucket_size)
    stats = torch.float64 if wide else EF_STATS_DTYPE
    return {"error": ((rows, packed_numel(row_length, bits)), torch.uint8),
            "error_min": ((rows, nb), stats), "error_max": ((rows, nb), stats),
            "error_layout": ((3,), torch.int64)}


def dense_error(state: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """The error feedback of a state in the weight's layout, dequantized if it is compressed;
    ``None`` without one."""
    error = state.get("error")
    if error is None or "error_layout" not in state:
        return None if error is None else error.to(dtype)
    bits, bucket_size, row_length = (int(v) for v in state["error_layout"].tolist())
    return dequantize(error, state["error_min"], state["error_max"], row_length, bucket_size, dtype, bits)


def compress_error(error: torch.Tensor, bits: int, bucket_size: int, stats_dtype: torch.dtype,
                   noise: torch.Tensor | None = None) -> dict:
    """The compressed error-feedback state of ``error`` (``(..., rows, row_length)``, weight layout)."""
    packed = torch.empty(*error.shape[:-1], packed_numel(error.shape[-1], bits), dtype=torch.uint8,
                         device=error.device)
    nb = num_buckets(error.shape[-1], bucket_size)
    lo = torch.empty(*error.shape[:-1], nb, dtype=stats_dtype, device=error.device)
    hi = torch.empty_like(lo)
    quantize_(error, bucket_size, packed, lo, hi, bits, noise)
    return {"error": packed, "error_min": lo, "error_max": hi,
            "error_layout": torch.tensor([bits, bucket_size, error.shape[-1]], dtype=torch.int64)}


def _addcmul_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, value) -> torch.Tensor:
    """``out += value·a·b`` in place, ``value`` a number or a per-matrix ``(k, 1, 1)`` tensor
    (``per_matrix``): one pass over the operands when it is a number."""
    if isinstance(value, torch.Tensor):
        return out.addcmul_(a, b * value)
    return out.addcmul_(a, b, value=value)


def _add_scaled_(out: torch.Tensor, t: torch.Tensor, value) -> torch.Tensor:
    """``out += value·t`` in place, ``value`` a number or a per-matrix ``(k, 1, 1)`` tensor."""
    if isinstance(value, torch.Tensor):
        return out.addcmul_(t, value)
    return out.add_(t, alpha=value)


def _scale_(x: torch.Tensor, value) -> torch.Tensor:
    """``x *= value`` in place, skipped for the number 1."""
    return x if not isinstance(value, torch.Tensor) and value == 1 else x.mul_(value)


def warm_basis(A, P_prev, M, bc1, rho, reduce: Reducer, seeds) -> Steps[torch.Tensor]:
    """Step 2: one block power iteration on ``B = ρ·P_prev·M/bc1 + (1-ρ)·A``, warm-started at
    ``P_prev``: ``P = orth(B·(Bᵀ·P_prev))``.

    ``B`` (``d × c``) is never formed: with ``P_prevᵀP_prev = I``,
    ``Bᵀ·P_prev = ρ/bc1·Mᵀ + (1-ρ)·Aᵀ·P_prev`` and ``B·Z = ρ/bc1·P_prev·(M·Z) + (1-ρ)·A·Z``.
    ``A`` may be in a narrower dtype than the state (``linalg.precision``); ``Z`` and ``Y`` are not.
    Each is formed in its product's buffer (a sum's result is this step's own tensor).
    """
    with phase("basis"):
        Z = _add_scaled_((yield from reduce.basis_axis(mixed_matmul(A.mT, P_prev))).mul_(1 - rho), M.mT, rho / bc1)
        AZ = yield from reduce.free_axis(mixed_matmul(A, Z))
        MZ = yield from reduce.free_axis(M @ Z)
        Y = _add_scaled_(AZ.mul_(1 - rho), P_prev @ MZ, rho / bc1)
    with phase("orthonormalize"):
        return (yield from orthonormalize(Y, reduce, seeds))


def ldadam_update(
    A: torch.Tensor,
    P: torch.Tensor,
    M: torch.Tensor,
    V: torch.Tensor,
    steps: list[int],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    rho: float,
    error_feedback: bool,
    first_basis: Callable[[torch.Tensor], Steps[torch.Tensor]],
    seeds: list[int],
    reduce: Reducer = LOCAL,
    gemm_dtype: torch.dtype | None = None,
) -> Steps[tuple[torch.Tensor, torch.Tensor]]:
    """One LDAdam step for a batch of matrices; the state is updated in place.

    ``A`` is the accumulator ``a_t = g_t + e_t`` (step 1, formed by the caller); with error
    feedback it is overwritten with ``e_{t+1}``.  ``P``, ``M``, ``V`` hold the previous basis
    and raw (not bias-corrected) moments and receive the new ones.  ``steps`` are the completed
    steps ``k`` per matrix, all zero (a first step) or all positive.  Returns the new basis
    and the Adam direction ``N`` in the subspace, for the rows and columns of ``A`` (of the
    basis axis and of the free axis held here): ``A``'s part of the weight moves by ``-lr·P·N``.
    A step (``reducer``): ``P, N = yield from ldadam_update(...)``; ``first_basis(A)`` is one too.

    ``P`` (or ``M`` and ``V``) may be this rank's block of the basis axis (of the free axis;
    ``reduce.basis_block``, ``reduce.free_block``): the step gathers them whole, works on them
    as one process does, and keeps its block.  The collectives of a warm step of a matrix
    split between holders are then the gathered ``[M; V]`` (``2r × c``, its basis axis split)
    or ``P`` (``d × r``, its free axis split), ``Z`` (``c × r``), those of the
    orthonormalization (``r × r``), and ``[ĝ | C]`` (``r × (c + r)``): as many rounds as with
    that state whole on every holder, which sent ``ĝ`` and ``C`` apart and gathered nothing.

    ``gemm_dtype``: the dtype ``A`` takes in the ``d·c·r`` products of steps 2 and 3
    (``linalg.precision``); ``None`` keeps ``A``'s.  The first basis, the error feedback and
    everything ``r`` wide stay in the state's dtype.
    """
    first = steps[0] == 0
    A_mm = A if gemm_dtype is None else A.to(gemm_dtype)
    kappa = beta1 / (1 - beta1)
    if first:
        # Step 2 at k = 0: the top-r subspace of a_t; no previous basis, so C = 0 and the
        # moments start from zero (steps 4 and 6 have nothing to carry over).
        with phase("basis"):
            P_new = yield from first_basis(A)
        with phase("project"):
            g_hat = yield from reduce.basis_axis(mixed_matmul(P_new.mT, A_mm))      # step 3
        M_all = M.new_zeros(*M.shape[:-1], A.shape[-1])
        V_all = torch.zeros_like(M_all)
        M_t = M_all                 # zero: step 7 starts the moments from nothing
        spare = None
        if error_feedback:
            with phase("error_feedback"):
                add_product_(A, P_new, g_hat, alpha=-1.0)                 # step 5: a - P·ĝ
    else:
        (P_all,) = yield from reduce.gather_basis(P)
        M_all, V_all = yield from reduce.gather_free(M, V)
        bc1 = per_matrix([1 - beta1**k for k in steps], A)
        bc2 = per_matrix([1 - beta2**k for k in steps], A)
        P_new = yield from warm_basis(A_mm, P_all, M_all, bc1, rho, reduce, seeds)  # step 2
        with phase("project"):
            # steps 3 and 4 in one sum: [ĝ | C] = P_newᵀ·[a | P_prev]
            g_hat, C = (yield from reduce.basis_axis(torch.cat([mixed_matmul(P_new.mT, A_mm), P_new.mT @ P_all],
                                                               dim=-1))).split([A.shape[-1], P_all.shape[-1]], dim=-1)
            M_t = C @ M_all
        if error_feedback:
            # Step 5: e = (a - P·ĝ) + β1/(1-β1)·(P_prev·M - P·M̃), one pass over the big buffer.
            with phase("error_feedback"):
                left = torch.cat([P_new, P_all], dim=-1)
                right = M_all.new_empty(*M_all.shape[:-2], left.shape[-1], M_all.shape[-1])
                new_rows, old_rows = right.split([P_new.shape[-1], P_all.shape[-1]], dim=-2)
                torch.add(g_hat, M_t, alpha=kappa, out=new_rows).neg_()
                torch.mul(M_all, kappa, out=old_rows)
                add_product_(A, left, right)
        # Step 6: projection-aware re-estimation of the second moment (abs, not clamp):
        # S = V/bc2 - (M/bc1)², Ṽ = bc2·|(C⊙C)·S + (M̃/bc1)²|.  With w = bc2/bc1², bc2·S =
        # V - w·M² is formed in V's buffer (V is not needed again) and β2·Ṽ = |β2·(C⊙C)·(bc2·S)
        # + β2·w·M̃²| (β2 ≥ 0) is written back there, ready for step 7.
        with phase("moments"):
            w = bc2 / (bc1 * bc1)
            S = _addcmul_(V_all, M_all, M_all, -w)
            V_t = _scale_(M_t * M_t, beta2 * w).baddbmm_(C * C, S, alpha=beta2)
            torch.abs(V_t, out=V_all)
            spare = V_t             # free from here: step 7 writes N into it
    # Step 7: Adam in the subspace, ε after the square root of the bias-corrected V:
    # N = (M/bc1')/(√(V/bc2') + ε) = M/(√V·bc1'/√bc2' + ε·bc1').
    with phase("moments"):
        torch.lerp(M_t, g_hat, 1 - beta1, out=M_all)
        V_all.addcmul_(g_hat, g_hat, value=1 - beta2)
        bc1_new = per_matrix([1 - beta1 ** (k + 1) for k in steps], A)
        bc2_new = per_matrix([1 - beta2 ** (k + 1) for k in steps], A)
        N = torch.sqrt(V_all, out=spare).mul_(bc1_new / bc2_new ** 0.5).add_(eps * bc1_new)
        torch.div(M_all, N, out=N)
    # step 9, and the moments: the blocks kept here (in one process the same tensors)
    for kept, whole in ((P, reduce.basis_block(P_new)), (M, reduce.free_block(M_all)),
                        (V, reduce.free_block(V_all))):
        if whole.data_ptr() != kept.data_ptr() or whole.stride() != kept.stride():
            kept.copy_(whole)
    return P_new, N


class LDAdam(ProjectionOptimizer):
    r"""LDAdam, with dense AdamW for the parameters that are not low-rank.

    Every 2-D parameter of a group whose ``lowrank`` key is true (the default) keeps Adam's
    moments in a rank-``rank`` subspace re-estimated at every step, plus an error-feedback
    buffer; every other parameter uses AdamW with the same hyperparameters.  Use
    :func:`ds_lowrank.lowrank_param_groups` to keep embeddings and the LM head dense.

    Args:
        params: parameters or parameter groups (named parameters are used in messages).
        lr, betas, eps, weight_decay: as in AdamW (decoupled weight decay).
        rank: dimension ``r`` of the subspace.
        rho: weight of the momentum against the gradient when re-estimating the subspace.
        error_feedback: keep the compression error and add it to the next gradient.
        proj_side: ``"auto"`` (left if ``m <= n``, else right), ``"left"`` or ``"right"``.
        basis_init: the first basis: ``"randomized"`` (randomized subspace iteration, fast) or
            ``"svd"`` (exact top-``r`` singular subspace, costly on large models).
        ef_dtype: storage of the error-feedback buffer: ``"float32"``, ``"bfloat16"``, or
            compressed to ``"int8"`` or ``"int4"`` codes with per-bucket minimum and maximum
            (bfloat16; float64 for a float64 parameter).
        ef_bucket_size: elements per quantization bucket of a compressed error feedback (even).
            Buckets lie within the rows of the weight, counted from each row's first element
            (the last bucket of a row may be shorter), so a ZeRO partition, which works on
            whole rows, holds whole buckets.
        ef_rounding: ``"nearest"`` or ``"stochastic"`` rounding of a compressed error feedback;
            stochastic draws are seeded per (parameter name, step) and per element of the
            whole matrix, so they do not depend on the partitioning.
        proj_precision: precision of the products with the ``m × n`` gradient (power iteration
            and projection): ``"auto"`` (TF32 on CUDA, float32 elsewhere), ``"float32"``,
            ``"tf32"`` or ``"bfloat16"``; see ``ds_lowrank.linalg.precision``.  The basis, the
            moments and the error feedback keep their dtypes.
        oversample, power_iters: accuracy of the randomized first basis.

    Every argument is also a per-group key, read at every step.
    """

    state_categories = {**STATE_CATEGORIES, "error_min": "error_feedback", "error_max": "error_feedback"}

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.908, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int = 16,
        rho: float = 0.908,
        error_feedback: bool = True,
        proj_side: str = "auto",
        basis_init: str = "randomized",
        ef_dtype: str = "float32",
        ef_bucket_size: int = 64,
        ef_rounding: str = "nearest",
        proj_precision: str = "auto",
        oversample: int = 8,
        power_iters: int = 2,
    ) -> None:
        defaults = dict(lr=lr, betas=as_betas(betas), eps=eps, weight_decay=weight_decay, rank=rank,
                        rho=rho, error_feedback=error_feedback, proj_side=proj_side,
                        basis_init=basis_init, ef_dtype=ef_dtype, ef_bucket_size=ef_bucket_size,
                        ef_rounding=ef_rounding, proj_precision=proj_precision, oversample=oversample,
                        power_iters=power_iters, compress=True)
        super().__init__(params, defaults)

    # the error feedback is created, converted or dropped by _sync_error_buffer
    lazy_keys = ERROR_KEYS

    # -- hyperparameters -------------------------------------------------------------------

    def _check_group(self, group: dict) -> None:
        check_adam_hparams(group)
        rank = group["rank"]
        check(is_int(rank) and rank >= 1, "rank", rank,
              "a positive int")
        rho = group["rho"]
        check(is_number(rho) and 0.0 <= rho <= 1.0, "rho", rho, "a float in [0, 1]")
        check(group["error_feedback"] in (True, False), "error_feedback", group["error_feedback"],
              "True or False")
        check(group["proj_side"] in PROJ_SIDES, "proj_side", group["proj_side"], f"one of {PROJ_SIDES}")
        check(group["basis_init"] in BASIS_INITS, "basis_init", group["basis_init"],
              f"one of {BASIS_INITS}")
        ef = group["ef_dtype"]
        check(isinstance(ef, str) and (ef in EF_DTYPES or ef in EF_BITS), "ef_dtype", ef,
              f"one of {(*EF_DTYPES, *EF_BITS)}")
        q = group["ef_bucket_size"]
        check(is_int(q) and q >= 2 and q % 2 == 0,
              "ef_bucket_size", q, "a positive even int (two 4-bit codes per byte)")
        rounding = group["ef_rounding"]
        check(isinstance(rounding, str) and rounding in EF_ROUNDINGS, "ef_rounding", rounding,
              f"one of {EF_ROUNDINGS}")
        precision = group["proj_precision"]
        check(isinstance(precision, str) and precision in PRECISIONS, "proj_precision", precision,
              f"one of {PRECISIONS}")
        for key in ("oversample", "power_iters"):
            v = group[key]
            check(is_int(v) and v >= 0, key, v,
                  "a non-negative int")

    @staticmethod
    def projects_right(group: dict, shape: torch.Size) -> bool:
        """The side rule: ``auto`` projects tall matrices on the right, wide and square on the left."""
        side = group["proj_side"]
        return side == "right" or (side == "auto" and shape[0] > shape[1])

    @classmethod
    def _refuses_shape(cls, group: dict, shape: tuple[int, ...]) -> bool:
        return group["rank"] > (shape[1] if cls.projects_right(group, shape) else shape[0])

    def _check_param(self, group: dict, label: str, p: torch.Tensor) -> None:
        shape = tuple(p.shape)
        right = self.projects_right(group, shape)
        dim = shape[1] if right else shape[0]
        if self._refuses_shape(group, shape):
            side = "right" if right else "left"
            raise ValueError(
                f"rank={group['rank']} is larger than {label}'s projected dimension {dim} "
                f"(shape {tuple(shape)}, {side} projection): lower the rank to at most {dim}, "
                f"or keep this parameter dense with compress=False in its group"
            )

    # -- state -----------------------------------------------------------------------------

    @classmethod
    def state_shapes(cls, group: dict, shape: tuple[int, ...], held: tuple[int, ...] | None = None,
                     dtype: torch.dtype = torch.float32, first_row: int | None = None,
                     columns: tuple[int, int] | None = None) -> dict:
        """The projection state (``ProjectionOptimizer.state_shapes``) and the error feedback of
        the rows ``held`` (``error_state_shapes``)."""
        shapes = super().state_shapes(group, shape, held, dtype, first_row, columns)
        if group["error_feedback"]:
            h, n = tuple(shape if held is None else held)
            shapes.update(error_state_shapes(group["ef_dtype"], h, n, group["ef_bucket_size"], dtype))
        return shapes

    @staticmethod
    def _ef_layout(group: dict, weight: torch.Tensor) -> list[int] | None:
        """``[bits, bucket_size, row_length]`` of a compressed error feedback for the rows
        ``weight``, or ``None`` for a dense one."""
        bits = EF_BITS.get(group["ef_dtype"])
        return None if bits is None else [bits, group["ef_bucket_size"], weight.shape[1]]

    @staticmethod
    def _ef_stats_dtype(group: dict, rows: torch.Tensor) -> torch.dtype:
        """The bucket statistics' dtype of a compressed error feedback for ``rows``."""
        return error_state_shapes(group["ef_dtype"], 1, rows.shape[-1], group["ef_bucket_size"],
                                  rows.dtype)["error_min"][1]

    def _complete_state(self, group: dict, m: Matrix) -> None:
        self._init_state(group, m)
        self._sync_error_buffer(group, m)

    def _sync_error_buffer(self, group: dict, m: Matrix) -> None:
        """Create, convert or drop the error-feedback buffer to match the group's settings.

        A change of ``ef_dtype`` or ``ef_bucket_size`` converts the buffer (a compressed one is
        re-quantized, with nearest rounding)."""
        st = m.state
        if not group["error_feedback"]:
            for key in ERROR_KEYS:
                st.pop(key, None)
            return
        layout = self._ef_layout(group, m.weight)
        if layout is not None and m.split_dim == 1 and m.weight.shape[1] % layout[1]:
            raise ValueError(
                f"{m.label}: its tensor-parallel shards are {m.weight.shape[1]} columns wide, not a "
                f"multiple of ef_bucket_size={layout[1]}, so the compressed error feedback's buckets "
                f"would straddle shards: choose an ef_bucket_size dividing the shard width")
        if "error_layout" in st:
            if st["error_layout"].device.type != "cpu":
                # torch's load_state_dict moves it next to the parameter; read it without a sync
                st["error_layout"] = st["error_layout"].cpu()
            if st["error_layout"].tolist() == layout:
                return
            st["error"] = dense_error(st, self._state_dtype(m.weight))
            for key in ERROR_KEYS[1:]:          # the statistics and layout of the codes
                del st[key]
        if layout is None:
            shape, dtype = self.state_shapes(group, m.shape, tuple(m.weight.shape), m.weight.dtype)["error"]
            if "error" not in st:
                st["error"] = torch.zeros(shape, dtype=dtype, device=m.weight.device)
            elif st["error"].dtype != dtype:
                st["error"] = st["error"].to(dtype)
            return
        bits, q, _ = layout
        dense = st.pop("error", None)
        dtype = self._state_dtype(m.weight)
        dense = torch.zeros(m.weight.shape, dtype=dtype, device=m.weight.device) if dense is None else dense.to(dtype)
        # all-zero codes with δ = Δ = 0 dequantize to an exact zero error
        st.update(compress_error(dense, bits, q, self._ef_stats_dtype(group, m.weight)))

    def _state_from_adam(self, group: dict, label: str, shape: tuple[int, ...], adam: dict) -> dict:
        """Adam's moments in the subspace; the momentum outside it goes to the error feedback
        (``β1/(1-β1)·(m - P·M)``, as step 5 keeps momentum lost by a change of basis)."""
        state, lost = self._project_adam(group, shape, adam)
        if group["error_feedback"]:
            beta1 = group["betas"][0]
            error = beta1 / (1 - beta1) * lost
            layout = self._ef_layout(group, lost)
            if layout is not None:
                # nearest rounding: the same codes wherever the state is cut afterwards
                state.update(compress_error(error, layout[0], layout[1], self._ef_stats_dtype(group, lost)))
            else:
                _, dtype = error_state_shapes(group["ef_dtype"], 1, 1, 1, lost.dtype)["error"]
                state["error"] = error.to(dtype)
        return state

    @classmethod
    def row_axes(cls, group: dict, shape: tuple[int, ...]) -> dict:
        """The projection optimizers' rule, with a compressed error feedback's codes and bucket
        statistics by rows too (buckets lie within rows; ``error_layout`` is replicated)."""
        def rows(r: int) -> int:
            return r
        return {**super().row_axes(group, shape), "error_min": (0, rows), "error_max": (0, rows)}

    # -- the step --------------------------------------------------------------------------

    def _matrix_step(self, group: dict, matrices: list[Matrix], runner) -> None:
        # Same-shape matrices at the same stage, split the same way between ranks, share one batch.
        buckets = defaultdict(list)
        for m in matrices:
            if "step" not in m.state:
                self._init_state(group, m)
            self._check_state(group, m)
            self._sync_error_buffer(group, m)
            first = not bool(m.state["step"] > 0)
            key = (tuple(m.weight.shape), m.shape, m.weight.dtype, m.weight.device, first, m.split)
            buckets[key].append(m)
        if not buckets:
            return
        # TF32 is a process-wide switch: set here, around every bucket, once
        device = matrices[0].weight.device
        with matmul_precision(resolve(group["proj_precision"], device), device):
            runner.run([(bucket, self.projects_right(group, bucket[0].shape),
                         partial(self._update_bucket, group, bucket)) for bucket in buckets.values()])

    def _update_bucket(self, group: dict, bucket: list[Matrix], reduce: Reducer) -> Steps[None]:
        states = [m.state for m in bucket]
        right = self.projects_right(group, bucket[0].shape)
        ef = group["error_feedback"]
        beta1, beta2 = group["betas"]
        steps = [int(st["step"]) for st in states]
        dtype = self._state_dtype(bucket[0].weight)

        def oriented(t: torch.Tensor) -> torch.Tensor:
            return t.mT if right else t

        # Step 1: the accumulator a = g + e, in the weight's layout.  A float32 error buffer
        # accumulates the gradient in place and then becomes e_{t+1}: no copy of it is made.
        grads = [m.grad for m in bucket]
        with phase("accumulator"):
            layout = self._ef_layout(group, bucket[0].weight) if ef else None
            if layout is not None:
                bits, q, n = layout
                G = torch.stack(grads).to(dtype)
                G += dequantize(packed_state(states, "error"), packed_state(states, "error_min"),
                                packed_state(states, "error_max"), n, q, dtype, bits)
            elif ef and states[0]["error"].dtype == dtype:
                G = packed_state(states, "error")
                torch._foreach_add_(list(G.unbind(0)), grads)
            else:
                G = torch.stack(grads).to(dtype)
                if ef:
                    G += packed_state(states, "error")
        seeds = [stable_seed(m.label, k) for m, k in zip(bucket, steps)]

        def first_basis(A0: torch.Tensor) -> Steps[torch.Tensor]:
            if group["basis_init"] == "svd":
                return exact_top_subspace(A0, group["rank"], reduce)
            return randomized_top_subspace(A0, group["rank"], seeds, group["oversample"],
                                           group["power_iters"], reduce)

        P, N = yield from ldadam_update(
            oriented(G), oriented(packed_state(states, "basis")), oriented(packed_state(states, "proj_exp_avg")),
            oriented(packed_state(states, "proj_exp_avg_sq")), steps,
            beta1=beta1, beta2=beta2, eps=group["eps"], rho=group["rho"], error_feedback=ef,
            first_basis=first_basis, seeds=seeds, reduce=reduce,
            gemm_dtype=operand_dtype(resolve(group["proj_precision"], G.device), G.dtype),
        )
        with phase("error_feedback"):
            if layout is not None:
                noise = self._rounding_noise(bucket, seeds, G) if group["ef_rounding"] == "stochastic" else None
                quantize_(G, q, packed_state(states, "error"), packed_state(states, "error_min"),
                          packed_state(states, "error_max"), bits, noise)
            elif ef and G.data_ptr() != states[0]["error"].data_ptr():
                packed_state(states, "error").copy_(G)
        for st in states:
            st["step"] += 1
        with phase("update"):
            self._apply_update(group, [m.weight for m in bucket], P, N, right)

    @staticmethod
    def _rounding_noise(bucket: list[Matrix], seeds: list[int], like: torch.Tensor) -> torch.Tensor:
        """Stochastic rounding's uniforms for the rows held of each matrix: a function of the
        matrix's seed (name, step) and of each element's flat index in the whole matrix, so
        every partition draws what one process draws."""
        noise = torch.empty_like(like, dtype=torch.float32)
        h, n = like.shape[-2:]
        for i, (m, seed) in enumerate(zip(bucket, seeds)):
            row0, col0 = (0, m.first_row) if m.split_dim == 1 else (m.first_row, 0)
            rows = torch.arange(row0, row0 + h, device=like.device, dtype=torch.int64)
            cols = torch.arange(col0, col0 + n, device=like.device, dtype=torch.int64)
            noise[i] = uniform_noise(seed, rows[:, None] * m.shape[1] + cols[None, :])
        return noise

    @staticmethod
    def _apply_update(group, weights, P, N, right) -> None:
        """Step 8: decoupled weight decay, then ``W -= lr·P·N``, in the weight's layout."""
        lr, wd = group["lr"], group["weight_decay"]
        if weights[0].dtype == P.dtype:
            # Decay and update fused into each GEMM's epilogue: one pass over the weight.
            for i, w in enumerate(weights):
                if right:
                    w.addmm_(N[i].mT, P[i].mT, beta=1 - lr * wd, alpha=-lr)
                else:
                    w.addmm_(P[i], N[i], beta=1 - lr * wd, alpha=-lr)
            return
        update = N.mT @ P.mT if right else P @ N
        if wd != 0:
            torch._foreach_mul_(weights, 1 - lr * wd)
        torch._foreach_add_(weights, list(update.to(weights[0].dtype).unbind(0)), alpha=-lr)
