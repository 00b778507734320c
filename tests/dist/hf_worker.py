"""HF Trainer, accelerate and plain DeepSpeed with ds_lowrank's optimizers, on a tiny Llama (one
CPU process, launched by torchrun).

Usage: torchrun --nproc_per_node 1 tests/dist/hf_worker.py OUT.json WORKDIR
Every route trains the same 4 steps on the same batches, in order; the test compares each
route's losses with a plain torch loop of the same optimizer and says which optimizer the
engine ran.  Results go to OUT.json.
"""

import argparse
import json
import os
import sys
import warnings

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

import ds_lowrank  # noqa: E402
from ds_lowrank import LDAdam  # noqa: E402
from ds_lowrank.integration.hf import LowRankTrainer, lowrank_optimizer  # noqa: E402

OUT, WORK = sys.argv[1], sys.argv[2]
STEPS, BATCH, LR, RANK = 4, 2, 1e-2, 4
TARGETS = ["self_attn", "mlp"]
DATA = [torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i)) for i in range(STEPS * BATCH)]
DATASET = [{"input_ids": x, "labels": x} for x in DATA]
results = {}


def tiny_llama(from_config=False):
    torch.manual_seed(0)
    build = LlamaForCausalLM._from_config if from_config else LlamaForCausalLM
    return build(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=32))


def training_args(name, deepspeed=None, **kw):
    base = dict(output_dir=os.path.join(WORK, name), per_device_train_batch_size=BATCH, max_steps=STEPS,
                learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", report_to=[],
                use_cpu=deepspeed is None, disable_tqdm=True, seed=0, optim_target_modules=TARGETS)
    return TrainingArguments(**{**base, **kw}, deepspeed=deepspeed)


def recording(cls):
    class Recording(cls):
        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            self.losses.append(loss.item())
            return loss
    Recording.losses = None
    return Recording


def run(cls, args, resume=None, **kw):
    """Train with a Trainer class; returns (losses, trainer, warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = recording(cls)(model=kw.pop("model", None) or tiny_llama(), args=args, train_dataset=DATASET, **kw)
        kw.clear()      # the Trainer holds the only references, as when they are written inline in the call
        trainer.losses = []
        trainer.train(resume_from_checkpoint=resume)
    return trainer.losses, trainer, ours(caught)


def ours(caught):
    """The messages of ds_lowrank's warnings among ``caught``."""
    return [str(w.message) for w in caught if "ds_lowrank" in str(w.message) or "compresses" in str(w.message)]


