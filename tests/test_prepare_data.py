"""Data preparation: round trip, validation split, default corpus, atomic writes, errors, sampler."""

import gzip
import importlib.util
import itertools
import json
import logging
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ds_lowrank.training.data import (
    DataError,
    DatasetExistsError,
    ResumableSampler,
    TokenDataset,
    default_corpus,
    load_metadata,
    load_tokenizer,
    local_corpus,
    prepare_dataset,
    read_offsets,
    read_tokens,
)

REPO = Path(__file__).resolve().parents[1]
WORDS = ("gradient moment subspace projection rank optimizer memory shard partition basis update "
         "error feedback matrix power iteration adam state checkpoint").split()


def make_documents(count=40, seed=0):
    """Distinct short documents: a numbered title, then words drawn at random."""
    rng = np.random.default_rng(seed)
    return [f"Document {i}.\n" + " ".join(rng.choice(WORDS, size=rng.integers(5, 40))) + "."
            for i in range(count)]


def write_text_dir(directory, documents):
    directory.mkdir(parents=True)
    for i, text in enumerate(documents):
        (directory / f"doc{i:03d}.txt").write_text(text)
    return directory


def split_documents(data_dir, split):
    tokens, offsets = read_tokens(data_dir, split), read_offsets(data_dir, split)
    return [tuple(int(t) for t in tokens[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


def expected_documents(data_dir, documents):
    tokenizer, eos = load_tokenizer(data_dir), load_metadata(data_dir)["eos_token_id"]
    return [(*tokenizer(text, add_special_tokens=False)["input_ids"], eos) for text in documents]


def load_cli():
    spec = importlib.util.spec_from_file_location("prepare_data_cli", REPO / "tools" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def documents():
    return make_documents()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, documents):
    root = tmp_path_factory.mktemp("prepared")
    inputs = write_text_dir(root / "in", documents)
    return prepare_dataset(local_corpus([inputs]), root / "out", vocab_size=400, val_fraction=0.25, seed=3)


# --------------------------------------------------------------------------- round trip and split

def test_round_trip_and_disjoint_validation(prepared, documents):
    expected = expected_documents(prepared, documents)
    position = {doc: i for i, doc in enumerate(expected)}
    assert len(position) == len(documents)  # distinct documents, so positions identify them
    train, val = split_documents(prepared, "train"), split_documents(prepared, "val")
    train_ids, val_ids = [position[d] for d in train], [position[d] for d in val]
    # Each split keeps the input order, together they hold every document once, and no
    # document is in both.
    assert train_ids == sorted(train_ids) and val_ids == sorted(val_ids)
    assert sorted(train_ids + val_ids) == list(range(len(documents)))
    assert not set(train_ids) & set(val_ids)
    assert len(val_ids) == round(0.25 * len(documents))

    meta = load_metadata(prepared)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(load_tokenizer(prepared))
    assert meta["documents"] == len(documents)
    for split, docs in (("train", train), ("val", val)):
        assert meta["splits"][split] == {"tokens": sum(map(len, docs)), "documents": len(docs)}
    assert load_tokenizer(prepared).decode(list(val[0][:-1])) == documents[val_ids[0]]


def test_preparation_is_deterministic_and_seeded(tmp_path, prepared, documents):
    inputs = write_text_dir(tmp_path / "in", documents)
    again = prepare_dataset(local_corpus([inputs]), tmp_path / "again", vocab_size=400, val_fraction=0.25, seed=3)
    for name in ("train.bin", "train.idx", "val.bin", "val.idx", "tokenizer/tokenizer.json"):
        assert (again / name).read_bytes() == (prepared / name).read_bytes(), name
    other = prepare_dataset(local_corpus([inputs]), tmp_path / "other", vocab_size=400, val_fraction=0.25, seed=4)
    assert set(split_documents(other, "val")) != set(split_documents(prepared, "val"))


def test_jsonl_input_with_text_key(tmp_path, documents):
    records = [{"id": i, "content": text} for i, text in enumerate(documents[:30])]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:20]) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records[20:])
    out = prepare_dataset(local_corpus([tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"], text_key="content"),
                          tmp_path / "out", vocab_size=300, val_fraction=0.1)
    expected = expected_documents(out, documents[:30])
    assert sorted(split_documents(out, "train") + split_documents(out, "val")) == sorted(expected)
    assert load_metadata(out)["splits"]["val"]["documents"] == 3


def test_existing_hf_tokenizer_and_paragraph_documents(tmp_path, prepared, documents):
    (tmp_path / "book.txt").write_text("\n\n  \n".join(documents[:10]))
    out = prepare_dataset(local_corpus([tmp_path / "book.txt"], doc_boundary="blank_line"), tmp_path / "out",
                          tokenizer=prepared / "tokenizer", val_fraction=0.2)
    meta = load_metadata(out)
    assert meta["documents"] == 10 and meta["vocab_size"] == load_metadata(prepared)["vocab_size"]
    tokenizer_file = Path("tokenizer", "tokenizer.json")
    assert (out / tokenizer_file).read_bytes() == (prepared / tokenizer_file).read_bytes()
    expected = expected_documents(prepared, documents[:10])
    assert sorted(split_documents(out, "train") + split_documents(out, "val")) == sorted(expected)


# --------------------------------------------------------------------------- default corpus

def test_default_corpus_builds_once_and_is_cached(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ds_lowrank.training.data.prepare")
    first = default_corpus(tmp_path / "cache")
    assert "built" in caplog.text and "nothing downloaded" in caplog.text
    meta = load_metadata(first)
    assert meta["splits"]["train"]["tokens"] > 300_000 and meta["splits"]["val"]["tokens"] > 10_000
    tiny = json.loads((REPO / "configs" / "models" / "tiny.json").read_text())
    assert meta["vocab_size"] == tiny["vocab_size"]  # the tiny preset runs on it unchanged
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}

    caplog.clear()
    second = default_corpus(tmp_path / "cache")
    assert second == first and "using the cached" in caplog.text and "built" not in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in second.iterdir()} == stamps
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]

    sample = TokenDataset(first, "val", seq_len=128)[0]
    assert sample.shape == (129,) and int(sample.max()) < meta["vocab_size"]


