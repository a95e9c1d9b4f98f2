"""Quantized building blocks that replace a float network's convolutions and skip connections.

- QuantConv2d: an nn.Conv2d whose input and weight go through quantizers (qnas.quant.quantizers)
  before the convolution; w_bits / a_bits say what `qnas cost` counts (0 = full precision).
- QuantAdd: a skip connection z = Q_out(Q_x(x) + Q_y(y)), the fully quantized residual sum of FQSR
  (Wang et al., ACM MM 2021): both operands and the sum live on integer grids.
- OutputQuantizer: holds the quantizer of a network's output (installed as a forward hook on the
  root module by qnas.quant.apply, so the float network's module names and weights are untouched).

Every module keeps the float module's parameters under the same names, so a full-precision
state_dict loads into the quantized network (the quantizers' own state is added beside it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qnas.deploy.format import bias_step
from qnas.quant.quantizers import Quantizer
from qnas.sr.common import Add


def _bits_of(q: Quantizer | None) -> int:
    return 0 if q is None else int(q.bits)


class QuantConv2d(nn.Conv2d):
    """conv(Q_a(x), Q_w(W)) + bias: fake-quantized convolution (per-tensor steps).

    `w_quant` / `a_quant` may be None (that side stays float: w_bits / a_bits = 0). With both sides
    quantized the bias is used on the accumulator's grid, round(b / (sa·sw[c]))·(sa·sw[c]) (gradient to
    b straight through), which is the int32 bias an integer deployment stores: the network trains and
    evaluates as it ships (qnas export, docs/deploy.md).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        *,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        w_quant: Quantizer | None = None,
        a_quant: Quantizer | None = None,
    ):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
        )
        self.w_quant = w_quant
        self.a_quant = a_quant
        self.w_bits = _bits_of(w_quant)
        self.a_bits = _bits_of(a_quant)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, w_quant: Quantizer | None, a_quant: Quantizer | None) -> QuantConv2d:
        """A QuantConv2d sharing `conv`'s parameters (no copy), with the given quantizers."""
        with torch.device("meta"):
            q = cls(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                stride=conv.stride,
                padding=conv.padding,
                dilation=conv.dilation,
                groups=conv.groups,
                bias=conv.bias is not None,
            )
        q.weight = conv.weight
        q.bias = conv.bias
        q.padding_mode = conv.padding_mode
        q.w_quant, q.a_quant = w_quant, a_quant
        q.w_bits, q.a_bits = _bits_of(w_quant), _bits_of(a_quant)
        if w_quant is not None:
            w_quant.to(conv.weight.device)
        if a_quant is not None:
            a_quant.to(conv.weight.device)
        q.train(conv.training)
        return q

    def quantized_weight(self) -> torch.Tensor:
        return self.weight if self.w_quant is None else self.w_quant(self.weight)

    def integer_bias(self) -> torch.Tensor | None:
        """The bias as the integer path adds it (see the class docstring); the float bias where a side is
        float or a quantizer has no uniform step. Call after both quantizers have seen data."""
        b = self.bias
        if b is None or self.a_quant is None or self.w_quant is None:
            return b
        sa, sw = self.a_quant.deploy_step(), self.w_quant.deploy_step()
        if sa is None or sw is None or sa.numel() != 1:
            return b
        step = bias_step(sa, sw.expand(self.out_channels))
        q = torch.round(b.detach() / step).clamp(-(2**31), 2**31 - 1) * step
        return b + (q - b.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_quant is not None:
            x = self.a_quant(x)
        w = self.quantized_weight()
        return F.conv2d(x, w, self.integer_bias(), self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, w_bits={self.w_bits}, a_bits={self.a_bits}"


class QuantAdd(Add):
    """z = Q_out(Q_x(x) + Q_y(y)) (FQSR's quantized skip connection). In integer arithmetic the two
    operand codes are rescaled to a common step and added; the sum is requantized by Q_out."""

    def __init__(self, q_x: Quantizer, q_y: Quantizer, q_out: Quantizer):
        super().__init__()
        self.q_x, self.q_y, self.q_out = q_x, q_y, q_out
        self.a_bits = int(q_out.bits)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.q_out(self.q_x(x) + self.q_y(y))


class OutputQuantizer(nn.Module):
    """The quantizer of the network output, applied by a forward hook on the root module."""

    def __init__(self, quant: Quantizer):
        super().__init__()
        self.quant = quant
        self.a_bits = int(quant.bits)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.quant(y)


def quantizers(model: nn.Module):
    """Every Quantizer module of `model` with its name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Quantizer)]
