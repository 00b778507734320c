"""DeepSpeed checkpoints of ds_lowrank optimizers, consolidated and resumed at any world size.

``consolidate`` reads every rank's files of a checkpoint written by ``engine.save_checkpoint`` (any
ZeRO stage) and writes each parameter's fp32 weight and optimizer state as one process would hold
them, in the layout of DeepSpeed's universal checkpoints with a sibling tree for what is not Adam:

    <out>/ds_lowrank.json            optimizer class, hyperparameters, steps, parameter -> group
    <out>/zero/<name>/fp32.pt        {"param": fp32 weight, "cat_dim": 0}
    <out>/zero/<name>/<key>.pt       AdamW state of the parameters the optimizer keeps dense
    <out>/lowrank/<name>/<key>.pt    the optimizer's own state (basis, moments, error feedback…)
    <out>/lr_scheduler.pt            the scheduler's state, when the run had one
    <out>/checksums.json             size and SHA-256 of every file (``integrity``), written last

plus, in ``ds_lowrank.json``, the ``client_state`` entries of ``save_checkpoint`` that are plain
values (a training script's step and sample counts).

``resume`` starts an engine from it at any world size and ZeRO stage: the continuation equals the
run that was not interrupted.  ``save_adam_universal`` writes it instead as a universal checkpoint of
DeepSpeed's own Adam (``checkpoint.adam`` converts the moments), and ``load`` reads one, to start
LDAdam or GaLore from an Adam run.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import integrity
from .adam import adam_of_subspace
from .integrity import load_file
from .pieces import METADATA, CheckpointError, merge
from ..utils.files import publish_directory

META = "ds_lowrank.json"


@dataclass
class Consolidated:
    """A checkpoint as one process holds it."""

    optimizer: str
    param_groups: list[dict]                 # hyperparameters, without the parameters
    group_of: dict[str, int]                 # parameter name -> its group
    weights: dict[str, torch.Tensor]         # fp32
    states: dict[str, dict[str, torch.Tensor]]
    global_steps: int = 0
    skipped_steps: int = 0
    lr_scheduler: dict | None = None
    client_state: dict = field(default_factory=dict)
    tag: str = "converted"                  # the source checkpoint's tag


def _optimizer_class(name: str):
    from .. import optim
    cls = getattr(optim, name, None)
    if cls is None:
        raise CheckpointError(f"the checkpoint's optimizer {name!r} is not one of ds_lowrank's")
    return cls


def _tag_dir(checkpoint_dir: str | os.PathLike, tag: str | None) -> Path:
    root = Path(checkpoint_dir)
    if tag is None:
        tag = integrity.read_latest(root)
    path = root / tag
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist: not a checkpoint written by engine.save_checkpoint")
    return path


def _rank_of(path: str) -> int:
    return int(re.search(r"zero_pp_rank_(\d+)_", os.path.basename(path)).group(1))


def _inner_state_dicts(path: Path) -> tuple[list[dict], dict, bool]:
    """Every rank's ``state_dict()`` of the ds_lowrank optimizer, the engine's common state, and
    whether the optimizer held whole parameters (ZeRO stage 0)."""
    optim_files = sorted(glob.glob(str(path / "*zero_pp_rank_*_optim_states.pt")), key=_rank_of)
    model_parallel = {m for f in glob.glob(str(path / "*mp_rank_*")) for m in re.findall(r"mp_rank_(\d+)", f)}
    if len(model_parallel) > 1:
        raise CheckpointError(f"{path} was written with {len(model_parallel)} model-parallel ranks "
                              f"(mp_rank_*): consolidating tensor- or pipeline-parallel checkpoints is not "
                              f"supported yet")
    model_files = sorted(glob.glob(str(path / "*model_states.pt")))
    if not model_files:
        raise CheckpointError(f"{path}: no *model_states.pt file; not a DeepSpeed checkpoint")
    # DeepSpeed's own files pickle more than tensors (its loss scaler), as its loader expects.
    common = load_file(model_files[0], map_location="cpu", weights_only=False)
    if not optim_files:                          # ZeRO stage 0: the optimizer is in the model file
        return [common["optimizer"]], common, True
    inner = []
    for f in optim_files:
        osd = load_file(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        inner.append(osd.get("base_optimizer_state") or osd["optimizer_state_dict"])
    return inner, common, False


def _pieces(inner: list[dict]) -> tuple[dict[str, list[dict]], dict[str, int], dict[str, tuple]]:
    """Per parameter name: every rank's pieces, its group, its shape."""
    pieces, group_of, shapes = {}, {}, {}
    for sd in inner:
        group_by_index = {i: gi for gi, g in enumerate(sd["param_groups"]) for i in g["params"]}
        for index, st in sd["state"].items():
            gi = group_by_index[index]
            for label, piece in st.items():
                if isinstance(piece, dict) and "range" in piece:
                    pieces.setdefault(label, []).append(piece)
                    group_of[label] = gi
                    shapes[label] = tuple(int(x) for x in piece["shape"])
    return pieces, group_of, shapes


