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
    assert out.stdout.count("trained 6 steps") == 1  # rank 0 alone prints
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


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SEARCH = ["--scale", "2", "--batch-size", "4", "--patch-size", "16", "--mode", "quant", "--quiet"]
# Float candidates (--bits 0): quantized ones round, and a rounding that flips on a last-bit difference of
# the summation order sends Adam's first steps (±lr whatever the gradient's size) apart.
FLOAT_SEARCH = [
    "--bits",
    "0",
    "--penalty",
    "0.1",
    "--entropy-coef",
    "0.01",
    "--steps",
    "6",
    "--checkpoint-every",
    "3",
]


def _search_options(space_file, **kw):
    from qnas.nas.search import SearchOptions

    base = dict(space=str(space_file), scale=2, batch_size=4, patch_size=16, mode="quant")
    return SearchOptions(**{**base, **kw})


def _float_options(space_file):
    return _search_options(space_file, bits=[0], penalty=0.1, entropy_coef=0.01, steps=6, checkpoint_every=3)


def test_search_two_processes_equal_one(space_file, tmp_path, one_thread):
    """The alternating search (alphas on one image split, weights on the other, ADQ's batch norm, entropy
    and cost terms) in 2 processes ends with the alphas and weights of one process. The quantized search
    is checked on its first losses, which cover LSQ's step init on the whole first batch."""
    from qnas.nas.search import search

    one, two = tmp_path / "one", tmp_path / "two"
    search(_float_options(space_file), one, progress=False)
    printed = _torchrun(["search", "--space", space_file, *SEARCH, *FLOAT_SEARCH], two)
    assert printed.count("searched 6 steps") == 1  # rank 0 alone prints
    _assert_close(
        torch.load(one / "checkpoint.pt", weights_only=True)["model"],
        torch.load(two / "checkpoint.pt", weights_only=True)["model"],
    )
    layers = [json.loads((r / "genotype.json").read_text())["layers"] for r in (one, two)]
    assert layers[0] == layers[1]
    assert [r["step"] for r in _metrics(two)] == list(range(1, 7))
    for r1, r2 in zip(_metrics(one), _metrics(two), strict=True):
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5)

    # Quantized (bits 4,8): the first step's losses (alpha step on the LSQ init, weight step after it).
    search(_search_options(space_file, steps=1), tmp_path / "q1", progress=False)
    _torchrun(["search", "--space", space_file, *SEARCH, "--steps", "1"], tmp_path / "q2")
    (r1,), (r2,) = _metrics(tmp_path / "q1"), _metrics(tmp_path / "q2")
    for k in ("loss_alpha", "loss", "entropy"):
        assert r1[k] == pytest.approx(r2[k], rel=1e-5), k


def test_search_resumes_under_torchrun(space_file, tmp_path, one_thread):
    """A search killed after its checkpoint at step 3 (in one process) resumes in two processes (same
    config check) to the alphas and weights of an uninterrupted run."""
    from qnas.nas.search import search
    from qnas.runs.folder import RunDir

    search(_float_options(space_file), tmp_path / "whole", progress=False)
    resumed = tmp_path / "resumed"
    log = RunDir.log

    def killed_at_4(self, step, **values):
        if step == 4:
            raise KeyboardInterrupt
        log(self, step, **values)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(RunDir, "log", killed_at_4)
        search(_float_options(space_file), resumed, progress=False)
    assert not (resumed / "genotype.json").exists()
    _torchrun(["search", "--space", space_file, *SEARCH, *FLOAT_SEARCH, "--resume"], resumed)
    _assert_close(
        torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["model"],
        torch.load(resumed / "checkpoint.pt", weights_only=True)["model"],
    )
    assert [r["step"] for r in _metrics(resumed)] == list(range(1, 7))
    # Other options than the run's: refused, as in one process.
    code = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "qnas"]
        + [
            "search",
            "--space",
            str(space_file),
            *SEARCH,
            *FLOAT_SEARCH[:-4],
            "--steps",
            "7",
            "--checkpoint-every",
            "3",
        ]
        + ["--resume", "--out", str(resumed)],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert code.returncode != 0 and code.stderr.count("config.json (search.steps)") == 1


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp") / "run"
    subprocess.run(
        [sys.executable, "-m", "qnas", *ARGS[:5], "--scale", "2", "--batch-size", "2", "--patch-size", "16"]
        + ["--steps", "2", "--checkpoint-every", "2", "--quiet", "--out", str(out)],
        env=_env(),
        check=True,
        capture_output=True,
    )
    return out


