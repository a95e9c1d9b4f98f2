"""`qnas demo` end to end with tiny settings (a tiny space at x2, a few steps per stage): every stage's run
folder, report.json with every expected model, the Pareto PNG, demo.json's comparison read from the report;
a rerun skips every finished stage; other settings in the same folder are refused."""

import json

import numpy as np
import pytest
import torch
from test_nas_supernet import tiny_space

from qnas.cli import main
from qnas.demo import DARTS_DEMO, DemoSettings, run_demo
from qnas.errors import QnasError

#: The report's models: the default demo (single-path bit search) and the differentiable one (DARTS_DEMO),
#: which adds its bits-only search.
BASELINES = ["uniform_w4a4", "uniform_w8a8", "uniform_w4a4_first8", "uniform_w4a4_first_last8"]
MODELS = {
    "spos": ["bicubic", "quantnas", *BASELINES],
    "darts": ["bicubic", "quantnas", "bits_only", *BASELINES],
}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_settings(tmp_path):
    space = tmp_path / "tiny.json"
    space.write_text(json.dumps(tiny_space(["conv1x1", "conv3x3", "conv3x1_1x3"])))
    return {
        "space": str(space),
        "scale": 2,
        "search_steps": 3,
        "bits_search_steps": 2,
        "search_batch": 2,
        "search_patch": 16,
        "train_steps": 3,
        "train_batch": 2,
        "train_patch": 16,
        "lr_size": [16, 16],
    }


@pytest.mark.parametrize("method", ["spos", "darts"])
def test_demo_end_to_end_and_rerun_skips(method, tiny_settings, tmp_path, capsys):
    out = tmp_path / "demo"
    if method == "darts":
        tiny_settings = {**DARTS_DEMO, **tiny_settings}
    else:  # the default search, in the tiny space widened from 6 to 8 channels
        tiny_settings = {**tiny_settings, "search_channels": 8, "select_contexts": 2, "select_batches": 1}
    summary = run_demo(DemoSettings.from_dict(tiny_settings), out, progress=False)
    if method == "darts":
        for stage in ("search", "search_bits"):
            assert (out / stage / "genotype.json").exists() and (out / stage / "alphas.png").exists()
    else:
        assert (out / "search" / "selection.json").exists() and not (out / "search_bits").exists()
        assert json.loads((out / "spaces" / "tiny_c8.json").read_text())["channels"] == 8
        searched = json.loads((out / "search" / "genotype.json").read_text())
        assert searched["search"]["method"] == "spos"
        assert {layer["w_bits"] for layer in searched["layers"].values()} <= {2, 4, 8}
        assert searched["cost"]["bitops"] / 1e9 <= summary["target_gbitops"] + 1e-9
    for name in MODELS[method][1:]:
        assert (out / name / "model.pt").exists()
    report = json.loads((out / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == MODELS[method]
    for m in report["models"]:
        assert 5 < m["psnr"] < 60 and 0 < m["ssim"] <= 1
        assert (m["bitops"] is None) == (m["name"] == "bicubic")
    by_name = {m["name"]: m for m in report["models"]}
    assert by_name["uniform_w8a8"]["bitops"] == 4 * by_name["uniform_w4a4"]["bitops"]
    # Only the first (and last) layers differ (8 bits instead of 4): between w4a4 and w8a8.
    assert (
        by_name["uniform_w4a4"]["bitops"]
        < by_name["uniform_w4a4_first8"]["bitops"]
        < by_name["uniform_w4a4_first_last8"]["bitops"]
        < by_name["uniform_w8a8"]["bitops"]
    )
    g4 = json.loads((out / "genotypes" / "uniform_w4a4.json").read_text())["layers"]
    g48 = json.loads((out / "genotypes" / "uniform_w4a4_first8.json").read_text())["layers"]
    g488 = json.loads((out / "genotypes" / "uniform_w4a4_first_last8.json").read_text())["layers"]
    first, last = next(iter(g4)), list(g4)[-1]
    assert g48[first]["w_bits"] == g48[first]["a_bits"] == 8 and {
        k: v for k, v in g48.items() if k != first
    } == {k: v for k, v in g4.items() if k != first}
    assert g488[last]["w_bits"] == 8 and {k: v for k, v in g488.items() if k != last} == {
        k: v for k, v in g48.items() if k != last
    }
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    # The searches aimed at the strongest baseline's BitOps.
    assert summary["target_gbitops"] == pytest.approx(by_name["uniform_w4a4_first_last8"]["bitops"] / 1e9)
    text = (out / "report.md").read_text()
    assert "uniform 4-bit" in text and "8-bit first and last layers" in text and "standard error" in text

    q = by_name["quantnas"]
    assert [c["baseline"] for c in summary["comparisons"]] == [
        "uniform_w4a4",
        "uniform_w4a4_first8",
        "uniform_w4a4_first_last8",
    ]
    for c in summary["comparisons"]:
        b = by_name[c["baseline"]]
        assert c["psnr_delta_db"] == pytest.approx(q["psnr"] - b["psnr"])
        diffs = [qi["psnr"] - bi["psnr"] for qi, bi in zip(q["images"], b["images"], strict=True)]
        se = float(np.std(diffs, ddof=1) / np.sqrt(len(diffs)))
        assert c["psnr_delta_se_db"] == pytest.approx(se)
        expected = (
            "tie" if abs(c["psnr_delta_db"]) < 2 * se else ("wins" if c["psnr_delta_db"] > 0 else "loses")
        )
        assert c["verdict"].startswith(expected)
        assert c["holds"] == (c["verdict"] == "wins")
    searches = {"search", "search_bits"} if method == "darts" else {"search"}
    assert set(summary["stage_seconds"]) == searches | {"report"} | {
        f"train {name}" for name in MODELS[method][1:]
    }

    # A rerun (here through the CLI) finds every stage complete and only reprints the report.
    settings_file = tmp_path / "settings.json"
    settings_file.write_text(json.dumps(tiny_settings))
    mtime = (out / "quantnas" / "model.pt").stat().st_mtime_ns
    try:
        main(["demo", "--out", str(out), "--settings", str(settings_file), "--quiet"])
    except SystemExit as e:
        pytest.fail(f"qnas demo exited with {e.code}: {capsys.readouterr().err}")
    assert "| quantnas" in capsys.readouterr().out
    assert (out / "quantnas" / "model.pt").stat().st_mtime_ns == mtime
    assert json.loads((out / "demo.json").read_text())["seconds_this_call"] < 5

    with pytest.raises(QnasError, match="other settings"):
        run_demo(DemoSettings.from_dict({**tiny_settings, "train_steps": 4}), out, progress=False)


def test_demo_settings_errors():
    with pytest.raises(QnasError, match="unknown keys"):
        DemoSettings.from_dict({"trian_steps": 3})
    with pytest.raises(QnasError, match="must include 4"):
        DemoSettings.from_dict({"uniform_bits": [8]}).check()
    with pytest.raises(QnasError, match="for method 'darts'"):
        DemoSettings.from_dict({"bits_search": True}).check()
    with pytest.raises(QnasError, match="search_channels"):
        DemoSettings.from_dict({"search_channels": 0})
    DemoSettings.from_dict({**DARTS_DEMO, "penalty": 0.1}).check()
