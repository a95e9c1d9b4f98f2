"""PSNR and SSIM under the standard super-resolution (MATLAB) evaluation protocol.

The protocol every SR table since SRCNN reports (the MATLAB scripts of SRCNN/VDSR/EDSR/RCAN):

1. Both images as uint8 RGB. Float tensors in [0, 1] are quantised the way MATLAB's im2uint8
   does: ``floor(255 * x + 0.5)`` (round half away from zero), saturated to 0..255
   (qnas.data.images.to_uint8, the rule of every image qnas writes too). A non-finite value is
   an error, never a pixel.
2. Luma Y of ``rgb2ycbcr`` on the uint8 image (ITU-R BT.601, studio swing):
   ``Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255`` with R, G, B in 0..255. For uint8 input
   MATLAB returns uint8, so Y is rounded half away from zero (range 16..235; no clamp needed).
   We do the same. (Some Python ports, e.g. BasicSR, keep Y unrounded; the difference is about
   0.01 dB, and this module follows MATLAB.)
3. ``crop_border`` pixels (the scale factor) removed from each side of Y.
4. PSNR = 10 log10(255^2 / MSE) on the float64 values (inf for identical images).
5. SSIM as Wang et al., "Image quality assessment: from error visibility to structural
   similarity", IEEE TIP 13(4), 2004 (their ssim_index.m): 11x11 Gaussian window, sigma = 1.5,
   normalised to sum 1; K1 = 0.01, K2 = 0.03, L = 255; local statistics with 'valid' filtering
   (no padding: the map is (H-10)x(W-10)); population (biased) variances; SSIM = mean of the map.
   No automatic downsampling (that is only in the later ssim.m).

Functions accept numpy uint8 HxWx3 (or HxW gray) arrays, or float torch tensors / numpy arrays
in [0, 1] shaped 3xHxW or 1x3xHxW (channels first, as the models produce them).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.ndimage import correlate1d

from qnas.data.images import to_uint8

__all__ = ["to_uint8_image", "rgb_to_y", "psnr", "ssim", "psnr_ssim"]

_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03
_PEAK = 255.0


def to_uint8_image(img: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 HxWx3 (or HxW) view of an image given as uint8 HxWx(3) numpy, or as a float image in
    [0, 1] (torch or numpy) shaped 3xHxW / 1x3xHxW, quantised by to_uint8 (im2uint8: floor(255 x +
    0.5), clamped to 0..255; ValueError for NaN or inf)."""
    if isinstance(img, torch.Tensor):
        if img.dtype == torch.uint8:
            arr = img.detach().cpu().numpy()
            return arr if arr.ndim == 2 else _chw_to_hwc_uint8(arr)
        img = img.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3):
            return arr
        raise ValueError(f"image: expected uint8 HxWx3 or HxW, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"image: expected uint8 or float in [0, 1], got {arr.dtype}")
    return _chw_to_hwc_uint8(to_uint8(arr))


def _chw_to_hwc_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise ValueError(f"image: expected a 3xHxW or 1x3xHxW tensor, got shape {arr.shape}")
    return np.ascontiguousarray(arr.transpose(1, 2, 0))


def rgb_to_y(img: np.ndarray | torch.Tensor) -> np.ndarray:
    """MATLAB ``rgb2ycbcr`` luma of a uint8 image, as float64 holding the rounded uint8 values
    (gray HxW input is taken as R = G = B)."""
    rgb = to_uint8_image(img).astype(np.float64)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    y = 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0
    return np.clip(np.floor(y + 0.5), 0, 255)


def _cropped_y_pair(sr, hr, crop_border: int) -> tuple[np.ndarray, np.ndarray]:
    y_sr, y_hr = rgb_to_y(sr), rgb_to_y(hr)
    if y_sr.shape != y_hr.shape:
        raise ValueError(f"images differ in size: {y_sr.shape} vs {y_hr.shape}")
    if crop_border < 0:
        raise ValueError(f"crop_border: expected >= 0, got {crop_border}")
    if crop_border:
        y_sr = y_sr[crop_border:-crop_border, crop_border:-crop_border]
        y_hr = y_hr[crop_border:-crop_border, crop_border:-crop_border]
    if y_sr.size == 0:
        raise ValueError(f"crop_border {crop_border} leaves nothing of a {y_hr.shape} image")
    return y_sr, y_hr


def _psnr_y(y_sr: np.ndarray, y_hr: np.ndarray) -> float:
    mse = float(np.mean((y_sr - y_hr) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(_PEAK * _PEAK / mse)


def _gaussian_window_1d() -> np.ndarray:
    # fspecial('gaussian', 11, 1.5) is the outer product of this normalised 1-D Gaussian with
    # itself (the 2-D normalisation factorises), so filtering is two 1-D passes.
    x = np.arange(_SSIM_WINDOW, dtype=np.float64) - (_SSIM_WINDOW - 1) / 2
    g = np.exp(-(x * x) / (2 * _SSIM_SIGMA * _SSIM_SIGMA))
    return g / g.sum()


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """MATLAB filter2(g' * g, img, 'valid'): correlate over the whole image, then keep the
    positions whose window lies fully inside (the padding never reaches them)."""
    half = (len(g) - 1) // 2
    out = correlate1d(correlate1d(img, g, axis=0, mode="constant"), g, axis=1, mode="constant")
    return out[half:-half, half:-half]


def _ssim_y(y_sr: np.ndarray, y_hr: np.ndarray) -> float:
    if min(y_sr.shape) < _SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs at least {_SSIM_WINDOW}x{_SSIM_WINDOW} pixels after the crop, got {y_sr.shape}"
        )
    g = _gaussian_window_1d()
    c1 = (_SSIM_K1 * _PEAK) ** 2
    c2 = (_SSIM_K2 * _PEAK) ** 2
    mu1, mu2 = _filter_valid(y_sr, g), _filter_valid(y_hr, g)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma1_sq = _filter_valid(y_sr * y_sr, g) - mu1_sq
    sigma2_sq = _filter_valid(y_hr * y_hr, g) - mu2_sq
    sigma12 = _filter_valid(y_sr * y_hr, g) - mu12
    ssim_map = ((2 * mu12 + c1) * (2 * sigma12 + c2)) / (
        (mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2)
    )
    return float(ssim_map.mean())


def psnr(sr, hr, crop_border: int) -> float:
    """PSNR (dB) on MATLAB-rgb2ycbcr Y with ``crop_border`` pixels cut from each side."""
    return _psnr_y(*_cropped_y_pair(sr, hr, crop_border))


def ssim(sr, hr, crop_border: int) -> float:
    """SSIM (Wang et al. 2004) on MATLAB-rgb2ycbcr Y with ``crop_border`` pixels cut from each side."""
    return _ssim_y(*_cropped_y_pair(sr, hr, crop_border))


def psnr_ssim(sr, hr, crop_border: int) -> tuple[float, float]:
    """Both metrics from one Y conversion: (psnr, ssim)."""
    y_sr, y_hr = _cropped_y_pair(sr, hr, crop_border)
    return _psnr_y(y_sr, y_hr), _ssim_y(y_sr, y_hr)
