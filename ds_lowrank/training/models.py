"""Llama model presets and building a model from scratch.

A preset is a Hugging Face ``LlamaConfig`` saved as JSON in ``configs/models/<name>.json``.  The
shipped ones are ``tiny`` (for CPU tests and smoke runs; its vocabulary matches the default
byte-level BPE tokenizer of :mod:`ds_lowrank.training.data`) and the Llama shapes of the GaLore
and LDAdam pretraining experiments (GaLore's ``configs/llama_{60m,130m,350m,1b,7b}.json``):

======  ======  ============  =====  ======  =====  =================
preset  hidden  intermediate  heads  layers  vocab  max positions
======  ======  ============  =====  ======  =====  =================
tiny    128     344           4      2       4096   256
60m     512     1376          8      8       32000  1024
130m    768     2048          12     12      32000  1024
350m    1024    2736          16     24      32000  1024
1b      2048    5461          32     24      32000  1024
7b      4096    11008         32     32      32000  2048
======  ======  ============  =====  ======  =====  =================

All use ``rms_norm_eps=1e-6`` and separate input and output embeddings.  GaLore's files spell the
context length ``max_sequence_length``, a key current ``LlamaConfig`` ignores, so the presets state
``max_position_embeddings`` instead.

To add a preset, drop a JSON file into ``configs/models/`` (any ``LlamaConfig`` field may be set;
``model_type`` must be ``"llama"``), or pass the path of a JSON file wherever a preset name is
accepted.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.activations import ACT2FN

from ..resources import presets_dir
from ..utils.validation import is_int

# Inside an installed package (ds_lowrank/configs/models), else the checkout's configs/models.
DEFAULT_PRESETS_DIR = presets_dir()
# The sizes a model config must state: LlamaConfig would silently fill a missing one with
# Llama-7B's.
SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
# keys that mark a DeepSpeed config, passed where a model config belongs
DEEPSPEED_KEYS = ("optimizer", "zero_optimization", "train_batch_size", "train_micro_batch_size_per_gpu")


def available_presets(presets_dir: str | Path | None = None) -> list[str]:
    """Names of the presets in ``presets_dir`` (default: the repository's ``configs/models``)."""
    directory = Path(presets_dir) if presets_dir is not None else DEFAULT_PRESETS_DIR
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.json"))


def _preset_path(name_or_path: str | Path, presets_dir: str | Path | None) -> Path:
    candidate = Path(name_or_path)
    # Anything that looks like a file is taken as one, so a typo in a path is not
    # reported as an unknown preset name.
    if candidate.suffix == ".json" or candidate.is_file() or len(candidate.parts) > 1:
        if not candidate.is_file():
            raise ValueError(f"model config file {str(candidate)!r} does not exist; pass an existing "
                             f"LlamaConfig JSON file or one of the presets: {_listing(presets_dir)}")
        return candidate
    directory = Path(presets_dir) if presets_dir is not None else DEFAULT_PRESETS_DIR
    path = directory / f"{name_or_path}.json"
    if not path.is_file():
        raise ValueError(
            f"unknown model preset {str(name_or_path)!r}; available presets in {directory}: "
            f"{_listing(presets_dir)}. To add one, save a LlamaConfig as JSON in "
            f"{directory / (str(name_or_path) + '.json')}, or pass the path of a JSON file instead "
            f"of a name")
    return path


def _listing(presets_dir: str | Path | None) -> str:
    names = available_presets(presets_dir)
    return ", ".join(names) if names else "(none found)"


def load_preset(name_or_path: str | Path, presets_dir: str | Path | None = None) -> LlamaConfig:
    """The ``LlamaConfig`` of a preset name (``"60m"``) or of a JSON file path.

    ``presets_dir`` replaces the repository's ``configs/models`` as the place names are looked up.
    Raises ``ValueError`` for an unknown name, a missing or malformed file, or a config that is
    not a Llama one (sizes missing or not positive integers, a field LlamaConfig refuses).
    """
    path = _preset_path(name_or_path, presets_dir)
    example = f"start from a preset such as {DEFAULT_PRESETS_DIR / 'tiny.json'}"
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"model config {path} is not valid JSON: {err}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"model config {path} is not a JSON text file (byte {err.start} is not UTF-8 "
                         f"text); pass a preset name or a LlamaConfig JSON file") from None
    if not isinstance(fields, dict):
        raise ValueError(f"model config {path} must hold a JSON object of LlamaConfig fields")
    model_type = fields.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(f"model config {path} has model_type {model_type!r}; only 'llama' "
                         f"configs are supported")
    missing = [k for k in SIZE_FIELDS if k not in fields]
    if missing:
        hint = ("; it looks like a DeepSpeed config (pass that with --deepspeed_config)"
                if any(k in fields for k in DEEPSPEED_KEYS) else "")
        raise ValueError(f"model config {path} is not a LlamaConfig: it lacks {', '.join(missing)}, which "
                         f"LlamaConfig would fill with Llama-7B's sizes{hint}; state every size, or {example}")
    for key in (*SIZE_FIELDS, "max_position_embeddings", "num_key_value_heads"):
        value = fields.get(key, 1)
        if value is not None and not (is_int(value) and value >= 1):
            raise ValueError(f"model config {path}: {key} {value!r} must be a positive integer")
    try:
        config = LlamaConfig(**{k: v for k, v in fields.items() if k != "model_type"})
    except Exception as err:  # transformers' field validation raises several types, not one
        reason = str(err).strip().splitlines()
        raise ValueError(f"model config {path} is not a valid LlamaConfig: {type(err).__name__}: "
                         f"{' '.join(line.strip() for line in reason)}; fix that field, or {example}") from None
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"model config {path}: hidden_size {config.hidden_size} is not divisible "
                         f"by num_attention_heads {config.num_attention_heads}")
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if config.num_attention_heads % kv_heads:
        raise ValueError(f"model config {path}: num_attention_heads {config.num_attention_heads} is not "
                         f"divisible by num_key_value_heads {kv_heads!r}")
    if not isinstance(config.hidden_act, str) or config.hidden_act not in ACT2FN:
        raise ValueError(f"model config {path}: unknown hidden_act {config.hidden_act!r}; Llama uses 'silu'")
    return config


