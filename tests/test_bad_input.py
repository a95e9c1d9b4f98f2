"""Bad input at every entry point of the `qnas` command: exit code 2 with one line naming the file or
option, nothing existing overwritten or lost, no non-finite number reported, no allocation or work
beyond what the input justifies. Tiny models, in-process calls (run_cli)."""

import copy
import json
import os
import shutil
import signal
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from cli_run import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from test_nas_supernet import tiny_space

from qnas.data.images import load_image, to_uint8
from qnas.metrics import to_uint8_image

TINY_MODEL = ["--model", "edsr-baseline", "--model-args", '{"n_resblocks": 1, "n_feats": 8}']
FAST = ["--batch-size", "2", "--patch-size", "16", "--checkpoint-every", "2", "--quiet"]


@contextmanager
def deadline(seconds):
    """Fails (instead of hanging the suite) when the body takes longer than `seconds`."""

    def fail(signum, frame):
        raise AssertionError(f"took longer than {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def fails(capsys, *args, needle=None):
    """Runs `qnas ARGS` expecting exit 2 with one line on stderr (containing `needle`); returns it."""
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    # One error line, the last (a progress bar that was running may stand before it).
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("qnas: error: "), err
    assert sum("error" in line for line in lines) == 1, err
    if needle is not None:
        assert needle in err, err
    return err


def ok(capsys, *args):
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    return out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny full-precision x2 run, a tiny FQSR x2 run and its packed export."""
    root = tmp_path_factory.mktemp("runs")
    from qnas.cli import main

    main(["train", *TINY_MODEL, "--scale", "2", *FAST, "--steps", "2", "--out", str(root / "fp")])
    main(
        ["train", *TINY_MODEL, "--scale", "2", "--quant", "fqsr", "--bits", "4", *FAST, "--steps", "2"]
        + ["--out", str(root / "fqsr")]
    )
    main(["export", str(root / "fqsr"), "--format", "packed", "--out", str(root / "m.qnp"), "--no-check"])
    return root


def _png(path, h=12, w=10, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------------------------
# upscale: outputs never replace inputs; one image reader; non-regular files


def test_upscale_never_writes_over_its_inputs(runs, tmp_path, capsys):
    a = _png(tmp_path / "a.png")
    before = a.read_bytes()
    fails(capsys, "upscale", "--model", runs / "m.qnp", a, a, needle="is an input")
    fails(capsys, "upscale", "--model", runs / "m.qnp", a, a, "--force", needle="is an input")
    folder = tmp_path / "dir"
    _png(folder / "x.png")
    saved = (folder / "x.png").read_bytes()
    fails(capsys, "upscale", "--model", runs / "m.qnp", folder, folder, needle="is an input folder")
    # An input file given beside its folder as output: the output name is the input.
    fails(capsys, "upscale", "--model", runs / "m.qnp", folder / "x.png", a, folder, needle="is an input")
    assert a.read_bytes() == before and (folder / "x.png").read_bytes() == saved
    assert sorted(p.name for p in folder.iterdir()) == ["x.png"]


def test_upscale_existing_output_needs_force(runs, tmp_path, capsys):
    a = _png(tmp_path / "a.png")
    out = tmp_path / "out.png"
    out.write_bytes(b"keep me")
    fails(capsys, "upscale", "--model", runs / "m.qnp", a, out, "--quiet", needle="pass --force")
    assert out.read_bytes() == b"keep me"
    ok(capsys, "upscale", "--model", runs / "m.qnp", a, out, "--quiet", "--force")
    with Image.open(out) as im:
        assert im.size == (20, 24)


def test_upscale_refuses_a_fifo_instead_of_hanging(runs, tmp_path, capsys):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    with deadline(30):
        fails(capsys, "upscale", "--model", runs / "m.qnp", fifo, tmp_path / "o.png", needle="x.png")
    model_fifo = tmp_path / "m.qnp"
    os.mkfifo(model_fifo)
    with deadline(30):
        fails(
            capsys,
            "upscale",
            "--model",
            model_fifo,
            _png(tmp_path / "a.png"),
            tmp_path / "o.png",
            needle="m.qnp",
        )


def _write_png16_gray(path, values):
    Image.fromarray(values.astype(np.uint16)).save(path)


def test_upscale_reads_16_bit_and_float_images_as_eval_does(runs, tmp_path, capsys):
    """upscale reads with eval's reader: a 16-bit or float image is converted, never saturated to white."""
    rng = np.random.default_rng(1)
    gray8 = rng.integers(0, 256, (12, 10), dtype=np.uint8)
    _write_png16_gray(tmp_path / "g16.png", gray8.astype(np.uint16) * 257)
    Image.fromarray(gray8.astype(np.float32) / 255).save(tmp_path / "gf.tif")
    Image.fromarray(gray8).save(tmp_path / "g8.png")
    for name in ("g16.png", "gf.tif"):
        assert np.array_equal(load_image(tmp_path / name), load_image(tmp_path / "g8.png")), name
    outs = {}
    for name in ("g8.png", "g16.png", "gf.tif"):
        out = tmp_path / f"sr_{name}.png"
        ok(capsys, "upscale", "--model", runs / "m.qnp", tmp_path / name, out, "--quiet")
        outs[name] = np.asarray(Image.open(out))
    assert np.array_equal(outs["g16.png"], outs["g8.png"]) and np.array_equal(outs["gf.tif"], outs["g8.png"])
    assert (outs["g8.png"] == 255).mean() < 0.5
    # A float image outside [0, 1] has no defined meaning: refused, not guessed.
    Image.fromarray(gray8.astype(np.float32)).save(tmp_path / "big.tif")
    fails(
        capsys,
        "upscale",
        "--model",
        runs / "m.qnp",
        tmp_path / "big.tif",
        tmp_path / "o.png",
        needle="[0, 1]",
    )


def test_one_float_to_uint8_rule():
    halves = (np.arange(6) + 0.5) / 255  # exactly between two levels
    assert to_uint8(halves).tolist() == [1, 2, 3, 4, 5, 6]  # round half up, not half to even
    assert to_uint8(np.array([-0.2, 0.0, 1.0, 1.3])).tolist() == [0, 0, 255, 255]
    t = torch.from_numpy(halves.reshape(1, 3, 1, 2))
    assert np.array_equal(to_uint8_image(t).reshape(-1), to_uint8(halves.reshape(3, 2).T).reshape(-1))
    from qnas.deploy.upscale import to_image

    assert np.array_equal(to_image(t), to_uint8_image(t))
    with pytest.raises(ValueError, match="non-finite"):
        to_uint8(np.array([0.5, np.nan]))


# ------------------------------------------------------------------------------------------------
# export and genotype: existing outputs and the run's own files


def test_export_never_replaces_the_run_or_an_existing_file(runs, tmp_path, capsys):
    run = tmp_path / "fqsr"
    shutil.copytree(runs / "fqsr", run)
    model = (run / "model.pt").read_bytes()
    for target in ("model.pt", "checkpoint.pt", "config.json", "metrics.jsonl"):
        fails(
            capsys,
            "export",
            run,
            "--format",
            "packed",
            "--out",
            run / target,
            "--force",
            needle="is an input",
        )
    fails(
        capsys,
        "export",
        run / "model.pt",
        "--format",
        "onnx",
        "--out",
        run / "model.pt",
        needle="is an input",
    )
    assert (run / "model.pt").read_bytes() == model
    existing = tmp_path / "m.qnp"
    existing.write_bytes(b"old")
    fails(capsys, "export", run, "--format", "packed", "--out", existing, needle="pass --force")
    assert existing.read_bytes() == b"old"
    ok(capsys, "export", run, "--format", "packed", "--out", existing, "--force", "--no-check")
    assert existing.read_bytes()[:8] != b"old"


def test_genotype_out_rules(tmp_path, capsys):
    args = [
        "genotype",
        "--space",
        "basic",
        "--scale",
        "2",
        "--op",
        "conv3x3",
        "--bits",
        "4",
        "--lr-size",
        "8",
    ]
    g = tmp_path / "g.json"
    ok(capsys, *args, "--out", g)
    first = g.read_bytes()
    g.write_text("mine")
    fails(capsys, *args, "--out", g, needle="pass --force")
    assert g.read_text() == "mine"
    ok(capsys, *args, "--out", g, "--force")
    assert g.read_bytes() == first
    run = tmp_path / "search"  # a run folder: its genotype.json is the search's result
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "genotype.json").write_bytes(first)
    fails(capsys, *args, "--out", run / "genotype.json", "--force", needle="is an input")


