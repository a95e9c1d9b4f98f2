"""Reading and writing RGB images (Pillow), with one-line DataErrors that name the file: the one image
reader and writer of qnas (data sets, `qnas eval`, `qnas upscale`).

Conventions: images are numpy uint8 arrays HxWx3 in RGB order, pixels as stored in the file
(EXIF orientation is not applied, as MATLAB's imread, which the SR benchmarks were made with).
Gray images are repeated into 3 channels; alpha is dropped (not composited); palette images are
expanded; 16-bit gray images are scaled to 8 bits (round(v / 257), MATLAB's im2uint8 of uint16;
Pillow itself gives 16-bit RGB files as their high bytes); 32-bit float images are read when every
value is in [0, 1] (to_uint8), and refused otherwise, as are 32-bit integer images, whose range is
not defined. Multi-frame files (TIFF, GIF) give their first frame. Images of more than MAX_PIXELS
pixels are refused from their header.

Float images leave qnas as 8 bits through one rule, `to_uint8`: floor(255 x + 0.5) clamped to 0..255
(round half up, MATLAB's im2uint8), for the images `qnas eval --save-images` and `qnas upscale` write
and for the PSNR/SSIM of the MATLAB protocol (qnas.metrics).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from qnas.atomic_write import atomic_write_bytes
from qnas.errors import CheckpointError, DataError
from qnas.files import check_input_file

__all__ = [
    "IMAGE_EXTENSIONS",
    "is_image_file",
    "list_images",
    "load_image",
    "save_image",
    "image_size",
    "check_image",
    "to_uint8",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# What Pillow raises on unreadable data: OSError (truncated, decoder errors, UnidentifiedImageError),
# SyntaxError (some broken PNG chunks), ValueError/struct errors (malformed headers),
# DecompressionBombError (absurd sizes).
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a file whose extension is one qnas reads (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name (other files are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def _describe(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _check_file(path: Path) -> None:
    check_input_file(path, "image file", DataError)


def to_uint8(x) -> np.ndarray:
    """A float array (numpy or torch, any shape) of values in [0, 1] as uint8: floor(255 x + 0.5)
    clamped to 0..255 (the module docstring). Non-finite values are a ValueError, never a pixel."""
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("image: has non-finite values (NaN or inf)")
    return np.clip(np.floor(arr * 255.0 + 0.5), 0, 255).astype(np.uint8)


# The largest image qnas decodes: 2^26 pixels (an 8K frame is 33 M). A compressed file of a few KB can
# declare far more (a "decompression bomb"); its header is refused before any pixel is decoded.
MAX_PIXELS = 2**26


def _check_size(im: Image.Image, path: Path) -> None:
    width, height = im.size
    if width * height > MAX_PIXELS:
        raise DataError(f"{path}: {height}x{width} pixels, more than the {MAX_PIXELS:,} qnas reads")


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path) as im:
            _check_size(im, path)
            width, height = im.size
    except DataError:
        raise
    except _PIL_ERRORS as e:
        raise DataError(f"{path}: not a readable image ({_describe(e)})") from e
    return height, width


def _pixels(im: Image.Image, path: Path) -> np.ndarray:
    """The decoded uint8 HxWx3 pixels of an open image (conventions in the module docstring)."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        wide = np.asarray(im, dtype=np.float64)
        gray = np.floor(wide / 257.0 + 0.5).clip(0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode == "F":
        values = np.asarray(im, dtype=np.float64)
        if not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise DataError(
                f"{path}: 32-bit float image with values outside [0, 1] (min {values.min():.4g}, "
                f"max {values.max():.4g}); save it as an 8- or 16-bit image"
            )
        return np.repeat(to_uint8(values)[:, :, None], 3, axis=2)
    if im.mode == "I":
        raise DataError(f"{path}: unsupported pixel format I (32-bit integers); use 8- or 16-bit images")
    # convert('RGB') repeats gray, expands palettes, drops alpha and handles CMYK/YCbCr.
    return np.array(im.convert("RGB"), dtype=np.uint8)


def check_image(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image load_image will accept, checked without decoding it where the
    header says enough: only float images, whose range the pixels tell, are decoded."""
    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path) as im:
            _check_size(im, path)
            if im.mode in ("I", "F"):
                im.load()
                _pixels(im, path)
            width, height = im.size
    except DataError:
        raise
    except _PIL_ERRORS as e:
        raise DataError(f"{path}: not a readable image ({_describe(e)})") from e
    return height, width


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as a uint8 HxWx3 RGB array (conventions in the module docstring).

    Raises DataError (one line, naming the file) when the file is missing, is not a regular file or
    an image, is corrupt or truncated, or has pixels without a defined 8-bit meaning.
    """
    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path) as im:
            _check_size(im, path)
            im.load()  # decode now: truncated/corrupt data fails here, not later
            rgb = _pixels(im, path)
    except DataError:
        raise
    except _PIL_ERRORS as e:
        raise DataError(f"{path}: not a readable image ({_describe(e)})") from e
    if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1:
        raise DataError(f"{path}: decoded to an unexpected shape {rgb.shape}")
    return np.ascontiguousarray(rgb)


def save_image(path: str | os.PathLike, img: np.ndarray) -> None:
    """Write a uint8 HxWx3 (or HxW) array; the format follows the extension (png, jpg, bmp, tif, webp).
    Parent folders are created; the file is written atomically (qnas.atomic_write: complete or absent,
    with the usual permissions). Raises DataError naming the file when it cannot be written."""
    path = Path(path)
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3)):
        raise ValueError(f"img: expected a uint8 HxWx3 or HxW array, got {img.dtype} {img.shape}")
    if not is_image_file(path):
        raise DataError(f"{path}: unknown image extension (use one of {', '.join(IMAGE_EXTENSIONS)})")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    buf = io.BytesIO()
    try:
        Image.fromarray(np.ascontiguousarray(img)).save(
            buf, format=Image.registered_extensions()[path.suffix.lower()]
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
    except CheckpointError as e:
        raise DataError(str(e)) from e
    except _PIL_ERRORS as e:
        raise DataError(f"{path}: cannot write image ({_describe(e)})") from e
