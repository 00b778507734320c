"""MicroAdam: Adam statistics recomputed from a window of sparse gradients, with a 4-bit
error feedback (Modoranu et al., NeurIPS 2024).

The math is ``microadam_update`` below, numbered like ``algorithms.md`` §3(b), with the tensor work
of its steps in the pure functions before it (``accumulate``, ``select``, ``feed_back``,
``window_moments``, ``densify``), which ``compiled=True`` runs through ``torch.compile``.  It works on one
flat 1-D gradient segment and that segment's state, whatever the parameter's shape: a whole
parameter here, a piece of a ZeRO flat partition later.  Top-k blocks and quantization buckets
are counted from the start of the segment.

State per segment of ``d`` elements, with ``k`` the entries kept per step:

================  ============  ==========================================================
key               shape         content
================  ============  ==========================================================
window_indices    (m, k) int16  top-k indices of the last ``m`` steps, relative to their block
window_values     (m, k)        the values kept (``value_dtype``)
error             (⌈d/2⌉,)      error feedback, two 4-bit codes per byte (uint8)
error_min/max     (⌈d/q⌉,)      per-bucket minimum and maximum of the error (``value_dtype``)
step              () int64      steps this parameter has taken (the ring's clock)
layout            (3,) int64    block_size, entries per full block, bucket_size
================  ============  ==========================================================

``layout`` makes the state self-describing: block-relative indices mean nothing without the
block size, and it lets a changed ``block_size``/``density``/``bucket_size`` be refused instead
of silently reinterpreting the window.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch

from ..utils.profiling import phase
from ..utils.validation import check, is_int, is_number
from . import fsdp2
from .base import STATE_CATEGORIES, CompressedOptimizer, as_betas, check_adam_hparams
from .matrix import Matrix
from .quantize import dequantize, num_buckets, packed_numel, quantize_

VALUE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# int16 block-relative indices reach 32767, so a block holds at most 32768 elements.
MAX_BLOCK_SIZE = 2**15
# Reference parity: the block size the reference derives from an H100's shared memory.
DEFAULT_BLOCK_SIZE = 29_056

# MicroAdam's state keys for state_bytes(), beside the shared ones
MICROADAM_CATEGORIES = {
    "window_indices": "lowrank_moments",
    "window_values": "lowrank_moments",
    "error": "error_feedback",
    "error_min": "error_feedback",
    "error_max": "error_feedback",
    "layout": "counters",
}


class TopkLayout(NamedTuple):
    """How a segment of ``numel`` elements is cut into top-k blocks."""

    numel: int
    block_size: int
    k_block: int     # entries kept in each full block
    k_tail: int      # entries kept in the partial last block (0 if there is none)

    @property
    def full_blocks(self) -> int:
        return self.numel // self.block_size

    @property
    def k(self) -> int:
        return self.full_blocks * self.k_block + self.k_tail

    def offsets(self, device: torch.device) -> torch.Tensor:
        """Per kept entry, the start of its block: global index = offset + relative index."""
        nf, b = self.full_blocks, self.block_size
        full = torch.arange(nf, device=device).repeat_interleave(self.k_block) * b
        tail = torch.full((self.k_tail,), nf * b, device=device, dtype=torch.long)
        return torch.cat([full, tail])


def kept_per_block(size: int, density: float) -> int:
    """``⌈size·density⌉``, rounded first so that a decimal density such as 0.07 of 100 keeps
    7 entries, not 8 (``100 * 0.07 == 7.000000000000001``)."""
    return math.ceil(round(size * density, 9))


def topk_layout(numel: int, block_size: int, density: float) -> TopkLayout:
    tail = numel % block_size
    return TopkLayout(numel, block_size, kept_per_block(block_size, density),
                      kept_per_block(tail, density) if tail else 0)


def blockwise_topk(a: torch.Tensor, layout: TopkLayout) -> torch.Tensor:
    """Step 2: per block, the indices (relative to the block, int64) of the ``k_block``
    (``k_tail`` in the partial last block) entries of largest magnitude, unsorted."""
    nf, b = layout.full_blocks, layout.block_size
    parts = []
    if nf:
        full = a[: nf * b].view(nf, b).abs()
        parts.append(full.topk(layout.k_block, dim=1, sorted=False).indices.view(-1))
    if layout.k_tail:
        parts.append(a[nf * b:].abs().topk(layout.k_tail, sorted=False).indices)
    return torch.cat(parts)


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or float64 when any input is float64."""
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


