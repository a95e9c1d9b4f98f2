"""torch.distributed set-up for `torchrun --nproc-per-node N -m qnas train|search ...`.

Backend gloo on CPU, nccl on CUDA. The global batch (--batch-size) is split evenly across ranks
(qnas.data.PatchSampler shards it); DistributedDataParallel averages gradients, so N processes
train the same weights as one process with the same global batch and seed. Only rank 0 writes
the run folder (logs, checkpoints, model).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qnas.errors import QnasError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> DistInfo:
    """Joins the process group torchrun describes (WORLD_SIZE > 1), or returns a single-process info."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world=world, device=device)


def check_batch(batch_size: int, info: DistInfo) -> None:
    if batch_size % info.world:
        raise QnasError(f"--batch-size {batch_size} does not split evenly over {info.world} processes")


def wrap(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DistributedDataParallel on more than one process, the model itself otherwise."""
    if info.world == 1:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def mean(value: float, info: DistInfo) -> float:
    """The mean of a scalar over ranks (what one process with the global batch would log)."""
    if info.world == 1:
        return value
    t = torch.tensor(
        [value], dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu"
    )
    dist.all_reduce(t)
    return t.item() / info.world


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def teardown(info: DistInfo) -> None:
    if info.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
