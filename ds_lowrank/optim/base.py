"""What every ds_lowrank optimizer shares, apart from its math.

- Parameter selection: in a group whose ``lowrank`` key is true (the default), 2-D parameters
  take the low-rank path and everything else dense AdamW inside the same optimizer.
- Lazy, tensor-only state created in ``step()`` (wrappers such as DeepSpeed's swap parameter
  objects after construction).
- Skipping: a parameter whose gradient is all zero or not finite this step is left untouched,
  weight decay included, and counted in ``skipped_steps``.  DeepSpeed's construction-time
  dummy step (all-zero gradients) and fp16 overflow steps therefore change nothing.
- A ``load_state_dict`` that keeps every state tensor's dtype (torch's casts them to the
  parameter's dtype, which would round a float32 error-feedback buffer of a bf16 model).
- ``state_bytes()``: persistent state by category.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..distributed import tensor_parallel as tp
from ..distributed.reducer import LOCAL_RUNNER
from ..utils.profiling import phase
from .dense_adamw import adamw_step
from .matrix import Matrix
from .partitioned import bind, is_partition, step_partition

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
# what a piece of a ZeRO partition records about itself: not optimizer state
METADATA = ("range", "shape")
CATEGORIES = ("lowrank_moments", "bases", "error_feedback", "dense_moments", "counters")


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"invalid {key}={value!r}: expected {expected}")


def check_adam_hparams(group: dict) -> None:
    """Validate the AdamW hyperparameters every ds_lowrank optimizer has."""
    lr = group["lr"]
    _check(isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr >= 0, "lr", lr,
           "a non-negative float (a tensor lr is not supported)")
    betas = group["betas"]
    _check(isinstance(betas, (tuple, list)) and len(betas) == 2
           and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas),
           "betas", betas, "two floats in [0, 1), e.g. (0.908, 0.99)")
    eps = group["eps"]
    _check(isinstance(eps, (int, float)) and eps >= 0, "eps", eps, "a non-negative float")
    wd = group["weight_decay"]
    _check(isinstance(wd, (int, float)) and wd >= 0, "weight_decay", wd, "a non-negative float")
    lowrank = group.get("lowrank", True)
    _check(isinstance(lowrank, bool), "lowrank", lowrank, "True or False")
    mode = group.get("tensor_parallel", "local")
    _check(mode in tp.MODES, "tensor_parallel", mode, f"one of {tp.MODES}")


def param_label(group: dict, group_index: int, index: int) -> str:
    """The parameter's name if the group carries names, else its position."""
    names = group.get("param_names")
    if names is not None:
        return names[index]
    return f"param_groups[{group_index}]['params'][{index}]"


