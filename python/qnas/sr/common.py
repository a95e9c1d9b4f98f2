"""Building blocks shared by the SR models, written so that every part can be quantized.

Quantization hooks (see docs/models.md):
- every convolution is created through a `conv` factory with the signature of `default_conv`
  (in_channels, out_channels, kernel_size, *, stride=1, padding=None, groups=1, bias=True); pass a
  factory that returns a quantized convolution and the whole network is built with it;
- every skip connection / residual addition is an `Add` module (made by an `add` factory), so a
  fully quantized network can quantize both inputs and the sum: z = Q(Q(x) + Q(y)) (FQSR);
- the fixed input/output normalisation of EDSR is a `MeanShift` module with buffers, no parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from qnas.errors import QnasError
from qnas.scale import SCALES, check_scale  # noqa: F401  (part of the models' API)

#: Mean RGB of the DIV2K training set in [0, 1], the constant of the EDSR reference code.
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)

ConvFactory = Callable[..., nn.Module]
AddFactory = Callable[[], nn.Module]


def default_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int | None = None,
    groups: int = 1,
    bias: bool = True,
) -> nn.Conv2d:
    """The convolution factory every model uses unless told otherwise: nn.Conv2d with "same"
    padding (kernel_size // 2) for odd kernels when `padding` is None."""
    if padding is None:
        padding = kernel_size // 2
    return nn.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups, bias=bias
    )


class Add(nn.Module):
    """A skip connection / residual sum x + y as a module, so that it can be found, replaced or
    quantized like a layer (FQSR quantizes skip connections: z = Q(Q(x) + Q(y)))."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


class NearestAnchor(nn.Module):
    """The global "anchor" skip of integer SR networks: y + the low-resolution input upsampled by
    `scale` with every pixel repeated (nearest). On the 8-bit input image it is a copy of integers
    (0 BitOps), so the network's layers only add the residual detail and the image's brightness never
    goes through a low-bit layer (the INT8 mobile SR designs use it, e.g. Du et al., "Anchor-based
    Plain Net for Mobile Image Super-Resolution", CVPRW 2021). A module, so that export can find it:
    it becomes an "upsample" node and an "add" before the output quantizer."""

    def __init__(self, scale: int):
        super().__init__()
        self.scale = int(scale)

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y + upsample_nearest(x, self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def upsample_nearest(x: torch.Tensor, scale: int) -> torch.Tensor:
    """x with every pixel repeated scale x scale times (exact for any dtype; the deploy runtime and the
    ONNX Resize of the anchor compute the same)."""
    return x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)


class MeanShift(nn.Module):
    """Adds sign * rgb_range * rgb_mean per channel: sign=-1 subtracts the data set mean at the
    input of EDSR, sign=+1 adds it back at the output.

    The reference EDSR code implements this as a frozen 1x1 convolution (rgb_std = 1, so the weight
    is the identity); here it is the same constant as a buffer, so it is neither a parameter (the
    parameter count matches the paper's) nor a convolution that a quantization pass would touch.
    """

    def __init__(self, rgb_mean: Sequence[float] = DIV2K_RGB_MEAN, rgb_range: float = 1.0, sign: int = -1):
        super().__init__()
        shift = torch.tensor([sign * rgb_range * m for m in rgb_mean], dtype=torch.float32)
        # Not persistent: a fixed constant rebuilt from the model config, not learned state.
        self.register_buffer("shift", shift.view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift


# Upper limits of the models' size arguments: far above the published models (EDSR: 256 features,
# 32 blocks), low enough that a config (a model.pt, --model-args) cannot make qnas build for hours;
# qnas.runs.network also bounds the total parameter count.
MAX_FEATURES = 2048
MAX_BLOCKS = 512
MAX_COLORS = 4


def check_positive_int(model: str, name: str, value: object, limit: int | None = None) -> int:
    """`value` if it is an integer in 1..limit (no limit: any positive one), else QnasError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise QnasError(f"{model}: {name} must be a positive integer, got {value!r}")
    if limit is not None and value > limit:
        raise QnasError(f"{model}: {name}={value} is larger than the {limit} qnas builds")
    return value


def pixel_shuffle_stages(scale: int) -> list[int]:
    """Pixel-shuffle factors of the EDSR/SRResNet upsamplers: x2 -> [2], x3 -> [3], x4 -> [2, 2]."""
    return {2: [2], 3: [3], 4: [2, 2]}[check_scale(scale)]


class Upsampler(nn.Sequential):
    """Sub-pixel upsampler (Shi et al., "Real-Time Single Image and Video Super-Resolution Using an
    Efficient Sub-Pixel Convolutional Neural Network", CVPR 2016) as used by EDSR and SRResNet:
    per stage r in pixel_shuffle_stages(scale), a 3x3 conv to r^2 * n_feats channels, PixelShuffle(r)
    and, when `act` is given, an activation made by act() (SRResNet: PReLU)."""

    def __init__(
        self,
        scale: int,
        n_feats: int,
        conv: ConvFactory = default_conv,
        act: Callable[[], nn.Module] | None = None,
        bias: bool = True,
    ):
        layers: list[nn.Module] = []
        for r in pixel_shuffle_stages(scale):
            layers.append(conv(n_feats, r * r * n_feats, 3, bias=bias))
            layers.append(nn.PixelShuffle(r))
            if act is not None:
                layers.append(act())
        super().__init__(*layers)
