"""qnas.metrics against independent computations (scikit-image) of the MATLAB SR protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _matlab_reference import matlab_y, protocol_psnr_ssim
from skimage.metrics import structural_similarity

from qnas.metrics import psnr, psnr_ssim, rgb_to_y, ssim, to_uint8_image


def _pair(seed, shape=(64, 80, 3), noise=12.0):
    rng = np.random.default_rng(seed)
    hr = rng.integers(0, 256, shape).astype(np.uint8)
    # Smooth the HR a little so SSIM is in a realistic range, then degrade it.
    hr = ((hr.astype(np.float64) + np.roll(hr, 1, 0) + np.roll(hr, 1, 1)) / 3).round().astype(np.uint8)
    sr = np.clip(hr + rng.normal(0, noise, shape), 0, 255).round().astype(np.uint8)
    return sr, hr


def test_y_is_matlab_rgb2ycbcr_for_uint8():
    rgb = np.random.default_rng(0).integers(0, 256, (50, 40, 3)).astype(np.uint8)
    np.testing.assert_array_equal(rgb_to_y(rgb), matlab_y(rgb))
    # BT.601 studio range: black -> 16, white -> 235.
    assert rgb_to_y(np.zeros((1, 1, 3), np.uint8))[0, 0] == 16
    assert rgb_to_y(np.full((1, 1, 3), 255, np.uint8))[0, 0] == 235
    # Gray input is R = G = B.
    gray = rgb[:, :, 0]
    np.testing.assert_array_equal(rgb_to_y(gray), rgb_to_y(np.repeat(gray[:, :, None], 3, 2)))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("border", [2, 3, 4])
def test_psnr_ssim_match_scikit_image(seed, border):
    sr, hr = _pair(seed, noise=4.0 + 6 * seed)
    ref_p, ref_s = protocol_psnr_ssim(sr, hr, border)
    p, s = psnr_ssim(sr, hr, crop_border=border)
    # Same protocol computed two ways: identical up to float rounding.
    assert abs(p - ref_p) < 1e-9
    assert abs(s - ref_s) < 1e-9
    assert psnr(sr, hr, border) == p and ssim(sr, hr, border) == s


def test_ssim_is_the_valid_part_of_the_map():
    # skimage with full=True gives the map over the whole image (reflect padding); SSIM is the
    # mean of its 'valid' part only, 5 pixels in from each side.
    sr, hr = _pair(5, shape=(40, 52, 3))
    y_sr, y_hr = rgb_to_y(sr), rgb_to_y(hr)
    _, full_map = structural_similarity(
        y_hr, y_sr, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, full=True
    )
    assert abs(ssim(sr, hr, 0) - full_map[5:-5, 5:-5].mean()) < 1e-12


def test_psnr_known_value_and_identical_images():
    hr = np.full((20, 20, 3), 100, np.uint8)
    sr = hr.copy()
    assert psnr(sr, hr, 2) == math.inf
    assert ssim(sr, hr, 2) == pytest.approx(1.0, abs=1e-12)
    # A gray step that moves Y by exactly 1 everywhere: MSE 1 -> 10 log10(255^2) dB.
    y_hr, y_sr = rgb_to_y(hr)[0, 0], None
    for v in range(101, 110):
        if rgb_to_y(np.full((1, 1, 3), v, np.uint8))[0, 0] == y_hr + 1:
            y_sr = v
            break
    assert y_sr is not None
    assert psnr(np.full((20, 20, 3), y_sr, np.uint8), hr, 2) == pytest.approx(20 * math.log10(255), abs=1e-12)


def test_float_tensors_are_quantised_like_im2uint8():
    sr, hr = _pair(3)
    expected = psnr_ssim(sr, hr, 3)

    def as_tensor(img, batch):
        t = torch.from_numpy(img).permute(2, 0, 1).to(torch.float32) / 255
        return t.unsqueeze(0) if batch else t

    assert psnr_ssim(as_tensor(sr, True), as_tensor(hr, False), 3) == expected
    # Values within half a level of the same uint8 (and out of [0, 1]) quantise to it.
    jitter = as_tensor(sr, False) + (torch.rand(sr.transpose(2, 0, 1).shape) - 0.5) * 0.99 / 255
    assert psnr_ssim(jitter, hr, 3) == expected
    over = as_tensor(np.full((4, 4, 3), 255, np.uint8), False) + 0.2
    np.testing.assert_array_equal(to_uint8_image(over), np.full((4, 4, 3), 255, np.uint8))
    # Round half away from zero: 0.5/255 -> 1 (torch.round would give 0).
    half = torch.full((3, 2, 2), 0.5 / 255, dtype=torch.float64)
    assert to_uint8_image(half).max() == 1


def test_metric_errors():
    sr, hr = _pair(0)
    with pytest.raises(ValueError, match="differ in size"):
        psnr(sr[:-1], hr, 2)
    with pytest.raises(ValueError, match="crop_border"):
        psnr(sr, hr, -1)
    with pytest.raises(ValueError, match="11x11"):
        ssim(sr[:20, :20], hr[:20, :20], 5)
    with pytest.raises(ValueError, match="3xHxW"):
        psnr(torch.zeros(4, 8, 8), torch.zeros(4, 8, 8), 0)
