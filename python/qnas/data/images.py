"""Reading and writing RGB images (Pillow), with one-line DataErrors that name the file.

Conventions: images are numpy uint8 arrays HxWx3 in RGB order, pixels as stored in the file
(EXIF orientation is not applied, as MATLAB's imread, which the SR benchmarks were made with).
Gray images are repeated into 3 channels; alpha is dropped (not composited); palette images are
expanded; 16-bit images are scaled to 8 bits (round(v / 257), MATLAB's im2uint8 of uint16). Multi-
frame files (TIFF, GIF) give their first frame.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from qnas.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "is_image_file", "list_images", "load_image", "save_image", "image_size"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

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
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected an image file")


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path) as im:
            width, height = im.size
    except _PIL_ERRORS as e:
        raise DataError(f"{path}: not a readable image ({_describe(e)})") from e
    return height, width


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as a uint8 HxWx3 RGB array (conventions in the module docstring).

    Raises DataError (one line, naming the file) when the file is missing, is not an image, or is
    corrupt or truncated.
    """
    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode now: truncated/corrupt data fails here, not later
            if im.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
                wide = np.asarray(im, dtype=np.float64)
                gray = np.floor(wide / 257.0 + 0.5).clip(0, 255).astype(np.uint8)
                rgb = np.repeat(gray[:, :, None], 3, axis=2)
            elif im.mode in ("I", "F"):
                raise DataError(
                    f"{path}: unsupported pixel format {im.mode} (32-bit); use 8- or 16-bit images"
                )
            else:
                # convert('RGB') repeats gray, expands palettes, drops alpha and handles CMYK/YCbCr.
                rgb = np.array(im.convert("RGB"), dtype=np.uint8)
    except DataError:
        raise
    except _PIL_ERRORS as e:
        raise DataError(f"{path}: not a readable image ({_describe(e)})") from e
    if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1:
        raise DataError(f"{path}: decoded to an unexpected shape {rgb.shape}")
    return np.ascontiguousarray(rgb)


def save_image(path: str | os.PathLike, img: np.ndarray) -> None:
    """Write a uint8 HxWx3 (or HxW) array; the format follows the extension (png, jpg, bmp, tif).
    Parent folders are created. Raises DataError naming the file when it cannot be written."""
    path = Path(path)
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3)):
        raise ValueError(f"img: expected a uint8 HxWx3 or HxW array, got {img.dtype} {img.shape}")
    if not is_image_file(path):
        raise DataError(f"{path}: unknown image extension (use one of {', '.join(IMAGE_EXTENSIONS)})")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(img)).save(path)
    except _PIL_ERRORS as e:
        raise DataError(f"{path}: cannot write image ({_describe(e)})") from e
