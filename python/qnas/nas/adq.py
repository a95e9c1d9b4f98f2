"""ADQ, the Adaptive Deviation for Quantization block of QuantNAS.

Shvetsov et al., "QuantNAS for super resolution: searching for efficient quantization-friendly
architectures against quantization noise", arXiv:2208.14839. Batch norm helps a quantized search
(activations get a known range) but hurts super-resolution, whose outputs must keep the input's
contrast; ADQ normalises the input of a residual branch and gives the branch back a scale that
follows the deviation of the residual's own input, sample by sample.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class ADQ(nn.Module):
    """out = f(BN(x)) · (w · σ(x) + b) + x  (QuantNAS, Shvetsov et al., arXiv:2208.14839).

    f is the residual branch, BN a batch norm of its input (affine, running statistics in eval mode),
    σ(x) the standard deviation of each sample of the skip input x over channels and pixels (unbiased,
    as the QuantNAS code computes it), and (w, b) a learned scalar affine initialised to (1.5, 0).
    `--no-adq` replaces it with the plain residual f(x) + x.
    """

    def __init__(self, channels: int, w_init: float = 1.5, b_init: float = 0.0):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.w = nn.Parameter(torch.full((1,), float(w_init)))
        self.b = nn.Parameter(torch.full((1,), float(b_init)))

    def forward(self, x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        sigma = torch.std(x, dim=(1, 2, 3), keepdim=True)
        from qnas.runs.distributed import batch_norm

        # Batch statistics of the global batch under torch.distributed (ranks hold shares of it).
        return branch(batch_norm(self.bn, x)) * (self.w * sigma + self.b) + x
