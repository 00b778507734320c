"""What a checkpoint of a pretraining run records about its settings, and what a resume may
change: the plain hyperparameters are applied, a change the saved state cannot follow is refused
(``InputError``) before training, naming each one."""

from __future__ import annotations

import argparse
import inspect
import json
import os
from pathlib import Path

import torch

from .. import checkpoint
from ..integration.deepspeed import deepspeed_optimizers
from ..integration.deepspeed_config import ConfigError, optimizer_class
from .run_inputs import InputError, check_inputs

# Optimizer params that are plain hyperparameters: a resume applies their new values.  Every other
# param (rank, error_feedback, ef_dtype, proj_side, ...) shaped the saved state and must not change.
HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")
MODEL_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "tie_word_embeddings")


def precision_of(ds_config: dict) -> str:
    for name, key in (("bf16", "bf16"), ("bf16", "bfloat16"), ("fp16", "fp16")):
        if (ds_config.get(key) or {}).get("enabled", False) is True:
            return name
    return "fp32"


def global_batch_of(ds_config: dict, world: int) -> int:
    """Samples per optimizer step, as DeepSpeed derives it from the config and the world size."""
    if ds_config.get("train_batch_size") is not None:
        return int(ds_config["train_batch_size"])
    return (int(ds_config.get("train_micro_batch_size_per_gpu") or 1)
            * int(ds_config.get("gradient_accumulation_steps") or 1) * world)


def optimizer_settings(section: dict) -> tuple[str, dict]:
    """The optimizer's type and its params with the class defaults filled in, as JSON values."""
    params = dict(section.get("params") or {})
    try:
        cls = optimizer_class(section)
    except ConfigError:                      # one of DeepSpeed's own: its params as given
        return str(section.get("type")), json.loads(json.dumps(params))
    defaults = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                if name not in ("self", "params") and p.default is not inspect.Parameter.empty}
    return cls.__name__, json.loads(json.dumps({**defaults, **params}, default=str))


def run_settings(ds_config: dict, world: int, seed, model_config=None, engine: str = "deepspeed",
                 tensor_parallel: int = 1) -> dict:
    """What a checkpoint of this run can only be continued with (or with a change that is applied):
    recorded in every checkpoint, compared on --resume and --resume_from.  ``world`` counts the
    data-parallel ranks (the ranks of a tensor-parallel group read the same samples)."""
    fsdp2 = engine == "fsdp2"        # FSDP2 shards everything, whatever the config's ZeRO stage
    settings = {"engine": engine, "tensor_parallel": tensor_parallel,
                "zero_stage": None if fsdp2 else int((ds_config.get("zero_optimization") or {}).get("stage", 0)),
                "precision": precision_of(ds_config), "world_size": world,
                "global_batch": global_batch_of(ds_config, world), "seed": seed,
                "gradient_clipping": ds_config.get("gradient_clipping"),
                "scheduler": ds_config.get("scheduler")}
    if ds_config.get("optimizer"):           # DeepSpeed's record of a run leaves a client optimizer out
        settings["optimizer"], settings["optimizer_params"] = optimizer_settings(ds_config["optimizer"])
    if model_config is not None:
        settings["model"] = {k: getattr(model_config, k, None) for k in MODEL_KEYS}
    return settings


