"""Bit-packed low-bit convolution for inference: ``pack_weight``, ``packed_conv2d``, ``quantized_conv2d``.

Weights are integer codes packed into bit-planes (layout in csrc/include/qops/packed_layout.h and
docs/kernels.md), activations are codes (or floats quantized on the fly), and the convolution is exact
integer arithmetic on CPU (AVX2/AVX-512 paths: int8 dot products, lookup tables, bit-serial popcount) and
CUDA (dp4a, 1-bit popcount). This is the per-layer block that `qnas upscale` runs after QuantNAS / DQSS /
FQSR training produced the bit-widths and scales.

The ops are inference-only: none is differentiable. ``quantized_conv2d`` accepts inputs that require
grad but its backward raises; train with fake quantization and convert with
:class:`qops.nn.PackedConv2d`.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers the schemas and kernels)

__all__ = ["pack_weight", "packed_conv2d", "quantized_conv2d", "quantize_weight", "weight_code_range"]


def _pair(v: int | tuple[int, int] | list[int]) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]


def weight_code_range(bits: int) -> tuple[int, int]:
    """Codes of a ``bits``-bit weight: [-2^(b-1), 2^(b-1)-1]; for 1 bit the codes are -1 and +1."""
    return (-1, 1) if bits == 1 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def quantize_weight(weight: torch.Tensor, w_scale: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes of a float weight [Cout, ...] with per-output-channel steps ``w_scale`` ([Cout] or one).

    bits >= 2: clamp(nearbyint(w * (1 / s))), as fake_quant (LSQ) computes them; bits = 1: sign(w) as -1/+1
    (0 goes to +1), the binary weights alpha * sign(w) of XNOR-Net (Rastegari et al., 2016).
    """
    s = w_scale.to(torch.float32).reshape(-1, *([1] * (weight.dim() - 1)))
    if bits == 1:
        return torch.where(weight >= 0, 1, -1).to(torch.int8)
    lo, hi = weight_code_range(bits)
    inv = torch.ones((), dtype=torch.float32, device=s.device) / s
    return torch.clamp(torch.round(weight.to(torch.float32) * inv), lo, hi).to(torch.int8)


def pack_weight(w_codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs int8 weight codes [Cout, Cin, kh, kw] in [-2^(b-1), 2^(b-1)-1] (1 bit: -1/+1) into a uint8 buffer
    of Cout * bits * ceil(Cin*kh*kw / 32) * 4 bytes (bit-plane rows, see docs/kernels.md)."""
    return torch.ops.qops.pack_weight(w_codes, bits)


def packed_conv2d(
    x_codes: torch.Tensor,
    w_packed: torch.Tensor,
    w_shape: list[int] | tuple[int, ...],
    w_bits: int,
    a_bits: int,
    a_signed: bool = False,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
) -> torch.Tensor:
    """Exact int32 convolution sum x*w with zero padding. ``x_codes``: uint8 [N, Cin, H, W] in [0, 2^a-1], or
    int8 in [-2^(a-1), 2^(a-1)-1] when ``a_signed``; ``w_packed`` from :func:`pack_weight` of shape ``w_shape``."""
    return torch.ops.qops.packed_conv2d(
        x_codes, w_packed, list(w_shape), w_bits, a_bits, a_signed, _pair(stride), _pair(padding)
    )


def quantized_conv2d(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_shape: list[int] | tuple[int, ...],
    w_scale: torch.Tensor,
    a_scale: float,
    w_bits: int,
    a_bits: int,
    a_signed: bool = False,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
) -> torch.Tensor:
    """Float in, float out: codes = clamp(nearbyint(x * (1/a_scale))) in the activation range (as fake_quant),
    exact integer convolution, out = acc * (w_scale[c] * a_scale) + bias[c]."""
    return torch.ops.qops.quantized_conv2d(
        x,
        w_packed,
        list(w_shape),
        w_scale,
        float(a_scale),
        w_bits,
        a_bits,
        a_signed,
        bias,
        _pair(stride),
        _pair(padding),
    )


def _out_hw(x, w_shape, stride, padding):
    ho = (x.shape[2] + 2 * padding[0] - w_shape[2]) // stride[0] + 1
    wo = (x.shape[3] + 2 * padding[1] - w_shape[3]) // stride[1] + 1
    return ho, wo


@torch.library.register_fake("qops::pack_weight")
def _pack_weight_fake(w_codes, bits):
    cout = w_codes.shape[0]
    k = w_codes.numel() // max(cout, 1)
    return w_codes.new_empty((cout * bits * ((k + 31) // 32) * 4,), dtype=torch.uint8)


@torch.library.register_fake("qops::packed_conv2d")
def _packed_conv2d_fake(x_codes, w_packed, w_shape, w_bits, a_bits, a_signed, stride, padding):
    ho, wo = _out_hw(x_codes, w_shape, stride, padding)
    return x_codes.new_empty((x_codes.shape[0], w_shape[0], ho, wo), dtype=torch.int32)


@torch.library.register_fake("qops::quantized_conv2d")
def _quantized_conv2d_fake(
    x, w_packed, w_shape, w_scale, a_scale, w_bits, a_bits, a_signed, bias, stride, padding
):
    ho, wo = _out_hw(x, w_shape, stride, padding)
    return x.new_empty((x.shape[0], w_shape[0], ho, wo), dtype=torch.float32)


def _quantized_conv2d_setup(ctx, inputs, output):
    pass


def _quantized_conv2d_backward(ctx, grad):
    raise RuntimeError(
        "quantized_conv2d is inference-only and has no gradient: train with fake quantization "
        "(qops.fake_quant / QuantConv2d) and convert with qops.nn.PackedConv2d for deployment"
    )


torch.library.register_autograd(
    "qops::quantized_conv2d", _quantized_conv2d_backward, setup_context=_quantized_conv2d_setup
)
