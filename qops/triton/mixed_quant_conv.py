"""Triton kernels of mixed_quant_conv: the twins ``torch.ops.qops_triton.mixed_quant_conv`` and
``mixed_quant_conv_backward`` (registered as every Triton twin is, qops/triton/__init__.py), with the schemas,
semantics and autograd formula of the qops ops, on any device Triton runs on (both modes; on CPU the tests run
them under TRITON_INTERPRET=1 on small shapes). Two Triton passes do the elementwise and reduction work:

* :func:`_act_forward`: every activation variant FQa_j(x) (or its quantization noise, Philox stream 1 + j of the
  seed, as the C++ kernels) side by side in one channels-last tensor xq [N, n_a*C, H, W] (channel j*C + c), one
  read of x;
* :func:`_act_backward`: grad x (sum of the variants' straight-through gradients) and the LSQ sums of every
  activation scale, one pass, with per-block partial sums (deterministic).

Around them: the merged weight (one window holding every candidate, built from the small candidate kernels with
torch ops; no conv-group split), the vendor convolution, and in the backward ATen's convolution_backward and the
candidates' gradients from the merged weight's (the adjoint of the embedding, then LSQ's weight gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from qops.mixed_quant_conv import check_args, register_autograd
from qops.ranges import quant_range
from qops.reference import quant_noise_half_delta
from qops.triton import register_twins

# quant_noise's Philox helpers: the same stream, transforms and bits (csrc/include/qops/philox.h).
from qops.triton.quant_noise import _box_muller, _noise_kernel, _philox4x32_10

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


def _act_forward(
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


def _act_backward(
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


def _unembed(g: Tensor, groups: int, dilation: int, kh: int, kw: int, window: tuple[int, int]) -> Tensor:
    """The adjoint of _embed: the gradient of a candidate kernel [Cout, Cin/groups, kh, kw] from its embedding's."""
    cout, cin = g.shape[0], g.shape[1]
    eh, ew = dilation * (kh - 1) + 1, dilation * (kw - 1) + 1
    ph, pw = (window[0] - eh) // 2, (window[1] - ew) // 2
    taps = g[:, :, ph : ph + eh : dilation, pw : pw + ew : dilation]
    cout_g, cin_g = cout // groups, cin // groups
    blocks = [taps[k * cout_g : (k + 1) * cout_g, k * cin_g : (k + 1) * cin_g] for k in range(groups)]
    return torch.cat(blocks, dim=0)


