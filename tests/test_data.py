"""qnas.data: MATLAB bicubic imresize, image files, the builtin set, data specs and patch sampling."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _matlab_reference import matlab_imresize
from PIL import Image

from qnas.data import builtin
from qnas.data.datasets import (
    PatchSampler,
    TrainPatches,
    check_scale,
    eval_dataset,
    load_pair,
    resolve_data,
    train_dataset,
)
from qnas.data.images import load_image, save_image
from qnas.data.imresize import imresize, modcrop
from qnas.errors import DataError, QnasError

REPO = Path(__file__).resolve().parents[1]


def _random_image(shape, seed, dtype=np.uint8):
    img = np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)
    return img if dtype == np.uint8 else (img / 255.0).astype(dtype)


def _smooth_image(h, w, seed=0):
    """A band-limited colour image: bicubic resizing of it is accurate away from borders."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = []
    for _ in range(3):
        fy, fx = rng.uniform(0.01, 0.05, 2)
        py, px = rng.uniform(0, 2 * np.pi, 2)
        chans.append(128 + 60 * np.sin(2 * np.pi * fy * yy + py) + 50 * np.cos(2 * np.pi * fx * xx + px))
    return np.clip(np.round(np.stack(chans, axis=2)), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# imresize


@pytest.mark.parametrize("scale", [2, 3, 4, 1 / 2, 1 / 3, 1 / 4])
@pytest.mark.parametrize("shape", [(13, 11, 3), (9, 14), (16, 12, 3)])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
@pytest.mark.parametrize("antialias", [True, False])
def test_imresize_matches_per_pixel_matlab_algorithm(scale, shape, dtype, antialias):
    img = _random_image(shape, seed=sum(shape), dtype=dtype)
    ours = imresize(img, scale, antialias=antialias)
    ref = matlab_imresize(img, scale, antialias)
    assert ours.dtype == img.dtype and ours.shape == ref.shape
    if dtype == np.uint8:
        np.testing.assert_array_equal(ours, ref)
    else:
        # Pixel values are in [0, 1]; the two sum the same taps, with weights evaluated in a
        # different form, so they agree to a few ulps of 1 (cancellation makes rtol meaningless).
        np.testing.assert_allclose(ours, ref, rtol=0, atol=16 * np.finfo(dtype).eps)


# Output of MATLAB's imresize (bicubic) on this 8x10 uint8 image, as published in the tests of
# GNU Octave's image package (inst/imresize.m, "reference results from matlab").
_OCTAVE_IN = np.array(
    [
        [116, 227, 153, 69, 146, 194, 59, 130, 139, 106],
        [2, 47, 137, 249, 90, 75, 16, 24, 158, 44],
        [155, 68, 46, 84, 166, 156, 69, 204, 32, 152],
        [71, 221, 137, 230, 210, 153, 192, 115, 30, 118],
        [107, 143, 108, 52, 51, 73, 101, 21, 175, 90],
        [54, 158, 143, 77, 26, 168, 113, 229, 165, 225],
        [9, 47, 133, 135, 130, 207, 236, 43, 19, 73],
        [129, 60, 59, 243, 64, 181, 249, 56, 32, 86],
    ],
    dtype=np.uint8,
)
_MATLAB_OUT = {
    (1.5, True): """116 187 237 171 94 61 135 191 187 75 91 142 140 124 108
        43 92 143 149 164 163 119 123 118 44 38 80 151 118 62
        13 21 47 107 195 228 115 81 70 24 19 56 137 105 48
        146 98 49 49 71 107 148 159 132 58 124 176 61 85 146
        118 139 144 92 116 168 201 188 159 140 167 158 27 69 153
        61 151 218 145 174 219 201 164 146 187 148 84 48 76 115
        102 132 151 119 90 72 72 72 83 114 60 31 144 130 80
        81 121 154 133 87 41 19 67 116 95 108 140 183 180 163
        37 95 152 150 117 73 35 108 179 130 174 214 153 176 219
        3 29 73 131 136 120 116 162 214 229 147 54 35 62 96
        67 54 51 83 153 187 111 141 210 255 149 22 13 42 74
        142 99 53 43 164 237 77 103 197 254 159 42 31 59 91""",
    (0.5, False): "92 164 123 38 118 139 116 188 167 69 121 87 67 108 180 54 153 141 149 42",
    (0.5, True): "105 140 126 81 109 110 134 153 114 93 108 108 94 127 146 67 126 162 149 62",
    (4 / 3, True): """116 203 221 141 62 110 180 191 70 104 143 136 111 106
        26 78 126 156 200 139 103 103 33 28 92 158 67 46
        51 35 51 112 195 146 101 87 29 57 100 114 81 74
        159 110 63 50 82 148 179 152 83 173 147 27 143 170
        70 171 189 134 217 226 193 158 186 157 83 25 114 135
        91 152 162 116 118 114 102 98 138 65 60 127 92 84
        90 130 144 111 52 24 50 101 94 86 129 190 146 135
        41 114 157 139 89 37 82 178 125 192 203 154 213 227
        4 33 89 141 127 118 151 213 232 119 35 34 81 92
        88 61 54 97 203 129 115 203 255 119 18 24 70 81
        147 91 43 68 247 125 80 191 255 130 33 37 83 94""",
    (1 / 3, False): "47 90 24 44 143 51 21 90 60 64 56 86",
    (1 / 3, True): "115 135 97 101 113 119 124 125 81 157 118 64",
}


@pytest.mark.parametrize("scale,antialias", list(_MATLAB_OUT))
def test_imresize_reproduces_published_matlab_output(scale, antialias):
    out = imresize(_OCTAVE_IN, scale, antialias=antialias)
    expected = np.array(_MATLAB_OUT[(scale, antialias)].split(), dtype=np.uint8).reshape(out.shape)
    # Exact: Octave accepts +-1 here because it does not round the intermediate pass to uint8
    # as MATLAB does; we do, and match every pixel.
    np.testing.assert_array_equal(out, expected)


def test_imresize_rounds_the_intermediate_pass_like_matlab():
    # Resizing the float image and rounding only at the end (what many Python ports do) differs
    # from MATLAB on this input; our uint8 path does not.
    float_path = np.floor(imresize(_OCTAVE_IN.astype(np.float64), 1.5) + 0.5).clip(0, 255)
    expected = np.array(_MATLAB_OUT[(1.5, True)].split(), dtype=np.float64).reshape(float_path.shape)
    assert np.any(float_path != expected)


@pytest.mark.parametrize("scale", [2, 3, 4, 1 / 2, 1 / 3, 1 / 4, 0.7, 1.3])
@pytest.mark.parametrize("dtype", [np.uint8, np.float64])
def test_imresize_keeps_constant_images_constant(scale, dtype):
    img = np.full((15, 22, 3), 137, dtype=np.uint8).astype(dtype)
    out = imresize(img, scale)
    assert out.shape == (int(np.ceil(15 * scale)), int(np.ceil(22 * scale)), 3)
    np.testing.assert_allclose(out.astype(np.float64), 137.0, atol=1e-9)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_imresize_integer_upscale_passes_through_samples(scale):
    # Output pixel x maps to u = x/s + (1 - 1/s)/2; for x = s*i + (s+1)/2 (odd s) u is the input
    # pixel i itself, where Keys' kernel is 1 at 0 and 0 at the other integers.
    img = _random_image((10, 9, 3), seed=scale)
    out = imresize(img, scale)
    if scale % 2:
        np.testing.assert_array_equal(out[(scale - 1) // 2 :: scale, (scale - 1) // 2 :: scale], img)
    # Upscaling never antialiases, so the flag changes nothing.
    np.testing.assert_array_equal(out, imresize(img, scale, antialias=False))


def test_imresize_without_antialias_is_plain_bicubic_interpolation():
    # Keys' cubic convolution reproduces polynomials up to degree 2 exactly, so away from the
    # borders plain bicubic interpolation (antialias off) of a quadratic surface returns the
    # surface at MATLAB's sample positions u = x/scale + (1 - 1/scale)/2 (1-based).
    h, w = 30, 26
    i, j = np.mgrid[1 : h + 1, 1 : w + 1].astype(np.float64)

    def surface(a, b):
        return 3.0 + 0.5 * a - 0.25 * b + 0.02 * a * a - 0.03 * a * b + 0.01 * b * b

    img = surface(i, j)
    for scale in (1 / 2, 1 / 3, 1 / 4, 0.6):
        out = imresize(img, scale, antialias=False)
        xs = np.arange(1, out.shape[0] + 1) / scale + 0.5 * (1 - 1 / scale)
        ys = np.arange(1, out.shape[1] + 1) / scale + 0.5 * (1 - 1 / scale)
        expected = surface(xs[:, None], ys[None, :])
        inner = (slice(2, -2), slice(2, -2))  # keep the 4-tap support off the mirrored border
        np.testing.assert_allclose(out[inner], expected[inner], atol=1e-10)
    # On a non-polynomial image, antialiasing (wider, stretched kernel) changes the result.
    noise = _random_image((30, 26, 3), seed=1)
    assert not np.array_equal(imresize(noise, 0.5), imresize(noise, 0.5, antialias=False))


def test_imresize_downscale_without_antialias_at_one_third_samples_pixels():
    img = _random_image((12, 15, 3), seed=7)
    np.testing.assert_array_equal(imresize(img, 1 / 3, antialias=False), img[1::3, 1::3])


def test_imresize_output_shape_and_anisotropic_scale():
    img = _random_image((20, 30, 3), seed=3)
    np.testing.assert_array_equal(imresize(img, output_shape=(10, 15)), imresize(img, 0.5))
    out = imresize(img, (0.5, 2.0))
    assert out.shape == (10, 60, 3)
    # Rows (smaller scale) first: equal to resizing rows then columns by hand.
    np.testing.assert_array_equal(out, imresize(imresize(img, (0.5, 1.0)), (1.0, 2.0)))


def test_imresize_is_channel_independent_and_keeps_2d():
    img = _random_image((11, 13, 3), seed=5)
    out = imresize(img, 1 / 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], imresize(img[:, :, c], 1 / 3))
    assert imresize(img[:, :, 0], 2).ndim == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"scale": 0}, "scale"),
        ({"scale": -2}, "scale"),
        ({}, "scale or output_shape"),
        ({"output_shape": (0, 3)}, "output_shape"),
    ],
)
def test_imresize_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        imresize(np.zeros((4, 4), np.uint8), **kwargs)
    with pytest.raises(ValueError, match="img"):
        imresize(np.zeros((4, 4), np.int32), 2)


