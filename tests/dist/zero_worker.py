"""Run ds_lowrank's optimizers under DeepSpeed ZeRO and compare with a single-process run
(launched by torchrun).

Usage: torchrun --nproc_per_node N tests/dist/zero_worker.py OUT.json [check ...]
A check is ``kind:stage`` (LDAdam) or ``kind:stage:optimizer``.  Every rank runs every check;
rank 0 writes what it measured to OUT.json, and the test asserts.
"""

import os
import sys
import tempfile

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import finish, layout_report  # noqa: E402

import ds_lowrank  # noqa: E402
from ds_lowrank import Adapprox, GaLoreAdamW, LDAdam, MicroAdam, lowrank_param_groups  # noqa: E402
from ds_lowrank import memory  # noqa: E402
from ds_lowrank.distributed import comm  # noqa: E402
from ds_lowrank.distributed import phases  # noqa: E402
from ds_lowrank.distributed.zero_layout import cut_rows  # noqa: E402

WORKER_DIR = os.path.dirname(os.path.abspath(__file__))
RANK = 4
GLOBAL_BATCH = 12


def make_model(seed=0):
    """Tall, square, tall and wide matrices whose partitions cut rows at 2 and 3 ranks."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(10, 13), torch.nn.Tanh(),            # 13×10 tall (right)
        torch.nn.Linear(13, 13, bias=False), torch.nn.Tanh(),  # square (left)
        torch.nn.Linear(13, 29), torch.nn.Tanh(),            # 29×13 tall, 29 rows: not divisible
        torch.nn.Linear(29, 7),                              # 7×29 wide (left)
    )


def batches(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(GLOBAL_BATCH, 10, generator=gen), torch.randn(GLOBAL_BATCH, 7, generator=gen))
            for _ in range(steps)]


# Each optimizer with settings that make the small model exercise it: GaLore refreshes its
# subspace every 3 steps (by SVD of matrices gathered whole), Adapprox re-evaluates its ranks
# every 2 steps and takes vectors through its dense second moment, MicroAdam's 16-element
# blocks are cut between ranks.  within_adamw=False: every matrix compressed, although some of
# these small ones would cost more than AdamW that way (and be kept dense by default).
OPTIMIZERS = {
    "ldadam": lambda model: LDAdam(lowrank_param_groups(model, rank=RANK, within_adamw=False), lr=1e-2,
                                   weight_decay=0.01),
    "ldadam_svd": lambda model: LDAdam(lowrank_param_groups(model, rank=RANK, within_adamw=False), lr=1e-2,
                                       weight_decay=0.01, basis_init="svd"),
    # compressed error feedback: 4-element buckets cut the rows of 10, 13 and 29 elements into
    # several, the last of each row partial; stochastic rounding draws per element of the matrix
    "ldadam_int4": lambda model: LDAdam(lowrank_param_groups(model, rank=RANK, within_adamw=False), lr=1e-2,
                                        weight_decay=0.01, ef_dtype="int4", ef_bucket_size=4,
                                        ef_rounding="stochastic"),
    "ldadam_int8": lambda model: LDAdam(lowrank_param_groups(model, rank=RANK, within_adamw=False), lr=1e-2,
                                        weight_decay=0.01, ef_dtype="int8", ef_bucket_size=6),
    "galore": lambda model: GaLoreAdamW(lowrank_param_groups(model, rank=RANK, update_proj_gap=3,
                                                             within_adamw=False), lr=1e-2, weight_decay=0.01),
    "adapprox": lambda model: Adapprox([{"params": list(model.named_parameters()), "within_adamw": False}],
                                       lr=1e-2, weight_decay=0.01, rank_min=1, rank_init=2, rank_max=RANK,
                                       rank_interval=2),
    "microadam": lambda model: MicroAdam([{"params": list(model.named_parameters()), "within_adamw": False}],
                                         lr=1e-2, weight_decay=0.01, window=3, density=0.25, block_size=16,
                                         bucket_size=8),
    # rank 8 for the rank-4 gradients of deficient_model, no weight decay (it would move every row)
    "ldadam_r8": lambda model: LDAdam(lowrank_param_groups(model, rank=8, within_adamw=False), lr=1e-2),
    "galore_r8": lambda model: GaLoreAdamW(lowrank_param_groups(model, rank=8, update_proj_gap=2,
                                                                proj_method="randomized", within_adamw=False),
                                           lr=1e-2),
}
OPTIMIZER = "ldadam"     # the one the checks below use; set per check by main()
CHECKPOINT = "ldadam"    # where save/reshard keep its checkpoint: the check's name, "@…" included


def optimizer_for(model):
    return OPTIMIZERS[OPTIMIZER](model)


def single_process(steps, jitter_seed=None):
    """One process on the global batch; with ``jitter_seed``, each gradient entry scaled by
    ``1 + 1e-6·N(0, 1)``: rounding-sized noise, as a different order of the ranks' sums gives."""
    model = make_model()
    opt = optimizer_for(model)
    gen = None if jitter_seed is None else torch.Generator().manual_seed(jitter_seed)
    for x, y in batches(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if gen is not None:
            for p in model.parameters():
                p.grad.mul_(1 + 1e-6 * torch.randn(p.grad.shape, generator=gen))
        opt.step()
    return model, opt


def rel_err(model, ref):
    """Largest entry of the difference of two models' weights, relative to each weight's largest."""
    got = dict(model.named_parameters())
    return max(float((got[n].detach() - p.detach()).abs().max() / p.detach().abs().max())
               for n, p in ref.named_parameters())


def engine_for(stage, model=None, accumulation=1, via_config=False, **extra):
    """A DeepSpeed engine: our optimizer handed to deepspeed.initialize (bound lazily at the
    first step), or built by ds_lowrank.initialize from the config's optimizer section."""
    model = model or make_model()
    cfg = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // dist.get_world_size() // accumulation,
           "gradient_accumulation_steps": accumulation,
           "zero_optimization": {"stage": stage}, "steps_per_print": 10**9, **extra}
    if via_config:
        assert OPTIMIZER == "ldadam"
        cfg["optimizer"] = {"type": "ldadam", "params": {"rank": RANK, "lr": 1e-2, "weight_decay": 0.01,
                                                         "within_adamw": False}}
        engine, opt, _, _ = ds_lowrank.initialize(model=model, config=cfg)
    else:
        cfg["zero_allow_untested_optimizer"] = True
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer_for(model), config=cfg)
    return engine, opt


