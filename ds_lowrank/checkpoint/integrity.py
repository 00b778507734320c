"""Checksums of checkpoint files: written once a checkpoint is complete, verified before it is read.

Every checkpoint directory ds_lowrank writes carries ``checksums.json``, the size and SHA-256 of
each file beneath it.  It is written last, so its presence also says that the checkpoint was
completely written:

- a DeepSpeed checkpoint saved with :func:`save_checkpoint` (``launch/pretrain.py`` does): the tag
  directory ``<save_dir>/<tag>/`` is sealed after every rank has written its files, and only then
  does ``<save_dir>/latest`` name it (written atomically: never empty, never half a tag);
- a consolidated checkpoint (``checkpoint.save``) and a universal checkpoint for DeepSpeed's Adam
  (``checkpoint.save_adam_universal``, in its tag directory) are sealed before they are renamed
  into place.

:func:`verify` checks a directory against its manifest and raises :class:`IntegrityError` naming
every bad file: missing, truncated (fewer bytes than were written), or corrupted (same size,
other bytes).  :func:`resume_tag` picks the checkpoint a run continues from: the one ``latest``
names if it verifies; otherwise the newest one that does, with a message saying what was wrong
(see its docstring for why it takes it rather than asking).

SHA-256 because the CPUs that run training have instructions for it: ~1.2 GB/s per core here,
faster than BLAKE2b (0.9) and MD5 (0.7).  Under ``torch.distributed`` the files are hashed by all
ranks in turn (file ``i`` by rank ``i mod world``), so sealing and verifying cost the checkpoint's
size divided by the ranks' read bandwidth.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

from ..utils.files import atomic_write
from .pieces import CheckpointError

MANIFEST = "checksums.json"
FORMAT = "ds_lowrank-checksums"
VERSION = 1
ALGORITHM = "sha256"
BUFFER = 16 * 2**20          # bytes read at a time
CORRUPT_SUFFIX = ".corrupt"  # a tag moved aside by resume_tag


class IntegrityError(CheckpointError):
    """A checkpoint whose files do not match its checksums (or that has none, where required).
    ``problems`` holds one line per bad file, each starting with its path."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


class UnverifiedCheckpoint(UserWarning):
    """A checkpoint read without checksums to check it against."""


# --------------------------------------------------------------------------- ranks

class _Ranks:
    """The processes sharing the work: with ``collective``, every rank of ``torch.distributed``
    when it is running (every rank must then make the same call); else this process alone.
    Decisions are rank 0's, broadcast, so that every rank takes the same branch (and issues the
    same collectives)."""

    def __init__(self, collective: bool = False):
        import torch.distributed as dist
        running = collective and dist.is_available() and dist.is_initialized()
        self.dist = dist if running else None
        self.rank = self.dist.get_rank() if self.dist else 0
        self.world = self.dist.get_world_size() if self.dist else 1

    def from_rank0(self, fn):
        """``fn()`` evaluated on rank 0; its result (or the error it raised) on every rank."""
        value = None
        if self.rank == 0:
            try:
                value = (fn(), None)
            except Exception as err:   # noqa: BLE001 - raised on every rank, not only on rank 0
                value = (None, err if isinstance(err, CheckpointError) else CheckpointError(
                    f"{type(err).__name__}: {err}"))
        if self.dist:
            box = [value]
            self.dist.broadcast_object_list(box, src=0)
            value = box[0]
        result, err = value
        if err is not None:
            raise err
        return result

    def gather(self, items: list) -> list:
        """Every rank's ``items``, concatenated in rank order, on every rank."""
        if not self.dist:
            return list(items)
        out = [None] * self.world
        self.dist.all_gather_object(out, items)
        return [x for part in out for x in part]

    def barrier(self):
        if self.dist:
            self.dist.barrier()


# --------------------------------------------------------------------------- hashing

def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.new(ALGORITHM)
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _files_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}"))


def _entries(directory: Path, names: list[str], ranks: _Ranks) -> dict[str, dict]:
    mine = []
    for name in names[ranks.rank::ranks.world]:
        try:
            mine.append((name, os.path.getsize(directory / name), file_digest(directory / name)))
        except OSError as err:     # on every rank, not only on the one that met it
            mine.append((name, None, str(err)))
    found = sorted(ranks.gather(mine))
    failed = [f"{directory / name}: {why}" for name, size, why in found if size is None]
    if failed:
        raise CheckpointError(f"cannot seal {directory}: {_say(failed)}")
    return {name: {"size": size, ALGORITHM: digest} for name, size, digest in found}


