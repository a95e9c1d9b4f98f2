"""The layer of a derived (retrained) network: the op a search chose, as plain convolutions.

A derived network is built in float from these layers and then quantized like every other network
of qnas, by qnas.quant.apply with a per-layer plan (qnas.nas.derive.genotype_plan): the same
QuantConv2d, QuantAdd and output quantizer as FQSR, so `qnas inspect`, `qnas export` and
`qnas upscale` treat a searched network exactly like a fully quantized EDSR.
"""

from __future__ import annotations

import torch
from torch import nn

from qnas.nas.graph import same_padding
from qnas.nas.options import ACT_QUANTIZERS  # noqa: F401  (the choices of qnas train --act-quantizer)


class DerivedLayer(nn.Module):
    """One layer of a derived network: ReLU (unless act "none"), then the op's convolutions in sequence
    with a ReLU between them, "same" padding, the layer's bias on the last one. Called as layer(x, ctx)
    like the supernet's layers (ctx unused)."""

    def __init__(self, stages: list[dict], chans: list[tuple[int, int]], act: str):
        super().__init__()
        self.act = nn.ReLU() if act == "relu" else nn.Identity()
        self.convs = nn.ModuleList(
            nn.Conv2d(
                ci,
                co,
                st["kernel"],
                padding=same_padding(st["kernel"], st["dilation"]),
                dilation=st["dilation"],
                groups=st["groups"],
                bias=k == len(stages) - 1,
            )
            for k, (st, (ci, co)) in enumerate(zip(stages, chans, strict=True))
        )
        self.relus = nn.ModuleList(nn.ReLU() for _ in stages[1:])
        # nn.Conv2d's default initialisation, not the supernet's variance-preserving one: a derived
        # network is a plain residual network without normalisation, and He-initialised its nested
        # residual sums grow with depth (|x| ~ 9 at the body's end on a [0, 1] image); the first
        # optimiser steps then shrink every layer until the output is the anchor skip alone (measured on
        # the basic space at x4: 26.43 dB after 1200 steps He-initialised, 27.71 dB default-initialised).

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        x = self.convs[0](self.act(x))
        for relu, conv in zip(self.relus, self.convs[1:], strict=True):
            x = conv(relu(x))
        return x