# ------------------------------------------------------------------------------------------------
# Non-finite outputs are errors, not scores


@pytest.fixture(scope="module")
def nan_run(runs, tmp_path_factory):
    run = tmp_path_factory.mktemp("nan") / "nan"
    shutil.copytree(runs / "fp", run)
    blob = torch.load(run / "model.pt", weights_only=True)
    key = next(k for k in blob["model"] if k.endswith("weight"))
    blob["model"][key] = torch.full_like(blob["model"][key], float("nan"))
    torch.save(blob, run / "model.pt")
    return run


def test_nan_network_is_an_error_in_eval_and_report(nan_run, runs, tmp_path, capsys):
    fails(capsys, "eval", "--checkpoint", nan_run, needle="not finite")
    err = fails(
        capsys, "report", runs / "fp", nan_run, "--out", tmp_path / "rep", "--quiet", needle="not finite"
    )
    assert str(nan_run) in err
    assert not (tmp_path / "rep" / "report.json").exists()


def test_inf_output_is_not_clamped_to_white(runs, tmp_path, capsys):
    run = tmp_path / "inf"
    shutil.copytree(runs / "fp", run)
    blob = torch.load(run / "model.pt", weights_only=True)
    bias = next(k for k in blob["model"] if k.startswith("tail") and k.endswith("bias"))
    blob["model"][bias] = torch.full_like(blob["model"][bias], float("inf"))
    torch.save(blob, run / "model.pt")
    fails(capsys, "eval", "--checkpoint", run, needle="not finite")


