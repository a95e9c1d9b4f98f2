"""Atomic file writes, shared by training runs and the deployment runtime (which must not import
training code, tests/test_deploy.py).

A write goes to a temp file `.NAME.XXXXXXXX.tmp` in the target's folder, is fsynced, gets the mode a
plain `open(path, "w")` would give (the existing file's mode, else 0666 & ~umask: mkstemp alone
makes 0600), and is renamed over the target with os.replace: readers see the old file or the new
one, never a part. A process killed mid-write leaves its temp file behind; `remove_stale_temp_files`
deletes those (only names of this exact pattern) when a run folder is opened again.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from qnas.errors import CheckpointError

# mkstemp's random part: 8 characters of [a-z0-9_] (tempfile._RandomNameSequence).
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


def _umask() -> int:
    """The process umask, read without changing it where Linux tells it (/proc), else set-and-restore."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode(path: str | os.PathLike) -> int:
    """The permission bits a file written at `path` gets: the existing file's, else 0666 & ~umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Calls `write(f)` on a temp file in `path`'s folder, then renames it to `path` (module docstring).
    A folder that cannot be written or a full disk is a one-line CheckpointError naming `path`; the
    previous file, if any, is left as it was."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write here ({e.strerror or e})") from e
    try:
        os.fchmod(fd, new_file_mode(path))
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = _os_error(e)
        if cause is not None:
            raise CheckpointError(f"{path}: cannot write ({cause.strerror or cause})") from e
        raise


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind `e`: itself, or the one torch.save's writer wrapped in a RuntimeError."""
    for _ in range(8):  # a short chain; never loop on a cyclic one
        if e is None or isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically (atomic_write)."""
    atomic_write(path, lambda f: f.write(data))


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Deletes the temp files atomic_write left in `folder` when its process was killed mid-write
    (`.NAME.XXXXXXXX.tmp`, nothing else); returns them. Call it only where no other process writes."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if _TEMP_NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed
