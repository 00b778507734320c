"""DeepSpeed checkpoints of ds_lowrank optimizers, consolidated and resumed at any world size.

``consolidate`` reads every rank's files of a checkpoint written by ``engine.save_checkpoint`` (any
ZeRO stage, any Megatron tensor-parallel size: ``tensor_parallel``) and writes each parameter's fp32
weight and optimizer state as one process would hold them, in the layout of DeepSpeed's universal
checkpoints with a sibling tree for what is not Adam:

    <out>/ds_lowrank.json            optimizer class, hyperparameters, steps, parameter -> group,
                                     Megatron shards' [partition_dim, partition_stride], TP size
    <out>/zero/<name>/fp32.pt        {"param": fp32 weight, "cat_dim": partition_dim or 0}
    <out>/zero/<name>/<key>.pt       AdamW state of the parameters the optimizer keeps dense
    <out>/lowrank/<name>/<key>.pt    the optimizer's own state (basis, moments, error feedback…)
    <out>/lowrank/<name>/tp_rank_<t>/<key>.pt   a tensor_parallel="local" shard's own state
    <out>/lowrank/<name>[<block>]/...           a fused weight's, per block (``checkpoint.blocks``)
    <out>/lr_scheduler.pt            the scheduler's state, when the run had one
    <out>/checksums.json             size and SHA-256 of every file (``integrity``), written last

plus, in ``ds_lowrank.json``, the ``client_state`` entries of ``save_checkpoint`` that are plain
values (a training script's step and sample counts).

A ``tensor_parallel="global"`` shard on ZeRO partitions is stepped as rows of its whole matrix
(``optim.placements.zero``): each piece's saved state is that of the rows of the whole matrix it
owned (``tensor_parallel.rows_in_whole`` from the piece's range, its TP rank ``mp_rank_XX`` and
the TP size), so the whole state is joined from every TP and DP rank's pieces by those rows
(``pieces.merge_rows``), and on resume under ZeRO each piece cuts its rows from it again.  A
fused weight stepped as its blocks is joined and cut the same way, block by block
(``checkpoint.blocks``, with the layout the optimizer records: ``Consolidated.fused``).

``resume`` starts an engine from it at any world size, ZeRO stage and TP size: the continuation
equals the run that was not interrupted (for "local" shards at another TP size, see
``_states_here``).  ``save_adam_universal`` writes it instead as a universal checkpoint of
DeepSpeed's own Adam (``checkpoint.adam`` converts the moments), and ``load`` reads one, to start
LDAdam or GaLore from an Adam run.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from . import blocks as fused_blocks
from . import integrity
from . import tensor_parallel as shard_tp
from .adam import adam_of_subspace
from .integrity import load_file
from .pieces import CheckpointError, merge, merge_rows
from ..distributed.tensor_parallel import as_deepspeed_mpu, rows_in_whole
from ..distributed.zero_layout import Piece, deepspeed_managed, owned_rows
from ..distributed.fused import record as fused_layout
from ..optim import state_layout
from ..optim.placements.megatron import stepped_as_blocks
from ..optim.state_layout import piece_range
from ..utils.files import publish_directory

META = "ds_lowrank.json"
SHARD = "tp_rank_"          # lowrank/<name>/tp_rank_<t>/: a tensor_parallel="local" shard's own state


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
    # Megatron shards: parameter name -> [partition_dim, partition_stride]; their weights and
    # states above are the whole parameter's (``tensor_parallel``)
    tensor_parallel: dict[str, list[int]] = field(default_factory=dict)
    tp_size: int = 1                         # of the run that saved it
    # the compressed state of tensor_parallel="local" shards, which is each shard's own: per
    # parameter name, one state per TP rank of the run that saved it
    shard_states: dict[str, list[dict[str, torch.Tensor]]] = field(default_factory=dict)
    # fused weights stepped as their blocks: parameter name -> its layout (``distributed.fused.record``);
    # their states above (and shard_states) are per block, ``{block: {key: tensor}}`` (``checkpoint.blocks``)
    fused: dict[str, dict] = field(default_factory=dict)


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


def _by_model_parallel_rank(path: Path) -> dict[int, list[str]]:
    """The checkpoint's files per model-parallel (``mp_rank_XX``) rank, checked complete: every
    TP rank's, and of each every data-parallel rank's optimizer file."""
    files: dict[int, list[str]] = {}
    for f in glob.glob(str(path / "*mp_rank_*.pt")):
        files.setdefault(int(re.search(r"mp_rank_(\d+)", os.path.basename(f)).group(1)), []).append(f)
    model_files = sorted(f for fs in files.values() for f in fs if f.endswith("model_states.pt"))
    if not model_files:
        raise CheckpointError(f"{path}: no *model_states.pt file; not a DeepSpeed checkpoint")
    # DeepSpeed's own files pickle more than tensors (its loss scaler), as its loader expects.
    common = load_file(model_files[0], map_location="cpu", weights_only=False)
    world, dp = int(common.get("mp_world_size") or 1), common.get("dp_world_size")
    if sorted(files) != list(range(world)):
        missing = sorted(set(range(world)) - set(files)) or sorted(set(files) - set(range(world)))
        raise CheckpointError(f"{path} was written by {world} tensor-parallel (model-parallel) rank(s), but its "
                              f"files of mp_rank_{missing[0]:02d} are {'missing' if missing[0] < world else 'extra'}: "
                              f"copy every rank's files of the checkpoint, and only those")
    for t, fs in sorted(files.items()):
        if not any(f.endswith("model_states.pt") for f in fs):
            raise CheckpointError(f"{path}: no model states file of mp_rank_{t:02d}; copy every rank's files")
        have = sorted(_rank_of(f) for f in fs if f.endswith("_optim_states.pt"))
        if have and dp is not None and have != list(range(int(dp))):
            raise CheckpointError(f"{path}: of mp_rank_{t:02d} it holds the optimizer files of data-parallel ranks "
                                  f"{have}, of {dp}: pass every rank's optimizer file of the checkpoint")
    return files


def _inner_state_dicts(path: Path, files: list[str]) -> tuple[list[dict], dict, bool]:
    """Every data-parallel rank's ``state_dict()`` of the ds_lowrank optimizer in ``files`` (one
    model-parallel rank's), the engine's common state, and whether the optimizer held whole
    parameters (ZeRO stage 0)."""
    optim_files = sorted((f for f in files if f.endswith("_optim_states.pt")), key=_rank_of)
    model_file = sorted(f for f in files if f.endswith("model_states.pt"))[0]
    common = load_file(model_file, map_location="cpu", weights_only=False)
    if not optim_files:                          # ZeRO stage 0: the optimizer is in the model file
        return [common["optimizer"]], common, True
    inner = []
    for f in optim_files:
        osd = load_file(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        inner.append(osd.get("base_optimizer_state") or osd["optimizer_state_dict"])
    return inner, common, False


def _fp32_weights(path: Path, files: list[str], only: bool) -> dict[str, torch.Tensor]:
    """The fp32 master weights of one model-parallel rank's ZeRO files, through DeepSpeed's
    ``zero_to_fp32``, which reads every file of a folder as one model-parallel rank's (``only``:
    the checkpoint has no other, so it reads the folder itself)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if only:
        return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / path.name
        folder.mkdir()
        for f in files:
            (folder / re.sub(r"mp_rank_\d+", "mp_rank_00", os.path.basename(f))).symlink_to(os.path.abspath(f))
        return get_fp32_state_dict_from_zero_checkpoint(tmp, tag=path.name)