class _Plan:
    """One call's geometry: the stride and dilations the kernels use (clamped to the input, as csrc's check_args
    does), the merged window and its "same" padding."""

    def __init__(self, x: Tensor, weights: list[Tensor], dilations: list[int], stride: int):
        extent = max(x.shape[2], x.shape[3], 1)
        self.stride = min(stride, extent)
        self.dilations = [min(d, extent) for d in dilations]
        wh, ww = 1, 1
        for w, d in zip(weights, self.dilations, strict=True):
            wh, ww = max(wh, d * (w.shape[2] - 1) + 1), max(ww, d * (w.shape[3] - 1) + 1)
        self.window = (wh, ww)
        self.padding = [(wh - 1) // 2, (ww - 1) // 2]
        self.empty = x.shape[2] == 0 or x.shape[3] == 0


def _quantized_weights(weights, w_bits, w_scales, noise: bool, seed: int, n_a: int) -> dict:
    """FQw_i(weights[o]) (or its noise on stream mqc_weight_stream) for every (o, i)."""
    n_w = len(w_bits)
    out = {}
    for o, w in enumerate(weights):
        for i, wb in enumerate(w_bits):
            if noise and wb:
                out[o, i] = _weight_noise(w, wb, seed, 1 + n_a + o * n_w + i)
            else:
                out[o, i] = _fake_quant(w, w_scales[o, i], wb, True)
    return out


def _merged_weight(embedded: dict, probs: Tensor, n_a: int) -> Tensor:
    """[Cout, n_a * Cin, KH, KW]: block j = sum_{o,i} probs[o,i,j] * embedded[o, i], channels-last."""
    merged = [sum(probs[o, i, j] * e for (o, i), e in embedded.items()) for j in range(n_a)]
    return torch.cat(merged, dim=1).contiguous(memory_format=torch.channels_last)


def mixed_quant_conv_impl(
    x: Tensor,
    weights: list[Tensor],
    probs: Tensor,
    w_bits: list[int],
    a_bits: list[int],
    w_scales: Tensor,
    a_scales: Tensor,
    a_signed: bool,
    groups: list[int],
    dilations: list[int],
    stride: int = 1,
    bias: Tensor | None = None,
    mode: str = "quant",
    seed: int = 0,
) -> Tensor:
    """torch.ops.qops_triton.mixed_quant_conv: one convolution of the activation variants (Triton) with the
    merged weight (torch ops on the small kernels)."""
    cout, ho, wo = check_args(
        x, weights, probs, w_bits, a_bits, w_scales, a_scales, groups, dilations, stride, bias, mode
    )
    plan = _Plan(x, weights, dilations, stride)
    if plan.empty:
        return x.new_empty((x.shape[0], cout, ho, wo))
    noise = mode == "noise"
    wq = _quantized_weights(weights, w_bits, w_scales, noise, seed, len(a_bits))
    embedded = {
        k: _embed(q, groups[k[0]], plan.dilations[k[0]], x.shape[1], plan.window) for k, q in wq.items()
    }
    xq = _act_forward(x, a_scales, list(a_bits), a_signed, noise, seed)
    y = F.conv2d(xq, _merged_weight(embedded, probs, len(a_bits)), bias, plan.stride, plan.padding)
    return y.contiguous(memory_format=torch.channels_last if _nhwc(x) else torch.contiguous_format)


def mixed_quant_conv_backward_impl(
    grad: Tensor,
    x: Tensor,
    weights: list[Tensor],
    probs: Tensor,
    w_bits: list[int],
    a_bits: list[int],
    w_scales: Tensor,
    a_scales: Tensor,
    a_signed: bool,
    groups: list[int],
    dilations: list[int],
    stride: int,
    has_bias: bool,
    mode: str,
    seed: int,
    output_mask: list[bool],
) -> tuple[Tensor, list[Tensor], Tensor, Tensor, Tensor, Tensor]:
    """torch.ops.qops_triton.mixed_quant_conv_backward: (grad x, grad weights, grad probs, grad w_scales, grad
    a_scales, grad bias); those not in output_mask come back empty, as from the qops op."""
    check_args(x, weights, probs, w_bits, a_bits, w_scales, a_scales, groups, dilations, stride, None, mode)
    plan = _Plan(x, weights, dilations, stride)
    noise = mode == "noise"
    n_ops, n_w, n_a, cin, cout = len(weights), len(w_bits), len(a_bits), x.shape[1], weights[0].shape[0]
    need_x, need_w, need_p, need_ws, need_as, need_b = output_mask
    need_b = need_b and has_bias
    need_data, need_weight = need_x or need_as, need_w or need_p or need_ws
    opts = dict(dtype=x.dtype, device=x.device)
    gx, ga, gb = torch.empty_like(x), torch.zeros(n_a, **opts), torch.zeros(cout, **opts)
    gp, gws = torch.zeros(n_ops, n_w, n_a, **opts), torch.zeros(n_ops, n_w, **opts)
    gw = [torch.zeros_like(w) for w in weights]
    if not plan.empty:  # (an empty input: every gradient is an empty sum)
        wq = _quantized_weights(weights, w_bits, w_scales, noise, seed, n_a)
        embedded = {k: _embed(q, groups[k[0]], plan.dilations[k[0]], cin, plan.window) for k, q in wq.items()}
        xq = _act_forward(x, a_scales, list(a_bits), a_signed, noise, seed)
        gxq, gwm, gb_conv = torch.ops.aten.convolution_backward(
            grad.contiguous(memory_format=torch.channels_last), xq, _merged_weight(embedded, probs, n_a),
            [cout] if need_b else None, [plan.stride] * 2, plan.padding, [1, 1], False, [0, 0], 1,
            [need_data, need_weight, need_b],
        )  # fmt: skip
        if need_data:
            gx, ga = _act_backward(x, gxq, a_scales, list(a_bits), a_signed, noise)
        if need_b:
            gb = gb_conv
        if need_weight:
            g_blocks = gwm.split(cin, dim=1)  # the gradient of the merged weight of activation variant j
            for (o, i), e in embedded.items():
                gp[o, i] = torch.stack([(g_blocks[j] * e).sum() for j in range(n_a)])
                g_e = sum(probs[o, i, j] * g_blocks[j] for j in range(n_a))
                kh, kw = weights[o].shape[2], weights[o].shape[3]
                g_q = _unembed(g_e, groups[o], plan.dilations[o], kh, kw, plan.window)
                if w_bits[i] == 0 or noise:  # identity: the noise's range is not differentiated
                    gw[o] += g_q
                else:  # LSQ's gradients of FQw_i, as torch's learnable fake quantize defines them
                    qmin, qmax = quant_range(w_bits[i], True)
                    dw, ds, _ = torch.ops.aten._fake_quantize_learnable_per_tensor_affine_backward(
                        g_q, weights[o], w_scales[o, i].reshape(1), torch.zeros(1, **opts), qmin, qmax, 1.0
                    )
                    gw[o] += dw
                    gws[o, i] = ds.reshape(())
    # The layouts of the qops op: grad x like x, grad weights like the weights.
    if _nhwc(x):
        gx = gx.contiguous(memory_format=torch.channels_last)
    gw = [
        g.contiguous(memory_format=torch.channels_last) if _nhwc(w) else g
        for g, w in zip(gw, weights, strict=True)
    ]
    empty = x.new_empty((0,))
    return (
        gx if need_x else empty,
        gw if need_w else [],
        gp if need_p else empty,
        gws if need_ws else empty,
        ga if need_as else empty,
        gb if need_b else empty,
    )


TWINS = register_twins(
    register_autograd,
    {"mixed_quant_conv": mixed_quant_conv_impl, "mixed_quant_conv_backward": mixed_quant_conv_backward_impl},
)
