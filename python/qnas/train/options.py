"""The options of `qnas train` and `qnas strategy`, declared once (qnas.options): the library takes these
dataclasses, the command line, `--config` files and the Python API (qnas.api) are made from them. This
module imports no torch, so that building the `qnas` command stays fast."""

from __future__ import annotations

import math
from dataclasses import dataclass

from qnas.errors import QnasError
from qnas.nas.options import ACT_QUANTIZERS
from qnas.options import check_declared, json_text, json_value, option

SCHEDULES = ("cosine", "step", "constant")
QUANT_SCHEMES = ("none", "fqsr", "uniform")


@dataclass
class TrainOptions:
    """Options of `qnas train` that define the result (anything here changes the weights)."""

    data: str = option("builtin", help="Training data ('builtin' = train split).")
    scale: int = option(2, cli=False)  # the network's: NetworkOptions.scale, --arch or --init
    steps: int = option(1500, at_least=1)
    batch_size: int = option(8, at_least=1)
    patch_size: int = option(64, at_least=1, help="HR patch side in pixels.")
    lr: float = option(5e-4, help="Adam learning rate.")
    schedule: str = option(
        "cosine", choices=SCHEDULES, help="cosine to lr/100, step (x0.5 at 50% and 75%), or constant."
    )
    warmup_steps: int = option(0)
    ema: float = option(0.0, help="EMA decay of the weights (0 = off).")
    grad_clip: float = option(0.0, help="Max gradient norm (0 = off).")
    seed: int = option(0)
    checkpoint_every: int = option(100, at_least=1)

    def check(self) -> None:
        from qnas.data.datasets import check_batch

        check_declared(self)
        if not 0 < self.lr < math.inf:
            raise QnasError(f"--lr: must be a positive finite number, got {self.lr}")
        if not 0 <= self.ema < 1:
            raise QnasError(f"--ema: decay must be in [0, 1), got {self.ema}")
        if self.warmup_steps < 0 or not 0 <= self.grad_clip < math.inf:
            raise QnasError("--warmup-steps and --grad-clip must be finite and not negative")
        check_batch(self.batch_size, self.patch_size)


@dataclass
class ValidationOptions:
    """`qnas train --val-data SPEC --val-every N`: PSNR/SSIM on Y of the network on whole validation
    images (qnas.evaluate, the protocol of `qnas eval`) every `every` steps (0: only at the end) and at
    the last step. They do not change the weights; best.pt keeps the network of the best PSNR. Without
    `data`, no validation."""

    data: str | None = option(
        None,
        flag="--val-data",
        metavar="SPEC",
        help="Validate on these images (as --data of `qnas eval`: 'builtin' = validation split): PSNR/SSIM "
        "on Y logged as val_psnr/val_ssim, RUN/best.pt kept at the best PSNR.",
    )
    every: int = option(
        0,
        flag="--val-every",
        help="With --val-data: validate every N steps (0 = only at the end; always at the last step).",
    )

    def check(self) -> None:
        if self.every and self.data is None:
            raise QnasError("--val-every needs --val-data SPEC (the validation images)")
        if self.every < 0:
            raise QnasError(f"--val-every: must not be negative, got {self.every}")


@dataclass
class NetworkOptions:
    """What `qnas train` trains (qnas.train.networks.resolve_network): a registered model (--model,
    --model-args, --scale), quantized with --quant (FQSR or uniform) and started from a full-precision run
    (--init); or the derived network of a QuantNAS genotype (--arch)."""

    model: str | None = option(None, metavar="NAME", help="A registered SR model (see `qnas cost --help`).")
    model_args: dict | None = option(
        None,
        metavar="JSON",
        parse=json_value,
        text=json_text,
        help="Constructor overrides, e.g. '{\"n_resblocks\": 8}'.",
    )
    arch: str | None = option(
        None,
        metavar="FILE",
        path="any",
        help="A QuantNAS genotype (RUN/genotype.json of `qnas search`, `qnas genotype`, or the config.json of a "
        "run that trained one): retrain the derived network from scratch at its searched bits (LSQ per-channel "
        "weights, --act-quantizer activations).",
    )
    act_quantizer: str = option(
        "hwgq",
        choices=ACT_QUANTIZERS,
        help="Activation quantizer of a --arch network (QuantNAS retrains with HWGQ).",
    )
    adq: bool = option(
        False,
        help="Retrain a --arch network with ADQ residuals (as searched) instead of plain quantized ones; "
        "ADQ uses the whole image's standard deviation, so such a network does not export.",
    )
    scale: int | None = option(
        None, help="Upscaling factor: 2, 3 or 4 (with --arch or --init: taken from there)."
    )
    quant: str = option(
        "none",
        choices=QUANT_SCHEMES,
        help="fqsr: fully quantized (every conv, skip, input and output; FQSR). uniform: conv weights and "
        "inputs except first/last layers, skips in float (the common baseline). docs/quantization.md.",
    )
    bits: int | None = option(None, help="Bit-width of weights and activations with --quant (2..8).")
    quantizer: str | None = option(
        None,
        metavar="NAME",
        help="Quantizer of --quant uniform (default lsq; any of qnas.quant.QUANTIZERS); fqsr uses its own.",
    )
    skip_bits: int | None = option(
        None, help="--quant fqsr: bits of the skip connections (default max(--bits, 8))."
    )
    calibration_weight: float | None = option(
        None, help="--quant fqsr: weight of the calibration loss mean|Q(x)-x| (default 0.3; 0 = off)."
    )
    quant_options: dict | None = option(
        None,
        metavar="JSON",
        parse=json_value,
        text=json_text,
        help="--quant fqsr: further plan options (docs/quantization.md), e.g. '{\"distill_weight\": 0}'.",
    )
    init: str | None = option(
        None,
        metavar="FP_RUN",
        path="any",
        help="Start from the weights of a full-precision run (its model config is used).",
    )


