"""What every ds_lowrank optimizer shares, apart from its math.

- Parameter selection: in a group whose ``compress`` key is true (the default), 2-D parameters
  take the low-rank path and everything else dense AdamW inside the same optimizer.
- Lazy, tensor-only state created in ``step()`` (wrappers such as DeepSpeed's swap parameter
  objects after construction).
- Skipping: a parameter whose gradient is all zero, not finite, or so large that the step's
  arithmetic would overflow (``gradient_limit``) is left untouched this step, weight decay,
  moments, basis, error feedback and step counter included, and counted in ``skipped_steps``.
  DeepSpeed's construction-time dummy step (all-zero gradients) and fp16 overflow steps
  therefore change nothing.  Zero-size parameters take (no-op) AdamW steps, as in torch's AdamW.
- A ``load_state_dict`` that keeps every state tensor's dtype (torch's casts them to the
  parameter's dtype, which would round a float32 error-feedback buffer of a bf16 model).
- ``state_bytes()``: persistent state by category.
- Never above AdamW: ``state_shapes`` (one per optimizer, used to allocate the state and by
  ``ds_lowrank.memory`` to estimate it) says what a parameter's compressed state would be; in a
  group whose ``within_adamw`` key is true (the default) a parameter whose compressed state
  would take more bytes than AdamW's (``dense_adamw.adamw_state_shapes`` in float32: 8 bytes
  per element and a 4-byte step) takes dense AdamW steps instead.  The rule depends only on
  the parameter's whole shape and the group's settings, so every ZeRO rank, tensor-parallel
  rank and checkpoint tool draws the line at the same place.  On FSDP2 with torch's tensor
  parallelism that is the DTensor's whole shape in ``tensor_parallel="local"`` mode too, where
  each TP shard is then stepped as a matrix of its own: every TP shard of a parameter gets the
  same answer (their state lies side by side along ``tp``), though a shard may keep more than
  AdamW would for it (README, Under PyTorch FSDP2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from ..distributed import fused
from ..distributed import tensor_parallel as tp
from ..distributed.reducer import free_share
from ..utils.validation import check, is_finite
from . import fsdp2, state_layout
from .dense_adamw import StateShapes, adamw_state_shapes, shapes_bytes
from .matrix import Matrix
from .placements import megatron
from .placements.megatron import MegatronShards
from .placements.method import Method, Placement, param_label
from .placements.whole import WholeTensors
from .placements.zero import ZeroPartition, is_partition
from ..integration.unstepped import watch_until_first_step
from ..param_groups import warn_lowrank_embeddings_of_caller

# state key of a low-rank or dense parameter -> the category ``state_bytes()`` reports it under
STATE_CATEGORIES = {
    "proj_exp_avg": "lowrank_moments",
    "proj_exp_avg_sq": "lowrank_moments",
    "basis": "bases",
    "error": "error_feedback",
    "exp_avg": "dense_moments",
    "exp_avg_sq": "dense_moments",
    "exp_avg_sq_row_factor": "lowrank_moments",
    "exp_avg_sq_col_factor": "lowrank_moments",
    "step": "counters",
}
CATEGORIES = ("lowrank_moments", "bases", "error_feedback", "dense_moments", "counters")
# The part of the step's dtype range a gradient may use: the power iteration's products are
# sums of squares of the accumulator, with the error feedback (often ~10× the gradient) and
# the bias-corrected momentum (up to 1/(1-β1) of it) folded in.
_HEADROOM = 2.0**-20


BETAS_EXPECTED = "two floats in [0, 1), e.g. (0.908, 0.99)"


def as_betas(betas: Any) -> tuple:
    """The constructors' ``betas`` as a tuple; a single number or a string is refused (both
    betas are needed), the values are checked with the other hyperparameters."""
    check(isinstance(betas, (tuple, list)), "betas", betas,
          f"{BETAS_EXPECTED}, as a pair (in a JSON config a list such as [0.908, 0.99]), "
          f"not {'None' if betas is None else 'a ' + type(betas).__name__}")
    return tuple(betas)


# The group key that turns compression on (the default) or off: False steps the group's
# parameters with AdamW.  ``lowrank``, its earlier name, is still read: renamed when a group is
# added or loaded.
COMPRESS, OLD_COMPRESS = "compress", "lowrank"


def compresses(group: dict) -> bool:
    """Whether ``group`` (a live one, or one read from a checkpoint) compresses its matrices."""
    return group.get(COMPRESS, group.get(OLD_COMPRESS, True))


def rename_old_compress_key(group: dict) -> None:
    """Give ``group``'s ``lowrank`` setting its current name, ``compress``."""
    if OLD_COMPRESS not in group:
        return
    old = group.pop(OLD_COMPRESS)
    if COMPRESS in group and group[COMPRESS] != old:
        raise ValueError(f"a parameter group sets both {COMPRESS}={group[COMPRESS]!r} and {OLD_COMPRESS}={old!r} "
                         f"({OLD_COMPRESS!r} is the earlier name of {COMPRESS!r}): keep only {COMPRESS!r}")
    group[COMPRESS] = old


