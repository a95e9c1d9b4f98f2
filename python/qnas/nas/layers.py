"""The quantized convolution of derived (retrained) networks.

QuantNAS retrains a found architecture from scratch with LSQ weights per output channel (Esser et al.,
"Learned Step Size Quantization", ICLR 2020) and HWGQ activations (Cai et al., "Deep Learning with Low
Precision by Half-wave Gaussian Quantization", CVPR 2017), as its code does; LSQ activations are the
alternative. The quantizers are qnas.quant's (which run torch.ops.qops.fake_quant).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import qops  # noqa: F401  (registers torch.ops.qops.fake_quant, which qnas.quant's quantizers call)
from qnas.nas.graph import same_padding
from qnas.quant import build_quantizer

ACT_QUANTIZERS = ("hwgq", "lsq")


class QuantConv2d(nn.Conv2d):
    """relu (unless act="none") -> activation quantizer -> convolution with fake-quantized weights.

    Exposes ``w_bits`` / ``a_bits`` for qnas.cost (0 = full precision, no quantizer). "Same" padding.
    Activations are unsigned after the relu, signed otherwise. On the meta device (cost counting) the
    quantizers are skipped: they do not change shapes."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: tuple[int, int],
        *,
        groups: int = 1,
        dilation: int = 1,
        bias: bool = True,
        w_bits: int = 8,
        a_bits: int = 8,
        act: str = "relu",
        act_quantizer: str = "hwgq",
    ):
        super().__init__(
            in_ch,
            out_ch,
            kernel,
            padding=same_padding(kernel, dilation),
            dilation=dilation,
            groups=groups,
            bias=bias,
        )
        self.w_bits, self.a_bits, self.act = int(w_bits), int(a_bits), act
        self.act_quantizer = act_quantizer
        signed = act == "none"
        self.wq = (
            build_quantizer("lsq", w_bits, kind="weight", channels=out_ch, per_channel=True)
            if w_bits
            else None
        )
        self.aq = build_quantizer(act_quantizer, a_bits, kind="activation", signed=signed) if a_bits else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act == "relu":
            x = F.relu(x)
        w = self.weight
        if not x.is_meta:
            if self.aq is not None:
                x = self.aq(x)
            if self.wq is not None:
                w = self.wq(w)
        return self._conv_forward(x, w, self.bias)

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", w_bits={self.w_bits}, a_bits={self.a_bits}, act={self.act}, act_quantizer={self.act_quantizer}"
        )


class DerivedLayer(nn.Module):
    """The op chosen for one layer: its convolutions (QuantConv2d) in sequence, relu between them, the
    layer's bias on the last one. Called as layer(x, ctx) like the supernet's layers (ctx unused)."""

    def __init__(
        self,
        stages: list[dict],
        chans: list[tuple[int, int]],
        w_bits: int,
        a_bits: int,
        act: str,
        act_quantizer: str,
    ):
        super().__init__()
        self.convs = nn.ModuleList(
            QuantConv2d(
                ci,
                co,
                st["kernel"],
                groups=st["groups"],
                dilation=st["dilation"],
                bias=k == len(stages) - 1,
                w_bits=w_bits,
                a_bits=a_bits,
                act=act if k == 0 else "relu",
                act_quantizer=act_quantizer,
            )
            for k, (st, (ci, co)) in enumerate(zip(stages, chans, strict=True))
        )

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
        return x
