"""Pure-torch references of every torch.ops.qops op: the specification the tests compare against.

Each function has the op's signature and semantics (shared/DESIGN.md, "Op contracts") and is written
for clarity, not speed. Where torch has a built-in with the same meaning (LSQ fake quantization), the
reference is that built-in.
"""

from __future__ import annotations

import torch

# ---------------------------------------------------------------------------------------------------------
# Bit-packed low-bit convolution (pack_weight, packed_conv2d, quantized_conv2d): the packed layout of
# csrc/include/qops/packed_layout.h written with tensor ops, and convolutions computed exactly in float64.


def _code_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def pack_weight(w_codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-plane rows: per output channel, ``bits`` planes of ceil(K/32) little-endian uint32 words; bit r of
    word q of plane j is bit j of the two's complement pattern of code k = 32q + r (1-bit: (code+1)/2)."""
    cout = w_codes.shape[0]
    codes = w_codes.reshape(cout, -1).to(torch.int64)
    k = codes.shape[1]
    kw = (k + 31) // 32
    u = (codes + 1) // 2 if bits == 1 else codes & (2**bits - 1)
    u = torch.nn.functional.pad(u, (0, kw * 32 - k))
    shifts = torch.arange(32, dtype=torch.int64, device=u.device)
    planes = [(((u >> j) & 1).reshape(cout, kw, 32) << shifts).sum(-1) for j in range(bits)]
    words = torch.stack(planes, 1)  # [Cout, bits, KW] as int64 holding uint32 values
    byte_shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=u.device)
    return ((words.unsqueeze(-1) >> byte_shifts) & 255).to(torch.uint8).reshape(-1)


def unpack_weight(w_packed: torch.Tensor, w_shape: list[int], bits: int) -> torch.Tensor:
    """The int8 codes [Cout, Cin, kh, kw] stored in a pack_weight buffer."""
    cout = w_shape[0]
    k = w_shape[1] * w_shape[2] * w_shape[3]
    kw = (k + 31) // 32
    b = w_packed.to(torch.int64).reshape(cout, bits, kw, 4)
    words = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    shifts = torch.arange(32, dtype=torch.int64, device=b.device)
    bitsk = ((words.unsqueeze(-1) >> shifts) & 1).reshape(cout, bits, kw * 32)[..., :k]
    u = sum(bitsk[:, j] << j for j in range(bits))
    codes = 2 * u - 1 if bits == 1 else torch.where(u >= 2 ** (bits - 1), u - 2**bits, u)
    return codes.to(torch.int8).reshape(w_shape)


def packed_conv2d(
    x_codes: torch.Tensor,
    w_packed: torch.Tensor,
    w_shape: list[int],
    w_bits: int,
    a_bits: int,
    a_signed: bool,
    stride: list[int],
    padding: list[int],
) -> torch.Tensor:
    """Exact int32 sum_k x*w over zero padding, computed in float64 (exact below 2^53)."""
    w = unpack_weight(w_packed, w_shape, w_bits).to(torch.float64)
    acc = torch.nn.functional.conv2d(
        x_codes.to(torch.float64), w, stride=tuple(stride), padding=tuple(padding)
    )
    return acc.to(torch.int32)


def quantize_activation(x: torch.Tensor, a_scale: float, a_bits: int, a_signed: bool) -> torch.Tensor:
    """Activation codes as fake_quant computes them: clamp(nearbyint(x * (1 / scale))) in float32."""
    lo, hi = _code_range(a_bits, a_signed)
    inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(a_scale, dtype=torch.float32)
    return torch.clamp(torch.round(x.to(torch.float32) * inv.to(x.device)), lo, hi)


def quantized_conv2d(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_shape: list[int],
    w_scale: torch.Tensor,
    a_scale: float,
    w_bits: int,
    a_bits: int,
    a_signed: bool,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
) -> torch.Tensor:
    """quantize x, exact integer convolution, out = acc * (w_scale[c] * a_scale) + bias[c] (float64, then float32)."""
    codes = quantize_activation(x, a_scale, a_bits, a_signed)
    w = unpack_weight(w_packed, w_shape, w_bits).to(torch.float64)
    acc = torch.nn.functional.conv2d(codes.to(torch.float64), w, stride=tuple(stride), padding=tuple(padding))
    scale = (w_scale.to(torch.float32) * torch.tensor(a_scale, dtype=torch.float32)).to(torch.float64)
    out = acc * scale.reshape(1, -1, 1, 1).expand(1, w_shape[0], 1, 1)
    if bias is not None:
        out = out + bias.to(torch.float64).reshape(1, -1, 1, 1)
    return out.to(torch.float32)
