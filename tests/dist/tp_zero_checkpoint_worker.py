"""Checkpoints of tensor_parallel="global" runs under ZeRO, through the checkpoint tools (torchrun).

Usage: torchrun --nproc_per_node W tests/dist/tp_zero_checkpoint_worker.py OUT.json DIR TP COMMAND...

W ranks as TP × (W / TP) DP, training tests/dist/tp_zero_worker.py's megatron-core model (column-
and row-parallel layers) in global mode under ``ds_lowrank.initialize(mpu=parallel_state)``, on
the same global batches at every layout.  A case is ``<optimizer>:<stage>`` (global mode) or
``local:<optimizer>:<stage>``; its files live in DIR/<case with "-" for ":">/.  Commands:

- ``save:<case>``: ``BEFORE`` steps, ``engine.save_checkpoint`` to checkpoint/, ``AFTER`` more;
  rank 0 writes reference.pt: the whole weights at the save and at the end, and one process
  training the whole layers for ``BEFORE`` steps: its weights and optimizer state by name;
- ``resume:<case>:<stage>``: ``checkpoint.resume`` from whole/ (which the test consolidated) at
  this layout and stage, ``AFTER`` steps: the distance to the uninterrupted run's end, or the
  error ``resume`` refuses it with; ``fresh:<case>:<stage>``: the same without the optimizer state;
  ``aslocal:<case>:<stage>``: a run in tensor_parallel="local" mode resuming it;
- ``fromadam:<case>``: the same optimizer (global, ZeRO 2) from adam/ (``--to adam``), ``AFTER``
  steps, against one process starting from the same Adam state (``load_whole_state``);
- ``dsadam:<case>``: DeepSpeed's AdamW (ZeRO 1) loads adam/: its fp32 weights and moments against
  this TP rank's part of adam_expected.pt (written by the test).
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import adam_loaded_error, finish, train_data_parallel  # noqa: E402
from tp_zero_worker import LAYERS, OPTIMIZERS, Net, Whole, trained, whole_weights  # noqa: E402

import ds_lowrank  # noqa: E402
from ds_lowrank import lowrank_param_groups  # noqa: E402
from ds_lowrank.checkpoint import CheckpointError, load, resume  # noqa: E402
from ds_lowrank.distributed.tensor_parallel import as_deepspeed_mpu  # noqa: E402

# a global batch every DP size here (1, 2, 3) divides, above the optimizers' rank 4
BEFORE, AFTER, BATCH = 3, 3, 12


def folder(out, case):
    return os.path.join(out, case.replace(":", "-"))


def parse(case):
    """``(optimizer, stage, mode)`` of a case."""
    parts = case.split(":")
    mode = "local" if parts[0] == "local" else "global"
    name, stage = parts[-2], int(parts[-1])
    return name, stage, mode


def batches(steps, skip=0):
    gen = torch.Generator().manual_seed(5)
    out = [(torch.randn(BATCH, LAYERS[0][0], generator=gen), torch.randn(BATCH, LAYERS[-1][1], generator=gen))
           for _ in range(skip + steps)]
    return out[skip:]


def config(stage, dp):
    return {"train_micro_batch_size_per_gpu": BATCH // dp, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, "steps_per_print": 10**9, "gradient_clipping": 0.0,
            "zero_allow_untested_optimizer": True}


def layout():
    from megatron.core import parallel_state
    return parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_data_parallel_world_size()


def optimizer(model, name, mode):
    cls, options = OPTIMIZERS[name]
    return cls(lowrank_param_groups(model, within_adamw=False, tensor_parallel=mode), **options)


def train(engine, data):
    return train_data_parallel(engine, data, BATCH)


def one_process(name, model, data, opt=None):
    """One process training ``model`` (the whole layers) with ``opt`` (by default a fresh
    optimizer): the optimizer."""
    if opt is None:
        cls, options = OPTIMIZERS[name]
        opt = cls(lowrank_param_groups(model, within_adamw=False), **options)
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return opt


def save(out, case):
    from megatron.core import parallel_state
    name, stage, mode = parse(case)
    tp, dp = layout()
    model = Net(tp)
    start = whole_weights(model)
    engine, _, _, _ = ds_lowrank.initialize(model=model, optimizer=optimizer(model, name, mode),
                                            config=config(stage, dp), mpu=parallel_state)
    train(engine, batches(BEFORE))
    engine.save_checkpoint(os.path.join(folder(out, case), "checkpoint"), tag="half")
    at_save = trained(engine, stage)
    losses = train(engine, batches(AFTER, skip=BEFORE))
    at_end = trained(engine, stage)
    if dist.get_rank() == 0:
        whole = Whole(start)
        opt = one_process(name, whole, batches(BEFORE))
        named = dict(whole.named_parameters())
        torch.save({"at_save": at_save, "at_end": at_end,
                    "one_process": {"weights": {n: p.detach() for n, p in named.items()},
                                    "states": {n: opt.state[p] for n, p in named.items()}}},
                   os.path.join(folder(out, case), "reference.pt"))
    return {"losses": losses}


def relative(got, want):
    return max(float((got[n] - want[n]).abs().max() / want[n].abs().max()) for n in want)


def resumed(out, case, stage, fresh=False, mode=None):
    """``fresh``: the control, the weights alone (every optimizer state dropped); ``mode``: the
    tensor_parallel mode of the run resuming (default: the saved one)."""
    from megatron.core import parallel_state
    name, _, saved = parse(case)
    mode = mode or saved
    tp, dp = layout()
    model = Net(tp)
    source = load(os.path.join(folder(out, case), "whole"))
    if fresh:
        source.states.clear()
    try:
        engine, _, _, _ = resume(source, model, config(stage, dp), optimizer(model, name, mode), mpu=parallel_state)
    except CheckpointError as err:
        return {"refused": f"{type(err).__name__}: {err}"}
    steps = engine.global_steps
    losses = train(engine, batches(AFTER, skip=BEFORE))
    got = trained(engine, stage)
    ref = torch.load(os.path.join(folder(out, case), "reference.pt"))
    return {"rel_err": relative(got, ref["at_end"]), "global_steps": steps, "losses": losses,
            "moved": max(float((got[n] - ref["at_save"][n]).abs().max()) for n in got)}


def from_adam(out, case):
    """The optimizer, global mode, ZeRO 2 at this layout, from the Adam checkpoint, against one
    process started from the same Adam state."""
    from megatron.core import parallel_state
    name, _, _ = parse(case)
    tp, dp = layout()
    source = os.path.join(folder(out, case), "adam", "half")
    model = Net(tp)
    engine, _, _, _ = resume(source, model, config(2, dp), optimizer(model, name, "global"), mpu=parallel_state)
    train(engine, batches(AFTER, skip=BEFORE))
    got = trained(engine, 2)
    adam = load(source)
    whole = Whole(adam.weights)
    cls, options = OPTIMIZERS[name]
    opt = cls(lowrank_param_groups(whole, within_adamw=False), **options)
    opt.load_whole_state(adam.states, from_adam=True)
    one_process(name, whole, batches(AFTER, skip=BEFORE), opt)
    want = {n: p.detach() for n, p in whole.named_parameters()}
    return {"rel_err": relative(got, want), "moved": max(float((want[n] - adam.weights[n]).abs().max()) for n in want)}


def ds_adam(out, case):
    """DeepSpeed's AdamW at ZeRO 1 loads the Adam checkpoint at this layout: each shard's fp32
    weights and moments are its part of the whole ones."""
    from megatron.core import parallel_state
    tp, dp = layout()
    rank = parallel_state.get_tensor_model_parallel_rank()
    expected = torch.load(os.path.join(folder(out, case), "adam_expected.pt"))
    model = Net(tp)
    cfg = {"train_micro_batch_size_per_gpu": BATCH // dp, "zero_optimization": {"stage": 1},
           "steps_per_print": 10**9, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
           "checkpoint": {"load_universal": True}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg,
                                           mpu=as_deepspeed_mpu(parallel_state))
    engine.load_checkpoint(os.path.join(folder(out, case), "adam"))
    worst = adam_loaded_error(engine, expected, rank, tp)
    errs = [None] * dist.get_world_size()
    dist.all_gather_object(errs, worst)
    return {"max_err": max(errs)}


def main():
    from megatron.core import parallel_state
    out_path, out, tp = sys.argv[1], sys.argv[2], int(sys.argv[3])
    deepspeed.init_distributed(dist_backend="gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    results = {"world": dist.get_world_size(), "tp": tp}
    for command in sys.argv[4:]:
        kind, rest = command.split(":", 1)
        print(f"command {command}", file=sys.stderr, flush=True)
        if kind == "save":
            results[command] = save(out, rest)
        elif kind in ("resume", "fresh", "aslocal"):
            case, stage = rest.rsplit(":", 1)
            results[command] = resumed(out, case, int(stage), fresh=kind == "fresh",
                                       mode="local" if kind == "aslocal" else None)
        elif kind == "fromadam":
            results[command] = from_adam(out, rest)
        elif kind == "dsadam":
            results[command] = ds_adam(out, rest)
        else:
            raise SystemExit(f"unknown command {command}")
    finish(out_path, results)


if __name__ == "__main__":
    main()
