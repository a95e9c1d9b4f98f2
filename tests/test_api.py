"""The Python API (qnas.api) is the command line's code path: the same run from either, the same options
record; keyword errors are one-line QnasErrors; the options of every command come from its declarations;
building the command imports no torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_run import run_cli

from qnas import api
from qnas.cli import PRINTERS, cli
from qnas.errors import QnasError
from qnas.options import declared

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_api_train_is_the_command_line_train(tmp_path, capsys):
    a, b = tmp_path / "cli", tmp_path / "api"
    args = ["train", "--model", "edsr-baseline", "--model-args", '{"n_resblocks": 1, "n_feats": 8}']
    args += ["--scale", "2", "--steps", "2", "--batch-size", "2", "--patch-size", "16", "--lr", "1e-3"]
    code, _, err = run_cli([*args, "--quiet", "--out", a], capsys)
    assert code == 0, err
    summary = api.train(
        model="edsr-baseline",
        model_args={"n_resblocks": 1, "n_feats": 8},
        scale=2,
        steps=2,
        batch_size=2,
        patch_size=16,
        lr=1e-3,
        quiet=True,
        out=str(b),
    )
    assert summary["steps"] == 2 and summary["run"] == str(b)
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (a, b))
    assert ca == cb and ca["options"]["model_args"] == '{"n_resblocks": 1, "n_feats": 8}'
    x, y = (torch.load(p / "model.pt", weights_only=True)["model"] for p in (a, b))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    # A --config file replays an API run, as it replays a command line's.
    code, _, err = run_cli(
        ["train", "--config", b / "config.json", "--quiet", "--out", tmp_path / "c"], capsys
    )
    assert code == 0, err
    z = torch.load(tmp_path / "c" / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(x[k], z[k]) for k in x)


def test_api_values_and_texts_are_the_same_options(tmp_path):
    """A list option given as a list or as the command line's text, a flag by its name: the same genotype."""
    common = {"space": "basic", "scale": 2, "op": "conv3x3", "lr_size": "32x32", "no_anchor": True}
    a = api.genotype(bits=[4], out=str(tmp_path / "a.json"), **common)
    b = api.genotype(bits="4", out=str(tmp_path / "b.json"), **{**common, "lr_size": (32, 32)})
    assert a["genotype"] == b["genotype"] and a["genotype"]["space"].get("anchor") is None


@pytest.mark.parametrize(
    "command, options, needle",
    [
        (api.train, {"out": "x", "stepz": 3}, "unknown option 'stepz'"),
        (api.search, {"scale": 2}, "--out is required"),
        (api.strategy, {"out": "x", "checkpoint": "y"}, "--bits is required"),
        (api.evaluate, {"model": "bicubic"}, "--scale is required with --model bicubic"),
        (api.cost, {"model": "edsr", "lr_size": "8", "checkpoint": "r"}, "give exactly one of"),
    ],
)
def test_api_errors_are_one_line(command, options, needle):
    with pytest.raises(QnasError, match=needle) as e:
        command(**options)
    assert "\n" not in str(e.value) and str(e.value).startswith(("qnas.api.", "--", "give"))


def test_every_command_line_option_is_a_declared_one():
    """The click parameters of every command are its declarations (plus --config where it has one),
    with the declared defaults as the command line shows them: nothing is written twice."""
    for command in api.COMMANDS:
        click_cmd = cli.commands[command.name]
        params = {p.name: p for p in click_cmd.params if p.name not in ("config", "help")}
        classes = (*command.options, *PRINTERS[command.name].extra)
        decl = {d.key: d for cls in classes for d in declared(cls)}
        assert params.keys() == decl.keys(), command.name
        for key, d in decl.items():
            if not d.opt.argument and not d.is_flag and not d.required:
                assert params[key].default == d.to_text(d.default), (command.name, key)
        assert any(p.name == "config" for p in click_cmd.params) == command.config, command.name


def test_building_the_command_imports_no_torch():
    """`qnas --help` and the argument parsing of every command stay fast: no torch until a command runs."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "python")])}
    code = "import sys, qnas.cli, qnas.api; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def test_the_guides_python_example_on_a_tiny_space(tmp_path):
    """docs/guide.md, "From Python": search, retrain, export, evaluate and load, on a tiny space."""
    from test_nas_supernet import tiny_space

    space = tmp_path / "space.json"
    space.write_text(json.dumps(tiny_space(["conv1x1", "conv3x3"])))
    small = {"scale": 2, "batch_size": 2, "patch_size": 16, "quiet": True}
    found = api.search(
        space=str(space), steps=2, penalty=0.05, lr_size="16x16", out=str(tmp_path / "s"), **small
    )
    trained = api.train(arch=found["genotype"], steps=2, out=str(tmp_path / "t"), **small)
    exported = api.export(run=trained["run"], format="packed", out=str(tmp_path / "m.qnp"))
    assert exported["check"].endswith("inf dB"), exported["check"]  # the packed runtime computes what trained
    packed = api.evaluate(checkpoint=str(tmp_path / "m.qnp"))
    run = api.evaluate(checkpoint=trained["run"])
    assert packed["scale"] == run["scale"] == 2 and packed["count"] == run["count"] > 0
    assert packed["result"]["psnr"] == pytest.approx(run["result"]["psnr"], abs=0.01)
    net, blob = api.load_network(trained["run"])
    assert blob["network"]["kind"] == "genotype" and not net.training