# ------------------------------------------------------------------------------------------------
# Sizes: model configs, LR sizes, spaces


def _with_kwargs(src, dst, **kwargs):
    shutil.copytree(src, dst)
    blob = torch.load(dst / "model.pt", weights_only=True)
    blob["network"]["model"]["kwargs"].update(kwargs)
    torch.save(blob, dst / "model.pt")
    return dst


def test_model_configs_are_bounded_before_anything_is_allocated(runs, tmp_path, capsys):
    with deadline(60):
        big = _with_kwargs(runs / "fp", tmp_path / "wide", n_feats=200000)
        fails(capsys, "eval", "--checkpoint", big, needle="n_feats=200000")
        deep = _with_kwargs(runs / "fp", tmp_path / "deep", n_resblocks=10**7)
        fails(capsys, "inspect", deep, needle="n_resblocks")
        # Each size within its limit, together too many parameters.
        huge = _with_kwargs(runs / "fp", tmp_path / "huge", n_feats=2048, n_resblocks=512)
        err = fails(capsys, "eval", "--checkpoint", huge, needle="parameters")
        assert "model.pt" in err
        fails(capsys, "train", *TINY_MODEL[:2], "--model-args", '{"n_feats": 100000}', "--scale", "2",
              "--out", tmp_path / "t", needle="n_feats")  # fmt: skip


@pytest.mark.parametrize("size", ["100000000x100000000", "16385x8", "0x5", "4x-1", "abc"])
def test_lr_size_is_bounded(size, capsys):
    with deadline(30):
        fails(
            capsys, "cost", "--model", "edsr-baseline", "--scale", "2", "--lr-size", size, needle="--lr-size"
        )


