"""Export a pretraining checkpoint as a Hugging Face model directory.

    python tools/export_hf.py runs/tiny-ldadam_zero2 hf/tiny-ldadam              # the run's latest checkpoint
    python tools/export_hf.py runs/tiny-ldadam_zero2/checkpoints hf/step100 --tag step100 --dtype bfloat16

CHECKPOINT is a run directory (``--out_dir`` of ``launch/pretrain.py``), its ``checkpoints``
folder (the tag defaults to the one ``latest`` names) or one tag's folder.  The files are first
verified against the checkpoint's ``checksums.json`` (a missing, truncated or corrupted file
stops the export, naming it; a checkpoint without checksums is exported with a warning).  The
fp32 weights come from DeepSpeed's ``zero_to_fp32`` for any ZeRO stage (gathered from every
rank's partition), from the model states of a checkpoint without ZeRO, or, for a checkpoint of
``--engine fsdp2``, from its ``torch.distributed.checkpoint`` files (every rank's shards, read in
this one process; the run's records come from its ``client_state.pt``).  The model config is
the one the run recorded in the checkpoint (``--model`` gives a preset or LlamaConfig JSON for a
checkpoint without one); the tokenizer is the dataset's (``--tokenizer DIR`` to choose another,
``--no_tokenizer`` to leave it out).  OUT then loads with
``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` (and ``AutoTokenizer``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from pathlib import Path

MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
# an --engine fsdp2 checkpoint: DCP's metadata, and the run's records (engine_fsdp2.CLIENT_STATE)
DCP_METADATA, FSDP2_STATES = ".metadata", "client_state.pt"
# the prefix of the model's entries in the state dict the FSDP2 engine saves ({"model": ..., "optim": ...})
DCP_MODEL = "model."


def _is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is one checkpoint's folder, DeepSpeed's or FSDP2's."""
    return any((path / name).is_file() for name in (*MODEL_STATES, FSDP2_STATES))


class ExportError(Exception):
    """A checkpoint that cannot be exported; the message names the reason and the fix."""


def locate(checkpoint: str | Path, tag: str | None = None) -> tuple[Path, str]:
    """(the folder given to ``save_checkpoint``, the tag) of a run directory, a checkpoints
    folder or a tag's folder."""
    from ds_lowrank.checkpoint import CheckpointError
    from ds_lowrank.checkpoint.integrity import read_latest

    path = Path(checkpoint)
    if not path.is_dir():
        raise ExportError(f"{path} does not exist or is not a folder; pass a run directory, its checkpoints "
                          f"folder or one checkpoint's folder")
    if (path / "checkpoints").is_dir() and not _is_checkpoint(path):
        path = path / "checkpoints"
    if _is_checkpoint(path):
        if tag is not None and tag != path.name:
            raise ExportError(f"{path} is the checkpoint {path.name!r}, not --tag {tag!r}")
        return path.parent, path.name
    if tag is None:
        try:
            tag = read_latest(path)
        except CheckpointError as err:
            raise ExportError(str(err)) from None
    if not (path / tag).is_dir():
        raise ExportError(f"{path} has no checkpoint {tag!r}")
    return path, tag


def read_model_states(directory: Path) -> dict:
    import torch

    for name in (*MODEL_STATES, FSDP2_STATES):
        if (directory / name).is_file():
            return torch.load(directory / name, map_location="cpu", mmap=True, weights_only=False)
    raise ExportError(f"{directory} holds no DeepSpeed model states ({' or '.join(MODEL_STATES)}) nor an "
                      f"--engine fsdp2 checkpoint's {FSDP2_STATES}: not a checkpoint of launch/pretrain.py")


def fp32_state_dict(save_dir: Path, tag: str, states: dict) -> dict:
    """The full fp32 weights: DeepSpeed's zero_to_fp32 under ZeRO, the model states without."""
    directory = save_dir / tag
    if (directory / FSDP2_STATES).is_file():
        return dcp_model_weights(directory)
    if any(directory.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag=tag))
    return {k: v.float() for k, v in states["module"].items()}