def read_model_states(path: Path) -> dict:
    """A checkpoint's common state (client_state and DeepSpeed's record of the run), its tensors
    memory-mapped rather than read."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        raise InputError(f"cannot read the checkpoint file {path}: {err}") from None


def recorded_settings(args, run) -> tuple[dict | None, str]:
    """The settings the checkpoint to resume from was written with, and what it is called;
    None for a checkpoint that does not say (then DeepSpeed's own checks are all there is)."""
    if args.resume:
        tag = (run.checkpoints / "latest").read_text().strip()
        source = run.checkpoints / tag
        # ZeRO-3 writes one file of model states per rank, the other stages one in all
        # (and an FSDP2 checkpoint its client state, engine_fsdp2.CLIENT_STATE)
        names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt", "client_state.pt")
        states = next((source / name for name in names if (source / name).is_file()), None)
        if states is None:
            return None, str(source)
        state = read_model_states(states)
        if "run_settings" in state:
            return json.loads(state["run_settings"]), str(source)
        if "ds_config" not in state:
            return None, str(source)
        return run_settings(state["ds_config"], int(state.get("dp_world_size") or 1), state.get("seed")), str(source)
    source = Path(args.resume_from)
    meta = source / checkpoint.universal.META
    if meta.is_file():
        meta = json.loads(meta.read_text())
        client = meta.get("client_state", {})
        if "run_settings" in client:
            return json.loads(client["run_settings"]), str(source)
        return {"optimizer": meta["optimizer"], "seed": client.get("seed")}, str(source)
    # A universal checkpoint of DeepSpeed's Adam: its optimizer state starts any ds_lowrank one.
    state = read_model_states(source / "mp_rank_00_model_states.pt")
    settings = json.loads(state["run_settings"]) if "run_settings" in state else {"seed": state.get("seed")}
    return {**settings, "optimizer": "universal Adam"}, str(source)


def compare_settings(old: dict, new: dict, resume: bool, checkpoints: Path) -> tuple[list[str], list[str]]:
    """(refused, applied): one line per setting that differs between the checkpoint and this run."""
    refused, applied = [], []
    fresh = "or start a new run from scratch in a fresh --out_dir"
    consolidate = (f"consolidate the checkpoint with python tools/convert_checkpoint.py {checkpoints} "
                   f"CONSOLIDATED_DIR and continue with --resume_from CONSOLIDATED_DIR --out_dir NEW_DIR "
                   f"(any ZeRO stage, world size and precision)")

    def differs(key) -> bool:          # a checkpoint that does not say (None) is not compared
        if key == "zero_stage" and key in new and new[key] is None:
            return False               # FSDP2 has no ZeRO stage (a change of engine is refused below)
        return old.get(key) is not None and key in new and old[key] != new[key]

    if differs("optimizer") and old["optimizer"] != "universal Adam":
        hint = (" (python tools/convert_checkpoint.py --to adam turns LDAdam or GaLore state into DeepSpeed "
                "Adam's)" if new["optimizer"].lower() in deepspeed_optimizers() else "")
        refused.append(f"optimizer type: the checkpoint holds {old['optimizer']} state, the config builds "
                       f"{new['optimizer']}; set \"type\": \"{old['optimizer']}\" again, {fresh}{hint}")
    elif old.get("optimizer") != "universal Adam" and "optimizer_params" in old and "optimizer_params" in new:
        before, now = old["optimizer_params"], new["optimizer_params"]
        for key in sorted(set(before) | set(now)):
            if before.get(key) == now.get(key):
                continue
            if key in HYPERPARAMETERS:
                applied.append(f"optimizer param {key} changed from {before.get(key)} to {now.get(key)}")
            else:
                refused.append(f"optimizer param {key}: {json.dumps(before.get(key))} in the checkpoint, "
                               f"{json.dumps(now.get(key))} now; the saved optimizer state was built with "
                               f"{key}={json.dumps(before.get(key))}: set \"{key}\": "
                               f"{json.dumps(before.get(key))} again in the config, {fresh}")
    # a DeepSpeed checkpoint predating the record of the engine was written by DeepSpeed
    if resume and old.get("engine", "deepspeed") != new.get("engine", "deepspeed"):
        refused.append(f"engine: the checkpoint was written by --engine {old.get('engine', 'deepspeed')}, this "
                       f"run is --engine {new['engine']}; their checkpoint files differ: pass --engine "
                       f"{old.get('engine', 'deepspeed')} again, {fresh}")
    if resume and differs("tensor_parallel"):
        # each rank's files hold its own shards: nothing here re-cuts them for another TP size
        refused.append(f"tensor-parallel size: {old['tensor_parallel']} in the checkpoint, {new['tensor_parallel']} "
                       f"now; its weights and optimizer state are cut into {old['tensor_parallel']} shards: pass "
                       f"--tensor_parallel {old['tensor_parallel']} again, {fresh}")
    for key, label in (("zero_stage", "ZeRO stage"), ("world_size", "data-parallel ranks"),
                       ("precision", "precision")):
        if differs(key):
            # torch.distributed.checkpoint reshards an FSDP2 checkpoint at any number of ranks
            if resume and not (key == "world_size" and new.get("engine") == "fsdp2"):
                refused.append(f"{label}: {old[key]} in the checkpoint, {new[key]} now; --resume continues only "
                               f"with the same {label}: set it back to {old[key]}, or {consolidate}")
            else:
                applied.append(f"{label} changed from {old[key]} to {new[key]}")
    if differs("global_batch"):
        refused.append(f"global batch: {old['global_batch']} samples per step in the checkpoint, "
                       f"{new['global_batch']} now (micro-batch x gradient accumulation x ranks); keep it at "
                       f"{old['global_batch']} (e.g. through gradient_accumulation_steps), {fresh}")
    if differs("seed"):
        refused.append(f"--seed: {old['seed']} in the checkpoint, {new['seed']} now; the run's data order "
                       f"follows the seed: pass --seed {old['seed']}, {fresh}")
    if differs("model"):
        changed = {k: (old["model"].get(k), v) for k, v in new["model"].items() if old["model"].get(k) != v}
        refused.append(f"model: the checkpoint's model differs in {changed} (checkpoint, now); pass the "
                       f"--model it was trained with, {fresh}")
    for key, label in (("gradient_clipping", "gradient_clipping"), ("scheduler", "scheduler")):
        if differs(key):
            applied.append(f"{label} changed from {json.dumps(old[key])} to {json.dumps(new[key])}")
    return refused, applied


def check_resume_compatible(args, run) -> list[str]:
    """Refuse (InputError) a --resume or --resume_from whose settings differ from the checkpoint's
    where the saved state cannot follow, naming each one; return the changes that are applied."""
    if not (args.resume or args.resume_from):
        return []
    old, source = recorded_settings(args, run)
    if old is None:
        return []
    refused, applied = compare_settings(old, run.settings, bool(args.resume), run.checkpoints)
    if refused:
        raise InputError(f"cannot continue {source} with these settings:\n  - " + "\n  - ".join(refused))
    return applied


def check_run(args) -> argparse.Namespace:
    """``check_inputs``, then what this run records in its checkpoints (``run.settings``) and,
    on a resume, the differences from the checkpoint's that are applied (``run.resume_changes``);
    the others are refused (InputError)."""
    run = check_inputs(args)
    data_parallel = int(os.environ.get("WORLD_SIZE", 1)) // run.tensor_parallel
    run.settings = run_settings(run.ds_config, data_parallel, args.seed, run.model_config,
                                getattr(args, "engine", "deepspeed"), run.tensor_parallel)
    run.resume_changes = check_resume_compatible(args, run)
    return run


def apply_hyperparameters(engine, section: dict) -> None:
    """After a resume has restored the checkpoint's parameter groups, put this run's
    hyperparameters back: the config's betas, eps and weight_decay, and the learning rate its
    schedule gives for the coming step."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    params = section.get("params") or {}
    for group in inner.param_groups:
        for key in HYPERPARAMETERS[1:]:
            if key in params:
                group[key] = tuple(params[key]) if isinstance(group.get(key), tuple) else params[key]
    if engine.lr_scheduler is not None and hasattr(engine.lr_scheduler, "get_lr"):
        for group, lr in zip(inner.param_groups, engine.lr_scheduler.get_lr()):
            group["lr"] = lr
    elif "lr" in params:
        for group in inner.param_groups:
            group["lr"] = params["lr"]