# --------------------------------------------------------------------------- atomic writes

def test_refuses_to_overwrite_and_replaces_when_asked(tmp_path, documents):
    inputs = write_text_dir(tmp_path / "in", documents[:10])
    out = prepare_dataset(local_corpus([inputs]), tmp_path / "out", vocab_size=300)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(DatasetExistsError, match=r"already exists.*--overwrite"):
        prepare_dataset(local_corpus([inputs]), out, vocab_size=300)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    prepare_dataset(local_corpus([inputs]), out, vocab_size=300, val_fraction=0.5, overwrite=True)
    assert load_metadata(out)["val_fraction"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no temporary or old copies

    (tmp_path / "empty").mkdir()  # an empty directory is free to use
    prepare_dataset(local_corpus([inputs]), tmp_path / "empty", vocab_size=300)
    assert (tmp_path / "empty" / "meta.json").is_file()


def test_failure_midway_leaves_nothing(tmp_path, documents):
    calls = 0

    def failing_corpus():
        nonlocal calls
        calls += 1
        for i, text in enumerate(documents):
            if calls == 2 and i == 20:
                raise RuntimeError("disk unplugged")
            yield text

    with pytest.raises(RuntimeError, match="disk unplugged"):
        prepare_dataset(failing_corpus, tmp_path / "out", vocab_size=300, batch_size=8)
    assert list(tmp_path.iterdir()) == []

    def shrinking_corpus():
        nonlocal calls
        calls += 1
        return documents if calls % 2 else documents[:-1]

    def growing_corpus():
        nonlocal calls
        calls += 1
        return documents[:-1] if calls % 2 else documents

    for corpus in (shrinking_corpus, growing_corpus):
        calls = 0
        with pytest.raises(DataError, match="changed while it was read"):
            prepare_dataset(corpus, tmp_path / "out", vocab_size=300, batch_size=8)
        assert list(tmp_path.iterdir()) == []


def test_a_killed_preparation_leaves_nothing_behind_the_next_one(tmp_path, documents):
    """A writer killed with -9 cannot clean up its hidden temporary directory; the next
    preparation of the same output removes it (its pid is gone), but not a live writer's."""
    import os
    import socket
    import time

    inputs = write_text_dir(tmp_path / "in", documents[:10])
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = tmp_path / f".out.tmp-{host}-{dead.pid}-0123abcd"         # a dead writer's
    live = tmp_path / f".out.tmp-{host}-{os.getpid()}-4567cdef"        # a concurrent writer's
    old = tmp_path / ".out.tmp-0123456789ab"                           # unnamed and two days old
    recent = tmp_path / ".out.tmp-ba9876543210"                        # unnamed, could be running
    other = tmp_path / ".other.tmp-nowhere-1-89abcdef"                 # another output's
    for folder in (killed, live, old, recent, other):
        folder.mkdir()
        (folder / "train.bin").write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (two_days_ago, two_days_ago))

    out = prepare_dataset(local_corpus([inputs]), tmp_path / "out", vocab_size=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in", "out", live.name, recent.name, other.name])
    assert (live / "train.bin").read_bytes() == b"partial"
    reference = prepare_dataset(local_corpus([inputs]), tmp_path / "reference", vocab_size=300)
    for name in ("train.bin", "val.bin", "train.idx", "val.idx"):
        assert (out / name).read_bytes() == (reference / name).read_bytes()


# --------------------------------------------------------------------------- bad input

def _write_bad_inputs(tmp):
    (tmp / "empty_dir").mkdir()
    (tmp / "blank_dir").mkdir()
    (tmp / "blank_dir" / "a.txt").write_text("  \n\n")
    (tmp / "blank_dir" / "b.txt").write_text("")
    (tmp / "nokey.jsonl").write_text('{"body": "some text"}\n')
    (tmp / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    (tmp / "number.jsonl").write_text('{"text": 3}\n')
    (tmp / "one.txt").write_text("a single document")
    (tmp / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))


@pytest.mark.parametrize("args, message", [
    (["missing.txt"], r"input path .*missing\.txt does not exist"),
    (["empty_dir"], r"directory .*empty_dir contains no input files .*add text or JSONL files"),
    (["blank_dir"], r"no text found in .*every document is empty"),
    (["nokey.jsonl"], r"nokey\.jsonl:1: record has no 'text' field \(its fields: 'body'\); pass --text_key"),
    (["broken.jsonl"], r"broken\.jsonl:2: not valid JSON"),
    (["number.jsonl"], r"field 'text' is int, not a string"),
    (["one.txt"], r"only one document found .*--doc_boundary blank_line or line.*--val_fraction 0"),
    (["latin1.txt", "one.txt"], r"latin1\.txt is not UTF-8 text.*iconv"),
    (["one.txt", "--val_fraction", "1.5"], r"val_fraction must be in \[0, 1\)"),
    (["one.txt", "--seed", "-5"], r"seed must be a non-negative integer, got -5"),
    (["one.txt", "--val_fraction", "0", "--vocab_size", "100"], r"vocab_size 100 is too small .*at least 257"),
    (["one.txt", "--tokenizer", "no_such_tokenizer"], r"tokenizer directory .*no_such_tokenizer does not exist"),
    (["--hf_dataset", "some/dataset"], r"Hugging Face dataset 'some/dataset'"),
])
def test_bad_input_messages(tmp_path, monkeypatch, capsys, args, message):
    _write_bad_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    if "--hf_dataset" in args:
        monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: no network here either
    rc = load_cli().main([*args, "--output", "out"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ")
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".", "out"))) == []


