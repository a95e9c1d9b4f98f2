"""Triton kernels of mixed_quant_conv's elementwise and reduction passes (ops under ``qops_triton``):

* ``qops_triton::mixed_quant_conv_act_forward(x, a_scales, a_bits, a_signed, noise, seed)``: every
  activation variant FQa_j(x) (or its quantization noise, Philox stream 1 + j of the seed, as the C++ kernels)
  side by side in one channels-last tensor xq [N, n_a*C, H, W] (channel j*C + c), one read of x;
* ``qops_triton::mixed_quant_conv_act_backward(x, grad_xq, a_scales, a_bits, a_signed, noise)``: grad x (sum
  of the variants' straight-through gradients) and the LSQ sums of every activation scale, one pass, with
  per-block partial sums (deterministic).

:func:`mixed_quant_conv` puts them together with the merged weight (built from the small candidate kernels
with torch ops) and the vendor convolution: the same math as torch.ops.qops.mixed_quant_conv on
any device Triton runs on (both modes). On CPU the tests run it under TRITON_INTERPRET=1 on small shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

# quant_noise's Philox helpers: the same stream, transforms and bits (csrc/include/qops/philox.h).
from qops.ranges import quant_range
from qops.reference import quant_noise_half_delta
from qops.triton.quant_noise import _box_muller, _noise_kernel, _philox4x32_10

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
def _normal_at(idx, key0, key1, stream):
    """philox_normal(seed, stream, idx) of philox.h for a block of logical indices."""
    g = idx >> 2
    lane = idx & 3
    c0 = (g & 0xFFFFFFFF).to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    c2 = tl.zeros(idx.shape, tl.uint32) + stream.to(tl.uint32)
    c3 = tl.zeros(idx.shape, tl.uint32)
    r0, r1, r2, r3 = _philox4x32_10(c0, c1, c2, c3, key0.to(tl.uint32), key1.to(tl.uint32))
    high = lane >= 2
    zc, zs = _box_muller(tl.where(high, r2, r0), tl.where(high, r3, r1))
    return tl.where((lane & 1) != 0, zs, zc)


@triton.jit(do_not_specialize=["key0", "key1"])
def _act_forward_kernel(
    x_ptr,
    xq_ptr,
    scale_ptr,
    qmin_ptr,
    qmax_ptr,
    quant_ptr,
    hd_ptr,
    total,
    C,
    HW,
    key0,
    key1,
    N_A: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    NOISE: tl.constexpr,
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
    if NOISE:
        # x is NCHW here, so xi is the element's logical index; variant j draws stream 1 + j.
        hd = tl.load(hd_ptr + j, mask=m, other=0.0)
        eps = _normal_at(xi.to(tl.int64), key0, key1, (j + 1).to(tl.int64))
        y = tl.where(hd == 0, xv, tl.fma(hd, eps, xv))
    else:
        inv = 1.0 / s
        q = _round_half_even(xv * inv)
        y = tl.minimum(tl.maximum(q, qmin), qmax) * s
    tl.store(xq_ptr + e, tl.where(quant, y, xv), mask=m)


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
    NOISE: tl.constexpr,
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
        quant = (tl.load(quant_ptr + j) != 0) & (not NOISE)  # noise: identity gradient, no scale
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
    qmin = [quant_range(b, a_signed)[0] if b else 0 for b in a_bits]
    qmax = [quant_range(b, a_signed)[1] if b else 0 for b in a_bits]
    return (
        a_scales.contiguous(),
        torch.tensor(qmin, dtype=torch.float32, device=dev),
        torch.tensor(qmax, dtype=torch.float32, device=dev),
        torch.tensor([1 if b else 0 for b in a_bits], dtype=torch.int32, device=dev),
    )


def _nhwc(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _keys(seed: int) -> tuple[int, int]:
    s = seed & 0xFFFFFFFFFFFFFFFF
    return s & 0xFFFFFFFF, s >> 32


@triton_op("qops_triton::mixed_quant_conv_act_forward", mutates_args=())
def act_forward(
    x: torch.Tensor,
    a_scales: torch.Tensor,
    a_bits: list[int],
    a_signed: bool,
    noise: bool = False,
    seed: int = 0,
) -> torch.Tensor:
    if not (x.is_contiguous() or (_nhwc(x) and not noise)):
        x = x.contiguous()  # noise follows the logical (NCHW) order
    n, c, h, w = x.shape
    xq = torch.empty((n, len(a_bits) * c, h, w), device=x.device, dtype=torch.float32).contiguous(
        memory_format=torch.channels_last
    )
    total = xq.numel()
    if total:
        s, qmin, qmax, quant = _variant_tables(a_scales, a_bits, a_signed)
        hd = _half_deltas(x, a_bits) if noise else s
        key0, key1 = _keys(seed)
        wrap_triton(_act_forward_kernel)[(triton.cdiv(total, BLOCK),)](
            x,
            xq,
            s,
            qmin,
            qmax,
            quant,
            hd,
            total,
            c,
            h * w,
            key0,
            key1,
            N_A=len(a_bits),
            CHANNELS_LAST=_nhwc(x),
            NOISE=noise,
            BLOCK=BLOCK,
        )
    return xq


def _half_deltas(x: torch.Tensor, bits: list[int]) -> torch.Tensor:
    """quant_noise's delta / 2 of x at every bit-width (reference.quant_noise_half_delta) in float32."""
    lo, hi = torch.aminmax(x)
    levels = torch.tensor([float(2**b - 1) if b else 1.0 for b in bits], dtype=torch.float32, device=x.device)
    return quant_noise_half_delta(lo, hi, levels)


