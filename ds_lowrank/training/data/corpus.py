"""Sources of documents: local text and JSONL files, a Hugging Face dataset, and the running
Python's standard-library docstrings (the built-in corpus, nothing to download).

A source is a ``Corpus``: a callable that starts a fresh pass over the documents."""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import re
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from .format import DataError

JSONL_SUFFIXES = (".jsonl", ".json")
DEFAULT_EXTENSIONS = (".txt", ".text", ".md", ".rst", ".jsonl", ".txt.gz", ".jsonl.gz")
DOC_BOUNDARIES = ("file", "blank_line", "line")

# A callable that starts a fresh pass over the documents: preparation reads them twice
# (count and train the tokenizer, then tokenize), so a one-shot iterator would not do.
Corpus = Callable[[], Iterable[str]]


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


def stdlib_fingerprint(root: Path) -> str:
    """Changes when the standard library's files do (another Python, a patched install)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{sys.implementation.name} {sys.version}".encode())
    for path in _stdlib_files(root):
        digest.update(f"{path.relative_to(root)}\0{path.stat().st_size}\0".encode())
    return digest.hexdigest()
