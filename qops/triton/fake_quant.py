"""Triton kernels of LSQ fake quantization: the twins ``torch.ops.qops_triton.fake_quant`` / ``fake_quant_backward``
(registered as every Triton twin is, qops/triton/__init__.py).

Same semantics, signatures and results as ``torch.ops.qops.fake_quant`` (docs/FAKE_QUANT.md): forward and
grad_x bit for bit, grad_scale / grad_zero_point to float32 rounding.

Numerics: every launch passes ``enable_fp_fusion=False`` so the compiler forms no FMA by itself; the two
FMAs of the built-in's backward are explicit (``tl.fma``). Rounding half to even is written with floor so
that it runs under the interpreter too (TRITON_INTERPRET=1; libdevice does not). The backward writes one
partial sum triple per program (channel c, split k) and reduces them in float64 with torch, in a fixed order.
Non-positive or non-finite scales and non-finite zero points are not reported here (that would need a
device-to-host sync): the outputs are NaN instead.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from qops.fake_quant import check_args, check_grad, register_autograd
from qops.triton import register_twins

_BLOCK = 1024
_TARGET_PROGRAMS = 512  # backward programs to aim for (fills a GPU; few enough for the interpreter)


@triton.jit
def _round_half_even(v):
    f = tl.floor(v)
    d = v - f  # exact
    odd = (f - 2.0 * tl.floor(0.5 * f)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)  # NaN stays NaN, +-inf stay
    return tl.where(up, f + 1.0, f)


@triton.jit
def _fq_forward_kernel(
    x_ptr, y_ptr, scale_ptr, inv_ptr, zp_ptr, numel, channels, inner, qmin, qmax,
    PER_CHANNEL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PER_CHANNEL:
        c = (offs // inner) % channels
        s = tl.load(scale_ptr + c, mask=mask, other=1.0)
        inv = tl.load(inv_ptr + c, mask=mask, other=1.0)
        zp = tl.load(zp_ptr + c, mask=mask, other=0.0)
    else:
        s = tl.load(scale_ptr)
        inv = tl.load(inv_ptr)
        zp = tl.load(zp_ptr)
    q = _round_half_even(x * inv) + zp
    q = tl.where(q >= qmin, q, qmin)  # NaN -> qmin, like the built-in
    q = tl.where(q > qmax, qmax, q)
    y = (q - zp) * s
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fq_backward_kernel(
    dy_ptr, x_ptr, dx_ptr, part_ptr, scale_ptr, inv_ptr, zp_ptr, outer, channels, inner, span, qmin, qmax,
    BLOCK: tl.constexpr,
):  # fmt: skip
    # Program (c, k): elements m in [k * span, (k + 1) * span) of channel c, m = row * inner + column.
    c = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    splits = tl.num_programs(1)
    s = tl.load(scale_ptr + c)
    inv = tl.load(inv_ptr + c)
    zp = tl.load(zp_ptr + c)
    count = outer * inner
    row_len = channels * inner
    acc_in = tl.zeros([BLOCK], dtype=tl.float32)
    acc_lo = tl.zeros([BLOCK], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, span, BLOCK):
        m = k * span + start + tl.arange(0, BLOCK)
        mask = m < count
        e = (m // inner) * row_len + c * inner + (m % inner)
        x = tl.load(x_ptr + e, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + e, mask=mask, other=0.0).to(tl.float32)  # padding adds exact zeros
        q = _round_half_even(tl.fma(x, inv, zp))
        at_least_min = q >= qmin  # False for NaN: below, like the built-in
        above = q > qmax
        inside = at_least_min & (q <= qmax)
        y_minus_x = tl.fma(q - zp, s, -x)
        acc_in += tl.where(inside, dy * y_minus_x, 0.0)
        acc_lo += tl.where(at_least_min, 0.0, dy)
        acc_hi += tl.where(above, dy, 0.0)
        dx = dy * tl.where(inside, 1.0, 0.0)
        tl.store(dx_ptr + e, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    part = part_ptr + (c * splits + k) * 3
    tl.store(part, tl.sum(acc_in, axis=0))
    tl.store(part + 1, tl.sum(acc_lo, axis=0))
    tl.store(part + 2, tl.sum(acc_hi, axis=0))


def _as_float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def is_non_overlapping_and_dense(t: Tensor) -> bool:
    """Whether t's elements fill its memory span exactly (any permutation of a contiguous layout)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _dense(x: Tensor) -> Tensor:
    return x if is_non_overlapping_and_dense(x) else torch.empty_like(x).copy_(x)


def _in_layout_of(t: Tensor, like: Tensor) -> Tensor:
    same = is_non_overlapping_and_dense(t) and all(
        size <= 1 or a == b for size, a, b in zip(like.shape, t.stride(), like.stride(), strict=True)
    )
    return t if same else torch.empty_like(like).copy_(t)