def _pieces(inner: list[dict]) -> tuple[dict[str, list[dict]], dict[str, int], dict[str, tuple]]:
    """Per parameter name: every rank's pieces, its group, its shape."""
    pieces, group_of, shapes = {}, {}, {}
    for sd in inner:
        for gi, piece in state_layout.saved_pieces(sd):
            pieces.setdefault(piece.label, []).append(piece.state)
            group_of[piece.label] = gi
            shapes[piece.label] = piece.shape
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
                held = list(state_layout.held(sd["state"][index], name))
                if any(h.placement == state_layout.BLOCK for h in held):
                    # a fused weight's blocks (optim.blocks), each with its own state
                    _check_fused_record(sd, name)
                    states[name] = {h.name: h.tensors() for h in held if h.placement == state_layout.BLOCK}
                else:
                    states[name] = held[0].tensors()
    return states, group_of


def _check_fused_record(sd: dict, name: str) -> None:
    if name not in sd.get("fused", {}):
        raise CheckpointError(f"{name}: its state is per block of a fused weight (partition_stride or fused_qkv), "
                              f"saved without the fused layout ds_lowrank's optimizers record since the checkpoint "
                              f"tools read it: resume it with engine.load_checkpoint at the layout that saved it, "
                              f"and save again")


def _has_blocks(st: dict) -> bool:
    return any(isinstance(v, dict) for v in st.values())