def _whole_states_of_stage0(sd: dict) -> tuple[dict, dict]:
    """A stage-0 optimizer keeps whole-parameter state, keyed by position; name it."""
    states, group_of = {}, {}
    for gi, g in enumerate(sd["param_groups"]):
        names = g.get("param_names")
        if names is None:
            raise CheckpointError("the optimizer's parameter groups carry no names; build it over "
                                  "named parameters (ds_lowrank.lowrank_param_groups does)")
        for index, name in zip(g["params"], names):
            group_of[name] = gi
            if index in sd["state"]:
                if any(isinstance(v, dict) for v in sd["state"][index].values()):
                    # a fused weight's blocks (optim.blocks), each with its own state
                    raise CheckpointError(f"{name}: its state is per block of a fused weight (partition_stride "
                                          f"or fused_qkv), which the checkpoint tools do not convert yet")
                states[name] = {k: v for k, v in sd["state"][index].items() if k not in METADATA}
    return states, group_of


def consolidate(checkpoint_dir, tag: str | None = None) -> Consolidated:
    """Read a checkpoint of a ds_lowrank optimizer written by ``engine.save_checkpoint``.  Its
    files are verified against its checksums first (``integrity``; a checkpoint without them is
    read with an ``UnverifiedCheckpoint`` warning)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = _tag_dir(checkpoint_dir, tag)
    integrity.check_or_warn(path, "saved by engine.save_checkpoint rather than "
                                  "ds_lowrank.checkpoint.integrity.save_checkpoint, or before checksums")
    inner, common, whole = _inner_state_dicts(path)
    name = inner[0].get("optimizer")
    if name is None:
        raise CheckpointError(f"{path}: the optimizer state is not a ds_lowrank optimizer's; for "
                              f"DeepSpeed's own optimizers use python -m deepspeed.checkpoint.ds_to_universal")
    cls = _optimizer_class(name)
    groups = [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in inner[0]["param_groups"]]
    if whole:
        weights = {k: v.float() for k, v in common["module"].items()}
        states, group_of = _whole_states_of_stage0(inner[0])
    else:
        pieces, group_of, shapes = _pieces(inner)
        states = {label: merge(cls, groups[group_of[label]], label, shapes[label], qs)
                  for label, qs in pieces.items()}
        weights = {k: v.float() for k, v in
                   get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name).items()}
    return Consolidated(name, groups, group_of, weights, states,
                        global_steps=int(common.get("global_steps", 0)),
                        skipped_steps=int(inner[0].get("skipped_steps", 0)),
                        lr_scheduler=common.get("lr_scheduler"), client_state=_client_state(common), tag=path.name)


def _client_state(common: dict) -> dict:
    """The plain-valued entries a training script added with ``client_state`` (DeepSpeed merges
    them into its own state; its entries are tensors, objects, or named below)."""
    deepspeed_keys = {"global_steps", "global_samples", "skipped_steps", "dp_world_size", "mp_world_size",
                      "ds_version", "ds_config", "buffer_names", "sparse_tensor_module_names",
                      "frozen_param_shapes", "shared_params", "param_shapes", "frozen_param_fragments",
                      "iteration"}

    def plain(v) -> bool:
        return isinstance(v, (bool, int, float, str)) or (
            isinstance(v, (list, tuple)) and all(plain(x) for x in v))
    return {k: v for k, v in common.items() if k not in deepspeed_keys and plain(v)}


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def _saved(t: torch.Tensor) -> torch.Tensor:
    """A copy owning its storage: ``torch.save`` of a view writes the whole storage it views
    (a flat buffer of the whole model, a packed bucket of matrices)."""
    return t.detach().clone()


def _kept_dense(c: Consolidated, name: str) -> bool:
    """Whether the optimizer left parameter ``name`` to AdamW (its state is AdamW's)."""
    return c.group_of.get(name) is not None and _optimizer_class(c.optimizer).row_length(
        c.param_groups[c.group_of[name]], tuple(c.weights[name].shape)) is None


def _all_or_nothing(out: Path, write) -> None:
    """``write(tmp)`` into a sibling of ``out`` (it ends by sealing it with checksums), renamed to
    ``out`` once complete; removed if writing fails, so that nothing half-written is left."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_directory(tmp, out, overwrite=True)


def save(c: Consolidated, out_dir, overwrite: bool = False) -> None:
    """Write ``c`` under ``out_dir`` (the layout in the module docstring), all or nothing."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists; choose another output folder or pass overwrite")
    _all_or_nothing(out, lambda tmp: _write_consolidated(c, tmp))


