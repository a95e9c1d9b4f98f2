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

from . import _C

__all__ = ["fake_quant"]


def _check_devices(x: Tensor, **others: Tensor) -> None:
    # The C++ checks do this too; here it also covers mixes that dispatch to the fake kernel (meta tensors).
    for name, t in others.items():
        if t.device != x.device:
            raise RuntimeError(f"{name}: expected a tensor on {x.device} like x, got {t.device}")


@torch.library.register_fake("qops::fake_quant")
def _fake_quant_fake(x, scale, zero_point, axis, quant_min, quant_max, grad_factor=1.0):
    _check_devices(x, scale=scale, zero_point=zero_point)
    # The kernels return torch.empty_like(x): x's strides when x is dense, else a dense layout in x's
    # dimension order (csrc/include/qops/fake_quant_args.h).
    return torch.empty_like(x)


@torch.library.register_fake("qops::fake_quant_backward")
def _fake_quant_backward_fake(grad, x, scale, zero_point, axis, quant_min, quant_max, grad_factor=1.0):
    _check_devices(x, grad=grad, scale=scale, zero_point=zero_point)
    return torch.empty_like(x), scale.new_empty(scale.shape), zero_point.new_empty(zero_point.shape)


def _setup_context(ctx, inputs, output):
    x, scale, zero_point, axis, quant_min, quant_max, grad_factor = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.qparams = (axis, quant_min, quant_max, grad_factor)


def _backward(ctx, grad):
    x, scale, zero_point = ctx.saved_tensors
    grad_x, grad_scale, grad_zero_point = torch.ops.qops.fake_quant_backward(
        grad, x, scale, zero_point, *ctx.qparams
    )
    return grad_x, grad_scale, grad_zero_point, None, None, None, None


torch.library.register_autograd("qops::fake_quant", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    # Without this registration autograd would treat fake_quant_backward as constant and return zeros.
    raise RuntimeError("fake_quant: does not support double backward (gradients of gradients)")


torch.library.register_autograd(
    "qops::fake_quant_backward", _no_double_backward, setup_context=lambda ctx, inputs, output: None
)


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


def register_triton_cuda_fallback() -> bool:
    """Registers the Triton kernels (qops/triton/fake_quant.py) as the CUDA kernels of
    torch.ops.qops.fake_quant / fake_quant_backward; False where triton is not installed.

    ``import qops`` calls it where torch has CUDA but qops._C was built without it (bitsandbytes-style
    fallback), so that CUDA tensors work without compiling the extension's CUDA sources.
    """
    try:
        from .triton import fake_quant as triton_fake_quant
    except ImportError:  # triton not installed: CUDA tensors get torch's "no kernel" error
        return False
    torch.library.register_kernel("qops::fake_quant", "cuda", triton_fake_quant.fake_quant_impl)
    torch.library.register_kernel(
        "qops::fake_quant_backward", "cuda", triton_fake_quant.fake_quant_backward_impl
    )
    return True


if torch.version.cuda is not None and not _C.built_with_cuda():
    register_triton_cuda_fallback()