class LowRankOptimizer(torch.optim.Optimizer):
    """Base class; subclasses implement ``_check_group`` and ``_lowrank_step``."""

    # state key -> the category ``state_bytes()`` reports it under; subclasses extend it
    state_categories = STATE_CATEGORIES

    def __init__(self, params: Iterable, defaults: dict[str, Any]) -> None:
        self.skipped_steps = 0
        # Each group's parameters as constructed, before any wrapper swapped them for flat
        # partitions: the names and shapes a ZeRO partition is mapped back to.
        self._originals: list[list[tuple[str, torch.Tensor]]] = []
        self._layouts: dict[tuple, Any] = {}
        # label -> whole single-process state, waiting to be cut for ZeRO pieces (load_whole_state)
        self._whole_states: dict[str, dict] = {}
        self._whole_weights: dict[str, torch.Tensor] = {}
        # the Megatron tensor-parallel group of tensor_parallel="global" groups (set_tensor_parallel_group)
        self._tp_group = None
        super().__init__(params, defaults)

    # -- hyperparameters -------------------------------------------------------------------

    def _check_group(self, group: dict) -> None:
        check_adam_hparams(group)

    def _check_param(self, group: dict, label: str, p: torch.Tensor) -> None:
        """Refuse a parameter this group's settings cannot handle (e.g. rank too large); from
        its shape alone, so it also runs on ZeRO partitions at binding.  State that the settings
        no longer fit is refused in ``_matrix_step`` (see the subclasses' ``_check_state``)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._check_group(group)
        gi = len(self.param_groups) - 1
        group["group_index"] = gi
        self._originals.append([(param_label(group, gi, i), p) for i, p in enumerate(group["params"])])
        for label, p in self._originals[-1]:
            if self.is_lowrank(group, p) and not self._global_shard(group, p):
                self._check_param(group, label, p)     # a global shard is checked whole, at its step

    # whether a compressed group compresses only its matrices (the others take AdamW) or every
    # parameter (Adapprox's dense second moment, MicroAdam's elementwise method)
    matrices_only = True

    @classmethod
    def is_lowrank(cls, group: dict, p: torch.Tensor) -> bool:
        return cls.is_lowrank_shape(group, tuple(p.shape))

    @classmethod
    def is_lowrank_shape(cls, group: dict, shape: tuple[int, ...]) -> bool:
        return group.get("lowrank", True) and (len(shape) == 2 or not cls.matrices_only)

    # -- projected state ------------------------------------------------------------------

    @staticmethod
    def _state_dtype(p: torch.Tensor) -> torch.dtype:
        """Bases and moments in float32, or float64 for a float64 parameter."""
        return torch.promote_types(p.dtype, torch.float32)

    # the group key choosing the projection side, named when a change of it is refused
    side_key = "proj_side"

    def _check_state(self, group: dict, m: Matrix) -> None:
        """Refuse projected state the group's settings no longer fit (of the rows held here)."""
        st = m.state
        if "step" not in st:
            return
        if "basis" not in st:
            raise ValueError(
                f"{m.label}: it has taken dense AdamW steps, so its group cannot project it now "
                f"(its state has no basis)"
            )
        rank, (h, n) = group["rank"], m.weight.shape
        expected = (rank, n) if self.projects_right(group, m.shape) else (h, rank)
        if tuple(st["basis"].shape) != expected:
            raise ValueError(
                f"{m.label}: the group's rank/{self.side_key} no longer match its state (basis "
                f"{tuple(st['basis'].shape)}, expected {expected}); they cannot change once "
                f"the parameter has taken a step"
            )

    def _init_state(self, group: dict, m: Matrix) -> None:
        """Zero projected state (basis, two moments, step) for the ``h × n`` rows held of an
        ``m.shape`` matrix (all of it in one process), for optimizers with ``projects_right``."""
        h, n = m.weight.shape
        r = group["rank"]
        kw = dict(dtype=self._state_dtype(m.weight), device=m.weight.device)
        right = self.projects_right(group, m.shape)
        m.state["step"] = torch.zeros((), dtype=torch.float32)
        m.state["basis"] = torch.zeros((r, n) if right else (h, r), **kw)
        moment_shape = (h, r) if right else (r, n)
        m.state["proj_exp_avg"] = torch.zeros(moment_shape, **kw)
        m.state["proj_exp_avg_sq"] = torch.zeros(moment_shape, **kw)

    # -- the step --------------------------------------------------------------------------

    @staticmethod
    def _valid_gradients(grads: list[torch.Tensor]) -> list[bool]:
        """Per gradient: not all zero and all finite.  One host sync for the whole list."""
        if not grads:
            return []
        amax = torch.stack([n.float().cpu() if n.device != grads[0].device else n.float()
                            for n in torch._foreach_norm(grads, math.inf)])
        return ((amax > 0) & torch.isfinite(amax)).tolist()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            self._check_group(group)
            originals = self._originals[group.get("group_index", gi)]
            flats = [p for p in group["params"] if p.grad is not None and is_partition(originals, p)]
            if flats:
                for flat in flats:
                    self.skipped_steps += step_partition(self, group, flat, self._layout(group, flat, originals))
                continue
            items = [(i, p) for i, p in enumerate(group["params"]) if p.grad is not None]
            for _, p in items:
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            with phase("checks"):
                valid = self._valid_gradients([p.grad for _, p in items])
            valid = self._agree_on_shards(group, items, valid)
            self.skipped_steps += valid.count(False)
            items = [item for item, ok in zip(items, valid) if ok]
            dense = [p for _, p in items if not self.is_lowrank(group, p)]
            with phase("dense_adamw"):
                adamw_step(dense, [self.state[p] for p in dense], group)
            lowrank = [(param_label(group, gi, i), p) for i, p in items if self.is_lowrank(group, p)]
            if lowrank:
                self._lowrank_step(group, lowrank)
        return loss

    # -- Megatron tensor parallelism -----------------------------------------------------------

    def set_tensor_parallel_group(self, group) -> None:
        """The process group of the tensor-parallel ranks, for groups with
        ``tensor_parallel="global"`` (by default Megatron's, from ``megatron.core.parallel_state``)."""
        self._tp_group = group

    def _global_shard(self, group: dict, p: torch.Tensor) -> bool:
        return group.get("tensor_parallel", "local") == "global" and tp.is_shard(p) and self.row_length(
            group, tuple(p.shape)) is not None

    def _tensor_parallel(self) -> tp.TensorParallel:
        group = self._tp_group if self._tp_group is not None else tp.megatron_group()
        if group is None:
            raise RuntimeError(
                "tensor_parallel='global' needs the tensor-parallel process group: initialize "
                "megatron.core.parallel_state, or call optimizer.set_tensor_parallel_group(group)")
        return tp.TensorParallel(group)

    def _agree_on_shards(self, group: dict, items: list, valid: list[bool]) -> list[bool]:
        """Skip a global shard only if every TP rank skips it: they take the step's sums together."""
        shards = [k for k, (_, p) in enumerate(items) if self._global_shard(group, p)]
        if not shards:
            return valid
        flags = torch.tensor([0.0 if valid[k] else 1.0 for k in shards])
        skip = self._tensor_parallel().agree(flags).tolist()
        valid = list(valid)
        for k, s in zip(shards, skip):
            valid[k] = s == 0
        return valid

    def _lowrank_step(self, group: dict, params: list[tuple[str, torch.Tensor]]) -> None:
        """Parameters held here, each a ``Matrix``: whole, or a shard of a tensor-parallel matrix."""
        matrices, tensor_parallel = [], None
        for label, p in params:
            if self._global_shard(group, p):
                tensor_parallel = tensor_parallel or self._tensor_parallel()
                shape = tensor_parallel.full_shape(label, p)
                self._check_param(group, label, torch.empty(shape, device="meta"))
                matrices.append(Matrix(label, p, p.grad, self.state[p], shape, tensor_parallel.first(p),
                                       tensor_parallel.holders, ("tp", p.partition_dim), p.partition_dim))
            else:
                self._check_param(group, label, p)
                matrices.append(Matrix(label, p, p.grad, self.state[p], tuple(p.shape)))
        runner = tensor_parallel.runner(params[0][1].device) if tensor_parallel else LOCAL_RUNNER
        self._matrix_step(group, matrices, runner)

    # -- ZeRO partitions -------------------------------------------------------------------

    # whether ``_matrix_step`` and ``row_length`` are implemented, so the optimizer can step on
    # ZeRO flat partitions
    supports_zero_partitions = False

    @classmethod
    def row_length(cls, group: dict, shape: tuple[int, ...]) -> int | None:
        """The unit a ZeRO partition is cut into for this optimizer's math (see ``partitioned``):
        a matrix row, or the whole of a vector; ``None`` for a parameter left to AdamW."""
        if not cls.is_lowrank_shape(group, shape):
            return None
        return shape[1] if len(shape) == 2 else math.prod(shape)

    @classmethod
    def row_axes(cls, group: dict, shape: tuple[int, ...]) -> dict[str, tuple[int, Callable[[int], int]]]:
        """How the state of a parameter splits with its rows: per state key that holds a part per
        row, its dimension and where row ``r`` starts along it; every other key is the same on
        each rank holding rows (replicated).  Checkpoint tools merge and re-cut state with it.

        This is the projection optimizers' (``_init_state``): the error feedback by rows, and the
        basis (left projection) or the moments (right projection) by rows."""
        def rows(r: int) -> int:
            return r
        right = cls.projects_right(group, shape)
        keys = ("error", "proj_exp_avg", "proj_exp_avg_sq") if right else ("error", "basis")
        return {key: (0, rows) for key in keys}

    def _matrix_step(self, group: dict, matrices: list[Matrix], runner) -> None:
        """Update the rows held here of each matrix of ``matrices`` (``Matrix`` objects); buckets
        go through ``runner.run`` (``distributed.reducer.LocalRunner``), which gives each the
        reducer over its holders."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot step on ZeRO flat partitions; use ZeRO stage 0")

    def _layout(self, group: dict, flat: torch.Tensor, originals):
        """The partition map of ``flat``, bound the first time it is seen (a collective)."""
        key = (flat.untyped_storage().data_ptr(), flat.storage_offset(), flat.numel())
        if key not in self._layouts:
            if not self.supports_zero_partitions:
                raise NotImplementedError(
                    f"{type(self).__name__} cannot step on ZeRO flat partitions; use ZeRO stage 0")
            if group.get("tensor_parallel", "local") == "global" and any(tp.is_shard(p) for _, p in originals):
                raise NotImplementedError(
                    "tensor_parallel='global' does not run on ZeRO flat partitions yet: use "
                    "tensor_parallel='local' (each shard its own matrix) or ZeRO stage 0")
            layout = bind(originals, flat, lambda shape: self.row_length(group, shape))
            for label, qs in layout.holders.items():
                if label in layout.row_length:
                    self._check_param(group, label, torch.empty(qs[0].shape, device="meta"))
            self._layouts[key] = layout
        return self._layouts[key]

    # -- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["skipped_steps"] = self.skipped_steps
        sd["optimizer"] = type(self).__name__      # what checkpoint tools need to read the rest
        return sd

    def load_whole_state(self, states: dict[str, dict[str, torch.Tensor]],
                         weights: dict[str, torch.Tensor] | None = None, from_adam: bool = False) -> None:
        """Take each parameter's state as one process holds it (by parameter name, as
        ``ds_lowrank.checkpoint`` writes it), whatever world size and ZeRO stage saved it, and
        with ``weights`` its fp32 weights for the copies this optimizer updates (the master
        weights behind a bf16 model, which the model's own weights have rounded).

        ``from_adam``: ``states`` are Adam's (``exp_avg``, ``exp_avg_sq``, ``step``), as DeepSpeed's
        universal checkpoint holds them; the parameters this optimizer compresses start from
        them through ``_state_from_adam``, the others keep them as their AdamW state.

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
                if state is not None and from_adam and self.row_length(group, shape) is not None:
                    state = self._state_from_adam(group, label, shape, state)
                if not whole:
                    if state is not None:
                        self._whole_states[label] = state
                    if label in weights:
                        self._whole_weights[label] = weights[label]
                    continue
                p = params[i]
                if state is not None:
                    self.state[p] = {k: v.to(p.device).clone() for k, v in state.items()}
                if label in weights:
                    with torch.no_grad():
                        p.copy_(weights[label])

    def _state_from_adam(self, group: dict, label: str, shape: tuple[int, ...], adam: dict) -> dict:
        """This optimizer's state of a parameter it compresses, from Adam's."""
        raise ValueError(
            f"{type(self).__name__} cannot start from Adam's state ({label}): its statistics have no "
            f"counterpart in Adam's; start it from the weights alone, with a fresh optimizer")

    def _project_adam(self, group: dict, shape: tuple[int, ...], adam: dict) -> tuple[dict, torch.Tensor]:
        """For the projection optimizers: Adam's moments carried into the subspace
        (``checkpoint.adam``), as the state ``_init_state`` lays out, and the momentum the
        subspace cannot hold, in the weight's layout."""
        from ..checkpoint.adam import adam_to_subspace

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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader, then every state tensor restored with its saved dtype."""
        saved_state = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]

        def restore(saved: dict, loaded: dict) -> None:
            for key, value in saved.items():
                if isinstance(value, dict):
                    restore(value, loaded[key])
                elif isinstance(value, torch.Tensor) and loaded[key].dtype != value.dtype:
                    loaded[key] = value.to(device=loaded[key].device, copy=True)

        for saved_id, p in zip(saved_ids, params):
            restore(saved_state.get(saved_id, {}), self.state[p])
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))


    # -- accounting ------------------------------------------------------------------------

    def state_bytes(self) -> dict[str, int]:
        """Bytes of persistent optimizer state held by this process, by category, and ``total``."""
        out = dict.fromkeys(CATEGORIES, 0)

        def add(st: dict) -> None:
            for key, value in st.items():
                if isinstance(value, dict):        # the pieces of a ZeRO partition
                    add(value)
                elif isinstance(value, torch.Tensor) and key not in METADATA:
                    out[self.state_categories.get(key, "counters")] += value.numel() * value.element_size()

        for st in self.state.values():
            add(st)
        out["total"] = sum(out[c] for c in CATEGORIES)
        return out
