"""Pretrain a Llama model from scratch with DeepSpeed and a ds_lowrank optimizer.

The smallest run (the tiny preset on the built-in corpus, a few minutes on a laptop CPU):

    deepspeed launch/pretrain.py --deepspeed_config configs/ldadam_zero2.json     # from a clone
    deepspeed --module ds_lowrank.jobs.pretrain --deepspeed_config ldadam_zero2  # installed

Real pretraining, one node of 8 GPUs, then several nodes (hostfile: one "host slots=8" line each):

    deepspeed --num_gpus 8 launch/pretrain.py --deepspeed_config configs/ldadam_zero2.json \\
        --model 1b --data data/c4 --seq_len 1024 --max_steps 100000 --out_dir runs/1b-ldadam
    deepspeed --hostfile hostfile --num_nodes 4 --num_gpus 8 launch/pretrain.py ...   # same flags

Tensor parallelism is DeepSpeed's AutoTP on the Hugging Face model: --tensor_parallel N (or the
config's "tensor_parallel": {"autotp_size": N}) cuts every projection into N shards; the ranks form
TP N x DP (ranks / N) groups, ZeRO partitions over the data-parallel group, and the N ranks of a
TP group read the same samples (ds_lowrank.training.run_parallel):

    deepspeed --num_gpus 8 launch/pretrain.py --tensor_parallel 2 --model 7b ...      # TP 2 x DP 4

The same job on PyTorch FSDP2 (fully_shard, torch.distributed.checkpoint checkpoints that load at
any number of ranks; ds_lowrank.training.engine_fsdp2):

    torchrun --nproc_per_node 2 launch/pretrain.py --engine fsdp2 --deepspeed_config configs/ldadam_zero2.json

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
import math
import os
import shutil
import time

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import ds_lowrank
from ds_lowrank import checkpoint
from ds_lowrank.integration.deepspeed_config import ConfigError
from ds_lowrank.resources import shipped_configs
from ds_lowrank.training import engine_fsdp2
from ds_lowrank.training.data import DataError, ResumableSampler, TokenDataset
from ds_lowrank.training.diagnostics import LowRankProbe, lowrank_optimizer
from ds_lowrank.training.models import build_model, count_params
from ds_lowrank.training.run_inputs import InputError
from ds_lowrank.training.run_logs import RunLogs, Throughput, measurements
from ds_lowrank.training.run_parallel import data_parallel_position
from ds_lowrank.training.run_processes import (fail, init_distributed, lock_out_dir, mean_over_ranks,
                                               prepare_default_corpus)
from ds_lowrank.training.run_settings import check_run
from ds_lowrank.training.run_state import NonFiniteLoss, restore, save

# Dense bf16 tensor-core peak of one H100 SXM.  On a CPU there is no meaningful default; 1 TFLOPS
# is a round number of the right order for a many-core server, so MFU stays comparable between
# CPU runs but is not an absolute figure.
H100_BF16_TFLOPS = 989.0
CPU_NOMINAL_TFLOPS = 1.0


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
    p.add_argument("--tensor_parallel", type=int, default=None,
                   help="tensor-parallel size: DeepSpeed's AutoTP shards the model over groups of this many ranks "
                        "(sets the config's tensor_parallel.autotp_size; default: the config's, else 1)")
    p.add_argument("--engine", default="deepspeed", choices=engine_fsdp2.ENGINES,
                   help="deepspeed (default), or fsdp2: PyTorch's fully_shard under torchrun, with the same "
                        "config, flags and logs and torch.distributed.checkpoint checkpoints")
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


# ----------------------------------------------------------------------------- setup

def load_data(args, run, rank: int, local_rank: int, log) -> tuple[TokenDataset, TokenDataset]:
    """The training and validation splits: of --data, or of the built-in corpus."""
    if run.data_dir is None:
        run.data_dir = prepare_default_corpus(args.data_cache, rank, local_rank)
        log(f"data: no --data given, training on the built-in corpus (docstrings of Python's standard "
            f"library) at {run.data_dir}; prepare real data with tools/prepare_data.py and pass --data")
    else:
        log(f"data: {run.data_dir}")
    try:
        return TokenDataset(run.data_dir, "train", args.seq_len), TokenDataset(run.data_dir, "val", args.seq_len)
    except DataError as err:
        fail(err)


def load_model(args, run, vocab_size: int, rank: int, log) -> tuple[torch.nn.Module, int, int]:
    """The model, identical on every rank (initialised from --seed), its parameter count and its
    training FLOPs per token."""
    if vocab_size != run.model_config.vocab_size:
        log(f"model: vocabulary {run.model_config.vocab_size} of {args.model!r} replaced by the data's "
            f"tokenizer size {vocab_size}")
    model = build_model(run.model_config, args.seq_len, vocab_size=vocab_size, seed=args.seed)
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
    torch.manual_seed(args.seed + rank)  # anything random in training (dropout) differs per rank
    return model, n_params, 6 * (n_params - lookup)


def start_engine(args, run, model, master: bool, local_rank: int, log):
    """The DeepSpeed engine (or, with --engine fsdp2, the FSDP2 one), with the model from a
    consolidated checkpoint under --resume_from (returned too), and the config's monitors left to
    this job."""
    # --overwrite: the old run's checkpoints and monitor logs go before DeepSpeed's monitors open theirs.
    if master and args.overwrite and not args.resume:
        for old in (run.checkpoints, *run.monitor_dirs):
            if old.is_dir():
                shutil.rmtree(old)
                log(f"--overwrite: deleted {old}")
    dist.barrier()
    if args.engine == "fsdp2":
        engine = engine_fsdp2.start(model, run.ds_config, local_rank)
        engine.monitor.enabled = False
        return engine, None
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
    # The config's monitors (tensorboard, wandb, csv_monitor) get this job's events, one point per
    # optimizer step; DeepSpeed's own (the learning rate per sample) are left out, so that every
    # monitor sees one step axis (wandb refuses to go back).
    engine.monitor.enabled = False
    return engine, consolidated


def data_parallel(engine) -> tuple[int, int, int]:
    """(data-parallel rank, data-parallel size, samples per step): the ranks of a tensor-parallel
    group read the same samples, so they count once.  (DeepSpeed's ``train_batch_size()`` counts
    every rank under AutoTP.)"""
    rank, size = data_parallel_position(getattr(engine, "mpu", None))
    return rank, size, engine.train_micro_batch_size_per_gpu() * engine.gradient_accumulation_steps() * size


def describe(args, run, engine, n_params: int, log) -> None:
    micro, accumulation = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    _, dp_world, global_batch = data_parallel(engine)
    precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    log(f"model: {args.model}, {n_params / 1e6:.2f}M parameters, seq_len {args.seq_len}, "
        f"attention {args.attn_implementation}")
    sharding = getattr(engine, "sharding", None) or f"ZeRO stage {engine.zero_optimization_stage()}"
    layout = (f"TP {run.tensor_parallel} x DP {dp_world} ranks (AutoTP)" if run.tensor_parallel > 1
              else f"{dp_world} ranks")
    log(f"optimizer: {run.optimizer_type}, {sharding}, {precision}; "
        f"{layout} x micro-batch {micro} x accumulation {accumulation} = "
        f"{global_batch} samples = {global_batch * args.seq_len} tokens per step")


# ----------------------------------------------------------------------------- one step, one evaluation

def next_batch(engine, data, positions) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch of the samples at the next ``positions``: inputs and next-token targets."""
    tokens = torch.stack([data[next(positions)] for _ in range(engine.train_micro_batch_size_per_gpu())])
    tokens = tokens.to(engine.device)
    return tokens[:, :-1], tokens[:, 1:]


