"""Checkpoints of fused weights through the checkpoint tools (torchrun).

Usage: torchrun --nproc_per_node W tests/dist/fused_checkpoint_worker.py OUT.json DIR TP COMMAND

W ranks as TP × (W / TP) DP train tests/dist/fused_zero_worker.py's network (a SwiGLU ``linear_fc1``
with partition_stride 2 and a GQA fused QKV, megatron-core layers) with LDAdam on the same global
batches at every layout.  A case is ``<mode>:<stage>``; its files live in DIR/<mode>-<stage>/.

- ``save``: every case: ``BEFORE`` steps, ``engine.save_checkpoint``, ``AFTER`` more (the
  uninterrupted run, whose logical matrices rank 0 writes to straight.pt); rank 0 consolidates
  the checkpoint (whole/) and compares its per-block state with one process stepping the logical
  matrices (global) or each TP rank's blocks as matrices of their own (local) for ``BEFORE`` steps,
  writes it as DeepSpeed's Adam (adam/), and consolidates a copy saved without the fused layout
  (refused); then every rank resumes whole/ at this layout: the distance to the uninterrupted run.
- ``resume``: every case resumed from whole/ at this layout (and ZeRO 2), ``AFTER`` steps: the
  distance to the uninterrupted run; and LDAdam from the global and the local case's adam/ (TP 1:
  run in global and local mode), against one process starting the logical matrices from the same
  Adam moments (``load_whole_state``); and the global case resumed in local mode (refused).
"""

import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import finish  # noqa: E402
from fused_worker import unfuse  # noqa: E402
from fused_zero_worker import (OPTIMIZERS, Net, joined, label, logical_weights, reference_loss, separate,  # noqa: E402
                               start_weights)

import ds_lowrank  # noqa: E402
from ds_lowrank.checkpoint import (CheckpointError, adam_states, consolidate, load, resume, save,  # noqa: E402
                                   save_adam_universal)

BEFORE, AFTER, BATCH = 2, 2, 12
# "mode:stage", or "mode:stage:optimizer" for another optimizer than LDAdam
CASES = ("global:0", "global:2", "global:3", "local:0", "local:2", "global:2:galore")
# the cases whose group keeps a block on AdamW where its compressed state would cost more (at rank 4,
# the 12 × 10 blocks: gate, up, k, v of the whole matrices): their rows are joined and cut as
# AdamW's; the others compress every block
WITHIN_ADAMW = {"global:0", "global:3"}


def batches():
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(BATCH, 10, generator=gen) for _ in range(BEFORE + AFTER)]


def config(stage, dp):
    return {"train_micro_batch_size_per_gpu": BATCH // dp, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, "steps_per_print": 10**9, "gradient_clipping": 0.0,
            "zero_allow_untested_optimizer": True}


def name_of(case: str) -> str:
    parts = case.split(":")
    return parts[2] if len(parts) > 2 else "ldadam"


def optimizer(model, mode, within_adamw=True, name="ldadam"):
    cls, options = OPTIMIZERS[name]
    return cls([{"params": list(model.named_parameters()), "tensor_parallel": mode, "within_adamw": within_adamw}],
               **options)


def train(engine, xs, dp):
    from megatron.core import parallel_state

    micro = BATCH // dp
    lo = parallel_state.get_data_parallel_rank() * micro
    for x in xs:
        engine.backward(engine(x[lo:lo + micro]))
        engine.step()


def one_process(mode, tp, xs, within_adamw, name="ldadam"):
    """One process stepping the logical matrices (global) or each TP rank's blocks (local) on
    ``xs``: its parameters by ``separate``'s name, and its optimizer."""
    cls, options = OPTIMIZERS[name]
    params = {n: torch.nn.Parameter(t.clone())
              for n, t in separate({**start_weights(), "shift": torch.zeros(10)}, mode, tp).items()}
    opt = cls([{"params": [(label(n), p) for n, p in params.items()], "within_adamw": within_adamw}], **options)
    for x in xs:
        opt.zero_grad()
        reference_loss(joined(params), x).backward()
        opt.step()
    return params, opt


