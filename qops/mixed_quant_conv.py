"""torch.ops.qops.mixed_quant_conv: the QuantNAS supernet layer as one fused op.

QuantNAS (Shvetsov et al., "QuantNAS for super resolution: searching for efficient quantization-friendly
architectures against quantization noise") mixes every (operation, weight bits, activation bits) candidate of a
searchable layer with softmax weights::

    y = sum_{o,i,j} probs[o,i,j] * conv_o(FQa_j(x), FQw_i(weights[o])) + bias

Convolution is bilinear, so the sum is one convolution of all activation variants side by side with a weight
that merges every candidate (zero-embedded into the largest window, grouped kernels block-diagonal, dilated
kernels as spread taps) scaled by probs; the kernels compute exactly that (csrc/cpu/mixed_quant_conv.cpp,
csrc/cuda/mixed_quant_conv.cu), splitting into a few convolutions where the candidates' windows do not nest
(the rule is in csrc/include/qops/mixed_quant_conv.h). The backward op recomputes the activation variants and
merged weights instead of saving them, so the saved state is the inputs alone.

This module registers the fake (meta) kernels, used by torch.compile and opcheck, and the autograd formula.
Composite candidates (two convolutions in sequence, attention, ...) are not single convolutions: mix them
beside this op in Python (qops.nn.MixedQuantConv2d documents how).
"""

from __future__ import annotations

import torch

__all__ = ["mixed_quant_conv"]


def mixed_quant_conv(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    probs: torch.Tensor,
    w_bits: list[int],
    a_bits: list[int],
    w_scales: torch.Tensor,
    a_scales: torch.Tensor,
    a_signed: bool,
    groups: list[int],
    dilations: list[int],
    stride: int = 1,
    bias: torch.Tensor | None = None,
    mode: str = "quant",
    seed: int = 0,
) -> torch.Tensor:
    """The QuantNAS mixed layer ``sum_{o,i,j} probs[o,i,j] * conv_o(FQa_j(x), FQw_i(weights[o])) + bias``.

    Args:
        x: [N, Cin, H, W] float32 (NCHW or channels-last).
        weights: candidate kernels, weights[o] of shape [Cout, Cin / groups[o], kh, kw] with odd kh, kw.
        probs: [len(weights), len(w_bits), len(a_bits)] mixing weights (the caller applies the softmax).
        w_bits, a_bits: bit-widths in {0, 2..8}; 0 is full precision (no quantization).
        w_scales: [len(weights), len(w_bits)] LSQ steps of the weights; a_scales: [len(a_bits)] of the activations.
        a_signed: activations quantized to [-2^(b-1), 2^(b-1)-1] instead of [0, 2^b-1].
        groups, dilations: per candidate; every candidate pads "same" (dilation * (k - 1) / 2 per side).
        stride: of every candidate.
        bias: [Cout] or None.
        mode: "quant" (LSQ fake quantization) or "noise" (quant_noise with the bit-width, scales unused).
        seed: noise mode's seed; stream seeds per variant as in qops.reference.mixed_quant_conv_noise_seeds.

    Returns:
        [N, Cout, (H - 1) // stride + 1, (W - 1) // stride + 1], channels-last in memory if x is, else NCHW.
    """
    return torch.ops.qops.mixed_quant_conv(
        x,
        weights,
        probs,
        w_bits,
        a_bits,
        w_scales,
        a_scales,
        a_signed,
        groups,
        dilations,
        stride,
        bias,
        mode,
        seed,
    )


def _out_hw(x: torch.Tensor, stride: int) -> tuple:
    return (x.shape[2] - 1) // stride + 1, (x.shape[3] - 1) // stride + 1


@torch.library.register_fake("qops::mixed_quant_conv")
def _mixed_quant_conv_fake(
    x,
    weights,
    probs,
    w_bits,
    a_bits,
    w_scales,
    a_scales,
    a_signed,
    groups,
    dilations,
    stride=1,
    bias=None,
    mode="quant",
    seed=0,
):
    torch._check(len(weights) > 0, lambda: "weights: expected at least one candidate weight")
    torch._check(stride >= 1, lambda: f"stride: expected >= 1, got {stride}")
    ho, wo = _out_hw(x, stride)
    y = x.new_empty((x.shape[0], weights[0].shape[0], ho, wo))
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        y = y.contiguous(memory_format=torch.channels_last)
    return y


