"""The `qnas` command (also `python -m qnas`), built on click from the commands of qnas.api: each
command's options are generated from its option dataclasses (qnas.cli.declare), the command runs the
API's function, and the module of its group (train, nas, evaluate, deploy, demo) prints what it returns.

Bad input raises qnas.errors.QnasError somewhere below; here it becomes one line on stderr and
exit code 2, with the traceback only behind `--debug` (or QNAS_DEBUG=1).
"""

from __future__ import annotations

import os
import sys

import click

from qnas.api import COMMANDS
from qnas.cli import demo, deploy, evaluate, nas, train
from qnas.cli.declare import click_command
from qnas.errors import QnasError

_debug = {"on": os.environ.get("QNAS_DEBUG") == "1"}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="qnas", prog_name="qnas")
def cli(debug: bool) -> None:
    """Quantization-friendly super-resolution: search (QuantNAS), strategy (DQSS), train (FQSR),
    eval, cost, report, export, upscale."""
    if debug:
        _debug["on"] = True


PRINTERS = {**train.PRINTERS, **nas.PRINTERS, **evaluate.PRINTERS, **deploy.PRINTERS, **demo.PRINTERS}
for _command in COMMANDS:
    cli.add_command(click_command(_command, PRINTERS[_command.name]))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script; exit codes: 0 ok, 2 bad input or usage, 130 interrupted."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun, rank 0 alone prints
        from qnas.runs.distributed import silence_other_ranks

        silence_other_ranks()
    try:
        cli.main(args=argv, prog_name="qnas", standalone_mode=False)
    except QnasError as e:
        if _debug["on"]:
            raise
        print(f"qnas: error: {e}", file=sys.stderr)
        sys.exit(2)
    except click.ClickException as e:  # usage errors: unknown option, bad value, missing argument
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("qnas: interrupted", file=sys.stderr)
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