def test_modcrop():
    img = np.arange(7 * 10).reshape(7, 10)
    np.testing.assert_array_equal(modcrop(img, 3), img[:6, :9])
    np.testing.assert_array_equal(modcrop(img, 2), img[:6, :10])
    assert modcrop(img, 1) is not None and modcrop(img, 1).shape == (7, 10)


# ---------------------------------------------------------------------------------------------
# image files


@pytest.mark.parametrize("ext", ["png", "bmp", "tif", "jpg"])
def test_load_save_roundtrip(tmp_path, ext):
    img = _smooth_image(21, 34)
    path = tmp_path / f"a.{ext}"
    save_image(path, img)
    back = load_image(path)
    assert back.dtype == np.uint8 and back.shape == img.shape
    if ext == "jpg":
        assert np.abs(back.astype(int) - img).mean() < 6  # lossy, chroma subsampled
    else:
        np.testing.assert_array_equal(back, img)


def test_load_image_modes(tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, (9, 8)).astype(np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    np.testing.assert_array_equal(load_image(tmp_path / "gray.png"), np.repeat(gray[:, :, None], 3, 2))

    rgba = np.random.default_rng(1).integers(0, 256, (9, 8, 4)).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), rgba[:, :, :3])

    Image.fromarray(rgba[:, :, :3], "RGB").convert("P").save(tmp_path / "pal.png")
    assert load_image(tmp_path / "pal.png").shape == (9, 8, 3)

    wide = (gray.astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    np.testing.assert_array_equal(load_image(tmp_path / "wide.png")[:, :, 0], gray)


def _assert_one_line_data_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for needle in needles:
        assert str(needle) in msg, msg


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(DataError) as e:
        load_image(tmp_path / "missing.png")
    _assert_one_line_data_error(e, tmp_path / "missing.png", "no such file")

    with pytest.raises(DataError) as e:
        load_image(tmp_path)
    _assert_one_line_data_error(e, tmp_path, "folder")

    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    with pytest.raises(DataError) as e:
        load_image(text)
    _assert_one_line_data_error(e, text, "not a readable image")

    good = tmp_path / "good.png"
    save_image(good, _random_image((64, 64, 3), seed=0))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError) as e:
        load_image(truncated)
    _assert_one_line_data_error(e, truncated)

    corrupt = tmp_path / "corrupt.jpg"
    data = bytearray((tmp_path / "good.png").read_bytes())
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + bytes(data[4:200]))
    with pytest.raises(DataError) as e:
        load_image(corrupt)
    _assert_one_line_data_error(e, corrupt)


