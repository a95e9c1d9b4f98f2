"""Bit-packed low-bit convolution for inference: ``pack_weight``, ``packed_conv2d``, ``quantized_conv2d``, and
the integer pipeline between layers: ``requantized_conv2d`` (codes out), ``requantize``, ``quantized_add``.

Weights are integer codes packed into bit-planes (layout in csrc/include/qops/packed_layout.h and
docs/kernels.md), activations are codes (or floats quantized on the fly), and the convolution is exact
integer arithmetic on CPU (AVX2/AVX-512 paths: int8 dot products, lookup tables, bit-serial popcount) and
CUDA (dp4a, 1-bit popcount). This is the per-layer block that `qnas upscale` runs after QuantNAS / DQSS /
FQSR training produced the bit-widths and scales.

Between layers the packed runtime keeps activations as codes (int8/uint8, CPU): ``requantized_conv2d`` ends
the convolution with the next quantizer (scale, int32 bias, ReLU, round, clamp) and writes its codes,
``requantize`` moves codes (or floats) to another step, ``quantized_add`` is FQSR's skip ``Q(Q(x) + Q(y))`` on
codes. Every step computes the float32 operations of the fake-quantized network in the same order, so the
codes equal those of the float pipeline bit for bit (qops.reference states each op).

The ops are inference-only: none is differentiable. ``quantized_conv2d`` accepts inputs that require
grad but its backward raises; train with fake quantization and convert with
:class:`qops.nn.PackedConv2d`.
"""

from __future__ import annotations

import math
import struct

import torch

from . import _C  # noqa: F401  (registers the schemas and kernels)
from .ranges import quant_range

__all__ = [
    "pack_weight",
    "unpack_weight",
    "packed_conv2d",
    "quantized_conv2d",
    "requantized_conv2d",
    "requantize",
    "quantized_add",
    "quantize_weight",
    "weight_code_range",
]


def _pair(v: int | tuple[int, int] | list[int]) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]


def weight_code_range(bits: int) -> tuple[int, int]:
    """Smallest and largest code of a ``bits``-bit packed weight: ``qops.quant_range(bits, signed=True)``, except
    1 bit, whose codes are the binary -1 and +1 (0 is not a code)."""
    return (-1, 1) if bits == 1 else quant_range(bits, True)


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


def unpack_weight(w_packed: torch.Tensor, w_shape: list[int], bits: int) -> torch.Tensor:
    """The int8 codes [Cout, Cin, kh, kw] stored in a :func:`pack_weight` buffer of weights of shape ``w_shape`` at
    ``bits`` bits: the inverse of pack_weight (pure torch, any device; e.g. to export a packed model)."""
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


def requantized_conv2d(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_shape: list[int] | tuple[int, ...],
    w_scale: torch.Tensor,
    a_scale: float,
    w_bits: int,
    a_bits: int,
    a_signed: bool,
    bias: torch.Tensor | None,
    stride: int | tuple[int, int],
    padding: int | tuple[int, int],
    out_scale: float,
    out_bits: int,
    out_signed: bool,
    relu: bool = False,
    pixel_shuffle: int = 1,
) -> torch.Tensor:
    """Codes in (or float, quantized as in :func:`quantized_conv2d`), the next layer's codes out (CPU).

    ``bias``: int32 [Cout] at the accumulator's step ``w_scale[c] * a_scale``. With y the float that
    quantized_conv2d returns for the float bias ``bias * step``, out = clamp(round(y' / out_scale)) at
    ``out_bits`` (int8 if ``out_signed`` else uint8), y' = relu(y) if ``relu`` else y: what the next
    quantizer (fake_quant) makes of y. ``pixel_shuffle`` r > 1 writes them as ``F.pixel_shuffle(out, r)`` (the
    sub-pixel convolution of Shi et al., CVPR 2016, without a pass over the codes)."""
    return torch.ops.qops.requantized_conv2d(
        x, w_packed, list(w_shape), w_scale, float(a_scale), w_bits, a_bits, a_signed, bias,
        _pair(stride), _pair(padding), float(out_scale), out_bits, out_signed, relu, pixel_shuffle,
    )  # fmt: skip


