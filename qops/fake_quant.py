"""LSQ fake quantization: ``torch.ops.qops.fake_quant`` and its fused backward ``fake_quant_backward``.

Learned Step Size Quantization (Esser et al., "Learned Step Size Quantization", ICLR 2020) with the
learnable zero point of torch's ``_fake_quantize_learnable_per_{tensor,channel}_affine``, whose results
these ops reproduce bit for bit (forward and grad_x; grad_scale / grad_zero_point are sums and agree to
float32 rounding). The schemas live in csrc/ops.cpp, the kernels in csrc/cpu, csrc/cuda and
qops/triton/fake_quant.py; this module adds the fake (meta) kernels, autograd and the Python wrapper.
Exact semantics: docs/FAKE_QUANT.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fake_quant"]


_QUANT_LIMIT = 1 << 23  # |quant_min|, |quant_max| beyond 2^23 make q - zp inexact in float32 (kFqMaxQuantAbs)


def check_args(
    x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, quant_min: int, quant_max: int
) -> int:
    """The checks of csrc/include/qops/fake_quant_args.h (same messages) for the fake kernels and the Triton
    kernels, so that meta tensors, torch.compile and a meta tensor among real ones fail like the C++ kernels.
    Returns the axis in [0, x.dim()), or -1 for per tensor."""
    torch._check(
        x.dtype in (torch.float32, torch.float16, torch.bfloat16),
        lambda: f"x: expected a float32, float16 or bfloat16 tensor, got {x.dtype}",
    )
    dim_axis = -1
    if axis != -1:
        torch._check(
            -x.dim() <= axis < x.dim(),
            lambda: f"axis: {axis} is out of range for a tensor with {x.dim()} dimensions",
        )
        dim_axis = axis % x.dim()
    channels = 1 if dim_axis == -1 else x.shape[dim_axis]
    _check_qparam(scale, "scale", x, channels, dim_axis)
    _check_qparam(zero_point, "zero_point", x, channels, dim_axis)
    _check_quant_bound(quant_min, "quant_min")
    _check_quant_bound(quant_max, "quant_max")
    torch._check(
        quant_min < quant_max,
        lambda: (
            f"quant_min: expected quant_min < quant_max, got quant_min={quant_min}, quant_max={quant_max}"
        ),
    )
    return dim_axis


def _check_qparam(t: Tensor, name: str, x: Tensor, channels: int, axis: int) -> None:
    torch._check(t.is_floating_point(), lambda: f"{name}: expected a floating-point tensor, got {t.dtype}")
    torch._check(
        t.device == x.device, lambda: f"{name}: expected a tensor on {x.device} like x, got {t.device}"
    )
    if axis == -1:
        torch._check(
            t.numel() == 1,
            lambda: (
                f"{name}: expected 1 element for axis=-1 (per tensor), got {t.numel()} (shape {tuple(t.shape)})"
            ),
        )
    else:
        torch._check(
            t.numel() == channels,
            lambda: f"{name}: expected {channels} elements (x.size({axis})) for axis={axis}, got {t.numel()}",
        )


def _check_quant_bound(v: int, name: str) -> None:
    torch._check(
        -_QUANT_LIMIT <= v <= _QUANT_LIMIT,
        lambda: f"{name}: expected a value in [{-_QUANT_LIMIT}, {_QUANT_LIMIT}] (exact in float32), got {v}",
    )


def check_grad(grad: Tensor, x: Tensor) -> None:
    """fake_quant_backward's grad: shape, dtype and device of x (csrc/include/qops/fake_quant_args.h)."""
    torch._check(
        grad.shape == x.shape,
        lambda: f"grad: expected shape {tuple(x.shape)} like x, got {tuple(grad.shape)}",
    )
    torch._check(grad.dtype == x.dtype, lambda: f"grad: expected dtype {x.dtype} like x, got {grad.dtype}")
    torch._check(
        grad.device == x.device, lambda: f"grad: expected a tensor on {x.device} like x, got {grad.device}"
    )


