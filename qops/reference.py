"""Pure-torch references of every torch.ops.qops op: the specification the tests compare against.

Each function has the op's signature (csrc/ops.cpp) and defines its semantics; it is written
for clarity, not speed. Where torch has a built-in with the same meaning (LSQ fake quantization), the
reference is that built-in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .packed import unpack_weight
from .ranges import quant_range

if TYPE_CHECKING:
    from qops.mixed_quant_conv import MixedQuantConvSpec


def _per_channel_axis(x: torch.Tensor, axis: int) -> int:
    if not -x.dim() <= axis < x.dim():
        raise RuntimeError(f"axis: {axis} is out of range for a tensor with {x.dim()} dimensions")
    return axis % x.dim()


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int,
    quant_min: int,
    quant_max: int,
    grad_factor: float = 1.0,
) -> torch.Tensor:
    """LSQ fake quantization (Esser et al., "Learned Step Size Quantization", ICLR 2020) as torch's
    built-ins compute it: ``torch._fake_quantize_learnable_per_tensor_affine`` for ``axis == -1``
    (``scale`` / ``zero_point`` with one element), ``..._per_channel_affine`` along ``axis`` otherwise
    (other negative axes count from the end; the last axis per channel is ``x.dim() - 1``).

    y = (clamp(zp + round(x * (1/s)), quant_min, quant_max) - zp) * s with round half to even and
    zp = clamp(round(zero_point)). float16/bfloat16 inputs are computed in float32 and rounded back.
    """
    dtype = x.dtype
    xf = x.float()
    s = scale.detach().float().reshape(-1)
    z = zero_point.detach().float().reshape(-1)
    if axis == -1:
        y = torch._fake_quantize_learnable_per_tensor_affine(xf, s, z, quant_min, quant_max, grad_factor)
    else:
        axis = _per_channel_axis(x, axis)
        y = torch._fake_quantize_learnable_per_channel_affine(
            xf, s, z, axis, quant_min, quant_max, grad_factor
        )
    return y.to(dtype)


def fake_quant_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int,
    quant_min: int,
    quant_max: int,
    grad_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_scale, grad_zero_point) of :func:`fake_quant` as torch's built-in backward ops compute
    them (``torch.ops.aten._fake_quantize_learnable_per_{tensor,channel}_affine_backward``).

    Two quirks of the built-ins are corrected so that the reference states the intended semantics:
    an empty ``x`` gives zero grad_scale / grad_zero_point (the per-tensor built-in returns scale and
    zero_point themselves), and a 1-D ``x`` per channel gives one gradient per channel (the per-channel
    built-in sums over no dimension, which torch reads as "all dimensions"). Gradients come back in the
    dtypes and shapes of ``x``, ``scale`` and ``zero_point``.
    """
    gf = grad.float()
    xf = x.float()
    s = scale.detach().float().reshape(-1)
    z = zero_point.detach().float().reshape(-1)
    if x.numel() == 0:
        dx = torch.zeros_like(xf)
        ds, dz = torch.zeros_like(s), torch.zeros_like(z)
    elif axis == -1:
        dx, ds, dz = torch.ops.aten._fake_quantize_learnable_per_tensor_affine_backward(
            gf, xf, s, z, quant_min, quant_max, grad_factor
        )
    else:
        axis = _per_channel_axis(x, axis)
        if x.dim() == 1:
            gf, xf = gf.unsqueeze(1), xf.unsqueeze(1)
        dx, ds, dz = torch.ops.aten._fake_quantize_learnable_per_channel_affine_backward(
            gf, xf, s, z, axis, quant_min, quant_max, grad_factor
        )
        dx = dx.reshape(x.shape)
    return (
        dx.to(x.dtype),
        ds.reshape(scale.shape).to(scale.dtype),
        dz.reshape(zero_point.shape).to(zero_point.dtype),
    )


