"""The options of `qnas search`, declared once (qnas.options), and the names of the choices they offer.
This module imports no torch, so that building the `qnas` command stays fast."""

from __future__ import annotations

from dataclasses import dataclass

from qnas.errors import QnasError
from qnas.options import check_declared, comma_text, int_list, name_list, option, size_text

MODES = ("quant", "noise")
IMPLS = ("fused", "naive")
#: How a layer's candidate outputs are mixed: "rescale" (default) divides the probability-weighted sum
#: by the root of the sum of squared op probabilities (Supernet.mixing_weights); "none" is the plain
#: DARTS sum.
MIX_NORMS = ("rescale", "none")
#: How the supernet's weights start: "anchor" (default) makes the supernet start as its anchor skip
#: (Supernet.start_at_anchor); "he" leaves every kernel variance-preserving and ADQ's gain at 1.5.
SUPERNET_INITS = ("anchor", "he")
#: How the search trains and chooses: "darts" (default) trains the architecture parameters by
#: gradient beside the weights and derives the most probable genotype; "spos" trains the shared weights
#: along uniformly sampled single paths and chooses by the held-out loss of the paths (qnas.nas.search).
METHODS = ("darts", "spos")
#: How the single-path search chooses from its trained supernet: "additive" scores every entry of every
#: slot in random contexts and takes the best sum within the target; "evolution" then searches whole
#: genotypes (SPOS's evolutionary search) scored by the supernet's held-out loss along their path.
SELECTS = ("additive", "evolution")
#: Activation quantizers a derived network may be retrained with (qnas.nas.layers): HWGQ (Cai et al.,
#: "Deep Learning with Low Precision by Half-wave Gaussian Quantization", CVPR 2017) as the QuantNAS code
#: does, or LSQ.
ACT_QUANTIZERS = ("hwgq", "lsq")
#: BitOps are reported for this LR input by default: the LR side of a 1280x720 output at x4 (the usual
#: reference frame of efficient SR), whatever the scale.
DEFAULT_LR_SIZE = (180, 320)


def _lr_size(text: str, flag: str) -> list[int]:
    from qnas.cost import parse_lr_size

    return list(parse_lr_size(text, option=flag))


