"""What `qnas export` and `qnas upscale` print (docs/deploy.md)."""

from __future__ import annotations

import click

from qnas.cli.declare import Printer


def _export(summary: dict, opts) -> None:
    click.echo(f"wrote {summary['out']} ({summary['bytes'] / 1e6:.2f} MB, {summary['format']})")
    if summary["check"] is not None:
        click.echo(summary["check"])


def _upscale(r: dict, opts) -> None:
    per = r["network_seconds"] / max(r["images"], 1)
    click.echo(
        f"upscaled {r['images']} image(s) x{r['scale']} on {r['device']} in {r['seconds']:.2f} s "
        f"(network {r['network_seconds']:.2f} s, {per:.3f} s/image; tile {opts.tile}, overlap {r['overlap']}): "
        f"{opts.paths[-1]}"
    )


PRINTERS = {"export": Printer(_export), "upscale": Printer(_upscale)}