@torch.library.register_fake("qops::fake_quant")
def _fake_quant_fake(x, scale, zero_point, axis, quant_min, quant_max, grad_factor=1.0):
    check_args(x, scale, zero_point, axis, quant_min, quant_max)
    # The kernels return torch.empty_like(x): x's strides when x is dense, else a dense layout in x's
    # dimension order (csrc/include/qops/fake_quant_args.h).
    return torch.empty_like(x)


@torch.library.register_fake("qops::fake_quant_backward")
def _fake_quant_backward_fake(grad, x, scale, zero_point, axis, quant_min, quant_max, grad_factor=1.0):
    check_args(x, scale, zero_point, axis, quant_min, quant_max)
    check_grad(grad, x)
    return torch.empty_like(x), scale.new_empty(scale.shape), zero_point.new_empty(zero_point.shape)


def _setup_context(ctx, inputs, output):
    x, scale, zero_point, axis, quant_min, quant_max, *grad_factor = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.qparams = (axis, quant_min, quant_max, *grad_factor)


def _no_double_backward(ctx, *grads):
    # Without this registration autograd would treat fake_quant_backward as constant and return zeros.
    raise RuntimeError("fake_quant: does not support double backward (gradients of gradients)")


def register_autograd(namespace: str) -> None:
    """The autograd formula of ``<namespace>::fake_quant`` (qops, or its Triton twin qops_triton): one call of
    ``<namespace>::fake_quant_backward``, which itself refuses double backward."""
    ops = getattr(torch.ops, namespace)

    def backward(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        grad_x, grad_scale, grad_zero_point = ops.fake_quant_backward(
            grad, x, scale, zero_point, *ctx.qparams
        )
        return (grad_x, grad_scale, grad_zero_point) + (None,) * len(ctx.qparams)

    torch.library.register_autograd(f"{namespace}::fake_quant", backward, setup_context=_setup_context)
    torch.library.register_autograd(
        f"{namespace}::fake_quant_backward",
        _no_double_backward,
        setup_context=lambda ctx, inputs, output: None,
    )


register_autograd("qops")


def fake_quant(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    axis: int,
    quant_min: int,
    quant_max: int,
    grad_factor: float = 1.0,
) -> Tensor:
    """Fake-quantizes ``x`` with a learnable step size and zero point (LSQ, Esser et al., ICLR 2020).

    ``y = (clamp(zp + round(x * (1/scale)), quant_min, quant_max) - zp) * scale`` with round half to even
    and ``zp = clamp(round(zero_point), quant_min, quant_max)``; equal to
    ``torch._fake_quantize_learnable_per_tensor_affine`` (``axis=-1``: ``scale`` and ``zero_point`` have
    one element) or ``..._per_channel_affine`` (one ``scale`` / ``zero_point`` per index of ``axis``;
    other negative axes count from the end, so the last axis per channel is ``x.dim() - 1``).

    Differentiable in ``x`` (straight-through inside the range), ``scale`` and ``zero_point`` (LSQ
    gradients, multiplied by ``grad_factor``, e.g. ``1/sqrt(numel * quant_max)`` as the paper suggests),
    through one fused backward pass (``torch.ops.qops.fake_quant_backward``).

    Args:
        x: float32 (CPU, CUDA) or float16 / bfloat16 (computed in float32) tensor, any layout.
        scale: positive step size(s), floating point, on x's device.
        zero_point: zero point(s), floating point (rounded as above), on x's device.
        axis: -1 for per tensor, else the channel axis.
        quant_min, quant_max: the integer range, ``quant_min < quant_max``, within ``[-2**23, 2**23]``.
        grad_factor: scales the gradients of ``scale`` and ``zero_point``.

    Returns:
        The fake-quantized tensor, like ``torch.empty_like(x)``.
    """
    return torch.ops.qops.fake_quant(x, scale, zero_point, axis, quant_min, quant_max, grad_factor)
