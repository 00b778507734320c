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
GROUPING_KEYS = ("dense_patterns", "within_adamw", "target_modules")
# keys of the "optimizer" section DeepSpeed reads
SECTION_KEYS = ("type", "params", "legacy_fusion")
ZERO_STAGES = (0, 1, 2, 3)
# zero_optimization settings check_zero_config reads: true/false flags, and offload objects
ZERO_FLAGS = ("round_robin_gradients", "elastic_checkpoint")
ZERO_OFFLOADS = ("offload_optimizer", "offload_param")
EXAMPLE_SECTION = '{"type": "LDAdam", "params": {"lr": 0.001, "rank": 64}}'


class ConfigError(ValueError):
    """A DeepSpeed config ds_lowrank cannot run, with the reason and the fix."""


def load_config(config: str | os.PathLike | dict) -> dict:
    """A DeepSpeed config as a dict (a copy), from a dict or a JSON file path; the sections
    ds_lowrank reads (optimizer, zero_optimization, scheduler) are checked for their structure."""
    if isinstance(config, dict):
        config = json.loads(json.dumps(config))
    elif isinstance(config, (str, os.PathLike)):
        with open(config, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"{config} is not a JSON text file (byte {err.start} is not UTF-8 text); "
                              f"pass a DeepSpeed JSON config such as configs/ldadam_zero2.json") from None
        config = json.loads(text)
    else:
        raise ConfigError(f"a DeepSpeed config is a dict or the path of a JSON file, not "
                          f"{type(config).__name__}")
    check_config(config)
    return config


def _kind(value) -> str:
    """What a JSON value is, for messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def check_config(config: dict) -> None:
    """Refuse a config whose optimizer, zero_optimization or scheduler section is not shaped the
    way DeepSpeed reads it (a list for an object, a string for a number), naming the fix."""
    if not isinstance(config, dict):
        raise ConfigError(f"a DeepSpeed config is a JSON object of settings, not {_kind(config)}")
    if config.get("optimizer") is not None:
        check_optimizer_section(config["optimizer"])
    zero_section(config)
    scheduler = config.get("scheduler")
    if scheduler is not None and not (isinstance(scheduler, dict)
                                      and isinstance(scheduler.get("params", {}), dict)):
        raise ConfigError(f'"scheduler" must be an object such as {{"type": "WarmupCosineLR", "params": '
                          f'{{"warmup_num_steps": 100}}}} with "params" an object, not {scheduler!r}')


def check_optimizer_section(section) -> None:
    """The "optimizer" section is one object of "type" and "params" (an object of options)."""
    if not isinstance(section, dict):
        hint = ""
        if isinstance(section, list) and len(section) == 1 and isinstance(section[0], dict):
            hint = "; remove the [ ] around it (one optimizer per config)"
        raise ConfigError(f'the "optimizer" section must be one object such as {EXAMPLE_SECTION}, '
                          f'not {_kind(section)}{hint}')
    unknown = sorted(set(section) - set(SECTION_KEYS))
    if unknown:
        raise ConfigError(f'unknown keys {unknown} in the "optimizer" section: it holds "type" and "params", '
                          f'and the optimizer\'s options go inside "params", as in {EXAMPLE_SECTION}')
    params = section.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f'"optimizer.params" must be an object of the optimizer\'s options such as '
                          f'{{"lr": 0.001, "rank": 64}}, not {_kind(params)}')


def optimizer_class(section: dict) -> type:
    check_optimizer_section(section)
    kind = section.get("type")
    if not isinstance(kind, str) or kind.lower() not in OPTIMIZERS:
        names = {cls: cls.__name__ for cls in OPTIMIZERS.values()}
        aliases = [f"{key} for {names[cls]}" for key, cls in OPTIMIZERS.items() if key != names[cls].lower()]
        known = ", ".join(sorted(names.values()))
        raise ConfigError(f'unknown optimizer type {kind!r}: use one of {known} (case-insensitive; '
                          f'{", ".join(aliases)}), or one of DeepSpeed\'s own (Adam, AdamW, ...)')
    return OPTIMIZERS[kind.lower()]


def optimizer_options(cls: type, params: dict) -> tuple[dict, dict]:
    """Split ``params`` into constructor options and grouping options; refuse unknown keys."""
    valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")]
    unknown = sorted(set(params) - set(valid) - set(GROUPING_KEYS))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} params {unknown}: valid ones are "
                          f"{sorted(valid + list(GROUPING_KEYS))}")
    options = {k: v for k, v in params.items() if k not in GROUPING_KEYS}
    return options, {k: params[k] for k in GROUPING_KEYS if k in params}


def check_auto_values(section: dict, registered: bool = False) -> None:
    """Refuse ``"auto"`` in the optimizer's params, saying who fills it and what to write instead."""
    auto = sorted(k for k, v in (section.get("params") or {}).items() if isinstance(v, str) and v == "auto")
    if not auto:
        return
    where = ("DeepSpeed got the config as it is" if registered else
             "ds_lowrank.initialize reads the config as it is")
    raise ConfigError(
        f'optimizer params {auto} are "auto": HF Trainer (deepspeed=... in TrainingArguments) and accelerate '
        f'fill "auto" values from their own arguments when they own the config, but {where}. Write '
        f'numbers instead (e.g. "lr": 0.001, "betas": [0.908, 0.99], "eps": 1e-8, "weight_decay": 0.0), or '
        f'let the Trainer/accelerate own the config after ds_lowrank.register_deepspeed_optimizers()')