def requantize(
    x: torch.Tensor, scale: float, bits: int, signed: bool, x_scale: float | None = None
) -> torch.Tensor:
    """Codes clamp(round(v * (1/scale))) at ``bits`` (int8 if ``signed`` else uint8) of v = x (float32) or
    v = x * x_scale (x codes, int8/uint8): fake_quant's codes of v (CPU)."""
    return torch.ops.qops.requantize(
        x, float(scale), bits, signed, None if x_scale is None else float(x_scale)
    )


def quantized_add(
    x: torch.Tensor,
    x_scale: float,
    y: torch.Tensor,
    y_scale: float,
    out_scale: float,
    out_bits: int,
    out_signed: bool,
) -> torch.Tensor:
    """FQSR's quantized skip on codes (CPU): the codes of ``x * x_scale + y * y_scale`` at step ``out_scale``
    and ``out_bits`` (int8 if ``out_signed`` else uint8); each product and the sum rounded to float32 as the
    float pipeline computes ``Q_out(Q_x(a) + Q_y(b))``."""
    return torch.ops.qops.quantized_add(
        x, float(x_scale), y, float(y_scale), float(out_scale), out_bits, out_signed
    )


# The fake (meta) kernels: the checks of csrc/include/qops/packed_conv_args.h with the same messages, so that
# torch.compile, meta tensors and a meta tensor mixed with real ones fail (or agree) like the kernels.


