"""Token datasets for causal-LM pretraining: preparation, a default corpus, and a reader.

A prepared dataset is one directory::

    <dir>/meta.json          what the files hold (below)
    <dir>/train.bin          the token ids of the training documents, back to back, each document
    <dir>/val.bin            followed by the end-of-document token; raw little-endian ``uint16`` when
                             the vocabulary has at most 65536 entries, else ``uint32``:
                             ``np.memmap(path, dtype=meta["dtype"], mode="r")``
    <dir>/train.idx          ``.npy`` int64 array of ``documents + 1`` offsets into the ``.bin``:
    <dir>/val.idx            document ``i`` is ``tokens[idx[i]:idx[i + 1]]``, its end token included;
                             ``np.load(path, mmap_mode="r")``
    <dir>/tokenizer/         a Hugging Face tokenizer: ``AutoTokenizer.from_pretrained(<dir>/tokenizer)``

``meta.json`` holds ``format``, ``version``, ``dtype``, ``vocab_size`` (the tokenizer's length),
``eos_token_id``, ``tokenizer`` (where it came from), ``splits`` (``{"train": {"tokens",
"documents"}, "val": {...}}``), ``documents``, ``val_fraction``, ``seed`` and ``source``.

The validation split is a set of whole documents, drawn with ``seed``; no validation document
is in the training split.  A directory is built under a temporary name next to its destination
and renamed into place once complete, so a dataset directory is never half-written; an existing
one is only replaced when asked to.

:func:`prepare_dataset` does the work from any re-iterable source of documents (text files,
JSONL, a Hugging Face dataset, the standard library's docstrings); ``tools/prepare_data.py`` is
its command line.  :func:`default_corpus` prepares, once per cache directory, a corpus from the
docstrings of the running Python's standard library, so a pretraining run needs no download.
:class:`TokenDataset` and :class:`ResumableSampler` read a prepared dataset for training.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import sysconfig
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..utils.files import publish_directory

logger = logging.getLogger(__name__)

FORMAT = "ds_lowrank.tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
EOS_TOKEN = "<|endoftext|>"
# A byte-level BPE vocabulary holds every byte plus the end-of-document token.
MIN_BPE_VOCAB = 257

JSONL_SUFFIXES = (".jsonl", ".json")
DEFAULT_EXTENSIONS = (".txt", ".text", ".md", ".rst", ".jsonl", ".txt.gz", ".jsonl.gz")
DOC_BOUNDARIES = ("file", "blank_line", "line")

# A callable that starts a fresh pass over the documents: preparation reads them twice
# (count and train the tokenizer, then tokenize), so a one-shot iterator would not do.
Corpus = Callable[[], Iterable[str]]


class DataError(ValueError):
    """Bad input or a dataset that cannot be prepared or read; the message names the fix."""


class DatasetExistsError(DataError):
    """The output of a preparation already exists and replacing it was not asked for."""


# --------------------------------------------------------------------------- local files

def local_corpus(
    inputs: Sequence[str | Path],
    *,
    text_key: str = "text",
    doc_boundary: str = "file",
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
) -> Corpus:
    """Documents from text files, JSONL files and directories of them (searched recursively).

    A JSONL record is one document, its text under ``text_key``.  A text file is one document,
    or one per paragraph (``doc_boundary="blank_line"``) or per line (``"line"``).  Files named
    ``*.gz`` are decompressed.  The inputs are checked now, so a missing path or an empty
    directory fails before any work.
    """
    if doc_boundary not in DOC_BOUNDARIES:
        raise DataError(f"doc_boundary must be one of {', '.join(DOC_BOUNDARIES)}, got {doc_boundary!r}")
    files = _input_files(inputs, tuple(extensions))

    def documents() -> Iterator[str]:
        for path in files:
            if _is_jsonl(path):
                yield from _jsonl_documents(path, text_key)
            else:
                yield from _text_documents(path, doc_boundary)

    return documents


def _input_files(inputs: Sequence[str | Path], extensions: tuple[str, ...]) -> list[Path]:
    if not inputs:
        raise DataError("no input given: pass text files, JSONL files or directories of them")
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.name.endswith(extensions)
                           and not any(part.startswith(".") for part in p.relative_to(item).parts))
            if not found:
                raise DataError(f"directory {item} contains no input files (names ending in "
                                f"{', '.join(extensions)}); add text or JSONL files to it, pass the "
                                f"files themselves, or change --extensions")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise DataError(f"input path {item} does not exist; check the path (relative paths are "
                            f"taken from {Path.cwd()})")
    return files


def _is_jsonl(path: Path) -> bool:
    return path.name.removesuffix(".gz").endswith(JSONL_SUFFIXES)


def _open_text(path: Path):
    opener = gzip.open if path.name.endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8")


def _text_documents(path: Path, doc_boundary: str) -> Iterator[str]:
    try:
        with _open_text(path) as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); convert it "
                        f"(e.g. iconv -f latin1 -t utf-8) or leave it out") from None
    if doc_boundary == "file":
        pieces = [text]
    elif doc_boundary == "blank_line":
        pieces = re.split(r"\n(?:[ \t\r\f\v]*\n)+", text)  # a run of blank lines is one boundary
    else:
        pieces = text.splitlines()
    yield from (p for p in pieces if p.strip())


def _jsonl_documents(path: Path, text_key: str) -> Iterator[str]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg}); a JSONL file holds one JSON "
                                f"object per line") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object with a {text_key!r} field, got "
                                f"{type(record).__name__}")
            if text_key not in record:
                keys = ", ".join(map(repr, record)) or "none"
                raise DataError(f"{where}: record has no {text_key!r} field (its fields: {keys}); "
                                f"pass --text_key with the field that holds the text")
            text = record[text_key]
            if not isinstance(text, str):
                raise DataError(f"{where}: field {text_key!r} is {type(text).__name__}, not a string; "
                                f"pass --text_key with the field that holds the text")
            if text.strip():
                yield text


# --------------------------------------------------------------------------- Hugging Face datasets

def hf_corpus(name: str, *, config: str | None = None, split: str = "train", text_key: str = "text") -> Corpus:
    """Documents of a Hugging Face dataset loaded by name (needs ``datasets`` and usually a network)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading the Hugging Face dataset {name!r} needs the 'datasets' package, "
                        f"which is not installed: pip install 'ds_lowrank[hf]' (or datasets), or pass "
                        f"local text or JSONL files instead") from None
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # offline, unknown name, bad config: all surface as different types
        raise DataError(f"could not load the Hugging Face dataset {name!r} (config {config!r}, split "
                        f"{split!r}): {type(err).__name__}: {err}. Loading by name needs network "
                        f"access or a local datasets cache; offline, pass local text or JSONL files "
                        f"instead") from None
    if text_key not in dataset.column_names:
        raise DataError(f"Hugging Face dataset {name!r} has no column {text_key!r} (columns: "
                        f"{', '.join(dataset.column_names)}); pass --text_key with the text column")

    def documents() -> Iterator[str]:
        for batch in dataset.iter(batch_size=1000):
            yield from (text for text in batch[text_key] if isinstance(text, str) and text.strip())

    return documents


