"""scripts/results.py: the commands it would run at x4 and x2 (--dry-run: no images, no training)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _dry_run(tmp_path: Path, *extra: str) -> list[str]:
    for name in ("SunHays80", "Set5", "Set14", "BSD68"):
        (tmp_path / name).mkdir(exist_ok=True)
    cmd = [sys.executable, str(ROOT / "scripts" / "results.py"), str(tmp_path), "--dry-run", *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return out.strip().splitlines()


def _patch(line: str) -> int:
    words = line.split()
    return int(words[words.index("--patch-size") + 1])


@pytest.mark.parametrize("scale", [4, 2])
def test_every_scale_runs_the_same_lr_patches(tmp_path, scale):
    """x2 runs take the x4 recipes with HR patches scaled by scale/4 (the same LR patches), skip the FQSR
    ablation (the x4 hold-out's recipes at three seeds) and name their release files by scale."""
    lines = _dry_run(tmp_path, "--scale", str(scale))
    assert lines[0] == f"qnas eval --model bicubic --scale {scale} --data DATA/SET"
    fp = next(line for line in lines if line.endswith("--out RUNS/fp"))
    assert f"--scale {scale}" in fp and _patch(fp) == 96 * scale // 4
    fqsr = [line for line in lines if "--quant fqsr" in line]
    assert {_patch(line) for line in fqsr} == {64 * scale // 4}
    ptq = [line for line in lines if line.startswith("qnas strategy") and "--mode qat" not in line]
    assert {_patch(line) for line in ptq} == {96 * scale // 4}
    assert any(f"release/edsr-baseline-x{scale}-fqsr4.qnp" in line for line in lines)
    ablation = [line for line in fqsr if "fqsr4_plain" in line]
    if scale == 4:
        assert ablation and any("--bits 3" in line for line in ptq)
    else:
        assert not ablation and {line.split("--bits ")[1].split()[0] for line in ptq} == {"4"}
        names = [line.rsplit("RUNS/", 1)[1] for line in fqsr]
        assert names[:3] == ["fqsr4_kd_tail8_long", "fqsr4_kd_tail8_long_seed1", "fqsr4_kd_tail8_long_seed2"]


def test_unknown_scale_is_refused(tmp_path):
    for name in ("SunHays80", "Set5", "Set14", "BSD68"):
        (tmp_path / name).mkdir(exist_ok=True)
    cmd = [sys.executable, str(ROOT / "scripts" / "results.py"), str(tmp_path), "--scale", "3", "--dry-run"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 2 and "--scale" in p.stderr
