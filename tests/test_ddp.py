"""`torchrun --nproc-per-node 2 -m qnas train|search|strategy` (gloo) computes what one process computes
with the same global batch and seed, and only rank 0 writes the run and prints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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


def _torchrun(args, out):
    """`torchrun --nproc-per-node 2 -m qnas ARGS --out OUT`: its stdout (asserts it succeeded)."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "qnas",
            *map(str, args),
            "--out",
            str(out),
        ],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def _assert_close(a: dict, b: dict, atol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), k


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def space_file(tmp_path):
    from test_nas_supernet import tiny_space

    p = tmp_path / "tiny.json"
    p.write_text(json.dumps({**tiny_space(["conv1x1", "conv3x3", "conv3x1_1x3"]), "anchor": "nearest"}))
    return p


SEARCH = ["--scale", "2", "--batch-size", "4", "--patch-size", "16", "--mode", "quant", "--quiet"]


def test_search_two_processes_equal_one_and_resume(space_file, tmp_path):
    """The alternating search (alphas on one image split, weights on the other, ADQ's batch norm, entropy
    and cost terms) in 2 processes ends with the alphas and weights of one process; a run interrupted in
    one process resumes under torchrun to the same result. Float candidates (--bits 0): quantized ones
    round, and a rounding that flips on a last-bit difference of the summation order sends Adam's first
    steps (±lr, whatever the gradient's size) apart; the quantized search is checked on its first
    losses, which also cover LSQ's step init on the whole batch."""
    from qnas.nas.search import SearchOptions, search

    args = [
        "search",
        "--space",
        space_file,
        *SEARCH,
        "--bits",
        "0",
        "--penalty",
        "0.1",
        "--entropy-coef",
        "0.01",
    ]
    args += ["--steps", "6", "--checkpoint-every", "3"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        [sys.executable, "-m", "qnas", *map(str, args), "--out", str(one)],
        env=_env(),
        check=True,
        capture_output=True,
    )
    printed = _torchrun(args, two)
    assert printed.count("searched 6 steps") == 1  # rank 0 alone prints
    a = torch.load(one / "checkpoint.pt", weights_only=True)["model"]
    _assert_close(a, torch.load(two / "checkpoint.pt", weights_only=True)["model"])
    assert (
        json.loads((one / "genotype.json").read_text())["layers"]
        == json.loads((two / "genotype.json").read_text())["layers"]
    )
    assert [r["step"] for r in _metrics(two)] == list(range(1, 7))
    for r1, r2 in zip(_metrics(one), _metrics(two), strict=True):
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5)

    # Killed after its checkpoint at step 3 (in one process), resumed by two.
    resumed = tmp_path / "resumed"
    opts = SearchOptions(
        space=str(space_file), scale=2, batch_size=4, patch_size=16, mode="quant", bits=[0], penalty=0.1,
        entropy_coef=0.01, steps=6, checkpoint_every=3,
    )  # fmt: skip
    from qnas.train.run import RunDir

    log = RunDir.log

    def killed_at_4(self, step, **values):
        if step == 4:
            raise KeyboardInterrupt
        log(self, step, **values)

    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(RunDir, "log", killed_at_4)
        search(opts, resumed, progress=False)
    assert not (resumed / "genotype.json").exists()
    _torchrun([*args, "--resume"], resumed)
    _assert_close(a, torch.load(resumed / "checkpoint.pt", weights_only=True)["model"])
    assert [r["step"] for r in _metrics(resumed)] == list(range(1, 7))

    # Quantized: the first step's losses (alpha step on the LSQ init, weight step after it).
    quant = ["search", "--space", space_file, *SEARCH, "--steps", "1"]
    subprocess.run(
        [sys.executable, "-m", "qnas", *map(str, quant), "--out", str(tmp_path / "q1")],
        env=_env(),
        check=True,
        capture_output=True,
    )
    _torchrun(quant, tmp_path / "q2")
    (r1,), (r2,) = _metrics(tmp_path / "q1"), _metrics(tmp_path / "q2")
    for k in ("loss_alpha", "loss", "entropy"):
        assert r1[k] == pytest.approx(r2[k], rel=1e-5), k
