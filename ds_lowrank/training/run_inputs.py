"""The pretraining job's checks before training: everything that can be wrong with its flags and
files, found in one process in seconds, before DeepSpeed starts."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
from pathlib import Path

from ..integration.deepspeed import deepspeed_optimizers
from ..integration.deepspeed_config import (ConfigError, build_optimizer, check_zero_config, load_config,
                                            optimizer_class)
from ..resources import configs_dir, shipped_config, shipped_configs
from ..utils.schedule import KEY as WARMUP_RATIO, resolve_warmup
from .data import DataError, TokenDataset
from .models import build_model, load_preset
from .run_parallel import check_tensor_parallel

DEFAULT_CONFIG = configs_dir() / "ldadam_zero2.json"
# how the default config is named in messages: as the README's command from a clone names it
CONFIG_HINT = "configs/ldadam_zero2.json"


class InputError(Exception):
    """Bad input found before training starts; the message names the fix."""


def check_inputs(args) -> argparse.Namespace:
    """Everything that can be wrong with the flags and files, found in one process in seconds,
    before DeepSpeed starts.  Returns what the run needs: the DeepSpeed config (with the
    overrides applied), the model config, the data directory (None: the built-in corpus) and
    the output paths."""
    for name in ("seq_len", "max_steps", "eval_iters", "log_interval", "max_nonfinite_steps"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("eval_interval", "save_interval"):
        if getattr(args, name) < 0:
            raise InputError(f"--{name} must be 0 (only at the end) or positive, got {getattr(args, name)}")
    if args.seed < 0:
        raise InputError(f"--seed must be 0 or positive, got {args.seed}")
    if args.stop_at_step is not None and not 1 <= args.stop_at_step <= args.max_steps:
        raise InputError(f"--stop_at_step must be between 1 and --max_steps ({args.max_steps}), "
                         f"got {args.stop_at_step}")

    # The DeepSpeed config and its optimizer section.
    config_path = Path(args.deepspeed_config or DEFAULT_CONFIG)
    if not config_path.is_file() and shipped_config(str(config_path)) is not None:
        config_path = shipped_config(str(config_path))     # a shipped config by name: adamw_zero2
    if not config_path.is_file():
        raise InputError(f"DeepSpeed config {config_path} does not exist; pass --deepspeed_config with a "
                         f"JSON file such as {CONFIG_HINT}, or the name of a shipped one: "
                         f"{', '.join(shipped_configs())}")
    try:
        ds_config = load_config(config_path)
    except json.JSONDecodeError as err:
        raise InputError(f"DeepSpeed config {config_path} is not valid JSON: {err}") from None
    except ConfigError as err:
        raise InputError(f"DeepSpeed config {config_path}: {err}") from None
    section = ds_config.get("optimizer")
    if not section:
        raise InputError(f'DeepSpeed config {config_path} has no "optimizer" section; add one, e.g. '
                         f'"optimizer": {{"type": "LDAdam", "params": {{"lr": 0.001, "rank": 64}}}} '
                         f'(as in configs/ldadam_zero2.json) or {{"type": "AdamW", ...}}')
    native = str(section.get("type", "")).lower() in deepspeed_optimizers()
    try:
        if not native:
            optimizer_class(section)
            check_zero_config(ds_config)
    except ConfigError as err:
        raise InputError(f"DeepSpeed config {config_path}: {err}") from None
    if getattr(args, "engine", "deepspeed") == "fsdp2":
        from .engine_fsdp2 import check_config as check_fsdp2_config
        check_fsdp2_config(ds_config, section, config_path)
        if args.resume_from is not None:
            raise InputError("--resume_from takes DeepSpeed checkpoints, which --engine fsdp2 does not load; "
                             "continue an FSDP2 run with --resume (at any number of ranks), or use "
                             "--engine deepspeed")
    if args.lr is not None:
        section.setdefault("params", {})["lr"] = args.lr
    scheduler = ds_config.get("scheduler")
    if scheduler:
        params = scheduler.setdefault("params", {})
        if scheduler.get("type") in ("WarmupCosineLR", "WarmupDecayLR") or "total_num_steps" in params:
            params["total_num_steps"] = args.max_steps
        if args.warmup_steps is not None:
            params["warmup_num_steps"] = args.warmup_steps
            params.pop(WARMUP_RATIO, None)
        try:   # "warmup_ratio": a fraction of --max_steps
            resolve_warmup(ds_config, args.max_steps)
        except ValueError as err:
            raise InputError(f"DeepSpeed config {config_path}: {err}") from None
        warmup = params.get("warmup_num_steps")
        if isinstance(warmup, int) and not 1 <= warmup < args.max_steps:
            raise InputError(f"warmup of {warmup} steps does not fit in --max_steps {args.max_steps}: "
                             f"pass --warmup_steps between 1 and {args.max_steps - 1}")
    elif args.warmup_steps is not None:
        raise InputError(f'--warmup_steps needs a "scheduler" section in {config_path} (e.g. WarmupCosineLR)')

    # The model.
    try:
        model_config = load_preset(args.model)
    except ValueError as err:
        raise InputError(str(err)) from None
    if args.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise InputError("--attn_implementation flash_attention_2 needs the flash-attn package "
                         "(pip install flash-attn); or use sdpa")
    model_config._attn_implementation = args.attn_implementation
    if args.seq_len > model_config.max_position_embeddings:
        raise InputError(f"--seq_len {args.seq_len} exceeds the max_position_embeddings "
                         f"{model_config.max_position_embeddings} of model {args.model!r}: use --seq_len "
                         f"{model_config.max_position_embeddings} or less, or a model config with a larger "
                         f"max_position_embeddings")

    # Tensor parallelism (DeepSpeed's AutoTP): the layout, before any process group exists.
    try:
        tensor_parallel = check_tensor_parallel(ds_config, getattr(args, "tensor_parallel", None),
                                                int(os.environ.get("WORLD_SIZE", 1)), model_config,
                                                getattr(args, "engine", "deepspeed"))
    except ValueError as err:
        raise InputError(str(err)) from None
    if tensor_parallel > 1 and args.resume_from is not None:
        raise InputError(f"--resume_from loads whole matrices, which this job does not cut into AutoTP shards: "
                         f"start from the consolidated checkpoint at --tensor_parallel 1, or continue a "
                         f"tensor-parallel run with --resume at the same size ({tensor_parallel})")

    # The data (the built-in corpus is prepared later, by rank 0).
    data_dir, vocab_size = None, model_config.vocab_size
    if args.data is not None:
        data_dir = Path(args.data)
        if not data_dir.exists():
            raise InputError(f"--data {data_dir} does not exist; prepare a dataset with python "
                             f"tools/prepare_data.py FILES --output {data_dir}, or leave --data out "
                             f"to train on the built-in corpus")
        if data_dir.is_dir() and not any(data_dir.iterdir()):
            raise InputError(f"--data {data_dir} is an empty directory; prepare a dataset into it with "
                             f"python tools/prepare_data.py FILES --output {data_dir} --overwrite")
        try:
            for split in ("train", "val"):
                vocab_size = TokenDataset(data_dir, split, args.seq_len).vocab_size
        except DataError as err:
            raise InputError(f"--data: {err}") from None

    # The optimizer on a shape-only copy of the model: a rank too large for some matrix, or an
    # unknown option, is refused here naming the parameter, without allocating anything.
    if not native:
        shapes = build_model(model_config, args.seq_len, vocab_size=vocab_size, device="meta")
        try:
            build_optimizer(shapes, copy.deepcopy(section))
        except ConfigError as err:
            raise InputError(f"DeepSpeed config {config_path}: {err}") from None

    # Where the run writes.
    out_dir = Path(args.out_dir or Path("runs") / f"{Path(args.model).stem}-{config_path.stem}")
    checkpoints = out_dir / "checkpoints"
    has_checkpoint = (checkpoints / "latest").is_file()
    if args.resume_from is not None:
        if args.resume:
            raise InputError("--resume and --resume_from exclude each other: --resume continues the run in "
                             "--out_dir, --resume_from starts a new one from a consolidated checkpoint")
        source = Path(args.resume_from)
        if not ((source / "ds_lowrank.json").is_file() or (source / "zero" / "optimizer_state.pt").is_file()):
            raise InputError(f"--resume_from {args.resume_from}: not a consolidated checkpoint (no "
                             f"ds_lowrank.json; write one with tools/convert_checkpoint.py) nor a universal "
                             f"checkpoint of DeepSpeed's Adam (python -m deepspeed.checkpoint.ds_to_universal)")
    if args.resume and not has_checkpoint:
        raise InputError(f"--resume: no checkpoint in {checkpoints} (no 'latest' file); check --out_dir, "
                         f"or start a new run without --resume")
    if has_checkpoint and not args.resume and not args.overwrite:
        raise InputError(f"{out_dir} already holds a checkpoint; pass --resume to continue that run, "
                         f"--overwrite to start again from scratch there, or another --out_dir")
    monitor_dirs = configure_monitors(ds_config, out_dir)
    return argparse.Namespace(config_path=config_path, ds_config=ds_config, optimizer_type=section["type"],
                              model_config=model_config, tensor_parallel=tensor_parallel, data_dir=data_dir,
                              out_dir=out_dir, checkpoints=checkpoints, monitor_dirs=monitor_dirs)


MONITORS = ("tensorboard", "wandb", "csv_monitor", "comet")


def configure_monitors(ds_config: dict, out_dir: Path) -> list[Path]:
    """The config's DeepSpeed monitor sections, completed: with none enabled, TensorBoard into
    ``out_dir/tensorboard``; an enabled tensorboard or csv_monitor without an ``output_path``
    writes into ``out_dir`` (``job_name`` defaulting to the section's name).  Returns the local
    folders they write to."""
    if not any(isinstance(ds_config.get(k), dict) and ds_config[k].get("enabled") for k in MONITORS):
        ds_config["tensorboard"] = {"enabled": True, "output_path": str(out_dir), "job_name": "tensorboard"}
    folders = []
    for key in ("tensorboard", "csv_monitor"):
        section = ds_config.get(key)
        if isinstance(section, dict) and section.get("enabled"):
            if not section.get("output_path"):
                section["output_path"] = str(out_dir)
            section.setdefault("job_name", key)
            folders.append(Path(section["output_path"]) / section["job_name"])
    return folders