@pytest.mark.parametrize(
    "mode",
    [
        "qat",
        pytest.param(
            "ptq",
            marks=pytest.mark.xfail(
                reason="known: the PTQ search under torchrun matches one process after its first step, "
                "then drifts (up to 6e-4 in a probability after 8 steps here, 0.05 from another FP "
                "network); seen on an Intel Xeon, not on the AMD EPYC where it passed",
                strict=False,
            ),
        ),
    ],
)
def test_strategy_two_processes_equal_one(fp_run, tmp_path, mode):
    """DQSS in 2 processes: calibration on the whole batches, each step on the rank's share with the
    gradients of weights, quantizer parameters and strategy logits averaged: one process's search."""
    args = ["strategy", "--checkpoint", fp_run, "--bits", "4", "--mode", mode, "--steps", "8"]
    args += ["--batch-size", "4", "--patch-size", "16", "--calib-batches", "2", "--quiet"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        [sys.executable, "-m", "qnas", *map(str, args), "--out", str(one)],
        env=_env(),
        check=True,
        capture_output=True,
    )
    printed = _torchrun(args, two)
    assert printed.count(f"{mode} search in") == 1  # rank 0 alone prints
    _assert_close(
        torch.load(one / "model.pt", weights_only=True)["model"],
        torch.load(two / "model.pt", weights_only=True)["model"],
    )
    a, b = (json.loads((r / "strategy.json").read_text()) for r in (one, two))
    assert a["counts"] == b["counts"]
    for name, layer in a["layers"].items():
        for kind in ("w", "a"):  # probabilities of the final logits (strategy.json rounds them to 1e-4)
            for cand, p in layer["probs"][kind].items():
                assert p == pytest.approx(b["layers"][name]["probs"][kind][cand], abs=1.01e-4), (name, cand)
    # The losses of every step (they depend on the logits of that step): the whole batch's.
    m1, m2 = _metrics(one), _metrics(two)
    assert [r["step"] for r in m2] == list(range(1, 9))
    for r1, r2 in zip(m1, m2, strict=True):
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5)


@pytest.mark.parametrize(
    "quant, steps", [(["--quant", "fqsr"], 6), (["--quant", "uniform", "--quantizer", "lsq"], 1)]
)
def test_quantized_training_two_processes_equal_one(fp_run, tmp_path, quant, steps):
    """Quantization-aware training: activation quantizers initialize and track their statistics on the
    whole batch (every rank the same steps), LSQ's gradient scale counts the whole batch (the gradients
    of the steps match), and FQSR's warm-up steps, which leave the steps without gradient, do not stop
    DDP. LSQ runs one step: later ones drift as in the quantized search (a flipped rounding)."""
    args = ["train", "--init", fp_run, *quant, "--bits", "4", "--batch-size", "4", "--patch-size", "16"]
    args += ["--steps", str(steps), "--checkpoint-every", "6", "--quiet"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        [sys.executable, "-m", "qnas", *map(str, args), "--out", str(one)],
        env=_env(),
        check=True,
        capture_output=True,
    )
    _torchrun(args, two)
    a, b = (torch.load(r / "checkpoint.pt", weights_only=True) for r in (one, two))
    _assert_close(a["model"], b["model"])
    for k, state in a["optimizer"]["state"].items():  # Adam's moving average: the gradients
        m1, m2 = state["exp_avg"], b["optimizer"]["state"][k]["exp_avg"]
        assert (m1 - m2).norm() <= 1e-4 * m1.norm() + 1e-12, k