def test_cli_help_and_source_choice(tmp_path, capsys, documents):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "prepare_data.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--val_fraction" in result.stdout and "--text_key" in result.stdout
    cli = load_cli()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "exactly one source" in capsys.readouterr().err

    inputs = write_text_dir(tmp_path / "in", documents[:8])
    assert cli.main([str(inputs), "--output", str(tmp_path / "out"), "--vocab_size", "300"]) == 0
    assert cli.main([str(inputs), "--output", str(tmp_path / "out")]) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_reader_errors(tmp_path, prepared):
    with pytest.raises(DataError, match="not a prepared dataset.*prepare_data.py"):
        TokenDataset(tmp_path, "train", 16)
    with pytest.raises(DataError, match="fewer than one sample of seq_len \\+ 1 = 100001"):
        TokenDataset(prepared, "val", 100_000)
    with pytest.raises(DataError, match="split must be one of train, val"):
        TokenDataset(prepared, "test", 16)


def damaged_copy(prepared, tmp_path, change_meta=None, meta_text=None):
    """A copy of the prepared dataset with its meta.json changed."""
    import shutil
    copy = tmp_path / "damaged"
    shutil.copytree(prepared, copy)
    meta = json.loads((copy / "meta.json").read_text())
    if change_meta is not None:
        change_meta(meta)
    (copy / "meta.json").write_text(meta_text if meta_text is not None else json.dumps(meta))
    return copy