def lm_loss(engine, inputs, targets) -> torch.Tensor:
    logits = engine(input_ids=inputs).logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def train_step(engine, data, positions) -> float:
    """One optimizer step over the gradient accumulation's micro-batches; the mean loss over
    every rank (``.item()`` waits for the device)."""
    loss = torch.zeros((), device=engine.device)
    for _ in range(engine.gradient_accumulation_steps()):
        micro_loss = lm_loss(engine, *next_batch(engine, data, positions))
        engine.backward(micro_loss)
        engine.step()
        loss += micro_loss.detach()
    return mean_over_ranks(loss, dist.get_world_size()) / engine.gradient_accumulation_steps()


@torch.no_grad()
def evaluate(engine, data, iters: int) -> float:
    """Mean loss over the same held-out samples every time; the same number of batches on
    every rank (under ZeRO-3 and tensor parallelism each forward is collective)."""
    rank, world, _ = data_parallel(engine)
    engine.eval()
    positions = iter(ResumableSampler(len(data), shuffle=False, rank=rank, world_size=world))
    total = torch.zeros((), device=engine.device)
    for _ in range(iters):
        total += lm_loss(engine, *next_batch(engine, data, positions))
    engine.train()
    return mean_over_ranks(total, dist.get_world_size()) / iters