def test_save_image_errors(tmp_path):
    with pytest.raises(DataError) as e:
        save_image(tmp_path / "x.xyz", np.zeros((4, 4, 3), np.uint8))
    _assert_one_line_data_error(e, "x.xyz", "extension")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DataError) as e:
        save_image(blocker / "sub" / "x.png", np.zeros((4, 4, 3), np.uint8))
    _assert_one_line_data_error(e, blocker)


# ---------------------------------------------------------------------------------------------
# builtin set


def test_builtin_split_is_fixed_disjoint_and_loads_offline():
    train, val = set(builtin.BUILTIN_TRAIN), set(builtin.BUILTIN_VALIDATION)
    assert not train & val
    assert train | val == set(builtin.BUILTIN_FILES)
    assert len(train) == 10 and len(val) == 5
    data_dir = builtin.builtin_data_dir().resolve()
    for name in builtin.BUILTIN_FILES:
        path = builtin.builtin_path(name)
        # Bundled in the scikit-image wheel, read directly: never a pooch download.
        assert path.resolve().parent == data_dir and path.is_file(), path
        img = load_image(path)
        assert img.dtype == np.uint8 and img.ndim == 3 and min(img.shape[:2]) >= 172
    assert [r.name for r in resolve_data("builtin", 2, "train")] == list(builtin.BUILTIN_TRAIN)
    assert [r.name for r in resolve_data("builtin", 2, "eval")] == list(builtin.BUILTIN_VALIDATION)
    assert [r.name for r in resolve_data("builtin:train", 3, "eval")] == list(builtin.BUILTIN_TRAIN)
    assert [r.name for r in resolve_data("builtin:val", 4, "train")] == list(builtin.BUILTIN_VALIDATION)


