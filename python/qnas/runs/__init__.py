"""Runs: what every long job (train, search, strategy) writes and how it is read back, below all of them.

- qnas.runs.folder: the run folder (RunDir: config.json, metrics.jsonl, TensorBoard, atomic checkpoints);
- qnas.runs.network: the model file format (model.pt) and the registry of network kinds;
- qnas.runs.loop: the one resumable loop the jobs run their step in (and `--compile`);
- qnas.runs.distributed: torch.distributed set-up under torchrun.
It imports no training, search, quantization, export or deployment code.
"""

from qnas.runs.folder import RunDir, atomic_torch_save, load_torch_file, run_files
from qnas.runs.loop import Loop, Validation, Value
from qnas.runs.network import build_network, load_network, model_blob, register_network_kind

__all__ = [
    "Loop",
    "RunDir",
    "Validation",
    "Value",
    "atomic_torch_save",
    "build_network",
    "load_network",
    "load_torch_file",
    "model_blob",
    "register_network_kind",
    "run_files",
]
