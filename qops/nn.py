"""Thin torch.nn modules over the qops ops.

MixedQuantConv2d is the searchable layer of QuantNAS (Shvetsov et al., "QuantNAS for super resolution:
searching for efficient quantization-friendly architectures against quantization noise"): a DARTS-style
mixture (Liu et al., "DARTS: Differentiable Architecture Search") over (operation, weight bits, activation
bits) with LSQ fake quantization (Esser et al., "Learned Step Size Quantization") or quantization noise.

:class:`PackedConv2d` is the deployment form of a fake-quantized convolution (QuantNAS / DQSS / FQSR
layers after training): bit-packed weight codes, per-output-channel weight steps, one activation step,
and :func:`qops.packed.quantized_conv2d` (exact integer convolution) in ``forward``. It is inference-only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from . import reference
from .mixed_quant_conv import MixedQuantConvSpec, mixed_quant_conv
from .packed import pack_weight, quantize_weight, quantized_conv2d
from .ranges import quant_range

__all__ = ["MixedQuantConv2d", "PackedConv2d", "alpha_parameters", "weight_parameters"]


def _pair(k) -> tuple[int, int]:
    return (int(k), int(k)) if isinstance(k, int) else (int(k[0]), int(k[1]))


def _grad_scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    """t in the forward, gradient times `factor` in the backward (LSQ's step-size gradient scale)."""
    scaled = t * factor
    return (t - scaled).detach() + scaled


class MixedQuantConv2d(nn.Module):
    """y = sum_{o,i,j} softmax(alphas)[o,i,j] * conv_o(FQa_j(x), FQw_i(W_o)) + bias (QuantNAS' mixed layer).

    Args:
        in_ch, out_ch: channels.
        candidates: one dict per candidate convolution: ``kernel`` (int or (kh, kw), odd), ``groups`` (default
            1), ``dilation`` (default 1); every candidate pads "same". Composite candidates (a 3x1 followed by a
            1x3, attention, ...) are not one convolution: mix them beside this layer with the same softmax.
        w_bits, a_bits: bit-widths searched for weights and activations; 0 means full precision.
        tie_bits: only the (w_bits[i] == a_bits[j]) pairs are candidates (the others get probability 0),
            as QuantNAS ties weight and activation bit-widths.
        a_signed: signed activation range (e.g. after a layer that can go negative); unsigned otherwise.
        stride, bias: as nn.Conv2d.
        mode: "quant" (LSQ fake quantization) or "noise" (quantization noise, QuantNAS' search mode).
        impl: "fused" (torch.ops.qops.mixed_quant_conv) or "naive" (the per-term loop of qops.reference over
            the allowed terms; the baseline the fused op is measured against).

    Parameters: ``weights.<o>`` (candidate kernels), ``bias``, ``w_scales`` [n_ops, len(w_bits)] and
    ``a_scales`` [len(a_bits)] (LSQ steps, initialized from data on the first forward as 2 mean|v| /
    sqrt(qmax), gradients scaled by 1 / sqrt(numel * qmax)) and ``alphas`` [n_ops, len(w_bits), len(a_bits)]
    (architecture logits). :func:`alpha_parameters` / :func:`weight_parameters` split a model's parameters
    into the two groups of DARTS' alternating optimization.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        candidates: Sequence[dict] = (dict(kernel=3),),
        w_bits: Sequence[int] = (4, 8),
        a_bits: Sequence[int] = (4, 8),
        tie_bits: bool = True,
        a_signed: bool = False,
        stride: int = 1,
        bias: bool = True,
        mode: str = "quant",
        impl: str = "fused",
    ):
        super().__init__()
        if mode not in ("quant", "noise"):
            raise ValueError(f'mode: expected "quant" or "noise", got {mode!r}')
        if impl not in ("fused", "naive"):
            raise ValueError(f'impl: expected "fused" or "naive", got {impl!r}')
        if not candidates:
            raise ValueError("candidates: expected at least one candidate convolution")
        self.in_ch, self.out_ch = in_ch, out_ch
        self.w_bits, self.a_bits = [int(b) for b in w_bits], [int(b) for b in a_bits]
        for name, bits in (("w_bits", self.w_bits), ("a_bits", self.a_bits)):
            if not bits or any(b != 0 and not 2 <= b <= 8 for b in bits):
                raise ValueError(f"{name}: expected bit-widths in {{0, 2..8}}, got {bits}")
        self.tie_bits, self.a_signed, self.stride = tie_bits, a_signed, int(stride)
        self.mode, self.impl = mode, impl
        self.kernels, self.groups, self.dilations = [], [], []
        weights = []
        for c in candidates:
            kh, kw = _pair(c.get("kernel", 3))
            g, d = int(c.get("groups", 1)), int(c.get("dilation", 1))
            if kh % 2 == 0 or kw % 2 == 0:
                raise ValueError(f"candidates: kernel sizes must be odd, got {(kh, kw)}")
            if in_ch % g or out_ch % g:
                raise ValueError(f"candidates: groups={g} must divide in_ch={in_ch} and out_ch={out_ch}")
            w = torch.empty(out_ch, in_ch // g, kh, kw)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # nn.Conv2d's default
            weights.append(nn.Parameter(w))
            self.kernels.append((kh, kw))
            self.groups.append(g)
            self.dilations.append(d)
        self.weights = nn.ParameterList(weights)
        self.spec = MixedQuantConvSpec(
            self.w_bits, self.a_bits, self.groups, self.dilations, a_signed, self.stride, mode
        )
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        n_ops, n_w, n_a = len(weights), len(self.w_bits), len(self.a_bits)
        self.w_scales = nn.Parameter(torch.ones(n_ops, n_w))
        self.a_scales = nn.Parameter(torch.ones(n_a))
        self.alphas = nn.Parameter(1e-3 * torch.randn(n_ops, n_w, n_a))
        allowed = torch.ones(n_ops, n_w, n_a, dtype=torch.bool)
        if tie_bits:
            tie = torch.tensor([[wb == ab for ab in self.a_bits] for wb in self.w_bits])
            if not tie.any():
                raise ValueError(
                    f"tie_bits: w_bits {self.w_bits} and a_bits {self.a_bits} share no bit-width"
                )
            allowed &= tie.unsqueeze(0)
        self.register_buffer("allowed", allowed, persistent=False)
        self._terms = allowed.tolist()
        # LSQ's data-driven step init happens once; the buffer carries it through state_dict, the Python flag
        # keeps the check free of tensor reads (torch.compile guards on it).
        self.register_buffer("scales_initialized", torch.zeros((), dtype=torch.bool))
        self._scales_initialized = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._scales_initialized = bool(self.scales_initialized)

    def probs(self) -> torch.Tensor:
        """softmax over every allowed (op, w_bits, a_bits) entry; disallowed entries are exactly 0."""
        logits = self.alphas.masked_fill(~self.allowed, float("-inf"))
        return torch.softmax(logits.flatten(), 0).view_as(self.alphas)

    @staticmethod
    def _qmax(bits: int, signed: bool) -> int:
        return quant_range(bits, signed)[1]

    @torch.no_grad()
    def _init_scales(self, x: torch.Tensor) -> None:
        w_init = torch.ones_like(self.w_scales)
        for o, w in enumerate(self.weights):
            for i, b in enumerate(self.w_bits):
                if b:
                    w_init[o, i] = 2 * w.abs().mean() / math.sqrt(self._qmax(b, True))
        a_init = torch.ones_like(self.a_scales)
        for j, b in enumerate(self.a_bits):
            if b:
                a_init[j] = 2 * x.abs().mean() / math.sqrt(self._qmax(b, self.a_signed))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every DDP rank sees other data: agree on the mean so the replicas stay identical.
            both = torch.cat([w_init.flatten(), a_init])
            torch.distributed.all_reduce(both)
            both /= torch.distributed.get_world_size()
            w_init, a_init = both[: w_init.numel()].view_as(w_init), both[w_init.numel() :]
        self.w_scales.copy_(w_init.clamp_min(1e-8))
        self.a_scales.copy_(a_init.clamp_min(1e-8))
        self.scales_initialized.fill_(True)
        self._scales_initialized = True

    def _lsq_scales(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The scales with LSQ's gradient scale 1 / sqrt(numel * qmax) (numel: the candidate's weights, one
        sample's activations)."""
        wf = [
            [1.0 / math.sqrt(w.numel() * self._qmax(b, True)) if b else 1.0 for b in self.w_bits]
            for w in self.weights
        ]
        af = [1.0 / math.sqrt(x[0].numel() * self._qmax(b, self.a_signed)) if b else 1.0 for b in self.a_bits]
        w_factor = torch.tensor(wf, dtype=x.dtype, device=x.device)
        a_factor = torch.tensor(af, dtype=x.dtype, device=x.device)
        return _grad_scaled(self.w_scales, w_factor), _grad_scaled(self.a_scales, a_factor)

    def forward(self, x: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """``seed`` feeds noise mode (default: drawn from torch's generator, so torch.manual_seed repeats it)."""
        if not self._scales_initialized and self.mode == "quant":
            self._init_scales(x)
        w_scales, a_scales = self._lsq_scales(x)
        if self.mode == "noise" and seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        args = (x, list(self.weights), self.probs(), w_scales, a_scales, self.bias, self.spec, seed or 0)
        if self.impl == "naive":
            return reference.mixed_quant_conv(*args, terms=self._terms)
        return mixed_quant_conv(*args)

    def extra_repr(self) -> str:
        cands = ", ".join(
            f"{kh}x{kw}" + (f"/g{g}" if g > 1 else "") + (f"/d{d}" if d > 1 else "")
            for (kh, kw), g, d in zip(self.kernels, self.groups, self.dilations, strict=True)
        )
        return (
            f"{self.in_ch}, {self.out_ch}, candidates=[{cands}], w_bits={self.w_bits}, a_bits={self.a_bits}, "
            f"tie_bits={self.tie_bits}, stride={self.stride}, mode={self.mode}, impl={self.impl}"
        )


def alpha_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The architecture parameters (named ``alphas``) of a model, as DARTS optimizes them apart."""
    for name, p in model.named_parameters():
        if name.split(".")[-1] == "alphas":
            yield p


def weight_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Every other parameter: weights, biases, quantizer scales."""
    for name, p in model.named_parameters():
        if name.split(".")[-1] != "alphas":
            yield p


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