def train(engine, data, poison=()):
    """Each rank its slice of every global batch; steps in ``poison`` get a non-finite loss."""
    rank, world = dist.get_rank(), dist.get_world_size()
    per = GLOBAL_BATCH // world
    micro = per // engine.gradient_accumulation_steps()
    losses = []
    for t, (x, y) in enumerate(data):
        for a in range(engine.gradient_accumulation_steps()):
            lo = rank * per + a * micro
            xs = x[lo:lo + micro].to(engine.module[0].weight.dtype)
            loss = torch.nn.functional.mse_loss(engine(xs).float(), y[lo:lo + micro])
            if t in poison:
                loss = loss * float("nan")
            engine.backward(loss)
            engine.step()
        losses.append(loss.item())
    return losses


def full_weights(engine):
    from deepspeed.utils import safe_get_full_fp32_param
    out = {}
    for n, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)       # None at stage 0: the parameter is the master
        out[n] = (p.detach() if full is None else full).float().clone()
    return out


def inner(opt):
    """Our optimizer behind DeepSpeed's wrapper."""
    return getattr(opt, "optimizer", opt)


# A compressed error feedback rounds: once float rounding of the ranks' sums moves one value
# across a rounding threshold, its code differs by one step and the runs part by about 1e-3
# (as one process does under a 1e-7 perturbation of its gradients).  Their comparison is kept to
# the first steps, before that happens; a bucket or a random draw misplaced between ranks shows
# there as 1e-4 or more.
COMPRESSED_EF_STEPS = {"ldadam_int4": 4, "ldadam_int8": 3}
# Started from AdamW's state, the first code flips one step sooner (at the fourth step of
# 3 ranks from one checkpoint: 1.4e-5 against 2.2e-7 at the third).
FROM_ADAM_COMPRESSED_EF_STEPS = {"ldadam_int4": 3}


