"""The embedded data set `builtin`: photographs that ship inside scikit-image, no download.

scikit-image bundles some of its sample images in the wheel (skimage/data/*.png, *.jpg) and
fetches the rest from the internet with pooch on first use. We read the bundled files directly
from ``skimage.data.data_dir`` with our own loader, so nothing here can ever trigger a download.

Selection (15 photographs of distinct scenes; see docs/data.md): every bundled natural photograph
except those that would mislead an SR benchmark: ``clock_motion`` (synthetic motion blur),
``hubble_deep_field`` and ``retina`` (mostly black background, which inflates PSNR), ``cell``
(nearly featureless microscopy), and the synthetic/graphic images (``color``, ``logo``,
chessboards, ``horse``, ``phantom``); ``cat`` is the same picture as ``chelsea``.

Split (fixed, 10 train / 5 validation): the validation images are never used for training or
search. Both splits mix colour and gray photographs, faces/objects/textures/text, so a model that
generalises is measured on the same kinds of content it was trained on, not on the same images.
The stereo pair motorcycle_left/right shows one scene, so both stay on the training side.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BUILTIN_FILES", "BUILTIN_TRAIN", "BUILTIN_VALIDATION", "builtin_data_dir", "builtin_path"]

# name -> file in skimage's data folder (colour unless noted).
BUILTIN_FILES: dict[str, str] = {
    "astronaut": "astronaut.png",
    "coffee": "coffee.png",
    "motorcycle_left": "motorcycle_left.png",
    "motorcycle_right": "motorcycle_right.png",
    "immunohistochemistry": "ihc.png",
    "camera": "camera.png",  # gray
    "moon": "moon.png",  # gray
    "brick": "brick.png",  # gray
    "grass": "grass.png",  # gray
    "page": "page.png",  # gray
    "chelsea": "chelsea.png",
    "rocket": "rocket.jpg",
    "coins": "coins.png",  # gray
    "gravel": "gravel.png",  # gray
    "text": "text.png",  # gray
}

BUILTIN_TRAIN: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "motorcycle_left",
    "motorcycle_right",
    "immunohistochemistry",
    "camera",
    "moon",
    "brick",
    "grass",
    "page",
)

BUILTIN_VALIDATION: tuple[str, ...] = ("chelsea", "rocket", "coins", "gravel", "text")


def builtin_data_dir() -> Path:
    """skimage's folder of bundled sample images."""
    import skimage.data

    return Path(skimage.data.data_dir)


def builtin_path(name: str) -> Path:
    """The bundled file of one builtin image."""
    return builtin_data_dir() / BUILTIN_FILES[name]