def test_builtin_split_is_documented():
    doc = (REPO / "docs" / "data.md").read_text()
    for name in builtin.BUILTIN_FILES:
        assert re.search(rf"\b{name}\b", doc), f"{name} missing from docs/data.md"


# ---------------------------------------------------------------------------------------------
# data specs and layouts


def _write_images(folder: Path, sizes: dict[str, tuple[int, int]], seed=0) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, (name, (h, w)) in enumerate(sizes.items()):
        img = _smooth_image(h, w, seed=seed + k)
        save_image(folder / f"{name}.png", img)
        out[name] = img
    return out


def test_plain_folder_modcrops_and_makes_bicubic_lr(tmp_path):
    imgs = _write_images(tmp_path / "set", {"b": (50, 37), "a": (41, 44)})
    (tmp_path / "set" / "readme.txt").write_text("ignored")
    ds = eval_dataset(str(tmp_path / "set"), 3)
    assert [r.name for r in ds.records] == ["a", "b"]
    item = ds[1]
    assert item["name"] == "b"
    hr = modcrop(imgs["b"], 3)
    assert item["hr"].shape == (3, 48, 36) and item["lr"].shape == (3, 16, 12)
    assert item["hr"].dtype == torch.float32
    np.testing.assert_array_equal((item["hr"] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy(), hr)
    np.testing.assert_array_equal(
        (item["lr"] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy(), imresize(hr, 1 / 3)
    )


def test_div2k_layout_uses_provided_lr_and_generates_missing(tmp_path):
    root = tmp_path / "DIV2K"
    train_hr = _write_images(root / "DIV2K_train_HR", {"0001": (40, 36), "0002": (44, 40)})
    valid_hr = _write_images(root / "DIV2K_valid_HR", {"0801": (32, 32)}, seed=5)
    # A provided LR that is recognisably not our bicubic (so we can tell which one was used).
    provided = np.full((20, 18, 3), 7, np.uint8)
    save_image(root / "DIV2K_train_LR_bicubic" / "X2" / "0001x2.png", provided)

    records = resolve_data(str(root), 2, "train")
    assert [r.name for r in records] == ["0001", "0002"]
    assert records[0].lr_path == root / "DIV2K_train_LR_bicubic" / "X2" / "0001x2.png"
    assert records[1].lr_path is None
    np.testing.assert_array_equal(load_pair(records[0], 2)[1], provided)
    np.testing.assert_array_equal(load_pair(records[1], 2)[1], imresize(train_hr["0002"], 1 / 2))
    assert [r.name for r in resolve_data(str(root), 2, "eval")] == ["0801"]
    # The HR folder itself works too, and finds its sibling LR folder.
    assert resolve_data(str(root / "DIV2K_train_HR"), 2, "train")[0].lr_path == records[0].lr_path
    assert valid_hr["0801"].shape == (32, 32, 3)


def test_benchmark_layout_with_hr_and_lr_bicubic(tmp_path):
    root = tmp_path / "Set5"
    _write_images(root / "HR", {"baby": (30, 27), "bird": (24, 24)})
    lr = np.full((10, 9, 3), 11, np.uint8)
    save_image(root / "LR_bicubic" / "X3" / "babyx3.png", lr)
    records = resolve_data(str(root), 3, "eval")
    assert [r.name for r in records] == ["baby", "bird"]
    hr, got = load_pair(records[0], 3)
    assert hr.shape == (30, 27, 3)
    np.testing.assert_array_equal(got, lr)
    # An LR of the wrong size is refused, naming the file.
    save_image(root / "LR_bicubic" / "X3" / "birdx3.png", np.zeros((5, 5, 3), np.uint8))
    with pytest.raises(DataError) as e:
        load_pair(resolve_data(str(root), 3, "eval")[1], 3)
    _assert_one_line_data_error(e, "birdx3.png", "5x5", "8x8")


def test_lr_of_uncropped_hr_is_accepted_and_cropped(tmp_path):
    root = tmp_path / "bench"
    hr = _write_images(root / "HR", {"img": (31, 29)})["img"]
    lr_full = imresize(hr, 1 / 4)  # what MATLAB makes from the un-modcropped image: ceil sizes
    assert lr_full.shape[:2] == (8, 8)
    save_image(root / "LR_bicubic" / "X4" / "imgx4.png", lr_full)
    hr_c, lr = load_pair(resolve_data(str(root), 4, "eval")[0], 4)
    assert hr_c.shape[:2] == (28, 28) and lr.shape[:2] == (7, 7)
    np.testing.assert_array_equal(lr, lr_full[:7, :7])


def test_data_spec_errors(tmp_path):
    with pytest.raises(DataError) as e:
        resolve_data("nonexistent_dir_xyz", 2, "eval")
    _assert_one_line_data_error(e, "nonexistent_dir_xyz")
    with pytest.raises(DataError) as e:
        resolve_data("builtin:test", 2, "eval")
    _assert_one_line_data_error(e, "builtin:test")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(DataError) as e:
        resolve_data(str(empty), 2, "eval")
    _assert_one_line_data_error(e, empty, "no images")
    a_file = tmp_path / "f.png"
    a_file.write_text("x")
    with pytest.raises(DataError) as e:
        resolve_data(str(a_file), 2, "eval")
    _assert_one_line_data_error(e, a_file)
    (tmp_path / "d" / "DIV2K_train_HR").mkdir(parents=True)
    with pytest.raises(DataError) as e:
        resolve_data(str(tmp_path / "d"), 2, "eval")
    _assert_one_line_data_error(e, "DIV2K_valid_HR")


@pytest.mark.parametrize("scale", [1, 5, 0, -2, 2.5, "2", True])
def test_unsupported_scale(scale):
    with pytest.raises(QnasError) as e:
        check_scale(scale)
    _assert_one_line_data_error(e, repr(scale), "2, 3 or 4")
    with pytest.raises(QnasError):
        eval_dataset("builtin", scale)


def test_corrupt_image_in_folder_is_named(tmp_path):
    _write_images(tmp_path / "set", {"ok": (40, 40)})
    (tmp_path / "set" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(DataError) as e:
        train_dataset(str(tmp_path / "set"), 2, 16, progress=False)
    _assert_one_line_data_error(e, tmp_path / "set" / "bad.png")
    ds = eval_dataset(str(tmp_path / "set"), 2)
    with pytest.raises(DataError) as e:
        ds[0]
    _assert_one_line_data_error(e, "bad.png")


def test_image_smaller_than_patch_and_patch_not_multiple_of_scale(tmp_path):
    _write_images(tmp_path / "set", {"big": (64, 64), "small": (40, 70)})
    with pytest.raises(DataError) as e:
        train_dataset(str(tmp_path / "set"), 2, 48, progress=False)
    _assert_one_line_data_error(e, tmp_path / "set" / "small.png", "40x70", "48x48")
    with pytest.raises(DataError) as e:
        train_dataset(str(tmp_path / "set"), 3, 32, progress=False)
    _assert_one_line_data_error(e, "patch size 32", "scale 3")
    with pytest.raises(DataError) as e:
        train_dataset("builtin", 2, 0, progress=False)
    _assert_one_line_data_error(e, "patch size 0")
    # Too small to evaluate (border + SSIM window) is refused at x4 but fine at x2.
    _write_images(tmp_path / "tiny", {"t": (16, 16)})
    with pytest.raises(DataError) as e:
        eval_dataset(str(tmp_path / "tiny"), 4)[0]
    _assert_one_line_data_error(e, "t.png", "too small")
    assert eval_dataset(str(tmp_path / "tiny"), 2)[0]["hr"].shape == (3, 16, 16)


# ---------------------------------------------------------------------------------------------
# training patches and the resumable sampler


def _synthetic_train(scale, patch_size, n=2):
    hrs = [modcrop(_smooth_image(96 + 7 * k, 88 + 5 * k, seed=k), scale) for k in range(n)]
    lrs = [imresize(hr, 1 / scale) for hr in hrs]
    return TrainPatches([f"im{k}" for k in range(n)], hrs, lrs, scale, patch_size)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_patches_are_aligned(scale):
    patch = 12 * scale
    ds = _synthetic_train(scale, patch)
    lr, hr = ds.batch(batch_size=16, seed=3, step=0)
    p = patch // scale
    assert lr.shape == (16, 3, p, p) and hr.shape == (16, 3, patch, patch)
    assert lr.dtype == hr.dtype == torch.float32 and 0 <= lr.min() and hr.max() <= 1
    for b in range(16):
        lr_u8 = (lr[b] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy().astype(np.float64)
        hr_u8 = (hr[b] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        # Bicubic of the HR patch equals the LR patch away from the patch edge (where the real
        # neighbours differ from the mirrored ones); any flip/rotation commutes with imresize.
        from_hr = imresize(hr_u8, 1 / scale).astype(np.float64)
        inner = (slice(2, -2), slice(2, -2))
        assert np.abs(from_hr[inner] - lr_u8[inner]).max() <= 1
        shifted = np.abs(from_hr[2:-2, 3:-1] - lr_u8[2:-2, 2:-2]).mean()
        assert (
            shifted > 2 * np.abs(from_hr[inner] - lr_u8[inner]).mean() + 0.5
        )  # alignment is what makes them match


def test_patch_augmentations_cover_all_eight_dihedral_transforms():
    ds = _synthetic_train(2, 16, n=1)
    base_lr, base_hr = ds.crop(0, 5, 7, 0)
    seen = set()
    for t in range(8):
        lr, hr = ds.crop(0, 5, 7, t)
        seen.add(hr.tobytes())
        # The same transform on both sides.
        assert any(
            np.array_equal(lr, np.rot90(f(base_lr), k)) and np.array_equal(hr, np.rot90(f(base_hr), k))
            for k in range(4)
            for f in (lambda a: a, lambda a: a[:, ::-1])
        )
    assert len(seen) == 8


def test_sampler_is_deterministic_and_resumes_exactly():
    ds = _synthetic_train(2, 16)
    run = PatchSampler(ds, batch_size=4, seed=11)
    uninterrupted = [next(run) for _ in range(6)]
    again = [next(PatchSampler(ds, batch_size=4, seed=11)) for _ in range(1)]
    assert torch.equal(again[0][0], uninterrupted[0][0])

    killed = PatchSampler(ds, batch_size=4, seed=11)
    for _ in range(3):
        next(killed)
    state = killed.state_dict()
    assert state == {"seed": 11, "step": 3, "batch_size": 4}
    resumed = PatchSampler(ds, batch_size=4, seed=999)
    resumed.load_state_dict(state)
    for k in range(3, 6):
        lr, hr = next(resumed)
        assert torch.equal(lr, uninterrupted[k][0]) and torch.equal(hr, uninterrupted[k][1])

    other_seed = next(PatchSampler(ds, batch_size=4, seed=12))
    assert not torch.equal(other_seed[1], uninterrupted[0][1])
    # DDP: the ranks' shares, concatenated, are the global batch one process draws.
    shares = [next(PatchSampler(ds, batch_size=4, seed=11, rank=r, world=2)) for r in range(2)]
    assert torch.equal(torch.cat([s[1] for s in shares]), uninterrupted[0][1])
    with pytest.raises(ValueError, match="split"):
        PatchSampler(ds, batch_size=3, world=2)
    with pytest.raises(ValueError, match="batch_size"):
        PatchSampler(ds, batch_size=8).load_state_dict(state)


def test_builtin_train_dataset(tmp_path):
    ds = train_dataset("builtin", 4, 96, progress=False)
    assert ds.names == list(builtin.BUILTIN_TRAIN)
    for hr, lr in zip(ds.hr_images, ds.lr_images, strict=True):
        assert hr.shape[0] == 4 * lr.shape[0] and hr.shape[1] == 4 * lr.shape[1]
    lr, hr = next(PatchSampler(ds, batch_size=2, seed=0))
    assert lr.shape == (2, 3, 24, 24) and hr.shape == (2, 3, 96, 96)
