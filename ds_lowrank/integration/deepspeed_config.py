"""The DeepSpeed config's ``"optimizer"`` section for ds_lowrank's optimizers, and what is refused.

DeepSpeed itself rejects optimizer types it does not know, so :func:`ds_lowrank.initialize` takes
the section out, builds the optimizer, and hands it to DeepSpeed as a client optimizer.
"""

from __future__ import annotations

import inspect
import json
import os

from ..optim import Adapprox, GaLoreAdamW, LDAdam, MicroAdam
from ..param_groups import lowrank_param_groups

# type name (lower case) -> optimizer class
OPTIMIZERS = {"ldadam": LDAdam, "adapprox": Adapprox, "microadam": MicroAdam, "galore": GaLoreAdamW,
              "galoreadamw": GaLoreAdamW}

# keys of "params" that go to lowrank_param_groups rather than to the optimizer (within_adamw: a
# key of the compressed group, see ds_lowrank.optim.base)
GROUPING_KEYS = ("dense_patterns", "within_adamw")


class ConfigError(ValueError):
    """A DeepSpeed config ds_lowrank cannot run, with the reason and the fix."""


def load_config(config: str | os.PathLike | dict) -> dict:
    """A DeepSpeed config as a dict (a copy), from a dict or a JSON file path."""
    if isinstance(config, dict):
        return json.loads(json.dumps(config))
    with open(config) as f:
        return json.load(f)


def optimizer_class(section: dict) -> type:
    kind = section.get("type")
    if not isinstance(kind, str) or kind.lower() not in OPTIMIZERS:
        known = ", ".join(sorted(c.__name__ for c in OPTIMIZERS.values()))
        raise ConfigError(f'unknown optimizer type {kind!r}: use one of {known} (case-insensitive), '
                          f'or one of DeepSpeed\'s own (Adam, AdamW, ...)')
    return OPTIMIZERS[kind.lower()]


def optimizer_options(cls: type, params: dict) -> tuple[dict, dict]:
    """Split ``params`` into constructor options and grouping options; refuse unknown keys."""
    valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")]
    unknown = sorted(set(params) - set(valid) - set(GROUPING_KEYS))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} params {unknown}: valid ones are "
                          f"{sorted(valid + list(GROUPING_KEYS))}")
    options = {k: v for k, v in params.items() if k not in GROUPING_KEYS}
    if "betas" in options and isinstance(options["betas"], list):
        options["betas"] = tuple(options["betas"])
    return options, {k: params[k] for k in GROUPING_KEYS if k in params}


def build_optimizer(model, section: dict, model_parameters=None):
    """The optimizer a config section describes, over ``model_parameters`` or the model's
    parameter groups (embeddings, LM head and non-matrix parameters dense)."""
    cls = optimizer_class(section)
    options, grouping = optimizer_options(cls, section.get("params", {}))
    try:
        if model_parameters is not None:
            return cls(model_parameters, **options)
        return cls(lowrank_param_groups(model, **grouping), **options)
    except ValueError as err:
        raise ConfigError(f"optimizer params: {err}") from err


def check_zero_config(config: dict) -> None:
    """Refuse the ZeRO settings under which the partition map cannot be trusted."""
    zero = config.get("zero_optimization", {}) or {}

    def device(key):
        return (zero.get(key) or {}).get("device", "none")

    refusals = [
        (zero.get("round_robin_gradients", False),
         "zero_optimization.round_robin_gradients=true: DeepSpeed 0.19 then links parameters to the "
         "wrong partition offsets (its own safe_get_full_* returns wrong values); set it to false"),
        (zero.get("elastic_checkpoint", False),
         "zero_optimization.elastic_checkpoint=true: elastic checkpoints re-cut the optimizer state as if "
         "it were Adam's; set it to false and convert checkpoints with ds_lowrank's tools"),
        (device("offload_optimizer") == "nvme",
         "zero_optimization.offload_optimizer.device=nvme: the state is swapped in and out per sub-group "
         "behind the optimizer's back; use device none"),
        (device("offload_param") == "nvme",
         "zero_optimization.offload_param.device=nvme: the partition map is checked against parameters "
         "that are then on disk; use device none or cpu"),
        ((zero.get("mics_shard_size", -1) or -1) > 0,
         "zero_optimization.mics_shard_size: MiCS shards over sub-groups the partition map does not "
         "follow; remove it"),
        (bool(zero.get("zenflow")),
         "zero_optimization.zenflow: ZenFlow re-lays parameters out column-major and steps them on "
         "the CPU; remove it"),
        (bool(zero.get("super_offload")),
         "zero_optimization.super_offload: not supported; remove it"),
    ]
    for bad, reason in refusals:
        if bad:
            raise ConfigError(f"ds_lowrank cannot run with {reason}")
