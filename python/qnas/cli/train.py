"""What `qnas train` and `qnas strategy` print."""

from __future__ import annotations

import click

from qnas.cli.declare import Printer


def _train(summary: dict, network, opts, validation, run, resume) -> None:
    click.echo(
        f"trained {summary['steps']} steps in {summary['seconds']:.0f} s, final loss {summary['loss']:.4f}: "
        f"{run.out}/model.pt"
    )
    if "best" in summary:
        b = summary["best"]
        click.echo(
            f"best validation PSNR {b['psnr']:.2f} dB, SSIM {b['ssim']:.4f} at step {b['step']}: {run.out}/best.pt"
        )


def _strategy(summary: dict, source, opts, run) -> None:
    counts = summary["counts"]
    w = ", ".join(f"{k} {v}" for k, v in sorted(counts["weight"].items()))
    a = ", ".join(f"{k} {v}" for k, v in sorted(counts["activation"].items()))
    click.echo(
        f"{summary['mode']} search in {summary['seconds']:.0f} s: weights [{w}], activations [{a}]: {run.out}"
    )


PRINTERS = {"train": Printer(_train), "strategy": Printer(_strategy)}
