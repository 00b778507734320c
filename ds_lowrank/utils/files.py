"""Files that are never seen half-written: the package's one atomic write."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


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