def _grad_layout(t: torch.Tensor) -> torch.Tensor:
    """An empty tensor laid out as the kernels lay out a gradient of t (NCHW unless t is channels-last)."""
    if t.is_contiguous():
        return torch.empty_like(t)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.empty_like(t)
    return t.new_empty(t.shape)


@torch.library.register_fake("qops::mixed_quant_conv_backward")
def _mixed_quant_conv_backward_fake(
    grad,
    x,
    weights,
    probs,
    w_bits,
    a_bits,
    w_scales,
    a_scales,
    a_signed,
    groups,
    dilations,
    stride,
    has_bias,
    mode,
    seed,
    output_mask,
):
    def empty():
        return x.new_empty((0,))

    gx = _grad_layout(x) if output_mask[0] else empty()
    gw = [_grad_layout(w) for w in weights] if output_mask[1] else []
    gp = probs.new_empty(probs.shape) if output_mask[2] else empty()
    gws = w_scales.new_empty(w_scales.shape) if output_mask[3] else empty()
    gas = a_scales.new_empty(a_scales.shape) if output_mask[4] else empty()
    gb = x.new_empty((weights[0].shape[0],)) if (output_mask[5] and has_bias) else empty()
    return gx, gw, gp, gws, gas, gb


def _setup_context(ctx, inputs, output):
    (
        x,
        weights,
        probs,
        w_bits,
        a_bits,
        w_scales,
        a_scales,
        a_signed,
        groups,
        dilations,
        stride,
        bias,
        mode,
        seed,
    ) = inputs
    ctx.save_for_backward(x, probs, w_scales, a_scales, *weights)
    ctx.n_ops = len(weights)
    ctx.static = (list(w_bits), list(a_bits), bool(a_signed), list(groups), list(dilations), int(stride))
    ctx.has_bias = bias is not None
    ctx.mode = mode
    ctx.seed = seed


def _backward(ctx, grad):
    x, probs, w_scales, a_scales, *weights = ctx.saved_tensors
    w_bits, a_bits, a_signed, groups, dilations, stride = ctx.static
    # The dispatcher hands autograd only the arguments the caller passed (trailing defaults left out), so
    # needs_input_grad, and the tuple returned, can be shorter than the schema.
    need = list(ctx.needs_input_grad) + [False] * (14 - len(ctx.needs_input_grad))
    need_w = any(need[1]) if isinstance(need[1], (list, tuple)) else bool(need[1])
    mask = [
        bool(need[0]),
        need_w,
        bool(need[2]),
        bool(need[5]),
        bool(need[6]),
        bool(need[11]) and ctx.has_bias,
    ]
    gx, gw, gp, gws, gas, gb = torch.ops.qops.mixed_quant_conv_backward(
        grad,
        x,
        weights,
        probs,
        w_bits,
        a_bits,
        w_scales,
        a_scales,
        a_signed,
        groups,
        dilations,
        stride,
        ctx.has_bias,
        ctx.mode,
        ctx.seed,
        mask,
    )
    grads = [None] * 14
    grads[0] = gx if mask[0] else None
    # A list argument takes a list of gradients: one None per weight when none is wanted.
    grads[1] = list(gw) if mask[1] else [None] * len(weights)
    grads[2] = gp if mask[2] else None
    grads[5] = gws if mask[3] else None
    grads[6] = gas if mask[4] else None
    grads[11] = gb if mask[5] else None
    return tuple(grads[: len(ctx.needs_input_grad)])


torch.library.register_autograd("qops::mixed_quant_conv", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("mixed_quant_conv: does not support double backward (gradients of gradients)")


torch.library.register_autograd(
    "qops::mixed_quant_conv_backward", _no_double_backward, setup_context=lambda ctx, inputs, output: None
)
