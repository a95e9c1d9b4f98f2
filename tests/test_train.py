"""`qnas train`: resume after a real kill reproduces an uninterrupted run; run folder contents;
errors; `qnas eval --checkpoint`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qnas.train.train import TrainOptions, lr_factor

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "edsr-baseline", "--model-args", '{"n_resblocks": 1, "n_feats": 8}', "--scale", "2"]
FAST = ["--batch-size", "2", "--patch-size", "16", "--checkpoint-every", "2", "--quiet"]


def qnas(*args, check=True, **kw):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "python")])}
    out = subprocess.run([sys.executable, "-m", "qnas", *args], capture_output=True, text=True, env=env, **kw)
    if check and out.returncode != 0:
        raise AssertionError(out.stderr)
    return out


def weights(run: Path) -> dict:
    return torch.load(run / "model.pt", weights_only=True)["model"]


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    steps = ["--steps", "60"]
    qnas("train", *TINY, *FAST, *steps, "--out", str(tmp_path / "a"))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "python")])}
    killed = tmp_path / "b"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qnas", "train", *TINY, *FAST, *steps, "--out", str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = killed / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count("\n") >= 7:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.pt").exists(), "the run finished before it could be killed"
    assert (killed / "checkpoint.pt").exists()

    qnas("train", *TINY, *FAST, *steps, "--out", str(killed), "--resume")
    a, b = weights(tmp_path / "a"), weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    logged = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 61)), "metrics.jsonl must hold each step once after resume"


def test_run_folder_contents_and_eval_checkpoint(tmp_path):
    run = tmp_path / "run"
    qnas("train", *TINY, *FAST, "--steps", "4", "--out", str(run))
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "model.pt"} <= {p.name for p in run.iterdir()}
    assert any(p.name.startswith("events.out.tfevents") for p in run.iterdir())
    blob = torch.load(run / "model.pt", weights_only=True)
    assert set(blob) >= {"format", "network", "model", "train"} and blob["network"]["kind"] == "sr"
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 4 and {"loss", "lr", "step_time_s"} <= set(rec)

    out = qnas("eval", "--checkpoint", str(run), "--data", "builtin", "--format", "json")
    res = json.loads(out.stdout)
    assert res["scale"] == 2 and len(res["images"]) == 5 and 10 < res["psnr"] < 50


def test_resume_with_other_options_is_refused(tmp_path):
    run = tmp_path / "run"
    qnas("train", *TINY, *FAST, "--steps", "2", "--out", str(run))
    out = qnas(
        "train", *TINY, *FAST, "--steps", "2", "--lr", "1e-3", "--out", str(run), "--resume", check=False
    )
    assert out.returncode == 2 and "train.lr" in out.stderr and "Traceback" not in out.stderr


def test_existing_run_without_resume_is_refused(tmp_path):
    run = tmp_path / "run"
    qnas("train", *TINY, *FAST, "--steps", "2", "--out", str(run))
    out = qnas("train", *TINY, *FAST, "--steps", "2", "--out", str(run), check=False)
    assert out.returncode == 2 and "--resume" in out.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model", "nope", "--scale", "2"], "nope"),
        (["--model", "edsr-baseline", "--scale", "5"], "5"),
        (["--model", "edsr-baseline", "--scale", "2", "--model-args", "{bad"], "--model-args"),
        (["--model", "edsr-baseline", "--scale", "2", "--steps", "0"], "--steps"),
        (["--model", "edsr-baseline", "--scale", "2", "--patch-size", "15"], "15"),
    ],
)
def test_train_bad_input(tmp_path, args, needle):
    out = qnas("train", *args, "--out", str(tmp_path / "r"), "--quiet", check=False)
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_eval_corrupt_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes(b"not a checkpoint")
    out = qnas("eval", "--checkpoint", str(run), check=False)
    assert out.returncode == 2 and "model.pt" in out.stderr and "Traceback" not in out.stderr


def test_lr_schedules():
    o = TrainOptions(steps=100, lr=1.0, schedule="cosine")
    assert lr_factor(0, o) == pytest.approx(1.0) and lr_factor(100, o) == pytest.approx(0.01)
    o = TrainOptions(steps=100, schedule="step")
    assert [lr_factor(s, o) for s in (0, 49, 50, 74, 75, 99)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    o = TrainOptions(steps=100, warmup_steps=10, schedule="constant")
    assert lr_factor(0, o) == pytest.approx(0.1) and lr_factor(10, o) == 1.0
