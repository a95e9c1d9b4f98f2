"""`torchrun --nproc-per-node 2 -m qnas train` (gloo) trains the same weights as one process with the
same global batch and seed."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "train",
    "--model",
    "edsr-baseline",
    "--model-args",
    '{"n_resblocks": 1, "n_feats": 8}',
    "--scale",
    "2",
    "--batch-size",
    "4",
    "--patch-size",
    "16",
    "--steps",
    "6",
    "--checkpoint-every",
    "3",
    "--quiet",
]


def _env():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "python")])}
    env["OMP_NUM_THREADS"] = "1"  # two processes on two cores
    return env


def test_two_processes_equal_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        [sys.executable, "-m", "qnas", *ARGS, "--out", str(one)], env=_env(), check=True, capture_output=True
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "qnas",
            *ARGS,
            "--out",
            str(two),
        ],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    a = torch.load(one / "model.pt", weights_only=True)["model"]
    b = torch.load(two / "model.pt", weights_only=True)["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=0), k
    # rank 0 alone wrote the run: one line per step
    assert (two / "metrics.jsonl").read_text().count("\n") == 6