def consolidate(checkpoint_dir, tag: str | None = None) -> Consolidated:
    """Read a checkpoint of a ds_lowrank optimizer written by ``engine.save_checkpoint``, at
    any ZeRO stage and tensor-parallel size (Megatron shards joined into whole parameters,
    ``tensor_parallel``).  Its files are verified against its checksums first (``integrity``; a
    checkpoint without them is read with an ``UnverifiedCheckpoint`` warning)."""
    path = _tag_dir(checkpoint_dir, tag)
    integrity.check_or_warn(path, "saved by engine.save_checkpoint rather than "
                                  "ds_lowrank.checkpoint.integrity.save_checkpoint, or before checksums")
    files = _by_model_parallel_rank(path)
    read = [_one_model_parallel_rank(path, fs, only=len(files) == 1, tp_rank=t, tp_size=len(files))
            for t, fs in sorted(files.items())]
    parts = [part for part, _ in read]
    c = parts[0]
    if len(parts) > 1:
        if not c.tensor_parallel:
            raise CheckpointError(
                f"{path} was written by {len(parts)} tensor-parallel ranks without the partition of each "
                f"parameter (partition_dim, partition_stride), which ds_lowrank's optimizers record since "
                f"they join tensor-parallel checkpoints: load it with engine.load_checkpoint at its own "
                f"layout and save it again")
        _join_tensor_parallel(c, parts)
    _join_whole_rows(c, [rows for _, rows in read])
    return c


def _one_model_parallel_rank(path: Path, files: list[str], only: bool, tp_rank: int, tp_size: int
                             ) -> tuple[Consolidated, dict[str, list[tuple[int, int, dict]]]]:
    """One model-parallel rank's files (TP rank ``tp_rank`` of ``tp_size``), as one process holds
    its parameters (its shards), and apart, per ``tensor_parallel="global"`` shard stepped on ZeRO
    partitions, the state of the rows of its whole matrix each piece held (``_whole_rows_of``)."""
    inner, common, whole = _inner_state_dicts(path, files)
    name = inner[0].get("optimizer")
    if name is None:
        raise CheckpointError(f"{path}: the optimizer state is not a ds_lowrank optimizer's; for "
                              f"DeepSpeed's own optimizers use python -m deepspeed.checkpoint.ds_to_universal")
    cls = _optimizer_class(name)
    groups = [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in inner[0]["param_groups"]]
    if whole:
        # (megatron-core's layers add non-tensor ``_extra_state`` entries to the state dict)
        weights = {k: v.float() for k, v in common["module"].items() if torch.is_tensor(v)}
        states, group_of = _whole_states_of_stage0(inner[0])
        rows = {}
    else:
        pieces, group_of, shapes = _pieces(inner)
        sharded = inner[0].get("tensor_parallel", {})
        states, rows = {}, {}
        for label, qs in pieces.items():
            if any(_has_blocks(st) for st in qs):
                # a fused weight's pieces, with the state of the rows they own of each block
                _check_fused_record(inner[0], label)
                group, layout, shard = groups[group_of[label]], inner[0]["fused"][label], shapes[label]
                if fused_blocks.is_global(group, label in sharded):
                    rows[label] = fused_blocks.rows_of_pieces(label, layout, shard, qs, tp_rank, tp_size, True)
                else:
                    parts = fused_blocks.rows_of_pieces(label, layout, shard, qs, 0, 1, False)
                    states[label] = fused_blocks.merge_pieces(cls, group, label, layout, shard[0], shard[1], parts)
            elif label in sharded and _compressed_global_shard(cls, groups[group_of[label]], shapes[label],
                                                               sharded[label][0], tp_size):
                rows[label] = _whole_rows_of(cls, groups[group_of[label]], label, shapes[label], sharded[label],
                                             qs, tp_rank, tp_size)
            else:
                states[label] = merge(cls, groups[group_of[label]], label, shapes[label], qs)
        weights = {k: v.float() for k, v in _fp32_weights(path, files, only).items()}
    record = {k: [int(x) for x in v] for k, v in inner[0].get("tensor_parallel", {}).items()}
    fused = {k: _plain_layout(v) for k, v in inner[0].get("fused", {}).items() if k in states or k in rows}
    return Consolidated(name, groups, group_of, weights, states, fused=fused,
                        global_steps=int(common.get("global_steps", 0)),
                        skipped_steps=int(inner[0].get("skipped_steps", 0)),
                        lr_scheduler=common.get("lr_scheduler"), client_state=_client_state(common), tag=path.name,
                        tensor_parallel=record, tp_size=int(common.get("mp_world_size") or 1)), rows