@pytest.mark.parametrize("change,text,needle", [
    (None, "{not json", r"meta\.json is not valid JSON"),
    (None, "[1, 2]", r"meta\.json holds a JSON list, not the object prepare_data\.py writes"),
    (lambda m: m.pop("vocab_size"), None, r"meta\.json: missing vocab_size"),
    (lambda m: m.update(dtype="float7"), None, r"dtype 'float7' is not an unsigned integer type"),
    (lambda m: m.update(vocab_size="400"), None, r"vocab_size '400' is not a positive integer"),
    (lambda m: m.update(vocab_size=70000), None, r"vocab_size 70000 does not fit in dtype uint16"),
    (lambda m: m.update(eos_token_id=10**6), None, r"eos_token_id 1000000 is not a token id below"),
    (lambda m: m["splits"].pop("train"), None, r"splits\.train\.tokens is missing"),
    (lambda m: m["splits"]["train"].update(tokens=True), None, r"splits\.train\.tokens is missing or not"),
])
def test_damaged_metadata_is_refused_when_opened(tmp_path, prepared, change, text, needle):
    data_dir = damaged_copy(prepared, tmp_path, change, text)
    with pytest.raises(DataError, match=needle + r".*prepare_data\.py"):
        TokenDataset(data_dir, "train", 16)