def state_error(c, mode, tp, xs, within_adamw, name="ldadam"):
    """The largest relative difference between the consolidated per-block state and one process's,
    and where; and which blocks it compressed."""
    params, opt = one_process(mode, tp, xs, within_adamw, name)
    worst = (-1.0, "")
    for n, p in params.items():
        if n in ("shift", "mix") or n == "fc2" or n.startswith("fc2@"):     # no fused weight's blocks
            continue
        weight, block = label(n).rstrip("]").split("[")
        if mode == "global":
            got = c.states[weight][block]
        else:
            got = c.shard_states[weight][int(n.split("@")[1])][block]
        for key, want in opt.state[p].items():
            scale = max(float(want.abs().max()), 1e-12)
            worst = max(worst, (float((got[key] - want).abs().max()) / scale, f"{n}:{key}"))
    compressed = sorted(n for n, p in params.items() if "basis" in opt.state[p])
    return worst, compressed


def rel_err(got, want):
    return max(float((got[n] - want[n]).abs().max() / want[n].abs().max()) for n in want)


def save_case(out, case, tp, dp):
    from megatron.core import parallel_state

    mode, stage = case.split(":")[0], int(case.split(":")[1])
    where = os.path.join(out, case.replace(":", "-"))
    xs = batches()
    model = Net(tp, start_weights())
    engine, _, _, _ = ds_lowrank.initialize(model=model, config=config(stage, dp), mpu=parallel_state,
                                            optimizer=optimizer(model, mode, case in WITHIN_ADAMW, name_of(case)))
    train(engine, xs[:BEFORE], dp)
    engine.save_checkpoint(os.path.join(where, "checkpoint"), tag="half")
    train(engine, xs[BEFORE:], dp)
    straight = logical_weights(engine, stage, tp)
    result = {}
    if dist.get_rank() == 0:
        torch.save(straight, os.path.join(where, "straight.pt"))
        c = consolidate(os.path.join(where, "checkpoint"), "half")
        result["state_err"], result["compressed"] = state_error(c, mode, tp, xs[:BEFORE], case in WITHIN_ADAMW,
                                                               name_of(case))
        result["blocks"] = sorted(c.states.get("fc1.weight", {})) if mode == "global" else \
            sorted(c.shard_states["fc1.weight"][0])
        save(c, os.path.join(where, "whole"))
        # the written form reads back the same
        back = load(os.path.join(where, "whole"))
        result["reread"] = adam_states(back)["qkv.weight"]["exp_avg"].equal(adam_states(c)["qkv.weight"]["exp_avg"])
        save_adam_universal(c, os.path.join(where, "adam"))
        # a checkpoint saved before the optimizers recorded fused layouts
        old = os.path.join(where, "old")
        shutil.copytree(os.path.join(where, "checkpoint"), old)
        for f in os.listdir(os.path.join(old, "half")):
            path = os.path.join(old, "half", f)
            sd = torch.load(path, weights_only=False)
            inner = sd["optimizer"] if "optimizer" in sd and isinstance(sd["optimizer"], dict) and \
                "fused" in sd["optimizer"] else None
            if inner is None and "optimizer_state_dict" in sd:
                osd = sd["optimizer_state_dict"]
                inner = osd.get("base_optimizer_state") or osd.get("optimizer_state_dict")
            if isinstance(inner, dict) and "fused" in inner:
                del inner["fused"]
                torch.save(sd, path)
        try:
            consolidate(old, "half")
            result["old"] = None
        except CheckpointError as err:
            result["old"] = str(err)
    dist.barrier()
    result["same_layout"] = resumed(out, case, tp, dp, stage)["rel_err"]
    return result


def resumed(out, case, tp, dp, stage, mode=None):
    from megatron.core import parallel_state

    mode = mode or case.split(":")[0]
    where = os.path.join(out, case.replace(":", "-"))
    xs = batches()
    model = Net(tp, start_weights())
    engine, _, _, _ = resume(os.path.join(where, "whole"), model, config(stage, dp),
                             optimizer(model, mode, case in WITHIN_ADAMW, name_of(case)), mpu=parallel_state)
    train(engine, xs[BEFORE:], dp)
    got = logical_weights(engine, stage, tp)
    straight = torch.load(os.path.join(where, "straight.pt"))
    got.pop("shift"), straight.pop("shift")
    errs = [None] * dist.get_world_size()
    dist.all_gather_object(errs, rel_err(got, straight))
    return {"rel_err": max(errs)}


