"""The pretraining job's second engine: PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``).

``Fsdp2Engine`` drives a ``fully_shard`` model with the parts of DeepSpeed's engine interface the
job uses (forward, ``backward``/``step`` per micro-batch, the batch sizes, the learning rate, the
gradient norm, ``save_checkpoint``/``load_checkpoint``, the config's monitors), so the job's loop,
its logs and its checkpoint sealing are the same for both engines.  What comes from the DeepSpeed
config is read the way DeepSpeed reads it: micro-batch and gradient accumulation, gradient
clipping (of the global norm, before the step), bf16 (FSDP2's ``MixedPrecisionPolicy``: bf16
compute, fp32 sharded parameters and gradient reduction), the optimizer section
(``build_optimizer``) and the scheduler section (DeepSpeed's own scheduler class, stepped after
each optimizer step as DeepSpeed steps it).

Checkpoints are ``torch.distributed.checkpoint`` folders (the model's and the optimizer's sharded
state dicts), plus ``client_state.pt`` (the job's run state and the scheduler's), written by rank
0.  DCP reshards on load, so a checkpoint saved at one world size loads at another.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from ..integration.deepspeed import deepspeed_optimizers
from ..integration.deepspeed_config import build_optimizer, zero_section
from ..utils.files import atomic_write
from .run_inputs import InputError

CLIENT_STATE = "client_state.pt"
ENGINES = ("deepspeed", "fsdp2")


def check_config(ds_config: dict, section: dict, config_path) -> None:
    """Refuse (InputError) what the FSDP2 engine does not do, naming the fix."""
    where = f"DeepSpeed config {config_path}"
    if str(section.get("type", "")).lower() in deepspeed_optimizers():
        raise InputError(f'{where}: "type": "{section.get("type")}" is one of DeepSpeed\'s own optimizers, which '
                         f"--engine fsdp2 does not build; use a ds_lowrank optimizer (LDAdam, GaLoreAdamW, "
                         f"Adapprox, MicroAdam) or --engine deepspeed")
    zero = zero_section(ds_config)
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            raise InputError(f'{where}: zero_optimization.{key} (device "{device}") is a ZeRO option that '
                             f"--engine fsdp2 does not have; remove it, or use --engine deepspeed")
    if (ds_config.get("fp16") or {}).get("enabled") is True:
        raise InputError(f'{where}: "fp16" needs DeepSpeed\'s loss scaling, which --engine fsdp2 does not have; '
                         f'use "bf16": {{"enabled": true}} or fp32, or --engine deepspeed')
    try:
        batch_sizes(ds_config, int(os.environ.get("WORLD_SIZE", 1)))
    except InputError as err:
        raise InputError(f"{where}: {err}") from None
    scheduler = ds_config.get("scheduler")
    if scheduler:
        from deepspeed.runtime import lr_schedules
        name = scheduler.get("type")
        if not (hasattr(lr_schedules, str(name)) or hasattr(torch.optim.lr_scheduler, str(name))):
            raise InputError(f'{where}: unknown scheduler type "{name}"; use one of DeepSpeed\'s '
                             f"(WarmupCosineLR, WarmupDecayLR, WarmupLR, OneCycle, LRRangeTest)")


def batch_sizes(ds_config: dict, world: int) -> tuple[int, int]:
    """(micro-batch, gradient accumulation) as DeepSpeed derives them from any two of
    train_batch_size, train_micro_batch_size_per_gpu and gradient_accumulation_steps."""
    total = ds_config.get("train_batch_size")
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    accumulation = ds_config.get("gradient_accumulation_steps")
    if total is not None and micro is None:
        micro = total // ((accumulation or 1) * world)
    if total is not None and accumulation is None:
        accumulation = total // (micro * world)
    micro, accumulation = int(micro or 1), int(accumulation or 1)
    if total is not None and micro * accumulation * world != total:
        raise InputError(f"train_batch_size {total} is not train_micro_batch_size_per_gpu {micro} x "
                         f"gradient_accumulation_steps {accumulation} x {world} ranks; fix one of them")
    return micro, accumulation


def scheduler_from_config(ds_config: dict, optimizer):
    """The config's scheduler, the class DeepSpeed's engine builds for it (so the schedule is
    the one a DeepSpeed run gets); None without a scheduler section."""
    scheduler = ds_config.get("scheduler")
    if not scheduler:
        return None
    from deepspeed.runtime import lr_schedules
    cls = getattr(lr_schedules, scheduler["type"], None) or getattr(torch.optim.lr_scheduler, scheduler["type"])
    return cls(optimizer, **(scheduler.get("params") or {}))


def shard_model(model: torch.nn.Module, device: torch.device, bf16: bool) -> torch.nn.Module:
    """``fully_shard`` each decoder layer, then the root (embeddings, final norm, LM head), over
    all ranks; bf16 compute with fp32 parameters and reductions when ``bf16``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kw = {"mesh": mesh}
    if bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model.to(device)
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