def build_model(
    config: LlamaConfig,
    seq_len: int,
    *,
    vocab_size: int | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    seed: int | None = None,
) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM``; nothing is downloaded.

    ``seq_len`` is checked against ``max_position_embeddings`` because the model itself accepts
    longer inputs silently and only degrades.  ``vocab_size`` replaces the config's (the
    tokenizer of the prepared data may be smaller or larger than the preset's 32000).  ``device``
    may be ``"meta"`` to get the shapes without allocating memory.  ``seed``, when given, makes
    the initialisation reproducible without touching the global random state.  The config passed
    in is not modified.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if seq_len > config.max_position_embeddings:
        raise ValueError(
            f"seq_len {seq_len} exceeds the model's max_position_embeddings "
            f"{config.max_position_embeddings}; use a sequence length of at most "
            f"{config.max_position_embeddings}, or a preset (or a copy of this one) with a larger "
            f"max_position_embeddings")
    config = copy.deepcopy(config)
    if vocab_size is not None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        config.vocab_size = vocab_size
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        # No device context unless asked: a caller's own context (DeepSpeed's zero.Init for
        # ZeRO-3) decides where parameters go.
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    return model


def count_params(model_or_config: nn.Module | LlamaConfig, trainable_only: bool = False) -> int:
    """Number of parameters of a model, or of the model a config describes.

    A config is built on the meta device, so even the 7b preset costs no memory.  Shared
    parameters (tied embeddings) count once.
    """
    if isinstance(model_or_config, LlamaConfig):
        model_or_config = build_model(model_or_config, 1, device="meta")
    # parameters() yields a shared parameter once.
    return sum(p.numel() for p in model_or_config.parameters() if p.requires_grad or not trainable_only)
