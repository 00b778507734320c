"""Files and directories that are never seen half-written: the package's one atomic write,
and one way to build a directory under a temporary name and publish it whole."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to ``path``: write to a temporary path, then rename.

    The temporary file sits next to ``path`` (one file system, so the rename is atomic) and is
    flushed to disk first; a reader, or a process killed midway, sees the old file or the new
    one, never a part of it.  A failure removes the temporary file and leaves ``path`` as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # the rename itself survives a crash once the directory is on disk
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_directory(tmp: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> None:
    """Move the complete directory ``tmp`` to ``out`` with renames, atomic within a file system.

    With ``overwrite`` an existing ``out`` is first moved aside, put back if the move fails (so
    nothing already saved is lost) and deleted once the new one is in place.  Without it the
    rename itself refuses a non-empty ``out`` with an ``OSError``: a check followed by a rename
    would let another process publish in between."""
    tmp, out = Path(tmp), Path(out)
    if overwrite and (out.is_symlink() or out.exists()):
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old, out)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
        return
    os.rename(tmp, out)


def staging_directory(out: str | os.PathLike) -> Path:
    """A new, empty directory in which to build ``out`` before ``publish_directory``.

    Hidden and uniquely named, in ``out``'s parent so that the final rename stays on one file
    system; ``mkdir`` (unlike ``mkdtemp``) leaves the permissions to the umask.  The name holds
    the writer's host and pid, so that a later writer can tell a killed writer's leftovers
    (removed here first) from a concurrent writer's work in progress (left alone)."""
    out = Path(out)
    _remove_stale_temporaries(out)
    tmp = out.with_name(f".{out.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    return tmp


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
            logger.info("removing %s, left behind by a writer that did not finish", path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