def rounding_noise(ref, steps):
    """How far rounding-sized noise in the gradients moves one process from ``ref`` (the largest
    of three draws): a compressed error feedback's code flips included, this is the distance a
    distributed run may have from one process."""
    return max(rel_err(single_process(steps, jitter_seed=seed)[0], ref) for seed in range(3))


def check_equivalence(stage, steps=10, via_config=False):
    steps = COMPRESSED_EF_STEPS.get(OPTIMIZER, steps)
    ref, ref_opt = single_process(steps)
    engine, opt = engine_for(stage, via_config=via_config)
    comm.SENT.clear()
    train(engine, batches(steps))
    sent = dict(comm.SENT)
    got = full_weights(engine)
    worst = max(float((got[n] - p.detach()).abs().max() / p.detach().abs().max())
                for n, p in ref.named_parameters())
    # per-rank optimizer state against the single-process total
    ours = inner(opt)
    mine = torch.tensor([ours.state_bytes()[k] for k in STATE_KEYS], dtype=torch.float64)
    dist.all_reduce(mine)
    single = [ref_opt.state_bytes()[k] for k in STATE_KEYS]
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, ours.state_bytes()["total"])
    noise = rounding_noise(ref, steps) if OPTIMIZER in COMPRESSED_EF_STEPS else 0.0
    return {"rel_err": worst, "noise": noise, "state_sum": mine.tolist(), "state_single": single,
            "sent": sent, "cut_rows": count_cut_rows(ours),
            "state_per_rank": per_rank, "state_estimated": estimated_state(ours, stage),
            "layout": layout_report(ours, ref_opt)}


def estimated_state(opt, stage):
    """Every rank's state bytes as ds_lowrank.memory estimates them for this model, stage and
    world size, from the optimizer's groups (and the parameters' whole shapes)."""
    params = [memory.Param(label, tuple(getattr(p, "ds_shape", p.shape)), gi)
              for gi, group in enumerate(opt.param_groups) for label, p in opt.originals(group, gi)]
    ranks = memory.estimate(None, type(opt), zero=stage, dp=dist.get_world_size(), params=params,
                            groups=opt.param_groups)
    return [m.state for m in ranks]


STATE_KEYS = ("lowrank_moments", "bases", "error_feedback", "dense_moments")


def _layouts(opt):
    return list(opt._layouts.values())


def count_cut_rows(opt):
    """Rows (MicroAdam: blocks) of the optimizer's own parameters split between ranks."""
    return sum(len(cut_rows(layout.holders[lb], n)) for layout in _layouts(opt)
               for lb, n in layout.row_length.items())


def check_resume(stage, steps=4):
    data = batches(2 * steps, seed=5)
    engine, _ = engine_for(stage)
    train(engine, data)
    straight = full_weights(engine)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = [tmp]
        dist.broadcast_object_list(tmp, src=0)
        engine, _ = engine_for(stage)
        train(engine, data[:steps])
        engine.save_checkpoint(tmp[0], tag="half")
        dist.barrier()
        engine, _ = engine_for(stage, make_model(seed=99))
        engine.load_checkpoint(tmp[0], tag="half")
        train(engine, data[steps:])
        resumed = full_weights(engine)
        dist.barrier()
    return {"bitwise": all(torch.equal(straight[n], resumed[n]) for n in straight),
            "max_diff": max(float((straight[n] - resumed[n]).abs().max()) for n in straight)}


def check_offload(stage, steps=10):
    """offload_optimizer: cpu through ds_lowrank.initialize: the same run as one process."""
    ref, _ = single_process(steps)
    engine, opt = engine_for(stage, via_config=True,
                             zero_optimization={"stage": stage, "offload_optimizer": {"device": "cpu"}})
    train(engine, batches(steps))
    got = full_weights(engine)
    return {"rel_err": max(float((got[n] - p.detach()).abs().max() / p.detach().abs().max())
                           for n, p in ref.named_parameters()),
            "offload": bool(engine.zero_cpu_offload()), "bound": len(_layouts(inner(opt)))}