# --------------------------------------------------------------------------- standard-library docstrings

def _stdlib_files(root: Path) -> list[Path]:
    """The standard library's own modules, without tests and installed third-party packages."""
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = []
    for directory, subdirs, names in os.walk(root):
        # Pruned while walking: site-packages alone can hold far more files than the library.
        subdirs[:] = [d for d in subdirs if d not in skip and not d.startswith(".")]
        files.extend(Path(directory, n) for n in names if n.endswith(".py"))
    return sorted(files)


def _module_text(path: Path, root: Path) -> str:
    """A module's docstrings as one document: the module's, then each class's and function's."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return ""  # a module written for another Python version; skipping keeps runs deterministic
    module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"{module}\n\n{doc}")

    def visit(node: ast.AST, prefix: str) -> None:
        for child in getattr(node, "body", []):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    parts.append(f"{name}\n{doc}")
                visit(child, name)

    visit(tree, module)
    return "\n\n".join(parts)


def stdlib_corpus(stdlib_dir: str | Path | None = None) -> Corpus:
    """One document per standard-library module: its docstrings, read with ``ast`` (nothing imported)."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    files = _stdlib_files(root)
    if not files:
        raise DataError(f"no Python modules found under {root}; pass the standard library's directory")

    texts: list[str] = []

    def documents() -> Iterator[str]:
        # Parsing is most of the cost and the text is small (a few MB): parse once, keep it.
        if not texts:
            texts.extend(text for text in (_module_text(path, root) for path in files) if text)
        return iter(texts)

    return documents


