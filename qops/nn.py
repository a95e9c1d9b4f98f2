"""Thin modules over the qops ops.

:class:`PackedConv2d` is the deployment form of a fake-quantized convolution (QuantNAS / DQSS / FQSR
layers after training): bit-packed weight codes, per-output-channel weight steps, one activation step,
and :func:`qops.packed.quantized_conv2d` (exact integer convolution) in ``forward``. It is inference-only.
"""

from __future__ import annotations

import torch
from torch import nn

from .packed import pack_weight, quantize_weight, quantized_conv2d

__all__ = ["PackedConv2d"]


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class PackedConv2d(nn.Module):
    """A convolution with ``w_bits``-bit packed weights and ``a_bits``-bit activations.

    forward(x) = quantized_conv2d(x): codes = clamp(nearbyint(x / a_scale)) (unsigned [0, 2^a-1], or signed
    when ``a_signed``), exact integer convolution with the weight codes, out = acc * w_scale[c] * a_scale
    + bias[c]. This equals conv2d(FQa(x), FQw(w)) + bias of the fake-quantized convolution it came from
    up to float rounding (FQ = fake_quant with zero point 0). Buffers: ``w_packed`` (uint8), ``w_scale``
    ([Cout] float32), ``bias`` (or None); geometry and bits are attributes.
    """

    def __init__(
        self,
        w_packed: torch.Tensor,
        w_shape: tuple[int, int, int, int] | list[int],
        w_scale: torch.Tensor,
        a_scale: float,
        w_bits: int,
        a_bits: int,
        a_signed: bool = False,
        bias: torch.Tensor | None = None,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.w_shape = tuple(int(v) for v in w_shape)
        self.w_bits, self.a_bits, self.a_signed = int(w_bits), int(a_bits), bool(a_signed)
        self.a_scale = float(a_scale)
        self.stride, self.padding = _pair(stride), _pair(padding)
        cout = self.w_shape[0]
        w_scale = torch.as_tensor(w_scale, dtype=torch.float32).reshape(-1)
        if w_scale.numel() == 1:
            w_scale = w_scale.expand(cout)
        # Checked once here: the CUDA kernel does not read the scales back to the host on every call.
        if w_scale.numel() != cout or not bool(torch.all(torch.isfinite(w_scale) & (w_scale > 0))):
            raise ValueError(
                f"w_scale: expected {cout} positive finite steps (or one), got {w_scale.tolist()}"
            )
        if not (self.a_scale > 0 and self.a_scale < float("inf")):
            raise ValueError(f"a_scale: expected a positive finite step, got {a_scale}")
        self.register_buffer("w_packed", w_packed.detach().to(torch.uint8))
        self.register_buffer("w_scale", w_scale.detach().clone().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        w_scale: torch.Tensor | float,
        a_scale: float,
        w_bits: int,
        a_bits: int,
        a_signed: bool = False,
        bias: torch.Tensor | None = None,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
    ) -> PackedConv2d:
        """Quantizes and packs a float weight [Cout, Cin, kh, kw] with per-channel steps ``w_scale``
        (codes = clamp(nearbyint(w / s)) as fake_quant computes them; 1 bit: sign(w) as -1/+1)."""
        w_scale = torch.as_tensor(w_scale, dtype=torch.float32, device=weight.device).reshape(-1)
        codes = quantize_weight(weight.detach(), w_scale, w_bits)
        return cls(
            pack_weight(codes, w_bits),
            weight.shape,
            w_scale,
            a_scale,
            w_bits,
            a_bits,
            a_signed,
            bias,
            stride,
            padding,
        )

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        w_scale: torch.Tensor | float,
        a_scale: float,
        w_bits: int,
        a_bits: int,
        a_signed: bool = False,
    ) -> PackedConv2d:
        """From a trained (fake-quantized) ``nn.Conv2d``-like module: its weight, bias, stride and padding, with
        the weight steps and activation step its quantizers learned."""
        if getattr(conv, "groups", 1) != 1 or _pair(getattr(conv, "dilation", 1)) != (1, 1):
            raise ValueError("conv: PackedConv2d supports groups=1 and dilation=1 only")
        if getattr(conv, "padding_mode", "zeros") != "zeros":
            raise ValueError(f"conv: padding_mode must be 'zeros', got {conv.padding_mode!r}")
        padding = conv.padding
        if isinstance(padding, str):
            if padding == "valid":
                padding = (0, 0)
            else:  # "same" with stride 1 and odd kernels
                kh, kw = conv.weight.shape[2:]
                if kh % 2 == 0 or kw % 2 == 0:
                    raise ValueError("conv: padding='same' needs odd kernel sizes")
                padding = (kh // 2, kw // 2)
        bias = None if conv.bias is None else conv.bias.detach()
        return cls.from_float(
            conv.weight.detach(), w_scale, a_scale, w_bits, a_bits, a_signed, bias, conv.stride, padding
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_conv2d(
            x,
            self.w_packed,
            self.w_shape,
            self.w_scale,
            self.a_scale,
            self.w_bits,
            self.a_bits,
            self.a_signed,
            self.bias,
            self.stride,
            self.padding,
        )

    def extra_repr(self) -> str:
        cout, cin, kh, kw = self.w_shape
        return (
            f"{cin}, {cout}, kernel_size=({kh}, {kw}), stride={self.stride}, padding={self.padding}, "
            f"w_bits={self.w_bits}, a_bits={self.a_bits}, a_signed={self.a_signed}, a_scale={self.a_scale:g}, "
            f"bias={self.bias is not None}"
        )
