"""`qnas demo` (what `make demo` runs) as an API command."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qnas.api.command import Command
from qnas.options import option


@dataclass(kw_only=True)
class DemoOptions:
    """`qnas demo`: where its runs go and which settings differ from qnas.demo.DemoSettings."""

    out: str = option("runs/demo", path="dir", help="Folder of the demo's runs and report.")
    settings: str | None = option(
        None,
        aliases=("--config",),
        metavar="FILE",
        path="file",
        help='JSON object overriding demo settings (qnas.demo.DemoSettings), e.g. {"train_steps": 500}; '
        "--config is the same option, as for the other commands.",
    )
    quiet: bool = option(False, help="No progress bars.")


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    """Search -> derive -> retrain -> report on the builtin images, with bicubic and the hand-made 4/8-bit
    baselines (what `make demo` runs). Rerun to resume: finished stages are skipped."""
    from qnas.demo import DemoSettings
    from qnas.demo import run_demo as demo
    from qnas.errors import QnasError
    from qnas.files import read_json_object

    overrides = {}
    if opts.settings is not None:
        try:
            overrides = read_json_object(opts.settings)
        except QnasError as e:
            raise QnasError(f"--settings {e}") from e
    return demo(DemoSettings.from_dict(overrides), opts.out, progress=not opts.quiet)


demo = Command("demo", (DemoOptions,), run_demo)
