"""EDSR: Lim, Son, Kim, Nah, Lee, "Enhanced Deep Residual Networks for Single Image
Super-Resolution", CVPR Workshops (NTIRE) 2017, https://arxiv.org/abs/1707.02921."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qnas.errors import QnasError
from qnas.sr.common import (
    DIV2K_RGB_MEAN,
    MAX_BLOCKS,
    MAX_COLORS,
    MAX_FEATURES,
    Add,
    AddFactory,
    ConvFactory,
    MeanShift,
    Upsampler,
    check_positive_int,
    check_scale,
    default_conv,
)


class ResBlock(nn.Module):
    """EDSR residual block without batch norm: x + res_scale * conv(relu(conv(x)))."""

    def __init__(
        self, n_feats: int, res_scale: float, conv: ConvFactory = default_conv, add: AddFactory = Add
    ):
        super().__init__()
        self.body = nn.Sequential(conv(n_feats, n_feats, 3), nn.ReLU(inplace=True), conv(n_feats, n_feats, 3))
        self.res_scale = res_scale
        self.add = add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.body(x)
        if self.res_scale != 1:
            res = res * self.res_scale
        return self.add(res, x)


class EDSR(nn.Module):
    """EDSR (Lim et al., CVPRW 2017): mean shift, head conv, `n_resblocks` residual blocks
    (conv-ReLU-conv, scaled by `res_scale`, plus the block input), a body conv and the long skip
    from the head, a pixel-shuffle upsampler (x2: conv to 4c + PS2; x3: conv to 9c + PS3; x4: two
    times conv to 4c + PS2), a tail conv to RGB and the mean added back.

    The paper's two models: EDSR = 32 blocks, 256 channels, res_scale 0.1 (registry name "edsr");
    the baseline = 16 blocks, 64 channels, no residual scaling ("edsr-baseline").

    Input and output are float RGB in [0, rgb_range]; the default rgb_range=1 means images in
    [0, 1], and the mean shift is scaled by rgb_range (the reference code trains with 255).
    `conv` and `add` are the quantization hooks described in qnas.sr.common.
    """

    def __init__(
        self,
        scale: int,
        n_resblocks: int = 16,
        n_feats: int = 64,
        res_scale: float = 1.0,
        n_colors: int = 3,
        rgb_range: float = 1.0,
        rgb_mean: Sequence[float] = DIV2K_RGB_MEAN,
        *,
        conv: ConvFactory = default_conv,
        add: AddFactory = Add,
    ):
        super().__init__()
        self.scale = check_scale(scale)
        check_positive_int("edsr", "n_resblocks", n_resblocks, MAX_BLOCKS)
        check_positive_int("edsr", "n_feats", n_feats, MAX_FEATURES)
        check_positive_int("edsr", "n_colors", n_colors, MAX_COLORS)
        if len(rgb_mean) != n_colors:
            raise QnasError(f"edsr: rgb_mean has {len(rgb_mean)} values for n_colors={n_colors}")
        self.in_channels = n_colors
        self.sub_mean = MeanShift(rgb_mean, rgb_range, sign=-1)
        # Module names follow the reference code (head.0, body.N.body.*, tail.0.*, tail.1), so its
        # released weights load once their sub_mean/add_mean entries are dropped.
        self.head = nn.Sequential(conv(n_colors, n_feats, 3))
        self.body = nn.Sequential(
            *[ResBlock(n_feats, res_scale, conv, add) for _ in range(n_resblocks)], conv(n_feats, n_feats, 3)
        )
        self.skip = add()
        self.tail = nn.Sequential(Upsampler(scale, n_feats, conv), conv(n_feats, n_colors, 3))
        self.add_mean = MeanShift(rgb_mean, rgb_range, sign=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.sub_mean(x))
        res = self.skip(self.body(x), x)
        return self.add_mean(self.tail(res))