def _plain_layout(layout: dict) -> dict:
    """A fused layout (``distributed.fused.record``) as JSON holds it."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in layout.items()}


def _compressed_global_shard(cls, group: dict, shard: tuple[int, ...], dim: int, tp_size: int) -> bool:
    """Whether ZeRO pieces of this Megatron shard hold rows of its whole matrix: a
    ``tensor_parallel="global"`` shard that the optimizer compresses (as it decides for the whole
    matrix; one it leaves to AdamW is held elementwise, as its shard)."""
    if not shard_tp.is_global_shard(cls, group, shard):
        return False
    return not shard_tp.kept_dense(cls, group, _whole_shape(shard, dim, tp_size), shard)


def _whole_shape(shard: tuple[int, ...], dim: int, world: int) -> tuple[int, ...]:
    whole = list(shard)
    whole[dim] *= world
    return tuple(whole)


def _whole_rows_of(cls, group: dict, label: str, shard: tuple[int, int], partition: list[int], pieces: list[dict],
                   tp_rank: int, tp_size: int) -> list[tuple[int, int, dict]]:
    """``(first, count, state)`` of every ZeRO piece of a global shard (``_compressed_global_shard``)
    of TP rank ``tp_rank``: the rows of the whole matrix whose state it holds, where the placement
    put them (the rows its data-parallel position owns of the shard, ``owned_rows``, as rows of
    the whole matrix, ``tensor_parallel.rows_in_whole``: a row-parallel shard's moved over the TP
    group)."""
    dim, stride = partition
    if stride != 1:
        raise CheckpointError(f"{label}: a fused weight (partition_stride {stride}) in tensor_parallel='global' "
                              f"mode on ZeRO partitions, which ds_lowrank does not step")
    out = []
    for st in pieces:
        start, stop = piece_range(st)
        owned = owned_rows(Piece(label, shard, start, stop, 0, -1), shard[1])
        first, count = rows_in_whole(dim, shard[0], owned.first, owned.count, tp_rank, tp_size)
        out.append((first, count, st))
    return out


def _join_whole_rows(c: Consolidated, parts: list[dict[str, list[tuple[int, int, dict]]]]) -> None:
    """The whole states of the global shards held on ZeRO partitions, from every TP rank's rows of
    them (``c.weights`` already whole)."""
    cls = _optimizer_class(c.optimizer)
    for label in sorted({label for rows in parts for label in rows}):
        shape = tuple(c.weights[label].shape)
        group = c.param_groups[c.group_of[label]]
        if label in c.fused:
            # per block: every TP and DP rank's rows of the whole logical matrix
            held = {}
            for rows in parts:
                for block, of_block in rows.get(label, {}).items():
                    held.setdefault(block, []).extend(of_block)
            c.states[label] = fused_blocks.merge_pieces(cls, group, label, c.fused[label], shape[0], shape[1], held)
            continue
        held = [r for rows in parts for r in rows.get(label, ())]
        c.states[label] = merge_rows(cls, group, label, shape, held)


def _join_tensor_parallel(c: Consolidated, parts: list[Consolidated]) -> None:
    """Make ``c`` (TP rank 0's, ``parts[0]``) the whole model's from every TP rank's part."""
    cls = _optimizer_class(c.optimizer)
    for name, (dim, stride) in c.tensor_parallel.items():
        if name not in c.weights:
            continue
        shard = tuple(c.weights[name].shape)
        c.weights[name] = shard_tp.whole_of([part.weights[name] for part in parts], dim, stride)
        if name in c.fused and name in c.states:
            group = c.param_groups[c.group_of[name]]
            states = [part.states[name] for part in parts]
            if group.get("tensor_parallel", "local") == "global":
                c.states[name] = fused_blocks.join(cls, group, name, c.fused[name], shard, states)
            else:
                # each shard's blocks are matrices of their own
                del c.states[name]
                c.shard_states[name] = states
        elif name in c.states:
            group = c.param_groups[c.group_of[name]]
            joined, per_rank = shard_tp.join_state(cls, group, name, tuple(c.weights[name].shape), dim, stride,
                                                   [part.states[name] for part in parts])
            if joined is None:
                del c.states[name]
                c.shard_states[name] = per_rank
            else:
                c.states[name] = joined


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
    """Whether the optimizer left parameter ``name`` to AdamW (its state is AdamW's); a Megatron
    shard's as its run decided it for the shard (``tensor_parallel.kept_dense``)."""
    if c.group_of.get(name) is None or name in c.fused:
        return False
    cls, group, whole = _optimizer_class(c.optimizer), c.param_groups[c.group_of[name]], tuple(c.weights[name].shape)
    if name in c.tensor_parallel:
        return shard_tp.kept_dense(cls, group, whole, _shard_shape(whole, c.tensor_parallel[name][0], c.tp_size))
    return cls.row_length(group, whole) is None


def _shard_shape(whole: tuple[int, ...], dim: int, world: int) -> tuple[int, ...]:
    shard = list(whole)
    shard[dim] //= world
    return tuple(shard)


def _cat_dim(c: Consolidated, name: str) -> dict:
    """What DeepSpeed's universal checkpoints record of how TP ranks cut a parameter (the axis,
    and the blocks of a fused one), read back by its loader at any TP size."""
    dim, stride = c.tensor_parallel.get(name, (0, 1))
    return {"cat_dim": dim, **({"param_n_sub_params": stride} if stride > 1 else {})}


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


def _per_block(c: Consolidated, states: dict) -> list[tuple[str, dict]]:
    """``(label, state)`` to write: a fused weight's blocks apart, as ``<name>[<block>]``
    (``state_layout.block_label``), which ``load`` nests again."""
    out = []
    for name, st in states.items():
        if name in c.fused:
            out += [(state_layout.block_label(name, block), of_block) for block, of_block in st.items()]
        else:
            out.append((name, st))
    return out


def _nest_blocks(fused: dict, states: dict) -> None:
    """``_per_block``'s inverse, in place."""
    for name in fused:
        prefix = name + "["
        blocks = {label[len(prefix):-1]: states.pop(label) for label in list(states) if label.startswith(prefix)}
        if blocks:
            states[name] = blocks


def _write_consolidated(c: Consolidated, tmp: Path) -> None:
    meta = {"optimizer": c.optimizer, "global_steps": c.global_steps, "skipped_steps": c.skipped_steps,
            "param_groups": [{k: _jsonable(v) for k, v in g.items()} for g in c.param_groups],
            "group_of": c.group_of, "client_state": c.client_state, "tensor_parallel": c.tensor_parallel,
            "tp_size": c.tp_size, **({"fused": c.fused} if c.fused else {})}
    for name, w in c.weights.items():
        folder = tmp / "zero" / name
        folder.mkdir(parents=True)
        torch.save({"param": _saved(w), **_cat_dim(c, name)}, folder / "fp32.pt")
    for name, st in _per_block(c, c.states):
        dense = _kept_dense(c, name)
        folder = tmp / ("zero" if dense else "lowrank") / name
        folder.mkdir(parents=True, exist_ok=True)
        for key, v in st.items():
            v = _saved(v)
            torch.save(v if key == "step" and dense else ({"param": v, **_cat_dim(c, name)} if dense else v),
                       folder / f"{key}.pt")
    for name, per_rank in c.shard_states.items():
        for t, of_rank in enumerate(per_rank):
            for label, st in _per_block(c, {name: of_rank}):
                folder = tmp / "lowrank" / label / f"{SHARD}{t}"
                folder.mkdir(parents=True)
                for key, v in st.items():
                    torch.save(_saved(v), folder / f"{key}.pt")
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
        if name in c.fused:
            # the whole logical matrices' states (global), or an unsplit weight's blocks'
            out[name] = fused_blocks.to_adam(cls, group, name, c.fused[name], shape, st)
            continue
        try:
            out[name] = adam_of_subspace(cls, group, shape, st)
        except ValueError as err:
            raise CheckpointError(f"{c.optimizer}'s state of {name}: {err}") from None
    for name in c.shard_states:
        out[name] = _adam_of_local_shards(c, name)
    return out


def _adam_of_local_shards(c: Consolidated, name: str) -> dict[str, torch.Tensor]:
    """Adam's state of the whole parameter from its tensor_parallel="local" shards': each shard's
    carried out of its own subspace (``adam_of_subspace``), side by side as the weights."""
    cls, group = _optimizer_class(c.optimizer), c.param_groups[c.group_of[name]]
    dim, stride = c.tensor_parallel[name]
    shard = _shard_shape(tuple(c.weights[name].shape), dim, c.tp_size)
    try:
        if name in c.fused:
            # each shard's blocks, at their rows of the shard
            per_rank = [fused_blocks.to_adam(cls, group, name, c.fused[name], shard, st)
                        for st in c.shard_states[name]]
        else:
            per_rank = [adam_of_subspace(cls, group, shard, st) for st in c.shard_states[name]]
    except ValueError as err:
        # (a fused weight's names its block)
        what = str(err) if isinstance(err, CheckpointError) else f"{c.optimizer}'s state of {name}: {err}"
        raise CheckpointError(
            f"{what}; its tensor_parallel='local' shards each have their own "
            f"state, which carries to another tensor-parallel size only through Adam's moments: resume "
            f"at the saved size ({c.tp_size}), or train with tensor_parallel='global'") from None
    return {"exp_avg": shard_tp.whole_of([a["exp_avg"] for a in per_rank], dim, stride),
            "exp_avg_sq": shard_tp.whole_of([a["exp_avg_sq"] for a in per_rank], dim, stride),
            "step": per_rank[0]["step"]}


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
        torch.save({"param": _saved(w), **_cat_dim(c, name)}, folder / "fp32.pt")
        for key in ("exp_avg", "exp_avg_sq"):
            torch.save({"param": _saved(adam[name][key].reshape(w.shape)), **_cat_dim(c, name)},
                       folder / f"{key}.pt")
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
    optimizer: see ``CompressedOptimizer.load_whole_state``).  Files are verified against the
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
        shard_states: dict[str, list[dict]] = {}
        for folder in sorted((root / "lowrank").glob(f"*/{SHARD}*"), key=lambda f: int(f.name[len(SHARD):])):
            shard_states.setdefault(folder.parent.name, []).append(
                {f.stem: load_file(f, map_location="cpu", weights_only=True) for f in sorted(folder.glob("*.pt"))})
        fused = meta.get("fused", {})
        _nest_blocks(fused, states)
        if fused:
            # per TP rank: {label[block]: [state of rank t]} to {label: [{block: state} of rank t]}
            by_rank: dict[str, dict] = {}
            for label, per_rank in shard_states.items():
                for t, st in enumerate(per_rank):
                    by_rank.setdefault(t, {})[label] = st
            nested = [dict(of_rank) for _, of_rank in sorted(by_rank.items())]
            for of_rank in nested:
                _nest_blocks(fused, of_rank)
            shard_states = {}
            for of_rank in nested:
                for label, st in of_rank.items():
                    shard_states.setdefault(label, []).append(st)
        scheduler = root / "lr_scheduler.pt"
        return Consolidated(meta["optimizer"], meta["param_groups"], meta["group_of"], weights, states,
                            global_steps=meta["global_steps"], skipped_steps=meta["skipped_steps"],
                            lr_scheduler=load_file(scheduler, weights_only=False) if scheduler.is_file() else None,
                            client_state=meta.get("client_state", {}),
                            tensor_parallel=meta.get("tensor_parallel", {}), tp_size=meta.get("tp_size", 1),
                            shard_states=shard_states, fused=fused)
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


