"""What multi-rank test workers share: training a small net, reading it whole, and the end of a run."""

import json
import os

import torch
import torch.distributed as dist


def finish(out_path: str, results: dict) -> None:
    """Rank 0 writes ``results`` to ``out_path`` (atomically); then every rank leaves."""
    if dist.get_rank() == 0:
        with open(out_path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(out_path + ".tmp", out_path)
    dist.barrier()
    # Tear the process groups down before exit: gloo's threads dying with the interpreter
    # can abort a process that has finished its work.
    dist.destroy_process_group()


def held_bytes(opt) -> dict[str, int]:
    """``"label|key"`` -> bytes of every state tensor ``opt`` holds on this rank, as
    ``ds_lowrank.optim.state_layout`` walks its state (ZeRO pieces name themselves; a whole or
    FSDP2 parameter is named by its group)."""
    from ds_lowrank.optim import state_layout
    from ds_lowrank.optim.base import param_label

    labels = {id(p): param_label(g, g.get("group_index", gi), i)
              for gi, g in enumerate(opt.param_groups) for i, p in enumerate(g["params"])}
    out: dict[str, int] = {}
    for p, st in opt.state.items():
        for h in state_layout.held(st, labels.get(id(p)), p):
            for key, n in h.nbytes().items():
                out[f"{h.label}|{key}"] = out.get(f"{h.label}|{key}", 0) + n
    return out


def layout_report(opt, ref_opt=None) -> dict:
    """Every rank's ``held_bytes`` and ``state_bytes()``, the category of each state key, and
    with ``ref_opt`` (one process) its ``held_bytes``: what the tests compare.  Collective."""
    mine = held_bytes(opt)
    held: list = [None] * dist.get_world_size()
    dist.all_gather_object(held, mine)
    counted: list = [None] * dist.get_world_size()
    dist.all_gather_object(counted, opt.state_bytes())
    keys = {lk.rsplit("|", 1)[1] for rank in held for lk in rank}
    out = {"held": held, "state_bytes": counted,
           "categories": {k: opt.state_categories.get(k, "counters") for k in keys}}
    if ref_opt is not None:
        out["held_single"] = held_bytes(ref_opt)
    return out


def train(net, opt, first: int, last: int, *, batch) -> list[float]:
    """Steps ``first`` to ``last`` of an MSE fit on ``batch(step) -> (x, y)``: the losses."""
    losses = []
    for step in range(first, last):
        x, y = batch(step)
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def full_state(net) -> dict:
    """``net``'s state dict with every DTensor gathered whole, detached copies."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in net.state_dict().items()}


def train_data_parallel(engine, data, batch: int) -> list[float]:
    """An MSE fit of DeepSpeed ``engine`` on global batches ``data`` of ``batch`` samples, each
    data-parallel rank taking its slice (the tensor-parallel ranks of one DP rank the same): the
    losses."""
    from megatron.core import parallel_state
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    micro = batch // dp
    losses = []
    for x, y in data:
        lo = rank * micro
        loss = torch.nn.functional.mse_loss(engine(x[lo:lo + micro]), y[lo:lo + micro])
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses


def adam_loaded_error(engine, expected: dict, tp_rank: int, tp: int) -> float:
    """The largest difference on this rank between what DeepSpeed's AdamW ``engine`` loaded (fp32
    weights and moments) and ``expected`` (``{name: {key: whole tensor}}``), a tensor-parallel
    parameter's cut to its shard."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from ds_lowrank.checkpoint.tensor_parallel import shard_of
    worst = 0.0
    for name, p in engine.module.named_parameters():
        loaded = {"fp32": safe_get_full_fp32_param(p), "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                  "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
        for key, value in loaded.items():
            want = expected[name][key]
            if getattr(p, "tensor_model_parallel", False):
                want = shard_of(want, name, p.partition_dim, getattr(p, "partition_stride", 1), tp_rank, tp)
            worst = max(worst, float((value.float() - want).abs().max()))
    return worst
