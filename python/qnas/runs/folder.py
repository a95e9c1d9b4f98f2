"""The run folder every long job writes (train, search, strategy), and how it resumes.

RUN/
  config.json        the command's options ("options", what `--config` replays) and what they resolve
                     to, written once (a resumed run must be given the same ones)
  metrics.jsonl      one JSON object per logged step
  events.*           TensorBoard scalars (same values as metrics.jsonl)
  checkpoint.pt      the latest full state (weights, optimizers, schedulers, data sampler, step)
  model.pt           the final model: {"model": state_dict, "config": ...}
  best.pt            `qnas train --val-data`: the model (model.pt's format) of the best validation PSNR

Checkpoints are written atomically (temp file in the same folder, fsync, os.replace), so a run
killed at any instant leaves either the previous or the new checkpoint, never a torn one; a full
disk is a one-line error with the previous checkpoint intact. The temp file of a write that a kill
interrupted is deleted when the folder is opened again. On resume, metrics.jsonl is cut back to
the checkpoint's step and TensorBoard is told to drop the steps after it (purge_step), so a resumed
run ends with the same files as one that was never interrupted.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from qnas.atomic_write import atomic_write, atomic_write_bytes, remove_stale_temp_files
from qnas.errors import CheckpointError, QnasError
from qnas.files import check_input_file, read_json_object

# The files a run folder's commands write (train, search, strategy); no other command may replace them.
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "checkpoint.pt",
    "model.pt",
    "best.pt",
    "genotype.json",
    "strategy.json",
)


def run_files(folder: str | os.PathLike) -> list[Path]:
    """The run's own files (RUN_FILES and TensorBoard event files) when `folder` is a run folder (it
    holds config.json), else []. Existing or not: an output named like one of them is refused."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return []
    events = sorted(folder.glob("events.out.tfevents.*"))
    return [folder / name for name in RUN_FILES] + events


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through a temp file + os.replace (qnas.atomic_write: a full disk is a one-line
    CheckpointError and the previous file stays)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_torch_file(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """torch.load(weights_only=True) with a one-line CheckpointError naming the file on any failure."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: {what} not found")
    check_input_file(path, what, CheckpointError)
    if not zipfile.is_zipfile(path):  # what torch.save writes; anything else is not ours
        raise CheckpointError(f"{path}: not a readable {what} (not a file written by torch.save)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/corrupt/pickled files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable {what} ({first[:160]})") from e


class RunDir:
    """A run folder: config, metrics (JSONL + TensorBoard), atomic checkpoints, final model."""

    def __init__(self, path: str | os.PathLike, *, tensorboard: bool = True, is_writer: bool = True):
        self.path = Path(path)
        self.is_writer = is_writer  # only rank 0 writes under torch.distributed
        self._tb_enabled = tensorboard
        self._tb = None
        self._purge_step: int | None = None
        if is_writer:
            if self.path.exists() and not self.path.is_dir():
                raise QnasError(f"{self.path}: exists and is not a folder")
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise QnasError(f"{self.path}: cannot create the run folder ({e.strerror})") from e
            if not os.access(self.path, os.W_OK):
                raise QnasError(f"{self.path}: the run folder is not writable")
            # Only this process writes here: a temp file is what a killed write left behind.
            remove_stale_temp_files(self.path)

    # -- config -------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    def write_config(self, config: dict) -> None:
        if self.is_writer:
            atomic_write_bytes(
                self.config_path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
            )

    def read_config(self) -> dict:
        if not self.config_path.exists():
            raise CheckpointError(f"{self.config_path}: not found (is {self.path} a qnas run folder?)")
        return read_json_object(self.config_path, "JSON file", CheckpointError)

    def check_same_config(self, config: dict) -> None:
        """A resume's config against the run's config.json: a one-line error naming the options that
        differ. "options" (how the command line said it, qnas.runconfig) and "command" are not compared:
        the sections resolved from them decide."""
        stored = self.read_config()
        diffs = []
        for section in sorted((set(stored) | set(config)) - {"options", "command"}):
            a, b = stored.get(section), config.get(section)
            if isinstance(a, dict) and isinstance(b, dict):
                diffs += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            elif a != b:
                diffs.append(section)
        if diffs:
            raise QnasError(
                f"{self.path}: --resume with options that differ from the run's config.json "
                f"({', '.join(diffs)}); resume with the original options or start a new --out"
            )

    # -- checkpoints ----------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.is_file()

    def save_checkpoint(self, state: dict) -> None:
        if self.is_writer:
            atomic_torch_save(state, self.checkpoint_path)

    def load_checkpoint(self) -> dict:
        state = load_torch_file(self.checkpoint_path, "checkpoint")
        if not isinstance(state, dict) or "step" not in state:
            raise CheckpointError(f"{self.checkpoint_path}: not a qnas checkpoint (no 'step')")
        return state

    def save_model(self, state: dict, name: str = "model.pt") -> None:
        if self.is_writer:
            atomic_torch_save(state, self.path / name)

    # -- metrics --------------------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def truncate_metrics(self, step: int) -> None:
        """On resume from the checkpoint at `step`: drops the logged steps after it (written before a
        kill) from metrics.jsonl, and from TensorBoard when the first new scalar is written
        (SummaryWriter's purge_step). A line that is not a JSON record is dropped and reported on
        stderr, unless it is the torn last line of a kill; every good line up to `step` is kept."""
        self._purge_step = step + 1
        if not self.is_writer or not self.metrics_path.exists():
            return
        records, bad = self._parse_metrics()
        kept = [line for line, rec in records if rec["step"] <= step]
        if bad:
            print(
                f"qnas: warning: {self.metrics_path}: dropped {len(bad)} unreadable line(s) "
                f"(line {', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''})",
                file=sys.stderr,
            )
        atomic_write_bytes(self.metrics_path, ("\n".join(kept) + "\n" if kept else "").encode())

    def _parse_metrics(self) -> tuple[list[tuple[str, dict]], list[int]]:
        """([(line, record)] of the good lines, [numbers of bad lines]); a torn last line is not 'bad'."""
        check_input_file(self.metrics_path, "metrics file", CheckpointError)
        try:
            data = self.metrics_path.read_bytes()
        except OSError as e:
            raise CheckpointError(f"{self.metrics_path}: cannot read ({e.strerror or e})") from e
        lines = data.split(b"\n")
        torn_last = bool(lines) and lines[-1] != b""  # a kill mid-write leaves no final newline
        records, bad = [], []
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
                rec = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                rec = None
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                records.append((line, rec))
            elif not (torn_last and number == len(lines)):
                bad.append(number)
        return records, bad

    def log(self, step: int, **values: float) -> None:
        if not self.is_writer:
            return
        rec = {"step": int(step), **{k: _jsonable(v) for k, v in values.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        tb = self._writer()
        if tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    tb.add_scalar(k, v, step)

    def read_metrics(self) -> list[dict]:
        """The logged records (lines that are not JSON records are skipped)."""
        if not self.metrics_path.exists():
            return []
        return [rec for _, rec in self._parse_metrics()[0]]

    def _writer(self):
        if not self._tb_enabled:
            return None
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency; tolerate its absence in slim installs
                self._tb_enabled = False
                return None
            self._tb = SummaryWriter(log_dir=str(self.path), purge_step=self._purge_step)
        return self._tb

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v
