"""`qnas search`, `qnas genotype` and `qnas report` (QuantNAS, qnas.nas) as API commands."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from qnas.api.command import Command
from qnas.errors import QnasError
from qnas.nas.options import DEFAULT_LR_SIZE, SearchOptions
from qnas.options import Resume, RunControl, comma_text, int_list, option, record, size_text


def run_search(opts: SearchOptions, run: RunControl, resume: Resume) -> dict[str, Any]:
    """QuantNAS: search operations and bit-widths jointly; writes RUN/genotype.json and alpha plots."""
    from qnas.nas.search import search

    options = record(opts, run, resume)
    return search(
        opts,
        run.out,
        resume=resume.resume,
        progress=not run.quiet,
        extra_config={"command": "search", "options": options},
        compile=run.compile,
    )


def _lr_size(text: str, flag: str) -> tuple[int, int]:
    from qnas.cost import parse_lr_size

    return parse_lr_size(text, option=flag)


def lr_size_option(default: tuple[int, int] = DEFAULT_LR_SIZE, help: str = "") -> Any:
    """An --lr-size HxW option (the LR input size costs are counted for)."""
    return option(default=tuple(default), metavar="HxW", parse=_lr_size, text=size_text, help=help)


@dataclass(kw_only=True)
class GenotypeOptions:
    """`qnas genotype`: a fixed architecture of a space, or a random one at a BitOps target."""

    space: str = option("basic", metavar="basic|rfdn|FILE")
    scale: int = option(help="Upscaling factor: 2, 3 or 4.")
    op: str | None = option(
        None, metavar="OP", help="The op of every layer, e.g. conv3x3 (not with --random)."
    )
    bits: list[int] | None = option(
        None,
        metavar="B[,B...]",
        parse=int_list,
        text=comma_text,
        help="Bits of every weight and activation (0 = fp); with --random the bit-widths to draw from "
        "(default 4,8).",
    )
    random: bool = option(
        False,
        help="A random genotype (op and tied bits of every layer) at --target-gbitops: the search's control.",
    )
    target_gbitops: float | None = option(None, help="With --random: its BitOps at --lr-size.")
    seed: int = option(0, help="With --random: the draw.")
    anchor: bool = option(
        True, flag="--no-anchor", help="Remove the space's anchor skip (the paper's space)."
    )
    lr_size: tuple[int, int] = lr_size_option()
    out: str = option(path="any", help="Genotype JSON file to write.")
    force: bool = option(False, help="Replace --out if it exists (never a file of a run folder).")


def run_genotype(opts: GenotypeOptions) -> dict[str, Any]:
    """Write the genotype of a fixed architecture of a space (every layer one op, uniform bits): the
    uniform-quantization baseline to retrain with `qnas train --arch`; or with --random, a random
    genotype at a BitOps target (the control a search must beat)."""
    import json

    from qnas.atomic_write import atomic_write_bytes
    from qnas.files import check_output_file
    from qnas.nas.derive import genotype_cost, uniform_genotype
    from qnas.nas.search import random_genotype
    from qnas.runs.folder import run_files
    from qnas.spaces import load_space, with_anchor

    out = opts.out
    parent = os.path.dirname(os.path.abspath(out))
    check_output_file(out, force=opts.force, inputs=run_files(parent) + [opts.space])
    doc = load_space(opts.space)
    if not opts.anchor:
        doc = with_anchor(doc, None)
    bits = opts.bits
    for b in bits or []:
        if b != 0 and not 2 <= b <= 8:
            raise QnasError(f"--bits {comma_text(bits)}: expected 0 (full precision) or 2..8")
    if opts.random:
        if opts.op is not None:
            raise QnasError("--op: not with --random (every layer draws its own op)")
        if opts.target_gbitops is None:
            raise QnasError("--random needs --target-gbitops (the BitOps the genotype should cost)")
        g = random_genotype(
            doc, opts.scale, opts.target_gbitops, opts.seed, bits=bits or [4, 8], lr_size=opts.lr_size
        )
        what = f"random (seed {opts.seed}) at target {opts.target_gbitops:g}"
    else:
        if opts.op is None or bits is None or len(bits) != 1:
            raise QnasError("--op OP and --bits B (one value) are required (or --random --target-gbitops X)")
        if opts.target_gbitops is not None:
            raise QnasError("--target-gbitops: only with --random")
        g = uniform_genotype(doc, opts.scale, opts.op, bits[0])
        what = f"every layer {opts.op} at {bits[0]} bits"
    g["cost"] = genotype_cost(g, opts.lr_size)
    path = os.path.abspath(out)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_bytes(path, (json.dumps(g, indent=2) + "\n").encode())
    return {"out": out, "genotype": g, "what": what}


@dataclass(kw_only=True)
class ReportOptions:
    """`qnas report`: trained runs and bicubic compared on the evaluation images."""

    runs: list[str] = option(default_factory=list, argument=True, metavar="RUN...")
    out: str = option(path="dir", help="Folder for the report.")
    data: str = option("builtin", help="Evaluation images ('builtin': validation split).")
    lr_size: tuple[int, int] = lr_size_option(help="LR size BitOps are counted for.")
    quiet: bool = option(False, help="No progress bars.")


def run_report(opts: ReportOptions) -> dict[str, Any]:
    """Compare trained runs (folders with model.pt) and 'bicubic': report.json, pareto.png (PSNR vs
    BitOps), report.md."""
    from qnas.nas.report import build_report

    return build_report(
        list(opts.runs), opts.out, data=opts.data, lr_size=tuple(opts.lr_size), progress=not opts.quiet
    )


search = Command("search", (SearchOptions, RunControl, Resume), run_search, config=True)
genotype = Command("genotype", (GenotypeOptions,), run_genotype)
report = Command("report", (ReportOptions,), run_report)
