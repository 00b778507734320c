"""``ds_lowrank.initialize`` and ``register_deepspeed_optimizers``: ds_lowrank's optimizers named in
a DeepSpeed config.

DeepSpeed builds only the optimizer types it knows.  Two ways around that:

- :func:`initialize` takes the ``"optimizer"`` section out of the config, builds the optimizer
  itself and hands it to ``deepspeed.initialize`` as a client optimizer;
- :func:`register_deepspeed_optimizers` (an explicit opt-in, nothing happens on import) teaches
  DeepSpeed's engine the four type names, so that ``deepspeed.initialize`` and everything built
  on it (HF Trainer's DeepSpeed integration, accelerate's ``DummyOptim``) build them.
"""

from __future__ import annotations

from ..utils.schedule import resolve_warmup
import functools
import warnings

from ..distributed.tensor_parallel import as_deepspeed_mpu
from ..optim.placements.megatron import refuse_on_partitions
from ..param_groups import unwrap, warn_lowrank_embeddings
from .deepspeed_config import (OPTIMIZERS, ConfigError, build_optimizer, check_auto_values, check_zero_config,
                               load_config)

# DeepSpeed versions whose engine the registration is written against (see _patch_engine)
SUPPORTED_DEEPSPEED = ((0, 19), (0, 20))   # [first, last) major.minor
_registered: dict[str, object] = {}