def _write_consolidated(c: Consolidated, tmp: Path) -> None:
    meta = {"optimizer": c.optimizer, "global_steps": c.global_steps, "skipped_steps": c.skipped_steps,
            "param_groups": [{k: _jsonable(v) for k, v in g.items()} for g in c.param_groups],
            "group_of": c.group_of, "client_state": c.client_state}
    for name, w in c.weights.items():
        folder = tmp / "zero" / name
        folder.mkdir(parents=True)
        torch.save({"param": _saved(w), "cat_dim": 0}, folder / "fp32.pt")
    for name, st in c.states.items():
        dense = _kept_dense(c, name)
        folder = tmp / ("zero" if dense else "lowrank") / name
        folder.mkdir(parents=True, exist_ok=True)
        for key, v in st.items():
            v = _saved(v)
            torch.save(v if key == "step" and dense else ({"param": v, "cat_dim": 0} if dense else v),
                       folder / f"{key}.pt")
    if c.lr_scheduler is not None:
        torch.save(c.lr_scheduler, tmp / "lr_scheduler.pt")
    (tmp / META).write_text(json.dumps(meta, indent=1))
    integrity.write_manifest(tmp, tag=c.tag, global_steps=c.global_steps)


def adam_states(c: Consolidated) -> dict[str, dict[str, torch.Tensor]]:
    """Adam's ``exp_avg``, ``exp_avg_sq`` and ``step`` of every parameter of ``c`` (``checkpoint.adam``):
    the dense parameters' AdamW state as it is, the projected ones' carried out of the subspace."""
    cls = _optimizer_class(c.optimizer)
    out = {}
    for name, st in c.states.items():
        shape = tuple(c.weights[name].shape)
        group = c.param_groups[c.group_of[name]]
        if _kept_dense(c, name):
            out[name] = {k: st[k] for k in ("exp_avg", "exp_avg_sq", "step")}
            continue
        try:
            out[name] = adam_of_subspace(cls, group, shape, st)
        except ValueError as err:
            raise CheckpointError(f"{c.optimizer}'s state of {name}: {err}") from None
    return out