def _tensor_parallel_layout(model, c: Consolidated, path: str) -> dict[str, tuple[int, int, int, int]]:
    """Per Megatron shard of ``model``: ``(partition_dim, partition_stride, TP rank, TP size)``
    of this process."""
    from ..distributed.tensor_parallel import megatron_group

    sharded = {name: p for name, p in model.named_parameters()
               if getattr(p, "tensor_model_parallel", False) and getattr(p, "partition_dim", None) is not None}
    if not sharded:
        return {}
    group = megatron_group()
    rank, world = (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))
    layout = {}
    for name, p in sharded.items():
        dim, stride = int(p.partition_dim), int(getattr(p, "partition_stride", 1))
        saved = c.tensor_parallel.get(name)
        if saved is not None and list(saved) != [dim, stride]:
            raise CheckpointError(f"{path}: {name} was split along dimension {saved[0]} in blocks of "
                                  f"{saved[1]}, but this model splits it along {dim} in blocks of {stride}: not a "
                                  f"checkpoint of this model")
        layout[name] = (dim, stride, rank, world)
    return layout


def _here(t: torch.Tensor, name: str, layout: dict) -> torch.Tensor:
    """This process's part of a whole parameter (or elementwise state) ``t``."""
    if name not in layout:
        return t
    dim, stride, rank, world = layout[name]
    return shard_tp.shard_of(t, name, dim, stride, rank, world)