def _layout(dense_x: Tensor, dim_axis: int) -> tuple[int, int, int]:
    """[outer, channels, inner] of dense_x in memory order (see csrc/include/qops/fake_quant_args.h)."""
    if dim_axis == -1 or dense_x.shape[dim_axis] == 1:
        return 1, 1, dense_x.numel()
    channels, inner = dense_x.shape[dim_axis], dense_x.stride(dim_axis)
    return dense_x.numel() // (channels * inner), channels, inner


def _qparams(
    scale: Tensor, zero_point: Tensor, per_channel: bool, backward: bool, quant_min: int, quant_max: int
):
    s = scale.detach().float().reshape(-1)
    z = zero_point.detach().float().reshape(-1)
    # No host sync to report them: a bad scale or a non-finite zero point gives NaN outputs (the CPU raises).
    s = torch.where((s > 0) & torch.isfinite(s) & torch.isfinite(z), s, torch.full_like(s, float("nan")))
    inv = 1.0 / s
    if backward and not per_channel:  # the per-tensor built-in backward: trunc(clamp(zp + 0.5))
        z = torch.trunc(torch.clamp(z + 0.5, quant_min, quant_max))
    else:
        z = torch.clamp(torch.round(z), quant_min, quant_max)
    return s.contiguous(), inv.contiguous(), z.contiguous()


def fake_quant_impl(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    axis: int,
    quant_min: int,
    quant_max: int,
    grad_factor: float = 1.0,
) -> Tensor:
    """The Triton forward (any device Triton runs on: CUDA, or CPU under TRITON_INTERPRET=1)."""
    dim_axis = check_args(x, scale, zero_point, axis, quant_min, quant_max)
    dense_x = _dense(x)
    y = torch.empty_like(dense_x)
    if x.numel() == 0:
        return y
    outer, channels, inner = _layout(dense_x, dim_axis)
    s, inv, z = _qparams(scale, zero_point, dim_axis != -1, False, quant_min, quant_max)
    grid = (triton.cdiv(x.numel(), _BLOCK),)
    wrap_triton(_fq_forward_kernel)[grid](
        dense_x, y, s, inv, z, x.numel(), channels, inner, float(quant_min), float(quant_max),
        PER_CHANNEL=channels > 1, BLOCK=_BLOCK, enable_fp_fusion=False,
    )  # fmt: skip
    return y


def fake_quant_backward_impl(
    grad: Tensor,
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    axis: int,
    quant_min: int,
    quant_max: int,
    grad_factor: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The Triton backward: one pass writing grad_x and per-program partial sums, then a float64 reduction."""
    dim_axis = check_args(x, scale, zero_point, axis, quant_min, quant_max)
    check_grad(grad, x)
    dense_x = _dense(x)
    grad_x = torch.empty_like(dense_x)
    if x.numel() == 0:
        return (
            grad_x,
            torch.zeros_like(scale, memory_format=torch.contiguous_format),
            torch.zeros_like(zero_point, memory_format=torch.contiguous_format),
        )
    dense_grad = _in_layout_of(grad, dense_x)
    outer, channels, inner = _layout(dense_x, dim_axis)
    s, inv, z = _qparams(scale, zero_point, dim_axis != -1, True, quant_min, quant_max)
    count = outer * inner
    splits = max(1, min(triton.cdiv(_TARGET_PROGRAMS, channels), triton.cdiv(count, _BLOCK), 65535))
    span = triton.cdiv(triton.cdiv(count, splits), _BLOCK) * _BLOCK
    splits = triton.cdiv(count, span)
    partials = torch.empty((channels, splits, 3), device=x.device, dtype=torch.float32)
    wrap_triton(_fq_backward_kernel)[(channels, splits)](
        dense_grad, dense_x, grad_x, partials, s, inv, z, outer, channels, inner, span,
        float(quant_min), float(quant_max), BLOCK=_BLOCK, enable_fp_fusion=False,
    )  # fmt: skip
    sums = partials.double().sum(dim=1)
    sum_inside, sum_below, sum_above = sums.unbind(dim=1)
    gf = _as_float32(grad_factor)
    zd = z.double()
    grad_scale = (
        sum_inside * inv.double() + sum_below * (quant_min - zd) + sum_above * (quant_max - zd)
    ) * gf
    grad_zero_point = -(sum_below + sum_above) * s.double() * gf
    return (
        grad_x,
        grad_scale.to(scale.dtype).reshape(scale.shape),
        grad_zero_point.to(zero_point.dtype).reshape(zero_point.shape),
    )


TWINS = register_twins(
    register_autograd, {"fake_quant": fake_quant_impl, "fake_quant_backward": fake_quant_backward_impl}
)
