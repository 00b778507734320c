"""Megatron tensor-parallel shards, stepped on their own or as parts of the whole matrix.

Megatron marks a sharded weight with ``tensor_model_parallel=True`` and ``partition_dim``: 0 for a
column-parallel layer (the weight's rows are split between the TP ranks), 1 for a row-parallel one
(its columns).  A group's ``tensor_parallel`` key chooses what an optimizer makes of them:

- ``"local"`` (the default): each shard is a matrix of its own, with its own subspace (or
  factorization), and nothing is communicated.  Results depend on the TP size.
- ``"global"``: a shard is the rows or columns this rank holds of the whole matrix; the
  algorithms' small sums go over the TP group, as for a ZeRO partition, so every TP size gives the
  result of one process stepping the whole matrix.

MicroAdam is elementwise; its shards are always stepped on their own.

The same two modes apply to torch's tensor parallelism under FSDP2 (``parallelize_module`` with
``ColwiseParallel`` / ``RowwiseParallel``, then ``fully_shard``), whose DTensor placements say
what Megatron's attributes say here; ``optim.fsdp2`` reads them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import all_reduce
from .phases import SplitRunner

MODES = ("local", "global")


def is_shard(p: torch.Tensor) -> bool:
    """A Megatron tensor-parallel shard of a matrix."""
    return bool(getattr(p, "tensor_model_parallel", False)) and p.dim() == 2


def megatron_group():
    """Megatron's tensor-parallel process group, once ``megatron.core.parallel_state`` has one."""
    try:
        from megatron.core import parallel_state
    except ImportError:
        return None
    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_tensor_model_parallel_group()


class TensorParallel:
    """The TP group and what a shard is of the whole matrix."""

    def __init__(self, group) -> None:
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.holders = tuple(range(self.world))

    def full_shape(self, label: str, p: torch.Tensor) -> tuple[int, int]:
        dim = getattr(p, "partition_dim", None)
        if dim not in (0, 1):
            raise ValueError(f"{label}: a tensor-parallel shard must have partition_dim 0 or 1, not {dim!r}")
        shape = list(p.shape)
        shape[dim] *= self.world
        return tuple(shape)

    def first(self, p: torch.Tensor) -> int:
        """The first row (column, for a row-parallel shard) of the whole matrix held here."""
        return self.rank * p.shape[p.partition_dim]

    def agree(self, flags: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum of ``flags`` over the TP ranks, so all skip the same shards."""
        return all_reduce(flags, self.group, op=dist.ReduceOp.MAX, purpose="valid")

    def runner(self) -> SplitRunner:
        return SplitRunner(lambda holders: self.group)


# -- Megatron's parallel_state as DeepSpeed's ``mpu`` ------------------------------------------

# what DeepSpeed's engine, ZeRO and checkpointing call on an ``mpu`` (Megatron-DeepSpeed's names)
DEEPSPEED_MPU = ("get_model_parallel_world_size", "get_model_parallel_rank", "get_model_parallel_group",
                 "get_data_parallel_world_size", "get_data_parallel_rank", "get_data_parallel_group",
                 "get_tensor_model_parallel_world_size", "get_tensor_model_parallel_rank",
                 "get_tensor_model_parallel_group")


class MegatronMPU:
    """megatron-core's ``parallel_state`` answering as DeepSpeed asks an ``mpu``.

    DeepSpeed reads the data-parallel group (what ZeRO partitions over and averages gradients
    in), the tensor-parallel group (gradient norms of sharded parameters, checkpoints) and a
    "model-parallel" group, which in Megatron-DeepSpeed is the tensor-parallel one (checkpoint
    files ``mp_rank_XX``, the model-parallel reduction of gradient norms).  megatron-core's own
    ``get_model_parallel_group`` also spans the pipeline stages; with the pipeline size 1 that
    :func:`as_deepspeed_mpu` requires, the two are the same ranks.
    """

    def __init__(self, parallel_state) -> None:
        self.ps = parallel_state

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_src_rank()

    get_model_parallel_group = get_tensor_model_parallel_group
    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.ps.get_pipeline_model_parallel_world_size()


def as_deepspeed_mpu(mpu):
    """``mpu`` as DeepSpeed can use it: an object that already answers DeepSpeed's calls as it is,
    megatron-core's ``parallel_state`` through :class:`MegatronMPU`; refused, with the reason,
    when it is neither or when its layout is one this package does not run (pipeline or
    context parallelism)."""
    if mpu is None or all(callable(getattr(mpu, name, None)) for name in DEEPSPEED_MPU):
        return mpu
    if not callable(getattr(mpu, "model_parallel_is_initialized", None)) or not callable(
            getattr(mpu, "get_tensor_model_parallel_group", None)):
        missing = [name for name in DEEPSPEED_MPU if not callable(getattr(mpu, name, None))]
        raise ValueError(f"mpu={mpu!r} is neither megatron.core.parallel_state nor an object with DeepSpeed's "
                         f"mpu methods (it lacks {missing})")
    if not mpu.model_parallel_is_initialized():
        raise ValueError("mpu=parallel_state: megatron-core's model-parallel groups are not set up; call "
                         "parallel_state.initialize_model_parallel(tensor_model_parallel_size=...) first")
    pipeline = mpu.get_pipeline_model_parallel_world_size()
    if pipeline != 1:
        raise ValueError(f"mpu=parallel_state with pipeline_model_parallel_size={pipeline}: ds_lowrank runs "
                         f"tensor and data parallelism only (DeepSpeed trains a pipeline through its own "
                         f"PipelineModule engine, which these optimizers are not tested with); use "
                         f"pipeline_model_parallel_size=1")
    context = mpu.get_context_parallel_world_size() if callable(
        getattr(mpu, "get_context_parallel_world_size", None)) else 1
    if context != 1:
        raise ValueError(f"mpu=parallel_state with context_parallel_size={context}: DeepSpeed's ZeRO would "
                         f"partition over the data-parallel group without the context-parallel ranks that "
                         f"share its gradients; use context_parallel_size=1")
    return MegatronMPU(mpu)
