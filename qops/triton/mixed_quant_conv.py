"""Triton kernels of mixed_quant_conv's elementwise and reduction passes (ops under ``qops_triton``):

* ``qops_triton::mixed_quant_conv_act_forward(x, a_scales, a_bits, a_signed)``: every activation variant
  FQa_j(x) side by side in one channels-last tensor xq [N, n_a*C, H, W] (channel j*C + c), one read of x;
* ``qops_triton::mixed_quant_conv_act_backward(x, grad_xq, a_scales, a_bits, a_signed)``: grad x (sum of the
  variants' straight-through gradients) and the LSQ sums of every activation scale, one pass, with per-block
  partial sums (deterministic).

:func:`mixed_quant_conv` puts them together with the merged weight (built from the small candidate kernels
with torch ops) and the vendor convolution: the same math as torch.ops.qops.mixed_quant_conv (quant mode) on
any device Triton runs on. On CPU the tests run it under TRITON_INTERPRET=1 on small shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

__all__ = ["mixed_quant_conv", "act_forward", "act_backward"]

BLOCK = 256


@triton.jit
def _round_half_even(v):
    # nearbyint under the default rounding mode; exact for |v| < 2^23 (beyond, v is already an integer).
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _act_forward_kernel(
    x_ptr,
    xq_ptr,
    scale_ptr,
    qmin_ptr,
    qmax_ptr,
    quant_ptr,
    total,
    C,
    HW,
    N_A: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # xq element, channels-last order
    m = e < total
    ctot = N_A * C
    k = e % ctot
    p = e // ctot
    j = k // C
    c = k % C
    if CHANNELS_LAST:
        xi = p * C + c
    else:
        xi = (p // HW * C + c) * HW + p % HW
    xv = tl.load(x_ptr + xi, mask=m, other=0.0)
    s = tl.load(scale_ptr + j, mask=m, other=1.0)
    qmin = tl.load(qmin_ptr + j, mask=m, other=0.0)
    qmax = tl.load(qmax_ptr + j, mask=m, other=0.0)
    quant = tl.load(quant_ptr + j, mask=m, other=0) != 0
    inv = 1.0 / s
    q = _round_half_even(xv * inv)
    q = tl.minimum(tl.maximum(q, qmin), qmax)
    tl.store(xq_ptr + e, tl.where(quant, q * s, xv), mask=m)


@triton.jit
def _act_backward_kernel(
    x_ptr,
    gxq_ptr,
    gx_ptr,
    part_ptr,
    scale_ptr,
    qmin_ptr,
    qmax_ptr,
    quant_ptr,
    total,
    C,
    HW,
    N_A: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    e = pid * BLOCK + tl.arange(0, BLOCK)  # x element in x's layout
    m = e < total
    if CHANNELS_LAST:
        c = e % C
        p = e // C
    else:
        c = (e // HW) % C
        p = e // (C * HW) * HW + e % HW
    xv = tl.load(x_ptr + e, mask=m, other=0.0)
    gsum = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(N_A):
        g = tl.load(gxq_ptr + p * (N_A * C) + j * C + c, mask=m, other=0.0)
        s = tl.load(scale_ptr + j)
        qmin = tl.load(qmin_ptr + j)
        qmax = tl.load(qmax_ptr + j)
        quant = tl.load(quant_ptr + j) != 0
        inv = 1.0 / s
        q = _round_half_even(xv * inv)
        below = ~(q >= qmin)  # NaN counts as below, as in qops' fake_quant_math.h
        above = q > qmax
        ds = tl.where(below, g * qmin, tl.where(above, g * qmax, g * tl.fma(q, s, -xv) * inv))
        gsum += tl.where(quant & (below | above), 0.0, g)
        tl.store(part_ptr + pid * N_A + j, tl.sum(tl.where(quant & m, ds, 0.0), axis=0))
    tl.store(gx_ptr + e, gsum, mask=m)


def _variant_tables(a_scales: torch.Tensor, a_bits: list[int], a_signed: bool):
    dev = a_scales.device
    qmin = [(-(2 ** (b - 1)) if a_signed else 0) if b else 0 for b in a_bits]
    qmax = [((2 ** (b - 1) - 1) if a_signed else 2**b - 1) if b else 0 for b in a_bits]
    return (
        a_scales.contiguous(),
        torch.tensor(qmin, dtype=torch.float32, device=dev),
        torch.tensor(qmax, dtype=torch.float32, device=dev),
        torch.tensor([1 if b else 0 for b in a_bits], dtype=torch.int32, device=dev),
    )


def _nhwc(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


@triton_op("qops_triton::mixed_quant_conv_act_forward", mutates_args=())
def act_forward(x: torch.Tensor, a_scales: torch.Tensor, a_bits: list[int], a_signed: bool) -> torch.Tensor:
    if not (x.is_contiguous() or _nhwc(x)):
        x = x.contiguous()
    n, c, h, w = x.shape
    xq = torch.empty((n, len(a_bits) * c, h, w), device=x.device, dtype=torch.float32).contiguous(
        memory_format=torch.channels_last
    )
    total = xq.numel()
    if total:
        s, qmin, qmax, quant = _variant_tables(a_scales, a_bits, a_signed)
        wrap_triton(_act_forward_kernel)[(triton.cdiv(total, BLOCK),)](
            x, xq, s, qmin, qmax, quant, total, c, h * w, N_A=len(a_bits), CHANNELS_LAST=_nhwc(x), BLOCK=BLOCK
        )
    return xq


@triton_op("qops_triton::mixed_quant_conv_act_backward", mutates_args=())
def act_backward(
    x: torch.Tensor, grad_xq: torch.Tensor, a_scales: torch.Tensor, a_bits: list[int], a_signed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if not (x.is_contiguous() or _nhwc(x)):
        x = x.contiguous()
    grad_xq = grad_xq.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    total = x.numel()
    n_a = len(a_bits)
    gx = torch.empty_like(x)
    blocks = triton.cdiv(total, BLOCK)
    part = torch.zeros((max(blocks, 1), n_a), device=x.device, dtype=torch.float32)
    if total:
        s, qmin, qmax, quant = _variant_tables(a_scales, a_bits, a_signed)
        wrap_triton(_act_backward_kernel)[(blocks,)](
            x,
            grad_xq,
            gx,
            part,
            s,
            qmin,
            qmax,
            quant,
            total,
            c,
            h * w,
            N_A=n_a,
            CHANNELS_LAST=_nhwc(x),
            BLOCK=BLOCK,
        )
    return gx, part.sum(0)


def _act_forward_setup(ctx, inputs, output):
    x, a_scales, a_bits, a_signed = inputs
    ctx.save_for_backward(x, a_scales)
    ctx.a_bits, ctx.a_signed = list(a_bits), a_signed


def _act_forward_backward(ctx, grad_xq):
    x, a_scales = ctx.saved_tensors
    gx, ga = act_backward(x, grad_xq, a_scales, ctx.a_bits, ctx.a_signed)
    return gx, ga, None, None


act_forward.register_autograd(_act_forward_backward, setup_context=_act_forward_setup)


def _fake_quant(t: torch.Tensor, scale: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    if bits == 0:
        return t
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    zero_point = torch.zeros(1, dtype=torch.float32, device=t.device)
    return torch._fake_quantize_learnable_per_tensor_affine(t, scale.reshape(1), zero_point, qmin, qmax, 1.0)


def _embed(w: torch.Tensor, groups: int, dilation: int, cin: int, window: tuple[int, int]) -> torch.Tensor:
    """[Cout, Cin/groups, kh, kw] -> dense [Cout, Cin, KH, KW]: block diagonal, taps spread, centred."""
    cout, cin_g, kh, kw = w.shape
    eh, ew = dilation * (kh - 1) + 1, dilation * (kw - 1) + 1
    dense = w.new_zeros(cout, cin, eh, ew)
    cout_g = cout // groups
    for g in range(groups):
        rows = slice(g * cout_g, (g + 1) * cout_g)
        dense[rows, g * cin_g : (g + 1) * cin_g, ::dilation, ::dilation] = w[rows]
    ph, pw = (window[0] - eh) // 2, (window[1] - ew) // 2
    return F.pad(dense, (pw, pw, ph, ph))


def mixed_quant_conv(
    x, weights, probs, w_bits, a_bits, w_scales, a_scales, a_signed, groups, dilations, stride=1, bias=None
):
    """torch.ops.qops.mixed_quant_conv (quant mode) with the activation passes in Triton: one convolution of the
    activation variants (Triton) with the merged weight (torch ops on the small kernels)."""
    cin = x.shape[1]
    window = [1, 1]
    for w, d in zip(weights, dilations, strict=True):
        window = [max(window[0], d * (w.shape[2] - 1) + 1), max(window[1], d * (w.shape[3] - 1) + 1)]
    merged = [0.0] * len(a_bits)
    for o, (w, g, d) in enumerate(zip(weights, groups, dilations, strict=True)):
        for i, wb in enumerate(w_bits):
            e = _embed(_fake_quant(w, w_scales[o, i], wb, True), g, d, cin, tuple(window))
            for j in range(len(a_bits)):
                merged[j] = merged[j] + probs[o, i, j] * e
    w_merged = torch.cat(merged, dim=1).contiguous(memory_format=torch.channels_last)
    xq = act_forward(x, a_scales, list(a_bits), a_signed)
    padding = ((window[0] - 1) // 2, (window[1] - 1) // 2)
    return F.conv2d(xq, w_merged, bias, stride, padding)
