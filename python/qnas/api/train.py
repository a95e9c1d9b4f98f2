"""`qnas train` and `qnas strategy` (the run commands of qnas.train) as API commands."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from qnas.api.command import Command
from qnas.options import Resume, RunControl, option, record
from qnas.train.options import NetworkOptions, StrategyOptions, TrainOptions, ValidationOptions


def run_train(
    network: NetworkOptions,
    opts: TrainOptions,
    validation: ValidationOptions,
    run: RunControl,
    resume: Resume,
) -> dict[str, Any]:
    """Train an SR network (L1, Adam, cosine/step schedule); --resume continues a killed run exactly.
    With --quant, a quantized network (quantization-aware training), usually fine-tuned from --init."""
    from qnas.train.networks import resolve_network
    from qnas.train.train import train

    options = record(network, opts, validation, run, resume)
    validation.check()
    resolved = resolve_network(network, opts.steps)
    return train(
        resolved.network,
        dataclasses.replace(opts, scale=resolved.scale),
        run.out,
        resume=resume.resume,
        progress=not run.quiet,
        init_state=resolved.init_state,
        extra_config={**resolved.extra_config, "command": "train", "options": options},
        validation=validation,
        compile=run.compile,
    )


@dataclass
class StrategySource:
    """The run `qnas strategy` quantizes."""

    checkpoint: str = option(
        metavar="FP_RUN",
        path="any",
        help="A full-precision run (`qnas train` without --quant) whose network is quantized.",
    )


def run_strategy(source: StrategySource, opts: StrategyOptions, run: RunControl) -> dict[str, Any]:
    """DQSS: search the quantizer of every layer's weights and inputs (post-training or
    quantization-aware); writes RUN/strategy.json and RUN/model.pt for `qnas eval --checkpoint RUN`."""
    from qnas.train.strategy import run_strategy as strategy

    options = record(source, opts, run)
    return strategy(
        source.checkpoint,
        opts,
        run.out,
        progress=not run.quiet,
        extra_config={"command": "strategy", "options": options},
        compile=run.compile,
    )


train = Command(
    "train", (NetworkOptions, TrainOptions, ValidationOptions, RunControl, Resume), run_train, config=True
)
strategy = Command("strategy", (StrategySource, StrategyOptions, RunControl), run_strategy, config=True)
