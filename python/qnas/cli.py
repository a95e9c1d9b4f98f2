"""The `qnas` command (also `python -m qnas`).

Bad input raises qnas.errors.QnasError somewhere below; here it becomes one line on stderr and
exit code 2, with the traceback only behind `--debug` (or QNAS_DEBUG=1).
"""

from __future__ import annotations

import os
import sys

import click
import typer

from qnas.errors import QnasError

app = typer.Typer(
    name="qnas",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Quantization-friendly super-resolution: search (QuantNAS), strategy (DQSS), train (FQSR), eval, export.",
)

_debug = {"on": os.environ.get("QNAS_DEBUG") == "1"}


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    if debug:
        _debug["on"] = True


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script; exit codes: 0 ok, 2 bad input, 130 interrupted."""
    try:
        rc = app(args=argv, prog_name="qnas", standalone_mode=False)
    except QnasError as e:
        if _debug["on"]:
            raise
        print(f"qnas: error: {e}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.ClickException as e:  # usage errors: unknown option, bad value
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        print("qnas: interrupted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("qnas: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