def _check_device(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    torch._check(
        t.device == ref.device,
        lambda: f"{name}: expected a tensor on {ref.device} like {ref_name}, got {t.device}",
    )


def _check_dtype(t: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    torch._check(t.dtype == dtype, lambda: f"{name}: expected dtype {dtype}, got {t.dtype}")


def _float32(v: float) -> float:
    """v rounded to float32 (infinite beyond its range), without tensors: fake kernels may not read data."""
    try:
        return struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:
        return math.copysign(math.inf, v)


def _check_bits(bits: int, name: str) -> None:
    torch._check(1 <= bits <= 8, lambda: f"{name}: expected a bit-width in 1..8, got {bits}")


def _check_conv(x, x_name, w_packed, w_shape, w_bits, a_bits, stride, padding) -> tuple[int, int]:
    """The checks of csrc/include/qops/packed_conv_args.h (check_conv); returns the output's (Ho, Wo)."""
    torch._check(x.dim() == 4, lambda: f"{x_name}: expected 4 dimensions, got shape {tuple(x.shape)}")
    _check_dtype(w_packed, torch.uint8, "w_packed")
    torch._check(
        w_packed.dim() == 1, lambda: f"w_packed: expected 1 dimensions, got shape {tuple(w_packed.shape)}"
    )
    _check_device(w_packed, "w_packed", x, x_name)
    _check_bits(w_bits, "w_bits")
    _check_bits(a_bits, "a_bits")
    torch._check(len(w_shape) == 4, lambda: f"w_shape: expected [Cout, Cin, kh, kw], got {list(w_shape)}")
    torch._check(
        all(v > 0 for v in w_shape), lambda: f"w_shape: expected positive sizes, got {list(w_shape)}"
    )
    torch._check(len(stride) == 2, lambda: f"stride: expected 2 values, got {list(stride)}")
    torch._check(len(padding) == 2, lambda: f"padding: expected 2 values, got {list(padding)}")
    torch._check(min(stride) >= 1, lambda: f"stride: expected values >= 1, got {list(stride)}")
    torch._check(min(padding) >= 0, lambda: f"padding: expected values >= 0, got {list(padding)}")
    cout, cin, kh, kw = w_shape
    torch._check(
        cin == x.shape[1],
        lambda: f"w_shape: Cin = {cin} does not match the {x.shape[1]} channels of {x_name}",
    )
    k = cin * kh * kw
    k_limit = 1 << (32 - a_bits - w_bits)
    torch._check(
        k < k_limit,
        lambda: (
            f"w_shape: K = Cin*kh*kw = {k} is too large for exact int32 accumulation at {w_bits}x{a_bits} bits"
        ),
    )
    want = cout * w_bits * ((k + 31) // 32) * 4
    torch._check(
        w_packed.shape[0] == want,
        lambda: (
            f"w_shape: {list(w_shape)} at w_bits={w_bits} needs a packed buffer of {want} bytes, "
            f"but w_packed has {w_packed.shape[0]}"
        ),
    )
    torch._check(
        padding[0] < kh and padding[1] < kw,
        lambda: f"padding: expected values below the kernel size ({kh}, {kw}), got {list(padding)}",
    )
    hp, wp = x.shape[2] + 2 * padding[0], x.shape[3] + 2 * padding[1]
    torch._check(
        hp >= kh and wp >= kw,
        lambda: f"{x_name}: padded input {hp}x{wp} is smaller than the kernel {kh}x{kw}",
    )
    # A stride beyond the padded input leaves one output row (column); the kernels clamp it, same shape.
    return (hp - kh) // stride[0] + 1, (wp - kw) // stride[1] + 1


@torch.library.register_fake("qops::pack_weight")
def _pack_weight_fake(w_codes, bits):
    _check_dtype(w_codes, torch.int8, "w_codes")
    torch._check(
        w_codes.dim() == 4, lambda: f"w_codes: expected 4 dimensions, got shape {tuple(w_codes.shape)}"
    )
    _check_bits(bits, "bits")
    cout = w_codes.shape[0]
    k = w_codes.shape[1] * w_codes.shape[2] * w_codes.shape[3]
    return w_codes.new_empty((cout * bits * ((k + 31) // 32) * 4,), dtype=torch.uint8)


@torch.library.register_fake("qops::packed_conv2d")
def _packed_conv2d_fake(x_codes, w_packed, w_shape, w_bits, a_bits, a_signed, stride, padding):
    _check_dtype(x_codes, torch.int8 if a_signed else torch.uint8, "x_codes")
    ho, wo = _check_conv(x_codes, "x_codes", w_packed, w_shape, w_bits, a_bits, stride, padding)
    return x_codes.new_empty((x_codes.shape[0], w_shape[0], ho, wo), dtype=torch.int32)


@torch.library.register_fake("qops::quantized_conv2d")
def _quantized_conv2d_fake(
    x, w_packed, w_shape, w_scale, a_scale, w_bits, a_bits, a_signed, bias, stride, padding
):
    _check_float_or_codes(x, a_signed)
    ho, wo = _check_conv(x, "x", w_packed, w_shape, w_bits, a_bits, stride, padding)
    _check_scales_and_bias(x, w_shape, w_scale, a_scale, bias, torch.float32)
    return x.new_empty((x.shape[0], w_shape[0], ho, wo), dtype=torch.float32)


def _check_float_or_codes(x, a_signed):
    codes = torch.int8 if a_signed else torch.uint8
    torch._check(
        x.dtype in (torch.float32, codes),
        lambda: (
            f"x: expected dtype float32 or activation codes "
            f"{'int8 (a_signed)' if a_signed else 'uint8 (unsigned)'}, got {x.dtype}"
        ),
    )


def _check_step(step: float, name: str) -> None:
    torch._check(
        math.isfinite(step) and step > 0, lambda: f"{name}: expected a positive finite step, got {step}"
    )
    f = _float32(step)
    torch._check(
        math.isfinite(f) and f > 0 and math.isfinite(_float32(1.0 / f)),
        lambda: (
            f"{name}: {step} is not a usable float32 step (its float32 value or inverse is 0 or infinite)"
        ),
    )


def _check_scales_and_bias(x, w_shape, w_scale, a_scale, bias, bias_dtype):
    _check_dtype(w_scale, torch.float32, "w_scale")
    _check_device(w_scale, "w_scale", x, "x")
    torch._check(
        w_scale.dim() <= 1 and (w_scale.numel() == w_shape[0] or w_scale.numel() == 1),
        lambda: f"w_scale: expected shape [Cout] = [{w_shape[0]}] or one element, got {tuple(w_scale.shape)}",
    )
    _check_step(a_scale, "a_scale")
    if bias is not None:
        _check_dtype(bias, bias_dtype, "bias")
        _check_device(bias, "bias", x, "x")
        torch._check(
            bias.dim() == 1 and bias.shape[0] == w_shape[0],
            lambda: f"bias: expected shape [{w_shape[0]}], got {tuple(bias.shape)}",
        )


def _codes_dtype(signed: bool) -> torch.dtype:
    return torch.int8 if signed else torch.uint8


@torch.library.register_fake("qops::requantized_conv2d")
def _requantized_conv2d_fake(
    x, w_packed, w_shape, w_scale, a_scale, w_bits, a_bits, a_signed, bias, stride, padding,
    out_scale, out_bits, out_signed, relu=False, pixel_shuffle=1,
):  # fmt: skip
    _check_float_or_codes(x, a_signed)
    ho, wo = _check_conv(x, "x", w_packed, w_shape, w_bits, a_bits, stride, padding)
    _check_scales_and_bias(x, w_shape, w_scale, a_scale, bias, torch.int32)
    _check_step(out_scale, "out_scale")
    _check_bits(out_bits, "out_bits")
    r = pixel_shuffle
    torch._check(
        1 <= r <= 8 and w_shape[0] % (r * r) == 0,
        lambda: (
            f"pixel_shuffle: expected a factor in 1..8 whose square divides the {w_shape[0]} output channels, "
            f"got {r}"
        ),
    )
    shape = (x.shape[0], w_shape[0] // (r * r), ho * r, wo * r)
    return x.new_empty(shape, dtype=_codes_dtype(out_signed))


@torch.library.register_fake("qops::requantize")
def _requantize_fake(x, scale, bits, signed, x_scale=None):
    if x.dtype == torch.float32:
        torch._check(x_scale is None, lambda: "x_scale: only codes (int8/uint8) have a step; x is float32")
    else:
        torch._check(
            x.dtype in (torch.int8, torch.uint8),
            lambda: f"x: expected dtype float32, or int8/uint8 codes with a step, got {x.dtype}",
        )
        torch._check(x_scale is not None, lambda: f"x_scale: codes need their step (x is {x.dtype})")
        _check_step(x_scale, "x_scale")
    _check_bits(bits, "bits")
    _check_step(scale, "scale")
    return torch.empty_like(x, dtype=_codes_dtype(signed), memory_format=torch.contiguous_format)


@torch.library.register_fake("qops::quantized_add")
def _quantized_add_fake(x, x_scale, y, y_scale, out_scale, out_bits, out_signed):
    _check_device(y, "y", x, "x")
    torch._check(
        x.shape == y.shape, lambda: f"y: expected the shape of x {tuple(x.shape)}, got {tuple(y.shape)}"
    )
    for t, name, step in ((x, "x", x_scale), (y, "y", y_scale)):
        torch._check(
            t.dtype in (torch.int8, torch.uint8),
            lambda t=t, name=name: f"{name}: expected dtype int8 or uint8 (codes), got {t.dtype}",
        )
        _check_step(step, f"{name}_scale")
    _check_step(out_scale, "out_scale")
    _check_bits(out_bits, "out_bits")
    return torch.empty_like(x, dtype=_codes_dtype(out_signed), memory_format=torch.contiguous_format)


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
