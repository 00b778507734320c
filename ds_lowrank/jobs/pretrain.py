"""Pretrain a Llama model from scratch with DeepSpeed and a ds_lowrank optimizer.

The smallest run (the tiny preset on the built-in corpus, a few minutes on a laptop CPU):

    deepspeed launch/pretrain.py --deepspeed_config configs/ldadam_zero2.json     # from a clone
    deepspeed --module ds_lowrank.jobs.pretrain --deepspeed_config ldadam_zero2  # installed

Real pretraining, one node of 8 GPUs, then several nodes (hostfile: one "host slots=8" line each):

    deepspeed --num_gpus 8 launch/pretrain.py --deepspeed_config configs/ldadam_zero2.json \\
        --model 1b --data data/c4 --seq_len 1024 --max_steps 100000 --out_dir runs/1b-ldadam
    deepspeed --hostfile hostfile --num_nodes 4 --num_gpus 8 launch/pretrain.py ...   # same flags

What comes from where:
- the DeepSpeed config: micro-batch, gradient accumulation, precision (bf16), ZeRO stage, gradient
  clipping, the optimizer ("type": "LDAdam" is built by ds_lowrank.initialize; DeepSpeed's own
  types such as AdamW pass through) and the WarmupCosineLR schedule, whose total_num_steps is
  set from --max_steps and whose warmup is "warmup_ratio" x --max_steps (ds_lowrank.utils.schedule);
- the flags: the model, the data, the length of the run, evaluation, checkpoints and logging.

Everything a run writes goes under --out_dir: checkpoints/ (DeepSpeed checkpoints, one tag per
saved step, plus "latest"), tensorboard/ (or the config's own DeepSpeed monitors), losses.jsonl
(one line per step, rank 0), eval.jsonl, metrics.jsonl (each logged scalar and every rank's optimizer
state by category, at --log_interval), the effective config, and run.lock (held by rank 0 while the run lives: a second run on the same
--out_dir is refused).  On several nodes --out_dir, --data and --data_cache must be on a
file system every node sees (each rank writes its own optimizer partition into the checkpoint).

Each checkpoint records the settings it was written with; a resume compares them with its own,
applies the plain hyperparameters (lr, betas, eps, weight decay, schedule, clipping) and refuses,
before training, a change the saved state cannot follow.  "latest" only ever names a checkpoint
whose weights and optimizer state are finite, and a loss that stays NaN stops the run.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import importlib.util
import inspect
import json
import math
import os
import random
import resource
import shutil
import socket
import sys
import time
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.accelerator import get_accelerator
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import ds_lowrank
from ds_lowrank import checkpoint
from ds_lowrank.integration.deepspeed import deepspeed_optimizers
from ds_lowrank.integration.deepspeed_config import (ConfigError, build_optimizer,
                                                     check_zero_config, load_config, optimizer_class)
from ds_lowrank.training.data import DataError, ResumableSampler, TokenDataset, default_corpus
from ds_lowrank.training.diagnostics import LowRankProbe, engine_state_bytes_by_rank, lowrank_optimizer
from ds_lowrank.training.models import build_model, count_params, load_preset
from ds_lowrank.resources import configs_dir, shipped_config, shipped_configs
from ds_lowrank.utils.files import atomic_write
from ds_lowrank.utils.schedule import KEY as WARMUP_RATIO, resolve_warmup

DEFAULT_CONFIG = configs_dir() / "ldadam_zero2.json"
# Dense bf16 tensor-core peak of one H100 SXM.  On a CPU there is no meaningful default; 1 TFLOPS
# is a round number of the right order for a many-core server, so MFU stays comparable between
# CPU runs but is not an absolute figure.
H100_BF16_TFLOPS = 989.0
CPU_NOMINAL_TFLOPS = 1.0
MiB = 2**20
# how the default config is named in messages: as the README's command from a clone names it
CONFIG_HINT = "configs/ldadam_zero2.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=f"--deepspeed_config takes a JSON file or the name of a shipped config "
                                       f"({', '.join(shipped_configs())}); without it: ldadam_zero2. "
                                       f"Exits with status 1 and a message on bad input, before training.")
    p.add_argument("--model", default="tiny",
                   help="model preset in configs/models (tiny, 60m, 130m, 350m, 1b, 7b) or a LlamaConfig "
                        "JSON file (default: tiny)")
    p.add_argument("--data", default=None,
                   help="dataset directory made by tools/prepare_data.py; without it, the docstrings "
                        "of Python's standard library, prepared once under --data_cache")
    p.add_argument("--data_cache", default="data/cache",
                   help="where the built-in corpus is prepared (default: data/cache)")
    p.add_argument("--seq_len", type=int, default=128, help="tokens per sample (default: 128)")
    p.add_argument("--max_steps", type=int, default=200,
                   help="optimizer steps of the run; also the LR schedule's total_num_steps (default: 200)")
    p.add_argument("--stop_at_step", type=int, default=None,
                   help="end this invocation after this step with a checkpoint, leaving --max_steps and "
                        "the LR schedule unchanged (for jobs with a time limit); continue with --resume")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate, replacing the config's")
    p.add_argument("--warmup_steps", type=int, default=None,
                   help="warmup steps, replacing the scheduler's warmup_ratio (a fraction of --max_steps) or "
                        "warmup_num_steps")
    p.add_argument("--eval_interval", type=int, default=50,
                   help="steps between evaluations, 0: only at the end (default: 50)")
    p.add_argument("--eval_iters", type=int, default=10, help="validation micro-batches per rank (default: 10)")
    p.add_argument("--save_interval", type=int, default=100,
                   help="steps between checkpoints, 0: only at the end, where one is always written "
                        "(default: 100)")
    p.add_argument("--log_interval", type=int, default=10, help="steps between monitor points (default: 10)")
    p.add_argument("--out_dir", default=None,
                   help="checkpoints, TensorBoard and logs (default: runs/<model>-<config>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out_dir")
    p.add_argument("--resume_from", default=None,
                   help="continue from a checkpoint consolidated by tools/convert_checkpoint.py, or from a "
                        "universal checkpoint of DeepSpeed's Adam (LDAdam and GaLore carry its moments "
                        "over), at any number of ranks and ZeRO stage (keep the global batch: "
                        "micro-batch x accumulation x ranks)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again from scratch in an --out_dir that holds a checkpoint: its checkpoints "
                        "and monitor logs are deleted")
    p.add_argument("--max_nonfinite_steps", type=int, default=5,
                   help="stop the run (exit status 1) when the training loss has been NaN or infinite for "
                        "this many consecutive steps (default: 5)")
    p.add_argument("--seed", type=int, default=0,
                   help="model initialisation, data order and RNG streams (default: 0)")
    p.add_argument("--activation_checkpointing", action="store_true",
                   help="recompute each decoder layer in the backward pass (less memory, ~30%% more compute)")
    p.add_argument("--attn_implementation", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"),
                   help="attention kernel of the Hugging Face model (default: sdpa)")
    p.add_argument("--tf32", action="store_true",
                   help="allow TF32 matmuls on GPU (the optimizer's fp32 projections then run on tensor cores)")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help=f"peak TFLOPS of one device for MFU (default: {H100_BF16_TFLOPS:g}, H100 dense bf16, on "
                        f"GPU; {CPU_NOMINAL_TFLOPS:g}, a nominal figure, on CPU)")
    # DeepSpeed's launcher passes --local_rank=N; the environment's LOCAL_RANK is what is used.
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    deepspeed.add_config_arguments(p)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- checks before training

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
                              model_config=model_config, data_dir=data_dir, out_dir=out_dir,
                              checkpoints=checkpoints, monitor_dirs=monitor_dirs)


# ----------------------------------------------------------------------------- monitors

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


def close_monitors(monitor) -> None:
    """Flush what the monitors hold (rank 0)."""
    tb = monitor.tb_monitor
    if tb is not None and tb.summary_writer is not None:
        tb.summary_writer.close()


# ----------------------------------------------------------------------------- what a resume may change

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


def run_settings(ds_config: dict, world: int, seed, model_config=None) -> dict:
    """What a checkpoint of this run can only be continued with (or with a change that is applied):
    recorded in every checkpoint, compared on --resume and --resume_from."""
    settings = {"zero_stage": int((ds_config.get("zero_optimization") or {}).get("stage", 0)),
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
        names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
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
    for key, label in (("zero_stage", "ZeRO stage"), ("world_size", "data-parallel ranks"),
                       ("precision", "precision")):
        if differs(key):
            if resume:
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
    run.settings = run_settings(run.ds_config, int(os.environ.get("WORLD_SIZE", 1)), args.seed, run.model_config)
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


# ----------------------------------------------------------------------------- one run per --out_dir

class RunLock:
    """An exclusive lock on --out_dir, taken by rank 0 for the run's lifetime (``flock`` on
    ``run.lock``; the OS drops it when the process ends, however it ends).  The file says who
    holds it."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / "run.lock"
        self.file = None

    def acquire(self) -> str | None:
        """None when taken; else the refusal, naming the run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                holder = json.loads(f.read() or "{}")
            except json.JSONDecodeError:
                holder = {}
            f.close()
            return (f"{self.path.parent} is in use by another run (pid {holder.get('pid', '?')} on host "
                    f"{holder.get('host', '?')}, started {holder.get('started', '?')}): wait for it to end "
                    f"or stop it, or choose another --out_dir")
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n")
        f.flush()
        self.file = f
        return None

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


def lock_out_dir(out_dir: Path, master: bool) -> RunLock:
    """Rank 0 takes the run's lock; every rank stops with the message when another run holds it."""
    lock = RunLock(out_dir)
    refusal = [lock.acquire() if master else None]
    dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        fail(refusal[0])
    return lock