def save_adam_universal(c: Consolidated, out_dir, overwrite: bool = False) -> None:
    """Write ``c`` as a universal checkpoint of DeepSpeed's own Adam (tag: the source's), loaded at
    any world size and ZeRO stage with ``"checkpoint": {"load_universal": true}`` and
    ``engine.load_checkpoint(out_dir)``; all or nothing, the tag directory sealed with checksums."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists; choose another output folder or pass overwrite")
    adam = adam_states(c)
    _all_or_nothing(out, lambda tmp: _write_adam_universal(c, adam, tmp))


def _write_adam_universal(c: Consolidated, adam: dict, tmp: Path) -> None:
    import deepspeed

    tag = c.tag
    step = max(int(st["step"]) for st in adam.values())   # DeepSpeed keeps one step per group
    (tmp / tag / "zero").mkdir(parents=True)
    for name, w in c.weights.items():
        folder = tmp / tag / "zero" / name
        folder.mkdir()
        torch.save({"param": _saved(w), "cat_dim": 0}, folder / "fp32.pt")
        for key in ("exp_avg", "exp_avg_sq"):
            torch.save({"param": _saved(adam[name][key].reshape(w.shape)), "cat_dim": 0}, folder / f"{key}.pt")
        torch.save(step, folder / "step.pt")
    # the learning rate the schedule set for the next step; ZeRO-1/2 read the groups at the top
    # level, ZeRO-3 inside ``optimizer_state_dict``
    groups = [{"lr": c.param_groups[0]["lr"]}] if c.param_groups else []
    torch.save({"ds_version": deepspeed.__version__, "param_groups": groups,
                "optimizer_state_dict": {"state": {0: {"step": step}}, "param_groups": groups}},
               tmp / tag / "zero" / "optimizer_state.pt")
    # the entries DeepSpeed's loader reads from the engine's own file (world sizes: of the
    # universal checkpoint, which has none)
    module = {n: _saved(w) for n, w in c.weights.items()}
    torch.save({**c.client_state, "module": module, "buffer_names": [], "optimizer": None,
                "lr_scheduler": c.lr_scheduler, "global_steps": c.global_steps, "skipped_steps": 0,
                "dp_world_size": 1, "mp_world_size": 1, "data_sampler": None, "random_ltd": None,
                "ds_version": deepspeed.__version__}, tmp / tag / "mp_rank_00_model_states.pt")
    # ZeRO-3 engines look for the first rank's file name
    shutil.copyfile(tmp / tag / "mp_rank_00_model_states.pt", tmp / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    integrity.write_manifest(tmp / tag, tag=tag, global_steps=c.global_steps)
    (tmp / "latest_universal").write_text(tag)


def _read_tree(root: Path, kind: str, weights: dict, states: dict) -> None:
    """``<root>/<kind>/<name>/<key>.pt`` files: fp32 weights and per-parameter state."""
    for file in sorted((root / kind).glob("*/*.pt")):
        name, key = file.parent.name, file.stem
        # DeepSpeed's universal files hold {"param": tensor, "cat_dim": 0}, and step.pt an int
        value = load_file(file, map_location="cpu", weights_only=True)
        if isinstance(value, dict):
            value = value["param"]
        elif not torch.is_tensor(value):
            value = torch.tensor(float(value), dtype=torch.float32)
        if kind == "zero" and key == "fp32":
            weights[name] = value
        else:
            states.setdefault(name, {})[key] = value


def load(path) -> Consolidated:
    """Read what ``save`` wrote, or a universal checkpoint of DeepSpeed's own Adam written by
    ``python -m deepspeed.checkpoint.ds_to_universal`` (its state then starts a ds_lowrank
    optimizer: see ``LowRankOptimizer.load_whole_state``).  Files are verified against the
    checksums ``save`` and ``save_adam_universal`` write (:class:`integrity.IntegrityError` names a
    bad one); a consolidated checkpoint without them is read with a warning."""
    root = Path(path)
    weights, states = {}, {}
    if (root / META).is_file():
        integrity.check_or_warn(root, "written before checksums")
        try:
            meta = json.loads((root / META).read_bytes().decode("utf-8"))
        except ValueError as err:
            raise CheckpointError(f"{root / META} is damaged ({err})") from None
        for kind in ("zero", "lowrank"):
            _read_tree(root, kind, weights, states)
        scheduler = root / "lr_scheduler.pt"
        return Consolidated(meta["optimizer"], meta["param_groups"], meta["group_of"], weights, states,
                            global_steps=meta["global_steps"], skipped_steps=meta["skipped_steps"],
                            lr_scheduler=load_file(scheduler, weights_only=False) if scheduler.is_file() else None,
                            client_state=meta.get("client_state", {}))
    common = root / "mp_rank_00_model_states.pt"
    if not (root / "zero" / "optimizer_state.pt").is_file() or not common.is_file():
        raise CheckpointError(f"{root}: neither a consolidated checkpoint (no {META}; write one with "
                              f"tools/convert_checkpoint.py) nor a DeepSpeed universal checkpoint (no "
                              f"zero/optimizer_state.pt; write one with deepspeed.checkpoint.ds_to_universal)")
    integrity.verify(root, required=False)   # DeepSpeed's ds_to_universal writes no checksums
    _read_tree(root, "zero", weights, states)
    model_state = load_file(common, map_location="cpu", weights_only=False)
    return Consolidated("AdamW", [], {}, weights, states, global_steps=int(model_state.get("global_steps", 0)),
                        lr_scheduler=model_state.get("lr_scheduler"), client_state=_client_state(model_state))


def _restore_hyperparameters(optimizer, saved: list[dict], path: str) -> None:
    """The groups' hyperparameters as saved, as torch's ``load_state_dict`` restores them: a
    schedule's current learning rate lives there, set for the step that comes next."""
    if len(saved) != len(optimizer.param_groups):
        raise CheckpointError(f"{path} has {len(saved)} parameter groups, the optimizer "
                              f"{len(optimizer.param_groups)}: not a checkpoint of this run")
    for group, values in zip(optimizer.param_groups, saved):
        for key, value in values.items():
            if key != "group_index":
                group[key] = tuple(value) if isinstance(group.get(key), tuple) else value