# ---------------------------------------------------------------------------------------------
# quant_noise: Philox4x32-10 noise, bit for bit as csrc/include/qops/philox.h defines it.
# uint32 arithmetic is emulated on int64 tensors (values kept in [0, 2^32)); float32 arithmetic is
# torch's, which rounds every + - * / sqrt correctly; the fused multiply-adds of the header are
# emulated exactly (fma_f32), so the reference reproduces the kernels' floats exactly.

_U32 = 0xFFFFFFFF
_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
_PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)
NOISE_DISTS = ("gaussian", "uniform")
QUANT_NOISE_STREAM = 0  # the stream word of torch.ops.qops.quant_noise (philox.h kQuantNoiseStream)


def _mulhilo32(m: int, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of the 64-bit product m * a, a an int64 tensor in [0, 2^32).
    m is split into 16-bit halves so that no partial product leaves int64."""
    p_lo = a * (m & 0xFFFF)  # < 2^48
    p_hi = a * (m >> 16)  # < 2^48; the product is p_hi * 2^16 + p_lo
    t = p_lo + ((p_hi & 0xFFFF) << 16)  # low 48 bits, with carry
    return (p_hi >> 16) + (t >> 32), t & _U32


def philox4x32_10(counter: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Random123's Philox4x32-10 block function. counter: int64 tensor [..., 4] of uint32 words;
    key: two uint32 words. Returns the four output words as int64 [..., 4] in [0, 2^32)."""
    c0, c1, c2, c3 = (counter[..., i].to(torch.int64) & _U32 for i in range(4))
    k0, k1 = key[0] & _U32, key[1] & _U32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_MUL[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_MUL[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_WEYL[0]) & _U32
        k1 = (k1 + _PHILOX_WEYL[1]) & _U32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def philox_bits(seed: int, stream: int, groups: torch.Tensor) -> torch.Tensor:
    """The raw words [..., 4] of the given groups (elements 4g..4g+3): key = the seed's two 32-bit
    halves (two's complement), counter = (g low, g high, stream, 0)."""
    s = seed & 0xFFFFFFFFFFFFFFFF
    g = groups.to(torch.int64)
    counter = torch.stack([g & _U32, g >> 32, torch.full_like(g, stream & _U32), torch.zeros_like(g)], dim=-1)
    return philox4x32_10(counter, (s & _U32, s >> 32))


def fma_f32(a, b, c) -> torch.Tensor:
    """Correctly rounded float32 a*b + c (one rounding), like fmaf / __fmaf_rn / tl.fma.
    The product is exact in float64; the float64 sum is made round-to-odd (exact error by TwoSum),
    which rounds correctly to float32 afterwards (53 >= 2*24 + 2 bits)."""
    a, b, c = (torch.as_tensor(v, dtype=torch.float32).to(torch.float64) for v in (a, b, c))
    p = a * b
    s = p + c
    bv = s - p
    err = (p - (s - bv)) + (c - bv)
    bits = s.view(torch.int64)
    even = (bits & 1) == 0
    away = (s > 0) == (err > 0)  # the exact value lies farther from zero than s
    bits = torch.where((err != 0) & even, bits + torch.where(away, 1, -1), bits)
    return bits.view(torch.float64).to(torch.float32)


def sqrt_f32(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (IEEE sqrtf, __fsqrt_rn, tl.sqrt_rn). torch.sqrt on
    float32 CPU tensors is not always correctly rounded (about 1 in 30 results is 1 ulp off), so
    round the float64 root and correct it by comparing x with the squares of the midpoints to the
    neighbouring floats (exact in float64: a midpoint has 25 significant bits)."""
    xd = x.to(torch.float64)
    r = torch.sqrt(xd).to(torch.float32)
    up = torch.nextafter(r, torch.tensor(float("inf")))
    down = torch.nextafter(r, torch.tensor(0.0))
    mid_up = (r.double() + up.double()) * 0.5
    mid_down = (r.double() + down.double()) * 0.5
    r = torch.where(mid_up * mid_up <= xd, up, r)
    return torch.where((r > 0) & (mid_down * mid_down > xd), down, r)


def div_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 a / b: the float64 quotient rounds correctly to float32
    (53 >= 2*24 + 2), whatever torch's float32 division kernel does."""
    return (a.to(torch.float64) / b.to(torch.float64)).to(torch.float32)


_F = float.fromhex
_LN = [
    _F("0x1.745d18p-3"),
    _F("0x1.c71c72p-3"),
    _F("0x1.24924ap-2"),
    _F("0x1.99999ap-2"),
    _F("0x1.555556p-1"),
]
_LN2_HI, _LN2_LO = _F("0x1.62e4p-1"), _F("0x1.7f7d1cp-20")
_SIN = [
    _F("0x1.507834p-13"),
    _F("-0x1.32d2ccp-8"),
    _F("0x1.466bc6p-4"),
    _F("-0x1.4abbcep-1"),
    _F("0x1.921fb6p+0"),
]
_COS = [
    _F("-0x1.a6d1f2p-16"),
    _F("0x1.e1f506p-11"),
    _F("-0x1.55d3c8p-6"),
    _F("0x1.03c1f0p-2"),
    _F("-0x1.3bd3ccp+0"),
]


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def _philox_unit(w: torch.Tensor) -> torch.Tensor:
    """u(w) = ((w >> 8) | 1) * 2^-24 in (0, 1), exact."""
    return ((w >> 8) | 1).to(torch.float32) * _F("0x1p-24")


def _philox_log(u: torch.Tensor) -> torch.Tensor:
    """ln u as philox_log in philox.h: u = 2^e m, m in [2/3, 4/3), 2 atanh((m-1)/(m+1))."""
    ix = u.view(torch.int32).to(torch.int64)
    e = (ix - 0x3F2AAAAB) >> 23
    m = (ix - e * (1 << 23)).to(torch.int32).view(torch.float32)
    f = m - 1.0
    s = div_f32(f, f + 2.0)
    z = s * s
    p = fma_f32(_f32(_LN[0]), z, _f32(_LN[1]))
    for coef in _LN[2:]:
        p = fma_f32(p, z, _f32(coef))
    ln_m = fma_f32(s * z, p, s + s)
    ef = e.to(torch.float32)
    return fma_f32(ef, _f32(_LN2_HI), fma_f32(ef, _f32(_LN2_LO), ln_m))


def _philox_sincos_turn(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin)(2 pi u(w)) as philox_sincos_turn in philox.h."""
    a = (w >> 8) | 1
    q = (a + (1 << 21)) >> 22
    r = (a - (q << 22)).to(torch.float32) * _F("0x1p-22")
    x2 = r * r
    ps = fma_f32(_f32(_SIN[0]), x2, _f32(_SIN[1]))
    for coef in _SIN[2:]:
        ps = fma_f32(ps, x2, _f32(coef))
    sn = r * ps
    pc = fma_f32(_f32(_COS[0]), x2, _f32(_COS[1]))
    for coef in _COS[2:]:
        pc = fma_f32(pc, x2, _f32(coef))
    cs = fma_f32(pc, x2, _f32(1.0))
    swap = (q & 1) != 0
    c = torch.where(swap, sn, cs)
    s = torch.where(swap, cs, sn)
    return torch.where(((q + 1) & 2) != 0, -c, c), torch.where((q & 2) != 0, -s, s)


def philox_noise(
    numel: int, seed: int, stream: int = QUANT_NOISE_STREAM, dist: str = "gaussian", offset: int = 0
) -> torch.Tensor:
    """eps of the elements offset .. offset+numel-1 of (seed, stream) as float32 [numel]: the noise
    quant_noise adds (before scaling by delta/2). Gaussian: Box-Muller on the word pairs (0, 1) and
    (2, 3) of each group of four elements; uniform: 2u - 1 per word. csrc/include/qops/philox.h has
    the exact definition."""
    if dist not in NOISE_DISTS:
        raise ValueError(f"dist: expected one of {NOISE_DISTS}, got {dist!r}")
    first, last = offset // 4, (offset + numel + 3) // 4
    r = philox_bits(seed, stream, torch.arange(first, last, dtype=torch.int64))
    if dist == "uniform":
        eps = ((r >> 8) | 1).to(torch.float32) * _F("0x1p-23") - 1.0
    else:
        z = []
        for pair in (0, 2):
            radius = sqrt_f32(-2.0 * _philox_log(_philox_unit(r[:, pair])))
            c, s = _philox_sincos_turn(r[:, pair + 1])
            z += [radius * c, radius * s]
        eps = torch.stack(z, dim=-1)
    start = offset - 4 * first
    return eps.reshape(-1)[start : start + numel]


def quant_noise_half_delta(lo: torch.Tensor, hi: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """delta / 2 = ((hi - lo) / levels) / 2 in lo's dtype (float32 correctly rounded), as
    csrc/include/qops/quant_noise_math.h computes it: where finite bounds are more than the dtype's largest
    value apart (hi - lo overflows), from the halves (hi/2 - lo/2) / levels, the unbounded-exponent value;
    NaN where a bound is NaN or infinite (the slice has no finite range: all its outputs are NaN)."""
    d = hi - lo
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    overflow = torch.isinf(d) & finite
    num = torch.where(overflow, hi * 0.5 - lo * 0.5, d)
    q = div_f32(num, levels) if lo.dtype == torch.float32 else num / levels
    return torch.where(finite, torch.where(overflow, q, q * 0.5), torch.full_like(q, float("nan")))


def quant_noise(
    x: torch.Tensor,
    bits: int,
    seed: int,
    axis: int = -1,
    dist: str = "gaussian",
    *,
    stream: int = QUANT_NOISE_STREAM,
) -> torch.Tensor:
    """Quantization noise (QuantNAS, arXiv:2210.17512): y = x + delta * eps / 2 with
    delta = (max - min) / (2^bits - 1) over the tensor (axis = -1) or per index of `axis`, eps ~ N(0, 1)
    or U(-1, 1) from philox_noise(x.numel(), seed, stream, dist) in x's logical row-major order.
    delta = 0 leaves x unchanged. Computed in float32 (float64 for float64 x) and rounded to x's dtype.
    `stream` is not part of the op: it lets other references (mixed_quant_conv, mode "noise")
    reproduce kernels that draw from other streams of the same seed."""
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.detach().to(device="cpu", dtype=acc)
    if x.numel() == 0:
        return x.detach().clone()
    if axis == -1:
        lo, hi = torch.aminmax(xf)
    else:
        ax = axis % x.dim()
        moved = xf.movedim(ax, 0).reshape(x.shape[ax], -1)
        lo, hi = torch.aminmax(moved, dim=1)
        view = [1] * x.dim()
        view[ax] = x.shape[ax]
        lo, hi = lo.view(view), hi.view(view)
    half_delta = quant_noise_half_delta(lo, hi, torch.tensor(2**bits - 1, dtype=acc))
    eps = philox_noise(x.numel(), seed, stream, dist).view(x.shape)
    if acc == torch.float32:
        y = fma_f32(half_delta.expand(x.shape), eps, xf)
    else:  # float64: not fused, so within an ulp of the kernels' fma
        y = half_delta * eps.to(acc) + xf
    y = torch.where(half_delta == 0, xf, y)
    return y.to(device=x.device, dtype=x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Bit-packed low-bit convolution (pack_weight, packed_conv2d, quantized_conv2d, requantized_conv2d) and the
# element-wise code ops of the integer pipeline (requantize, quantized_add): the packed layout of
# csrc/include/qops/packed_layout.h written with tensor ops, convolutions computed exactly in float64, float32
# steps emulated exactly (fma_f32).


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
    lo, hi = quant_range(a_bits, a_signed)
    inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(a_scale, dtype=torch.float32)
    codes = torch.clamp(torch.round(x.to(torch.float32) * inv.to(x.device)), lo, hi)
    return torch.where(torch.isnan(codes), lo, codes)  # NaN is below the range, as in fake_quant


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
    """quantize x (float32; codes are taken as they are), exact integer convolution,
    out = acc * (w_scale[c] * a_scale) + bias[c] (float64, then float32)."""
    codes = x if x.dtype != torch.float32 else quantize_activation(x, a_scale, a_bits, a_signed)
    w = unpack_weight(w_packed, w_shape, w_bits).to(torch.float64)
    acc = torch.nn.functional.conv2d(codes.to(torch.float64), w, stride=tuple(stride), padding=tuple(padding))
    scale = (w_scale.to(torch.float32) * torch.tensor(a_scale, dtype=torch.float32)).to(torch.float64)
    out = acc * scale.reshape(1, -1, 1, 1).expand(1, w_shape[0], 1, 1)
    if bias is not None:
        out = out + bias.to(torch.float64).reshape(1, -1, 1, 1)
    return out.to(torch.float32)


def _codes_of(v: torch.Tensor, scale: float, bits: int, signed: bool) -> torch.Tensor:
    """fake_quant's codes of float32 values v: clamp(nearbyint(v * (1/scale))), NaN to the bottom of the range,
    as int8 (signed) or uint8."""
    return quantize_activation(v, scale, bits, signed).to(torch.int8 if signed else torch.uint8)


def _values(codes: torch.Tensor, scale: float) -> torch.Tensor:
    """What fake_quant returns for these codes: code * scale in float32."""
    return codes.to(torch.float32) * torch.tensor(scale, dtype=torch.float32)


def requantized_conv2d(
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
    out_scale: float,
    out_bits: int,
    out_signed: bool,
    relu: bool = False,
    pixel_shuffle: int = 1,
) -> torch.Tensor:
    """The next layer's codes (pixel-shuffled by ``pixel_shuffle``): y = fma(acc, step[c], bias[c] * step[c]) rounded once to float32 (step = w_scale[c]
    * a_scale and the bias product in float32, as the packed runtime forms them), relu if asked, then the codes
    of y at out_scale (:func:`requantize`). x: float32 (quantized as in :func:`quantized_conv2d`) or codes."""
    codes = x if x.dtype != torch.float32 else quantize_activation(x, a_scale, a_bits, a_signed)
    w = unpack_weight(w_packed, w_shape, w_bits).to(torch.float64)
    acc = torch.nn.functional.conv2d(codes.to(torch.float64), w, stride=tuple(stride), padding=tuple(padding))
    step = (w_scale.to(torch.float32) * torch.tensor(a_scale, dtype=torch.float32)).expand(w_shape[0])
    b = torch.zeros_like(step) if bias is None else bias.to(torch.float32) * step
    y = fma_f32(acc.to(torch.float32), step.reshape(1, -1, 1, 1), b.reshape(1, -1, 1, 1))
    if relu:
        y = torch.relu(y)
    return torch.nn.functional.pixel_shuffle(_codes_of(y, out_scale, out_bits, out_signed), pixel_shuffle)


def requantize(
    x: torch.Tensor, scale: float, bits: int, signed: bool, x_scale: float | None = None
) -> torch.Tensor:
    """fake_quant's codes at step ``scale`` of x (float32) or of x's codes times x_scale."""
    v = x if x.dtype == torch.float32 else _values(x, x_scale)
    return _codes_of(v, scale, bits, signed)


def quantized_add(
    x: torch.Tensor,
    x_scale: float,
    y: torch.Tensor,
    y_scale: float,
    out_scale: float,
    out_bits: int,
    out_signed: bool,
) -> torch.Tensor:
    """Q_out(Q_x(a) + Q_y(b)) on codes: the float32 sum of the two operands' values, requantized."""
    return _codes_of(_values(x, x_scale) + _values(y, y_scale), out_scale, out_bits, out_signed)


def mixed_quant_conv(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    probs: torch.Tensor,
    w_scales: torch.Tensor,
    a_scales: torch.Tensor,
    bias: torch.Tensor | None,
    spec: MixedQuantConvSpec,
    seed: int = 0,
    *,
    terms=None,
) -> torch.Tensor:
    """The QuantNAS supernet layer written as its definition (Shvetsov et al., "QuantNAS for super
    resolution: searching for efficient quantization-friendly architectures against quantization
    noise"): the probability-weighted sum of every (operation, weight bits, activation bits) term,

        y = sum_{o,i,j} probs[o,i,j] * conv_o(FQa_j(x), FQw_i(weights[o])) + bias,

    with FQ the LSQ fake quantization (torch's learnable fake quantize, zero point 0), weights signed
    and activations unsigned or signed in their :func:`qops.quant_range`, bits 0 = full precision, "same"
    padding dilation*(k-1)/2 per side; arguments as :func:`qops.mixed_quant_conv.mixed_quant_conv`. Mode "noise"
    replaces each FQ by :func:`quant_noise` (gaussian) of the call's seed on the streams of
    :func:`mixed_quant_conv_noise_streams`. ``terms`` (nested [o][i][j] booleans, default all) limits the sum to
    those terms: the naive loop over the non-zero terms (tied bit-widths) that qops.nn and the benchmarks use as
    the baseline.
    """
    w_bits, a_bits, a_signed, groups, dilations = (
        spec.w_bits,
        spec.a_bits,
        spec.a_signed,
        spec.groups,
        spec.dilations,
    )
    stride, mode = spec.stride, spec.mode
    if mode not in ("quant", "noise"):
        raise RuntimeError(f'mode: expected "quant" or "noise", got "{mode}"')
    a_streams, w_streams = mixed_quant_conv_noise_streams(len(weights), len(w_bits), len(a_bits))

    def fq(t, scale, bits, signed, stream):
        if bits == 0:
            return t
        if mode == "noise":
            # The kernels add noise without differentiating through the range: identity gradient.
            return t + (quant_noise(t, bits, seed, stream=stream) - t).detach()
        qmin, qmax = quant_range(bits, signed)
        zero_point = torch.zeros(1, dtype=torch.float32, device=t.device)
        return torch._fake_quantize_learnable_per_tensor_affine(
            t, scale.reshape(1), zero_point, qmin, qmax, 1.0
        )

    xq = [fq(x, a_scales[j], b, a_signed, a_streams[j]) for j, b in enumerate(a_bits)]
    y = None
    for o, w in enumerate(weights):
        d = dilations[o]
        padding = (d * (w.shape[2] - 1) // 2, d * (w.shape[3] - 1) // 2)
        for i, wb in enumerate(w_bits):
            wq = None
            for j in range(len(a_bits)):
                if terms is not None and not terms[o][i][j]:
                    continue
                if wq is None:
                    wq = fq(w, w_scales[o, i], wb, True, w_streams[o][i])
                term = probs[o, i, j] * torch.nn.functional.conv2d(
                    xq[j], wq, None, stride, padding, d, groups[o]
                )
                y = term if y is None else y + term
    if y is None:  # every term skipped: the sum is 0
        n, _, h, w_ = x.shape
        y = x.new_zeros(n, weights[0].shape[0], (h - 1) // stride + 1, (w_ - 1) // stride + 1)
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1)
    return y


def mixed_quant_conv_noise_streams(n_ops: int, n_w_bits: int, n_a_bits: int):
    """Philox streams (csrc/include/qops/philox.h) of mixed_quant_conv's noise mode: every noise tensor of a
    call draws from the call's seed on its own stream, 1 + j for activation variant j and
    1 + n_a_bits + o * n_w_bits + i for weight o at weight bit-width i (stream 0 is quant_noise's own;
    csrc/include/qops/mixed_quant_conv.h, mqc_act_stream / mqc_weight_stream). Returns (a_streams[j], w_streams[o][i])."""
    a_streams = [1 + j for j in range(n_a_bits)]
    w_streams = [[1 + n_a_bits + o * n_w_bits + i for i in range(n_w_bits)] for o in range(n_ops)]
    return a_streams, w_streams