def check_config_entry(stage):
    """ds_lowrank.initialize from a config's optimizer section: same result as the lazy path."""
    return check_equivalence(stage, via_config=True)


def check_bf16(stage, steps=10):
    """bf16 trains (the loss on a fixed batch falls) and stays close to the fp32 run."""
    data = batches(1) * steps
    fp32, _ = engine_for(stage)
    train(fp32, data)
    engine, _ = engine_for(stage, bf16={"enabled": True})
    losses = train(engine, data)
    ref, got = full_weights(fp32), full_weights(engine)
    worst = max(float((got[n] - ref[n]).abs().max() / ref[n].abs().max()) for n in ref)
    return {"rel_err": worst, "first_loss": losses[0], "last_loss": losses[-1]}


def check_bf16_optimizer(stage):
    """bf16 with fp32 gradient accumulation at stage 1: DeepSpeed's BF16_Optimizer wrapper."""
    engine, opt = engine_for(stage, bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"})
    wrapper = type(opt).__name__
    losses = train(engine, batches(1) * 8)
    return {"wrapper": wrapper, "first_loss": losses[0], "last_loss": losses[-1],
            "bound": len(_layouts(inner(opt)))}


def check_callable(stage, steps=10):
    """The optimizer class itself as DeepSpeed's client-optimizer callable."""
    ref, _ = single_process(steps)
    model = make_model()
    cfg = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // dist.get_world_size(),
           "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
           "steps_per_print": 10**9}

    def build(params):
        return LDAdam(params, lr=1e-2, weight_decay=0.01)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build, config=cfg,
                                           model_parameters=lowrank_param_groups(model, rank=RANK,
                                                                                 within_adamw=False))
    train(engine, batches(steps))
    got = full_weights(engine)
    return {"rel_err": max(float((got[n] - p.detach()).abs().max() / p.detach().abs().max())
                           for n, p in ref.named_parameters())}


def check_config_file(stage, steps=6):
    """configs/ldadam_zero{stage}.json through ds_lowrank.initialize (rank and schedule shrunk
    to the test model)."""
    path = os.path.join(os.path.dirname(WORKER_DIR), "..", "configs", f"ldadam_zero{stage}.json")
    cfg = ds_lowrank.integration.deepspeed_config.load_config(path)
    cfg["optimizer"]["params"]["rank"] = RANK
    cfg["optimizer"]["params"]["lr"] = 1e-2
    cfg["scheduler"]["params"].update(total_num_steps=steps, warmup_num_steps=2)
    cfg["train_micro_batch_size_per_gpu"] = GLOBAL_BATCH // dist.get_world_size()
    engine, opt, _, sched = ds_lowrank.initialize(model=make_model(), config=cfg)
    lrs = []
    losses = []
    for _ in range(steps):
        losses += train(engine, batches(1))
        lrs.append(engine.get_lr()[0])
    return {"optimizer": type(inner(opt)).__name__, "lrs": lrs, "first_loss": losses[0],
            "last_loss": losses[-1], "bound": len(_layouts(inner(opt)))}


def check_round_robin(stage):
    """round_robin_gradients breaks DeepSpeed's partition map: refused at binding, not trained on."""
    try:
        engine, _ = engine_for(stage, zero_optimization={"stage": stage, "round_robin_gradients": True})
        train(engine, batches(1))
    except Exception as err:  # the map's self-test must stop the step
        return {"error": f"{type(err).__name__}: {err}"}
    return {"error": None}


def check_accumulation(stage, steps=6):
    """Gradient accumulation 2 of half micro-batches equals one doubled micro-batch."""
    one, _ = engine_for(stage)
    train(one, batches(steps))
    two, _ = engine_for(stage, accumulation=2)
    train(two, batches(steps))
    a, b = full_weights(one), full_weights(two)
    return {"rel_err": max(float((a[n] - b[n]).abs().max() / a[n].abs().max()) for n in a)}