def check_adam_hparams(group: dict) -> None:
    """Validate the AdamW hyperparameters every ds_lowrank optimizer has."""
    lr = group["lr"]
    check(is_finite(lr) and lr >= 0, "lr", lr, "a finite non-negative float (a tensor lr is not supported)")
    betas = group["betas"]
    check(isinstance(betas, (tuple, list)) and len(betas) == 2
          and all(is_finite(b) and 0.0 <= b < 1.0 for b in betas),
          "betas", betas, BETAS_EXPECTED)
    eps = group["eps"]
    check(is_finite(eps) and eps >= 0, "eps", eps, "a finite non-negative float")
    wd = group["weight_decay"]
    check(is_finite(wd) and wd >= 0, "weight_decay", wd, "a finite non-negative float")
    if OLD_COMPRESS in group:
        raise ValueError(f"a parameter group sets {OLD_COMPRESS!r} after the optimizer was built: that key is "
                         f"read when a group is added, and is now called {COMPRESS!r}: set "
                         f"param_groups[i][{COMPRESS!r}] instead")
    compress = group.get(COMPRESS, True)
    check(isinstance(compress, bool), COMPRESS, compress, "True or False")
    within = group.get("within_adamw", True)
    check(isinstance(within, bool), "within_adamw", within, "True or False")
    mode = group.get("tensor_parallel", "local")
    check(mode in tp.MODES, "tensor_parallel", mode, f"one of {tp.MODES}")