def _states_here(c: Consolidated, inner, layout: dict, on_partitions: set[str], fused: dict | None = None
                 ) -> tuple[dict, dict]:
    """The states of this process's parameters: ``(exact, via_adam)``, those the optimizer takes
    as they are and those it starts from Adam's (``load_whole_state(from_adam=True)``).

    - a replicated parameter's, a dense one's, a ``"global"`` shard's: exact at any TP size (a
      compressed ``"global"`` shard that ZeRO partitions, ``on_partitions``, takes its whole
      matrix's state, from which each piece cuts the rows of the whole matrix it steps);
    - a ``"local"`` shard's at the TP size that saved it: its own, exact;
    - a ``"local"`` shard's at another TP size: the momentum its old shards held (projected
      moments and error feedback) carried into this shard's own new subspace through Adam's
      moments, and the second moment re-estimated there (``checkpoint.adam``);
    - from DeepSpeed's Adam: a ``"global"`` shard's from the whole matrix's (as one process
      starting it), any other from its own part of Adam's moments.

    A fused weight stepped as its blocks (``fused``: name -> layout, of this model) takes each
    block's state by the same rules (``_fused_state_here``).
    """
    cls, from_adam = type(inner), c.optimizer == "AdamW"
    groups = {name: g for g in inner.param_groups for name in g.get("param_names") or ()}
    exact, via_adam = {}, {}
    fused = fused or {}
    for name in set(c.fused) | set(fused):
        if name in c.states or name in c.shard_states:
            exact[name] = _fused_state_here(c, inner, groups, name, fused, layout, name in on_partitions)
    for name, st in c.states.items():
        if name in exact:
            continue
        if name not in layout:
            (via_adam if from_adam else exact)[name] = st
            continue
        dim, stride, rank, world = layout[name]
        whole = tuple(c.weights[name].shape)
        shard = _shard_shape(whole, dim, world)

        def compressed_global(group) -> bool:
            return shard_tp.is_global_shard(cls, group, shard) and not shard_tp.kept_dense(cls, group, whole, shard)
        if not from_adam:
            group = c.param_groups[c.group_of[name]]
            if not shard_tp.kept_dense(cls, group, whole, shard):
                _check_mode(c, name, groups)
            if name in on_partitions and compressed_global(group):
                shard_tp.check_divides(name, whole, dim, stride, world)
                exact[name] = st
            else:
                exact[name] = shard_tp.cut_state(cls, group, name, whole, dim, stride, rank, world, st)
            continue
        group = groups.get(name)
        if group is not None and compressed_global(group):
            state = inner.state_from_adam(group, name, whole, {k: v.reshape(whole) if v.dim() else v
                                                                for k, v in st.items()})
            exact[name] = state if name in on_partitions else shard_tp.cut_state(cls, group, name, whole, dim,
                                                                                  stride, rank, world, state)
        else:
            via_adam[name] = {k: v if v.dim() == 0 else _here(v.reshape(whole), name, layout) for k, v in st.items()}
    for name, per_rank in c.shard_states.items():
        if name in exact:
            continue
        _check_mode(c, name, groups)
        if layout.get(name, (None, None, None, 1))[3] == c.tp_size:
            exact[name] = per_rank[layout[name][2]] if name in layout else per_rank[0]
            continue
        adam = _adam_of_local_shards(c, name)
        via_adam[name] = {k: v if v.dim() == 0 else _here(v, name, layout) for k, v in adam.items()}
    return exact, via_adam