def _flat_state(opt):
    out = []

    def walk(st):
        for k in sorted(st):
            v = st[k]
            if isinstance(v, dict):
                walk(v)
            elif torch.is_tensor(v):
                out.append(v.detach().clone())
    for p in sorted(inner(opt).state, key=lambda t: t.numel()):
        walk(inner(opt).state[p])
    return out


def check_overflow(stage, steps=6):
    """A step whose gradients are not finite (as after an fp16 overflow) changes nothing."""
    engine, opt = engine_for(stage)
    data = batches(steps)
    train(engine, data[:3])
    before_state, before_w = _flat_state(opt), full_weights(engine)
    train(engine, data[3:4], poison=(0,))
    after_state, after_w = _flat_state(opt), full_weights(engine)
    same_state = len(before_state) == len(after_state) and all(
        torch.equal(a, b) for a, b in zip(before_state, after_state))
    same_w = all(torch.equal(before_w[n], after_w[n]) for n in before_w)
    losses = train(engine, data[4:])
    return {"state_unchanged": same_state, "weights_unchanged": same_w,
            "finite_after": all(l == l for l in losses), "state_tensors": len(before_state)}


DEFICIENT_ROWS = [3, 17, 30, 41]


class Rows(torch.nn.Module):
    """The 4 outputs the loss sees, so the 48×64 weight before it gets gradients of rank 4."""

    def forward(self, x):
        return x[:, DEFICIENT_ROWS]


def deficient_model():
    """A 48×64 matrix whose gradients are confined to 4 rows, below the rank 8 its optimizer
    uses; the layer ahead of it moves the ZeRO boundaries off its rows."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Linear(64, 48, bias=False), Rows())


def deficient_batches(steps):
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(GLOBAL_BATCH, 8, generator=gen), torch.randn(GLOBAL_BATCH, 4, generator=gen))
            for _ in range(steps)]


def check_deficient(stage, steps=6):
    """Rank-deficient gradients with the matrix split between ranks: every rank completes the
    basis alike (a disagreement would fail the step's collectives or move other rows), and the
    matrix moves only in the 4 rows (no weight decay here).  ``rel_err`` against one process is
    recorded: on this model DeepSpeed's runs, torch's AdamW's included, drift from one process
    by a few percent."""
    ref = deficient_model()
    ref_opt = optimizer_for(ref)
    for x, y in deficient_batches(steps):
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        ref_opt.step()
    want = {n: p.detach() for n, p in ref.named_parameters()}
    model = deficient_model()
    start = model[1].weight.detach().clone()
    engine, opt = engine_for(stage, model)
    train(engine, deficient_batches(steps))
    got = full_weights(engine)
    moved = got["1.weight"] - start
    outside = torch.ones(48, dtype=torch.bool)
    outside[DEFICIENT_ROWS] = False
    return {"rel_err": max(float((got[n] - want[n]).abs().max() / want[n].abs().max()) for n in want),
            "outside": float(moved[outside].norm() / moved.norm()), "split": count_split(inner(opt))}


def count_split(opt):
    """Parameters of the optimizer's own split between ranks."""
    return sum(len(layout.owners.get(lb, ())) > 1 for layout in _layouts(opt) for lb in layout.row_length)


def check_owned(stage, steps=3):
    """Matrices each held whole by one rank: no collective for them."""
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Linear(8, 8, bias=False) for _ in range(dist.get_world_size())])
    engine, opt = engine_for(stage, model(), )
    comm.SENT.clear()
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(GLOBAL_BATCH, 8, generator=gen), torch.randn(GLOBAL_BATCH, 8, generator=gen))
            for _ in range(steps)]
    train(engine, data)
    shared = sum(len(qs) > 1 for layout in _layouts(inner(opt)) for qs in layout.holders.values())
    return {"sent": dict(comm.SENT), "shared_params": shared}