def write_manifest(directory: str | os.PathLike, ranks: _Ranks | None = None, **info) -> Path:
    """Seal ``directory``: hash every file beneath it and write ``checksums.json`` (atomically).
    ``info`` (a tag, a step count) is recorded beside the files.  With ``ranks`` collective,
    every rank hashes its share and rank 0 writes; by default this process does it all."""
    directory = Path(directory)
    ranks = ranks or _Ranks()
    names = ranks.from_rank0(lambda: _files_under(directory))
    files = _entries(directory, names, ranks)
    path = directory / MANIFEST
    if ranks.rank == 0:
        manifest = {"format": FORMAT, "version": VERSION, "algorithm": ALGORITHM, "written": time.time(),
                    **info, "files": files}
        atomic_write(path, json.dumps(manifest, indent=1) + "\n")
    ranks.barrier()
    return path


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not directory.is_dir():
        raise IntegrityError(f"{directory}: the checkpoint directory does not exist")
    if not path.is_file():
        raise IntegrityError(f"{directory}: no {MANIFEST}, so its files cannot be verified: the checkpoint "
                             f"was written before checkpoints carried checksums, or was not completely "
                             f"written (the writer stopped before sealing it)")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
            raise ValueError("not a checksum manifest")
        if manifest.get("algorithm") != ALGORITHM or manifest.get("version") != VERSION:
            raise ValueError(f"algorithm {manifest.get('algorithm')!r}, version {manifest.get('version')!r}; "
                             f"this ds_lowrank reads {ALGORITHM!r}, version {VERSION}")
        for name, entry in manifest["files"].items():
            if not (isinstance(entry.get("size"), int) and isinstance(entry.get(ALGORITHM), str)):
                raise ValueError(f"the entry of {name!r} is incomplete")
    except (ValueError, AttributeError) as err:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise IntegrityError(f"{path} is damaged ({err}); the checkpoint's files cannot be verified") from None
    return manifest


def _check_file(directory: Path, name: str, entry: dict) -> str | None:
    path = directory / name
    try:
        size = os.path.getsize(path)
    except OSError:
        return f"{path}: missing ({entry['size']} bytes were written)"
    if size < entry["size"]:
        return f"{path}: truncated, {size} bytes of the {entry['size']} written"
    if size > entry["size"]:
        return f"{path}: {size} bytes, {entry['size']} were written: the file changed after the checkpoint"
    try:
        digest = file_digest(path)
    except OSError as err:
        return f"{path}: cannot be read ({err})"
    if digest != entry[ALGORITHM]:
        return f"{path}: corrupted, its {ALGORITHM} differs from the one recorded when it was written"
    return None


def _problems(directory: Path, ranks: _Ranks) -> list[str]:
    """What is wrong with ``directory`` (empty: it verifies); collective."""
    try:
        manifest = ranks.from_rank0(lambda: _read_manifest(directory))
    except IntegrityError as err:
        return err.problems
    entries = sorted(manifest["files"].items())
    mine = [_check_file(directory, name, entry) for name, entry in entries[ranks.rank::ranks.world]]
    return ranks.gather([p for p in mine if p])


def verify(directory: str | os.PathLike, required: bool = True, collective: bool = False) -> bool:
    """Check every file of ``directory`` against its ``checksums.json``; raise
    :class:`IntegrityError` naming each bad file.  Without a manifest: raise if ``required``,
    else return False (nothing could be checked).  True: every file verified.  ``collective``:
    every rank of ``torch.distributed`` calls it and checks its share of the files."""
    directory = Path(directory)
    ranks = _Ranks(collective)
    if not required and ranks.from_rank0(lambda: directory.is_dir() and not (directory / MANIFEST).exists()):
        return False
    problems = _problems(directory, ranks)
    if problems:
        raise IntegrityError(_say(problems), problems)
    return True


def _say(problems: list[str], limit: int = 5) -> str:
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def check_or_warn(directory: str | os.PathLike, what: str) -> bool:
    """``verify`` where checkpoints without checksums are still accepted (written before
    checkpoints carried them, or by a script calling ``engine.save_checkpoint`` itself): those
    are read with a warning of category :class:`UnverifiedCheckpoint`."""
    import warnings
    if verify(directory, required=False):
        return True
    warnings.warn(f"{directory} has no {MANIFEST}: its files cannot be verified ({what}); a damaged file "
                  f"shows only when it is read", UnverifiedCheckpoint, stacklevel=2)
    return False


# --------------------------------------------------------------------------- reading torch files

