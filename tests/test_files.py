"""qnas.atomic_write and qnas.files: the permissions of written files, a full disk mid-write, the temp
files a kill leaves, and the rules for reading (regular files only) and writing (never an input, never
an existing file without --force)."""

import errno
import os
import stat

import pytest
import torch

from qnas.atomic_write import atomic_write_bytes, remove_stale_temp_files
from qnas.errors import CheckpointError, QnasError
from qnas.files import check_input_file, check_output_file
from qnas.runs.folder import RunDir, atomic_torch_save


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_get_the_umask_mode_not_0600(tmp_path, umask_027):
    atomic_write_bytes(tmp_path / "a.json", b"{}")
    atomic_torch_save({"x": torch.zeros(2)}, tmp_path / "model.pt")
    assert _mode(tmp_path / "a.json") == 0o640
    assert _mode(tmp_path / "model.pt") == 0o640
    # Replacing a file keeps its mode, as writing it in place would.
    os.chmod(tmp_path / "a.json", 0o604)
    atomic_write_bytes(tmp_path / "a.json", b"[]")
    assert _mode(tmp_path / "a.json") == 0o604 and (tmp_path / "a.json").read_bytes() == b"[]"


def test_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"step": 1}, path)
    before = path.read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(CheckpointError, match="checkpoint.pt: cannot write .*No space left on device"):
        atomic_torch_save({"step": 2, "w": torch.zeros(1000)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left


def test_full_disk_inside_torch_save_is_one_line(tmp_path, monkeypatch):
    """torch.save writes through the file object: an ENOSPC there reaches us inside torch's own error."""
    path = tmp_path / "checkpoint.pt"

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, Full(f)))
    with pytest.raises(CheckpointError, match="No space left on device"):
        atomic_torch_save({"w": torch.zeros(10)}, path)
    assert not path.exists() and not list(tmp_path.iterdir())


def test_stale_temp_files_of_a_killed_write_are_removed_when_the_run_opens(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale = [run / ".checkpoint.pt.a1b2c3d4.tmp", run / ".model.pt.zz_9yx8w.tmp"]
    mine = [run / ".notes.tmp", run / "checkpoint.pt.tmp", run / ".x.toolong123.tmp", run / "keep.txt"]
    for p in stale + mine:
        p.write_bytes(b"x" * 100)
    RunDir(run)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in mine)  # only our own temp names
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_input_files_must_be_regular(tmp_path):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    with pytest.raises(QnasError, match="x.png: not a regular file"):
        check_input_file(fifo, "image")  # opening a FIFO would wait for a writer
    with pytest.raises(QnasError, match="no such file"):
        check_input_file(tmp_path / "nope")
    with pytest.raises(QnasError, match="is a folder"):
        check_input_file(tmp_path)
    (tmp_path / "ok").write_text("x")
    assert check_input_file(tmp_path / "ok") == tmp_path / "ok"


def test_output_rules(tmp_path):
    src = tmp_path / "in.png"
    src.write_text("x")
    link = tmp_path / "hard.png"
    os.link(src, link)
    assert check_output_file(tmp_path / "new.png") == tmp_path / "new.png"
    with pytest.raises(QnasError, match="--out .*in.png: exists; pass --force"):
        check_output_file(src)
    assert check_output_file(src, force=True) == src
    for same in (src, link, tmp_path / "." / "in.png"):
        with pytest.raises(QnasError, match="is an input of this command"):
            check_output_file(same, force=True, inputs=[src])
    # A file that does not exist yet is still "the same" by folder and name.
    with pytest.raises(QnasError, match="is an input"):
        check_output_file(tmp_path / "later.pt", force=True, inputs=[tmp_path / "." / "later.pt"])
    with pytest.raises(QnasError, match="is a folder"):
        check_output_file(tmp_path, force=True)