def check_clipping(stage, steps=6, max_norm=0.05):
    """DeepSpeed's gradient clipping hands the optimizer the clipped global gradient: the run
    equals one process clipping with ``clip_grad_norm_``, as torch's AdamW under DeepSpeed does."""
    def reference(build):
        model = make_model()
        opt = build(model)
        norms = []
        for x, y in batches(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
            opt.step()
        return model, norms

    def rel_err(engine, ref):
        got = full_weights(engine)
        return max(float((got[n] - p.detach()).abs().max() / p.detach().abs().max())
                   for n, p in ref.named_parameters())

    ref, norms = reference(optimizer_for)
    engine, _ = engine_for(stage, gradient_clipping=max_norm)
    train(engine, batches(steps))
    ours = rel_err(engine, ref)

    def adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    adam_ref, _ = reference(adamw)
    cfg = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // dist.get_world_size(),
           "zero_optimization": {"stage": stage}, "gradient_clipping": max_norm,
           "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    model = make_model()
    adam_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=adamw(model), config=cfg)
    train(adam_engine, batches(steps))
    return {"rel_err": ours, "adamw_rel_err": rel_err(adam_engine, adam_ref), "min_norm": min(norms),
            "max_norm": max_norm}


RESHARD_STEPS = 8


def _reshard_dir():
    return os.path.join(os.environ["RESHARD_DIR"], CHECKPOINT)