def test_space_repeats_are_bounded(tmp_path, capsys):
    space = tiny_space(["conv3x3"])
    space["network"][1]["repeat"] = 10_000_000
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space))
    args = [
        "genotype",
        "--space",
        path,
        "--scale",
        "2",
        "--op",
        "conv3x3",
        "--bits",
        "4",
        "--out",
        tmp_path / "g",
    ]
    with deadline(30):
        fails(capsys, *args, needle='"repeat" must be an integer in 1..256')
        # Nested repeats within each limit multiply: counted, never built.
        space["network"][1]["repeat"] = 200
        space["cells"]["outer"] = [{"name": "inner", "op": "cell", "cell": "block", "repeat": 200}]
        space["network"][1]["cell"] = "outer"
        path.write_text(json.dumps(space))
        fails(capsys, *args, needle="nodes once cells are repeated")
        space["channels"] = 10**6
        path.write_text(json.dumps(space))
        fails(capsys, *args, needle='"channels"')


# ------------------------------------------------------------------------------------------------
# Run folders: resume on broken folders, what a search run needs, report's order of checks


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny training run of 4 steps (checkpoints at 2 and 4) and the arguments that made it."""
    from qnas.cli import main

    run = tmp_path_factory.mktemp("resume") / "run"
    args = ["train", *TINY_MODEL, "--scale", "2", *FAST, "--steps", "4"]
    main([*args, "--out", str(run)])
    return run, args


def _broken(finished, tmp_path, what):
    src, args = finished
    run = tmp_path / "run"
    shutil.copytree(src, run)
    (run / "model.pt").unlink()
    if what == "config_list":
        (run / "config.json").write_text("[1, 2]")
    elif what == "config_fifo":
        (run / "config.json").unlink()
        os.mkfifo(run / "config.json")
    elif what in ("other_model", "no_optimizer", "not_a_dict"):
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        if what == "other_model":
            state["model"] = {"head.0.weight": torch.zeros(3, 3, 3, 3)}
        elif what == "no_optimizer":
            del state["optimizer"]
        else:
            state = [1, 2, 3]
        torch.save(state, run / "checkpoint.pt")
    return run, args


@pytest.mark.parametrize(
    "what, needle",
    [
        ("config_list", "config.json: expected a JSON object"),
        ("config_fifo", "config.json: not a regular file"),
        ("other_model", "checkpoint.pt: does not match"),
        ("no_optimizer", "checkpoint.pt: not a checkpoint of `qnas train` (no 'optimizer')"),
        ("not_a_dict", "checkpoint.pt: not a qnas checkpoint"),
    ],
)
def test_resume_on_a_broken_run_folder_is_one_line(finished, tmp_path, capsys, what, needle):
    run, args = _broken(finished, tmp_path, what)
    with deadline(60):
        fails(capsys, *args, "--out", run, "--resume", needle=needle)


def test_resume_keeps_good_metrics_around_a_corrupt_line(finished, tmp_path, capsys):
    src, args = finished
    run = tmp_path / "run"
    shutil.copytree(src, run)
    (run / "model.pt").unlink()
    lines = (run / "metrics.jsonl").read_bytes().splitlines()
    lines[1] = b"\xff\xfe garbage"
    (run / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    _, err = ok(capsys, *args, "--out", run, "--resume")
    assert "metrics.jsonl: dropped 1 unreadable line(s) (line 2)" in err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 3, 4]  # everything after the bad line is still there
    # A file that is all binary: every line reported, the run goes on.
    (run / "model.pt").unlink()
    (run / "metrics.jsonl").write_bytes(bytes(range(256)) * 8)
    _, err = ok(capsys, *args, "--out", run, "--resume")
    assert "metrics.jsonl: dropped" in err


def test_tensorboard_steps_after_the_checkpoint_appear_once_after_resume(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from qnas.runs.folder import RunDir
    from qnas.train.train import TrainOptions, train

    network = {
        "kind": "sr",
        "model": {"name": "edsr-baseline", "scale": 2, "kwargs": {"n_resblocks": 1, "n_feats": 8}},
    }
    opts = TrainOptions(scale=2, steps=4, batch_size=2, patch_size=16, checkpoint_every=2)
    real = RunDir.save_checkpoint

    def killed_at_4(self, state):
        if state["step"] == 4:
            raise KeyboardInterrupt  # the kill: steps 3 and 4 are logged, the last checkpoint is step 2
        real(self, state)

    monkeypatch.setattr(RunDir, "save_checkpoint", killed_at_4)
    with pytest.raises(KeyboardInterrupt):
        train(network, opts, tmp_path / "run", progress=False)
    monkeypatch.setattr(RunDir, "save_checkpoint", real)
    train(network, TrainOptions(**vars(opts)), tmp_path / "run", resume=True, progress=False)
    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]


def test_full_disk_during_training_is_one_line_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    import errno

    real = torch.save
    calls = []

    def save(obj, f):
        calls.append(obj.get("step") if isinstance(obj, dict) else None)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(obj, f)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    fails(capsys, "train", *TINY_MODEL, "--scale", "2", *FAST, "--steps", "4", "--out", run,
          needle="checkpoint.pt: cannot write (No space left on device)")  # fmt: skip
    monkeypatch.setattr(torch, "save", real)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_a_search_run_points_to_train_arch(tmp_path, capsys):
    run = tmp_path / "search"
    run.mkdir()
    ok(capsys, "genotype", "--space", "basic", "--scale", "2", "--op", "conv3x3", "--bits", "4",
       "--lr-size", "8", "--out", run / "genotype.json")  # fmt: skip
    for args in (
        ["eval", "--checkpoint", run],
        ["inspect", run],
        ["export", run, "--format", "packed", "--out", tmp_path / "m"],
    ):
        fails(capsys, *args, needle=f"qnas train --arch {run / 'genotype.json'}")


def test_report_checks_scales_before_evaluating(runs, tmp_path, capsys, monkeypatch):
    import qnas.evaluate

    x3 = tmp_path / "x3"
    ok(capsys, "train", *TINY_MODEL, "--scale", "3", *FAST, "--patch-size", "18", "--steps", "1", "--out", x3)

    def no_eval(*a, **k):
        raise AssertionError("evaluated before the scales were compared")

    monkeypatch.setattr(qnas.evaluate, "evaluate", no_eval)
    fails(capsys, "report", runs / "fp", x3, "--out", tmp_path / "rep", "--quiet", needle="different scales")


def test_short_fqsr_run_shortens_its_warmup_and_says_so(tmp_path, capsys):
    run = tmp_path / "q"
    _, err = ok(capsys, "train", *TINY_MODEL, "--scale", "2", "--quant", "fqsr", "--bits", "4", *FAST,
                "--steps", "3", "--out", run)  # fmt: skip
    assert "warm-up is 0 steps" in err
    config = json.loads((run / "config.json").read_text())
    assert config["network"]["quant"]["warmup"] == 0
    # The quantizers left pass-through: their steps were set during training.
    blob = torch.load(run / "model.pt", weights_only=True)
    assert all(bool(v) for k, v in blob["model"].items() if k.endswith("initialized"))


def test_eval_save_images_never_over_the_data(tmp_path, capsys):
    data = tmp_path / "imgs"
    for i in range(2):
        _png(data / f"im{i}.png", 40, 40, seed=i)
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    fails(capsys, "eval", "--model", "bicubic", "--scale", "2", "--data", data, "--save-images", data,
          "--force", needle="is an input")  # fmt: skip
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before
    out = tmp_path / "sr"
    ok(capsys, "eval", "--model", "bicubic", "--scale", "2", "--data", data, "--save-images", out)
    fails(capsys, "eval", "--model", "bicubic", "--scale", "2", "--data", data, "--save-images", out,
          needle="pass --force")  # fmt: skip
    ok(capsys, "eval", "--model", "bicubic", "--scale", "2", "--data", data, "--save-images", out, "--force")


def test_image_and_json_inputs_that_are_fifos(tmp_path, capsys):
    fifo = tmp_path / "f.json"
    os.mkfifo(fifo)
    with deadline(30):
        fails(capsys, "train", "--arch", fifo, "--out", tmp_path / "r", needle="f.json: not a regular file")
        fails(capsys, "cost", "--arch", fifo, "--lr-size", "8", needle="f.json: not a regular file")
        fails(capsys, "genotype", "--space", fifo, "--scale", "2", "--op", "conv3x3", "--bits", "4",
              "--out", tmp_path / "g", needle="f.json: not a regular file")  # fmt: skip
        fails(
            capsys, "demo", "--settings", fifo, "--out", tmp_path / "d", needle="f.json: not a regular file"
        )
        fails(capsys, "eval", "--checkpoint", fifo, needle="f.json: not a regular file")


# ------------------------------------------------------------------------------------------------
# Hypothesis: random values in the documents qnas reads give QnasError or a sane result, quickly

_ANY = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=6),
    st.lists(st.integers(-3, 10**6), max_size=3),
)


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=24))
def test_lr_size_text(text):
    from qnas.cost import MAX_LR_SIDE, parse_lr_size
    from qnas.errors import QnasError

    try:
        h, w = parse_lr_size(text)
    except QnasError as e:
        assert "--lr-size" in str(e) and "\n" not in str(e)
        return
    assert 1 <= h <= MAX_LR_SIDE and 1 <= w <= MAX_LR_SIDE


@settings(max_examples=60, deadline=None)
@given(
    where=st.sampled_from(["top", "network", "cell"]),
    key=st.sampled_from(["channels", "colors", "repeat", "out", "op", "inputs", "cell", "factor", "name"]),
    value=_ANY,
)
def test_space_documents(where, key, value):
    from qnas.errors import QnasError
    from qnas.nas.derive import DerivedNetwork, uniform_genotype
    from qnas.spaces import load_space

    space = tiny_space(["conv3x3", "conv1x1"])
    target = {"top": space, "network": space["network"][1], "cell": space["cells"]["block"][0]}[where]
    target[key] = value
    with deadline(20):
        try:
            g = uniform_genotype(load_space(space), 2, "conv3x3", 4)
            with torch.device("meta"):
                DerivedNetwork(g)
        except QnasError as e:
            assert "\n" not in str(e)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["edsr-baseline", "srresnet", "rfdn"]),
    key=st.sampled_from(
        ["n_resblocks", "n_feats", "n_blocks", "nf", "n_colors", "res_scale", "bn", "rgb_mean"]
    ),
    value=_ANY,
)
def test_model_configs(name, key, value):
    from qnas.errors import QnasError
    from qnas.runs.network import MAX_PARAMETERS, build_network

    cfg = {"kind": "sr", "model": {"name": name, "scale": 2, "kwargs": {key: value}}}
    with deadline(20):
        try:
            with torch.device("meta"):
                net = build_network(cfg)
        except QnasError as e:
            assert "\n" not in str(e)
            return
    assert sum(p.numel() for p in net.parameters()) <= 50 * MAX_PARAMETERS


# ------------------------------------------------------------------------------------------------
# Options and files that would waste work or memory


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--batch-size", "1000000000"], "--batch-size 1000000000"),  # would allocate without bound
        (["--grad-clip", "nan"], "--grad-clip"),  # NaN > 0 is False: no clipping, silently
        (["--lr", "inf"], "--lr"),  # a finite first loss, then NaN weights
    ],
)
def test_train_options_refused_before_work(tmp_path, capsys, extra, needle):
    with deadline(30):
        fails(capsys, "train", *TINY_MODEL, "--scale", "2", "--steps", "1", *extra, "--out", tmp_path / "r",
              "--quiet", needle=needle)  # fmt: skip
    assert not (tmp_path / "r" / "model.pt").exists()


def test_search_batch_is_bounded(tmp_path, capsys):
    with deadline(60):
        fails(capsys, "search", "--space", "basic", "--scale", "2", "--steps", "1", "--batch-size", "100000000",
              "--patch-size", "16", "--out", tmp_path / "s", "--quiet", needle="--batch-size")  # fmt: skip


def test_a_last_step_to_nan_weights_is_not_saved(tmp_path, monkeypatch):
    from qnas.errors import QnasError
    from qnas.train.train import TrainOptions, train

    real_step = torch.optim.Adam.step

    def poison(self, *a, **k):
        out = real_step(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", poison)
    network = {
        "kind": "sr",
        "model": {"name": "edsr-baseline", "scale": 2, "kwargs": {"n_resblocks": 1, "n_feats": 8}},
    }
    with pytest.raises(QnasError, match="non-finite weights"):
        train(
            network,
            TrainOptions(scale=2, steps=1, batch_size=2, patch_size=16),
            tmp_path / "r",
            progress=False,
        )
    assert not (tmp_path / "r" / "model.pt").exists()


def test_cost_of_a_checkpoint_runs_a_bounded_input(runs, capsys):
    with deadline(30):
        fails(capsys, "cost", "--checkpoint", runs / "fp", "--lr-size", "16384x16384", needle="1024 pixels")


def test_report_checks_its_out_folder_before_evaluating(runs, tmp_path, capsys, monkeypatch):
    import qnas.evaluate

    monkeypatch.setattr(qnas.evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated first"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    fails(
        capsys,
        "report",
        runs / "fp",
        "--out",
        blocker / "rep",
        "--quiet",
        needle="cannot create the report folder",
    )


def test_a_file_that_is_not_a_torch_file(runs, capsys):
    err = fails(
        capsys, "eval", "--checkpoint", runs / "fp" / "config.json", needle="not a file written by torch.save"
    )
    assert "weights_only" not in err


@pytest.mark.parametrize(
    "settings, needle",
    [
        ({"train_steps": -5}, "train_steps=-5"),
        ({"penalty": "high"}, "penalty='high'"),
        ({"bits_search": 1}, "bits_search"),
    ],
)
def test_demo_settings_are_checked_before_the_first_stage(tmp_path, capsys, settings, needle):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(settings))
    with deadline(30):
        fails(capsys, "demo", "--settings", path, "--out", tmp_path / "d", "--quiet", needle=needle)


def test_documents_with_values_of_the_wrong_type(runs, tmp_path, capsys):
    """Lists, dicts and floats where a name or a list of names belongs: one line, not a TypeError."""
    run = tmp_path / "kind"
    shutil.copytree(runs / "fp", run)
    blob = torch.load(run / "model.pt", weights_only=True)
    blob["network"]["kind"] = [1, 2]
    torch.save(blob, run / "model.pt")
    fails(capsys, "eval", "--checkpoint", run, needle='"kind" must be a string')
    g = tmp_path / "g.json"
    ok(capsys, "genotype", "--space", "basic", "--scale", "2", "--op", "conv3x3", "--bits", "4", "--lr-size", "8",
       "--out", g)  # fmt: skip
    doc = json.loads(g.read_text())
    for key, value, needle in [("candidates", 1.5, '"candidates" must be null'), ("op", [], "unknown op")]:
        bad = copy.deepcopy(doc)
        if key == "op":
            bad["layers"]["head2"]["op"] = value
        else:
            bad[key] = value
        g.write_text(json.dumps(bad))
        fails(capsys, "train", "--arch", g, "--out", tmp_path / "r", "--quiet", needle=needle)


def test_decompression_bombs_are_refused_from_the_header(runs, tmp_path, capsys):
    """A 9000x9000 black PNG is a few KB; decoded and upscaled x2 it is gigabytes."""
    bomb = tmp_path / "bomb.png"
    Image.new("L", (9000, 9000)).save(bomb)
    assert bomb.stat().st_size < 200_000
    with deadline(30):
        fails(capsys, "upscale", "--model", runs / "m.qnp", bomb, tmp_path / "o.png", needle="more than the")
        folder = tmp_path / "data"
        folder.mkdir()
        shutil.copy(bomb, folder / "bomb.png")
        fails(capsys, "eval", "--model", "bicubic", "--scale", "2", "--data", folder, needle="more than the")


def test_upscale_output_is_bounded(runs, tmp_path, capsys, monkeypatch):
    import qnas.deploy.upscale as up

    monkeypatch.setattr(up, "MAX_OUTPUT_PIXELS", 4 * 12 * 10 - 1)
    fails(capsys, "upscale", "--model", runs / "m.qnp", _png(tmp_path / "a.png"), tmp_path / "o.png",
          needle="output pixels")  # fmt: skip
    assert not (tmp_path / "o.png").exists()
