"""Adapprox: Adam's second moment kept as an adaptive-rank randomized factorization
(Zhao et al., arXiv 2403.14958).

The math is ``adapprox_update`` (steps 1–2 of ``algorithms.md`` §2(b): the second moment and
its factorization) and ``adapprox_direction`` (steps 3–5: normalization, clipping, first
moment), on a batch of same-shape matrices ``d × c`` in the weight's own layout.  The rank rule
is ``select_rank`` with the expansion ``rank_expansion``.  Sums over an axis that may be split
between ranks go through a reducer, the identity in one process; each is a step of these
generators (``yield from reduce.basis_axis(...)``, see ``distributed.reducer``).

No official code exists; where the paper's details could not be retrieved the choices are
documented here and on :class:`Adapprox` (see ``algorithms.md`` §2, marked [RECON] there).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from functools import partial

import torch

from ..distributed.reducer import LOCAL, Reducer, Steps
from ..linalg.factorization import matrix_inner, randomized_factorization
from ..utils.profiling import phase
from ..utils.seeding import stable_seed
from ..utils.validation import check, is_int, is_number
from .base import CompressedOptimizer, Matrix, as_betas, check_adam_hparams
from .matrix import per_matrix

# Same-shape matrices are stacked, and each stacked matrix costs a few dense transients (the
# second moment V, the normalized update); chunks of at most this many elements bound that.
_BATCH_ELEMENTS = 1 << 26

# guidance(direction, update, inner) -> direction; see Adapprox's ``guidance`` argument.
Guidance = Callable[[torch.Tensor, torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
                    torch.Tensor]


def rank_expansion(error: float, threshold: float, growth: int, sharpness: float) -> int:
    """``f(ξ)``: how many columns the rank gains when its relative error ``ξ`` exceeds ``ξ_thr``.

    ``f(ξ) = max(1, ⌈Δ·(2·σ(γ·(ξ/ξ_thr - 1)) - 1)⌉)`` with ``σ`` the logistic function,
    ``Δ = growth`` and ``γ = sharpness``: one column just above the threshold, rising along
    a logistic curve to ``Δ`` columns for errors far above it.  (``2σ(x) - 1 = tanh(x/2)``.)
    """
    if threshold == 0:
        return growth
    excess = error / threshold - 1
    return max(1, math.ceil(growth * math.tanh(sharpness * excess / 2)))


def select_rank(
    errors: Sequence[float],
    rank: int,
    rank_min: int,
    rank_max: int,
    threshold: float,
    growth: int,
    sharpness: float,
) -> int:
    """The rank rule of an evaluation step.

    ``errors[j - 1]`` is the relative error of the rank-``j`` approximation, for every ``j`` up
    to at least ``rank_max``; ``rank`` is the current rank.

    - Above the threshold, the rank grows by ``rank_expansion`` of its error, again and again
      from the new rank's error, until the error meets the threshold or the rank reaches
      ``rank_max``.  Steps shrink as the error nears the threshold, so the rank lands just
      past the smallest sufficient one, with a margin that grows with how far off it was.
    - At or below it, the rank shrinks to the smallest rank, not below ``rank_min``, whose
      error meets the threshold.

    So after every evaluation ``rank_min <= rank <= rank_max``, and the error is at most the
    threshold unless the rank is ``rank_max``.
    """
    def err(j: int) -> float:
        return errors[j - 1]

    if err(rank) <= threshold:
        return next(j for j in range(rank_min, rank + 1) if err(j) <= threshold)
    while rank < rank_max and err(rank) > threshold:
        rank = min(rank + rank_expansion(err(rank), threshold, growth, sharpness), rank_max)
    return rank


def adapprox_direction(
    G: torch.Tensor,
    V: torch.Tensor,
    M: torch.Tensor | None,
    steps: list[int],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    clip_threshold: float | None,
    bias_correction: bool,
    guidance: Guidance | None = None,
    size: int | None = None,
    reduce: Reducer = LOCAL,
) -> Steps[tuple[torch.Tensor | None, torch.Tensor]]:
    """Steps 3–5: from the gradient ``G`` and the second moment ``V_t`` (both ``(k, d, c)``) to
    the direction the weight moves along.

    ``M`` is the first moment, ``None`` when ``β1 = 0``; ``size`` the whole matrix's element
    count (``d·c`` unless rows are split between ranks).  Returns ``(M, D)``: the new first
    moment and the direction ``D``; the weight moves by ``-lr·(D + λ·W)``.
    """
    def inner(X: torch.Tensor, Y: torch.Tensor) -> Steps[torch.Tensor]:
        return (yield from matrix_inner(X, Y, reduce)).view(-1, 1, 1)

    size = G.shape[-2] * G.shape[-1] if size is None else size
    # 3. û = g / (√V̂ + ε); V̂ = V_t unless bias correction is on (the paper has none).
    if bias_correction:
        V = V / per_matrix([1 - beta2 ** (k + 1) for k in steps], G)
    u = G / (V.sqrt() + eps)
    # 4. Adafactor's update clipping: û / max(1, RMS(û)/d).  Without bias correction the first
    # update has RMS ≈ 1/√(1-β2) (31.6 at β2 = 0.999), so this is what keeps it bounded.
    if clip_threshold is not None:
        rms = ((yield from inner(u, u)) / size).sqrt()
        u = u / (rms / clip_threshold).clamp(min=1.0)
    if beta1 == 0:
        return None, u
    # 5. The first moment averages the clipped, normalized updates, not the gradients.
    M = beta1 * M + (1 - beta1) * u
    D = M / per_matrix([1 - beta1 ** (k + 1) for k in steps], G) if bias_correction else M
    if guidance is not None:
        # a user's function cannot post its sums: each is a collective of its own
        D = guidance(D, u, lambda X, Y: reduce.at_once(inner(X, Y)))
    return M, D


def adapprox_update(
    G: torch.Tensor,
    Q_prev: torch.Tensor,
    U_prev: torch.Tensor,
    M: torch.Tensor | None,
    steps: list[int],
    ranks: list[int],
    *,
    width: int,
    rank_rule: Callable[[list[float], int], int] | None,
    seeds: list[int],
    power_iters: int,
    beta1: float,
    beta2: float,
    eps: float,
    clip_threshold: float | None,
    bias_correction: bool,
    guidance: Guidance | None = None,
    size: int | None = None,
    reduce: Reducer = LOCAL,
) -> Steps[tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor | None, torch.Tensor]]:
    """One Adapprox step for a batch of ``d × c`` matrices.

    ``Q_prev`` ``(k, d, K)`` and ``U_prev`` ``(k, c, K)`` are the factors of the previous second
    moment (zero columns past each rank; zero before the first step), ``ranks`` the current
    ranks, ``steps`` the completed steps.  The factorization is sketched at ``width`` columns
    (a rank plus oversampling); ``rank_rule`` (an evaluation step) maps each matrix's prefix
    errors and rank to its new rank, otherwise ranks are kept.  Returns ``(Q, U, ranks, M, D)``:
    the new factors (``width`` columns, zero past each rank), ranks and first moment, and the
    direction ``D`` (see ``adapprox_direction``, which also defines ``size``).

    ``U_prev`` may be this rank's block of the free axis ``c`` (``reduce.free_block`` of its
    ``K × c`` transpose), as the holders of a matrix split by rows keep it: the step gathers it
    whole, works as one process does, and returns the same block of the new ``U``.
    """
    U_prev = (yield from reduce.gather_free(U_prev.mT))[0].mT
    # 1. V_t = β2·max(Q·Uᵀ, 0) + (1-β2)·g², dense and transient.  A low-rank approximation of
    # a non-negative matrix has negative entries; the clamp keeps √V real and V non-negative.
    with phase("moments"):
        V = (Q_prev @ U_prev.mT).clamp_(min=0)
        V.mul_(beta2).addcmul_(G, G, value=1 - beta2)
    # 2. AS-RSI: factor V_t, choose the ranks from the errors of every prefix, truncate.
    with phase("basis"):
        fac = yield from randomized_factorization(V, width, seeds, power_iters, reduce)
        if rank_rule is not None:
            ranks = [rank_rule(errors, k) for errors, k in zip(fac.prefix_errors().tolist(), ranks)]
    keep = torch.arange(width, device=G.device) < torch.tensor(ranks, device=G.device)[:, None]
    Q = fac.Q * keep[:, None, :]
    U = reduce.free_block(fac.U.mT).mT * keep[:, None, :]
    # 3–5, with the exact V_t (the factors only carry it to the next step).
    with phase("moments"):
        M, D = yield from adapprox_direction(G, V, M, steps, beta1=beta1, beta2=beta2, eps=eps,
                                             clip_threshold=clip_threshold, bias_correction=bias_correction,
                                             guidance=guidance, size=size, reduce=reduce)
    return Q, U, ranks, M, D


def _chunks(bucket: list, shape: tuple[int, ...]):
    """``bucket`` in runs of at most ``_BATCH_ELEMENTS`` elements (at least one item each)."""
    per_chunk = max(1, _BATCH_ELEMENTS // max(1, math.prod(shape)))
    for i in range(0, len(bucket), per_chunk):
        yield bucket[i:i + per_chunk]


class Adapprox(CompressedOptimizer):
    r"""Adapprox: the second moment of each matrix stored as rank-``k`` factors ``Q·Uᵀ``.

    At every step (``algorithms.md`` §2(b)) the dense second moment
    ``V_t = β2·max(Q·Uᵀ, 0) + (1-β2)·g²`` is formed transiently, normalizes the gradient, and
    is factored again by randomized subspace iteration (``power_iters`` iterations,
    ``oversample`` extra columns, truncated through a Rayleigh–Ritz rotation so the extra
    columns sharpen the kept ones).  The sketch is seeded from the parameter's name and step,
    so replicas agree and a resumed run is exact.

    The rank ``k`` of each matrix starts at ``rank_init`` and is re-evaluated at steps 0,
    ``Δs``, ``2Δs``, … of the matrix's own counter (``Δs = rank_interval``), from the relative
    errors ``ξ(j) = ‖V - Q_j·U_jᵀ‖_F/‖V‖_F`` of every rank ``j`` of one factorization
    sketched at ``rank_max + oversample`` columns (see :func:`select_rank`):

    - if ``ξ(k) > ξ_thr`` (``error_threshold``), ``k`` grows by the expansion
      ``f(ξ) = max(1, ⌈Δ·(2·σ(γ·(ξ/ξ_thr - 1)) - 1)⌉)`` (``Δ = rank_growth``,
      ``γ = rank_growth_sharpness``, ``σ`` the logistic function), repeatedly from the new
      rank's error, until ``ξ(k) <= ξ_thr`` or ``k = rank_max``;
    - otherwise ``k`` shrinks to the smallest rank ``>= rank_min`` with ``ξ <= ξ_thr``.

    Between evaluations the sketch has ``k + oversample`` columns.  The paper states only that
    the rank grows by a sigmoid-shaped ``f(ξ)`` above the threshold, capped at ``k_max``; the
    form of ``f``, the repetition and the shrinking are this implementation's choices.

    Then ``û = g/(√V̂ + ε)`` (``V̂ = V_t``, or ``V_t/(1-β2^t)`` with ``bias_correction``),
    Adafactor's clipping ``û / max(1, RMS(û)/d)`` (``d = clip_threshold``; ``None`` turns it
    off), ``M_t = β1·M + (1-β1)·û`` (no first moment at all when ``β1 = 0``; the weight then
    moves along ``û``), and ``W ← W - lr·(M_t + λ·W)``.  With ``bias_correction`` the first
    moment is divided by ``1-β1^t`` as well.

    Memory: ``Q`` and ``U`` are allocated at ``K`` columns from the first step, as in the paper,
    with the columns past the current rank kept at zero; the state's layout then never changes,
    whatever the rank does.  ``K = min(rank_max, m, n, K_even)`` (``factor_width``), where the
    break-even width ``K_even = ⌊(4·m·n - 8)/(4·(m + n))⌋`` is the widest at which the float32
    factors and their int64 rank counter take no more bytes than the dense float32 second
    moment they stand for; where ``K_even < 1`` (a row or column vector, 2 × 2, 2 × 3) the
    matrix keeps that dense second moment, as a vector does.  So the state never exceeds
    AdamW's (two dense moments), with or without a first moment.  The cap depends only on the
    shape and ``rank_max``, so ZeRO ranks, tensor-parallel ranks and checkpoints agree; a group
    with ``within_adamw=False`` takes ``K = min(rank_max, m, n)``, always factored.  Per
    ``m × n`` matrix: ``(m + n)·K`` factor elements, plus ``m·n`` for the first moment when
    ``β1 > 0``, in float32 (float64 for a float64 parameter).  The step needs a transient dense
    ``V`` per matrix.  The ranks holding rows of a matrix split between them (ZeRO-3, FSDP2) keep
    the column factor in blocks of its ``n`` rows (``column_axes``), as LDAdam keeps its moments,
    so no part of the state is held twice.

    Defaults: ``l = p = 5`` and ``Δs = 10`` are the paper's; it gives no values for the rest,
    so ``β2 = 0.999``, ``ε = 1e-8``, ``d = 1``, ``ξ_thr = 0.01`` and ``rank_min = rank_init = 1``
    are provisional, and ``rank_max = 128`` is about the ``0.16·min(m, n)`` its reported memory
    savings imply for GPT-2-sized layers (``algorithms.md`` §2(a), §2(c)).

    Parameters: in a group whose ``lowrank`` key is true (the default) every parameter takes
    the Adapprox update; 2-D ones factor their second moment, all others (biases, norms) keep
    it dense, as Adafactor does.  Groups with ``compress=False`` use the dense AdamW path.

    Args:
        params: parameters or parameter groups (named parameters seed the sketch and appear
            in messages).
        lr, betas, eps, weight_decay: as in AdamW (decoupled weight decay); ``eps`` is added
            after the square root and must be positive.
        rank_init, rank_min, rank_max: the first rank (clamped to the bounds) and the bounds,
            each capped at the factor width ``K`` (at most ``min(m, n)`` and the break-even
            width, see Memory); ``rank_max`` fixes the allocation and cannot change after a step.
        rank_interval: ``Δs``, the steps between two rank evaluations.
        error_threshold: ``ξ_thr``, the relative error the rank aims for.
        rank_growth, rank_growth_sharpness: ``Δ`` and ``γ`` of the expansion ``f(ξ)``.
        oversample, power_iters: ``p`` and ``l`` of the randomized subspace iteration.
        clip_threshold: ``d`` of the update clipping, or ``None``.
        bias_correction: divide ``V`` by ``1-β2^t`` and ``M`` by ``1-β1^t`` (off, as the paper).
        guidance: the optional cosine-similarity guidance, as a function
            ``guidance(direction, update, inner) -> direction`` called when ``β1 > 0`` on each
            batch of same-shape parameters: ``direction`` is ``M_t`` (bias-corrected if on),
            ``update`` the clipped ``û_t``, and ``inner(X, Y)`` the ``(k, 1, 1)`` Frobenius inner
            products of each matrix of two batches, summed over all holders (each call a
            collective of its own where the matrices are split).  The paper's form
            could not be retrieved, so none is built in.  It is an argument of the optimizer,
            not a group key: a function cannot go into a ``weights_only`` checkpoint.

    Every other argument is also a per-group key, read at every step; so is ``within_adamw``
    (see Memory).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank_init: int = 1,
        rank_min: int = 1,
        rank_max: int = 128,
        rank_interval: int = 10,
        error_threshold: float = 0.01,
        rank_growth: int = 8,
        rank_growth_sharpness: float = 1.0,
        oversample: int = 5,
        power_iters: int = 5,
        clip_threshold: float | None = 1.0,
        bias_correction: bool = False,
        guidance: Guidance | None = None,
    ) -> None:
        check(guidance is None or callable(guidance), "guidance", guidance,
              "None or a function guidance(direction, update, inner) -> direction")
        self.guidance = guidance
        defaults = dict(lr=lr, betas=as_betas(betas), eps=eps, weight_decay=weight_decay,
                        rank_init=rank_init, rank_min=rank_min, rank_max=rank_max,
                        rank_interval=rank_interval, error_threshold=error_threshold,
                        rank_growth=rank_growth, rank_growth_sharpness=rank_growth_sharpness,
                        oversample=oversample, power_iters=power_iters,
                        clip_threshold=clip_threshold, bias_correction=bias_correction,
                        compress=True)
        super().__init__(params, defaults)

    # -- hyperparameters -------------------------------------------------------------------

    def _check_group(self, group: dict) -> None:
        check_adam_hparams(group)
        eps = group["eps"]
        check(eps > 0, "eps", eps, "a positive float (where g = 0 and V = 0, ε = 0 gives 0/0)")
        for key in ("rank_init", "rank_min", "rank_max", "rank_interval", "rank_growth"):
            v = group[key]
            check(is_int(v) and v >= 1, key, v, "a positive int")
        rank_min, rank_max = group["rank_min"], group["rank_max"]
        check(rank_min <= rank_max, "rank_max", rank_max, f"an int >= rank_min={rank_min}")
        thr = group["error_threshold"]
        check(is_number(thr) and 0 <= thr <= 1,
              "error_threshold", thr, "a float in [0, 1] (a relative error)")
        sharp = group["rank_growth_sharpness"]
        check(is_number(sharp) and 0 < sharp < math.inf,
              "rank_growth_sharpness", sharp, "a positive float")
        for key in ("oversample", "power_iters"):
            v = group[key]
            check(is_int(v) and v >= 0, key, v, "a non-negative int")
        clip = group["clip_threshold"]
        check(clip is None or (is_number(clip) and clip > 0),
              "clip_threshold", clip, "a positive float, or None for no clipping")
        check(group["bias_correction"] in (True, False), "bias_correction",
              group["bias_correction"], "True or False")

    # every parameter of a lowrank group takes the Adapprox update (a dense V if not 2-D)
    matrices_only = False

    @staticmethod
    def factor_width(group: dict, shape: tuple[int, ...]) -> int:
        """``K``, the columns of the second moment's factors of a parameter of whole ``shape``;
        0 for a dense second moment (not a matrix, or one whose factors would be larger)."""
        if len(shape) != 2:
            return 0
        m, n = shape
        width = min(group["rank_max"], m, n)
        if group.get("within_adamw", True):
            # float32 factors (m + n)·K·4 plus the int64 rank counter within the dense V's m·n·4
            width = min(width, (4 * m * n - 8) // (4 * (m + n)))
        return max(width, 0)

    @classmethod
    def factored(cls, group: dict, shape: tuple[int, ...]) -> bool:
        return cls.factor_width(group, shape) > 0

    @classmethod
    def state_shapes(cls, group: dict, shape: tuple[int, ...], held: tuple[int, ...] | None = None,
                     dtype: torch.dtype = torch.float32, first_row: int | None = None,
                     columns: tuple[int, int] | None = None) -> dict:
        """The state of the part ``held`` (rows ``h × n`` of a factored matrix, else any part;
        default: all) of a parameter of whole ``shape``: the step, the second moment (factors
        and rank, or dense) and the first moment when ``β1 > 0``.  Of the column factor a ZeRO
        piece (rows from ``first_row``) keeps its block of the ``n`` columns (``piece_columns``),
        an FSDP2 rank the block ``columns``."""
        held = tuple(shape if held is None else held)
        sdt = torch.promote_types(dtype, torch.float32)     # as _state_dtype
        width = cls.factor_width(group, shape)
        shapes = {"step": ((), torch.float32)}
        if width:
            n = held[1]
            if columns is not None or first_row is not None:
                lo, hi = columns or cls.piece_columns(shape, first_row, held[0])
                n = hi - lo
            shapes["rank"] = ((), torch.int64)
            shapes["exp_avg_sq_row_factor"] = ((held[0], width), sdt)
            shapes["exp_avg_sq_col_factor"] = ((n, width), sdt)
        else:
            shapes["exp_avg_sq"] = (held, sdt)
        if group["betas"][0] != 0:
            shapes["exp_avg"] = (held, sdt)
        return shapes

    host_keys = ("step", "rank")

    @classmethod
    def row_length(cls, group: dict, shape: tuple[int, ...]) -> int | None:
        """A matrix row of a factored matrix; the whole of any other parameter (one row)."""
        if not cls.is_compressed_shape(group, shape):
            return None
        return shape[1] if cls.factored(group, shape) else math.prod(shape)

    @classmethod
    def gradient_power(cls, group: dict, shape: tuple[int, ...]) -> int:
        """A matrix's second moment (squares) is itself factored by power iteration: ``V·Vᵀ·Q``."""
        return 4 if len(shape) == 2 else 2

    @classmethod
    def row_axes(cls, group: dict, shape: tuple[int, ...]) -> dict[str, tuple[int, Callable[[int], int]]]:
        """The row factor and the first moment by rows, the column factor by blocks of columns
        (``column_axes``); a dense second moment is one row."""
        numel = math.prod(shape)
        factored = cls.factored(group, shape)

        def rows(r: int) -> int:
            return r if factored else r * numel
        keys = ("exp_avg_sq_row_factor", "exp_avg") if factored else ("exp_avg_sq", "exp_avg")
        return {**{key: (0, rows) for key in keys}, **cls.column_block_axes(group, shape)}

    @classmethod
    def column_axes(cls, group: dict, shape: tuple[int, ...]) -> dict[str, int]:
        """The column factor of a factored matrix (``n × K``): its dim 0 runs along the columns."""
        return {"exp_avg_sq_col_factor": 0} if cls.factored(group, shape) else {}

    @classmethod
    def rank_bounds(cls, group: dict, shape: torch.Size) -> tuple[int, int, int]:
        """``(rank_min, rank_init, rank_max)`` for a matrix of ``shape``, capped at its factor
        width ``K`` (``factor_width``: at most ``min(m, n)`` and the break-even width)."""
        k_max = cls.factor_width(group, tuple(shape))
        k_min = min(group["rank_min"], k_max)
        return k_min, min(max(group["rank_init"], k_min), k_max), k_max

    def _check_state(self, group: dict, m: Matrix) -> None:
        """Refuse state the group's settings no longer fit."""
        st = m.state
        if "step" not in st:
            return
        if not self.factored(group, m.shape):
            if "exp_avg_sq" not in st:
                raise ValueError(f"{m.label}: it has taken factored steps, so it cannot take dense "
                                 f"ones now (its group's within_adamw or rank_max changed)")
            return
        if "exp_avg_sq_row_factor" not in st:
            raise ValueError(f"{m.label}: it has taken dense steps, so it cannot take factored ones "
                             f"now (its state has no second-moment factors)")
        lo, hi = self.held_columns(m)
        col = st.get("exp_avg_sq_col_factor")
        if col is not None and hi - lo < col.shape[0] == m.shape[1]:
            # whole, as each holder of rows kept it in checkpoints written before holders kept
            # their block of it
            st["exp_avg_sq_col_factor"] = col[lo:hi].clone()
        k_max = self.rank_bounds(group, m.shape)[2]
        allocated = st["exp_avg_sq_row_factor"].shape[1]
        if allocated != k_max:
            raise ValueError(
                f"{m.label}: the group's rank_max={group['rank_max']} no longer matches its state "
                f"(factors of {allocated} columns, expected {k_max}); rank_max cannot change "
                f"once the parameter has taken a step"
            )

    # -- state -----------------------------------------------------------------------------

    @staticmethod
    def _state_dtype(p: torch.Tensor) -> torch.dtype:
        """Factors and moments in float32, or float64 for a float64 parameter."""
        return torch.promote_types(p.dtype, torch.float32)

    def _init_state(self, group: dict, m: Matrix) -> dict:
        """Zero state (``state_shapes``); a matrix's factors have ``K`` columns from the start,
        each for the rows (columns) of the matrix held here.  The first moment is
        ``_sync_first_moment``'s."""
        st = self._allocate(group, m, skip=("exp_avg",))
        if "rank" in st:
            st["rank"].fill_(self.rank_bounds(group, m.shape)[1])
        return st

    def _complete_state(self, group: dict, m: Matrix) -> None:
        self._init_state(group, m)
        self._sync_first_moment(group, m)

    def _sync_first_moment(self, group: dict, m: Matrix) -> None:
        """Create or drop the first moment to match the group's ``β1``."""
        if group["betas"][0] == 0:
            m.state.pop("exp_avg", None)
        elif "exp_avg" not in m.state:
            m.state["exp_avg"] = torch.zeros_like(m.weight, dtype=self._state_dtype(m.weight),
                                                  memory_format=torch.contiguous_format)

    # -- the step --------------------------------------------------------------------------

    def _matrix_step(self, group: dict, matrices: list[Matrix], runner) -> None:
        # Same-shape matrices sketched at the same width (and split the same way between ranks)
        # share one batch; other parameters are batched by shape.  Batches are cut into chunks
        # that bound the dense transients.
        factored, others = defaultdict(list), defaultdict(list)
        for m in matrices:
            self._check_state(group, m)
            if "step" not in m.state:
                self._init_state(group, m)
            self._sync_first_moment(group, m)
            w = m.weight
            if not self.factored(group, m.shape):
                others[(m.shape, tuple(w.shape), w.dtype, w.device)].append(m)
                continue
            k_min, _, k_max = self.rank_bounds(group, m.shape)
            rank = min(max(int(m.state["rank"]), k_min), k_max)
            evaluate = k_min < k_max and int(m.state["step"]) % group["rank_interval"] == 0
            width = min((k_max if evaluate else rank) + group["oversample"], min(m.shape))
            factored[(m.shape, tuple(w.shape), w.dtype, w.device, width, evaluate, m.split)].append(m)
        jobs = []
        for (shape, _, _, _, width, evaluate, _), bucket in factored.items():
            # the basis axis of the factorization is the weight's rows (right=False)
            jobs += [(chunk, False, partial(self._update_matrices, group, chunk, width, evaluate))
                     for chunk in _chunks(bucket, shape)]
        for (shape, *_), bucket in others.items():
            # a vector is a 1 × numel matrix: its elements run along the free axis
            jobs += [(chunk, True, partial(self._update_dense, group, chunk)) for chunk in _chunks(bucket, shape)]
        runner.run(jobs)

    def _direction_args(self, group: dict, reduce: Reducer) -> dict:
        beta1, beta2 = group["betas"]
        return dict(beta1=beta1, beta2=beta2, eps=group["eps"], clip_threshold=group["clip_threshold"],
                    bias_correction=group["bias_correction"], guidance=self.guidance, reduce=reduce)

    @staticmethod
    def _apply(group: dict, weights: list[torch.Tensor], D: torch.Tensor) -> None:
        """``W ← (1 - lr·λ)·W - lr·D``: decoupled decay of the pre-update weight, as AdamW."""
        lr, wd = group["lr"], group["weight_decay"]
        if wd != 0:
            torch._foreach_mul_(weights, 1 - lr * wd)
        deltas = [d.view_as(w) for d, w in zip(D.to(weights[0].dtype).unbind(0), weights)]
        torch._foreach_add_(weights, deltas, alpha=-lr)

    def _update_matrices(self, group: dict, bucket: list[Matrix], width: int, evaluate: bool,
                         reduce: Reducer) -> Steps[None]:
        states = [m.state for m in bucket]
        k_min, _, k_max = self.rank_bounds(group, bucket[0].shape)
        steps = [int(st["step"]) for st in states]
        stored = [int(st["rank"]) for st in states]
        ranks = [min(max(k, k_min), k_max) for k in stored]
        used = max(stored)   # columns past every stored rank are zero: skip them
        rank_rule = partial(select_rank, rank_min=k_min, rank_max=k_max,
                            threshold=group["error_threshold"], growth=group["rank_growth"],
                            sharpness=group["rank_growth_sharpness"]) if evaluate else None
        with phase("pack"):
            G = torch.stack([m.grad for m in bucket]).to(self._state_dtype(bucket[0].weight))
            Q_prev = torch.stack([st["exp_avg_sq_row_factor"][:, :used] for st in states])
            U_prev = torch.stack([st["exp_avg_sq_col_factor"][:, :used] for st in states])
            M_prev = torch.stack([st["exp_avg"] for st in states]) if "exp_avg" in states[0] else None
        Q, U, ranks, M, D = yield from adapprox_update(
            G, Q_prev, U_prev, M_prev,
            steps, ranks, width=width, rank_rule=rank_rule,
            seeds=[stable_seed(m.label, k) for m, k in zip(bucket, steps)],
            power_iters=group["power_iters"], size=math.prod(bucket[0].shape),
            **self._direction_args(group, reduce),
        )
        with phase("update"):
            self._apply(group, [m.weight for m in bucket], D)
        cols = min(width, k_max)
        for i, st in enumerate(states):
            for key, factor in (("exp_avg_sq_row_factor", Q[i]), ("exp_avg_sq_col_factor", U[i])):
                st[key].zero_()
                st[key][:, :cols] = factor[:, :cols]
            if M is not None:
                st["exp_avg"].copy_(M[i])
            st["rank"].fill_(ranks[i])
            st["step"] += 1

    def _update_dense(self, group: dict, bucket: list[Matrix], reduce: Reducer) -> Steps[None]:
        """Parameters that are not matrices: the same update with a dense second moment,
        each viewed as a ``1 × numel`` matrix."""
        params = [m.weight for m in bucket]
        states = [m.state for m in bucket]
        beta2 = group["betas"][1]
        steps = [int(st["step"]) for st in states]

        def flat(ts) -> torch.Tensor:
            return torch.stack([t.reshape(1, -1) for t in ts])

        G = flat([m.grad for m in bucket]).to(self._state_dtype(params[0]))
        V = flat([st["exp_avg_sq"] for st in states])
        V.mul_(beta2).addcmul_(G, G, value=1 - beta2)
        M = flat([st["exp_avg"] for st in states]) if "exp_avg" in states[0] else None
        with phase("moments"):
            # size: the whole parameter's, when its elements are split between ranks (FSDP2)
            M, D = yield from adapprox_direction(G, V, M, steps, size=math.prod(bucket[0].shape),
                                                 **self._direction_args(group, reduce))
        with phase("update"):
            self._apply(group, list(params), D)
        for i, st in enumerate(states):
            st["exp_avg_sq"].copy_(V[i].view_as(st["exp_avg_sq"]))
            if M is not None:
                st["exp_avg"].copy_(M[i].view_as(st["exp_avg"]))
            st["step"] += 1
