"""Pure-torch references of every torch.ops.qops op: the specification the tests compare against.

Each function has the op's signature and semantics (shared/DESIGN.md, "Op contracts") and is written
for clarity, not speed. Where torch has a built-in with the same meaning (LSQ fake quantization), the
reference is that built-in.
"""

from __future__ import annotations

import torch


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