def _resolve_config(args, config, config_params):
    """The config ``deepspeed.initialize`` would read, from the same three places: ``config``,
    ``config_params`` (its older name) or ``args.deepspeed_config`` (``args.deepscale_config``)."""
    if config is not None and config_params is not None:
        raise ConfigError("pass the DeepSpeed config once: config=... or config_params=..., not both")
    config = config if config is not None else config_params
    from_args = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if from_args is not None:
        if config is not None:
            raise ConfigError("a DeepSpeed config was given both in args.deepspeed_config and as config=: "
                              "pass one")
        config = from_args
    if config is None:
        raise ConfigError("no DeepSpeed config: pass config=<dict or JSON path>, config_params=..., or "
                          "args with a deepspeed_config field (--deepspeed_config)")
    return config


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None,
               lr_scheduler=None, distributed_port=None, mpu=None, dist_init_required=None,
               collate_fn=None, config=None, mesh_param=None, config_params=None):
    """``deepspeed.initialize``, with the same arguments in the same order, reading
    ``"optimizer": {"type": "LDAdam", "params": {...}}`` (or GaLoreAdamW, Adapprox, MicroAdam).

    The optimizer is built over ``model_parameters`` if given, else over
    ``lowrank_param_groups(model)`` (embeddings, LM head and non-matrix parameters dense), and
    handed to DeepSpeed as a client optimizer; it maps itself onto DeepSpeed's partitions at its
    first step.  A config with one of DeepSpeed's own optimizers, or none, goes to DeepSpeed
    unchanged.  Returns ``(engine, optimizer, dataloader, lr_scheduler)``.
    """
    import deepspeed
    from torch import nn

    if isinstance(args, nn.Module) and model is not None and not isinstance(model, nn.Module) and config is None:
        # the earlier form initialize(model, config): DeepSpeed's order is (args, model, ...)
        warnings.warn("ds_lowrank.initialize(model, config) is deprecated: it takes deepspeed.initialize's "
                      "arguments in their order; pass model=..., config=...", DeprecationWarning, stacklevel=2)
        args, model, config = None, args, model
    if model is None:
        raise ConfigError("ds_lowrank.initialize requires a model")
    # "warmup_ratio" of the scheduler's total_num_steps
    config = resolve_warmup(load_config(_resolve_config(args, config, config_params)))
    if args is not None and (getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)):
        # DeepSpeed refuses a config given both ways; hand it over as config= only
        args = _without_config(args)
    try:
        # megatron-core's parallel_state as it is: DeepSpeed asks for more than it has
        mpu = as_deepspeed_mpu(mpu)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    passed = dict(args=args, training_data=training_data, lr_scheduler=lr_scheduler, mpu=mpu,
                  dist_init_required=dist_init_required, collate_fn=collate_fn, mesh_param=mesh_param)
    if distributed_port is not None:
        passed["distributed_port"] = distributed_port
    section = config.get("optimizer")
    if section is None or str(section.get("type", "")).lower() not in OPTIMIZERS:
        engine_parts = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=model_parameters,
                                            config=config, **passed)
        if optimizer is not None:
            warn_lowrank_embeddings(engine_parts[0].basic_optimizer, model, "the DeepSpeed client optimizer")
        return engine_parts
    if optimizer is not None:
        raise ConfigError(f'both an optimizer and an "optimizer" section of type {section.get("type")!r} '
                          f'were given: remove one')
    check_auto_values(section)
    check_zero_config(config)
    optimizer = build_optimizer(model, config.pop("optimizer"), model_parameters)
    _check_zero_support(optimizer, config)
    if mpu is not None:
        optimizer.set_tensor_parallel_group(mpu.get_tensor_model_parallel_group())
    warn_lowrank_embeddings(optimizer, model, "model_parameters passed to ds_lowrank.initialize")
    # DeepSpeed refuses optimizers it has not tested under ZeRO unless told otherwise, and insists
    # on its own CPU Adam for offloaded partitions unless told otherwise.
    config["zero_allow_untested_optimizer"] = True
    if ((config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device") == "cpu":
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    return deepspeed.initialize(model=model, optimizer=optimizer, config=config, **passed)


def _without_config(args):
    import copy

    args = copy.copy(args)
    for key in ("deepspeed_config", "deepscale_config"):
        if hasattr(args, key):
            setattr(args, key, None)
    return args


def _check_zero_support(optimizer, config: dict) -> None:
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    if stage > 0:
        for gi, group in enumerate(optimizer.param_groups):
            try:
                refuse_on_partitions(optimizer, group, optimizer.originals(group, gi))
            except NotImplementedError as err:
                raise ConfigError(str(err)) from None


def deepspeed_optimizers() -> set[str]:
    """Optimizer type names DeepSpeed builds itself (lower case)."""
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
    return {name.lower() for name in DEEPSPEED_OPTIMIZERS}


# -- registration ------------------------------------------------------------------------------


def _deepspeed_version() -> tuple[int, int]:
    import deepspeed

    parts = deepspeed.__version__.split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def register_deepspeed_optimizers() -> None:
    """Make ``"type": "LDAdam"`` (``GaLoreAdamW``/``GaLore``, ``Adapprox``, ``MicroAdam``) in a
    DeepSpeed config build ds_lowrank's optimizer wherever DeepSpeed's engine reads the config:
    ``deepspeed.initialize``, HF Trainer with ``deepspeed=...``, accelerate's ``DummyOptim``.

    Call it once per process before the engine is created.  It wraps three methods of
    ``DeepSpeedEngine`` (the type-name check, the builder of config optimizers, and the optimizer
    set-up, which then also warns when a ds_lowrank optimizer compresses an embedding).  DeepSpeed's
    own types are untouched.  The optimizer is built over ``lowrank_param_groups(model)`` when
    DeepSpeed is given the model's whole parameter list (or none), over the groups given
    otherwise.  Refused, naming the versions, on a DeepSpeed whose engine it was not written for.
    """
    if _registered:
        return
    from deepspeed.runtime.engine import DeepSpeedEngine

    version = _deepspeed_version()
    low, high = SUPPORTED_DEEPSPEED
    needed = ("_is_supported_optimizer", "_configure_basic_optimizer", "_configure_optimizer",
              "optimizer_name", "optimizer_params")
    missing = [m for m in needed if not callable(getattr(DeepSpeedEngine, m, None))]
    if not (low <= version < high) or missing:
        import deepspeed
        raise RuntimeError(
            f"ds_lowrank.register_deepspeed_optimizers supports DeepSpeed {low[0]}.{low[1]}.x, not "
            f"{deepspeed.__version__}{f' (its engine lacks {missing})' if missing else ''}: install "
            f"deepspeed>=0.19.8,<0.20, or build the optimizer with ds_lowrank.initialize(...) or "
            f"pass an instance: deepspeed.initialize(model=..., optimizer=LDAdam(lowrank_param_groups(model)))")
    _registered.update({m: DeepSpeedEngine.__dict__[m] for m in needed[:3]})

    original_supported = _registered["_is_supported_optimizer"]
    original_basic = _registered["_configure_basic_optimizer"]
    original_configure = _registered["_configure_optimizer"]

    @functools.wraps(original_supported)
    def _is_supported_optimizer(self, optimizer_name):
        return _ours(optimizer_name) or original_supported(self, optimizer_name)

    @functools.wraps(original_basic)
    def _configure_basic_optimizer(self, model_parameters):
        if not _ours(self.optimizer_name()):
            return original_basic(self, model_parameters)
        return _build_for_engine(self, model_parameters)

    @functools.wraps(original_configure)
    def _configure_optimizer(self, client_optimizer, model_parameters):
        result = original_configure(self, client_optimizer, model_parameters)
        basic = getattr(self, "basic_optimizer", None)
        route = ("the DeepSpeed config" if client_optimizer is None else
                 "a client optimizer passed to deepspeed.initialize" if not callable(client_optimizer)
                 or hasattr(client_optimizer, "param_groups") else "a callable passed to deepspeed.initialize")
        warn_lowrank_embeddings(basic, self.module, route)
        return result

    DeepSpeedEngine._is_supported_optimizer = _is_supported_optimizer
    DeepSpeedEngine._configure_basic_optimizer = _configure_basic_optimizer
    DeepSpeedEngine._configure_optimizer = _configure_optimizer


def unregister_deepspeed_optimizers() -> None:
    """Undo :func:`register_deepspeed_optimizers` (engines created later refuse the type names again)."""
    if not _registered:
        return
    from deepspeed.runtime.engine import DeepSpeedEngine

    for name, method in _registered.items():
        setattr(DeepSpeedEngine, name, method)
    _registered.clear()


def deepspeed_optimizers_registered() -> bool:
    return bool(_registered)


def _ours(name) -> bool:
    return isinstance(name, str) and name.lower() in OPTIMIZERS


def _whole_model_list(model_parameters, module) -> bool:
    """Whether ``model_parameters`` is just the model's parameters (all, or all trainable ones),
    as DeepSpeed, HF Trainer and accelerate's ``DummyOptim`` pass them when the user chose nothing."""
    if model_parameters is None:
        return True
    params = list(model_parameters)
    if any(isinstance(p, dict) for p in params):
        return False
    given = {id(p) for p in params}
    every = {id(p) for p in module.parameters()}
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    return trainable <= given <= every


def _build_for_engine(engine, model_parameters):
    """A ds_lowrank optimizer from the engine's config, in the engine's optimizer set-up."""
    section = {"type": engine.optimizer_name(), "params": dict(engine.optimizer_params() or {})}
    check_auto_values(section, registered=True)
    raw = getattr(engine._config, "_param_dict", None) or {}
    check_zero_config(raw)
    model = unwrap(engine.module)
    if model_parameters is not None and not isinstance(model_parameters, list):
        model_parameters = list(model_parameters)
    given = None if _whole_model_list(model_parameters, model) else model_parameters
    optimizer = build_optimizer(model, section, given)
    _check_zero_support(optimizer, {"zero_optimization": {"stage": engine.zero_optimization_stage()}})
    # as ds_lowrank.initialize: the ZeRO wrappers accept this optimizer
    engine._config.zero_allow_untested_optimizer = True
    return optimizer