def check_save(stage):
    """The reference for resuming elsewhere: the uninterrupted run's weights, and a checkpoint
    of the same run at half way (converted by the test, resumed by ``reshard``)."""
    data = batches(RESHARD_STEPS, seed=7)
    engine, _ = engine_for(stage)
    train(engine, data)
    weights = full_weights(engine)
    engine, _ = engine_for(stage)
    train(engine, data[:RESHARD_STEPS // 2])
    engine.save_checkpoint(os.path.join(_reshard_dir(), "checkpoint"), tag="half")
    if dist.get_rank() == 0:
        torch.save(weights, os.path.join(_reshard_dir(), "straight.pt"))
    dist.barrier()
    return {}


def check_reshard(stage):
    """Resume the consolidated half-way checkpoint at this world size and stage: the second half
    equals the uninterrupted run."""
    from ds_lowrank.checkpoint import load, resume
    data = batches(RESHARD_STEPS, seed=7)
    model = make_model(seed=99)
    cfg = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // dist.get_world_size(),
           "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    engine, opt, _, _ = resume(os.path.join(_reshard_dir(), "whole"), model, cfg, optimizer=optimizer_for(model))
    train(engine, data[RESHARD_STEPS // 2:])
    want = torch.load(os.path.join(_reshard_dir(), "straight.pt"))

    def rel_err(got):
        return max(float((got[n] - want[n]).abs().max() / want[n].abs().max()) for n in want)
    # the control: the same weights with a fresh optimizer
    fresh = make_model(seed=99)
    fresh.load_state_dict(load(os.path.join(_reshard_dir(), "whole")).weights)
    control, _ = engine_for(stage, fresh)
    train(control, data[RESHARD_STEPS // 2:])
    return {"rel_err": rel_err(full_weights(engine)), "fresh_rel_err": rel_err(full_weights(control)),
            "global_steps": engine.global_steps}


def check_save_adamw(stage):
    """A checkpoint of DeepSpeed's own AdamW, which the converter must refuse."""
    model = make_model()
    cfg = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // dist.get_world_size(),
           "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    train(engine, batches(3))
    engine.save_checkpoint(os.path.join(os.environ["RESHARD_DIR"], "adamw"), tag="t")
    return {}


def check_to_adam(stage):
    """LDAdam's checkpoint converted for DeepSpeed's own AdamW (by the test): loaded at this
    world size and stage, DeepSpeed holds exactly the converted weights and moments, and trains."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    expected = torch.load(os.path.join(os.environ["RESHARD_DIR"], "adam_expected.pt"))
    model = make_model(seed=99)
    cfg = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // dist.get_world_size(),
           "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "checkpoint": {"load_universal": True}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    engine.load_checkpoint(os.path.join(os.environ["RESHARD_DIR"], "adam_universal"))
    worst = 0.0
    for name, p in engine.module.named_parameters():
        loaded = {"fp32": safe_get_full_fp32_param(p), "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                  "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
        for key, value in loaded.items():
            worst = max(worst, float((value.float() - expected[name][key]).abs().max()))
    losses = train(engine, batches(3))
    return {"max_err": worst, "finite": all(l == l for l in losses), "global_steps": engine.global_steps}


def check_from_adam(stage, steps=4):
    """Start from DeepSpeed AdamW's universal checkpoint (made by the test from ``saveadamw``):
    at this world size and stage, the run equals one process starting from the same state
    (a compressed error feedback for fewer steps, see ``COMPRESSED_EF_STEPS``)."""
    from ds_lowrank.checkpoint import load, resume
    steps = min(steps, FROM_ADAM_COMPRESSED_EF_STEPS.get(OPTIMIZER, steps))
    path = os.path.join(os.environ["RESHARD_DIR"], "universal")
    data = batches(steps, seed=11)
    c = load(path)
    ref = make_model(seed=99)
    ref.load_state_dict(c.weights)
    opt = optimizer_for(ref)
    opt.load_whole_state(c.states, from_adam=True)
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        opt.step()
    model = make_model(seed=99)
    cfg = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // dist.get_world_size(),
           "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    engine, _, _, _ = resume(path, model, cfg, optimizer=optimizer_for(model))
    train(engine, data)
    got = full_weights(engine)
    return {"rel_err": max(float((got[n] - p.detach()).abs().max() / p.detach().abs().max())
                           for n, p in ref.named_parameters()),
            "moved": max(float((got[n] - c.weights[n]).abs().max()) for n in got),
            "global_steps": engine.global_steps, "steps": steps}


def check_phases(stage):
    """Buckets of matrices split over the same ranks share their collectives: per steady step,
    as many all-reduces as the longest bucket's sums, not the total of all buckets' sums."""
    sums = []   # per bucket of the measured step: (its holders, how many sums it asked for)
    saved = phases.SplitRunner.__dict__["_steps"]
    steps_of = phases.SplitRunner._steps

    def counting(bucket, right, job, group):
        steps = steps_of(bucket, right, job, group)
        count = [bucket[0].holders, 0]
        sums.append(count)

        def counted():
            answer = None
            while True:
                try:
                    posted = steps.send(answer)
                except StopIteration as end:
                    return end.value
                count[1] += 1
                answer = yield posted
        return counted()

    phases.SplitRunner._steps = staticmethod(counting)
    try:
        engine, _ = engine_for(stage)
        data = batches(3)
        train(engine, data[:2])             # binding, first basis, first warm step
        sums.clear()
        comm.SENT.clear()
        train(engine, data[2:])
    finally:
        phases.SplitRunner._steps = saved
    longest = {}
    for holders, n in sums:
        longest[tuple(holders)] = max(longest.get(tuple(holders), 0), n)
    return {"collectives": comm.SENT["reduce"], "bucket_sums": [n for _, n in sums],
            "expected": sum(longest.values())}


def main():
    global OPTIMIZER, CHECKPOINT
    out_path, checks = sys.argv[1], sys.argv[2:]
    deepspeed.init_distributed(dist_backend="gloo")
    results = {"world": dist.get_world_size()}
    for check in checks:
        kind, stage, *name = check.split(":")
        # "ldadam@zero3": LDAdam, its checkpoint kept apart from the plain "ldadam" one
        CHECKPOINT = name[0] if name else "ldadam"
        OPTIMIZER = CHECKPOINT.split("@")[0]
        fn = {"callable": check_callable, "cfgfile": check_config_file, "roundrobin": check_round_robin,
              "bf16opt": check_bf16_optimizer, "equiv": check_equivalence, "resume": check_resume, "config": check_config_entry,
              "bf16": check_bf16, "gas": check_accumulation, "overflow": check_overflow,
              "deficient": check_deficient,
              "owned": check_owned, "phases": check_phases, "clip": check_clipping,
              "save": check_save, "reshard": check_reshard, "saveadamw": check_save_adamw, "offload": check_offload,
              "fromadam": check_from_adam, "toadam": check_to_adam}[kind]
        print(f"check {check}", file=sys.stderr, flush=True)
        results[check] = fn(int(stage))
    finish(out_path, results)


if __name__ == "__main__":
    main()
