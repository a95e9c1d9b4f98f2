"""`qnas upscale`: super-resolve image files with a packed model (qnas.deploy.runtime), tile by tile.

Inputs are files or folders (their images, sorted); the output is a file when there is one input
image and OUT has an image extension, otherwise a folder that receives NAME.png per input. Every
output is written through a temp file in its folder and os.replace, so a failure (a corrupt image, a
full disk, an interrupt) never leaves a partial PNG behind. All inputs are checked (regular files with
readable image headers) and the output folder is created and probed for writing before any network
runs. An output is never an input, nor written into a folder given as input; an existing output is
replaced only with `force` (qnas.files). Images are read and written by qnas.data.images, the code
`qnas eval` uses, and a network output that is not finite is an error, never an image.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from qnas.data.images import (
    check_image,
    image_size,
    is_image_file,
    list_images,
    load_image,
    save_image,
    to_uint8,
)
from qnas.deploy.runtime import PackedModel, retain_freed_memory
from qnas.errors import DataError, QnasError
from qnas.files import check_output_file, same_file

# The largest output image: 2^28 pixels (16384 x 16384, 3 GB as float32 RGB while it is assembled).
MAX_OUTPUT_PIXELS = 2**28


def read_rgb(path: Path) -> torch.Tensor:
    """An image file as float32 [1, 3, H, W] in [0, 1], read by qnas.data.images.load_image (the reader
    of `qnas eval`: 16-bit and float images are converted, not saturated)."""
    return torch.from_numpy(load_image(path)).permute(2, 0, 1).unsqueeze(0).float().div_(255)


def to_image(y: torch.Tensor) -> np.ndarray:
    """[1, 3, H, W] in [0, 1] -> uint8 HxWx3 by qnas.data.images.to_uint8 (floor(255 y + 0.5), clamped)."""
    return to_uint8(y[0].permute(1, 2, 0))


def plan_outputs(
    inputs: Sequence[str | os.PathLike], out: str | os.PathLike, force: bool = False
) -> list[tuple[Path, Path]]:
    """(input image, output PNG) pairs; see the module docstring for the rules. Raises DataError for a
    missing input, a non-image file, a folder without images, an output that cannot be written, an
    output that is an input (or a folder of inputs), or an existing output without `force`."""
    files: list[Path] = []
    folders: list[Path] = []
    for given in inputs:
        p = Path(given)
        if p.is_dir():
            found = list_images(p)
            if not found:
                raise DataError(f"{p}: no image files in this folder")
            files += found
            folders.append(p)
        else:
            files.append(p)
    if not files:
        raise DataError("no input images")
    for f in files:
        check_image(f)  # a missing, non-regular, unreadable or undefined image fails here, before any work
    out = Path(out)
    if len(files) == 1 and not out.is_dir() and is_image_file(out):
        if out.suffix.lower() != ".png":
            raise DataError(f"{out}: the output is a PNG; name it .png (or give a folder)")
        pairs = [(files[0], out)]
        folder = out.parent
    else:
        if any(same_file(out, d) for d in folders):
            raise DataError(f"{out}: is an input folder; write the upscaled images to another folder")
        stems = [f.stem for f in files]
        dup = {s for s in stems if stems.count(s) > 1}
        if dup:
            raise DataError(f"two inputs would both write {out / (sorted(dup)[0] + '.png')}")
        pairs = [(f, out / f"{f.stem}.png") for f in files]
        folder = out
    _check_writable(folder)
    for _, dst in pairs:
        check_output_file(dst, force=force, inputs=files, option="output", error=DataError)
    return pairs


def _check_writable(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{folder}: cannot create the output folder ({e.strerror or e})") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"{folder}: the output folder is not writable")


def load_model(model: str | os.PathLike, device: str = "auto") -> PackedModel:
    """A packed file, or a training run folder / model.pt (exported in memory: needs the training code)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise QnasError("--device cuda: this torch has no CUDA device")
    p = Path(model)
    if p.is_dir() or p.suffix == ".pt":
        from qnas.export import load_run_packed

        graph, tensors = load_run_packed(p)
        return PackedModel(graph, tensors, device)
    return PackedModel.load(p, device)


def upscale_files(
    model: PackedModel,
    pairs: list[tuple[Path, Path]],
    tile: int,
    overlap: int | None,
    progress: bool = True,
    model_name: str = "the model",
) -> dict:
    """Runs the model on every input and writes the outputs atomically; returns timing figures."""
    from tqdm import tqdm

    sizes = [image_size(src) for src, _ in pairs]
    total = sum(model.count_tiles(h, w, tile) for h, w in sizes)
    bar = tqdm(total=total, unit="tile", disable=not progress, desc="upscale")
    compute = 0.0
    start = time.perf_counter()
    try:
        for src, dst in pairs:
            bar.set_postfix_str(src.name)
            x = read_rgb(src)
            t0 = time.perf_counter()
            try:
                y = model.upscale(x, tile=tile, overlap=overlap, progress=bar.update)
            except RuntimeError as e:  # an op refusing this input (e.g. smaller than a kernel)
                first = " ".join(str(e).split())[:160]
                raise DataError(
                    f"{src}: {model_name} cannot run on this {x.shape[2]}x{x.shape[3]} image ({first})"
                ) from e
            if y.is_cuda:
                torch.cuda.synchronize()
            compute += time.perf_counter() - t0
            if not bool(torch.isfinite(y).all()):
                raise QnasError(f"{model_name}: the network output on {src} is not finite (NaN or inf)")
            save_image(dst, to_image(y))
    finally:
        bar.close()
    return {"images": len(pairs), "seconds": time.perf_counter() - start, "network_seconds": compute}


def run_upscale(
    model_path: str,
    inputs: Sequence[str],
    out: str,
    tile: int = 256,
    overlap: int | None = None,
    device: str = "auto",
    progress: bool = True,
    force: bool = False,
) -> dict:
    if tile < 0 or (overlap is not None and overlap < 0):
        raise QnasError("--tile and --overlap must not be negative")
    pairs = plan_outputs(inputs, out, force)
    retain_freed_memory()
    model = load_model(model_path, device)
    for src, _ in pairs:  # the output is held whole as float32 (12 bytes per pixel)
        h, w = image_size(src)
        if h * w * model.scale**2 > MAX_OUTPUT_PIXELS:
            raise DataError(
                f"{src}: {h}x{w} upscaled x{model.scale} is more than the {MAX_OUTPUT_PIXELS:,} output "
                "pixels qnas upscale writes; cut the image into parts"
            )
    result = upscale_files(model, pairs, tile, overlap, progress, str(model_path))
    result.update(
        scale=model.scale,
        device=str(model.device),
        overlap=model.receptive_radius() if overlap is None else overlap,
        outputs=[str(d) for _, d in pairs],
    )
    return result
