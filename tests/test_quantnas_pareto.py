"""scripts/quantnas_pareto.py: the paired-difference math and the skipping of finished runs, on
synthetic numbers and a stand-in for the `qnas` subprocesses (no images, no training)."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import quantnas_pareto as qp  # noqa: E402


def _model(kind: str, per_seed: dict[int, list[float]], gbitops: float = 100.0) -> dict:
    """A results.json model whose one set "S" has images a, b, c with the given PSNRs per seed."""
    seeds = {}
    for seed, values in per_seed.items():
        images = [{"name": n, "psnr": v, "ssim": 0.5} for n, v in zip("abc", values, strict=True)]
        sets = {"S": {"psnr": statistics.mean(values), "ssim": 0.5, "images": images}}
        seeds[str(seed)] = {"gbitops": gbitops, "cpu_s": {"train": 10.0, "search": None}, "sets": sets}
    return {"kind": kind, "target_gbitops": None, "seeds": seeds}


def test_paired_difference_by_image_and_seed():
    a = _model("searched", {0: [30.0, 31.0, 32.0], 1: [30.5, 31.0, 31.0]})
    b = _model(qp.HANDMADE, {0: [29.0, 30.5, 31.0], 1: [30.0, 31.5, 30.0], 2: [0.0, 0.0, 0.0]})
    d = qp.paired_difference(a, b, ["S"])
    assert d["seeds"] == [0, 1]  # seed 2 has no partner
    diffs = [1.0, 0.5, 1.0, 0.5, -0.5, 1.0]
    s = d["sets"]["S"]
    assert s["pairs"] == 6
    assert s["mean"] == pytest.approx(statistics.mean(diffs))
    assert s["se_image"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(6))
    assert s["se_seed"] == pytest.approx(statistics.stdev([2.5 / 3, 1.0 / 3]) / math.sqrt(2))
    assert s["se"] == max(s["se_image"], s["se_seed"])
    assert s["verdict"] == ("win" if s["mean"] > 2 * s["se"] else "tie")
    # One set: the average is that set.
    assert d["avg"]["mean"] == pytest.approx(s["mean"])
    # A large constant margin with no spread is a win; its mirror a loss.
    c = _model("searched", {0: [31.0, 32.0, 33.0]})
    e = _model(qp.HANDMADE, {0: [30.0, 31.0, 32.0]})
    assert qp.paired_difference(c, e, ["S"])["avg"]["verdict"] == "win"
    assert qp.paired_difference(e, c, ["S"])["avg"]["verdict"] == "loss"


def test_model_summary_means_over_seeds():
    m = qp.model_summary(_model("searched", {0: [30.0, 31.0, 32.0], 1: [29.0, 30.0, 31.0]}), ["S"])
    assert m["sets"]["S"]["psnr"] == pytest.approx(30.5)
    assert m["avg_psnr"] == pytest.approx(30.5)
    assert m["avg_psnr_se"] == pytest.approx(statistics.stdev([31.0, 30.0]) / math.sqrt(2))
    assert m["cpu_s"] == pytest.approx(10.0)


def test_edge_layers_at():
    g = {"layers": {n: {"op": "conv3x3", "w_bits": 4, "a_bits": 4} for n in ("first", "mid", "last")}}
    g["cost"] = {"bitops": 1}
    e = qp.edge_layers_at(g, 8)
    assert [e["layers"][n]["w_bits"] for n in ("first", "mid", "last")] == [8, 4, 8]
    assert "cost" not in e and g["layers"]["first"]["w_bits"] == 4


class FakeRunner:
    """Stands in for results.Runner: writes what each `qnas` command would and records the calls."""

    def __init__(self):
        self.calls: list[str] = []

    def qnas(self, args, *, timeout=None):
        self.calls.append(args[0])
        out = Path(args[args.index("--out") + 1]) if "--out" in args else None
        text = ""
        if args[0] == "genotype":
            space = Path(args[args.index("--space") + 1])
            width = json.loads(space.read_text())["channels"] if space.suffix == ".json" else 36
            layers = {"l1": {"w_bits": 4, "a_bits": 4}, "l2": {}}
            out.write_text(json.dumps({"layers": layers, "cost": {"bitops": width**2 * 1e8}}))
        elif args[0] == "search":
            out.mkdir(parents=True, exist_ok=True)
            (out / "genotype.json").write_text("{}")
        elif args[0] == "train":
            out.mkdir(parents=True, exist_ok=True)
            (out / "model.pt").write_text("")
        elif args[0] == "eval":
            images = [{"name": "x", "psnr": 25.0, "ssim": 0.7}]
            text = json.dumps({"psnr": 25.0, "ssim": 0.7, "images": images})
        elif args[0] == "cost":
            text = json.dumps({"bitops": 5e10, "params": 10})
        return 0, 0.01, 0.02, text


def test_finished_runs_are_not_run_again(tmp_path):
    args = qp.parse_args(
        [str(tmp_path / "data"), str(tmp_path / "out"), "--seeds", "0,1", "--widths", "24,36"]
    )
    runner = FakeRunner()
    targets = qp.resolve_targets(runner, args, tmp_path / "out")
    # 'auto': uniform w4a4's BitOps at each width (the stand-in's width^2 * 0.1 G), rounded down.
    assert targets == [57.6, 129.6]
    assert (tmp_path / "out" / "spaces" / "basic_c24.json").exists()
    items = qp.plan(args, targets)
    names = {(i["name"], i["seed"]) for i in items}
    assert ("spos_57p6", 1) in names and ("uniform_w4a4_fl8_c24", 0) in names
    assert ("uniform_w4a4_c36", 1) in names and ("uniform_w8a8", 2) in names
    # Controls at the middle target (random genotype, search over the six ops), and the free search.
    assert ("random_129p6", 2) in names and ("joint_129p6", 0) in names and ("free_search", 2) in names
    doc = qp.collect(runner, args, tmp_path / "out", items, run_new=True)
    searches = [c for c in runner.calls if c == "search"]
    assert len(searches) == 2 * 2 + 3 + 3  # two targets at two seeds, six-op and free at three
    assert runner.calls.count("train") == len(items)
    assert set(doc["models"]) == {i["name"] for i in items}
    summary = qp.summarize(doc)
    assert summary["comparisons"] and "| spos_57p6 |" in qp.markdown(doc, summary)
    # A rerun finds every run and every evaluation done: nothing is run.
    again = FakeRunner()
    assert qp.collect(again, args, tmp_path / "out", items, run_new=True) == doc
    assert again.calls == []


def test_dominance_compares_with_the_cheapest_baseline_at_or_above_the_cost():
    s = _model("searched", {0: [30.5, 31.5, 32.5], 1: [30.4, 31.6, 32.4]}, gbitops=100.0)
    cheap = _model(qp.HANDMADE, {0: [30.0, 31.0, 32.0], 1: [30.0, 31.0, 32.0]}, gbitops=90.0)
    near = _model(qp.HANDMADE, {0: [30.0, 31.0, 32.0], 1: [30.0, 31.1, 32.0]}, gbitops=150.0)
    far = _model(qp.HANDMADE, {0: [40.0, 40.0, 40.0], 1: [40.0, 40.0, 40.0]}, gbitops=300.0)
    other = _model(qp.HANDMADE, {0: [30.6, 31.6, 32.6], 1: [30.6, 31.6, 32.6]}, gbitops=120.0)
    doc = {
        "test_sets": ["S"],
        "models": {
            "quantnas_100": s,
            "uniform_w4a4_c24": cheap,
            "uniform_w4a4_c36": near,
            "uniform_w4a4_c51": far,
            "uniform_w4a4_fl8_c36": other,
        },
    }
    summary = {"models": {n: qp.model_summary(m, ["S"]) for n, m in doc["models"].items()}}
    rows = {r["baseline"]: r for r in qp.dominance(doc, summary)}
    assert set(rows) == {"uniform_w4a4_c36", "uniform_w4a4_fl8_c36"}  # not the cheaper c24, not c51
    assert rows["uniform_w4a4_c36"]["margin"] == pytest.approx((1.5 + 1.3) / 6, abs=1e-9)
    assert rows["uniform_w4a4_c36"]["dominates"] and not rows["uniform_w4a4_fl8_c36"]["dominates"]
    assert qp.baseline_family("uniform_w4a4_fl8_c36") == "uniform_w4a4_fl8"
    assert qp.baseline_family("uniform_w8a8") == "uniform_w8a8"


def test_methods_name_the_searched_models_and_pass_the_method(tmp_path):
    args = qp.parse_args(
        [str(tmp_path / "d"), str(tmp_path / "o"), "--methods", "darts,spos", "--spos-steps", "500"]
        + ["--targets", "50", "--search-widths", "space"]
    )
    items = [i for i in qp.plan(args, [50.0]) if i["kind"] == "searched" and i["seed"] == 0]
    assert [i["name"] for i in items] == ["quantnas_50", "spos_50"]
    darts, spos = (qp.search_cmd(args, i, tmp_path, tmp_path / "o") for i in items)
    assert "--method" not in darts and darts[darts.index("--steps") + 1] == str(args.search_steps)
    assert spos[spos.index("--method") + 1] == "spos" and spos[spos.index("--steps") + 1] == "500"
    with pytest.raises(SystemExit, match="--methods"):
        qp.plan(qp.parse_args([str(tmp_path / "d"), str(tmp_path / "o"), "--methods", "enas"]), [50.0])


def test_default_plan_searches_bits_in_wider_spaces_with_matching_controls(tmp_path):
    out = tmp_path / "o"
    args = qp.parse_args([str(tmp_path / "d"), str(out), "--seeds", "0", "--control-seeds", "0"])
    items = {i["name"]: i for i in qp.plan(args, [74.6, 157.3, 304.4])}
    # Each target is searched one width step above the uniform w4a4 network that sets it.
    assert [items[f"spos_{t}"]["width"] for t in ("74p6", "157p3", "304p4")] == [36, 51, 72]
    cmd = qp.search_cmd(args, items["spos_157p3"], tmp_path, out)
    for flag, value in (("--method", "spos"), ("--mode", "quant"), ("--ops", "conv3x3"), ("--bits", "2,4,8")):
        assert cmd[cmd.index(flag) + 1] == value
    assert json.loads(Path(cmd[cmd.index("--space") + 1]).read_text())["channels"] == 51
    # The op-search control runs in the same space with the space's own ops; the free search with the
    # searched models' ops; no bits-only control (the searched models are bits-only).
    assert "--ops" not in qp.search_cmd(args, items["joint_157p3"], tmp_path, out)
    free = qp.search_cmd(args, items["free_search"], tmp_path, out)
    assert free[free.index("--ops") + 1] == "conv3x3" and "--target-gbitops" not in free
    assert not any(n.startswith("bits_only") for n in items)
    assert items["uniform_w4a4_fl8_c24"]["edge_bits"] == 8


def test_handmade_families_and_widths_are_checked(tmp_path):
    base = [str(tmp_path / "d"), str(tmp_path / "o"), "--seeds", "0"]
    args = qp.parse_args([*base, "--handmade", "w2a2_fl8", "--widths", "36", "--targets", "50"])
    with pytest.raises(SystemExit, match="--search-widths wider needs --targets auto"):
        qp.plan(args, [50.0])
    args.search_widths = "51"
    names = {i["name"]: i for i in qp.plan(args, [50.0])}
    assert names["uniform_w2a2_fl8_c36"]["bits"] == 2 and names["spos_50"]["width"] == 51
    with pytest.raises(SystemExit, match="--handmade"):
        qp.plan(qp.parse_args([*base, "--handmade", "w4a8", "--search-widths", "space"]), [50.0])
    with pytest.raises(SystemExit, match="--search-widths: 2 widths for 1 targets"):
        qp.plan(qp.parse_args([*base, "--targets", "50", "--search-widths", "36,51"]), [50.0])