@triton_op("qops_triton::mixed_quant_conv_act_backward", mutates_args=())
def act_backward(
    x: torch.Tensor,
    grad_xq: torch.Tensor,
    a_scales: torch.Tensor,
    a_bits: list[int],
    a_signed: bool,
    noise: bool = False,
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
            NOISE=noise,
            BLOCK=BLOCK,
        )
    return gx, part.sum(0)


def _act_forward_setup(ctx, inputs, output):
    x, a_scales, a_bits, a_signed, noise, seed = inputs
    ctx.save_for_backward(x, a_scales)
    ctx.a_bits, ctx.a_signed, ctx.noise = list(a_bits), a_signed, noise


def _act_forward_backward(ctx, grad_xq):
    x, a_scales = ctx.saved_tensors
    gx, ga = act_backward(x, grad_xq, a_scales, ctx.a_bits, ctx.a_signed, ctx.noise)
    return gx, ga, None, None, None, None


act_forward.register_autograd(_act_forward_backward, setup_context=_act_forward_setup)


def _weight_noise(w: torch.Tensor, bits: int, seed: int, stream: int) -> torch.Tensor:
    """quant_noise of w on `stream` (quant_noise's own kernel), identity gradient."""
    wc = w.detach().contiguous()
    noisy = torch.empty_like(wc)
    if wc.numel():
        hd = _half_deltas(wc, [bits])
        key0, key1 = _keys(seed)
        wrap_triton(_noise_kernel)[(triton.cdiv(wc.numel(), 4 * 256),)](
            wc,
            noisy,
            hd,
            wc.numel(),
            1,
            wc.numel(),
            key0,
            key1,
            stream,
            GAUSSIAN=True,
            GROUPS=256,
            ACC=tl.float32,
        )
    return w + (noisy - wc)


def _fake_quant(t: torch.Tensor, scale: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    if bits == 0:
        return t
    qmin, qmax = quant_range(bits, signed)
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


def mixed_quant_conv(x, weights, probs, w_scales, a_scales, bias, spec, seed=0):
    """qops.mixed_quant_conv.mixed_quant_conv with the activation passes (and noise) in Triton: one convolution
    of the activation variants (Triton) with the merged weight (torch ops on the small kernels)."""
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
    noise = mode == "noise"
    n_a, n_w = len(a_bits), len(w_bits)
    cin = x.shape[1]
    window = [1, 1]
    for w, d in zip(weights, dilations, strict=True):
        window = [max(window[0], d * (w.shape[2] - 1) + 1), max(window[1], d * (w.shape[3] - 1) + 1)]
    merged = [0.0] * len(a_bits)
    for o, (w, g, d) in enumerate(zip(weights, groups, dilations, strict=True)):
        for i, wb in enumerate(w_bits):
            if noise and wb:
                wq = _weight_noise(w, wb, seed, 1 + n_a + o * n_w + i)  # mqc_weight_stream
            else:
                wq = _fake_quant(w, w_scales[o, i], wb, True)
            e = _embed(wq, g, d, cin, tuple(window))
            for j in range(len(a_bits)):
                merged[j] = merged[j] + probs[o, i, j] * e
    w_merged = torch.cat(merged, dim=1).contiguous(memory_format=torch.channels_last)
    xq = act_forward(x, a_scales, list(a_bits), a_signed, noise, seed)
    padding = ((window[0] - 1) // 2, (window[1] - 1) // 2)
    return F.conv2d(xq, w_merged, bias, stride, padding)
