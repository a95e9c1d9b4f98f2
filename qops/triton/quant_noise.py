"""Triton implementation of quant_noise: the twin ``torch.ops.qops_triton.quant_noise`` (registered as every
Triton twin is, qops/triton/__init__.py).

Same signature and the same bits as ``torch.ops.qops.quant_noise`` (csrc/include/qops/philox.h):
Philox4x32-10 with key = the seed's 32-bit halves and counter = (group low, group high, stream, 0),
the same eps transforms evaluated with the same correctly rounded operations (``tl.fma``,
``tl.div_rn``, ``tl.sqrt_rn``; the default ``/`` and ``tl.sqrt`` are approximate on NVIDIA GPUs).
``tl.randint4x`` is not used: its counter has no stream word.

Three launches: per-slice partial min/max over a grid of splits, a deterministic second stage
that folds the partials of each slice into delta / 2, then the noise kernel (one Philox call per
group of four elements). On machines without a GPU the tests run it under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from qops.quant_noise import check_args, register_autograd
from qops.reference import QUANT_NOISE_STREAM
from qops.triton import register_twins

_MUL0: tl.constexpr = 0xD2511F53
_MUL1: tl.constexpr = 0xCD9E8D57
_WEYL0: tl.constexpr = 0x9E3779B9
_WEYL1: tl.constexpr = 0xBB67AE85
# The float32 constants of philox.h, exactly (hex literals; every one is a float32 value).
_F = float.fromhex
_LN3: tl.constexpr = _F("0x1.555556p-1")
_LN5: tl.constexpr = _F("0x1.99999ap-2")
_LN7: tl.constexpr = _F("0x1.24924ap-2")
_LN9: tl.constexpr = _F("0x1.c71c72p-3")
_LN11: tl.constexpr = _F("0x1.745d18p-3")
_LN2_HI: tl.constexpr = _F("0x1.62e4p-1")
_LN2_LO: tl.constexpr = _F("0x1.7f7d1cp-20")
_SIN1: tl.constexpr = _F("0x1.921fb6p+0")
_SIN3: tl.constexpr = _F("-0x1.4abbcep-1")
_SIN5: tl.constexpr = _F("0x1.466bc6p-4")
_SIN7: tl.constexpr = _F("-0x1.32d2ccp-8")
_SIN9: tl.constexpr = _F("0x1.507834p-13")
_COS2: tl.constexpr = _F("-0x1.3bd3ccp+0")
_COS4: tl.constexpr = _F("0x1.03c1f0p-2")
_COS6: tl.constexpr = _F("-0x1.55d3c8p-6")
_COS8: tl.constexpr = _F("0x1.e1f506p-11")
_COS10: tl.constexpr = _F("-0x1.a6d1f2p-16")
_TWO_M22: tl.constexpr = _F("0x1p-22")
_TWO_M23: tl.constexpr = _F("0x1p-23")
_TWO_M24: tl.constexpr = _F("0x1p-24")


@triton.jit
def _min_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _range_partial_kernel(
    x_ptr,
    part_lo_ptr,
    part_hi_ptr,
    slab,
    channels,
    inner,
    chunk,
    nsplit,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    """Program (c, s): min/max of elements [s*chunk, (s+1)*chunk) of slice c (slab = outer*inner)."""
    c = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    lo = tl.full([BLOCK], float("inf"), ACC)
    hi = tl.full([BLOCK], float("-inf"), ACC)
    start = s * chunk
    end = tl.minimum(start + chunk, slab)
    for j0 in range(start, end, BLOCK):
        j = j0 + tl.arange(0, BLOCK).to(tl.int64)
        mask = j < end
        offs = ((j // inner) * channels + c) * inner + j % inner
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        lo = _min_nan(lo, tl.where(mask, v, float("inf")))
        hi = _max_nan(hi, tl.where(mask, v, float("-inf")))
    tl.store(part_lo_ptr + c * nsplit + s, tl.reduce(lo, 0, _min_nan))
    tl.store(part_hi_ptr + c * nsplit + s, tl.reduce(hi, 0, _max_nan))


@triton.jit
def _half_delta_kernel(
    part_lo_ptr, part_hi_ptr, half_delta_ptr, nsplit, levels, SPLITS: tl.constexpr, ACC: tl.constexpr
):
    """Second stage, one program per slice, fixed order: half_delta = ((max - min) / levels) / 2, from the
    halves where max - min overflows (csrc/include/qops/quant_noise_math.h)."""
    c = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, SPLITS)
    mask = k < nsplit
    lo = tl.reduce(tl.load(part_lo_ptr + c * nsplit + k, mask=mask, other=float("inf")), 0, _min_nan)
    hi = tl.reduce(tl.load(part_hi_ptr + c * nsplit + k, mask=mask, other=float("-inf")), 0, _max_nan)
    d = hi - lo
    finite = (lo - lo == lo - lo) & (hi - hi == hi - hi)
    overflow = (d - d != d - d) & finite
    num = tl.where(overflow, hi * 0.5 - lo * 0.5, d)
    if ACC == tl.float32:
        q = tl.div_rn(num, tl.cast(levels, tl.float32))
    else:
        q = num / tl.cast(levels, ACC)
    tl.store(half_delta_ptr + c, tl.where(finite, tl.where(overflow, q, q * 0.5), d - d))


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, _MUL0)
        lo0 = c0 * _MUL0
        hi1 = tl.umulhi(c2, _MUL1)
        lo1 = c2 * _MUL1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + _WEYL0
        k1 = k1 + _WEYL1
    return c0, c1, c2, c3


@triton.jit
def _philox_log(u):
    """philox_log of philox.h: u = 2^e m, m in [2/3, 4/3), ln m = 2 atanh((m-1)/(m+1))."""
    ix = u.to(tl.uint32, bitcast=True)
    e = (ix - 0x3F2AAAAB).to(tl.int32, bitcast=True) >> 23
    m = (ix - (e.to(tl.uint32, bitcast=True) << 23)).to(tl.float32, bitcast=True)
    f = m - 1.0
    s = tl.div_rn(f, f + 2.0)
    z = s * s
    p = tl.fma(z, _LN11, _LN9)
    p = tl.fma(p, z, _LN7)
    p = tl.fma(p, z, _LN5)
    p = tl.fma(p, z, _LN3)
    ln_m = tl.fma(s * z, p, s + s)
    ef = e.to(tl.float32)
    return tl.fma(ef, _LN2_HI, tl.fma(ef, _LN2_LO, ln_m))


@triton.jit
def _philox_sincos_turn(w):
    """philox_sincos_turn of philox.h: (cos, sin)(2 pi u(w)), exact quarter-turn reduction."""
    a = (w >> 8) | 1
    q = (a + (1 << 21)) >> 22
    r = (a.to(tl.int32, bitcast=True) - (q << 22).to(tl.int32, bitcast=True)).to(tl.float32) * _TWO_M22
    x2 = r * r
    ps = tl.fma(x2, _SIN9, _SIN7)
    ps = tl.fma(ps, x2, _SIN5)
    ps = tl.fma(ps, x2, _SIN3)
    ps = tl.fma(ps, x2, _SIN1)
    sn = r * ps
    pc = tl.fma(x2, _COS10, _COS8)
    pc = tl.fma(pc, x2, _COS6)
    pc = tl.fma(pc, x2, _COS4)
    pc = tl.fma(pc, x2, _COS2)
    cs = tl.fma(pc, x2, 1.0)
    swap = (q & 1) != 0
    c = tl.where(swap, sn, cs)
    s = tl.where(swap, cs, sn)
    return tl.where(((q + 1) & 2) != 0, -c, c), tl.where((q & 2) != 0, -s, s)


@triton.jit
def _box_muller(w_radius, w_angle):
    u = ((w_radius >> 8) | 1).to(tl.float32) * _TWO_M24
    radius = tl.sqrt_rn(-2.0 * _philox_log(u))
    c, s = _philox_sincos_turn(w_angle)
    return radius * c, radius * s


@triton.jit
def _signed_unit(w):
    return ((w >> 8) | 1).to(tl.float32) * _TWO_M23 - 1.0  # both operations exact


@triton.jit(do_not_specialize=["numel", "channels", "inner", "key0", "key1", "stream"])
def _noise_kernel(
    x_ptr,
    y_ptr,
    half_delta_ptr,
    numel,
    channels,
    inner,
    key0,
    key1,
    stream,
    GAUSSIAN: tl.constexpr,
    GROUPS: tl.constexpr,
    ACC: tl.constexpr,
):
    """GROUPS groups of four elements per program; element 4g + j takes word j of group g."""
    g = tl.program_id(0).to(tl.int64) * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    c0 = (g & 0xFFFFFFFF).to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    c2 = tl.full([GROUPS], 0, tl.uint32) + tl.cast(stream, tl.uint32)
    c3 = tl.zeros([GROUPS], tl.uint32)
    r0, r1, r2, r3 = _philox4x32_10(c0, c1, c2, c3, tl.cast(key0, tl.uint32), tl.cast(key1, tl.uint32))
    if GAUSSIAN:
        z0, z1 = _box_muller(r0, r1)
        z2, z3 = _box_muller(r2, r3)
    else:
        z0 = _signed_unit(r0)
        z1 = _signed_unit(r1)
        z2 = _signed_unit(r2)
        z3 = _signed_unit(r3)
    # join stacks on a new last axis: [g, a, b] = z_(2a + b), row-major = element 4g + j.
    eps = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [4 * GROUPS])
    idx = tl.program_id(0).to(tl.int64) * (4 * GROUPS) + tl.arange(0, 4 * GROUPS).to(tl.int64)
    mask = idx < numel
    x = tl.load(x_ptr + idx, mask=mask, other=0.0)
    xa = x.to(ACC)
    hd = tl.load(half_delta_ptr + (idx // inner) % channels, mask=mask, other=0.0)
    y = tl.where(hd == 0, xa, tl.fma(hd, eps.to(ACC), xa))
    tl.store(y_ptr + idx, y.to(x.dtype), mask=mask)


_BLOCK = 1024
_GROUPS = 256


def quant_noise_impl(
    x: torch.Tensor, bits: int, seed: int, axis: int = -1, dist: str = "gaussian"
) -> torch.Tensor:
    """Triton twin of torch.ops.qops.quant_noise (see qops.quant_noise for the semantics)."""
    check_args(x, bits, axis, dist)
    dim = x.dim()
    xc = x.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    numel = x.numel()
    if numel == 0:
        return y
    if axis == -1:
        outer, channels, inner = 1, 1, numel
    else:
        ax = axis % dim
        outer = 1
        for d in range(ax):
            outer *= x.shape[d]
        channels = x.shape[ax]
        inner = numel // (outer * channels)
    acc_torch = torch.float64 if x.dtype == torch.float64 else torch.float32
    acc = tl.float64 if acc_torch == torch.float64 else tl.float32
    slab = outer * inner
    nsplit = max(1, min(256, triton.cdiv(slab, 4 * _BLOCK)))
    chunk = triton.cdiv(slab, nsplit)
    part_lo = torch.empty((channels, nsplit), dtype=acc_torch, device=x.device)
    part_hi = torch.empty_like(part_lo)
    half_delta = torch.empty(channels, dtype=acc_torch, device=x.device)
    wrap_triton(_range_partial_kernel)[(channels, nsplit)](
        xc, part_lo, part_hi, slab, channels, inner, chunk, nsplit, BLOCK=_BLOCK, ACC=acc
    )
    wrap_triton(_half_delta_kernel)[(channels,)](
        part_lo,
        part_hi,
        half_delta,
        nsplit,
        float(2**bits - 1),
        SPLITS=triton.next_power_of_2(nsplit),
        ACC=acc,
    )
    s = seed & 0xFFFFFFFFFFFFFFFF
    wrap_triton(_noise_kernel)[(triton.cdiv(numel, 4 * _GROUPS),)](
        xc,
        y,
        half_delta,
        numel,
        channels,
        inner,
        s & 0xFFFFFFFF,
        s >> 32,
        QUANT_NOISE_STREAM,
        GAUSSIAN=dist == "gaussian",
        GROUPS=_GROUPS,
        ACC=acc,
    )
    return y


TWINS = register_twins(register_autograd, {"quant_noise": quant_noise_impl})