def from_adam(out, case, tp, dp, mode):
    """LDAdam (``mode``, ZeRO 2) from the case's Adam checkpoint against one process starting the
    logical matrices from the same moments (the test's own unfusing of them): at TP 1 the blocks
    of either mode are the logical matrices."""
    from megatron.core import parallel_state

    where = os.path.join(out, case.replace(":", "-"))
    xs = batches()
    model = Net(tp, start_weights())
    adam = load(os.path.join(where, "adam", "half"))
    engine, _, _, _ = resume(adam, model, config(2, dp), optimizer(model, mode), mpu=parallel_state)
    train(engine, xs[BEFORE:], dp)
    got = logical_weights(engine, 2, tp)
    moments = {k: unfuse([{"fc1": adam.states["fc1.weight"][k].view(-1, 10),
                           "qkv": adam.states["qkv.weight"][k].view(-1, 10)}], 1) for k in ("exp_avg", "exp_avg_sq")}
    start = {n: {"exp_avg": moments["exp_avg"][n], "exp_avg_sq": moments["exp_avg_sq"][n],
                 "step": adam.states["qkv.weight"]["step"]} for n in moments["exp_avg"]}
    start["fc2"] = {k: adam.states["fc2.weight"][k].view(10, -1) if k != "step" else adam.states["fc2.weight"][k]
                    for k in ("exp_avg", "exp_avg_sq", "step")}
    start["mix"] = {k: adam.states["mix.weight"][k].view(10, -1) if k != "step" else adam.states["mix.weight"][k]
                    for k in ("exp_avg", "exp_avg_sq", "step")}
    start["shift"] = {k: adam.states["shift"][k] for k in ("exp_avg", "exp_avg_sq", "step")}
    # the weights at the save, as the checkpoint holds them
    logical = unfuse([{"fc1": adam.weights["fc1.weight"], "qkv": adam.weights["qkv.weight"]}], 1)
    params = {n: torch.nn.Parameter(t.clone()) for n, t in
              {**logical, "fc2": adam.weights["fc2.weight"], "mix": adam.weights["mix.weight"],
               "shift": adam.weights["shift"]}.items()}
    cls, options = OPTIMIZERS["ldadam"]
    opt = cls([{"params": [(label(n), p) for n, p in params.items()]}], **options)
    opt.load_whole_state({label(n): st for n, st in start.items()}, from_adam=True)
    for x in xs[BEFORE:]:
        opt.zero_grad()
        reference_loss(joined(params), x).backward()
        opt.step()
    want = {n: p.detach() for n, p in params.items()}
    got.pop("shift"), want.pop("shift")
    errs = [None] * dist.get_world_size()
    dist.all_gather_object(errs, rel_err(got, want))
    return {"rel_err": max(errs), "moved": rel_err(want, {**logical, "fc2": adam.weights["fc2.weight"],
                                                           "mix": adam.weights["mix.weight"]})}


def main():
    import deepspeed
    from megatron.core import parallel_state

    out_path, out, tp, command = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    deepspeed.init_distributed(dist_backend="gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    dp = dist.get_world_size() // tp
    results = {"tp": tp, "dp": dp}
    for case in CASES:
        if command == "save":
            results[case] = save_case(out, case, tp, dp)
        else:
            results[case] = resumed(out, case, tp, dp, 2)
    if command == "resume":
        results["fromadam:global"] = from_adam(out, "global:2", tp, dp, "global")
        results["fromadam:local"] = from_adam(out, "local:2", tp, dp, "local")
        try:
            resumed(out, "global:2", tp, dp, 2, mode="local")
            results["aslocal"] = None
        except CheckpointError as err:
            results["aslocal"] = str(err)
    finish(out_path, results)


if __name__ == "__main__":
    main()