def _stdlib_fingerprint(root: Path) -> str:
    """Changes when the standard library's files do (another Python, a patched install)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{sys.implementation.name} {sys.version}".encode())
    for path in _stdlib_files(root):
        digest.update(f"{path.relative_to(root)}\0{path.stat().st_size}\0".encode())
    return digest.hexdigest()


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
    settings = f"{_stdlib_fingerprint(root)} v{FORMAT_VERSION} {vocab_size} {val_fraction} {seed}"
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


# --------------------------------------------------------------------------- tokenizers

def train_bpe_tokenizer(documents: Iterable[str], vocab_size: int, length: int | None = None):
    """A byte-level BPE tokenizer trained on ``documents``, as a Hugging Face fast tokenizer.

    Its only special token is the end-of-document token ``<|endoftext|>`` (id 0).  A small
    corpus may give fewer than ``vocab_size`` entries.
    """
    if vocab_size < MIN_BPE_VOCAB:
        raise DataError(f"vocab_size {vocab_size} is too small for a byte-level BPE tokenizer: it "
                        f"needs at least {MIN_BPE_VOCAB} (256 bytes and the end-of-document token)")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer, length=length)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN)


def load_hf_tokenizer(path: str | Path):
    """A Hugging Face tokenizer saved in a local directory (never downloaded)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"tokenizer directory {path} does not exist; pass a local directory written "
                        f"by save_pretrained(), or leave out --tokenizer to train a BPE tokenizer")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise DataError(f"could not load a tokenizer from {path}: {err}") from None


def _eos_token_id(tokenizer) -> int:
    for attr in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise DataError("the tokenizer has no end-of-sequence (or separator) token to mark where a "
                    "document ends; add one (tokenizer.add_special_tokens({'eos_token': ...}) and "
                    "save it) or train a tokenizer instead")


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # verbose=False: documents longer than the tokenizer's model_max_length are expected here.
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


