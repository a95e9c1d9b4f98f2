"""Super-resolution models (EDSR, SRResNet, RFDN), the SRGAN discriminator and losses, and the
registry by name. See docs/models.md for the constructors, parameter counts and how to quantize."""

from qnas.sr.common import DIV2K_RGB_MEAN, SCALES, Add, MeanShift, Upsampler, check_scale, default_conv
from qnas.sr.edsr import EDSR, ResBlock
from qnas.sr.registry import (
    MODELS,
    ModelSpec,
    build_from_config,
    build_model,
    list_models,
    model_config,
    read_model_config,
)
from qnas.sr.rfdn import CCA, ESA, RFDB, RFDN
from qnas.sr.srgan import (
    GeneratorLoss,
    SRGANDiscriminator,
    VGG19Features,
    VGGLoss,
    adversarial_loss,
    adversarial_step,
    discriminator_loss,
)
from qnas.sr.srresnet import SRResBlock, SRResNet

__all__ = [
    "CCA",
    "DIV2K_RGB_MEAN",
    "EDSR",
    "ESA",
    "MODELS",
    "RFDB",
    "RFDN",
    "SCALES",
    "Add",
    "GeneratorLoss",
    "MeanShift",
    "ModelSpec",
    "ResBlock",
    "SRGANDiscriminator",
    "SRResBlock",
    "SRResNet",
    "Upsampler",
    "VGG19Features",
    "VGGLoss",
    "adversarial_loss",
    "adversarial_step",
    "build_from_config",
    "build_model",
    "check_scale",
    "default_conv",
    "discriminator_loss",
    "list_models",
    "model_config",
    "read_model_config",
]