def _fused_state_here(c: Consolidated, inner, groups: dict, name: str, fused: dict, layout: dict,
                      on_partitions: bool) -> dict:
    """This process's state of fused weight ``name``, per block: in global mode the whole logical
    matrices' (ZeRO pieces cut their rows from it) or this TP rank's rows of them; in local mode
    the shard's own blocks' at the TP size that saved them, else their momentum carried through
    Adam's moments into this shard's blocks; from Adam, each block's from its rows of the moments."""
    cls, from_adam = type(inner), c.optimizer == "AdamW"
    if name not in fused:
        raise CheckpointError(f"{name} was saved as the blocks of a fused weight (partition_stride or fused_qkv), "
                              f"but this model does not fuse it: declare the same fused layout")
    mine = fused[name]
    if not from_adam and name not in c.fused:
        raise CheckpointError(f"{name}: the checkpoint holds the state of the whole weight, but this model fuses it "
                              f"(partition_stride or fused_qkv) and steps its blocks: declare the layout of the run "
                              f"that saved it, or start the blocks from its momentum (tools/convert_checkpoint.py "
                              f"--to adam)")
    if name in c.fused and _plain_layout(c.fused[name]) != _plain_layout(mine):
        raise CheckpointError(f"{name} was saved fused as {c.fused[name]}, but this model fuses it as "
                              f"{_plain_layout(mine)}: not a checkpoint of this model")
    group = groups[name]
    whole = tuple(c.weights[name].shape)
    dim, stride, rank, world = layout.get(name, (0, 1, 0, 1))
    global_mode = fused_blocks.is_global(group, name in layout)
    if not from_adam:
        _check_mode(c, name, groups)
        if name in c.states and (global_mode or world == 1):
            if on_partitions or not global_mode:
                return c.states[name]
            return fused_blocks.cut(cls, group, name, mine, whole, rank, world, c.states[name])
        if name in c.shard_states and world == c.tp_size:
            return c.shard_states[name][rank]
        adam = (_adam_of_local_shards(c, name) if name in c.shard_states else
                fused_blocks.to_adam(cls, c.param_groups[c.group_of[name]], name, c.fused[name], whole,
                                     c.states[name]))
    else:
        adam = {k: v.reshape(whole) if v.dim() else v for k, v in c.states[name].items()}
    if global_mode:
        # the whole logical matrices from the whole weight's moments, as one process would start them
        state = fused_blocks.from_adam(inner, group, name, mine, adam)
        return state if on_partitions else fused_blocks.cut(cls, group, name, mine, whole, rank, world, state)
    return fused_blocks.from_adam(inner, group, name, mine, {k: v if v.dim() == 0 else _here(v, name, layout)
                                                             for k, v in adam.items()})