@dataclass
class SearchOptions:
    """Options of `qnas search` that define the result."""

    space: str = option(
        "basic",
        metavar="basic|rfdn|FILE",
        help="A builtin search space or a space JSON file (docs/search_spaces.md).",
    )
    ops: list[str] | None = option(
        None,
        metavar="OP,...",
        parse=name_list,
        text=comma_text,
        help="Replace the space's default candidate ops (one op: a bits-only search on a fixed architecture).",
    )
    scale: int = option(4, help="Upscaling factor: 2, 3 or 4.")
    data: str = option("builtin", help="Training images (both splits come from them).")
    steps: int = option(300, at_least=1)
    batch_size: int = option(8, at_least=1)
    patch_size: int = option(96, at_least=1, help="HR patch side in pixels.")
    bits: list[int] = option(
        default_factory=lambda: [4, 8],
        metavar="B,...",
        parse=int_list,
        text=comma_text,
        help="Weight bit-widths (0 = full precision).",
    )
    a_bits: list[int] | None = option(
        None,
        metavar="B,...",
        parse=int_list,
        text=comma_text,
        help="Activation bit-widths (default: --bits).",
    )
    tie_bits: bool = option(
        True, flag="--untie-bits", help="Search weight and activation bits separately (default: tied)."
    )
    fix_bits: str | None = option(
        None,
        metavar="GENOTYPE",
        help="Fix every layer's bit-widths to a genotype's (its file or run folder, same space): a second "
        "stage that searches only the ops at the bits a first search chose.",
    )
    mode: str = option(
        "noise", choices=MODES, help="noise: quantization noise (QuantNAS); quant: LSQ fake quantization."
    )
    impl: str = option(
        "fused",
        choices=IMPLS,
        help="fused: torch.ops.qops.mixed_quant_conv; naive: the per-candidate loop (baseline).",
    )
    adq: bool = option(True, flag="--no-adq", help="Plain residuals instead of ADQ (ablation).")
    anchor: bool = option(
        True,
        flag="--no-anchor",
        help="Remove the space's anchor skip (input image upsampled, added to the output): the paper's space.",
    )
    mix_norm: str = option(
        "rescale",
        choices=MIX_NORMS,
        help="rescale: candidate mixture divided by sqrt(sum of squared op probabilities); none: plain sum.",
    )
    supernet_init: str = option(
        "anchor",
        choices=SUPERNET_INITS,
        help="anchor: the supernet starts as its anchor skip (residual gains 0, output layer kernels x0.1); "
        "he: every kernel variance-preserving, ADQ gain 1.5.",
    )
    method: str = option(
        "darts",
        choices=METHODS,
        help="darts: architecture parameters trained by gradient (QuantNAS); spos: weights trained along "
        "uniformly sampled single paths, layers chosen by held-out loss within the BitOps target.",
    )
    select_contexts: int = option(
        8, at_least=1, help="spos: random paths each candidate is scored in (the other layers' choices)."
    )
    select_batches: int = option(4, at_least=1, help="spos: held-out batches each candidate is scored on.")
    select: str = option(
        "additive",
        choices=SELECTS,
        help="spos: additive: per-slot scores, best sum within the target; evolution: whole genotypes "
        "searched by evolution from the additive pick, scored along their full path.",
    )
    select_population: int = option(50, at_least=4, help="spos --select evolution: genotypes per generation.")
    select_generations: int = option(
        20, at_least=1, help="spos --select evolution: generations (population x generations evaluations)."
    )
    single_pass: bool = option(False, help="One forward-backward updates weights and alphas.")
    lr: float = option(1e-3, help="Adam learning rate of the weights.")
    alpha_lr: float = option(3e-4, help="Adam learning rate of the alphas.")
    grad_clip: float = option(5.0)
    entropy_coef: float = option(1e-3, help="Final entropy weight.")
    entropy_warmup: float = option(
        0.25, help="Fraction of the steps with no entropy term; it then grows linearly to --entropy-coef."
    )
    target_gbitops: float | None = option(
        None,
        help="BitOps target at --lr-size (GBitOps): adds target-weight * log^2(expected BitOps / target).",
    )
    target_weight: float = option(1.0, help="Weight of the BitOps target term.")
    final_temperature: float = option(
        0.1,
        help="Softmax temperature of the alphas at the last step, annealed geometrically from 1 (1 = off).",
    )
    penalty: float = option(
        0.0,
        help="The paper's BitOps penalty weight (expected BitOps / their initial value); "
        "an alternative to --target-gbitops.",
    )
    alpha_warmup: float = option(0.0, help="Fraction of the steps that train the weights only.")
    alpha_split: float = option(
        0.5, help="Fraction of the training images that train the alphas (the rest train the weights)."
    )
    seed: int = option(0)
    checkpoint_every: int = option(50, at_least=1)
    lr_size: list[int] = option(
        default_factory=lambda: list(DEFAULT_LR_SIZE),
        metavar="HxW",
        parse=_lr_size,
        text=size_text,
        help="LR size BitOps are reported for.",
    )

    def check(self) -> None:
        from qnas.sr.common import check_scale

        check_scale(self.scale)
        check_declared(self)
        if self.target_gbitops is not None:
            if not self.target_gbitops > 0:
                raise QnasError(f"--target-gbitops: must be positive, got {self.target_gbitops}")
            if self.penalty > 0:
                raise QnasError("--target-gbitops and --penalty are alternatives: give one of them")
        if self.method == "spos" and self.single_pass:
            raise QnasError(
                "--single-pass: not with --method spos (it has no architecture parameters to train)"
            )
        if self.method != "spos" and self.select != "additive":
            raise QnasError(f"--select {self.select}: only with --method spos")
        if self.method == "spos" and self.penalty > 0:
            raise QnasError("--penalty: not with --method spos (its cost control is --target-gbitops)")
        if not 0 < self.final_temperature <= 1:
            raise QnasError(f"--final-temperature: expected a value in (0, 1], got {self.final_temperature}")
        if self.target_weight < 0:
            raise QnasError(f"--target-weight: must not be negative, got {self.target_weight}")
        for name in ("lr", "alpha_lr"):
            if not getattr(self, name) > 0:
                raise QnasError(f"--{name.replace('_', '-')}: must be positive, got {getattr(self, name)}")
        for name in ("entropy_warmup", "alpha_warmup"):
            if not 0 <= getattr(self, name) < 1:
                raise QnasError(
                    f"--{name.replace('_', '-')}: a fraction of the steps in [0, 1), got {getattr(self, name)}"
                )
        if not 0 < self.alpha_split < 1:
            raise QnasError(
                f"--alpha-split: a fraction of the training images in (0, 1), got {self.alpha_split}"
            )
        if self.entropy_coef < 0 or self.penalty < 0 or self.grad_clip < 0:
            raise QnasError("--entropy-coef, --penalty and --grad-clip must not be negative")