def finish(args, run, step: int, published: bool, lock, log) -> None:
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
    train_data, val_data = load_data(args, run, rank, local_rank, log)
    model, n_params, flops_per_token = load_model(args, run, train_data.vocab_size, rank, log)
    engine, consolidated = start_engine(args, run, model, master, local_rank, log)
    optimizer = lowrank_optimizer(engine)   # None for DeepSpeed's own optimizers
    probe = LowRankProbe(optimizer) if optimizer is not None else None
    describe(args, run, engine, n_params, log)
    dp_rank, dp_world, global_batch = data_parallel(engine)
    peak_tflops = args.peak_tflops or (H100_BF16_TFLOPS if torch.cuda.is_available() else CPU_NOMINAL_TFLOPS)

    step, consumed = restore(engine, args, run, consolidated, log)
    last_step = min(args.max_steps, args.stop_at_step or args.max_steps)
    if step >= last_step:
        log(f"nothing to do: the checkpoint is at step {step}, the run ends at step {last_step}")
        dist.destroy_process_group()
        return
    # Each data-parallel rank reads its own positions of one global sample stream (resumable from a count).
    samples = iter(ResumableSampler(len(train_data), seed=args.seed, rank=dp_rank, world_size=dp_world,
                                    consumed_samples=consumed))
    logs = RunLogs(args, run, engine.monitor, step, master)
    log(f"writing to {run.out_dir}")

    bar = tqdm(total=args.max_steps, initial=step, desc="train", disable=not master, dynamic_ncols=True)
    nonfinite, throughput, published = NonFiniteLoss(args.max_nonfinite_steps), Throughput(), True
    while step < last_step:
        started = time.perf_counter()
        measure = (step + 1) % args.log_interval == 0 or step + 1 == last_step
        if probe is not None and measure:
            probe.arm()
        lr = engine.get_lr()[0]  # the rate this step uses; the schedule advances inside engine.step()
        loss = train_step(engine, train_data, samples)
        step, consumed = step + 1, consumed + global_batch
        grad_norm = engine.get_global_grad_norm()
        grad_norm = None if grad_norm is None else float(grad_norm)
        throughput.add(time.perf_counter() - started)
        logs.step(step, consumed * args.seq_len, loss, lr, grad_norm)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        bar.update(1)
        if nonfinite.update(step, loss):     # the same mean loss on every rank: all stop here
            bar.close()
            logs.close(monitors=False)
            message = nonfinite.message(step, loss, run.checkpoints)
            dist.destroy_process_group()
            fail(message)
        if measure:
            tokens_per_s = throughput.tokens_per_s(global_batch * args.seq_len)
            logs.measurements(step, consumed * args.seq_len, *measurements(
                engine, probe, rank, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s,
                mfu=flops_per_token * tokens_per_s / world / (peak_tflops * 1e12)))
        if step == last_step or (args.eval_interval and step % args.eval_interval == 0):
            val_loss = evaluate(engine, val_data, args.eval_iters)
            log(f"step {step}: train loss {loss:.4f}, val loss {val_loss:.4f}, "
                f"val perplexity {math.exp(min(val_loss, 50)):.2f}")
            logs.evaluation(step, consumed * args.seq_len, val_loss)
        if step == last_step or (args.save_interval and step % args.save_interval == 0):
            published = save(engine, args, run, step, consumed, log)
    bar.close()
    logs.close()
    finish(args, run, step, published, lock, log)


if __name__ == "__main__":
    main()
