"""Independent, deliberately naive re-implementations of the MATLAB SR protocol for the tests.

Written from MATLAB's documented algorithm (imresize.m: Keys cubic a = -0.5, antialiasing by
stretching the kernel, symmetric borders, one dimension at a time with the result of each pass in
the input's class) as a per-output-pixel loop in float64 Python, sharing no code with
qnas.data.imresize; and the Y/PSNR/SSIM protocol from scikit-image's functions. Slow: small
images only.
"""

from __future__ import annotations

import math

import numpy as np
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def keys_cubic(t: float) -> float:
    """Keys (1981) cubic convolution kernel with a = -0.5, Horner form."""
    t = abs(t)
    if t <= 1.0:
        return (1.5 * t - 2.5) * t * t + 1.0
    if t < 2.0:
        return ((-0.5 * t + 2.5) * t - 4.0) * t + 2.0
    return 0.0


def reflect(k: int, n: int) -> int:
    """1-based index k folded into 1..n by symmetric reflection (the edge pixel repeats)."""
    while k < 1 or k > n:
        k = 1 - k if k < 1 else 2 * n + 1 - k
    return k


def line_taps(n_in: int, n_out: int, scale: float, antialias: bool) -> list[list[tuple[int, float]]]:
    """For each output position, the (0-based source index, normalised weight) pairs."""
    stretch = scale if (scale < 1.0 and antialias) else 1.0
    half_width = 2.0 / stretch
    taps = []
    for x in range(1, n_out + 1):
        u = x / scale + 0.5 * (1.0 - 1.0 / scale)
        ks = range(math.floor(u - half_width), math.ceil(u + half_width) + 1)
        raw = [stretch * keys_cubic(stretch * (u - k)) for k in ks]
        total = 0.0
        for w in raw:
            total += w
        taps.append([(reflect(k, n_in) - 1, w / total) for k, w in zip(ks, raw, strict=True) if w != 0.0])
    return taps


def store_as(values: np.ndarray, dtype) -> np.ndarray:
    if dtype == np.uint8:
        out = np.empty(values.shape, dtype=np.uint8)
        for idx, v in np.ndenumerate(values):
            r = math.floor(v + 0.5)  # MATLAB uint8(): round half away from zero (v >= -0.5 here), saturate
            out[idx] = min(255, max(0, r))
        return out
    return values.astype(dtype)


def matlab_imresize(img: np.ndarray, scale: float, antialias: bool = True) -> np.ndarray:
    """imresize(img, scale) with MATLAB's bicubic defaults, one output pixel at a time."""
    dtype = img.dtype
    squeeze = img.ndim == 2
    a = img[:, :, None] if squeeze else img
    sizes = [a.shape[0], a.shape[1]]
    out_sizes = [math.ceil(scale * sizes[0]), math.ceil(scale * sizes[1])]
    for dim in (0, 1):  # equal scales: rows first (MATLAB's stable sort)
        taps = line_taps(sizes[dim], out_sizes[dim], scale, antialias)
        src = a.astype(np.float64)
        shape = list(src.shape)
        shape[dim] = out_sizes[dim]
        res = np.zeros(shape, dtype=np.float64)
        for i in range(out_sizes[dim]):
            for j in range(src.shape[1 - dim]):
                acc = np.zeros(src.shape[2], dtype=np.float64)
                for k, w in taps[i]:
                    acc = acc + w * (src[k, j] if dim == 0 else src[j, k])
                if dim == 0:
                    res[i, j] = acc
                else:
                    res[j, i] = acc
        a = store_as(res, dtype)
    return a[:, :, 0] if squeeze else a


def matlab_y(rgb_uint8: np.ndarray) -> np.ndarray:
    """MATLAB rgb2ycbcr(uint8) luma: scikit-image's BT.601 Y, rounded half away to uint8 values."""
    y = rgb2ycbcr(rgb_uint8)[..., 0]
    return np.floor(y + 0.5)


def protocol_psnr_ssim(sr: np.ndarray, hr: np.ndarray, border: int) -> tuple[float, float]:
    """PSNR/SSIM on Y with ``border`` pixels cropped, by scikit-image (SSIM of Wang et al.: Gaussian
    11x11 window, sigma 1.5, population covariances; skimage averages the 'valid' part of the map)."""
    y_sr = matlab_y(sr)[border:-border, border:-border]
    y_hr = matlab_y(hr)[border:-border, border:-border]
    p = peak_signal_noise_ratio(y_hr, y_sr, data_range=255)
    s = structural_similarity(
        y_hr, y_sr, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )
    return float(p), float(s)
