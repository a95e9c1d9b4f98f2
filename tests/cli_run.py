"""The `qnas` entry point run in the test process (shared by the CLI tests)."""

from qnas.cli import main


def run_cli(args, capsys):
    """Runs `qnas ARGS` in this process: (exit code, stdout, stderr)."""
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err