def recorded(route):
    """``route()``'s result, with the ds_lowrank warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = route()
    return {**result, "warnings": ours(caught)}


def engine_optimizer(trainer):
    engine = getattr(trainer, "deepspeed", None) or trainer.model_wrapped
    optimizer = getattr(engine, "basic_optimizer", None) or getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return type(optimizer).__name__


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState, PartialState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def ds_config(stage, optimizer=True, **params):
    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "gradient_clipping": "auto", "zero_optimization": {"stage": stage}}
    if optimizer:
        cfg["optimizer"] = {"type": "LDAdam", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                        "weight_decay": "auto", "rank": RANK,
                                                        "target_modules": TARGETS, **params}}
    return cfg


def reference(weights=None):
    """A plain torch loop: LDAdam over the groups LowRankTrainer builds, the same batches."""
    model = tiny_llama()
    if weights is not None:
        model.load_state_dict(weights)
    opt = lowrank_optimizer(model, training_args("ref"), "LDAdam", rank=RANK)
    losses = []
    for step in range(STEPS):
        ids = torch.stack(DATA[step * BATCH:(step + 1) * BATCH])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    lowrank = sorted(n for g in opt.param_groups for n, p in zip(g["param_names"], g["params"])
                     if LDAdam.is_compressed(g, p))
    return losses, lowrank


def main():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results["reference"], results["reference_lowrank"] = reference()
    results["reference_run"] = {"warnings": ours(caught)}

    # Trainer without DeepSpeed: AdamW (its default), then LowRankTrainer, with a checkpoint at step 2
    results["adamw"], _, _ = run(Trainer, training_args("adamw"))
    reset_accelerate()
    losses, trainer, msgs = run(LowRankTrainer, training_args("plain", save_strategy="steps", save_steps=2),
                                optimizer_kwargs={"rank": RANK})
    results["plain"] = {"losses": losses, "optimizer": engine_optimizer(trainer), "warnings": msgs}
    reset_accelerate()
    losses, trainer, msgs = run(LowRankTrainer, training_args("plain"), optimizer_kwargs={"rank": RANK},
                                resume=os.path.join(WORK, "plain", "checkpoint-2"))
    results["plain_resumed"] = {"losses": losses, "optimizer": engine_optimizer(trainer), "warnings": msgs}
    reset_accelerate()
    # an instance passed to plain Trainer, no DeepSpeed: HF keeps it
    model = tiny_llama()
    opt = lowrank_optimizer(model, training_args("inst"), "LDAdam", rank=RANK)
    losses, trainer, msgs = run(Trainer, training_args("inst"), model=model, optimizers=(opt, None))
    results["plain_instance"] = {"losses": losses, "optimizer": engine_optimizer(trainer), "warnings": msgs}
    reset_accelerate()

    # plain Trainer under DeepSpeed (stages 2 and 0, nothing registered) drops an instance passed
    # as optimizers=(...) and trains its AdamW: told, whether the instance is garbage-collected
    # there (written inline) or still referenced by the caller
    for name, stage, inline in (("ds2_dropped", 2, True), ("ds2_dropped_held", 2, False),
                                ("ds0_dropped", 0, True)):
        model = tiny_llama()
        args = training_args("drop", ds_config(stage, optimizer=False), max_steps=2)
        held = None if inline else lowrank_optimizer(model, args, "LDAdam", rank=RANK)
        losses, trainer, msgs = run(Trainer, args, model=model, optimizers=(
            lowrank_optimizer(model, args, "LDAdam", rank=RANK) if inline else held, None))
        results[name] = {"losses": losses, "optimizer": engine_optimizer(trainer), "warnings": msgs}
        del held
        reset_accelerate()

    # HF Trainer + DeepSpeed ZeRO-2, "type": "LDAdam" in the config (plain Trainer, registered)
    ds_lowrank.register_deepspeed_optimizers()
    losses, trainer, msgs = run(Trainer, training_args("ds2", ds_config(2), save_strategy="steps", save_steps=2))
    results["ds2_config"] = {"losses": losses, "optimizer": engine_optimizer(trainer), "warnings": msgs}
    reset_accelerate()
    losses, trainer, msgs = run(Trainer, training_args("ds2", ds_config(2)),
                                resume=os.path.join(WORK, "ds2", "checkpoint-2"))
    results["ds2_config_resumed"] = {"losses": losses, "optimizer": engine_optimizer(trainer), "warnings": msgs}
    reset_accelerate()
    # LowRankTrainer + DeepSpeed ZeRO-2 without an optimizer section: its optimizer goes to DeepSpeed
    losses, trainer, msgs = run(LowRankTrainer, training_args("ds2k", ds_config(2, optimizer=False)),
                                optimizer_kwargs={"rank": RANK})
    results["ds2_lowrank_trainer"] = {"losses": losses, "optimizer": engine_optimizer(trainer), "warnings": msgs}
    reset_accelerate()
    # LowRankTrainer keeps an instance passed as optimizers=(...) under DeepSpeed
    model = tiny_llama()
    args = training_args("ds2i", ds_config(2, optimizer=False))
    losses, trainer, msgs = run(LowRankTrainer, args, model=model,
                                optimizers=(lowrank_optimizer(model, args, "LDAdam", rank=RANK), None))
    results["ds2_lowrank_trainer_instance"] = {"losses": losses, "optimizer": engine_optimizer(trainer),
                                               "warnings": msgs}
    reset_accelerate()
    # HF's optimizer_cls_and_kwargs under DeepSpeed: every matrix low-rank, embeddings included: told
    losses, trainer, msgs = run(Trainer, training_args("clskw", ds_config(2, optimizer=False), max_steps=1),
                                optimizer_cls_and_kwargs=(LDAdam, {"rank": RANK, "lr": LR}))
    results["ds2_cls_and_kwargs"] = {"optimizer": engine_optimizer(trainer), "warnings": msgs}
    reset_accelerate()

    # accelerate with its DeepSpeed plugin and DummyOptim
    results["accelerate"] = recorded(accelerate_route)
    reset_accelerate()

    # plain deepspeed.initialize and ds_lowrank.initialize, every argument form
    results["plain_deepspeed"] = recorded(plain_deepspeed)

    # HF Trainer + DeepSpeed ZeRO-3 (model built after the arguments: zero.Init partitions it)
    args = training_args("ds3", ds_config(3))
    model = tiny_llama(from_config=True)
    results["ds3_partitioned_at_init"] = hasattr(next(model.parameters()), "ds_shape")
    import deepspeed
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results["ds3_reference"], _ = reference(weights)
    losses, trainer, msgs = run(Trainer, args, model=model)
    results["ds3_config"] = {"losses": losses, "optimizer": engine_optimizer(trainer), "warnings": msgs}
    reset_accelerate()
    # LowRankTrainer at ZeRO-3, no optimizer section: its optimizer, built over the partitioned
    # model, goes to DeepSpeed
    args = training_args("ds3k", ds_config(3, optimizer=False))
    model = tiny_llama(from_config=True)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        same_weights = all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    losses, trainer, msgs = run(LowRankTrainer, args, model=model, optimizer_kwargs={"rank": RANK})
    results["ds3_lowrank_trainer"] = {"losses": losses, "optimizer": engine_optimizer(trainer), "warnings": msgs,
                                      "same_initial_weights": same_weights}
    reset_accelerate()
    # ZeRO-3, plain Trainer dropping an instance built over the partitioned model: told
    args = training_args("ds3d", ds_config(3, optimizer=False), max_steps=1)
    model = tiny_llama(from_config=True)
    losses, trainer, msgs = run(Trainer, args, model=model,
                                optimizers=(lowrank_optimizer(model, args, "LDAdam", rank=RANK), None))
    results["ds3_dropped"] = {"optimizer": engine_optimizer(trainer), "warnings": msgs}

    with open(OUT, "w") as f:
        json.dump(results, f)


def accelerate_route():
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DummyOptim

    cfg = ds_config(2)
    cfg["train_micro_batch_size_per_gpu"] = BATCH
    cfg["gradient_accumulation_steps"] = 1
    cfg["gradient_clipping"] = 0.0
    cfg["optimizer"]["params"].update(betas=[0.9, 0.999], eps=1e-8)   # TrainingArguments' defaults, as in the reference
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg))
    model = tiny_llama()
    loader = torch.utils.data.DataLoader(DATA, batch_size=BATCH)
    engine, optimizer, loader = accelerator.prepare(model, DummyOptim(model.parameters(), lr=LR), loader)
    losses = []
    for ids in loader:
        loss = engine(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "optimizer": type(engine.basic_optimizer).__name__}


def plain_deepspeed():
    import deepspeed

    cfg = {"train_micro_batch_size_per_gpu": BATCH,
           "optimizer": {"type": "LDAdam", "params": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8, "rank": RANK,
                                                     "target_modules": TARGETS}},
           "zero_optimization": {"stage": 2}}
    path = os.path.join(WORK, "ds.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    found = {}
    forms = {
        "deepspeed.initialize(args=Namespace)": lambda m: deepspeed.initialize(
            args=argparse.Namespace(deepspeed_config=path, local_rank=0), model=m),
        "ds_lowrank.initialize(args=Namespace)": lambda m: ds_lowrank.initialize(
            argparse.Namespace(deepspeed_config=path, local_rank=0), m),
        "ds_lowrank.initialize(config_params=)": lambda m: ds_lowrank.initialize(model=m, config_params=cfg),
        "ds_lowrank.initialize(None, model, config=)": lambda m: ds_lowrank.initialize(None, m, config=path),
    }
    for name, build in forms.items():
        engine, optimizer, _, _ = build(tiny_llama())
        ids = torch.stack(DATA[:BATCH])
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        ids = torch.stack(DATA[BATCH:2 * BATCH])
        found[name] = {"optimizer": type(engine.basic_optimizer).__name__,
                       "losses": [loss.item(), engine(input_ids=ids, labels=ids).loss.item()]}
    return {"forms": found}


if __name__ == "__main__":
    main()
