"""SRGAN adversarial training pieces: Ledig et al., "Photo-Realistic Single Image Super-Resolution
Using a Generative Adversarial Network", CVPR 2017, https://arxiv.org/abs/1609.04802.

The generator is SRResNet (qnas.sr.srresnet). Here: the discriminator, the VGG19 feature network
for the perceptual (content) loss, the losses, and one adversarial update step that a training loop
calls. Nothing is downloaded: the VGG loss needs a local VGG19 weights file in torchvision's
format (a state_dict with keys "features.N.weight" / "features.N.bias"), read with safetensors
(*.safetensors) or torch.load(weights_only=True) (anything else).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qnas.errors import CheckpointError, QnasError
from qnas.sr.common import ConvFactory, check_positive_int, default_conv

#: Weight of the adversarial term in the generator loss (Ledig et al., Eq. 3).
ADVERSARIAL_WEIGHT = 1e-3
#: The paper rescales VGG feature maps by 1/12.75 so that the VGG loss is on the scale of the MSE.
VGG_FEATURE_SCALE = 1.0 / 12.75

# ImageNet statistics the torchvision VGG19 weights were trained with (inputs in [0, 1]).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class SRGANDiscriminator(nn.Module):
    """The SRGAN discriminator (Ledig et al., Fig. 4): conv3x3 64 + LeakyReLU(0.2), then seven
    conv3x3-BN-LeakyReLU blocks (64 s2, 128 s1, 128 s2, 256 s1, 256 s2, 512 s1, 512 s2), a dense
    layer of 1024 units, LeakyReLU and a dense layer to one logit.

    The dense layer sees the flattened 512 x (input_size/16)^2 features, so the discriminator is
    built for one HR patch size (the paper's 96 -> 6x6x512). forward returns logits [N, 1]; the
    paper's final sigmoid is folded into the BCE-with-logits losses below.
    """

    def __init__(
        self,
        input_size: int = 96,
        in_channels: int = 3,
        base_channels: int = 64,
        *,
        conv: ConvFactory = default_conv,
    ):
        super().__init__()
        check_positive_int("srgan discriminator", "input_size", input_size)
        check_positive_int("srgan discriminator", "base_channels", base_channels)
        if input_size % 16:
            raise QnasError(f"srgan discriminator: input_size {input_size} must be a multiple of 16")
        self.input_size = input_size
        self.in_channels = in_channels
        c = base_channels
        layers: list[nn.Module] = [conv(in_channels, c, 3), nn.LeakyReLU(0.2, inplace=True)]
        # (out_channels, stride) of the seven BN blocks; BN makes the conv bias redundant.
        blocks = [(c, 2), (2 * c, 1), (2 * c, 2), (4 * c, 1), (4 * c, 2), (8 * c, 1), (8 * c, 2)]
        prev = c
        for out, stride in blocks:
            layers += [
                conv(prev, out, 3, stride=stride, bias=False),
                nn.BatchNorm2d(out),
                nn.LeakyReLU(0.2, True),
            ]
            prev = out
        self.features = nn.Sequential(*layers)
        side = input_size // 16
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(prev * side * side, 1024), nn.LeakyReLU(0.2, True), nn.Linear(1024, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-2:] != (self.input_size, self.input_size):
            raise QnasError(
                f"srgan discriminator: expected [N, {self.in_channels}, {self.input_size}, {self.input_size}] "
                f"HR patches, got {list(x.shape)}"
            )
        return self.classifier(self.features(x))


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(I_HR) - log(1 - D(G(I_LR))) averaged over the batch, as BCE with logits."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return real + fake


def adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial term -log D(G(I_LR)) (Ledig et al., Eq. 6), BCE with logits."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


# torchvision's VGG19 "features": configuration E of Simonyan & Zisserman, "Very Deep Convolutional
# Networks for Large-Scale Image Recognition", ICLR 2015 ("M" = 2x2 max-pool).
VGG19_CFG = [
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    512,
    "M",
]


def _vgg19_layer_indices() -> dict[str, int]:
    """Names of the layers of VGG19.features -> their index: conv{i}_{j}, relu{i}_{j}, pool{i}."""
    names: dict[str, int] = {}
    idx, stage, conv = 0, 1, 0
    for v in VGG19_CFG:
        if v == "M":
            names[f"pool{stage}"] = idx
            idx, stage, conv = idx + 1, stage + 1, 0
        else:
            conv += 1
            names[f"conv{stage}_{conv}"] = idx
            names[f"relu{stage}_{conv}"] = idx + 1
            idx += 2
    return names


VGG19_LAYERS = _vgg19_layer_indices()
#: The SRGAN paper's VGG losses: phi_{2,2} and phi_{5,4}, after the activation.
VGG_CONTENT_LAYERS = {"vgg22": "relu2_2", "vgg54": "relu5_4"}


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(
            f"{path}: VGG19 weights file not found (pass a local torchvision-format VGG19 state_dict; nothing is downloaded)"
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).strip()[:160]})") from e
    from qnas.runs.folder import load_torch_file

    state = load_torch_file(path, "VGG19 weights file")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: expected a state_dict (a dict of tensors), got {type(state).__name__}"
        )
    return state


class VGG19Features(nn.Module):
    """VGG19 feature extractor up to `layer` (a name of VGG19_LAYERS, e.g. "relu5_4"), frozen, with
    the weights of a local torchvision-format file. Inputs are RGB in [0, 1]; the ImageNet
    normalisation the weights expect is applied inside."""

    def __init__(self, weights_path: str | os.PathLike, layer: str = "relu5_4"):
        super().__init__()
        if layer not in VGG19_LAYERS:
            raise QnasError(f"unknown VGG19 layer {layer!r} (known: conv1_1 ... relu5_4, pool1 ... pool5)")
        last = VGG19_LAYERS[layer]
        modules: list[nn.Module] = []
        in_ch = 3
        for v in VGG19_CFG:
            if v == "M":
                modules.append(nn.MaxPool2d(2, 2))
            else:
                modules += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU(inplace=False)]
                in_ch = v
        self.features = nn.Sequential(*modules[: last + 1])
        self.layer = layer
        self._load(Path(weights_path))
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _load(self, path: Path) -> None:
        state = _load_state_dict(path)
        wanted = {f"features.{k}": v for k, v in self.features.state_dict().items()}
        missing = [k for k in wanted if k not in state]
        if missing:
            found = ", ".join(sorted(state)[:3]) or "nothing"
            raise CheckpointError(
                f"{path}: not a torchvision VGG19 state_dict: {missing[0]} is missing (found {found}, ...)"
            )
        for key, ref in wanted.items():
            t = state[key]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(ref.shape):
                shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise CheckpointError(f"{path}: {key} has shape {shape}, VGG19 needs {list(ref.shape)}")
        self.features.load_state_dict({k[len("features.") :]: state[k].float() for k in wanted})

    def train(self, mode: bool = True) -> VGG19Features:
        return super().train(False)  # a fixed feature network: never in training mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features((x - self.mean) / self.std)


class VGGLoss(nn.Module):
    """SRGAN's VGG content loss (Ledig et al., Eq. 5): MSE between VGG19 feature maps phi_{i,j} of
    the super-resolved and the HR image, each map rescaled by `feature_scale` (the paper's 1/12.75)."""

    def __init__(
        self,
        weights_path: str | os.PathLike,
        layer: str = "relu5_4",
        feature_scale: float = VGG_FEATURE_SCALE,
    ):
        super().__init__()
        self.vgg = VGG19Features(weights_path, layer)
        self.feature_scale = feature_scale

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.vgg(hr) * self.feature_scale
        return F.mse_loss(self.vgg(sr) * self.feature_scale, target)


class GeneratorLoss(nn.Module):
    """The SRGAN perceptual loss (Ledig et al., Eq. 3): content + adv_weight * adversarial.

    content: "mse" (pixel MSE, the paper's SRGAN-MSE), "vgg22" or "vgg54" (VGG feature MSE, needs
    `vgg_weights`, a local torchvision VGG19 file). Default: "vgg54" when vgg_weights is given,
    else "mse". forward returns {"total", "content", "adversarial"}.
    """

    def __init__(
        self,
        content: str | None = None,
        vgg_weights: str | os.PathLike | None = None,
        adv_weight: float = ADVERSARIAL_WEIGHT,
    ):
        super().__init__()
        if content is None:
            content = "vgg54" if vgg_weights is not None else "mse"
        if content not in ("mse", *VGG_CONTENT_LAYERS):
            raise QnasError(f"unknown content loss {content!r} (use mse, vgg22 or vgg54)")
        if content != "mse":
            if vgg_weights is None:
                raise QnasError(
                    f"content loss {content} needs a local VGG19 weights file (torchvision format); nothing is downloaded"
                )
            self.vgg_loss: VGGLoss | None = VGGLoss(vgg_weights, VGG_CONTENT_LAYERS[content])
        else:
            self.vgg_loss = None
        self.content = content
        self.adv_weight = adv_weight

    def forward(
        self, sr: torch.Tensor, hr: torch.Tensor, fake_logits: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        content = F.mse_loss(sr, hr) if self.vgg_loss is None else self.vgg_loss(sr, hr)
        adv = adversarial_loss(fake_logits)
        return {"total": content + self.adv_weight * adv, "content": content, "adversarial": adv}


def adversarial_step(
    generator: nn.Module,
    discriminator: nn.Module,
    g_optimizer: torch.optim.Optimizer,
    d_optimizer: torch.optim.Optimizer,
    lr: torch.Tensor,
    hr: torch.Tensor,
    loss: GeneratorLoss,
) -> dict[str, float]:
    """One SRGAN update (Goodfellow et al.'s alternating scheme as in Ledig et al.): the
    discriminator on (hr, generator(lr).detach()), then the generator on `loss`. Returns the
    losses as floats for logging: d_loss, g_loss, content, adversarial, d_real, d_fake (mean
    sigmoid outputs)."""
    sr = generator(lr)
    d_optimizer.zero_grad(set_to_none=True)
    real_logits = discriminator(hr)
    fake_logits = discriminator(sr.detach())
    d_loss = discriminator_loss(real_logits, fake_logits)
    d_loss.backward()
    d_optimizer.step()

    g_optimizer.zero_grad(set_to_none=True)
    # The discriminator is a fixed function during the generator's step: no gradients for it.
    d_flags = [p.requires_grad for p in discriminator.parameters()]
    discriminator.requires_grad_(False)
    try:
        parts = loss(sr, hr, discriminator(sr))
        parts["total"].backward()
    finally:
        for p, flag in zip(discriminator.parameters(), d_flags, strict=True):
            p.requires_grad_(flag)
    g_optimizer.step()
    return {
        "d_loss": d_loss.item(),
        "g_loss": parts["total"].item(),
        "content": parts["content"].item(),
        "adversarial": parts["adversarial"].item(),
        "d_real": torch.sigmoid(real_logits).mean().item(),
        "d_fake": torch.sigmoid(fake_logits).mean().item(),
    }
