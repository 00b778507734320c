"""What a prepared dataset directory is: its format name and version, its splits, its
``meta.json`` (read and checked here), and the errors every part of the data code raises."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ...utils.validation import is_count

FORMAT = "ds_lowrank.tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
PREPARE_AGAIN = "prepare the data again with python tools/prepare_data.py"


class DataError(ValueError):
    """Bad input or a dataset that cannot be prepared or read; the message names the fix."""


class DatasetExistsError(DataError):
    """The output of a preparation already exists and replacing it was not asked for."""


def load_metadata(data_dir: str | Path) -> dict:
    """The ``meta.json`` of a prepared dataset, checked for format and version, and for the
    facts the reader relies on (dtype, vocab_size, eos_token_id, each split's token count)."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"{data_dir} is not a prepared dataset (no meta.json); prepare one with "
                        f"python tools/prepare_data.py")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}): the dataset is damaged; {PREPARE_AGAIN}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} holds a JSON {type(meta).__name__}, not the object prepare_data.py "
                        f"writes: the dataset is damaged; {PREPARE_AGAIN}")
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise DataError(f"{path} is format {meta.get('format')!r} version {meta.get('version')!r}; this "
                        f"code reads {FORMAT!r} version {FORMAT_VERSION}: prepare the data again")
    _check_metadata(meta, path)
    return meta


def _check_metadata(meta: dict, path: Path) -> None:
    def bad(what: str):
        return DataError(f"{path}: {what}: the dataset is damaged or was edited; {PREPARE_AGAIN}")

    missing = [k for k in ("dtype", "vocab_size", "eos_token_id", "splits") if k not in meta]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    try:
        dtype = np.dtype(meta["dtype"]) if isinstance(meta["dtype"], str) else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind != "u":
        raise bad(f"dtype {meta['dtype']!r} is not an unsigned integer type (uint16 or uint32)")
    vocab = meta["vocab_size"]
    if not is_count(vocab) or vocab < 1:
        raise bad(f"vocab_size {vocab!r} is not a positive integer")
    if vocab - 1 > np.iinfo(dtype).max:
        raise bad(f"vocab_size {vocab} does not fit in dtype {dtype.name}")
    eos = meta["eos_token_id"]
    if not is_count(eos) or eos >= vocab:
        raise bad(f"eos_token_id {eos!r} is not a token id below vocab_size {vocab}")
    splits = meta["splits"]
    for split in SPLITS:
        info = splits.get(split) if isinstance(splits, dict) else None
        if not isinstance(info, dict) or not is_count(info.get("tokens")):
            raise bad(f"splits.{split}.tokens is missing or not a non-negative integer")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
