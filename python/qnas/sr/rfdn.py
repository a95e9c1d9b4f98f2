"""RFDN: Liu, Tang, Wu, "Residual Feature Distillation Network for Lightweight Image
Super-Resolution", ECCV Workshops (AIM) 2020, https://arxiv.org/abs/2009.11551; reference code
https://github.com/njulj/RFDN (block.py, RFDN.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qnas.errors import QnasError
from qnas.sr.common import (
    MAX_BLOCKS,
    MAX_COLORS,
    MAX_FEATURES,
    Add,
    AddFactory,
    ConvFactory,
    check_positive_int,
    check_scale,
    default_conv,
)

ATTENTIONS = ("esa", "cca")


def _lrelu() -> nn.Module:
    return nn.LeakyReLU(0.05, inplace=True)  # the slope of the reference code


class ESA(nn.Module):
    """Enhanced Spatial Attention (Liu et al., "Residual Feature Aggregation Network for Image
    Super-Resolution", CVPR 2020), as RFDN uses it: 1x1 reduction to c/4, strided 3x3 conv, 7x7/3
    max-pool, a 3x3 conv group, bilinear upsampling back, 1x1 expansion, sigmoid mask on x.

    The strided conv and the pooling need at least 15x15 input pixels (see ESA.min_input_size)."""

    min_input_size = 15  # (H - 3) // 2 + 1 >= 7 for the 7x7 max-pool

    def __init__(self, n_feats: int, conv: ConvFactory = default_conv, add: AddFactory = Add):
        super().__init__()
        f = n_feats // 4
        self.conv1 = conv(n_feats, f, 1)
        self.conv_f = conv(f, f, 1)
        self.conv_max = conv(f, f, 3)
        self.conv2 = conv(f, f, 3, stride=2, padding=0)
        self.conv3 = conv(f, f, 3)
        self.conv3_ = conv(f, f, 3)
        self.conv4 = conv(f, n_feats, 1)
        self.add = add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1_ = self.conv1(x)
        c1 = self.conv2(c1_)
        v_max = F.max_pool2d(c1, kernel_size=7, stride=3)
        v_range = F.relu(self.conv_max(v_max))
        c3 = F.relu(self.conv3(v_range))
        c3 = self.conv3_(c3)
        c3 = F.interpolate(c3, (x.size(2), x.size(3)), mode="bilinear", align_corners=False)
        cf = self.conv_f(c1_)
        mask = torch.sigmoid(self.conv4(self.add(c3, cf)))
        return x * mask


class CCA(nn.Module):
    """Contrast-aware Channel Attention (Hui et al., "Lightweight Image Super-Resolution with
    Information Multi-distillation Network", ACM MM 2019): per-channel std + mean, 1x1 squeeze by
    `reduction`, ReLU, 1x1 excite, sigmoid weights on x.

    reduction=4 (IMDN's code uses 16): with it the "rfdn-paper" and "rfdn-l" presets have the
    parameter counts of the RFDN paper's tables (534K/541K/550K and 626K/633K/643K for x2/x3/x4)."""

    def __init__(self, n_feats: int, reduction: int = 4, conv: ConvFactory = default_conv):
        super().__init__()
        self.conv_du = nn.Sequential(
            conv(n_feats, n_feats // reduction, 1),
            nn.ReLU(inplace=True),
            conv(n_feats // reduction, n_feats, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = (x - mean).pow(2).mean(dim=(2, 3), keepdim=True).sqrt()
        return x * self.conv_du(std + mean)


class RFDB(nn.Module):
    """Residual Feature Distillation Block (Liu et al., ECCVW 2020, Fig. 2): three stages, each a
    1x1 distillation conv (nf -> nf/2, LeakyReLU) beside a shallow residual block SRB
    (3x3 conv + identity, LeakyReLU); a last 3x3 conv (nf -> nf/2); the four distilled parts
    concatenated, fused by a 1x1 conv back to nf and weighted by the attention (ESA or CCA).
    Layer names follow the reference code."""

    def __init__(
        self,
        nf: int,
        attention: str = "esa",
        conv: ConvFactory = default_conv,
        add: AddFactory = Add,
    ):
        super().__init__()
        dc = nf // 2  # distilled channels (the reference code's in_channels // 2)
        self.c1_d = conv(nf, dc, 1)
        self.c1_r = conv(nf, nf, 3)
        self.c2_d = conv(nf, dc, 1)
        self.c2_r = conv(nf, nf, 3)
        self.c3_d = conv(nf, dc, 1)
        self.c3_r = conv(nf, nf, 3)
        self.c4 = conv(nf, dc, 3)
        self.act = _lrelu()
        self.add1, self.add2, self.add3 = add(), add(), add()
        self.c5 = conv(4 * dc, nf, 1)
        if attention == "esa":
            self.esa = ESA(nf, conv, add)
        else:
            self.cca = CCA(nf, reduction=4, conv=conv)
        self.attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d1 = self.act(self.c1_d(x))
        r1 = self.act(self.add1(self.c1_r(x), x))
        d2 = self.act(self.c2_d(r1))
        r2 = self.act(self.add2(self.c2_r(r1), r1))
        d3 = self.act(self.c3_d(r2))
        r3 = self.act(self.add3(self.c3_r(r2), r2))
        r4 = self.act(self.c4(r3))
        fused = self.c5(torch.cat([d1, d2, d3, r4], dim=1))
        return self.esa(fused) if self.attention == "esa" else self.cca(fused)


class RFDN(nn.Module):
    """RFDN (Liu et al., ECCVW 2020): a 3x3 feature conv, `n_blocks` RFDBs in sequence, their
    outputs concatenated and fused by a 1x1 conv + LeakyReLU, a 3x3 "LR conv" with the long skip
    from the feature conv, and a one-step pixel-shuffle upsampler (3x3 conv to 3*scale^2 channels,
    PixelShuffle(scale)), for x2, x3 and x4 alike. No mean shift; input and output in [0, 1].

    Registry presets (docs/models.md compares their parameter counts with the paper's):
    - "rfdn": the reference code (github.com/njulj/RFDN, the E-RFDN of the AIM 2020 challenge):
      nf=50, 4 RFDBs, ESA attention;
    - "rfdn-paper" / "rfdn-l": the paper's Table models: nf=48 / 52, 6 RFDBs, CCA attention.
    With ESA the LR input must be at least 15x15 pixels (`min_input_size`).
    `conv` and `add` are the quantization hooks described in qnas.sr.common.
    """

    def __init__(
        self,
        scale: int,
        nf: int = 50,
        n_blocks: int = 4,
        attention: str = "esa",
        n_colors: int = 3,
        *,
        conv: ConvFactory = default_conv,
        add: AddFactory = Add,
    ):
        super().__init__()
        self.scale = check_scale(scale)
        check_positive_int("rfdn", "nf", nf, MAX_FEATURES)
        check_positive_int("rfdn", "n_blocks", n_blocks, MAX_BLOCKS)
        check_positive_int("rfdn", "n_colors", n_colors, MAX_COLORS)
        if attention not in ATTENTIONS:
            raise QnasError(f"rfdn: attention {attention!r} is not one of {', '.join(ATTENTIONS)}")
        if nf < 4:
            raise QnasError(f"rfdn: nf={nf} is too small for {attention} attention")
        self.in_channels = n_colors
        self.n_blocks = n_blocks
        self.min_input_size = ESA.min_input_size if attention == "esa" else 1
        self.fea_conv = conv(n_colors, nf, 3)
        for i in range(1, n_blocks + 1):  # B1..Bn as in the reference code (state-dict keys)
            setattr(self, f"B{i}", RFDB(nf, attention, conv, add))
        self.c = nn.Sequential(conv(nf * n_blocks, nf, 1), _lrelu())
        self.LR_conv = conv(nf, nf, 3)
        self.skip = add()
        self.upsampler = nn.Sequential(conv(nf, n_colors * scale * scale, 3), nn.PixelShuffle(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fea = self.fea_conv(x)
        outs = []
        h = fea
        for i in range(1, self.n_blocks + 1):
            h = getattr(self, f"B{i}")(h)
            outs.append(h)
        lr = self.skip(self.LR_conv(self.c(torch.cat(outs, dim=1))), fea)
        return self.upsampler(lr)
