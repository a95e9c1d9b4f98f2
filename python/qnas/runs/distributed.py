"""torch.distributed set-up for `torchrun --nproc-per-node N -m qnas train|search|strategy ...`.

Backend gloo on CPU, nccl on CUDA. The global batch (--batch-size) is split evenly across ranks
(qnas.data.PatchSampler shards it) and gradients are averaged over the ranks, so N processes
train the same weights as one process with the same global batch and seed: `train` wraps its
network in DistributedDataParallel; `search` and `strategy` average the gradients themselves
(average_gradients) because their architecture and weight steps back-propagate to different
parameter sets (backward(inputs=...)), which DDP's reducer cannot follow. Every rank starts from
the same seed and draws the same random numbers, so parameters that only a regularizer touches
(entropy, BitOps) stay identical without communication. What depends on the batch as a whole is
computed on the whole batch: quantizers' data-driven steps (whole_batch, called by the quantizers
themselves), batch norm statistics (batch_norm, used by ADQ) and LSQ's gradient scale
(batch_shares). Only rank 0 writes the run folder (logs, checkpoints, model) and prints.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qnas.errors import QnasError

# Whether the tensors a forward sees are this rank's share of a global batch: from setup() on (train,
# search, strategy steps), except inside whole_batches() (strategy's calibration on whole batches).
_sharded = False


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
    global _sharded
    _sharded = True
    return DistInfo(rank=rank, world=world, device=device)


def check_batch(batch_size: int, info: DistInfo) -> None:
    if batch_size % info.world:
        raise QnasError(f"--batch-size {batch_size} does not split evenly over {info.world} processes")


def wrap(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DistributedDataParallel on more than one process, the model itself otherwise."""
    if info.world == 1:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    # Some steps leave parameters out of the loss (FQSR's statistics warm-up passes activations through
    # unquantized, so the quantizers' steps get no gradient): DDP must look for them in the graph.
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def mean(value: float, info: DistInfo) -> float:
    """The mean of a scalar over ranks (what one process with the global batch would log)."""
    if info.world == 1:
        return value
    t = torch.tensor(
        [value], dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu"
    )
    dist.all_reduce(t)
    return t.item() / info.world


def average_gradients(params, info: DistInfo) -> None:
    """Replaces every .grad of `params` by its mean over the ranks (one all-reduce for all of them).

    With equal shares of a batch and a loss that is a mean over its samples, the mean of the ranks'
    gradients is the gradient one process computes on the whole batch. Parameters without a gradient
    are skipped (the same ones on every rank: every rank runs the same graph)."""
    if info.world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def batch_shares() -> int:
    """How many ranks' shares the batch a forward sees is one of: the world size during the steps of a
    distributed run, 1 outside torch.distributed and inside whole_batches()."""
    if _sharded and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@contextmanager
def whole_batches() -> Iterator[None]:
    """Within: every rank's forwards see whole batches (calibration on the same data in every rank),
    so data-driven quantizer statistics are computed as they are, not gathered."""
    global _sharded
    before, _sharded = _sharded, False
    try:
        yield
    finally:
        _sharded = before


def whole_batch(x: torch.Tensor) -> torch.Tensor:
    """The global batch `x` is this rank's share of, in rank order (x itself outside torch.distributed).

    For data-driven initializations (LSQ's 2·mean|x|/sqrt(qmax) on the first batch): computed on the
    whole batch, they are the one-process values bit for bit and the same on every rank."""
    if batch_shares() == 1:
        return x
    x = x.detach()
    fmt = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else None
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    out = torch.cat(parts)
    return out.contiguous(memory_format=fmt) if fmt is not None else out


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks whose gradient is the sum over the ranks of the gradients."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def batch_norm(bn: torch.nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """bn(x); in training mode under torch.distributed, normalized by the statistics of the global batch
    (as torch.nn.SyncBatchNorm, which runs on GPUs only): the outputs, the gradients and the running
    statistics are those of one process with the whole batch.

    The sums go through a differentiable all-reduce (_AllReduceSum), whose backward sums the
    ranks' gradients of the statistics: each rank's input then receives the gradient that every rank's
    loss gives it, and averaging the parameters' gradients afterwards yields the one-process gradient."""
    if not bn.training or batch_shares() == 1:
        return bn(x)
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    count = x.numel() // x.shape[1] * dist.get_world_size()
    all_reduce = _AllReduceSum.apply
    mean = all_reduce(x.sum(dims)) / count
    centred = x - mean.view(shape)
    var = all_reduce(centred.square().sum(dims)) / count  # two passes: no E[x²] - E[x]² cancellation
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked += 1
            m = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            bn.running_var.mul_(1 - m).add_(var.detach() * (count / max(count - 1, 1)), alpha=m)
    y = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y


def means(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """`mean` of several scalars in one all-reduce."""
    if info.world == 1 or not values:
        return values
    t = torch.tensor(
        list(values.values()),
        dtype=torch.float64,
        device=info.device if info.device.type == "cuda" else "cpu",
    )
    dist.all_reduce(t)
    return {k: v / info.world for k, v in zip(values, t.tolist(), strict=True)}


def shard(batch: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's share of a global batch (equal consecutive slices, as PatchSampler draws them)."""
    if info.world == 1:
        return batch
    n = batch.shape[0] // info.world
    return batch[info.rank * n : (info.rank + 1) * n]


def silence_other_ranks() -> None:
    """Under torchrun, ranks other than 0 print nothing: rank 0 speaks for the run (progress, notes,
    summaries, one-line errors, which every rank hits alike). A traceback, a crash of that rank's
    own, still reaches its stderr."""
    if int(os.environ.get("RANK", "0")) == 0:
        return
    import sys

    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (kept for the process's lifetime)
    previous = sys.excepthook

    def excepthook(*exc) -> None:
        sys.stderr = sys.__stderr__
        previous(*exc)

    sys.excepthook = excepthook


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def teardown(info: DistInfo) -> None:
    global _sharded
    if info.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _sharded = False