# --------------------------------------------------------------------------- preparation

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
    if not _is_count(seed):
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
    eos = _eos_token_id(tokenizer)
    dtype = np.dtype("<u2") if len(tokenizer) <= 2**16 else np.dtype("<u4")

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # Hidden and uniquely named, in the destination's directory so the final rename stays
    # on one file system; mkdir (unlike mkdtemp) leaves the permissions to the umask.  The
    # name holds the writer's host and pid, so that a later run can tell a killed writer's
    # leftovers from a concurrent writer's work in progress.
    _remove_stale_temporaries(output_dir)
    tmp = output_dir.with_name(f".{output_dir.name}.tmp-{socket.gethostname()}-{os.getpid()}-"
                               f"{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    changed = DataError(f"the input changed while it was read ({count} documents the first time, not "
                        f"the second); prepare it again")
    writers = {}
    try:
        writers = {split: _SplitWriter(tmp, split, dtype) for split in SPLITS}
        seen = 0
        for batch in _batched(documents(), batch_size):
            if seen + len(batch) > count:
                raise changed
            for ids in _encode(tokenizer, batch):
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
        _write_file(tmp / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
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
# is left alone for this long before it counts as abandoned.
STALE_TEMPORARY_SECONDS = 24 * 3600


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True             # someone else's process
    return True


def _remove_stale_temporaries(output_dir: Path) -> None:
    """Delete what writers of ``output_dir`` that were killed left behind (``.NAME.tmp-*``): those
    of this host whose process is gone, and any older than ``STALE_TEMPORARY_SECONDS`` (another
    host's, or an unnamed writer's).  A live writer's directory is never touched."""
    if not output_dir.parent.is_dir():
        return
    prefix = f".{output_dir.name}.tmp-"
    named = re.compile(rf"{re.escape(prefix)}(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{{8}}")
    host = socket.gethostname()
    for path in output_dir.parent.iterdir():
        if not path.name.startswith(prefix):
            continue
        match = named.fullmatch(path.name)
        try:
            if match and match["host"] == host:
                stale = not _pid_alive(int(match["pid"]))
            else:
                stale = time.time() - path.lstat().st_mtime > STALE_TEMPORARY_SECONDS
        except FileNotFoundError:
            continue            # removed meanwhile (its writer finished)
        if stale:
            logger.info("removing %s, left behind by a preparation that did not finish", path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


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


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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


# --------------------------------------------------------------------------- reading

PREPARE_AGAIN = "prepare the data again with python tools/prepare_data.py"


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


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
    if not _is_count(vocab) or vocab < 1:
        raise bad(f"vocab_size {vocab!r} is not a positive integer")
    if vocab - 1 > np.iinfo(dtype).max:
        raise bad(f"vocab_size {vocab} does not fit in dtype {dtype.name}")
    eos = meta["eos_token_id"]
    if not _is_count(eos) or eos >= vocab:
        raise bad(f"eos_token_id {eos!r} is not a token id below vocab_size {vocab}")
    splits = meta["splits"]
    for split in SPLITS:
        info = splits.get(split) if isinstance(splits, dict) else None
        if not isinstance(info, dict) or not _is_count(info.get("tokens")):
            raise bad(f"splits.{split}.tokens is missing or not a non-negative integer")


def load_tokenizer(data_dir: str | Path):
    """The tokenizer a dataset was prepared with."""
    return load_hf_tokenizer(Path(data_dir) / load_metadata(data_dir)["tokenizer"]["dir"])


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def read_tokens(data_dir: str | Path, split: str) -> np.ndarray:
    """All token ids of a split, memory-mapped (read-only); the file's size must be what
    ``meta.json`` says (a truncated or foreign file is refused)."""
    _check_split(split)
    meta = load_metadata(data_dir)
    count, dtype = meta["splits"][split]["tokens"], np.dtype(meta["dtype"]).newbyteorder("<")
    if count == 0:
        return np.zeros(0, dtype=meta["dtype"])  # mmap cannot map an empty file
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise DataError(f"{path} is missing (meta.json counts {count} {split} tokens); {PREPARE_AGAIN}")
    size = path.stat().st_size
    if size != count * dtype.itemsize:
        raise DataError(f"{path} holds {size} bytes, but meta.json counts {count} {dtype.name} tokens "
                        f"({count * dtype.itemsize} bytes): the file is truncated or belongs to another "
                        f"dataset; {PREPARE_AGAIN}")
    return np.memmap(path, dtype=dtype, mode="r")


# At most this many token ids of a split are compared with the vocabulary when it is opened:
# all of a small split, evenly spaced stretches of a large one.
CHECKED_TOKENS = 1 << 24


def _check_token_ids(tokens: np.ndarray, vocab_size: int, path: Path) -> None:
    """Refuse token ids outside the vocabulary (the embedding lookup would fail mid-run)."""
    n = len(tokens)
    if n <= CHECKED_TOKENS:
        spans = [(0, n)]
    else:
        chunk = CHECKED_TOKENS // 64
        spans = [(int(a), int(a) + chunk) for a in np.linspace(0, n - chunk, 64)]
    for a, b in spans:
        part = tokens[a:b]
        if len(part) and int(part.max()) >= vocab_size:
            where = a + int(np.argmax(part >= vocab_size))
            raise DataError(f"{path}: token id {int(tokens[where])} at position {where} is outside the "
                            f"vocabulary (meta.json vocab_size {vocab_size}): the token file does not "
                            f"match meta.json or is damaged; {PREPARE_AGAIN}")


def read_offsets(data_dir: str | Path, split: str) -> np.ndarray:
    """The document offsets of a split: document ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``."""
    _check_split(split)
    return np.load(Path(data_dir) / f"{split}.idx", mmap_mode="r")


class TokenDataset(Dataset):
    """Fixed-length windows of a split for causal LM training.

    Sample ``i`` is the int64 tensor ``tokens[i * seq_len : i * seq_len + seq_len + 1]``: inputs
    are ``sample[:-1]``, targets ``sample[1:]``, and consecutive samples share one token so every
    token but the first is a target exactly once per epoch.  Windows run across document
    boundaries, which the end-of-document token marks.  The token file is mapped lazily in each
    process, so the dataset can be sent to DataLoader workers.
    """

    def __init__(self, data_dir: str | Path, split: str, seq_len: int):
        _check_split(split)
        if seq_len < 1:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        self.data_dir, self.split, self.seq_len = Path(data_dir), split, seq_len
        self.meta = load_metadata(data_dir)
        self.vocab_size = self.meta["vocab_size"]
        self.eos_token_id = self.meta["eos_token_id"]
        self.num_tokens = self.meta["splits"][split]["tokens"]
        self.num_samples = max(0, (self.num_tokens - 1) // seq_len)
        if self.num_samples == 0:
            raise DataError(f"the {split} split of {data_dir} has {self.num_tokens} tokens, fewer than "
                            f"one sample of seq_len + 1 = {seq_len + 1}; use a shorter sequence length, "
                            f"more data, or a larger --val_fraction")
        # Checked now rather than at the sample that would fail: the file's size, and its ids.
        _check_token_ids(read_tokens(data_dir, split), self.vocab_size, self.data_dir / f"{split}.bin")
        self._tokens = None

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = read_tokens(self.data_dir, self.split)
        return self._tokens

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for {self.num_samples} samples")
        start = (index % self.num_samples) * self.seq_len
        return torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}


class ResumableSampler(Sampler[int]):
    """Sample indices for one data-parallel rank, in an order every rank agrees on, resumable exactly.

    The ranks share one global stream: epoch after epoch, a permutation of the ``num_samples``
    indices drawn from ``(seed, epoch)`` (or the identity with ``shuffle=False``).  Rank ``r`` of
    ``world_size`` takes the stream's positions ``consumed_samples + r + k * world_size`` for
    ``k = 0, 1, ...``: together the ranks consume consecutive positions, and ``consumed_samples``
    (samples taken by all ranks so far, e.g. ``steps * global_batch_size``) is all a checkpoint
    needs to continue the same stream, even with a different world size.

    The stream is endless unless ``num_epochs`` bounds it.  Bounded, ranks may get counts that
    differ by one; ``drop_last=True`` cuts the stream to a multiple of ``world_size`` so every
    rank runs the same number of forward passes (required where those passes communicate,
    e.g. under ZeRO-3).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        consumed_samples: int = 0,
        num_epochs: int | None = None,
        drop_last: bool = False,
    ):
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be non-negative, got {consumed_samples}")
        if not _is_count(seed):
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.rank, self.world_size, self.consumed_samples = rank, world_size, consumed_samples
        self.end = None
        if num_epochs is not None:
            self.end = num_epochs * num_samples
            if drop_last:
                self.end -= self.end % world_size
        self._epoch, self._order = None, None

    def order(self, epoch: int) -> np.ndarray:
        """The sample indices of ``epoch`` in stream order."""
        if self._epoch != epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            else:
                self._order = np.arange(self.num_samples)
            self._epoch = epoch
        return self._order

    def epoch_of(self, consumed_samples: int) -> int:
        """The epoch a position of the stream lies in."""
        return consumed_samples // self.num_samples

    def __iter__(self) -> Iterator[int]:
        position = self.consumed_samples + self.rank
        while self.end is None or position < self.end:
            epoch, offset = divmod(position, self.num_samples)
            yield int(self.order(epoch)[offset])
            position += self.world_size

    def __len__(self) -> int:
        if self.end is None:
            raise TypeError("an endless ResumableSampler has no length; pass num_epochs to bound it")
        return max(0, math.ceil((self.end - self.consumed_samples - self.rank) / self.world_size))