def dcp_model_weights(directory: Path) -> dict:
    """The whole fp32 weights of a DCP checkpoint of the FSDP2 engine, read in this process (no
    process group): the model's entries of its metadata, loaded into tensors of their whole shapes."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not (directory / DCP_METADATA).is_file():
        raise ExportError(f"{directory} has {FSDP2_STATES} but no {DCP_METADATA}: the --engine fsdp2 checkpoint "
                          f"is incomplete; export another checkpoint of the run")
    reader = dcp.FileSystemReader(str(directory))
    entries = reader.read_metadata().state_dict_metadata
    weights = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype) for key, meta in entries.items()
               if key.startswith(DCP_MODEL) and isinstance(meta, TensorStorageMetadata)}
    if not weights:
        raise ExportError(f"{directory}: the checkpoint holds no model weights ({DCP_MODEL}* entries)")
    dcp.load(weights, storage_reader=reader, no_dist=True)
    return {key[len(DCP_MODEL):]: value.float() for key, value in weights.items()}


def model_config_of(states: dict, model: str | None):
    from transformers import LlamaConfig

    if model is not None:
        from ds_lowrank.training.models import load_preset
        try:
            return load_preset(model)
        except ValueError as err:
            raise ExportError(str(err)) from None
    if "model_config" not in states:
        raise ExportError("the checkpoint does not record its model config (written before checkpoints carried "
                          "it, or by another script): pass --model with the preset or LlamaConfig JSON it was "
                          "trained with")
    fields = json.loads(states["model_config"])
    fields.pop("model_type", None)
    return LlamaConfig(**fields)


def export(checkpoint, out, tag=None, model=None, tokenizer=None, with_tokenizer=True, dtype="float32",
           overwrite=False, log=print) -> Path:
    """Write the Hugging Face model directory ``out``; returns it."""
    import torch
    from transformers import LlamaForCausalLM

    from ds_lowrank.checkpoint.integrity import UnverifiedCheckpoint, check_or_warn

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; pass --overwrite to replace it, or another folder")
    save_dir, tag = locate(checkpoint, tag)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnverifiedCheckpoint)
        check_or_warn(save_dir / tag, "exporting")      # IntegrityError names a damaged file
    for w in caught:
        log(f"warning: {w.message}")
    if any((save_dir / tag).glob("*mp_rank_01_*")):
        # AutoTP writes one set of files per tensor-parallel rank, each holding that rank's shards
        raise ExportError(f"{save_dir / tag} was written with tensor parallelism (files per TP rank: mp_rank_00, "
                          f"mp_rank_01, ...), whose weights are DeepSpeed AutoTP shards that this tool does not "
                          f"join; export a run trained with --tensor_parallel 1")
    states = read_model_states(save_dir / tag)
    config = model_config_of(states, model)
    config.use_cache = True
    weights = fp32_state_dict(save_dir, tag, states)

    hf = LlamaForCausalLM(config)
    result = hf.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise ExportError(f"the checkpoint's weights do not fit the model config: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(result.unexpected_keys)[:5]}; pass the --model it was trained with")
    hf = hf.to(getattr(torch, dtype))

    tok = None
    if with_tokenizer:
        from ds_lowrank.training.data import DataError, load_hf_tokenizer, load_tokenizer
        try:
            if tokenizer is not None:
                tok = load_hf_tokenizer(tokenizer)
            elif states.get("data"):
                tok = load_tokenizer(states["data"])
        except (DataError, OSError, KeyError) as err:
            if tokenizer is not None:
                raise ExportError(f"--tokenizer {tokenizer}: {err}") from None
            log(f"warning: no tokenizer exported: the run's data {states.get('data')} has none that loads "
                f"({err}); pass --tokenizer DIR")

    if out.exists():
        shutil.rmtree(out)
    hf.save_pretrained(out)
    if tok is not None:
        tok.save_pretrained(out)
    n = sum(p.numel() for p in hf.parameters())
    log(f"{save_dir / tag}: {n / 1e6:.2f}M parameters ({dtype}) step {states.get('step', states.get('global_steps'))}"
        f"{', tokenizer' if tok is not None else ''}, written to {out}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a run directory, its checkpoints folder, or one checkpoint's folder")
    ap.add_argument("out", help="the Hugging Face model directory to write")
    ap.add_argument("--tag", default=None, help="the checkpoint's tag (default: the one in 'latest')")
    ap.add_argument("--model", default=None,
                    help="model preset or LlamaConfig JSON (default: the config recorded in the checkpoint)")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: the run's dataset's)")
    ap.add_argument("--no_tokenizer", action="store_true", help="write the model only")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="dtype of the saved weights (default: float32)")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = ap.parse_args(argv)
    from ds_lowrank.checkpoint import CheckpointError
    try:
        export(args.checkpoint, args.out, tag=args.tag, model=args.model, tokenizer=args.tokenizer,
               with_tokenizer=not args.no_tokenizer, dtype=args.dtype, overwrite=args.overwrite)
    except (ExportError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
