"""`qnas upscale`: super-resolve image files with a packed model (qnas.deploy.runtime), tile by tile.

Inputs are files or folders (their images, sorted); the output is a file when there is one input
image and OUT has an image extension, otherwise a folder that receives NAME.png per input. Every
output is written through a temp file in its folder and os.replace, so a failure (a corrupt image, a
full disk, an interrupt) never leaves a partial PNG behind. All inputs are checked (readable image
headers) and the output folder is created and probed for writing before any network runs.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qnas.atomic_write import atomic_write_bytes
from qnas.deploy.runtime import PackedModel, retain_freed_memory
from qnas.errors import CheckpointError, DataError, QnasError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _describe(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:157] + "..." if len(text) > 160 else text


def read_rgb(path: Path) -> torch.Tensor:
    """An image file as float32 [1, 3, H, W] in [0, 1] (gray repeated, alpha dropped, as qnas.data)."""
    try:
        with Image.open(path) as im:
            im.load()
            rgb = np.array(im.convert("RGB"), dtype=np.uint8)
    except _PIL_ERRORS as e:
        raise DataError(f"{path}: not a readable image ({_describe(e)})") from e
    return torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).float().div_(255)


def png_bytes(y: torch.Tensor) -> bytes:
    """[1, 3, H, W] in [0, 1] -> 8-bit PNG bytes (round half to even of 255 * y)."""
    img = y[0].clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG")
    return buf.getvalue()


def _check_image(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018  (reads the header only)
    except _PIL_ERRORS as e:
        raise DataError(f"{path}: not a readable image ({_describe(e)})") from e


def plan_outputs(inputs: Sequence[str | os.PathLike], out: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(input image, output PNG) pairs; see the module docstring for the rules. Raises DataError for a
    missing input, a non-image file, a folder without images or an output that cannot be written."""
    files: list[Path] = []
    for given in inputs:
        p = Path(given)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise DataError(f"{p}: no image files in this folder")
            files += found
        else:
            files.append(p)
    if not files:
        raise DataError("no input images")
    for f in files:
        _check_image(f)
    out = Path(out)
    if len(files) == 1 and not out.is_dir() and out.suffix.lower() in IMAGE_EXTENSIONS:
        if out.suffix.lower() != ".png":
            raise DataError(f"{out}: the output is a PNG; name it .png (or give a folder)")
        pairs = [(files[0], out)]
        folder = out.parent
    else:
        stems = [f.stem for f in files]
        dup = {s for s in stems if stems.count(s) > 1}
        if dup:
            raise DataError(f"two inputs would both write {out / (sorted(dup)[0] + '.png')}")
        pairs = [(f, out / f"{f.stem}.png") for f in files]
        folder = out
    _check_writable(folder)
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
) -> dict:
    """Runs the model on every input and writes the outputs atomically; returns timing figures."""
    from tqdm import tqdm

    sizes = []
    for src, _ in pairs:
        with Image.open(src) as im:
            sizes.append(im.size[::-1])
    total = sum(model.count_tiles(h, w, tile) for h, w in sizes)
    bar = tqdm(total=total, unit="tile", disable=not progress, desc="upscale")
    compute = 0.0
    start = time.perf_counter()
    try:
        for src, dst in pairs:
            bar.set_postfix_str(src.name)
            x = read_rgb(src)
            t0 = time.perf_counter()
            y = model.upscale(x, tile=tile, overlap=overlap, progress=bar.update)
            if y.is_cuda:
                torch.cuda.synchronize()
            compute += time.perf_counter() - t0
            try:
                atomic_write_bytes(dst, png_bytes(y))
            except CheckpointError as e:
                raise DataError(str(e)) from e
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
) -> dict:
    if tile < 0 or (overlap is not None and overlap < 0):
        raise QnasError("--tile and --overlap must not be negative")
    pairs = plan_outputs(inputs, out)
    retain_freed_memory()
    model = load_model(model_path, device)
    result = upscale_files(model, pairs, tile, overlap, progress)
    result.update(
        scale=model.scale,
        device=str(model.device),
        overlap=model.receptive_radius() if overlap is None else overlap,
        outputs=[str(d) for _, d in pairs],
    )
    return result