# ----------------------------------------------------------------------------- a run that diverges

class NonFiniteLoss:
    """Counts consecutive steps whose loss is NaN or infinite."""

    def __init__(self, limit: int):
        self.limit, self.count, self.first = limit, 0, None

    def update(self, step: int, loss: float) -> bool:
        """Record ``step``'s loss; True when the run must stop."""
        if math.isfinite(loss):
            self.count = 0
            return False
        if self.count == 0:
            self.first = step
        self.count += 1
        return self.count >= self.limit

    def message(self, step: int, loss: float, checkpoints: Path) -> str:
        latest = checkpoints / "latest"
        where = (f"the last finite checkpoint is {latest.read_text().strip()} in {checkpoints}: continue from "
                 f"it with --resume" if latest.is_file() else "no checkpoint was written: start again")
        return (f"the training loss has been {loss} for {self.count} consecutive steps ({self.first}-{step}, "
                f"--max_nonfinite_steps {self.limit}); the run is stopped without a checkpoint. Lower the "
                f"learning rate (or lengthen the warmup); {where}")


def all_finite(engine) -> bool:
    """Whether the weights and optimizer state of every rank are finite (collective)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    tensors = list(engine.module.parameters())
    pending = list(getattr(inner, "state", {}).values())
    for group in getattr(inner, "param_groups", []):
        tensors += group["params"]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            pending += value.values()
        elif isinstance(value, torch.Tensor):
            tensors.append(value)
    finite = all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point() and t.numel())
    flag = torch.tensor(0.0 if finite else 1.0, device=engine.device)
    dist.all_reduce(flag)
    return flag.item() == 0


# ----------------------------------------------------------------------------- helpers

def init_distributed() -> tuple[int, int, int]:
    """Rank, world size and local rank; a plain ``python launch/pretrain.py`` is a world of one."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ["LOCAL_RANK"])
    get_accelerator().set_device(local_rank)  # before any collective: NCCL binds to the current GPU
    deepspeed.init_distributed()
    return dist.get_rank(), dist.get_world_size(), local_rank


