"""`qnas eval --model bicubic`: the protocol end to end, output formats and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _matlab_reference import matlab_imresize, protocol_psnr_ssim
from PIL import Image

import qnas
import qnas.cli
from qnas.cli import main
from qnas.data.datasets import eval_dataset
from qnas.errors import QnasError
from qnas.evaluate import evaluate


def _arbitrary_images(folder: Path) -> dict[str, tuple[int, int]]:
    """Photograph-like test images of sizes that are not multiples of 2, 3 or 4."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2024)
    sizes = {"alpha": (47, 61), "beta": (53, 50), "gamma": (59, 67)}
    for name, (h, w) in sizes.items():
        yy, xx = np.mgrid[0:h, 0:w]
        base = (
            120 + 70 * np.sin(yy / rng.uniform(3, 9))[:, :, None] * np.cos(xx / rng.uniform(3, 9))[:, :, None]
        )
        img = base + rng.normal(0, 15, (h, w, 3)) + rng.uniform(-40, 40, 3)
        Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8)).save(folder / f"{name}.png")
    return sizes


def _run(argv, capsys):
    main(argv)
    return capsys.readouterr()


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_eval_reproduces_independent_matlab_protocol(tmp_path, capsys, scale):
    """`qnas eval --model bicubic` matches an independent MATLAB-protocol
    computation (per-pixel MATLAB imresize down and up, scikit-image Y and metrics) on arbitrary
    images within 0.05 dB / 0.003."""
    _arbitrary_images(tmp_path / "imgs")
    out = _run(
        [
            "eval",
            "--model",
            "bicubic",
            "--data",
            str(tmp_path / "imgs"),
            "--scale",
            str(scale),
            "--format",
            "json",
        ],
        capsys,
    )
    result = json.loads(out.out)
    assert {"psnr", "ssim", "images"} <= set(result)
    got = {im["name"]: im for im in result["images"]}
    assert sorted(got) == ["alpha", "beta", "gamma"]
    ref_p, ref_s = [], []
    for name in sorted(got):
        hr = np.asarray(Image.open(tmp_path / "imgs" / f"{name}.png").convert("RGB"))
        hr = hr[: hr.shape[0] // scale * scale, : hr.shape[1] // scale * scale]
        lr = matlab_imresize(hr, 1 / scale)
        sr = matlab_imresize(lr, scale)
        p, s = protocol_psnr_ssim(sr, hr, scale)
        assert abs(got[name]["psnr"] - p) < 0.05, (name, got[name], p)
        assert abs(got[name]["ssim"] - s) < 0.003, (name, got[name], s)
        ref_p.append(p)
        ref_s.append(s)
    assert abs(result["psnr"] - np.mean(ref_p)) < 0.05
    assert abs(result["ssim"] - np.mean(ref_s)) < 0.003


def test_table_output_and_save_images(tmp_path, capsys):
    _arbitrary_images(tmp_path / "imgs")
    out = _run(
        [
            "eval",
            "--model",
            "bicubic",
            "--data",
            str(tmp_path / "imgs"),
            "--scale",
            "2",
            "--save-images",
            str(tmp_path / "sr"),
        ],
        capsys,
    )
    lines = out.out.strip().splitlines()
    assert lines[0].startswith("bicubic x2")
    assert [ln.split()[0] for ln in lines if ln.split()[0] in ("alpha", "beta", "gamma", "mean")] == [
        "alpha",
        "beta",
        "gamma",
        "mean",
    ]
    assert "eval x2" in out.err  # tqdm progress goes to stderr
    saved = sorted(p.name for p in (tmp_path / "sr").iterdir())
    assert saved == ["alpha.png", "beta.png", "gamma.png"]
    # The saved images are the scored ones: scoring them again gives the table's mean row.
    order = iter(["alpha", "beta", "gamma"])

    def saved_image(lr):
        return np.asarray(Image.open(tmp_path / "sr" / f"{next(order)}.png"))

    result = evaluate(saved_image, eval_dataset(str(tmp_path / "imgs"), 2), 2, progress=False)
    assert f"{result['psnr']:9.2f}" in lines[-1] and f"{result['ssim']:6.4f}" in lines[-1]


def test_builtin_default_is_the_validation_split(capsys):
    result = json.loads(_run(["eval", "--model", "bicubic", "--scale", "4", "--format", "json"], capsys).out)
    assert [im["name"] for im in result["images"]] == ["chelsea", "rocket", "coins", "gravel", "text"]
    assert 20 < result["psnr"] < 40 and 0.5 < result["ssim"] < 1


def _bad(argv, capsys, *needles):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    for needle in needles:
        assert needle in lines[-1], err
    return lines


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    lines = _bad(["eval", "--model", "edsr9", "--scale", "2"], capsys, "edsr9")
    assert lines == [lines[-1]] and lines[0].startswith("qnas: error:")
    _bad(["eval", "--model", "bicubic", "--scale", "5"], capsys, "scale 5", "2, 3 or 4")
    _bad(["eval", "--model", "bicubic", "--scale", "2", "--data", str(tmp_path / "nope")], capsys, "nope")
    (tmp_path / "empty").mkdir()
    _bad(
        ["eval", "--model", "bicubic", "--scale", "2", "--data", str(tmp_path / "empty")],
        capsys,
        "empty",
        "no images",
    )
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    _bad(
        ["eval", "--model", "bicubic", "--scale", "2", "--data", str(tmp_path / "bad")], capsys, "broken.png"
    )
    # Usage errors from click: exit code 2 as well.
    _bad(["eval", "--model", "bicubic"], capsys, "--scale")
    _bad(["eval", "--model", "bicubic", "--scale", "2", "--format", "xml"], capsys, "xml")


def test_real_process_exit_code():
    env = dict(os.environ)
    package_root = str(Path(qnas.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([package_root, env.get("PYTHONPATH", "")])
    env.pop("QNAS_DEBUG", None)
    cmd = [sys.executable, "-m", "qnas", "eval", "--model", "bicubic", "--scale", "7"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "qnas: error: scale 7 is not supported: expected 2, 3 or 4"


def test_debug_flag_lets_the_exception_through(monkeypatch):
    monkeypatch.setitem(qnas.cli._debug, "on", False)  # --debug sets module state; restored after
    with pytest.raises(QnasError, match="scale 7"):
        main(["--debug", "eval", "--model", "bicubic", "--scale", "7"])