def load_file(path: str | os.PathLike, **kwargs):
    """``torch.load`` whose failure names the file: a truncated or garbage file raises
    :class:`CheckpointError` instead of a bare unpickling or zip error."""
    import torch
    try:
        return torch.load(path, **kwargs)
    except Exception as err:   # noqa: BLE001 - a damaged pickle raises anything
        raise _unreadable(path, err) from err


def _unreadable(path, err: Exception) -> CheckpointError:
    if isinstance(err, FileNotFoundError):
        return CheckpointError(f"{path}: missing")
    lines = str(err).strip().splitlines()
    said = lines[0][:300] if lines else "no message"
    return CheckpointError(f"{path} cannot be read ({type(err).__name__}: {said}): the file is truncated or "
                           f"corrupted")


@contextlib.contextmanager
def naming_load_errors(engine):
    """Within it, a file DeepSpeed's ``engine.load_checkpoint`` cannot read raises
    :class:`CheckpointError` naming the file (DeepSpeed reads through its checkpoint engine)."""
    ckpt = getattr(engine, "checkpoint_engine", None)
    original = getattr(ckpt, "load", None)
    if original is None:
        yield
        return

    def load(path, *args, **kwargs):
        try:
            return original(path, *args, **kwargs)
        except Exception as err:   # noqa: BLE001
            raise _unreadable(path, err) from err
    own = vars(ckpt).get("load")
    ckpt.load = load
    try:
        yield
    finally:
        if own is None:
            del ckpt.load       # the class's method again
        else:
            ckpt.load = own


# --------------------------------------------------------------------------- DeepSpeed checkpoints

LATEST = "latest"


def read_latest(save_dir: str | os.PathLike) -> str:
    """The tag ``<save_dir>/latest`` names; a clear :class:`CheckpointError` naming the file if it
    is missing, empty, not text, or names no checkpoint directory."""
    path = Path(save_dir) / LATEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist: no checkpoint has been completely written in "
                              f"{save_dir} (or pass the tag, a folder of it, explicitly)") from None
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read: {err}") from None
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is damaged: {len(raw)} bytes that are not text (it should hold the "
                              f"tag of the newest checkpoint, a folder of {save_dir})") from None
    if not tag:
        raise CheckpointError(f"{path} is empty (a write of it was interrupted): it should hold the tag of "
                              f"the newest checkpoint, a folder of {save_dir}")
    if "\n" in tag or "/" in tag or "\0" in tag or tag in (".", "..") or len(tag) > 255:
        shown = repr(tag[:60]) + ("…" if len(tag) > 60 else "")
        raise CheckpointError(f"{path} is damaged: {shown} is not a checkpoint tag (it should hold the name "
                              f"of a folder of {save_dir})")
    if not (Path(save_dir) / tag).is_dir():
        raise CheckpointError(f"{path} names {tag!r}, but {Path(save_dir) / tag} does not exist")
    return tag


def save_checkpoint(engine, save_dir: str | os.PathLike, tag: str, client_state: dict | None = None,
                    publish: bool = True, **kwargs) -> Path:
    """``engine.save_checkpoint`` (collective, every rank calls it), then seal the tag directory
    and point ``latest`` at it: ``latest`` only ever names a complete, sealed checkpoint.
    With ``publish=False`` (a checkpoint kept for inspection, e.g. one with non-finite values)
    the seal records ``published: false``, ``latest`` stays where it was, and :func:`resume_tag`
    never falls back to it.  Returns the tag directory.  ``save_dir`` must be on a file system
    every rank sees."""
    save_dir, tag = Path(save_dir), str(tag)
    ranks = _Ranks(collective=True)
    tag_dir = save_dir / tag
    ckpt = getattr(engine, "checkpoint_engine", None)
    unsealable = None
    if ckpt is not None and ckpt.is_decoupled():
        unsealable = "a decoupled (asynchronous) checkpoint engine writes the files after save_checkpoint returns"
    elif getattr(engine, "use_node_local_storage", lambda: False)():
        unsealable = "with use_node_local_storage each node holds only its own files"
    if unsealable:
        import warnings
        warnings.warn(f"{tag_dir}: {unsealable}; the checkpoint is saved without {MANIFEST}", UnverifiedCheckpoint)
        engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state or {}, **kwargs)
        return tag_dir
    if ranks.rank == 0:
        (tag_dir / MANIFEST).unlink(missing_ok=True)   # an old seal must not vouch for new files
    ranks.barrier()
    # DeepSpeed ends with a barrier: every rank's files are written when it returns
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state or {}, save_latest=False, **kwargs)
    write_manifest(tag_dir, ranks, tag=tag, global_steps=int(getattr(engine, "global_steps", 0)),
                   published=publish)
    if ranks.rank == 0 and publish:
        atomic_write(save_dir / LATEST, tag)
    ranks.barrier()
    return tag_dir


