"""`qnas cost`: table and JSON output, --arch config files, and every bad input (one line, exit 2)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_run import run_cli

import qnas.sr as sr

EDSR_BASELINE_X4_48_MACS = 4_569_219_072  # hand-computed per layer in tests/test_cost.py


def cost(capsys, *args):
    """`qnas cost ARGS` in this process: (exit code, stdout, stderr)."""
    return run_cli(["cost", *args], capsys)


def test_help_names_every_model(capsys):
    code, out, _ = cost(capsys, "--help")
    assert code == 0
    assert all(name in out for name in sr.list_models())


def test_table(capsys):
    code, out, err = cost(capsys, "--model", "edsr-baseline", "--scale", "4", "--lr-size", "48x48")
    assert code == 0 and err == ""
    assert out.startswith("edsr-baseline x4, LR 48x48 -> HR 192x192")
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert "1,517,571" in total and f"{EDSR_BASELINE_X4_48_MACS:,}" in total
    assert "tail.0.2" in out and "PixelShuffle" in out


def test_json(capsys):
    code, out, _ = cost(
        capsys, "--model", "edsr-baseline", "--scale", "4", "--lr-size", "48", "--format", "json"
    )
    d = json.loads(out)
    assert code == 0
    assert d["params"] == 1_517_571 and d["macs"] == EDSR_BASELINE_X4_48_MACS
    assert d["bitops"] == EDSR_BASELINE_X4_48_MACS * 1024 and d["weight_bytes"] == 4 * 1_517_571
    assert len(d["layers"]) > 30 and d["layers"][1]["name"] == "head.0"


def test_bits_option(capsys):
    code, out, _ = cost(
        capsys, "--model", "rfdn", "--scale", "2", "--lr-size", "16x16", "--bits", "4", "--format", "json"
    )
    d = json.loads(out)
    assert code == 0 and d["bits"] == 4 and d["bitops"] == d["macs"] * 16


def test_arch_config_file(capsys, tmp_path):
    cfg = sr.model_config(sr.build_model("srresnet", 3, n_blocks=4, bn=False))
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(cfg))
    code, out, _ = cost(capsys, "--arch", str(path), "--lr-size", "12x10", "--format", "json")
    from_file = json.loads(out)
    assert code == 0 and from_file["model"] == "srresnet" and from_file["scale"] == 3
    # The file form {"model": NAME, "scale": S, "kwargs": {...}} gives the same count.
    path.write_text(json.dumps({"model": "srresnet", "scale": 3, "kwargs": {"n_blocks": 4, "bn": False}}))
    code, out, _ = cost(capsys, "--arch", str(path), "--scale", "3", "--lr-size", "12x10", "--format", "json")
    assert code == 0 and json.loads(out) == from_file


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--model", "nope", "--scale", "2", "--lr-size", "8"],
            "unknown model 'nope' (known: edsr, edsr-baseline",
        ),
        (["--model", "edsr", "--scale", "5", "--lr-size", "8"], "scale 5 is not supported"),
        (["--model", "edsr", "--scale", "4", "--lr-size", "48x"], "lr-size '48x' is not HxW"),
        (["--model", "edsr", "--scale", "4", "--lr-size", "0x8"], "lr-size '0x8' is not HxW"),
        (["--model", "rfdn", "--scale", "4", "--lr-size", "8x8"], "lr-size 8x8 is too small for rfdn"),
        (["--model", "edsr", "--lr-size", "8"], "--scale is required with --model"),
        (["--lr-size", "8"], "give exactly one of --model NAME, --arch FILE or --checkpoint RUN"),
        (["--model", "edsr", "--scale", "2", "--lr-size", "8", "--bits", "0"], "--bits 0 is out of range"),
        (["--model", "edsr", "--scale", "2", "--lr-size", "8", "--bits", "33"], "--bits 33 is out of range"),
        (["--arch", "{tmp}/missing.json", "--lr-size", "8"], "missing.json: file not found"),
        (["--arch", "{tmp}", "--lr-size", "8"], "is a folder, not a JSON file"),
        (["--arch", "{corrupt}", "--lr-size", "8"], "corrupt.json: not valid JSON"),
        (["--arch", "{array}", "--lr-size", "8"], 'array.json: expected a JSON object with "model"'),
        (["--arch", "{unknown}", "--lr-size", "8"], "unknown.json: unknown model 'vdsr'"),
        (["--arch", "{noscale}", "--lr-size", "8"], "noscale.json: model config for 'rfdn' has no \"scale\""),
        (["--arch", "{badkw}", "--lr-size", "8"], "badkw.json: rfdn: unknown argument 'channels'"),
        (["--arch", "{badkw}", "--scale", "4", "--lr-size", "8"], "--scale 4 differs from the scale 2 in"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(capsys, tmp_path, args, message):
    files = {
        "tmp": str(tmp_path),
        "corrupt": write(tmp_path, "corrupt.json", '{"model": "edsr", '),
        "array": write(tmp_path, "array.json", "[1, 2]"),
        "unknown": write(tmp_path, "unknown.json", '{"model": "vdsr", "scale": 2}'),
        "noscale": write(tmp_path, "noscale.json", '{"model": "rfdn"}'),
        "badkw": write(tmp_path, "badkw.json", '{"model": "rfdn", "scale": 2, "kwargs": {"channels": 8}}'),
    }
    code, out, err = cost(capsys, *[a.format(**files) for a in args])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("qnas: error: ")
    assert message in err
    assert "Traceback" not in err


def test_console_entry_point_end_to_end():
    """`python -m qnas cost`, as a user runs it: output on stdout, errors as one line, exit 2."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    ok = subprocess.run(
        [sys.executable, "-m", "qnas", "cost", "--model", "edsr-baseline", "--scale", "4", "--lr-size", "48x48",
         "--format", "json"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["params"] == 1_517_571
    bad = subprocess.run(
        [sys.executable, "-m", "qnas", "cost", "--model", "edsr", "--scale", "4", "--lr-size", "48x"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == "qnas: error: --lr-size '48x' is not HxW with positive integers (e.g. 48x48)\n"