STRATEGY_MODES = ("ptq", "qat")


@dataclass
class StrategyOptions:
    """Options of `qnas strategy` (qnas.train.strategy): what the DQSS search chooses from, and how."""

    bits: int = option(help="Bit-width of weights and activations (2..8).")
    quantizers: str | list[str] = option(
        "all",
        metavar="LIST",
        text=lambda v: v if isinstance(v, str) else ",".join(v),
        help="Comma-separated strategies (lsq,pact,dorefa,hwgq,minmax,percentile,mse,aciq; NAME_pc: "
        "per-channel weights; NAME_asym: asymmetric activations), 'all' (the seed's 7) or 'extended' "
        "(docs/quantization.md). One quantizer = uniform quantization with it (the baseline).",
    )
    mode: str = option(
        "ptq",
        choices=STRATEGY_MODES,
        help="ptq: weights frozen, match the full-precision output on calibration patches; "
        "qat: strategies, quantizers and weights trained in one pass per step on the task loss.",
    )
    data: str = option("builtin", help="Calibration/training data (train split).")
    steps: int = option(100, at_least=1, help="Optimization steps.")
    calib_batches: int = option(8, at_least=1, help="Batches of the calibration set.")
    batch_size: int = option(4, at_least=1)
    patch_size: int = option(64, at_least=1, help="HR patch side in pixels.")
    lr: float = option(1e-4, help="Adam lr of the network weights (qat).")
    arch_lr: float = option(0.05, help="Adam lr of the strategy logits.")
    quant_lr: float = option(1e-3, help="Adam lr of LSQ steps and PACT clips.")
    engine: str = option(
        "factorized",
        choices=("factorized", "fused"),
        help="How a mixed layer is computed: one convolution of the mixed input and weight, or "
        "torch.ops.qops.mixed_quant_conv (docs/quantization.md).",
    )
    discrete_fraction: float = option(
        0.25,
        help="ptq: share of --steps spent on the derived network (statistics re-measured, learned steps "
        "tuned); 0 = search only.",
    )
    init: str = option(
        "local",
        choices=("local", "uniform"),
        help="Starting strategy probabilities: inversely proportional to each candidate's per-layer "
        "output error on the calibration patches, or uniform.",
    )
    sampling: str = option(
        "soft",
        choices=("soft", "hard"),
        help="ptq: optimize the softmax mixture, or one straight-through Gumbel sample per step.",
    )
    loss: str = option(
        "psnr",
        choices=("psnr", "mse"),
        help="ptq: reconstruction loss against the full-precision output: mean per-patch log MSE "
        "(what mean PSNR scores) or the batch MSE.",
    )
    objective: str = option(
        "expected",
        choices=("expected", "mixture"),
        help="ptq: minimize the expected loss of a discrete network sampled from the strategy "
        "probabilities (mixture loss + per-layer sampling variance), or the mixture's loss alone.",
    )
    seed: int = option(0)

    def check(self) -> None:
        from qnas.quant.apply import check_bits
        from qnas.quant.dqss import parse_quantizers

        self.quantizers = parse_quantizers(self.quantizers)
        self.bits = check_bits(self.bits)
        check_declared(self)
        for name in ("lr", "arch_lr", "quant_lr"):
            if not getattr(self, name) > 0:
                raise QnasError(f"--{name.replace('_', '-')}: must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.discrete_fraction < 1.0:
            raise QnasError(f"--discrete-fraction: expected a value in [0, 1), got {self.discrete_fraction}")