class Fsdp2Engine:
    """A ``fully_shard`` model, its optimizer and LR schedule, behind the part of DeepSpeed's engine
    interface the pretraining job uses."""

    sharding = "FSDP2 (fully_shard per decoder layer and the root)"
    checkpoint_engine = None            # integrity.save_checkpoint: files are written when save returns

    def __init__(self, model: torch.nn.Module, ds_config: dict, device: torch.device):
        self.device = device
        self.bf16 = any((ds_config.get(k) or {}).get("enabled") is True for k in ("bf16", "bfloat16"))
        self.micro_batch, self.accumulation = batch_sizes(ds_config, dist.get_world_size())
        self.clipping = float(ds_config.get("gradient_clipping") or 0.0)
        self.module = shard_model(model, device, self.bf16)
        # built after fully_shard, which swaps the parameters for DTensors
        self.optimizer = build_optimizer(self.module, dict(ds_config["optimizer"]))
        self.lr_scheduler = scheduler_from_config(ds_config, self.optimizer)
        from deepspeed.monitor.config import get_monitor_config
        from deepspeed.monitor.monitor import MonitorMaster
        self.monitor = MonitorMaster(get_monitor_config(ds_config))
        self.global_steps, self.micro_steps, self.grad_norm = 0, 0, None

    # -- what the job reads ------------------------------------------------------------------

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.micro_batch

    def gradient_accumulation_steps(self) -> int:
        return self.accumulation

    def train_batch_size(self) -> int:
        return self.micro_batch * self.accumulation * dist.get_world_size()

    def bfloat16_enabled(self) -> bool:
        return self.bf16

    def fp16_enabled(self) -> bool:
        return False

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> float | None:
        """The norm of the whole gradient before clipping, of the last step (as DeepSpeed's)."""
        return self.grad_norm

    # -- training ----------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def backward(self, loss: torch.Tensor) -> None:
        # as DeepSpeed: each micro-batch's loss is scaled so that the accumulated gradient is the mean
        (loss / self.accumulation).backward()

    def step(self) -> None:
        """At the end of the gradient accumulation: clip, step, zero the gradients, advance the
        schedule; before, nothing (the gradients accumulate)."""
        self.micro_steps += 1
        if self.micro_steps % self.accumulation:
            return
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.clipping if self.clipping > 0 else float("inf"))
        self.grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.global_steps += 1

    # -- checkpoints -------------------------------------------------------------------------

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        return {"model": get_model_state_dict(self.module),
                "optim": get_optimizer_state_dict(self.module, self.optimizer)}

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict | None = None,
                        save_latest: bool = True) -> None:
        """Collective.  The model and optimizer through torch.distributed.checkpoint into
        ``save_dir/tag``, the run state and the schedule's into its ``client_state.pt``;
        ``latest`` is left to the caller (``integrity.save_checkpoint`` seals the folder first)."""
        import torch.distributed.checkpoint as dcp
        folder = Path(save_dir) / tag
        dcp.save(self._state(), checkpoint_id=str(folder))
        if dist.get_rank() == 0:
            extra = {"global_steps": self.global_steps,
                     "lr_scheduler": None if self.lr_scheduler is None else self.lr_scheduler.state_dict()}
            torch.save({**(client_state or {}), "engine": extra}, folder / CLIENT_STATE)
        dist.barrier()
        if save_latest and dist.get_rank() == 0:
            atomic_write(Path(save_dir) / "latest", tag)

    def load_checkpoint(self, load_dir: str, tag: str) -> tuple[str, dict]:
        """Collective.  Load ``load_dir/tag`` (at any world size: DCP reshards); its path and the
        client state."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
        folder = Path(load_dir) / tag
        state = self._state()
        dcp.load(state, checkpoint_id=str(folder))
        set_model_state_dict(self.module, state["model"])
        set_optimizer_state_dict(self.module, self.optimizer, state["optim"])
        client = torch.load(folder / CLIENT_STATE, map_location="cpu", weights_only=False)
        extra = client.pop("engine")
        self.global_steps = extra["global_steps"]
        self.micro_steps = self.global_steps * self.accumulation
        if self.lr_scheduler is not None and extra["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(extra["lr_scheduler"])
        return str(folder), client


def start(model: torch.nn.Module, ds_config: dict, local_rank: int) -> Fsdp2Engine:
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() and \
        os.environ.get("DS_ACCELERATOR", "cuda") != "cpu" else torch.device("cpu")
    return Fsdp2Engine(model, ds_config, device)
