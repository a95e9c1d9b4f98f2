"""What `qnas eval`, `qnas cost` and `qnas inspect` print, and the options of how."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import click

from qnas.cli.declare import Printer
from qnas.options import option


@dataclass
class Output:
    """How a result is printed."""

    format: str = option("table", choices=("table", "json"))


@dataclass
class TraceOutput(Output):
    """How `qnas inspect` prints, and whether float operations fail it."""

    strict: bool = option(False, help="Exit with code 1 when any operation stays in float.")


def _eval(summary: dict, opts, output: Output) -> None:
    from qnas.evaluate import format_table

    label, data, scale = summary["model"], summary["data"], summary["scale"]
    if output.format == "json":
        click.echo(json.dumps({"model": label, "data": data, **summary["result"]}, indent=2))
        return
    where = f"{data} (validation split)" if data == "builtin" else data
    title = f"{label} x{scale} on {where}: {summary['count']} images, PSNR/SSIM on Y, {scale}-pixel border cropped"
    click.echo(format_table(summary["result"], title))


def _cost(result, opts, output: Output) -> None:
    click.echo(result.to_json() if output.format == "json" else result.format_table())


def _inspect(summary: dict, opts, output: TraceOutput) -> None:
    from qnas.quant.inspect import format_trace

    trace, (channels, h, w) = summary["trace"], summary["input"]
    if output.format == "json":
        click.echo(
            json.dumps({"run": summary["run"], "quant": summary["quant"], **trace.to_dict()}, indent=2)
        )
    else:
        click.echo(format_trace(trace, f"{summary['run']}: {summary['quant']}; input 1x{channels}x{h}x{w}"))
    if output.strict and trace.float_rows:
        sys.exit(1)


PRINTERS = {
    "eval": Printer(_eval, (Output,)),
    "cost": Printer(_cost, (Output,)),
    "inspect": Printer(_inspect, (TraceOutput,)),
}
