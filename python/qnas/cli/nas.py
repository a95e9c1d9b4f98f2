"""What `qnas search`, `qnas genotype` and `qnas report` print."""

from __future__ import annotations

import click

from qnas.cli.declare import Printer


def _search(summary: dict, opts, run, resume) -> None:
    h, w = opts.lr_size
    click.echo(
        f"searched {summary['steps']} steps in {summary['seconds']:.0f} s: {summary['genotype']} "
        f"({summary['bitops'] / 1e9:.2f} GBitOps at LR {h}x{w})"
    )
    if summary["health"]:
        ratios = ", ".join(f"{s} {r['ratio']:.2g}" for s, r in summary["health"].items())
        click.echo(f"|loss| / |regularizer| gradient on the alphas, median of the second half: {ratios}")


def _genotype(summary: dict, opts) -> None:
    g = summary["genotype"]
    click.echo(
        f"{summary['out']}: {g['space']['name']} x{opts.scale}, {summary['what']}, "
        f"{g['cost']['bitops'] / 1e9:.2f} GBitOps"
    )


def _report(report: dict, opts) -> None:
    from qnas.nas.report import markdown_table

    out = opts.out
    click.echo(markdown_table(report))
    click.echo(f"\n{out}/report.json, {out}/pareto.png, {out}/report.md")


PRINTERS = {"search": Printer(_search), "genotype": Printer(_genotype), "report": Printer(_report)}
