"""Tensor parallelism in the pretraining job: DeepSpeed's AutoTP on the Hugging Face Llama.

The size is DeepSpeed's own config key, ``"tensor_parallel": {"autotp_size": N}`` (``--tensor_parallel
N`` sets it).  DeepSpeed's engine then cuts the model: ``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj``,
``up_proj`` and ``lm_head`` by rows, ``o_proj`` and ``down_proj`` by columns, embeddings and norms
replicated; every shard is an ordinary matrix, which the optimizers step as one (``"local"`` mode).
Its device mesh is (data parallel, tensor parallel): ranks ``k*N .. k*N+N-1`` form one TP group,
ZeRO partitions over the ``world / N`` ranks of each data-parallel group, and the engine's ``mpu``
(``deepspeed.utils.groups``) answers for both.  Every rank of a TP group must read the same batch;
the data-parallel rank and size below are what the sampler uses instead of the global ones.
"""

from __future__ import annotations

import torch.distributed as dist

KEY = "tensor_parallel"


def tensor_parallel_size(ds_config: dict) -> int:
    """The config's AutoTP size (DeepSpeed reads 0, its default, as off): 1 without TP."""
    size = (ds_config.get(KEY) or {}).get("autotp_size", 0)
    return 1 if size == 0 else size


def check_tensor_parallel(ds_config: dict, flag: int | None, world: int, model_config, engine: str) -> int:
    """The run's TP size, with ``flag`` (``--tensor_parallel``) written into the config; a layout
    this job cannot run raises ``ValueError`` naming the fix."""
    section = ds_config.get(KEY)
    if section is not None and not isinstance(section, dict):
        raise ValueError(f'"{KEY}" must be an object such as {{"autotp_size": 2}}, not {section!r}')
    if flag is not None:
        if flag < 1:
            raise ValueError(f"--tensor_parallel must be at least 1, got {flag}")
        ds_config.setdefault(KEY, {})["autotp_size"] = flag
    size = tensor_parallel_size(ds_config)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f'"{KEY}": {{"autotp_size": {size!r}}} must be a positive integer (1: no tensor '
                         f'parallelism)')
    if size == 1:
        return 1
    if engine == "fsdp2":
        raise ValueError(f"tensor parallelism (size {size}) runs with --engine deepspeed (DeepSpeed's AutoTP); "
                         f"--engine fsdp2 shards over every rank without it: use --engine deepspeed, or "
                         f"--tensor_parallel 1")
    if world % size:
        raise ValueError(f"--tensor_parallel {size} does not divide the {world} ranks of this launch: launch a "
                         f"multiple of {size} ranks (TP {size} x DP k), or choose a size that divides {world}")
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    for count, what in ((heads, "num_attention_heads"), (kv_heads, "num_key_value_heads")):
        if count % size:
            raise ValueError(f"--tensor_parallel {size}: the model's {what} {count} does not divide by {size}, "
                             f"and each TP rank must hold whole attention heads; choose a TP size that divides "
                             f"{count}")
    if "train_batch_size" in ds_config:
        raise ValueError(f'"train_batch_size" with tensor parallelism: DeepSpeed counts it over every rank, '
                         f'the {size} ranks of a TP group (which read the same samples) included; state '
                         f'"train_micro_batch_size_per_gpu" and "gradient_accumulation_steps" instead')
    params = (ds_config.get("optimizer") or {}).get("params") or {}
    if params.get(KEY, "local") != "local":
        raise ValueError(f'optimizer param "{KEY}": {params[KEY]!r} with AutoTP: its shards carry no '
                         f'partition_dim, so each is stepped as a matrix of its own; remove the param (or set '
                         f'"local")')
    return size


def data_parallel_position(mpu) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size) of this rank: the engine's ``mpu`` when it has one
    (AutoTP, ``mpu=``), else the global rank and world size."""
    if mpu is None or not callable(getattr(mpu, "get_data_parallel_rank", None)):
        return dist.get_rank(), dist.get_world_size()
    return mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
