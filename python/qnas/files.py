"""The rules every command applies to the files it reads and writes (docs/guide.md, "What qnas refuses").

Reading: a path must be an existing regular file. A folder, a FIFO, a device or a socket is refused
before it is opened (opening a FIFO blocks until someone writes to it: a hang, not an error).

Writing: an output that already exists is refused unless the command was given --force, and an
output that is one of the command's inputs (the same file, by path or by hard link) is refused even
then, so a command never destroys what it reads.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from qnas.errors import QnasError


def check_input_file(path: str | os.PathLike, what: str = "file", error: type[QnasError] = QnasError) -> Path:
    """`path` as a Path if it is an existing regular file; otherwise `error` naming it (one line)."""
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        raise error(f"{p}: no such file") from None
    except OSError as e:
        raise error(f"{p}: cannot read ({e.strerror or e})") from e
    if stat.S_ISDIR(mode):
        raise error(f"{p}: is a folder, expected a {what}")
    if not stat.S_ISREG(mode):
        raise error(f"{p}: not a regular file (a FIFO, device or socket), expected a {what}")
    return p


def read_json_object(
    path: str | os.PathLike,
    what: str = "JSON file",
    error: type[QnasError] = QnasError,
    expected: str = "a JSON object",
) -> dict:
    """The JSON object a file holds; `error` naming the file (one line) when it is not a readable regular
    file, not JSON, or not an object (`expected` says what it should be)."""
    p = check_input_file(path, what, error)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{p}: not valid JSON ({e})") from e
    except OSError as e:
        raise error(f"{p}: cannot read ({e.strerror or e})") from e
    if not isinstance(doc, dict):
        raise error(f"{p}: expected {expected}, got {type(doc).__name__}")
    return doc


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: the same existing file (by path, symlink or hard link), or,
    where either does not exist yet, the same name in the same folder."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        pass
    try:
        return os.path.basename(a) == os.path.basename(b) and os.path.samefile(
            os.path.dirname(os.path.abspath(a)), os.path.dirname(os.path.abspath(b))
        )
    except OSError:
        return False


def check_output_file(
    path: str | os.PathLike,
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    option: str = "--out",
    error: type[QnasError] = QnasError,
) -> Path:
    """Refuses an output `path` that is one of `inputs`, or that exists while `force` is False, or that
    is a folder or not a regular file; returns it as a Path. Messages name `option` and the path."""
    p = Path(path)
    for i in inputs:
        if same_file(p, i):
            raise error(f"{option} {p}: is an input of this command; choose another output")
    try:
        mode = os.stat(p).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return p  # nothing to replace; whether it can be written is the writer's error
    except OSError as e:
        raise error(f"{option} {p}: cannot be checked ({e.strerror or e})") from e
    if stat.S_ISDIR(mode):
        raise error(f"{option} {p}: is a folder, expected a file name")
    if not stat.S_ISREG(mode):
        raise error(f"{option} {p}: exists and is not a regular file")
    if not force:
        raise error(f"{option} {p}: exists; pass --force to replace it")
    return p
