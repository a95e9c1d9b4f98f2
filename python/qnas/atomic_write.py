"""Atomic file writes, shared by training runs and the deployment runtime (which must not import
training code, tests/test_deploy.py)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from qnas.errors import CheckpointError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` through a temp file in the same folder + os.replace: readers see the old file or the
    new one, never a part. A folder that cannot be written is a one-line error naming it."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write here ({e.strerror or e})") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise CheckpointError(f"{path}: cannot write ({e.strerror or e})") from e
        raise