class CompressedOptimizer(torch.optim.Optimizer):
    """The base of the four optimizers: each keeps a compressed state (a low-rank subspace, or
    MicroAdam's sparse window) for the matrices of its ``compress`` groups and steps the other
    parameters with AdamW.  Subclasses implement ``_check_group`` and ``_matrix_step``."""

    # state key -> the category ``state_bytes()`` reports it under; subclasses extend it
    state_categories = STATE_CATEGORIES

    def __init__(self, params: Iterable, defaults: dict[str, Any]) -> None:
        self.skipped_steps = 0
        # Each group's parameters as constructed, before any wrapper swapped them for flat
        # partitions: the names and shapes a ZeRO partition is mapped back to.
        self._originals: list[list[tuple[str, torch.Tensor]]] = []
        # id of a group's dict -> its index in ``_originals``: DeepSpeed steps one group at a
        # time through a one-group ``param_groups`` list, so a group's position there is not it.
        # Kept here, not in the user's group (nor its state_dict).
        self._group_indices: dict[int, int] = {}
        # label -> whole single-process state, waiting to be cut for ZeRO pieces (load_whole_state)
        self._whole_states: dict[str, dict] = {}
        self._whole_weights: dict[str, torch.Tensor] = {}
        # the Megatron tensor-parallel group of tensor_parallel="global" groups (set_tensor_parallel_group)
        self._tp_group = None
        # ZeRO flat partitions' maps by storage, and what FSDP2 groups keep, bound at their first step
        self._layouts: dict[tuple, Any] = {}
        self._fsdp2_bindings = fsdp2.Bindings()
        # True: a parameter whose compressed state would exceed AdamW's is kept dense (see
        # ``is_compressed_shape``); False lets it be compressed at any size (e.g. full-rank tests).
        defaults.setdefault("within_adamw", True)
        super().__init__(params, defaults)
        # torch's loader puts new dicts in ``param_groups``
        self.register_load_state_dict_post_hook(CompressedOptimizer._index_groups)
        # tells the user if something else trains these parameters before this optimizer steps
        watch_until_first_step(self, self._originals)
        # built over bare parameters, it cannot tell an embedding from a matrix: its caller may
        warn_lowrank_embeddings_of_caller(self)

    # -- hyperparameters -------------------------------------------------------------------

    def _check_group(self, group: dict) -> None:
        check_adam_hparams(group)

    def _check_param(self, group: dict, label: str, p: torch.Tensor) -> None:
        """Refuse a parameter this group's settings cannot handle (e.g. rank too large); from
        its shape alone, so it also runs on ZeRO partitions at binding.  State that the settings
        no longer fit is refused in ``_matrix_step`` (see the subclasses' ``_check_state``)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        rename_old_compress_key(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._check_group(group)
        gi = len(self.param_groups) - 1
        self._group_indices[id(group)] = gi
        self._originals.append([(param_label(group, gi, i), p) for i, p in enumerate(group["params"])])
        for label, p in self._originals[-1]:
            if self.is_compressed(group, p):
                if self._splits(p):
                    self._check_blocks(group, label, p)
                else:
                    self._check_compressed(group, label, p, whole=not self._global_shard(group, p))

    def _index_groups(self) -> None:
        """``_group_indices`` of the groups torch's ``load_state_dict`` put in ``param_groups``
        (in the order they were added); the ``group_index`` key checkpoints written before it
        was kept apart carry is dropped."""
        for group in self.param_groups:
            group.pop("group_index", None)
            rename_old_compress_key(group)
        self._group_indices = {id(group): gi for gi, group in enumerate(self.param_groups)}

    def _group_index(self, group: dict, position: int | None = None) -> int:
        """The index in ``_originals`` of ``group``, at ``position`` in ``param_groups``."""
        gi = self._group_indices.get(id(group), position)
        if gi is None:
            raise ValueError(f"{type(self).__name__}: a parameter group it does not hold (groups are "
                             f"added with add_param_group); pass its position in param_groups")
        return gi

    # -- what the layers above ask of a parameter --------------------------------------------
    # (DeepSpeed's integration, the checkpoint tools and the diagnostics: they read the
    # optimizer through these, never its private state)

    def originals(self, group: dict, position: int | None = None) -> list[tuple[str, torch.Tensor]]:
        """``(label, parameter)`` of ``group``'s parameters as they were added, before any
        wrapper swapped them for flat partitions (ZeRO): the names and whole shapes its state
        is kept by.  ``position``: the group's index in ``param_groups``, for a group dict this
        optimizer did not create (DeepSpeed steps one group at a time through a one-group list
        of the same dicts, so a group's position there is not its index)."""
        return self._originals[self._group_index(group, position)]

    def param_label(self, group: dict, index: int, position: int | None = None) -> str:
        """The label this optimizer gives ``group["params"][index]``: its name where the group
        carries names, else its place among the groups as added (``position`` as in ``originals``)."""
        return param_label(group, self._group_index(group, position), index)

    def tensor_parallel_world(self, group: dict, p: torch.Tensor) -> int | None:
        """The number of Megatron tensor-parallel ranks whose shards of ``p`` this optimizer
        steps as one matrix (a shard in a ``tensor_parallel="global"`` group), or ``None`` where
        ``p`` is a matrix of its own.  Needs the tensor-parallel group in the first case."""
        return self._tensor_parallel().world if self._global_shard(group, p) else None

    def partition_layout(self, flat: torch.Tensor):
        """The map of ZeRO flat partition ``flat`` (``distributed.zero_layout.FlatLayout``: the
        pieces of parameters it holds) bound at this optimizer's first step on it, or ``None``
        before that step (``state_layout.piece_span`` reads it)."""
        return self._layouts.get(state_layout.layout_key(flat))

    # whether a compressed group compresses only its matrices (the others take AdamW) or every
    # parameter (Adapprox's dense second moment, MicroAdam's elementwise method)
    matrices_only = True
    # whether a fused weight (``distributed.fused``) is stepped as its logical blocks (``blocks``)
    splits_fused = True

    @classmethod
    def _splits(cls, p: torch.Tensor) -> bool:
        return megatron.stepped_as_blocks(cls, p)

    @classmethod
    def is_compressed(cls, group: dict, p: torch.Tensor) -> bool:
        if (group.get("tensor_parallel", "local") == "global" and tp.is_shard(p)) or cls._splits(p):
            # a part of a matrix, or blocks: whether each fits within AdamW is decided on its own
            group = {**group, "within_adamw": False}
        return cls.is_compressed_shape(group, tuple(p.shape))

    @classmethod
    def is_compressed_shape(cls, group: dict, shape: tuple[int, ...]) -> bool:
        """Whether a parameter of this whole ``shape`` takes the compressed path: in a ``compress``
        group, a matrix (any parameter unless ``matrices_only``) with elements whose compressed
        state fits within AdamW's, or one whose settings are refused for it (``_refuses_shape``),
        so that ``_check_param`` says why.  A zero-size one has nothing to compress; it takes
        AdamW, a no-op, as in torch."""
        if not (compresses(group) and (len(shape) == 2 or not cls.matrices_only)
                and math.prod(shape) > 0):
            return False
        if not group.get("within_adamw", True) or cls._refuses_shape(group, shape):
            return True
        return shapes_bytes(cls.state_shapes(group, shape)) <= shapes_bytes(adamw_state_shapes(shape))

    @classmethod
    def _refuses_shape(cls, group: dict, shape: tuple[int, ...]) -> bool:
        """Whether ``_check_param`` refuses a parameter of ``shape`` (e.g. a rank it cannot have)."""
        return False

    @classmethod
    def param_state_shapes(cls, group: dict, shape: tuple[int, ...], held: tuple[int, ...] | None = None,
                           dtype: torch.dtype = torch.float32) -> StateShapes:
        """The state kept for the part ``held`` (default: all) of a parameter of whole ``shape``
        and ``dtype``: the compressed state, or AdamW's for a parameter left dense."""
        if cls.is_compressed_shape(group, shape):
            return cls.state_shapes(group, shape, held, dtype)
        return adamw_state_shapes(tuple(shape if held is None else held), dtype)

    def _check_compressed(self, group: dict, label: str, p: torch.Tensor, whole: bool = True) -> None:
        """Refuse a parameter the group would compress but cannot: a complex one (the methods'
        math is for real numbers; torch's AdamW steps the real and imaginary parts as separate
        reals, as the dense path does), or one ``_check_param`` refuses (``whole``: ``p`` is the
        whole matrix, not a tensor-parallel shard checked whole at its step)."""
        if p.is_complex():
            raise ValueError(
                f"{label}: {type(self).__name__} cannot compress a complex parameter; put it in a "
                f"group with compress=False, where it takes AdamW on its real and imaginary parts "
                f"as torch's AdamW does")
        if whole:
            self._check_param(group, label, p)

    # how many times a compressed step multiplies the gradient by itself in the largest values it
    # forms: 2 for the projection methods' power iteration (A·Aᵀ·P) and Adam's squares
    @classmethod
    def gradient_power(cls, group: dict, shape: tuple[int, ...]) -> int:
        return 2

    @classmethod
    def gradient_limit(cls, group: dict, shape: tuple[int, ...], dtype: torch.dtype) -> float:
        """The largest gradient entry a step of a parameter of ``shape`` and ``dtype`` (the whole
        matrix's) takes: past it the step's arithmetic (``gradient_power`` of a sum over the
        matrix, or AdamW's squares) could overflow, so the parameter is skipped as a non-finite
        one is.  A bound on the largest entry is the same whether one process holds the matrix
        or several hold parts: their maximum is the whole one's."""
        real = dtype.to_real() if dtype.is_complex else dtype
        top = torch.finfo(torch.promote_types(real, torch.float32)).max * _HEADROOM
        if not cls.is_compressed_shape(group, shape):
            return math.sqrt(top)                   # AdamW: elementwise squares
        return (top / math.prod(shape)) ** (1 / cls.gradient_power(group, shape))

    # -- compressed state -----------------------------------------------------------------

    @staticmethod
    def _state_dtype(p: torch.Tensor) -> torch.dtype:
        """Compressed state in float32, or float64 for a float64 parameter."""
        return torch.promote_types(p.dtype, torch.float32)

    def _check_state(self, group: dict, m: Matrix) -> None:
        """Refuse state of the rows of ``m`` that the group's settings no longer fit."""

    @classmethod
    def state_shapes(cls, group: dict, shape: tuple[int, ...], held: tuple[int, ...] | None = None,
                     dtype: torch.dtype = torch.float32, first_row: int | None = None,
                     columns: tuple[int, int] | None = None) -> StateShapes:
        """The compressed state of the rows ``held`` (``h × n``; default: all) of a matrix of
        whole ``shape`` and ``dtype``, as ``_init_state`` allocates it; ``first_row``: the rows
        are a ZeRO piece's, from that row on; ``columns``: the block of the state along the
        columns (``column_axes``) kept here when the placement chooses it (``Matrix.columns``)."""
        raise NotImplementedError

    @staticmethod
    def piece_columns(shape: tuple[int, int], first_row: int, rows: int) -> tuple[int, int]:
        """The columns ``[lo, hi)`` of the ``r × n`` state (a left projection's moments, a right
        one's basis), which would be the same on every rank owning rows of the ``m × n``
        matrix, that the ZeRO piece owning ``rows`` rows from ``first_row`` keeps: its share
        (``reducer.free_share``), all of them when it owns every row."""
        return free_share(shape[0], shape[1], first_row, rows)

    @classmethod
    def held_columns(cls, m: Matrix) -> tuple[int, int]:
        """The block ``[lo, hi)`` of the columns of ``column_axes``' state kept for the rows of
        ``m``: the placement's (``Matrix.columns``), a ZeRO piece's share, or all of them."""
        if m.columns is not None:
            return m.columns
        if m.piece:
            return cls.piece_columns(m.shape, m.first_row, m.weight.shape[0])
        return 0, m.weight.shape[1]

    def _allocate(self, group: dict, m: Matrix, skip: tuple[str, ...] = ()) -> dict:
        """Zero state for the rows held of ``m`` as ``state_shapes`` lays it out (``skip``: keys
        the optimizer creates itself)."""
        where = {"first_row": m.first_row} if m.piece else {}
        if m.columns is not None:
            where = {"columns": m.columns}
        shapes = self.state_shapes(group, m.shape, tuple(m.weight.shape), m.weight.dtype, **where)
        for key, (shape, dtype) in shapes.items():
            if key not in skip:
                device = "cpu" if key in self.host_keys else m.weight.device
                m.state[key] = torch.zeros(shape, dtype=dtype, device=device)
        return m.state

    # state keys kept on the host whatever the parameter's device (counters read every step)
    host_keys: tuple[str, ...] = ("step",)
    # state keys of ``state_shapes`` the optimizer creates itself rather than ``_init_state``
    lazy_keys: tuple[str, ...] = ()

    def _init_state(self, group: dict, m: Matrix) -> None:
        """Zero state (``state_shapes``, less ``lazy_keys``) for the ``h × n`` rows held of an
        ``m.shape`` matrix (all of it in one process)."""
        self._allocate(group, m, skip=self.lazy_keys)

    def _complete_state(self, group: dict, m: Matrix) -> None:
        """``_init_state`` with the keys the optimizer creates at its first step rather than
        there: the whole state a first step leaves, without taking one."""
        self._init_state(group, m)

    # -- the step --------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # A step is all or nothing: everything that can refuse it is checked, in every group,
        # before any parameter moves.
        for group in self.param_groups:
            self._check_group(group)
        method = self._method()
        placements = [placement for gi, group in enumerate(self.param_groups)
                      for placement in self._placements(method, group, gi)]
        for placement in placements:
            for matrices, runner in placement.rows():
                if matrices:
                    self._matrix_step(placement.group, matrices, runner)
            placement.finish()
            self.skipped_steps += placement.skipped
        return loss

    def _method(self) -> Method:
        """What the placements may ask of this optimizer."""
        return Method(type(self), self.state, self._check_compressed, self._check_param, self._check_state,
                      self._init_state, self._complete_state, self._allocate)

    def _placements(self, method: Method, group: dict, gi: int) -> list[Placement]:
        """Where the rows of group ``gi`` (``param_groups`` index) are held this step, checked."""
        originals = self._originals[self._group_index(group, gi)]
        flats = [p for p in group["params"] if p.grad is not None and is_partition(originals, p)]
        if flats:
            # ZeRO flat partitions: their layouts check what they hold when they bind
            tensor_parallel = None
            if group.get("tensor_parallel", "local") == "global" and any(tp.is_shard(p) for _, p in originals):
                tensor_parallel = self._tensor_parallel()
            return [ZeroPartition(method, group, flat, originals, self._layouts, self._whole_states,
                                  self._whole_weights, tensor_parallel) for flat in flats]
        if fsdp2.holds_dtensors(group):
            return [fsdp2.FSDP2Shards(method, group, gi, self._fsdp2_bindings)]
        items = [(param_label(group, gi, i), p) for i, p in enumerate(group["params"]) if p.grad is not None]
        for _, p in items:
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        shards = [(label, p) for label, p in items
                  if self._global_shard(group, p) or (self._splits(p) and self.is_compressed(group, p))]
        sharded = {id(p) for _, p in shards}
        whole = WholeTensors(method, group, [(label, p) for label, p in items if id(p) not in sharded])
        if not shards:
            return [whole]
        tensor_parallel = self._tensor_parallel() if any(self._global_shard(group, p) for _, p in shards) else None
        held = [(label, p, tensor_parallel.full_shape(label, p) if self._global_shard(group, p) else None)
                for label, p in shards]
        return [MegatronShards(method, group, held, tensor_parallel), whole]

    # -- Megatron tensor parallelism -----------------------------------------------------------

    def set_tensor_parallel_group(self, group) -> None:
        """The process group of the tensor-parallel ranks, for groups with
        ``tensor_parallel="global"`` (by default Megatron's, from ``megatron.core.parallel_state``)."""
        self._tp_group = group
        for param_group, originals in zip(self.param_groups, self._originals):
            for label, p in originals:
                if self._splits(p) and self.is_compressed(param_group, p):
                    self._check_blocks(param_group, label, p)

    def _check_blocks(self, group: dict, label: str, p: torch.Tensor) -> None:
        """A fused weight's blocks checked as the matrices they are (``megatron.check_blocks``),
        in global mode once the TP size is known."""
        world, global_shard = None, self._global_shard(group, p)
        if global_shard:
            tp_group = self._tp_group if self._tp_group is not None else tp.megatron_group()
            world = None if tp_group is None else dist.get_world_size(tp_group)
        megatron.check_blocks(self._method(), group, label, p, world, global_shard)

    def _global_shard(self, group: dict, p: torch.Tensor) -> bool:
        return group.get("tensor_parallel", "local") == "global" and tp.is_shard(p) and self.row_length(
            {**group, "within_adamw": False}, tuple(p.shape)) is not None

    def _tensor_parallel(self) -> tp.TensorParallel:
        group = self._tp_group if self._tp_group is not None else tp.megatron_group()
        if group is None:
            raise RuntimeError(
                "tensor_parallel='global' needs the tensor-parallel process group: initialize "
                "megatron.core.parallel_state, or call optimizer.set_tensor_parallel_group(group)")
        return tp.TensorParallel(group)

    # -- rows: the unit the placements cut parameters into ------------------------------------

    @classmethod
    def row_length(cls, group: dict, shape: tuple[int, ...]) -> int | None:
        """The unit a ZeRO partition is cut into for this optimizer's math (see ``placements.zero``):
        a matrix row, or the whole of a vector; ``None`` for a parameter left to AdamW."""
        if not cls.is_compressed_shape(group, shape):
            return None
        return shape[1] if len(shape) == 2 else math.prod(shape)

    @classmethod
    def row_axes(cls, group: dict, shape: tuple[int, ...]) -> dict[str, tuple[int, Callable[[int], int]]]:
        """How the state of a parameter splits with its rows: per state key that holds a part per
        row, its dimension and where row ``r`` starts along it; every other key is the same on
        each rank holding rows (replicated).  Checkpoint tools merge and re-cut state with it."""
        raise NotImplementedError

    @classmethod
    def column_axes(cls, group: dict, shape: tuple[int, ...]) -> dict[str, int]:
        """The state keys of a matrix that lie along its columns (the weight's dim 1) and the
        axis of each that does: the same on every rank holding rows, so the ranks holding rows
        of a split matrix keep them in blocks of columns (a ZeRO piece ``piece_columns``, an FSDP2
        rank torch.chunk's block).  None by default."""
        return {}

    @classmethod
    def column_block_axes(cls, group: dict, shape: tuple[int, ...]) -> dict[str, tuple[int, Callable[[int], int]]]:
        """``column_axes`` as ``row_axes`` entries: the block of a ZeRO piece owning rows from
        ``r`` on starts at its ``piece_columns``."""
        def columns(r: int) -> int:
            return cls.piece_columns(shape, r, 0)[0]
        return {key: (dim, columns) for key, dim in cls.column_axes(group, shape).items()}

    def _matrix_step(self, group: dict, matrices: list[Matrix], runner) -> None:
        """Update the rows held here of each matrix of ``matrices`` (``Matrix`` objects); buckets
        go through ``runner.run`` (``distributed.reducer.LocalRunner``), which runs each one's
        math (steps, ``distributed.reducer``) with the reducer over its holders."""
        raise NotImplementedError

    # -- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["skipped_steps"] = self.skipped_steps
        sd["optimizer"] = type(self).__name__      # what checkpoint tools need to read the rest
        # how each Megatron shard lies in its whole parameter, which the checkpoint tools need to
        # join the tensor-parallel ranks' files: label -> [partition_dim, partition_stride]
        sharded = {label: [int(p.partition_dim), int(getattr(p, "partition_stride", 1))]
                   for originals in self._originals for label, p in originals
                   if getattr(p, "tensor_model_parallel", False) and getattr(p, "partition_dim", None) is not None}
        if sharded:
            sd["tensor_parallel"] = sharded
        # the fused weights stepped as their blocks, and how: where the checkpoint tools find the
        # blocks' rows (``distributed.fused.blocks_of``)
        fused_layouts = {label: fused.record(p) for originals in self._originals for label, p in originals
                         if self._splits(p)}
        if fused_layouts:
            sd["fused"] = fused_layouts
        return sd

    def load_whole_state(self, states: dict[str, dict[str, torch.Tensor]],
                         weights: dict[str, torch.Tensor] | None = None, from_adam: bool = False) -> None:
        """Take each parameter's state as one process holds it (by parameter name, as
        ``ds_lowrank.checkpoint`` writes it), whatever world size and ZeRO stage saved it, and
        with ``weights`` its fp32 weights for the copies this optimizer updates (the master
        weights behind a bf16 model, which the model's own weights have rounded).

        ``from_adam``: ``states`` are Adam's (``exp_avg``, ``exp_avg_sq``, ``step``), as DeepSpeed's
        universal checkpoint holds them; the parameters this optimizer compresses start from
        them through ``state_from_adam``, the others keep them as their AdamW state.

        Parameters held whole here get it now; ZeRO partitions cut their pieces from it when
        they bind, at the first step.  Parameters missing from ``states`` start fresh.
        """
        weights = weights or {}
        for group, originals in zip(self.param_groups, self._originals):
            params = group["params"]
            whole = len(params) == len(originals) and not any(is_partition(originals, p) for p in params)
            for i, (label, original) in enumerate(originals):
                state = states.get(label)
                shape = tuple(getattr(original, "ds_shape", original.shape))
                if state is not None and from_adam:
                    state = self.state_from_adam(group, label, shape, state)
                if not whole:
                    if state is not None:
                        self._whole_states[label] = state
                    if label in weights:
                        self._whole_weights[label] = weights[label]
                    continue
                p = params[i]
                if state is not None:
                    self.state[p] = _copied(state, p.device)
                if label in weights:
                    with torch.no_grad():
                        p.copy_(weights[label])

    def state_from_adam(self, group: dict, label: str, shape: tuple[int, ...], adam: dict) -> dict:
        """This optimizer's state of parameter ``label`` of whole ``shape`` in ``group``, from
        Adam's state of it (``exp_avg``, ``exp_avg_sq`` of the whole parameter, ``step``): Adam's
        own for a parameter it keeps dense, else Adam's moments carried into its compressed
        state (LDAdam and GaLore; the others refuse, naming the way out)."""
        if self.row_length(group, shape) is None:
            return adam
        return self._state_from_adam(group, label, shape, adam)

    def _state_from_adam(self, group: dict, label: str, shape: tuple[int, ...], adam: dict) -> dict:
        """This optimizer's state of a parameter it compresses, from Adam's."""
        raise ValueError(
            f"{type(self).__name__} cannot start from Adam's state ({label}): its statistics have no "
            f"counterpart in Adam's; start it from the weights alone, with a fresh optimizer")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader, then every state tensor restored with its saved dtype."""
        saved_state = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            state_layout.restore_dtypes(saved_state.get(saved_id, {}), self.state[p])
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))


    # -- accounting ------------------------------------------------------------------------

    def state_bytes(self) -> dict[str, int]:
        """Bytes of persistent optimizer state held by this process, by category, and ``total``."""
        out = dict.fromkeys(CATEGORIES, 0)
        for st in self.state.values():
            for _, key, t in state_layout.tensors(st):
                out[self.state_categories.get(key, "counters")] += t.numel() * t.element_size()
        out["total"] = sum(out[c] for c in CATEGORIES)
        return out


def _copied(state: dict, device) -> dict:
    """A copy of ``state`` on ``device``; a fused weight's is per block, ``{block: {key: tensor}}``."""
    return {k: _copied(v, device) if isinstance(v, dict) else v.to(device).clone() for k, v in state.items()}
