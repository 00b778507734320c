"""``ds_lowrank.initialize``: ``deepspeed.initialize`` with a ds_lowrank optimizer from the config."""

from __future__ import annotations

from ..utils.schedule import resolve_warmup
from .deepspeed_config import ConfigError, build_optimizer, check_zero_config, load_config


def initialize(model, config, model_parameters=None, mpu=None, **kwargs):
    """Like ``deepspeed.initialize``, reading ``"optimizer": {"type": "LDAdam", "params": {...}}``.

    The optimizer is built over ``model_parameters`` if given, else over the model's parameter
    groups (embeddings, LM head and non-matrix parameters dense), and handed to DeepSpeed as a
    client optimizer; it maps itself onto DeepSpeed's partitions at its first step.  A config
    without an ds_lowrank optimizer goes to DeepSpeed unchanged.  Returns what
    ``deepspeed.initialize`` returns: ``(engine, optimizer, dataloader, lr_scheduler)``.
    """
    import deepspeed

    config = resolve_warmup(load_config(config))   # "warmup_ratio" of the scheduler's total_num_steps
    section = config.get("optimizer")
    if section is None or str(section.get("type", "")).lower() in deepspeed_optimizers():
        return deepspeed.initialize(model=model, config=config, model_parameters=model_parameters,
                                    mpu=mpu, **kwargs)
    check_zero_config(config)
    optimizer = build_optimizer(model, config.pop("optimizer"), model_parameters)
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    if stage > 0 and not getattr(optimizer, "supports_zero_partitions", False):
        raise ConfigError(f"{type(optimizer).__name__} does not run on ZeRO partitions yet: "
                          f"use zero_optimization.stage 0, or LDAdam")
    # DeepSpeed refuses optimizers it has not tested under ZeRO unless told otherwise, and insists
    # on its own CPU Adam for offloaded partitions unless told otherwise.
    config["zero_allow_untested_optimizer"] = True
    if ((config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device") == "cpu":
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    return deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=mpu, **kwargs)


def deepspeed_optimizers() -> set[str]:
    """Optimizer type names DeepSpeed builds itself (lower case)."""
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
    return {name.lower() for name in DEEPSPEED_OPTIMIZERS}
