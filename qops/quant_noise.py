"""Python face of ``torch.ops.qops.quant_noise``: fake (meta) kernel, autograd, documented wrapper.

The kernels live in csrc/cpu/quant_noise.cpp (+ kernels/), csrc/cuda/quant_noise*.{cu,cpp} and
qops/triton/quant_noise.py; the random stream is defined in csrc/include/qops/philox.h and the
pure-torch reference is :func:`qops.reference.quant_noise`.
"""

from __future__ import annotations

import torch

from .reference import NOISE_DISTS


def check_args(x: torch.Tensor, bits: int, axis: int, dist: str) -> None:
    # The same checks (and messages) as csrc/include/qops/quant_noise_args.h, for the fake kernel (tracing
    # under torch.compile fails like eager does) and the Triton kernel.
    torch._check(x.is_floating_point(), lambda: f"x: expected a floating-point tensor, got {x.dtype}")
    torch._check(1 <= bits <= 16, lambda: f"bits: expected a bit-width in 1..16, got {bits}")
    torch._check(dist in NOISE_DISTS, lambda: f'dist: expected "gaussian" or "uniform", got "{dist}"')
    torch._check(
        axis == -1 or -x.dim() <= axis < x.dim(),
        lambda: f"axis: {axis} is out of range for a tensor with {x.dim()} dimensions",
    )


@torch.library.register_fake("qops::quant_noise")
def _quant_noise_fake(x, bits, seed, axis=-1, dist="gaussian"):
    check_args(x, bits, axis, dist)
    return x.new_empty(x.shape)  # the kernels return a contiguous tensor


def _setup_context(ctx, inputs, output):
    ctx.n_inputs = len(inputs)


def _quant_noise_backward(ctx, grad):
    # Identity for x: the range (hence delta) is treated as a constant, as QuantNAS does when it
    # perturbs weights and activations during the search. bits, seed, axis, dist: not differentiable.
    return (grad,) + (None,) * (ctx.n_inputs - 1)


def register_autograd(namespace: str) -> None:
    """The autograd formula of ``<namespace>::quant_noise`` (qops, or its Triton twin qops_triton)."""
    torch.library.register_autograd(
        f"{namespace}::quant_noise", _quant_noise_backward, setup_context=_setup_context
    )


register_autograd("qops")


def quant_noise(
    x: torch.Tensor, bits: int, seed: int, axis: int = -1, dist: str = "gaussian"
) -> torch.Tensor:
    """Adds quantization noise to ``x``: ``y = x + delta * eps / 2``.

    This is the differentiable surrogate of quantization that QuantNAS (Shvetsov et al., "QuantNAS for
    super resolution: searching for efficient quantization-friendly architectures against quantization
    noise", arXiv:2210.17512) injects into weights and activations during the architecture search.

    Args:
        x: floating-point tensor (CPU: float32, float64, float16, bfloat16; CUDA and Triton likewise,
            half types computed in float32). Any strides; the result is contiguous.
        bits: bit-width in 1..16 the noise stands for.
        seed: any int64. The noise is a pure function of (seed, element index): element ``i`` of
            ``x`` in logical row-major order takes eps from Philox4x32-10 keyed by the seed with counter
            ``(i // 4 low word, i // 4 high word, stream=0, 0)``; see csrc/include/qops/philox.h.
            CPU (every ISA), CUDA, Triton and :func:`qops.reference.quant_noise` give the same bits.
        axis: -1 for one range over the whole tensor; otherwise one range per index of that
            dimension (negative values other than -1 count from the end, e.g. -2).
        dist: ``"gaussian"`` (eps ~ N(0, 1), |eps| <= 5.77) or ``"uniform"`` (eps ~ U(-1, 1)).

    Returns:
        ``x + delta * eps / 2`` with ``delta = (max - min) / (2^bits - 1)`` of the tensor or slice,
        computed in float32 (float64 for float64 input) with one fused multiply-add, in ``x``'s dtype.
        A constant tensor or slice (delta = 0) is returned unchanged. The noise has standard
        deviation delta/2 (gaussian) or delta/(2 sqrt 3) (uniform; the rounding error of a uniform
        quantizer has delta/sqrt 12).

    Gradient: d y / d x is the identity. min and max are treated as constants (no gradient flows
    through delta), as in QuantNAS; ``bits``, ``seed``, ``axis`` and ``dist`` are not differentiable.
    """
    return torch.ops.qops.quant_noise(x, bits, seed, axis, dist)


__all__ = ["quant_noise"]
