"""Evaluating an upscaler on whole images under the standard SR protocol (qnas.metrics).

``evaluate(upscale_fn, dataset, scale)`` is what ``qnas eval`` runs for every kind of model: bicubic
here, trained checkpoints by wrapping the network in a function of the same shape.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from qnas.data.datasets import EvalImages, check_scale
from qnas.data.images import save_image
from qnas.data.imresize import imresize
from qnas.errors import QnasError
from qnas.files import check_output_file
from qnas.metrics import psnr_ssim, to_uint8_image

__all__ = ["Upscaler", "bicubic_upscaler", "evaluate", "format_table"]

# Takes the LR image as a float32 tensor [1, 3, h, w] in [0, 1]; returns the SR image as a float
# tensor [1, 3, H, W] or [3, H, W] in [0, 1] (quantised by the metrics as im2uint8 does), or as
# a uint8 HxWx3 numpy array.
Upscaler = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]


def bicubic_upscaler(scale: int) -> Upscaler:
    """The bicubic baseline of SR papers: MATLAB ``imresize(LR, scale)`` of the uint8 LR image."""
    scale = check_scale(scale)

    def upscale(lr: torch.Tensor) -> np.ndarray:
        return imresize(to_uint8_image(lr), scale)

    return upscale


def evaluate(
    upscale_fn: Upscaler,
    dataset: EvalImages,
    scale: int,
    save_dir: str | os.PathLike | None = None,
    progress: bool = True,
    *,
    label: str = "the model",
    force: bool = False,
) -> dict:
    """Upscale every LR image of ``dataset`` and score it against its HR image.

    Returns ``{"psnr": mean dB, "ssim": mean, "scale": scale, "images": [{"name", "psnr",
    "ssim"}, ...]}``: per-image PSNR/SSIM on Y with a ``scale``-pixel border cropped, and their
    arithmetic means (the way SR tables average). An output with NaN or inf is a QnasError naming
    ``label`` and the image, never a number. With ``save_dir``, each SR image is written there as
    ``<name>.png`` (checked first: never over an image of the data set, nor over an existing file
    unless ``force``). Runs under ``torch.inference_mode``; progress bar on stderr.
    """
    scale = check_scale(scale)
    if dataset.scale != scale:
        raise ValueError(f"dataset is for x{dataset.scale}, evaluate was asked for x{scale}")
    out_dir = Path(save_dir) if save_dir is not None else None
    if out_dir is not None:
        sources = [p for r in dataset.records for p in (r.hr_path, r.lr_path) if p is not None]
        for r in dataset.records:
            check_output_file(out_dir / f"{r.name}.png", force=force, inputs=sources, option="--save-images")
    images = []
    with torch.inference_mode():
        for index in tqdm(
            range(len(dataset)), desc=f"eval x{scale}", unit="img", file=sys.stderr, disable=not progress
        ):
            item = dataset[index]
            out = upscale_fn(item["lr"].unsqueeze(0))
            if (
                isinstance(out, torch.Tensor)
                and out.is_floating_point()
                and not bool(torch.isfinite(out).all())
            ):
                raise QnasError(f"{label}: the output on image {item['name']} is not finite (NaN or inf)")
            sr = to_uint8_image(out)
            hr = to_uint8_image(item["hr"])
            if sr.shape != hr.shape:
                raise ValueError(f"{item['name']}: upscaled image is {sr.shape}, HR image is {hr.shape}")
            p, s = psnr_ssim(sr, hr, crop_border=scale)
            images.append({"name": item["name"], "psnr": p, "ssim": s})
            if out_dir is not None:
                save_image(out_dir / f"{item['name']}.png", sr)
    return {
        "psnr": float(np.mean([im["psnr"] for im in images])),
        "ssim": float(np.mean([im["ssim"] for im in images])),
        "scale": scale,
        "images": images,
    }


def format_table(result: dict, title: str | None = None) -> str:
    """Plain-text table of an ``evaluate`` result: one row per image, then the mean."""
    names = [im["name"] for im in result["images"]]
    width = max([len("image"), len("mean"), *(len(n) for n in names)])
    lines = [title] if title else []
    lines.append(f"{'image':<{width}}  {'PSNR (dB)':>9}  {'SSIM':>6}")
    lines.append("-" * (width + 19))
    for im in result["images"]:
        lines.append(f"{im['name']:<{width}}  {im['psnr']:9.2f}  {im['ssim']:6.4f}")
    lines.append("-" * (width + 19))
    lines.append(f"{'mean':<{width}}  {result['psnr']:9.2f}  {result['ssim']:6.4f}")
    return "\n".join(lines)
