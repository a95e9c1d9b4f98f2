"""The run folder every long job writes (train, search, strategy), and how it resumes.

RUN/
  config.json        the command's options, written once (a resumed run must be given the same ones)
  metrics.jsonl      one JSON object per logged step
  events.*           TensorBoard scalars (same values as metrics.jsonl)
  checkpoint.pt      the latest full state (weights, optimizers, schedulers, data sampler, step)
  model.pt           the final model: {"model": state_dict, "config": ...}

Checkpoints are written atomically (temp file in the same folder, fsync, os.replace), so a run
killed at any instant leaves either the previous or the new checkpoint, never a torn one. On resume,
metrics.jsonl is cut back to the checkpoint's step, so a resumed run ends with the same files as
one that was never interrupted.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from qnas.atomic_write import atomic_write_bytes
from qnas.errors import CheckpointError, QnasError


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through a temp file + os.replace (see atomic_write_bytes)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_torch_file(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """torch.load(weights_only=True) with a one-line CheckpointError naming the file on any failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
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
        if is_writer:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise QnasError(f"{self.path}: cannot create the run folder ({e.strerror})") from e
            if not os.access(self.path, os.W_OK):
                raise QnasError(f"{self.path}: the run folder is not writable")

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
        try:
            return json.loads(self.config_path.read_text())
        except FileNotFoundError as e:
            raise CheckpointError(f"{self.config_path}: not found (is {self.path} a qnas run folder?)") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.config_path}: corrupt JSON ({e})") from e

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
        """Drops logged steps after `step` (written before a kill, after the last checkpoint)."""
        if not self.is_writer or not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # a line torn by the kill: everything after it is lost anyway
            if rec.get("step", -1) <= step:
                kept.append(line)
        atomic_write_bytes(self.metrics_path, ("\n".join(kept) + "\n" if kept else "").encode())

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
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def _writer(self):
        if not self._tb_enabled:
            return None
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency; tolerate its absence in slim installs
                self._tb_enabled = False
                return None
            self._tb = SummaryWriter(log_dir=str(self.path))
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