def test_truncated_or_foreign_token_files_are_refused_when_opened(tmp_path, prepared, monkeypatch):
    data_dir = damaged_copy(prepared, tmp_path)
    tokens = (data_dir / "train.bin").read_bytes()
    (data_dir / "train.bin").write_bytes(tokens[:len(tokens) // 2])
    with pytest.raises(DataError, match=rf"train\.bin holds {len(tokens) // 2} bytes, but meta\.json counts "
                                        rf"{len(tokens) // 2} uint16 tokens \({len(tokens)} bytes\): the file "
                                        rf"is truncated.*prepare_data\.py"):
        TokenDataset(data_dir, "train", 16)
    (data_dir / "train.bin").unlink()
    with pytest.raises(DataError, match=r"train\.bin is missing"):
        TokenDataset(data_dir, "train", 16)
    ids = np.frombuffer(tokens, dtype="<u2").copy()
    ids[len(ids) // 3] = 60000                          # beyond the 400-entry vocabulary
    (data_dir / "train.bin").write_bytes(ids.tobytes())
    with pytest.raises(DataError, match=rf"token id 60000 at position {len(ids) // 3} is outside the "
                                        r"vocabulary \(meta\.json vocab_size \d+\)"):
        TokenDataset(data_dir, "train", 16)
    # a large split is checked in evenly spaced stretches, its last tokens among them
    monkeypatch.setattr("ds_lowrank.training.data.reading.CHECKED_TOKENS", 64)
    ids[len(ids) // 3], ids[-1] = 0, 65535
    (data_dir / "train.bin").write_bytes(ids.tobytes())
    with pytest.raises(DataError, match=rf"token id 65535 at position {len(ids) - 1} is outside"):
        TokenDataset(data_dir, "train", 16)


# --------------------------------------------------------------------------- reader and sampler

def test_windows_overlap_by_one_token(prepared):
    dataset = TokenDataset(prepared, "train", seq_len=16)
    tokens = np.asarray(read_tokens(prepared, "train"), dtype=np.int64)
    assert len(dataset) == (len(tokens) - 1) // 16
    for i in (0, 1, len(dataset) - 1):
        assert torch.equal(dataset[i], torch.from_numpy(tokens[i * 16:i * 16 + 17]))
    assert dataset[0].dtype == torch.int64 and dataset[1][0] == dataset[0][-1]
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    assert len(pickle.dumps(dataset)) < 10_000  # the mapped tokens are not pickled for workers
    loader = DataLoader(dataset, batch_size=4, sampler=ResumableSampler(len(dataset), seed=1, num_epochs=1))
    assert next(iter(loader)).shape == (4, 17)


def test_sampler_splits_ranks_without_overlap():
    n, world = 50, 3
    per_rank = [list(ResumableSampler(n, seed=7, rank=r, world_size=world, num_epochs=1)) for r in range(world)]
    assert sorted(itertools.chain(*per_rank)) == list(range(n))
    assert [len(ResumableSampler(n, rank=r, world_size=world, num_epochs=1)) for r in range(world)] == [17, 17, 16]
    even = [list(ResumableSampler(n, seed=7, rank=r, world_size=world, num_epochs=1, drop_last=True))
            for r in range(world)]
    assert [len(x) for x in even] == [16, 16, 16] and not set(even[0]) & set(even[1])
    assert list(ResumableSampler(5, shuffle=False, num_epochs=2)) == [0, 1, 2, 3, 4] * 2


def test_sampler_epochs_are_permutations_that_differ():
    stream = list(itertools.islice(ResumableSampler(20, seed=0), 60))
    epochs = [stream[i:i + 20] for i in (0, 20, 40)]
    assert all(sorted(e) == list(range(20)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert list(itertools.islice(ResumableSampler(20, seed=0), 60)) == stream
    assert list(itertools.islice(ResumableSampler(20, seed=1), 20)) != epochs[0]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_sampler_resumes_from_consumed_samples(world):
    n = 23
    stream = list(itertools.islice(ResumableSampler(n, seed=5), 200))  # one rank sees the whole stream
    consumed = 36  # e.g. 9 steps of a global batch of 4, possibly taken with another world size
    for rank in range(world):
        resumed = ResumableSampler(n, seed=5, rank=rank, world_size=world, consumed_samples=consumed)
        assert list(itertools.islice(resumed, 30)) == stream[consumed + rank::world][:30]
    # Skipping what a rank already took gives the same samples as resuming.
    full = list(itertools.islice(ResumableSampler(n, seed=5, rank=1, world_size=2), 40))
    resumed = ResumableSampler(n, seed=5, rank=1, world_size=2, consumed_samples=10)
    assert list(itertools.islice(resumed, 35)) == full[5:]


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank 2 is not in"):
        ResumableSampler(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        ResumableSampler(10, seed=-1)
    with pytest.raises(TypeError, match="pass num_epochs"):
        len(ResumableSampler(10))