def _sealed_tags(save_dir: Path) -> list[str]:
    """Tags of ``save_dir`` that carry a manifest, newest first (by the step count recorded in it,
    then by when it was written)."""
    found = []
    for d in save_dir.iterdir() if save_dir.is_dir() else ():
        if not d.is_dir() or CORRUPT_SUFFIX in d.name or not (d / MANIFEST).is_file():
            continue
        try:
            m = json.loads((d / MANIFEST).read_bytes().decode("utf-8"))
            if m.get("published") is False:
                continue
            key = (int(m.get("global_steps", -1)), float(m.get("written", 0)))
        except (ValueError, TypeError, AttributeError):
            key = (-1, (d / MANIFEST).stat().st_mtime)
        found.append((key, d.name))
    return [name for _, name in sorted(found, reverse=True)]


def _move_aside(save_dir: Path, tag: str) -> Path:
    n, target = 0, save_dir / f"{tag}{CORRUPT_SUFFIX}"
    while target.exists():
        n += 1
        target = save_dir / f"{tag}{CORRUPT_SUFFIX}{n}"
    os.rename(save_dir / tag, target)
    return target


def resume_tag(save_dir: str | os.PathLike, log=print) -> str:
    """The tag a run resumes from, in ``save_dir`` (collective under ``torch.distributed``).

    The tag in ``latest`` when its files verify.  Otherwise (``latest`` unreadable, or its
    checkpoint missing, truncated, corrupted or unsealed) the newest checkpoint that verifies
    is taken, with a message naming what was wrong and which checkpoint is used; the bad tag
    directory is moved aside to ``<tag>.corrupt`` (kept for inspection, and out of the way of
    the run, which will save that step again) and ``latest`` is rewritten to the tag used.

    Taking it rather than refusing: the run loses only the steps after the checkpoint used, which
    it trains again exactly (the data stream, the schedule and the logs restart from its step),
    a job requeued after a crash continues without a person, and nothing is deleted.  When no
    checkpoint verifies, :class:`CheckpointError` lists what is wrong with each.

    A run whose checkpoints all predate checksums (no tag has a manifest) resumes from
    ``latest`` unverified, with a warning through ``log``.
    """
    save_dir = Path(save_dir)
    ranks = _Ranks(collective=True)

    def latest():
        try:
            return read_latest(save_dir), None
        except CheckpointError as err:
            return None, str(err)
    tag, latest_problem = ranks.from_rank0(latest)
    sealed = ranks.from_rank0(lambda: _sealed_tags(save_dir))
    bad: list[tuple[str | None, list[str]]] = []
    if tag is not None:
        problems = _problems(save_dir / tag, ranks)
        if not problems:
            return tag
        if not sealed:
            log(f"resume: warning: {save_dir / tag} has no {MANIFEST} (written before checkpoints carried "
                f"checksums), so its files are not verified")
            return tag
        bad.append((tag, problems))
    else:
        bad.append((None, [latest_problem]))
    for candidate in sealed:
        if candidate == tag:
            continue
        problems = _problems(save_dir / candidate, ranks)
        if not problems:
            break
        bad.append((candidate, problems))
    else:
        lines = [f"  {t or LATEST}: {_say(p)}" for t, p in bad]
        raise CheckpointError(f"no checkpoint in {save_dir} verifies:\n" + "\n".join(lines) +
                              "\n  restore a good copy of a checkpoint, or start the run again (launch/pretrain.py: "
                              "--overwrite)")
    # take ``candidate``, the newest that verifies
    moved = []

    def tidy():
        try:
            for t, _ in bad:
                if t is not None and (save_dir / t).is_dir():
                    moved.append(str(_move_aside(save_dir, t)))
            atomic_write(save_dir / LATEST, candidate)
        except OSError as err:
            raise CheckpointError(f"resume: {save_dir / candidate} verifies, but {save_dir} cannot be "
                                  f"tidied to resume from it ({err})") from None
        return moved
    moved = ranks.from_rank0(tidy)
    ranks.barrier()
    for t, problems in bad:
        log(f"resume: {'checkpoint ' + str(save_dir / t) if t else repr(LATEST) + ' file'} is unusable: "
            f"{_say(problems)}")
    log(f"resume: continuing from {save_dir / candidate} instead, the newest checkpoint that verifies"
        + (f"; the steps after it are trained again; moved aside (delete when no longer needed): "
           f"{', '.join(moved)}" if moved else ""))
    return candidate