def prepare_default_corpus(cache: str, rank: int, local_rank: int) -> Path:
    """The built-in corpus, built by rank 0 while the others wait.  A node that cannot see rank
    0's copy (a node-local cache) builds its own, with the same result."""
    if rank == 0:
        default_corpus(cache)
    dist.barrier()
    if local_rank == 0:
        default_corpus(cache)
    dist.barrier()
    return default_corpus(cache)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / MiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def mean_over_ranks(value: torch.Tensor, world: int) -> float:
    value = value.detach().float().clone()
    dist.all_reduce(value)
    return value.item() / world


def keep_lines_until(path: Path, step: int) -> None:
    """Drop the records a resumed run is about to write again (steps after its checkpoint).  The
    file is replaced atomically: a kill midway leaves the old one.  A last line cut short (the
    previous run was killed while writing it) is dropped."""
    if not path.is_file():
        return
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            lines.pop()
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line else None
        except json.JSONDecodeError:
            raise InputError(f"{path}, line {number}, is not a JSON record: {line[:80]!r}; repair or remove "
                             f"the line, then resume again") from None
        if record is not None and record["step"] <= step:
            kept.append(line)
    atomic_write(path, "".join(line + "\n" for line in kept))


def last_record(path: Path) -> dict:
    """The last JSON record of a log file ({} when there is none)."""
    if not path.is_file():
        return {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else {}


def fail(message) -> None:
    # Every rank finds the same problem; one message per node is enough.
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


# ----------------------------------------------------------------------------- the run

def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        run = check_run(args)
    except InputError as err:
        fail(err)

    rank, world, local_rank = init_distributed()
    master = rank == 0
    lock = lock_out_dir(run.out_dir, master)

    def log(message: str) -> None:
        if master:
            tqdm.write(message)

    log(f"DeepSpeed config: {run.config_path}" + ("" if args.deepspeed_config else " (the default)"))

    # Data: the built-in corpus unless --data names a prepared dataset.
    if run.data_dir is None:
        run.data_dir = prepare_default_corpus(args.data_cache, rank, local_rank)
        log(f"data: no --data given, training on the built-in corpus (docstrings of Python's standard "
            f"library) at {run.data_dir}; prepare real data with tools/prepare_data.py and pass --data")
    else:
        log(f"data: {run.data_dir}")
    try:
        train_data = TokenDataset(run.data_dir, "train", args.seq_len)
        val_data = TokenDataset(run.data_dir, "val", args.seq_len)
    except DataError as err:
        fail(err)

    # Model: identical initial weights on every rank, from --seed.
    if train_data.vocab_size != run.model_config.vocab_size:
        log(f"model: vocabulary {run.model_config.vocab_size} of {args.model!r} replaced by the data's "
            f"tokenizer size {train_data.vocab_size}")
    model = build_model(run.model_config, args.seq_len, vocab_size=train_data.vocab_size, seed=args.seed)
    model.config.use_cache = False
    if args.activation_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    n_params = count_params(model)
    # 6 FLOPs per parameter and token (forward + backward), but the input embedding is a lookup
    # (unless tied to the LM head, which is a matmul); attention's own FLOPs are left out.
    lookup = 0 if model.config.tie_word_embeddings else model.get_input_embeddings().weight.numel()
    flops_per_token = 6 * (n_params - lookup)
    torch.manual_seed(args.seed + rank)  # anything random in training (dropout) differs per rank

    # --overwrite: the old run's checkpoints and monitor logs go before DeepSpeed's monitors open theirs.
    if master and args.overwrite and not args.resume:
        for old in (run.checkpoints, *run.monitor_dirs):
            if old.is_dir():
                shutil.rmtree(old)
                log(f"--overwrite: deleted {old}")
    dist.barrier()

    consolidated = None
    try:
        if args.resume_from:
            consolidated = checkpoint.load(args.resume_from)   # its files verified against their checksums
        if consolidated is not None:
            engine, _, _, _ = checkpoint.resume(consolidated, model, run.ds_config)
        else:
            engine, _, _, _ = ds_lowrank.initialize(model=model, config=run.ds_config)
    except (ConfigError, checkpoint.CheckpointError) as err:
        fail(err)
    device = engine.device
    micro, accumulation = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    global_batch = engine.train_batch_size()
    tokens_per_step = global_batch * args.seq_len
    peak_tflops = args.peak_tflops or (H100_BF16_TFLOPS if torch.cuda.is_available() else CPU_NOMINAL_TFLOPS)

    # The config's monitors (tensorboard, wandb, csv_monitor) get this job's events, one point per
    # optimizer step; DeepSpeed's own (the learning rate per sample) are left out, so that every
    # monitor sees one step axis (wandb refuses to go back).
    monitor = engine.monitor
    monitor.enabled = False

    # The ds_lowrank optimizer DeepSpeed drives (None for DeepSpeed's own AdamW).
    optimizer = lowrank_optimizer(engine)
    probe = LowRankProbe(optimizer) if optimizer is not None else None

    log(f"model: {args.model}, {n_params / 1e6:.2f}M parameters, seq_len {args.seq_len}, "
        f"attention {args.attn_implementation}")
    log(f"optimizer: {run.optimizer_type}, ZeRO stage {engine.zero_optimization_stage()}, "
        f"{'bf16' if engine.bfloat16_enabled() else 'fp16' if engine.fp16_enabled() else 'fp32'}; "
        f"{world} ranks x micro-batch {micro} x accumulation {accumulation} = {global_batch} samples "
        f"= {tokens_per_step} tokens per step")

    # Resume: weights, optimizer and LR schedule from DeepSpeed, the rest from client_state.
    step, consumed = 0, 0
    if args.resume:
        try:  # the newest checkpoint whose files verify (a damaged one is named and moved aside)
            tag = checkpoint.integrity.resume_tag(run.checkpoints, log)
        except checkpoint.CheckpointError as err:
            fail(err)
        try:
            with checkpoint.integrity.naming_load_errors(engine):
                path, client = engine.load_checkpoint(str(run.checkpoints), tag=tag)
        except checkpoint.CheckpointError as err:   # a file without checksums, unreadable on this rank
            print(f"error: rank {rank}: {err}", file=sys.stderr, flush=True)
            sys.exit(1)
        if path is None:
            fail(f"could not load the checkpoint in {run.checkpoints}")
        step, consumed = client["step"], client["consumed_samples"]
        if len(client["rng"]) == world:
            set_rng_state(client["rng"][rank])
        else:
            log(f"resume: the checkpoint was written by {len(client['rng'])} ranks, not {world}: "
                f"random streams are reseeded, the data stream continues exactly")
            torch.manual_seed(args.seed + rank + 1_000_003 * step)  # not a stream already used
        if client.get("max_steps") != args.max_steps:
            log(f"resume: --max_steps changed from {client.get('max_steps')} to {args.max_steps}; the LR "
                f"schedule continues as if the run had always been {args.max_steps} steps long")
        if client.get("seq_len") != args.seq_len:
            log(f"resume: --seq_len changed from {client.get('seq_len')} to {args.seq_len}; the data "
                f"stream continues at the same sample count, not the same tokens")
        log(f"resume: step {step}, {consumed} samples consumed, from {path}")
    if consolidated is not None:
        client = consolidated.client_state
        step, consumed = client.get("step", consolidated.global_steps), client.get("consumed_samples", 0)
        torch.manual_seed(args.seed + rank + 1_000_003 * step)  # not a stream already used
        log(f"resume: step {step}, {consumed} samples consumed, from the consolidated {args.resume_from}; "
            f"random streams are reseeded, the data stream continues exactly")
    if run.resume_changes:
        apply_hyperparameters(engine, run.ds_config["optimizer"])
        for change in run.resume_changes:
            log(f"resume: {change}; applied")
    last_step = min(args.max_steps, args.stop_at_step or args.max_steps)
    if step >= last_step:
        log(f"nothing to do: the checkpoint is at step {step}, the run ends at step {last_step}")
        dist.destroy_process_group()
        return

    # Each rank reads its own positions of one global sample stream (resumable from a count).
    sampler = iter(ResumableSampler(len(train_data), seed=args.seed, rank=rank, world_size=world,
                                    consumed_samples=consumed))

    def batch_from(data, positions):
        tokens = torch.stack([data[next(positions)] for _ in range(micro)]).to(device)
        return tokens[:, :-1], tokens[:, 1:]

    def lm_loss(inputs, targets):
        logits = engine(input_ids=inputs).logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    @torch.no_grad()
    def evaluate() -> float:
        """Mean loss over the same held-out samples every time; the same number of batches on
        every rank (under ZeRO-3 each forward is collective)."""
        engine.eval()
        positions = iter(ResumableSampler(len(val_data), shuffle=False, rank=rank, world_size=world))
        total = torch.zeros((), device=device)
        for _ in range(args.eval_iters):
            total += lm_loss(*batch_from(val_data, positions))
        engine.train()
        return mean_over_ranks(total, world) / args.eval_iters

    def save_checkpoint() -> bool:
        """Save, and make it ``latest`` unless a weight or optimizer state is NaN or infinite."""
        # DeepSpeed writes client_state from the first data-parallel rank (ZeRO-1/2), so it
        # carries every rank's random state.
        states = [None] * world
        dist.all_gather_object(states, rng_state())
        finite = all_finite(engine)
        # sealed with checksums once every rank has written; then "latest" names it if finite
        checkpoint.integrity.save_checkpoint(engine, run.checkpoints, f"step{step}", publish=finite, client_state={
            "step": step, "consumed_samples": consumed, "rng": states, "max_steps": args.max_steps,
            "seq_len": args.seq_len, "seed": args.seed, "data": str(run.data_dir),
            "run_settings": json.dumps(run.settings),
            "model_config": model.config.to_json_string()})    # for tools/export_hf.py
        if not finite:
            log(f"step {step}: the checkpoint in {run.checkpoints / f'step{step}'} holds non-finite weights or "
                f"optimizer state; 'latest' is left at the last finite one")
            return False
        log(f"step {step}: checkpoint saved in {run.checkpoints / f'step{step}'}")
        return True

    # Logs (rank 0).  A resumed run drops whatever was logged after its checkpoint.
    losses = evals = metrics = None
    elapsed = 0.0   # wall-clock seconds of the run, continued over resumes
    if master:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        if args.resume:
            try:
                for name in ("losses.jsonl", "eval.jsonl", "metrics.jsonl"):
                    keep_lines_until(run.out_dir / name, step)
            except InputError as err:
                fail(err)
            elapsed = last_record(run.out_dir / "losses.jsonl").get("time", 0.0)
        mode = "a" if args.resume else "w"
        losses = open(run.out_dir / "losses.jsonl", mode)
        evals = open(run.out_dir / "eval.jsonl", mode)
        metrics = open(run.out_dir / "metrics.jsonl", mode)
        atomic_write(run.out_dir / "ds_config.json", json.dumps(run.ds_config, indent=2))
        atomic_write(run.out_dir / "args.json", json.dumps(vars(args), indent=2, default=str))
        tb = monitor.tb_monitor
        if tb is not None and tb.summary_writer is not None:
            # Events after the checkpoint, from a run that went on past it, are hidden.
            tb.summary_writer.close()
            tb.summary_writer = SummaryWriter(tb.summary_writer.get_logdir(), purge_step=step + 1)
    log(f"writing to {run.out_dir}")
    run_started = time.perf_counter() - elapsed

    bar = tqdm(total=args.max_steps, initial=step, desc="train", disable=not master, dynamic_ncols=True)
    nonfinite = NonFiniteLoss(args.max_nonfinite_steps)
    published = True
    interval_seconds, interval_steps = 0.0, 0  # training time only: evaluation and saving stay out
    while step < last_step:
        started = time.perf_counter()
        measure = (step + 1) % args.log_interval == 0 or step + 1 == last_step
        if probe is not None and measure:
            probe.arm()
        lr = engine.get_lr()[0]  # the rate this step uses; the schedule advances inside engine.step()
        loss = torch.zeros((), device=device)
        for _ in range(accumulation):
            micro_loss = lm_loss(*batch_from(train_data, sampler))
            engine.backward(micro_loss)
            engine.step()
            loss += micro_loss.detach()
        step += 1
        consumed += global_batch
        loss = mean_over_ranks(loss, world) / accumulation  # .item() waits for the GPU
        grad_norm = engine.get_global_grad_norm()
        grad_norm = None if grad_norm is None else float(grad_norm)
        interval_seconds += time.perf_counter() - started
        interval_steps += 1
        if master:
            losses.write(json.dumps({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                     "tokens": consumed * args.seq_len,
                                     "time": round(time.perf_counter() - run_started, 3)}) + "\n")
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
        if nonfinite.update(step, loss):     # the same mean loss on every rank: all stop here
            bar.close()
            if master:
                for f in (losses, evals, metrics):
                    f.close()
            message = nonfinite.message(step, loss, run.checkpoints)
            dist.destroy_process_group()
            fail(message)

        if measure:
            tokens_per_s = interval_steps * tokens_per_step / interval_seconds
            scalars = {"train/loss": loss, "train/lr": lr, "perf/tokens_per_s": tokens_per_s,
                       "perf/mfu": flops_per_token * tokens_per_s / world / (peak_tflops * 1e12),
                       "memory/peak_MiB": peak_memory_mib()}
            if grad_norm is not None:
                scalars["train/grad_norm"] = grad_norm
            # every optimizer's state per rank: state_bytes(), or the tensors of DeepSpeed's own
            by_rank = engine_state_bytes_by_rank(engine)
            scalars["memory/optimizer_state_MiB"] = by_rank["total"][rank] / MiB
            scalars["memory/optimizer_state_MiB_max_rank"] = max(by_rank["total"]) / MiB
            for category, values in by_rank.items():
                if category != "total":
                    scalars[f"memory/optimizer_state/{category}_MiB"] = values[rank] / MiB
            if probe is not None:
                for name, value in probe.collect().items():
                    scalars[f"lowrank/{name}"] = value
            if master:
                monitor.write_events([(name, value, step) for name, value in scalars.items()])
                metrics.write(json.dumps({"step": step, "tokens": consumed * args.seq_len,
                                          "time": round(time.perf_counter() - run_started, 3), **scalars,
                                          "state_bytes_by_rank": by_rank}) + "\n")
                metrics.flush()
                losses.flush()
            interval_seconds, interval_steps = 0.0, 0

        evaluate_now = step == last_step or (args.eval_interval and step % args.eval_interval == 0)
        if evaluate_now:
            val_loss = evaluate()
            log(f"step {step}: train loss {loss:.4f}, val loss {val_loss:.4f}, "
                f"val perplexity {math.exp(min(val_loss, 50)):.2f}")
            if master:
                monitor.write_events([("val/loss", val_loss, step),
                                      ("val/perplexity", math.exp(min(val_loss, 50)), step)])
                evals.write(json.dumps({"step": step, "val_loss": val_loss, "tokens": consumed * args.seq_len,
                                        "time": round(time.perf_counter() - run_started, 3)}) + "\n")
                evals.flush()
        if step == last_step or (args.save_interval and step % args.save_interval == 0):
            published = save_checkpoint()

    bar.close()
    if master:
        for f in (losses, evals, metrics):
            f.close()
        close_monitors(monitor)
    if not published:
        dist.destroy_process_group()
        fail(f"the final checkpoint, step {step}, holds non-finite weights or optimizer state and was not "
             f"made 'latest'; lower the learning rate and continue from the last finite checkpoint with --resume")
    if step < args.max_steps:
        log(f"stopped at step {step} of {args.max_steps}; continue with the same flags and --resume")
    else:
        log(f"done: {step} steps; checkpoints and logs in {run.out_dir}")
    dist.barrier()
    lock.release()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