def build_optimizer(model, section: dict, model_parameters=None):
    """The optimizer a config section describes, over ``model_parameters`` or the model's
    parameter groups (embeddings, LM head and non-matrix parameters dense)."""
    cls = optimizer_class(section)
    check_auto_values(section)
    options, grouping = optimizer_options(cls, section.get("params", {}))
    if model_parameters is not None and grouping:
        raise ConfigError(f"optimizer params {sorted(grouping)} choose the parameter groups from the model, "
                          f"but model_parameters were passed: put those options in the groups you pass, "
                          f"or leave model_parameters out")
    try:
        if model_parameters is not None:
            return cls(model_parameters, **options)
        return cls(lowrank_param_groups(model, **grouping), **options)
    except ValueError as err:
        raise ConfigError(f"optimizer params: {err}") from err


def zero_section(config: dict) -> dict:
    """The "zero_optimization" section ({} without one), refused if a setting ds_lowrank reads
    has the wrong kind of value (a stage "2" or 7, a string for true/false)."""
    if not isinstance(config, dict):
        raise ConfigError(f"a DeepSpeed config is a JSON object of settings, not {_kind(config)}")
    zero = config.get("zero_optimization")
    if zero is None:
        return {}
    if not isinstance(zero, dict):
        raise ConfigError(f'"zero_optimization" must be an object such as {{"stage": 2}}, not {zero!r}')
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in ZERO_STAGES or not isinstance(stage, int):
        hint = f' (a number, not a string: "stage": {stage})' if isinstance(stage, str) else ""
        raise ConfigError(f"zero_optimization.stage={stage!r} is not a ZeRO stage: use 0, 1, 2 or 3{hint}")
    for key in ZERO_FLAGS:
        if not isinstance(zero.get(key, False), bool):
            raise ConfigError(f"zero_optimization.{key}={zero[key]!r}: use true or false (a JSON boolean)")
    for key in ZERO_OFFLOADS:
        if not isinstance(zero.get(key) or {}, dict):
            raise ConfigError(f'zero_optimization.{key}={zero[key]!r}: use an object such as '
                              f'{{"device": "cpu"}}')
    shards = zero.get("mics_shard_size", -1)
    if shards is not None and (isinstance(shards, bool) or not isinstance(shards, int)):
        raise ConfigError(f"zero_optimization.mics_shard_size={shards!r}: use an integer (or leave it out)")
    return zero


def check_zero_config(config: dict) -> None:
    """Refuse the ZeRO settings under which the partition map cannot be trusted."""
    zero = zero_section(config)

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
