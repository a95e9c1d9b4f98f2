"""What `qnas demo` prints."""

from __future__ import annotations

import json
import os

import click

from qnas.cli.declare import Printer


def _demo(summary: dict, opts) -> None:
    from qnas.demo import comparison_text
    from qnas.nas.report import markdown_table

    out = opts.out
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        click.echo(markdown_table(json.load(f)))
    for c in summary["comparisons"]:
        click.echo("\n" + comparison_text(c))
    click.echo(f"\n{out}/report.json, {out}/pareto.png, {out}/report.md, {out}/demo.json")


PRINTERS = {"demo": Printer(_demo)}
