"""torch.ops.qops.mixed_quant_conv: the QuantNAS supernet layer as one fused op.

QuantNAS (Shvetsov et al., "QuantNAS for super resolution: searching for efficient quantization-friendly
architectures against quantization noise") mixes every (operation, weight bits, activation bits) candidate of a
searchable layer with softmax weights::

    y = sum_{o,i,j} probs[o,i,j] * conv_o(FQa_j(x), FQw_i(weights[o])) + bias

Convolution is bilinear, so the sum is one convolution of all activation variants side by side with a weight
that merges every candidate (zero-embedded into the largest window, grouped kernels block-diagonal, dilated
kernels as spread taps) scaled by probs; the kernels compute exactly that (csrc/mixed_quant_conv_host.cpp around the
kernels of csrc/cpu and csrc/cuda), splitting into a few convolutions where the candidates' windows do not nest
(the rule is in csrc/include/qops/mixed_quant_conv.h). The backward op recomputes the activation variants and
merged weights instead of saving them, so the saved state is the inputs alone.

This module registers the fake (meta) kernels, used by torch.compile and opcheck, and the autograd formula.
Composite candidates (two convolutions in sequence, attention, ...) are not single convolutions: mix them
beside this op in Python (qops.nn.MixedQuantConv2d documents how).
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["MixedQuantConvSpec", "mixed_quant_conv", "op_args"]


@dataclasses.dataclass(frozen=True)
class MixedQuantConvSpec:
    """Everything a mixed_quant_conv call fixes besides its tensors and seed (hashable: lists become tuples).

    Attributes:
        w_bits, a_bits: bit-widths of the weights and activations, each 0 (full precision) or 2..8.
        groups, dilations: per candidate weight; every candidate pads "same" (dilation * (k - 1) / 2 per side).
        a_signed: activations quantized to [-2^(b-1), 2^(b-1)-1] instead of [0, 2^b-1] (qops.quant_range).
        stride: of every candidate.
        mode: "quant" (LSQ fake quantization) or "noise" (quant_noise with the bit-width, scales unused).
    """

    w_bits: tuple[int, ...]
    a_bits: tuple[int, ...]
    groups: tuple[int, ...]
    dilations: tuple[int, ...]
    a_signed: bool = False
    stride: int = 1
    mode: str = "quant"

    def __post_init__(self):
        for name in ("w_bits", "a_bits", "groups", "dilations"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        object.__setattr__(self, "a_signed", bool(self.a_signed))
        object.__setattr__(self, "stride", int(self.stride))


# The flat schema of csrc/ops.cpp, addressed by argument name here (and in the autograd formula below).
_SCHEMA = torch.ops.qops.mixed_quant_conv.default._schema
_NAMES = [a.name for a in _SCHEMA.arguments]
_DEFAULTS = {a.name: a.default_value for a in _SCHEMA.arguments if a.has_default_value()}
# The differentiable arguments, in the order of the backward op's output_mask and outputs.
_GRAD_NAMES = ("x", "weights", "probs", "w_scales", "a_scales", "bias")
_STATIC_NAMES = ("w_bits", "a_bits", "a_signed", "groups", "dilations", "stride", "mode", "seed")


def op_args(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    probs: torch.Tensor,
    w_scales: torch.Tensor,
    a_scales: torch.Tensor,
    bias: torch.Tensor | None,
    spec: MixedQuantConvSpec,
    seed: int = 0,
) -> tuple:
    """The positional arguments of ``torch.ops.qops.mixed_quant_conv`` (schema order) for a call of
    :func:`mixed_quant_conv` (e.g. for torch.library.opcheck)."""
    named = dict(
        x=x,
        weights=list(weights),
        probs=probs,
        w_scales=w_scales,
        a_scales=a_scales,
        bias=bias,
        seed=int(seed),
        **{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)},
    )
    return tuple(list(v) if isinstance(v, tuple) else v for v in (named[n] for n in _NAMES))


def mixed_quant_conv(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    probs: torch.Tensor,
    w_scales: torch.Tensor,
    a_scales: torch.Tensor,
    bias: torch.Tensor | None,
    spec: MixedQuantConvSpec,
    seed: int = 0,
) -> torch.Tensor:
    """The QuantNAS mixed layer ``sum_{o,i,j} probs[o,i,j] * conv_o(FQa_j(x), FQw_i(weights[o])) + bias``.

    Args:
        x: [N, Cin, H, W] float32 (NCHW or channels-last).
        weights: candidate kernels, weights[o] of shape [Cout, Cin / spec.groups[o], kh, kw] with odd kh, kw.
        probs: [len(weights), len(spec.w_bits), len(spec.a_bits)] mixing weights (the caller applies the softmax).
        w_scales: [len(weights), len(spec.w_bits)] LSQ steps of the weights; a_scales: [len(spec.a_bits)] of the
            activations (both > 0 where the bit-width quantizes; unused in noise mode).
        bias: [Cout] or None.
        spec: bit-widths, per-candidate groups and dilations, signedness, stride and mode
            (:class:`MixedQuantConvSpec`).
        seed: noise mode's seed; stream seeds per variant as in qops.reference.mixed_quant_conv_noise_streams.

    Returns:
        [N, Cout, (H - 1) // stride + 1, (W - 1) // stride + 1], channels-last in memory if x is, else NCHW.
    """
    return torch.ops.qops.mixed_quant_conv(*op_args(x, weights, probs, w_scales, a_scales, bias, spec, seed))


def _require(cond, message: str) -> None:
    """torch._check (a RuntimeError; symbolic shapes become guards) with a message built in advance."""
    torch._check(cond, lambda: message)


def check_args(
    x, weights, probs, w_bits, a_bits, w_scales, a_scales, groups, dilations, stride, bias, mode
) -> tuple[int, int, int]:
    """The checks of check_args in csrc (same messages) for the fake kernels, so that meta tensors, torch.compile
    and a meta tensor mixed with real ones fail like the kernels. Returns the output's (Cout, Ho, Wo)."""
    _require(mode in ("quant", "noise"), f'mode: expected "quant" or "noise", got "{mode}"')
    _require(x.dtype == torch.float32, f"x: expected dtype Float, got {x.dtype}")
    _require(x.dim() == 4, f"x: expected 4 dimensions, got shape {tuple(x.shape)}")
    _require(x.shape[1] > 0, f"x: expected at least one channel, got shape {tuple(x.shape)}")
    _require(stride >= 1, f"stride: expected >= 1, got {stride}")
    n_ops = len(weights)
    _require(n_ops >= 1, "weights: expected at least one candidate weight")
    _require(n_ops <= 32, f"weights: expected at most 32 candidates, got {n_ops}")
    _require(len(groups) == n_ops, f"groups: expected one entry per weight ({n_ops}), got {len(groups)}")
    _require(
        len(dilations) == n_ops,
        f"dilations: expected one entry per weight ({n_ops}), got {len(dilations)}",
    )
    cin, cout = x.shape[1], weights[0].shape[0] if weights[0].dim() == 4 else -1
    for o, (w, g, d) in enumerate(zip(weights, groups, dilations, strict=True)):
        name = f"weights[{o}]"
        _require(w.dtype == torch.float32, f"{name}: expected dtype Float, got {w.dtype}")
        _require(w.dim() == 4, f"{name}: expected 4 dimensions, got shape {tuple(w.shape)}")
        _require(w.device == x.device, f"{name}: expected a tensor on {x.device} like x, got {w.device}")
        _require(g >= 1, f"groups: entry {o} must be >= 1, got {g}")
        _require(d >= 1, f"dilations: entry {o} must be >= 1, got {d}")
        _require(
            w.shape[0] == cout,
            f"{name}: expected {cout} output channels like weights[0], got shape {tuple(w.shape)}",
        )
        _require(cin % g == 0, f"groups: entry {o} ({g}) does not divide the input channels ({cin})")
        _require(cout % g == 0, f"groups: entry {o} ({g}) does not divide the output channels ({cout})")
        _require(
            w.shape[1] * g == cin,
            f"{name}: expected in-channels Cin/groups = {cin // g}, got shape {tuple(w.shape)}",
        )
        _require(
            w.shape[2] % 2 == 1 and w.shape[3] % 2 == 1,
            f"{name}: kernel sizes must be odd, got shape {tuple(w.shape)}",
        )
    _require(cout > 0, "weights: expected at least one output channel")
    for name, bits in (("w_bits", w_bits), ("a_bits", a_bits)):
        _require(len(bits) >= 1, f"{name}: expected at least one bit-width")
        _require(len(bits) <= 8, f"{name}: expected at most 8 bit-widths, got {len(bits)}")
        _require(
            all(b == 0 or 2 <= b <= 8 for b in bits),
            f"{name}: bit-widths must be 0 (full precision) or 2..8, got {list(bits)}",
        )
    for name, t, shape in (
        ("probs", probs, (n_ops, len(w_bits), len(a_bits))),
        ("w_scales", w_scales, (n_ops, len(w_bits))),
        ("a_scales", a_scales, (len(a_bits),)),
        ("bias", bias, (cout,)),
    ):
        if t is None:
            continue
        _require(t.dtype == torch.float32, f"{name}: expected dtype Float, got {t.dtype}")
        _require(t.device == x.device, f"{name}: expected a tensor on {x.device} like x, got {t.device}")
        _require(tuple(t.shape) == shape, f"{name}: expected shape {list(shape)}, got {tuple(t.shape)}")
    return cout, (x.shape[2] - 1) // stride + 1, (x.shape[3] - 1) // stride + 1


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
    cout, ho, wo = check_args(
        x, weights, probs, w_bits, a_bits, w_scales, a_scales, groups, dilations, stride, bias, mode
    )
    y = x.new_empty((x.shape[0], cout, ho, wo))
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
    cout, ho, wo = check_args(
        x, weights, probs, w_bits, a_bits, w_scales, a_scales, groups, dilations, stride, None, mode
    )
    torch._check(grad.dtype == torch.float32, lambda: f"grad: expected dtype Float, got {grad.dtype}")
    torch._check(
        grad.device == x.device, lambda: f"grad: expected a tensor on {x.device} like x, got {grad.device}"
    )
    torch._check(
        tuple(grad.shape) == (x.shape[0], cout, ho, wo),
        lambda: f"grad: expected the output's shape {[x.shape[0], cout, ho, wo]}, got {tuple(grad.shape)}",
    )

    def empty():
        return x.new_empty((0,))

    gx = _grad_layout(x) if output_mask[0] else empty()
    gw = [_grad_layout(w) for w in weights] if output_mask[1] else []
    gp = probs.new_empty(probs.shape) if output_mask[2] else empty()
    gws = w_scales.new_empty(w_scales.shape) if output_mask[3] else empty()
    gas = a_scales.new_empty(a_scales.shape) if output_mask[4] else empty()
    gb = x.new_empty((weights[0].shape[0],)) if (output_mask[5] and has_bias) else empty()
    return gx, gw, gp, gws, gas, gb


def _named_inputs(inputs) -> dict:
    # The dispatcher hands autograd the arguments the caller passed, trailing defaults left out.
    return {**_DEFAULTS, **dict(zip(_NAMES, inputs, strict=False))}


def _setup_context(ctx, inputs, output):
    a = _named_inputs(inputs)
    ctx.save_for_backward(a["x"], a["probs"], a["w_scales"], a["a_scales"], *a["weights"])
    ctx.static = {name: a[name] for name in _STATIC_NAMES}
    ctx.has_bias = a["bias"] is not None


def _backward(ctx, grad, ops):
    x, probs, w_scales, a_scales, *weights = ctx.saved_tensors
    need = dict(zip(_NAMES, ctx.needs_input_grad, strict=False))  # as short as the inputs
    wanted = {
        n: any(need[n]) if isinstance(need.get(n), (list, tuple)) else bool(need.get(n)) for n in _GRAD_NAMES
    }
    wanted["bias"] = wanted["bias"] and ctx.has_bias
    mask = [wanted[n] for n in _GRAD_NAMES]
    outputs = ops.mixed_quant_conv_backward(
        grad,
        x,
        weights,
        probs,
        w_scales=w_scales,
        a_scales=a_scales,
        has_bias=ctx.has_bias,
        output_mask=mask,
        **ctx.static,
    )
    grads = dict(zip(_GRAD_NAMES, outputs, strict=True))
    grads = {name: (g if wanted[name] else None) for name, g in grads.items()}
    # A list argument takes a list of gradients: one None per weight when none is wanted.
    grads["weights"] = list(grads["weights"]) if wanted["weights"] else [None] * len(weights)
    return tuple(grads.get(name) for name in _NAMES[: len(ctx.needs_input_grad)])


def _no_double_backward(ctx, *grads):
    raise RuntimeError("mixed_quant_conv: does not support double backward (gradients of gradients)")


def register_autograd(namespace: str) -> None:
    """The autograd formula of ``<namespace>::mixed_quant_conv`` (qops, or its Triton twin qops_triton): one call
    of ``<namespace>::mixed_quant_conv_backward`` with the gradients wanted, which refuses double backward."""
    ops = getattr(torch.ops, namespace)
    torch.library.register_autograd(
        f"{namespace}::mixed_quant_conv",
        lambda ctx, grad: _backward(ctx, grad, ops),
        setup_context=_setup_context,
    )
    torch.library.register_autograd(
        f"{namespace}::mixed_quant_conv_backward",
        _no_double_backward,
        setup_context=lambda ctx, inputs, output: None,
    )


register_autograd("qops")