def window_ages(step: int, window: int) -> list[int]:
    """Age of each filled ring row at step ``t = step`` (1-based): row ``(t-1) mod m`` is the
    newest (age 0), and only the first ``min(t, m)`` rows have ever been written."""
    return [(step - 1 - r) % window for r in range(min(step, window))]


# The tensor work of each step, as pure functions of tensors and of settings fixed for a group
# (no Python value that changes from step to step), so that ``torch.compile`` can take them whole:
# ``microadam_update(..., compiled=True)`` runs their compiled versions (see ``_kernels``).


def accumulate(grad: torch.Tensor, error: torch.Tensor, error_min: torch.Tensor, error_max: torch.Tensor,
               bucket_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Step 1: the accumulator ``a = g + Q⁻¹(e)``, a new tensor of ``dtype``."""
    a = grad.to(dtype, copy=True)
    a += dequantize(error, error_min, error_max, grad.numel(), bucket_size, dtype)
    return a


def select(a: torch.Tensor, layout: TopkLayout, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 2: block-wise top-k of ``a``: the kept entries' indices relative to their block, their
    indices in ``a`` (``offsets``: ``layout.offsets``) and their values."""
    rel = blockwise_topk(a, layout)
    kept = rel + offsets
    return rel, kept, a[kept]


def feed_back(a: torch.Tensor, kept: torch.Tensor, stored: torch.Tensor, error: torch.Tensor,
              error_min: torch.Tensor, error_max: torch.Tensor, bucket_size: int) -> None:
    """Steps 3–4: the kept mass removed from ``a`` (in place), the residual quantized into the
    error feedback with fresh per-bucket statistics.  Subtracting what was *stored* (not
    zeroing) leaves the rounding of a bfloat16 window in the error feedback; with exact storage
    it is zeroing."""
    a.index_add_(0, kept, stored.to(a.dtype), alpha=-1)
    quantize_(a, bucket_size, error, error_min, error_max)


def window_moments(indices: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                   weights: torch.Tensor, corrections: torch.Tensor, numel: int, eps: float) -> torch.Tensor:
    """Step 6: the update direction from the whole ``(m, k)`` window, row ``r`` weighted by
    ``weights[r] = (β1^age, β2^age)`` (0 for a row never written, whose zeros then add exact
    zeros), ``corrections = ((1-β1)/(1-β1^t), (1-β2)/(1-β2^t))``, in the dtype of ``weights``.

    The sums accumulate in that dtype, one ``index_add_`` per row: indices are unique within a
    row, so no two additions race and the sum order is fixed, which keeps replicas bitwise
    identical on GPUs too (a single scatter of the whole window would use atomics there).
    """
    dtype = weights.dtype
    v = values.to(dtype)
    src = torch.stack((v, v * v), dim=1) * weights[:, :, None]     # (m, 2, k)
    glob = indices.long() + offsets
    acc = torch.zeros(2, numel, dtype=dtype, device=values.device)
    for r in range(indices.shape[0]):
        acc.index_add_(1, glob[r], src[r])
    m_sum, v_sum = acc.unbind(0)
    denom = v_sum.mul_(corrections[1]).sqrt_().add_(eps)
    if eps == 0:
        # never-selected coordinates have 0/0; their update is 0
        denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    return m_sum.mul_(corrections[0]).div_(denom)


def densify(u: torch.Tensor, error: torch.Tensor, error_min: torch.Tensor, error_max: torch.Tensor,
            bucket_size: int, alpha: float) -> None:
    """Step 8: a fraction ``α`` of the error feedback added to ``u``, the rest kept (in place)."""
    e = dequantize(error, error_min, error_max, u.numel(), bucket_size, u.dtype)
    u.add_(e, alpha=alpha)
    quantize_(e.mul_(1 - alpha), bucket_size, error, error_min, error_max)


class _Kernels(NamedTuple):
    accumulate: Callable
    select: Callable
    feed_back: Callable
    window_moments: Callable
    densify: Callable


EAGER = _Kernels(accumulate, select, feed_back, window_moments, densify)
_compiled_kernels: _Kernels | None = None


def _kernels(compiled: bool) -> _Kernels:
    """The step's functions, eager or compiled (built once, on first use: importing the package
    must not import torch's compiler)."""
    global _compiled_kernels
    if not compiled:
        return EAGER
    if _compiled_kernels is None:
        from ..utils.compiled import Compiled

        _compiled_kernels = _Kernels(*(Compiled(fn) for fn in EAGER))
    return _compiled_kernels


def window_weights(step: int, window: int, beta1: float, beta2: float, dtype: torch.dtype,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 6's weights ``(β1^age, β2^age)`` of each ring row at step ``t = step`` (zero for
    the rows not yet written) and the bias corrections, as tensors of ``dtype``.  Corrections
    are for the full t, although only min(t, m) steps are summed: the reference's
    normalisation, kept for parity (algorithms.md §3(d) 1)."""
    ages = window_ages(step, window)
    rows = [[beta1**age, beta2**age] for age in ages] + [[0.0, 0.0]] * (window - len(ages))
    rows.append([(1 - beta1) / (1 - beta1**step), (1 - beta2) / (1 - beta2**step)])
    both = torch.tensor(rows, dtype=dtype).to(device)     # one host-to-device copy
    return both[:window], both[window]


def microadam_update(
    grad: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    error: torch.Tensor,
    error_min: torch.Tensor,
    error_max: torch.Tensor,
    step: int,
    *,
    layout: TopkLayout,
    bucket_size: int,
    beta1: float,
    beta2: float,
    eps: float,
    alpha: float = 0.0,
    compiled: bool = False,
) -> torch.Tensor:
    """One MicroAdam step on a flat gradient segment.

    ``grad`` is the 1-D gradient; ``indices``/``values`` the ``(m, k)`` ring window;
    ``error``/``error_min``/``error_max`` the quantized error feedback; all are updated in
    place.  ``step`` is ``t``, this step's 1-based count for the segment.  Returns the update
    direction ``u`` (float32, or float64 for float64 data); the caller applies decoupled weight
    decay and ``W ← W - lr·u`` (steps 5 and 7).  ``compiled``: the tensor work of each step
    through ``torch.compile`` (the same functions; see ``ds_lowrank.utils.compiled``).
    """
    k = _kernels(compiled)
    window = indices.shape[0]
    dtype = compute_dtype(grad.dtype, values.dtype)
    # Step 1: the accumulator a = g + Q⁻¹(e).
    with phase("accumulator"):
        a = k.accumulate(grad, error, error_min, error_max, bucket_size, dtype)
    # Step 2: block-wise top-k into ring row (t-1) mod m.
    with phase("compress"):
        row = (step - 1) % window
        offsets = layout.offsets(a.device)
        rel, kept, kept_values = k.select(a, layout, offsets)
        indices[row].copy_(rel)
        values[row].copy_(kept_values)
    # Steps 3–4: the kept mass removed, the residual re-quantized.
    with phase("error_feedback"):
        k.feed_back(a, kept, values[row], error, error_min, error_max, bucket_size)
    # Step 6: the moments from the window, accumulated in the compute dtype.
    with phase("moments"):
        weights, corrections = window_weights(step, window, beta1, beta2, dtype, a.device)
        u = k.window_moments(indices, values, offsets, weights, corrections,
                             grad.numel(), eps)
    # Step 8: optional densification with a fraction α of the error feedback.
    if alpha:
        with phase("error_feedback"):
            k.densify(u, error, error_min, error_max, bucket_size, alpha)
    return u


class MicroAdam(CompressedOptimizer):
    r"""MicroAdam, with plain AdamW for groups whose ``lowrank`` key is false.

    Every parameter of a group whose ``lowrank`` key is true (the default), whatever its
    shape, is treated as a flat vector: each step keeps the ``density`` fraction of largest
    magnitude entries of every block of ``block_size`` elements, the last ``window`` such
    sparse gradients make Adam's statistics, and what is not kept goes to a 4-bit error
    feedback added to the next gradient.  Unselected coordinates get no update but still
    decay.

    Args:
        params: parameters or parameter groups (named parameters are used in messages).
        lr, betas, eps, weight_decay: as in AdamW (decoupled weight decay).
        window: ``m``, the number of sparse gradients kept.
        density: fraction of each block kept per step (the reference's ``k_init``).
        block_size: elements per top-k block (the reference's hardware-dependent ``B_d``;
            the default matches its H100 value). At most 32768.
        bucket_size: elements per quantization bucket of the error feedback (the
            reference's ``quant_block_size``); even.
        alpha: fraction of the error feedback added to each update (0: sparse updates).
        value_dtype: ``"bfloat16"`` or ``"float32"`` storage of the window values and the
            bucket statistics (float64 parameters always use float64).
        compiled: the step's tensor work (accumulator, top-k, error feedback, window
            statistics) through ``torch.compile``, same results as the eager PyTorch
            functions; ``None`` (the default): compiled on CUDA parameters, eager elsewhere.
            Falls back to eager with a warning naming the cause if compiling fails.

    Every argument is a per-group key read at every step; ``window``, ``density``,
    ``block_size``, ``bucket_size`` and ``value_dtype`` shape the state and cannot change
    once a parameter has taken a step.  Each parameter counts its own steps, so one that
    receives no gradient for a while keeps correct window ages and bias corrections.
    """

    state_categories = {**STATE_CATEGORIES, **MICROADAM_CATEGORIES}

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        window: int = 10,
        density: float = 0.01,
        block_size: int = DEFAULT_BLOCK_SIZE,
        bucket_size: int = 64,
        alpha: float = 0.0,
        value_dtype: str = "bfloat16",
        compiled: bool | None = None,
    ) -> None:
        defaults = dict(lr=lr, betas=as_betas(betas), eps=eps, weight_decay=weight_decay,
                        window=window, density=density, block_size=block_size,
                        bucket_size=bucket_size, alpha=alpha, value_dtype=value_dtype,
                        compiled=compiled, compress=True)
        super().__init__(params, defaults)

    # -- hyperparameters -------------------------------------------------------------------

    def _check_group(self, group: dict) -> None:
        check_adam_hparams(group)

        w = group["window"]
        check(is_int(w) and w >= 1, "window", w, "a positive int")
        rho = group["density"]
        check(is_number(rho) and 0 < rho <= 1, "density", rho, "a float in (0, 1]")
        b = group["block_size"]
        check(is_int(b) and 1 <= b <= MAX_BLOCK_SIZE, "block_size", b,
              f"an int in [1, {MAX_BLOCK_SIZE}] (indices are stored as int16)")
        q = group["bucket_size"]
        check(is_int(q) and q >= 2 and q % 2 == 0, "bucket_size", q,
              "a positive even int (two 4-bit codes per byte)")
        alpha = group["alpha"]
        check(is_number(alpha) and 0 <= alpha < 1, "alpha", alpha, "a float in [0, 1)")
        vd = group["value_dtype"]
        check(isinstance(vd, str) and vd in VALUE_DTYPES, "value_dtype", vd,
              f"one of {tuple(VALUE_DTYPES)}")
        # absent from the groups of a state_dict saved before the option existed: auto
        c = group.get("compiled")
        check(c is None or isinstance(c, bool), "compiled", c,
              "True, False or None (None: compiled on CUDA, eager elsewhere)")

    # every parameter of a compressed group, 1-D ones included (the method is elementwise)
    matrices_only = False
    # nor do the blocks of a fused weight change an elementwise update
    splits_fused = False

    @staticmethod
    def _compiled(group: dict, device: torch.device) -> bool:
        """Whether a parameter on ``device`` takes the compiled step: the group's ``compiled``,
        or by default on CUDA only: on CPU it gained 2%, within the noise, for a first step of a
        minute (README, "Speed")."""
        c = group.get("compiled")
        return device.type == "cuda" if c is None else c

    @staticmethod
    def _value_dtype(group: dict, p: torch.Tensor) -> torch.dtype:
        return torch.float64 if p.dtype == torch.float64 else VALUE_DTYPES[group["value_dtype"]]

    def _check_state(self, group: dict, m: Matrix) -> None:
        """Refuse state whose window and blocks the group's settings no longer describe."""
        st, label = m.state, m.label
        if "window_indices" not in st:
            if "step" in st:
                raise ValueError(f"{label}: it has taken dense AdamW steps, so its group cannot "
                                 f"compress it now (its state has no window)")
            return
        if st["layout"].device.type != "cpu":
            # torch's load_state_dict moves it next to the parameter; read it without a sync
            st["layout"] = st["layout"].cpu()
        block_size, k_block, bucket_size = st["layout"].tolist()
        stored = {
            "window": st["window_indices"].shape[0],
            "block_size": block_size,
            "bucket_size": bucket_size,
            "value_dtype": st["window_values"].dtype,
        }
        now = {
            "window": group["window"],
            "block_size": group["block_size"],
            "bucket_size": group["bucket_size"],
            "value_dtype": self._value_dtype(group, m.weight),
        }
        changed = [key for key in stored if stored[key] != now[key]]
        if not changed:
            # same blocks: the density must still keep as many entries per block and in total
            lay = topk_layout(m.grad.numel(), group["block_size"], group["density"])
            if lay.k_block != k_block or lay.k != st["window_indices"].shape[1]:
                changed = ["density"]
        if changed:
            desc = ", ".join(f"{key}={group[key]!r}" for key in changed)
            raise ValueError(
                f"{label}: {desc} does not match the parameter's MicroAdam state (window "
                f"{tuple(st['window_indices'].shape)}, block_size {block_size} keeping {k_block} "
                f"per block, bucket_size {bucket_size}, values {st['window_values'].dtype}); window, "
                f"density, block_size, bucket_size and value_dtype cannot change once the "
                f"parameter has taken a step"
            )

    # -- state -----------------------------------------------------------------------------

    @classmethod
    def state_shapes(cls, group: dict, shape: tuple[int, ...], held: tuple[int, ...] | None = None,
                     dtype: torch.dtype = torch.float32, first_row: int | None = None) -> dict:
        """The state of a segment of ``held`` elements (default: all of ``shape``) of a
        parameter's flattening: see the module's table.  Nothing is kept in blocks, so where
        the segment starts (``first_row``) does not matter."""
        d = math.prod(shape if held is None else held)
        k = topk_layout(d, group["block_size"], group["density"]).k
        vdt = torch.float64 if dtype == torch.float64 else VALUE_DTYPES[group["value_dtype"]]
        nb = num_buckets(d, group["bucket_size"])
        return {"step": ((), torch.int64), "window_indices": ((group["window"], k), torch.int16),
                "window_values": ((group["window"], k), vdt), "error": ((packed_numel(d),), torch.uint8),
                "error_min": ((nb,), vdt), "error_max": ((nb,), vdt), "layout": ((3,), torch.int64)}

    host_keys = ("step", "layout")

    def _init_state(self, group: dict, m: Matrix) -> dict:
        # all-zero codes with δ = Δ = 0 dequantize to an exact zero error
        st = self._allocate(group, m)
        lay = topk_layout(m.grad.numel(), group["block_size"], group["density"])
        st["layout"].copy_(torch.tensor([lay.block_size, lay.k_block, group["bucket_size"]]))
        return st

    # -- ZeRO partitions -------------------------------------------------------------------

    # its rows are top-k blocks of the flattening, not matrix rows (see ``fsdp2``)
    rows_are_blocks = True

    @classmethod
    def row_length(cls, group: dict, shape: tuple[int, ...]) -> int | None:
        """A top-k block: each rank updates the blocks that start in its partition, so blocks
        and quantization buckets fall where they fall in one process."""
        if not cls.is_compressed_shape(group, shape):
            return None
        if group["block_size"] % group["bucket_size"]:
            raise ValueError(
                f"MicroAdam under ZeRO needs block_size ({group['block_size']}) to be a multiple of "
                f"bucket_size ({group['bucket_size']}), so that the error feedback's quantization "
                f"buckets line up with the parameter's as in one process; e.g. block_size=29056 "
                f"with bucket_size=64")
        return group["block_size"]

    @classmethod
    def row_axes(cls, group: dict, shape: tuple[int, ...]) -> dict[str, tuple[int, Callable[[int], int]]]:
        """Blocks in order: the window's entries of each block, two error codes per byte and the
        bucket statistics (``block_size`` is a multiple of ``bucket_size``, so no bucket or
        byte straddles two blocks)."""
        numel, b, q = math.prod(shape), group["block_size"], group["bucket_size"]
        lay = topk_layout(numel, b, group["density"])

        def entries(r: int) -> int:
            return min(r, lay.full_blocks) * lay.k_block + (lay.k_tail if r > lay.full_blocks else 0)

        def codes(r: int) -> int:
            return packed_numel(min(r * b, numel))

        def buckets(r: int) -> int:
            return num_buckets(min(r * b, numel), q)

        return {"window_indices": (1, entries), "window_values": (1, entries), "error": (0, codes),
                "error_min": (0, buckets), "error_max": (0, buckets)}

    def state_dict(self) -> dict:
        # on FSDP2 the blocks' state goes out in the whole parameter's coordinates (collective)
        return fsdp2.blocks_saved(self, super().state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        fsdp2.blocks_loaded(self)

    # -- the step --------------------------------------------------------------------------

    def _matrix_step(self, group: dict, matrices: list[Matrix], runner) -> None:
        # Elementwise per block: nothing is summed between ranks, so the runner is not needed.
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        for m in matrices:
            self._check_state(group, m)
            st = m.state if "window_indices" in m.state else self._init_state(group, m)
            step = int(st["step"]) + 1
            g = m.grad.reshape(-1)
            u = microadam_update(
                g, st["window_indices"], st["window_values"], st["error"], st["error_min"],
                st["error_max"], step, layout=topk_layout(g.numel(), group["block_size"], group["density"]),
                bucket_size=group["bucket_size"], beta1=beta1, beta2=beta2, eps=group["eps"],
                alpha=group["alpha"], compiled=self._compiled(group, g.device),
            )
            # Steps 5 and 7 in the compute dtype, rounded once into a low-precision weight.
            p = m.weight
            with phase("update"):
                w = p if p.dtype == u.dtype else p.to(u.dtype)
                if wd != 0:
                    w.mul_(1 - lr * wd)
                w.add_(u.view(p.shape), alpha=-lr)
                if w is not p:
                    p.copy_(w)
            st["step"] += 1
