"""`qnas export` and `qnas upscale` (deployment, docs/deploy.md) as API commands."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qnas.api.command import Command
from qnas.errors import QnasError
from qnas.options import option


@dataclass(kw_only=True)
class ExportOptions:
    """`qnas export`: a fully quantized run written as a packed file or ONNX."""

    run: str = option(argument=True, path="any")
    format: str = option(choices=("packed", "onnx"))
    out: str = option(path="any", help="File to write.")
    check: bool = option(
        True, flag="--no-check", help="Skip running the exported model against the trained one."
    )
    force: bool = option(False, help="Replace --out if it exists (never a file of the run itself).")


def run_export(opts: ExportOptions) -> dict[str, Any]:
    """Export a fully quantized run: a bit-packed safetensors file for `qnas upscale`, or ONNX QDQ."""
    from qnas.deploy.format import write_packed
    from qnas.export import check_export, load_run_packed
    from qnas.files import check_output_file
    from qnas.runs.folder import run_files
    from qnas.runs.network import model_file

    model = model_file(opts.run)
    check_output_file(opts.out, force=opts.force, inputs=run_files(model.parent) + [model])
    graph, tensors = load_run_packed(opts.run)
    if opts.format == "packed":
        size = write_packed(opts.out, graph, tensors)
    else:
        from qnas.export.onnx import write_onnx

        size = write_onnx(opts.out, graph, tensors)
    check = check_export(opts.run, opts.out, opts.format, (graph, tensors)) if opts.check else None
    return {"out": opts.out, "bytes": size, "format": opts.format, "check": check}


@dataclass(kw_only=True)
class UpscaleOptions:
    """`qnas upscale`: the packed model (or run) and the images it super-resolves."""

    model: str = option(
        path="any", help="A packed file of `qnas export --format packed`, or a training RUN folder."
    )
    paths: list[str] = option(argument=True, metavar="IN... OUT", path="any")
    tile: int = option(256, help="Tile side in input pixels (0 = whole image at once).")
    overlap: int | None = option(
        None, help="Context pixels around each tile (default: the receptive radius: exact result)."
    )
    device: str = option("auto", choices=("auto", "cpu", "cuda"))
    force: bool = option(False, help="Replace output images that exist (never an input).")
    quiet: bool = option(False, help="No progress bar.")


def run_upscale(opts: UpscaleOptions) -> dict[str, Any]:
    """Super-resolve IN... (image files or folders) into OUT (a .png for one input, else a folder)."""
    from qnas.deploy.upscale import run_upscale as upscale

    if len(opts.paths) < 2:
        raise QnasError("give at least one input and the output: IN... OUT")
    return upscale(
        opts.model,
        opts.paths[:-1],
        opts.paths[-1],
        opts.tile,
        opts.overlap,
        opts.device,
        not opts.quiet,
        opts.force,
    )


export = Command("export", (ExportOptions,), run_export)
upscale = Command("upscale", (UpscaleOptions,), run_upscale)