def resume(source, model, config, optimizer=None, **initialize_kwargs):
    """Start training from a consolidated checkpoint, at any world size and ZeRO stage.

    ``source`` is what ``save`` wrote (a path, or its ``load``).  The model's weights, the fp32
    master weights, the optimizer state, the scheduler and the step count continue where the
    checkpoint stopped.  The optimizer comes from the config's
    optimizer section (``ds_lowrank.initialize``), or is ``optimizer``, built over ``model``'s
    parameters and handed to ``deepspeed.initialize``.  Returns what ``initialize`` returns.
    """
    import deepspeed

    from ..integration.deepspeed import initialize
    from ..integration.deepspeed_config import load_config
    from ..utils.schedule import resolve_warmup

    c = source if isinstance(source, Consolidated) else load(source)
    path = "the checkpoint" if isinstance(source, Consolidated) else str(source)
    missing = sorted(set(dict(model.named_parameters())) - set(c.weights))
    if missing:
        raise CheckpointError(f"{path} has no weights for {missing[:3]}: not a checkpoint of this model")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(c.weights[name])
    if optimizer is None:
        engine, optimizer, loader, scheduler = initialize(model=model, config=config, **initialize_kwargs)
    else:
        config = {**resolve_warmup(load_config(config)), "zero_allow_untested_optimizer": True}
        engine, optimizer, loader, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                    config=config, **initialize_kwargs)
    inner = getattr(optimizer, "optimizer", optimizer)
    from_adam = c.optimizer == "AdamW"
    if type(inner).__name__ != c.optimizer and not from_adam:
        raise CheckpointError(f"{path} holds {c.optimizer} state, but the run builds {type(inner).__name__}")
    inner.load_whole_state(c.states, c.weights, from_adam=from_adam)
    inner.skipped_steps = c.skipped_steps
    if not from_adam:
        _restore_hyperparameters(inner, c.param_groups, path)
    if scheduler is not None and c.lr_scheduler is not None:
        scheduler.load_state_dict(c.lr_scheduler)
        if from_adam:
            # Adam's groups are not this optimizer's: take the scheduled rate from the schedule
            for group, lr in zip(inner.param_groups, scheduler.get_lr()):
                group["lr"] = lr
    engine.global_steps = c.global_steps
    return engine, optimizer, loader, scheduler
