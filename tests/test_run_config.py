"""`--config FILE` of train/search/strategy (a run's config.json replays the run; the command line
overrides the file; bad files are one-line errors) and validation while training (`--val-data`,
`--val-every`: metrics, best.pt, `eval --best`, the training unchanged by it)."""

import json
from pathlib import Path

import pytest
import torch
from cli_run import run_cli
from test_nas_supernet import tiny_space

from qnas.runs import folder as run_module

TINY = ["--model", "edsr-baseline", "--model-args", '{"n_resblocks": 1, "n_feats": 8}', "--scale", "2"]
FAST = ["--batch-size", "2", "--patch-size", "16", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")


def ok(capsys, *args):
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    return out


def fails(capsys, *args) -> str:
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def same_weights(a: Path, b: Path, name: str = "model.pt") -> bool:
    x, y = (torch.load(p / name, weights_only=True) for p in (a, b))
    assert x["network"] == y["network"] and x.keys() == y.keys()
    return x["model"].keys() == y["model"].keys() and all(
        torch.equal(x["model"][k], y["model"][k]) for k in x["model"]
    )


def config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def test_train_config_replays_the_run(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    ok(capsys, "train", *TINY, *FAST, "--steps", "3", "--lr", "1e-3", "--ema", "0.5", "--out", a)
    options = config(a)["options"]
    assert options["lr"] == 1e-3 and options["model"] == "edsr-baseline" and options["steps"] == 3
    assert not {"out", "resume", "quiet"} & set(options)  # not part of the run
    ok(capsys, "train", "--config", a / "config.json", "--out", b)
    assert same_weights(a, b) and config(a) == config(b)
    # The replay resumes like the original: its recorded options are those of the run.
    ok(capsys, "train", "--config", a / "config.json", "--out", b, "--resume")


def test_quantized_train_config_replays_the_run(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    ok(capsys, "train", *TINY, *FAST, "--steps", "2", "--quant", "fqsr", "--bits", "4", "--out", a)
    ok(capsys, "train", "--config", a / "config.json", "--out", b)
    assert same_weights(a, b) and config(a) == config(b)
    err = fails(capsys, "cost", "--arch", a / "config.json", "--lr-size", "16")
    assert "--checkpoint" in err


def test_command_line_overrides_the_config(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(
        json.dumps(
            {
                "model": "edsr-baseline",
                "model-args": '{"n_resblocks": 1, "n_feats": 8}',
                "scale": 2,
                "--steps": 5,
                "batch_size": 2,
                "patch-size": 16,
                "lr": 1e-3,
                "quiet": True,
            }
        )
    )
    run = tmp_path / "r"
    ok(capsys, "train", "--config", cfg, "--steps", "2", "--seed", "3", "--out", run)
    c = config(run)
    assert c["train"]["steps"] == 2 and c["train"]["seed"] == 3  # the command line wins
    assert c["train"]["batch_size"] == 2 and c["train"]["lr"] == 1e-3  # the file's values
    assert c["train"]["schedule"] == "cosine"  # neither: the option's default
    assert c["options"]["steps"] == 2 and c["network"]["model"]["kwargs"]["n_feats"] == 8
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    "doc, needle",
    [
        ({"stepz": 3}, "'stepz'"),
        ({"steps": "3"}, "'steps': expected an integer"),
        ({"steps": 2.5}, "'steps': expected an integer"),
        ({"lr": True}, "'lr': expected a number"),
        ({"quiet": 1}, "'quiet': expected true or false"),
        ({"schedule": "linear"}, "'schedule'"),
        ({"model": ["edsr"]}, "'model': expected a string"),
        ({"batch-size": 2, "batch_size": 2}, "the same option"),
        ({"config": "x.json"}, "'config'"),
        ([1, 2], "expected a JSON object"),
        ("{bad", "not valid JSON"),
        ({"command": "search", "options": {}}, "`qnas search` run"),
        ({"command": "train", "options": {}, "version": 2}, "'version'"),
        ({"command": "train", "options": []}, "'options'"),
        ({"network": {"kind": "sr"}, "train": {"steps": 2}}, '"options" record'),
    ],
)
def test_bad_config_is_a_one_line_error(tmp_path, capsys, doc, needle):
    cfg = tmp_path / "c.json"
    cfg.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    err = fails(capsys, "train", "--config", cfg, *TINY, *FAST, "--out", tmp_path / "r")
    assert str(cfg) in err and needle in err
    assert not (tmp_path / "r").exists()


def test_missing_and_yaml_config(tmp_path, capsys):
    err = fails(capsys, "train", "--config", tmp_path / "none.json", *TINY, "--out", tmp_path / "r")
    assert "none.json" in err
    (tmp_path / "c.yaml").write_text("steps: 2\n")
    assert "JSON" in fails(capsys, "train", "--config", tmp_path / "c.yaml", *TINY, "--out", tmp_path / "r")


def test_validation_metrics_best_and_eval_best(tmp_path, capsys):
    run = tmp_path / "run"
    val = ["--val-data", "builtin", "--val-every", "2"]
    ok(capsys, "train", *TINY, *FAST, "--steps", "5", *val, "--out", run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    validated = [r["step"] for r in records if "val_psnr" in r]
    assert validated == [2, 4, 5]  # every 2 steps and at the last
    assert all(10 < r["val_psnr"] < 50 and 0 < r["val_ssim"] < 1 for r in records if "val_psnr" in r)
    assert all("loss" in r and "step_time_s" in r for r in records)
    best = max((r for r in records if "val_psnr" in r), key=lambda r: r["val_psnr"])
    blob = torch.load(run / "best.pt", weights_only=True)
    assert blob["format"] == "qnas-model/1" and blob["validation"]["step"] == best["step"]
    assert blob["validation"]["psnr"] == best["val_psnr"]
    assert config(run)["validation"] == {"data": "builtin", "every": 2}
    # TensorBoard holds the same scalars.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    assert [e.step for e in events.Scalars("val_psnr")] == [2, 4, 5]

    res = json.loads(ok(capsys, "eval", "--checkpoint", run, "--best", "--format", "json"))
    assert res["psnr"] == pytest.approx(best["val_psnr"], abs=1e-9)
    assert res["model"].endswith("best.pt")

    plain = tmp_path / "plain"
    ok(capsys, "train", *TINY, *FAST, "--steps", "1", "--out", plain)
    assert "best.pt" in fails(capsys, "eval", "--checkpoint", plain, "--best")
    assert (
        "--val-data"
        in run_cli(["train", *TINY, *FAST, "--val-every", "2", "--out", tmp_path / "x"], capsys)[2]
    )


@pytest.mark.parametrize(
    "quant", [[], ["--quant", "fqsr", "--bits", "4", "--ema", "0.5"]], ids=["fp", "fqsr-ema"]
)
def test_validation_does_not_change_training(tmp_path, capsys, quant):
    a, b = tmp_path / "a", tmp_path / "b"
    ok(capsys, "train", *TINY, *FAST, *quant, "--steps", "4", "--out", a)
    ok(
        capsys,
        "train",
        *TINY,
        *FAST,
        *quant,
        "--steps",
        "4",
        "--val-data",
        "builtin",
        "--val-every",
        "1",
        "--out",
        b,
    )
    assert same_weights(a, b)
    rng = [torch.load(r / "checkpoint.pt", weights_only=True)["rng"] for r in (a, b)]
    assert torch.equal(rng[0], rng[1])  # the global random stream too
    losses = [
        [json.loads(line)["loss"] for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (a, b)
    ]
    assert losses[0] == losses[1]


def test_resume_keeps_the_best_so_far(tmp_path, capsys, monkeypatch):
    args = [
        *TINY,
        *FAST,
        "--steps",
        "6",
        "--checkpoint-every",
        "2",
        "--val-data",
        "builtin",
        "--val-every",
        "2",
    ]
    ok(capsys, "train", *args, "--out", tmp_path / "a")

    log = run_module.RunDir.log

    def killed_at_5(self, step, **values):
        if step == 5:
            raise KeyboardInterrupt
        log(self, step, **values)

    monkeypatch.setattr(run_module.RunDir, "log", killed_at_5)
    assert run_cli(["train", *args, "--out", tmp_path / "b"], capsys)[0] == 130
    monkeypatch.undo()
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4 and state["best"]["step"] in (2, 4)
    ok(capsys, "train", *args, "--out", tmp_path / "b", "--resume")
    assert same_weights(tmp_path / "a", tmp_path / "b") and same_weights(
        tmp_path / "a", tmp_path / "b", "best.pt"
    )
    best = [torch.load(tmp_path / r / "best.pt", weights_only=True)["validation"] for r in "ab"]
    assert best[0] == best[1]


@pytest.fixture
def space_file(tmp_path):
    p = tmp_path / "tiny.json"
    p.write_text(json.dumps(tiny_space(["conv1x1", "conv3x3"])))
    return p


def test_search_config_replays_the_run(tmp_path, capsys, space_file):
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    ok(capsys, "search", "--space", space_file, "--scale", "2", *FAST, "--steps", "2", "--out", s1)
    ok(capsys, "search", "--config", s1 / "config.json", "--out", s2)
    assert json.loads((s1 / "genotype.json").read_text()) == json.loads((s2 / "genotype.json").read_text())
    assert "genotype.json" in fails(capsys, "cost", "--arch", s1 / "config.json", "--lr-size", "16")


def test_genotype_run_config_replays_and_costs(tmp_path, capsys, space_file):
    genotype = tmp_path / "g.json"
    ok(
        capsys,
        "genotype",
        "--space",
        space_file,
        "--scale",
        "2",
        "--op",
        "conv3x3",
        "--bits",
        "4",
        "--out",
        genotype,
    )
    g1, g2, g3 = tmp_path / "g1", tmp_path / "g2", tmp_path / "g3"
    ok(capsys, "train", "--arch", genotype, *FAST, "--steps", "1", "--out", g1)
    ok(capsys, "train", "--config", g1 / "config.json", "--out", g2)
    cost = [
        ok(capsys, "cost", "--arch", p, "--lr-size", "16", "--format", "json")
        for p in (genotype, g1 / "config.json")
    ]
    assert cost[0] == cost[1]
    # --arch takes the run's config.json too (it holds the genotype): the replay needs no genotype file.
    genotype.unlink()
    ok(capsys, "train", "--config", g1 / "config.json", "--arch", g1 / "config.json", "--out", g3)
    assert same_weights(g1, g2) and same_weights(g1, g3)


def test_strategy_config_replays_the_run(tmp_path, capsys):
    fp = tmp_path / "fp"
    ok(capsys, "train", *TINY, *FAST, "--steps", "1", "--out", fp)
    args = ["--bits", "4", "--steps", "2", "--calib-batches", "2", "--quantizers", "mse,minmax", *FAST]
    ok(capsys, "strategy", "--checkpoint", fp, *args, "--out", tmp_path / "a")
    ok(capsys, "strategy", "--config", tmp_path / "a" / "config.json", "--out", tmp_path / "b")
    assert same_weights(tmp_path / "a", tmp_path / "b")
    assert "`qnas strategy` run" in fails(
        capsys, "train", "--config", tmp_path / "a" / "config.json", "--out", tmp_path / "c"
    )
