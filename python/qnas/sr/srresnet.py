"""SRResNet, the generator of SRGAN: Ledig et al., "Photo-Realistic Single Image Super-Resolution
Using a Generative Adversarial Network", CVPR 2017, https://arxiv.org/abs/1609.04802."""

from __future__ import annotations

import torch
from torch import nn

from qnas.sr.common import (
    MAX_BLOCKS,
    MAX_COLORS,
    MAX_FEATURES,
    Add,
    AddFactory,
    ConvFactory,
    Upsampler,
    check_positive_int,
    check_scale,
    default_conv,
)


def _prelu() -> nn.Module:
    # One slope per PReLU (channel-shared), as torch's default and most SRResNet re-implementations.
    return nn.PReLU()


class SRResBlock(nn.Module):
    """SRResNet residual block (Ledig et al., Fig. 4): conv3x3-BN-PReLU-conv3x3-BN + skip.
    Without BN (bn=False) the convolutions carry biases instead."""

    def __init__(self, n_feats: int, bn: bool, conv: ConvFactory = default_conv, add: AddFactory = Add):
        super().__init__()
        layers: list[nn.Module] = [conv(n_feats, n_feats, 3, bias=not bn)]
        if bn:
            layers.append(nn.BatchNorm2d(n_feats))
        layers.append(_prelu())
        layers.append(conv(n_feats, n_feats, 3, bias=not bn))
        if bn:
            layers.append(nn.BatchNorm2d(n_feats))
        self.body = nn.Sequential(*layers)
        self.add = add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add(self.body(x), x)


class SRResNet(nn.Module):
    """SRResNet / the SRGAN generator (Ledig et al., CVPR 2017, Fig. 4): a 9x9 head conv + PReLU,
    `n_blocks` (16) residual blocks with batch norm and PReLU, a 3x3 conv + BN with the long skip
    from the head, pixel-shuffle stages (x2: one, x4: two times conv to 4c + PS2 + PReLU; x3: one
    conv to 9c + PS3 + PReLU) and a 9x9 tail conv to RGB.

    Choices where the paper is silent or where SR practice differs (documented in docs/models.md):
    - input and output in [0, 1] with no output activation (the paper maps HR targets to [-1, 1]);
    - convolutions followed by BN have no bias (BN's shift makes it redundant);
    - PReLU with one shared slope;
    - bn=False drops every BN (common in SR practice since EDSR, and friendlier to quantization);
      the convolutions then have biases.
    `conv` and `add` are the quantization hooks described in qnas.sr.common.
    """

    def __init__(
        self,
        scale: int,
        n_blocks: int = 16,
        n_feats: int = 64,
        bn: bool = True,
        n_colors: int = 3,
        *,
        conv: ConvFactory = default_conv,
        add: AddFactory = Add,
    ):
        super().__init__()
        self.scale = check_scale(scale)
        check_positive_int("srresnet", "n_blocks", n_blocks, MAX_BLOCKS)
        check_positive_int("srresnet", "n_feats", n_feats, MAX_FEATURES)
        check_positive_int("srresnet", "n_colors", n_colors, MAX_COLORS)
        self.in_channels = n_colors
        self.head = nn.Sequential(conv(n_colors, n_feats, 9), _prelu())
        body: list[nn.Module] = [SRResBlock(n_feats, bn, conv, add) for _ in range(n_blocks)]
        body.append(conv(n_feats, n_feats, 3, bias=not bn))
        if bn:
            body.append(nn.BatchNorm2d(n_feats))
        self.body = nn.Sequential(*body)
        self.skip = add()
        self.upsample = Upsampler(scale, n_feats, conv, act=_prelu)
        self.tail = conv(n_feats, n_colors, 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(x)
        return self.tail(self.upsample(self.skip(self.body(x), x)))