def _check_mode(c: Consolidated, name: str, groups: dict) -> None:
    """Refuse the compressed state of a Megatron shard saved in one ``tensor_parallel`` mode for a
    run stepping it in the other: a "global" shard's is its whole matrix's, a "local" one's its own
    subspace's, and neither is the other's."""
    mine = groups.get(name)
    if mine is None:
        return
    saved = c.param_groups[c.group_of[name]].get("tensor_parallel", "local")
    now = mine.get("tensor_parallel", "local")
    if saved != now:
        raise CheckpointError(
            f"{name} was saved with tensor_parallel={saved!r}, but this run steps it with {now!r}: resume with "
            f"tensor_parallel={saved!r}, or start {now!r} from the momentum (tools/convert_checkpoint.py --to adam)")


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
    layout = _tensor_parallel_layout(model, c, path)
    weights = {name: _here(c.weights[name], name, layout) for name, _ in model.named_parameters()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if weights[name].shape != p.shape:
                raise CheckpointError(f"{path}: {name} is {tuple(c.weights[name].shape)} whole, which does not "
                                      f"give this model's {tuple(p.shape)}: not a checkpoint of this model")
            p.copy_(weights[name])
    if optimizer is None:
        engine, optimizer, loader, scheduler = initialize(model=model, config=config, **initialize_kwargs)
    else:
        config = {**resolve_warmup(load_config(config)), "zero_allow_untested_optimizer": True}
        if initialize_kwargs.get("mpu") is not None:
            # megatron-core's parallel_state as it is, as ds_lowrank.initialize takes it
            initialize_kwargs["mpu"] = as_deepspeed_mpu(initialize_kwargs["mpu"])
        engine, optimizer, loader, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                    config=config, **initialize_kwargs)
    inner = getattr(optimizer, "optimizer", optimizer)
    from_adam = c.optimizer == "AdamW"
    if type(inner).__name__ != c.optimizer and not from_adam:
        raise CheckpointError(f"{path} holds {c.optimizer} state, but the run builds {type(inner).__name__}")
    # the parameters DeepSpeed's ZeRO partitions (its pieces take their state when they bind)
    on_partitions = {name for name, p in model.named_parameters() if deepspeed_managed(p)}
    fused = {name: fused_layout(p) for name, p in model.named_parameters() if stepped_as_blocks(type(inner), p)}
    exact, via_adam = _states_here(c, inner, layout, on_partitions, fused)
    inner.load_whole_state(exact, weights)
    inner.load_whole_state(via_adam, from_adam=True)
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
