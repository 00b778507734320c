"""Preparing a dataset: tokenize a corpus into the directory format (see the package
docstring), built under a temporary name and published whole; and the built-in corpus,
prepared once per cache directory."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ...utils.files import atomic_write, publish_directory, staging_directory
from ...utils.validation import is_count
from .corpus import Corpus, stdlib_corpus, stdlib_fingerprint
from .format import FORMAT, FORMAT_VERSION, SPLITS, DataError, DatasetExistsError, load_metadata
from .tokenizer import encode, eos_token_id, load_hf_tokenizer, train_bpe_tokenizer

logger = logging.getLogger(__name__)


def prepare_dataset(
    corpus: Corpus,
    output_dir: str | Path,
    *,
    tokenizer=None,
    vocab_size: int = 4096,
    val_fraction: float = 0.01,
    seed: int = 0,
    max_documents: int | None = None,
    overwrite: bool = False,
    source: str = "",
    batch_size: int = 512,
) -> Path:
    """Tokenize ``corpus`` into a dataset directory (the format in the module docstring).

    ``tokenizer`` is a Hugging Face tokenizer or the path of a local tokenizer directory;
    without one, a byte-level BPE tokenizer of ``vocab_size`` entries is trained on the corpus.
    ``val_fraction`` of the documents (at least one, when positive) go to the validation split,
    chosen with ``seed``.  Raises :class:`DataError` on bad input and
    :class:`DatasetExistsError` when ``output_dir`` exists and ``overwrite`` is false.
    """
    # Absolute, so that "." or "x/.." still name a directory with a parent to rename within.
    output_dir = Path(os.path.abspath(output_dir))
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_documents is not None and max_documents < 1:
        raise DataError(f"max_documents must be positive, got {max_documents}")
    if not is_count(seed):
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    _refuse_existing(output_dir, overwrite)
    start = time.perf_counter()

    def documents() -> Iterator[str]:
        return itertools.islice(corpus(), max_documents)

    count = 0

    def counted() -> Iterator[str]:
        nonlocal count
        for text in documents():
            count += 1
            yield text

    if tokenizer is None:
        tokenizer = train_bpe_tokenizer(counted(), vocab_size)
        tokenizer_source = f"byte-level BPE trained on this corpus (vocab_size {vocab_size} requested)"
    else:
        if isinstance(tokenizer, (str, Path)):
            tokenizer_source = str(Path(tokenizer).resolve())
            tokenizer = load_hf_tokenizer(tokenizer)
        else:
            tokenizer_source = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        for _ in counted():
            pass
    if count == 0:
        raise DataError(f"no text found in {source or 'the input'}: every document is empty (for "
                        f"JSONL, check that --text_key names the field holding the text)")
    if val_fraction > 0 and count < 2:
        raise DataError(f"only one document found in {source or 'the input'}, so no document is left "
                        f"for a validation split; split text files into more documents "
                        f"(--doc_boundary blank_line or line) or pass --val_fraction 0")
    in_val = _validation_mask(count, val_fraction, seed)
    eos = eos_token_id(tokenizer)
    dtype = np.dtype("<u2") if len(tokenizer) <= 2**16 else np.dtype("<u4")

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_directory(output_dir)
    changed = DataError(f"the input changed while it was read ({count} documents the first time, not "
                        f"the second); prepare it again")
    writers = {}
    try:
        writers = {split: _SplitWriter(tmp, split, dtype) for split in SPLITS}
        seen = 0
        for batch in _batched(documents(), batch_size):
            if seen + len(batch) > count:
                raise changed
            for ids in encode(tokenizer, batch):
                writers["val" if in_val[seen] else "train"].add(ids, eos)
                seen += 1
        if seen != count:
            raise changed
        splits = {split: writer.close() for split, writer in writers.items()}
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": len(tokenizer),
            "eos_token_id": eos,
            "tokenizer": {"dir": "tokenizer", "source": tokenizer_source},
            "splits": splits,
            "documents": count,
            "val_fraction": val_fraction,
            "seed": seed,
            "source": source,
        }
        atomic_write(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")
        _publish(tmp, output_dir, overwrite)
    except BaseException:
        for writer in writers.values():
            writer.file.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("prepared %s: %d documents, %d train / %d val tokens (%s) in %.1f s", output_dir, count,
                splits["train"]["tokens"], splits["val"]["tokens"], dtype.name, time.perf_counter() - start)
    return output_dir


# A temporary directory whose name does not say which process writes it (an older version's)


def default_corpus(
    cache_dir: str | Path,
    *,
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    seed: int = 0,
) -> Path:
    """The default pretraining data: standard-library docstrings, prepared once per cache directory.

    Returns the dataset directory (inside ``cache_dir``, named after the Python version and a
    fingerprint of its standard library and of the settings).  The first call builds it (a few
    hundred thousand tokens with a byte-level BPE tokenizer of ``vocab_size`` entries, the
    ``tiny`` model preset's vocabulary); later calls reuse it.  Concurrent callers (one per rank)
    each build and the first to finish wins, so have rank 0 call it before the others to save
    the work.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    settings = f"{stdlib_fingerprint(root)} v{FORMAT_VERSION} {vocab_size} {val_fraction} {seed}"
    key = hashlib.blake2b(settings.encode(), digest_size=5).hexdigest()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    output = Path(cache_dir) / f"stdlib-docs-py{version}-{key}"
    if (output / "meta.json").is_file():
        logger.info("default corpus: using the cached standard-library docstrings at %s", output)
        return output
    start = time.perf_counter()
    try:
        prepare_dataset(stdlib_corpus(root), output, vocab_size=vocab_size, val_fraction=val_fraction,
                        seed=seed, source=f"docstrings of the Python {version} standard library at {root}")
    except DatasetExistsError:
        if not (output / "meta.json").is_file():
            raise
        logger.info("default corpus: another process prepared %s first; using it", output)
        return output
    meta = load_metadata(output)
    logger.info("default corpus: built %d train + %d val tokens from the standard library's docstrings "
                "in %.1f s (nothing downloaded); cached at %s", meta["splits"]["train"]["tokens"],
                meta["splits"]["val"]["tokens"], time.perf_counter() - start, output)
    return output


def _validation_mask(count: int, val_fraction: float, seed: int) -> np.ndarray:
    n_val = 0 if val_fraction == 0 else min(count - 1, max(1, round(count * val_fraction)))
    mask = np.zeros(count, dtype=bool)
    mask[np.random.default_rng(seed).permutation(count)[:n_val]] = True
    return mask


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


class _SplitWriter:
    """Appends documents to ``<split>.bin`` and remembers where each one starts."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype):
        self.directory, self.split, self.dtype = directory, split, dtype
        self.file = open(directory / f"{split}.bin", "wb")
        self.offsets = [0]

    def add(self, ids: list[int], eos: int) -> None:
        # A too-large id cannot be stored silently: numpy raises OverflowError on conversion.
        tokens = np.array([*ids, eos], dtype=self.dtype)
        self.file.write(tokens.tobytes())
        self.offsets.append(self.offsets[-1] + len(tokens))

    def close(self) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        with open(self.directory / f"{self.split}.idx", "wb") as f:
            np.save(f, np.asarray(self.offsets, dtype=np.int64))
            f.flush()
            os.fsync(f.fileno())
        return {"tokens": self.offsets[-1], "documents": len(self.offsets) - 1}


def _occupied(path: Path) -> bool:
    """Whether writing a dataset to ``path`` would replace something (an empty directory would not)."""
    if path.is_symlink() or path.is_file():
        return True
    return path.is_dir() and any(path.iterdir())


def _refuse_existing(output_dir: Path, overwrite: bool) -> None:
    if not overwrite and _occupied(output_dir):
        raise DatasetExistsError(f"{output_dir} already exists and is not empty; pass --overwrite "
                                 f"(overwrite=True) to replace it, or choose another output directory")


def _publish(tmp: Path, output_dir: Path, overwrite: bool) -> None:
    """Move a complete dataset into place (``publish_directory``); an occupied destination
    without ``overwrite`` is refused with the way forward."""
    try:
        publish_directory(tmp, output_dir, overwrite)
    except OSError:
        if not overwrite and _occupied(output_dir):
            _refuse_existing(output_dir, overwrite=False)
        raise
