"""`qnas search` end to end on a tiny space: run folder, genotype, plots, exact resume after a kill; the
genotype -> `qnas train --arch` -> `qnas eval` / `qnas cost --arch` / `qnas report` round trip; CLI errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_run import run_cli
from test_nas_supernet import tiny_space

from qnas.cli import main
from qnas.nas.derive import DerivedNetwork, read_genotype
from qnas.nas.search import split_images

ROOT = Path(__file__).resolve().parents[1]
# Small enough for milliseconds per step; one thread (tiny shapes gain nothing from two, and on a shared
# machine a second thread waits for a core at every parallel region).
FAST = ["--scale", "2", "--batch-size", "2", "--patch-size", "16", "--quiet"]
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "python")]),
    "OMP_NUM_THREADS": "1",
}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def qnas(capsys, *args):
    """`qnas ARGS` in this process: (exit code, stdout, stderr)."""
    return run_cli(args, capsys)


@pytest.fixture(scope="module")
def space_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("space") / "tiny.json"
    # With the builtin spaces' anchor skip, so that the ship test covers its export.
    p.write_text(json.dumps({**tiny_space(["conv1x1", "conv3x3", "conv3x1_1x3"]), "anchor": "nearest"}))
    return p


@pytest.fixture(scope="module")
def search_run(space_file, tmp_path_factory):
    run = tmp_path_factory.mktemp("search") / "run"
    torch.set_num_threads(1)
    main(
        [
            "search",
            "--space",
            str(space_file),
            *FAST,
            "--steps",
            "6",
            "--checkpoint-every",
            "3",
            "--penalty",
            "0.1",
            "--out",
            str(run),
        ]
    )
    return run


def test_search_run_folder(search_run):
    names = {p.name for p in search_run.iterdir()}
    assert {
        "config.json",
        "metrics.jsonl",
        "checkpoint.pt",
        "genotype.json",
        "alphas.png",
        "search.png",
    } <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    for png in ("alphas.png", "search.png"):
        assert (search_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recs = [json.loads(line) for line in (search_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 7))
    assert {
        "loss",
        "loss_alpha",
        "entropy",
        "entropy_coef",
        "penalty",
        "expected_bitops",
        "step_time_s",
    } <= set(recs[-1])
    assert recs[0]["penalty"] == pytest.approx(0.1, rel=0.05)  # normalized by the initial expected BitOps
    g = json.loads((search_run / "genotype.json").read_text())
    assert g["format"] == "qnas-genotype/1" and g["scale"] == 2 and g["space"]["name"] == "tiny"
    assert set(g["layers"]) == {"head", "block.a", "block.skip", "block.b", "up"}
    for choice in g["layers"].values():
        assert choice["w_bits"] == choice["a_bits"] in (4, 8)  # tied by default
    assert g["cost"]["lr_size"] == [180, 320] and g["cost"]["bitops"] > 0
    assert g["search"]["mode"] == "noise" and g["search"]["steps"] == 6


def test_genotype_derives_a_network_whose_cost_matches(search_run, capsys):
    g = read_genotype(search_run)  # a run folder is accepted for its genotype.json
    net = DerivedNetwork(g)
    assert net(torch.rand(1, 3, 8, 8)).shape == (1, 3, 16, 16)
    code, out, err = qnas(
        capsys, "cost", "--arch", search_run / "genotype.json", "--lr-size", "180x320", "--format", "json"
    )
    assert code == 0, err
    assert json.loads(out)["bitops"] == g["cost"]["bitops"]


def test_search_resume_after_kill_equals_uninterrupted(space_file, tmp_path, capsys):
    args = [
        "search",
        "--space",
        space_file,
        *FAST,
        "--steps",
        "14",
        "--checkpoint-every",
        "2",
        "--mode",
        "quant",
    ]
    assert qnas(capsys, *args, "--out", tmp_path / "a")[0] == 0
    killed = tmp_path / "b"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qnas", *map(str, args), "--out", str(killed)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        m = killed / "metrics.jsonl"
        if m.exists() and m.read_text().count("\n") >= 5:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "genotype.json").exists(), "the search finished before it could be killed"
    code, _, err = qnas(capsys, *args, "--out", killed, "--resume")
    assert code == 0, err
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ga, gb = (json.loads((r / "genotype.json").read_text()) for r in (tmp_path / "a", killed))
    assert ga["layers"] == gb["layers"]
    logged = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 15))


def test_single_pass_quant_naive_no_adq(space_file, tmp_path, capsys):
    """The flags act on the search, not only on its record: without ADQ the supernet has no ADQ block;
    with untied bits the alphas of mixed weight/activation bits (w2a8, ...) learn, tied they keep their
    initial values (no gradient reaches them)."""
    from qnas.nas.search import SearchOptions, build_supernet

    args = ["search", "--space", space_file, *FAST, "--steps", "2", "--single-pass", "--mode", "quant"]
    args += ["--impl", "naive", "--bits", "2,4,8"]
    code, out, err = qnas(capsys, *args, "--no-adq", "--untie-bits", "--out", tmp_path / "r")
    assert code == 0, err
    g = json.loads((tmp_path / "r" / "genotype.json").read_text())
    assert g["search"]["adq"] is False and g["search"]["single_pass"] and g["search"]["bits"] == [2, 4, 8]
    rec = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "loss_alpha" not in rec and "entropy" in rec
    code, out, err = qnas(capsys, *args, "--out", tmp_path / "tied")
    assert code == 0, err
    untied, tied = (
        torch.load(tmp_path / r / "checkpoint.pt", weights_only=True)["model"] for r in ("r", "tied")
    )
    assert not any(".adq." in k for k in untied) and any(".adq." in k for k in tied)
    off_diagonal = ~torch.eye(3, dtype=torch.bool)
    for state, tie in ((untied, False), (tied, True)):
        torch.manual_seed(0)  # as the search builds its supernet
        opts = SearchOptions(
            space=str(space_file), scale=2, bits=[2, 4, 8], mode="quant", impl="naive", tie_bits=tie, adq=tie
        )
        init = build_supernet(opts).state_dict()["alphas.head"][:, off_diagonal]
        moved = state["alphas.head"][:, off_diagonal] != init
        assert moved.all() if not tie else not moved.any(), tie


def test_bits_only_search_and_uniform_genotype(space_file, tmp_path, capsys):
    code, _, err = qnas(
        capsys,
        "search",
        "--space",
        space_file,
        *FAST,
        "--steps",
        "1",
        "--ops",
        "conv3x3",
        "--out",
        tmp_path / "r",
    )
    assert code == 0, err
    g = json.loads((tmp_path / "r" / "genotype.json").read_text())
    assert {c["op"] for s, c in g["layers"].items() if s != "block.skip"} == {"conv3x3"}
    code, out, err = qnas(
        capsys,
        "genotype",
        "--space",
        "basic",
        "--scale",
        "4",
        "--op",
        "conv3x3",
        "--bits",
        "4",
        "--out",
        tmp_path / "u4.json",
    )
    assert code == 0, err
    u4 = read_genotype(tmp_path / "u4.json")
    assert {(c["op"], c["w_bits"], c["a_bits"]) for c in u4["layers"].values()} == {("conv3x3", 4, 4)}
    assert "GBitOps" in out


def test_train_eval_report_round_trip(search_run, tmp_path, capsys):
    train = [
        "train",
        "--arch",
        search_run / "genotype.json",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--patch-size",
        "16",
        "--quiet",
    ]
    code, _, err = qnas(capsys, *train, "--out", tmp_path / "searched")
    assert code == 0, err
    blob = torch.load(tmp_path / "searched" / "model.pt", weights_only=True)
    assert blob["network"]["kind"] == "genotype" and blob["network"]["act_quantizer"] == "hwgq"
    code, out, err = qnas(capsys, "eval", "--checkpoint", tmp_path / "searched", "--format", "json")
    assert code == 0, err
    res = json.loads(out)
    assert res["scale"] == 2 and len(res["images"]) == 5

    g = tmp_path / "u8.json"
    code, _, err = qnas(
        capsys,
        "genotype",
        "--space",
        search_run / "genotype.json",
        "--scale",
        "2",
        "--op",
        "conv3x3",
        "--bits",
        "8",
        "--out",
        g,
    )
    assert code == 2 and "qnas-space/1" in err  # a genotype is not a space file
    space = tmp_path / "space.json"
    space.write_text(json.dumps(json.loads((search_run / "genotype.json").read_text())["space"]))
    code, _, err = qnas(
        capsys, "genotype", "--space", space, "--scale", "2", "--op", "conv3x3", "--bits", "8", "--out", g
    )
    assert code == 0, err
    code, _, err = qnas(
        capsys,
        "train",
        "--arch",
        g,
        "--act-quantizer",
        "lsq",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--patch-size",
        "16",
        "--quiet",
        "--out",
        tmp_path / "u8",
    )
    assert code == 0, err

    report = tmp_path / "report"
    code, out, err = qnas(
        capsys, "report", "bicubic", tmp_path / "searched", tmp_path / "u8", "--out", report, "--quiet"
    )
    assert code == 0, err
    assert "| bicubic |" in out and "| searched" in out
    r = json.loads((report / "report.json").read_text())
    assert [m["name"] for m in r["models"]] == ["bicubic", "searched", "u8"]
    for m in r["models"]:
        assert {"psnr", "ssim", "bitops"} <= set(m) and 5 < m["psnr"] < 60
    assert r["models"][0]["bitops"] is None and r["models"][2]["bitops"] > r["models"][1]["bitops"] > 0
    assert (report / "pareto.png").read_bytes()[:4] == b"\x89PNG" and (report / "report.md").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["search", "--space", "nope", "--out", "{tmp}/r"], "unknown search space 'nope'"),
        (["search", "--ops", "conv9x9", "--out", "{tmp}/r"], "conv9x9"),
        (["search", "--bits", "4,9", "--out", "{tmp}/r"], "--bits"),
        (["search", "--steps", "0", "--out", "{tmp}/r"], "--steps"),
        (["search", "--scale", "5", "--out", "{tmp}/r"], "scale 5"),
        (["train", "--arch", "{tmp}/missing.json", "--out", "{tmp}/r"], "missing.json"),
        (["train", "--arch", "{tmp}/bad.json", "--out", "{tmp}/r"], "bad.json"),
        (["train", "--arch", "{tmp}/wrong.json", "--out", "{tmp}/r"], "not a QuantNAS genotype"),
        (["train", "--arch", "{tmp}/nolayer.json", "--out", "{tmp}/r"], "no choice for layer(s) head"),
        (["cost", "--arch", "{tmp}/nolayer.json", "--lr-size", "8"], "no choice for layer(s) head"),
        (["report", "{tmp}", "--out", "{tmp}/rep"], "model.pt"),
        (["report", "bicubic", "--out", "{tmp}/rep"], "trained RUN"),
    ],
)
def test_cli_errors_are_one_line(args, needle, tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{oops")
    (tmp_path / "wrong.json").write_text(json.dumps({"format": "something-else"}))
    g = {"format": "qnas-genotype/1", "space": tiny_space(["conv3x3"]), "scale": 2, "layers": {}}
    (tmp_path / "nolayer.json").write_text(json.dumps(g))
    extra = [] if args[0] == "cost" else ["--quiet"]
    code, _, err = qnas(capsys, *[a.format(tmp=tmp_path) for a in args], *extra)
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_split_images_interleaves():
    assert split_images(10, 0.5) == ([0, 2, 4, 6, 8], [1, 3, 5, 7, 9])
    w, a = split_images(2, 0.5)
    assert w and a and not set(w) & set(a)
    w, a = split_images(7, 0.3)
    assert sorted(w + a) == list(range(7)) and len(a) == 2


def test_searched_network_ships(search_run, tmp_path, capsys):
    """The user's main path: search -> retrain the genotype -> export packed and ONNX -> upscale. The derived
    network is fully quantized (skips and output included), so both exported forms run, agree with each
    other as closely as they do for FQSR, and follow the trained network."""
    import numpy as np
    from PIL import Image

    from qnas.data.images import load_image
    from qnas.deploy import PackedModel
    from qnas.export import check_image
    from qnas.export.onnx import ort_session
    from qnas.metrics import to_uint8_image
    from qnas.runs.network import load_network

    run = tmp_path / "searched"
    code, _, err = qnas(
        capsys, "train", "--arch", search_run / "genotype.json", "--steps", "3", "--batch-size", "2",
        "--patch-size", "16", "--quiet", "--out", run,
    )  # fmt: skip
    assert code == 0, err
    code, out, err = qnas(capsys, "inspect", run, "--strict")
    assert code == 0, err
    assert "no float operation between input and output" in out
    for fmt, name in (("packed", "m.qnp"), ("onnx", "m.onnx")):
        code, out, err = qnas(capsys, "export", run, "--format", fmt, "--out", tmp_path / name)
        assert code == 0, err
        assert "check:" in out
    packed = PackedModel.load(tmp_path / "m.qnp")
    x = check_image(32)
    sess = ort_session(tmp_path / "m.onnx")
    via_onnx = torch.from_numpy(np.asarray(sess.run(None, {"input": x.numpy()})[0]))
    via_packed = packed(x)
    # onnxruntime computes the exported graph exactly (ort_session: basic level, ORT_INEXACT_OPTIMIZERS off).
    assert torch.equal(via_packed, via_onnx)
    net, _ = load_network(run)
    with torch.inference_mode():
        assert torch.equal(via_packed, net(x).clamp(0, 1))  # trained, packed and onnxruntime: bit for bit
    src = tmp_path / "in.png"
    Image.fromarray(to_uint8_image(x[0])).save(src)
    code, _, err = qnas(
        capsys, "upscale", "--model", tmp_path / "m.qnp", src, tmp_path / "out.png", "--quiet"
    )
    assert code == 0, err
    assert np.array_equal(load_image(tmp_path / "out.png"), to_uint8_image(via_packed[0]))


def test_adq_network_trains_but_does_not_export(search_run, tmp_path, capsys):
    run = tmp_path / "adq"
    code, _, err = qnas(
        capsys, "train", "--arch", search_run / "genotype.json", "--adq", "--steps", "1", "--batch-size", "2",
        "--patch-size", "16", "--quiet", "--out", run,
    )  # fmt: skip
    assert code == 0, err
    code, _, err = qnas(capsys, "export", run, "--format", "packed", "--out", tmp_path / "m.qnp")
    assert code == 2 and "ADQ" in err and len(err.strip().splitlines()) == 1


def test_search_logs_the_gradient_health_of_every_slot(search_run):
    recs = [json.loads(line) for line in (search_run / "metrics.jsonl").read_text().splitlines()]
    slots = ["head", "block.a", "block.skip", "block.b", "up"]
    for r in recs:
        for s in slots:
            assert r[f"grad_loss/{s}"] >= 0 and r[f"grad_reg/{s}"] >= 0
    # The cost term acts on every slot whose candidates differ in cost, the loss on every slot.
    assert all(recs[-1][f"grad_reg/{s}"] > 0 and recs[-1][f"grad_loss/{s}"] > 0 for s in slots)
    assert (search_run / "health.png").read_bytes()[:4] == b"\x89PNG"


def test_target_search_moves_the_expected_bitops_to_the_target(space_file, tmp_path, capsys):
    """Far above a target, the cost term dominates and the expected BitOps fall every architecture step;
    the genotype records the target; the CLI prints the per-slot health summary."""
    from qnas.nas.search import SearchOptions, build_supernet

    opts = SearchOptions(space=str(space_file), scale=2, lr_size=[16, 16])
    with torch.no_grad():
        e0 = float(build_supernet(opts).expected_bitops_per_pixel(build_supernet(opts).probs())) * 256
    code, out, err = qnas(
        capsys, "search", "--space", space_file, *FAST, "--steps", "8", "--lr-size", "16x16",
        "--alpha-lr", "0.05", "--target-gbitops", str(e0 / 4 / 1e9), "--out", tmp_path / "r",
    )  # fmt: skip
    assert code == 0, err
    assert "|loss| / |regularizer|" in out and "block.a" in out
    recs = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    e = [r["expected_bitops"] for r in recs]
    assert all(b < a for a, b in zip(e, e[1:], strict=False)) and e[-1] < 0.8 * e0
    assert recs[-1]["temperature"] == pytest.approx(0.1) and recs[0]["temperature"] == 1.0
    g = json.loads((tmp_path / "r" / "genotype.json").read_text())
    assert g["search"]["target_gbitops"] == pytest.approx(e0 / 4 / 1e9)
    code, _, err = qnas(
        capsys, "search", "--space", space_file, *FAST, "--target-gbitops", "1", "--penalty", "0.1",
        "--out", tmp_path / "both",
    )  # fmt: skip
    assert code == 2 and "alternatives" in err


def test_no_anchor_search_and_genotype_use_the_papers_space(tmp_path, capsys):
    space = tmp_path / "anchored.json"
    space.write_text(json.dumps({**tiny_space(["conv1x1", "conv3x3"]), "anchor": "nearest"}))
    code, _, err = qnas(
        capsys, "search", "--space", space, *FAST, "--steps", "1", "--no-anchor", "--out", tmp_path / "r"
    )
    assert code == 0, err
    assert read_genotype(tmp_path / "r")["space"]["anchor"] is None
    for extra, anchor in (([], "nearest"), (["--no-anchor"], None)):
        out = tmp_path / f"u{len(extra)}.json"
        code, _, err = qnas(
            capsys, "genotype", "--space", space, "--scale", "2", "--op", "conv3x3", "--bits", "4",
            *extra, "--out", out,
        )  # fmt: skip
        assert code == 0, err
        assert read_genotype(out)["space"]["anchor"] == anchor


def test_random_genotype_lands_at_the_target(capsys, tmp_path):
    """`qnas genotype --random`: the cost the derived network counts (qnas.cost, not the search's own
    tables) is within 5% of the target, the same seed gives the same genotype and others differ; an
    unreachable target is a one-line error with the space's range."""
    target = 120.0
    layers = []
    for seed in (0, 0, 1, 2):
        out = tmp_path / f"r{seed}_{len(layers)}.json"
        code, text, err = qnas(
            capsys, "genotype", "--space", "basic", "--scale", "4", "--random", "--target-gbitops",
            str(target), "--seed", str(seed), "--out", out,
        )  # fmt: skip
        assert code == 0, err
        g = read_genotype(out)
        assert abs(g["cost"]["bitops"] / 1e9 - target) <= 0.05 * target
        assert g["random"] == {"seed": seed, "target_gbitops": target, "tolerance": 0.05}
        assert {c["w_bits"] for c in g["layers"].values()} <= {4, 8}
        layers.append(g["layers"])
        assert "random (seed" in text
    assert layers[0] == layers[1] and layers[0] != layers[2] and layers[2] != layers[3]
    code, _, err = qnas(
        capsys, "genotype", "--scale", "4", "--random", "--target-gbitops", "1", "--out", tmp_path / "x.json"
    )
    assert (
        code == 2 and "--target-gbitops 1" in err and "GBitOps" in err and len(err.strip().splitlines()) == 1
    )
    code, _, err = qnas(capsys, "genotype", "--scale", "4", "--random", "--out", tmp_path / "x.json")
    assert code == 2 and "--target-gbitops" in err


def test_spos_search_chooses_by_heldout_loss_within_the_target(space_file, tmp_path, capsys):
    """--method spos: single-path weight steps, then every entry of every slot scored on the held-out
    split; the genotype is the lowest total score within the target, and resume gives the same one."""
    from qnas.nas.derive import genotype_cost

    args = [
        "search",
        "--space",
        space_file,
        *FAST,
        "--steps",
        "8",
        "--method",
        "spos",
        "--checkpoint-every",
        "4",
    ]
    args += [
        "--select-contexts",
        "2",
        "--select-batches",
        "1",
        "--target-gbitops",
        "0.03",
        "--lr-size",
        "64x64",
    ]
    code, _, err = qnas(capsys, *args, "--out", tmp_path / "r")
    assert code == 0, err
    g = json.loads((tmp_path / "r" / "genotype.json").read_text())
    sel = json.loads((tmp_path / "r" / "selection.json").read_text())
    assert g["search"]["method"] == "spos" and g["search"]["argmax_bitops"] is None
    assert genotype_cost(g, (64, 64))["bitops"] <= 0.03e9
    assert set(sel["scores"]) == set(g["layers"])
    for slot, choice in g["layers"].items():
        label = f"{choice['op']}@w{choice['w_bits']}a{choice['a_bits']}"
        assert sel["scores"][slot][label] == pytest.approx(choice["heldout_l1"], abs=1e-6)
        assert choice["excess_l1"] == pytest.approx(
            choice["heldout_l1"] - min(sel["scores"][slot].values()), abs=2e-6
        )
    assert not (tmp_path / "r" / "alphas.png").exists()
    # Without a target every slot takes its lowest-scoring entry.
    code, _, err = qnas(capsys, *args[:-4], "--lr-size", "64x64", "--out", tmp_path / "free")
    assert code == 0, err
    free = json.loads((tmp_path / "free" / "genotype.json").read_text())
    assert all(c["excess_l1"] == 0 for c in free["layers"].values())


def test_spos_evolution_searches_whole_genotypes_within_the_target(space_file, tmp_path, capsys):
    """--select evolution: whole genotypes bred from the additive pick, every one within the target;
    the chosen one scores no worse than the additive pick on the final batches, and the same seed gives
    the same genotype."""
    from qnas.nas.derive import genotype_cost

    args = ["search", "--space", space_file, *FAST, "--steps", "6", "--method", "spos"]
    args += ["--select-contexts", "2", "--select-batches", "1", "--target-gbitops", "0.03"]
    args += ["--lr-size", "64x64", "--select", "evolution", "--select-population", "6"]
    args += ["--select-generations", "3"]
    for name in ("a", "b"):
        code, _, err = qnas(capsys, *args, "--out", tmp_path / name)
        assert code == 0, err
    g = json.loads((tmp_path / "a" / "genotype.json").read_text())
    evo = g["search"]["evolution"]
    assert g["search"]["select"] == "evolution" and len(evo["best_fitness_per_generation"]) == 3
    assert evo["evaluated"] >= 4  # every feasible genotype of this tiny space
    assert evo["chosen"]["check"] <= evo["additive_pick"]["check"]
    assert genotype_cost(g, (64, 64))["bitops"] <= 0.03e9
    assert g["layers"] == json.loads((tmp_path / "b" / "genotype.json").read_text())["layers"]
    code, _, err = qnas(
        capsys, "search", "--space", space_file, *FAST, "--select", "evolution", "--out", tmp_path / "c"
    )
    assert code == 2 and "--method spos" in err, err


@pytest.mark.parametrize(
    "extra, needle",
    [(["--single-pass"], "--single-pass"), (["--penalty", "0.1"], "--penalty")],
)
def test_spos_refuses_options_it_does_not_use(extra, needle, space_file, tmp_path, capsys):
    code, _, err = qnas(
        capsys, "search", "--space", space_file, *FAST, "--method", "spos", *extra, "--out", tmp_path / "r"
    )
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_fix_bits_searches_the_ops_at_a_first_search_bits(space_file, tmp_path, capsys):
    """--fix-bits GENOTYPE: a second stage whose every layer keeps the first search's bit-widths and
    chooses only its op; a genotype of another space is refused in one line naming the option."""
    base = ["search", "--space", space_file, *FAST, "--steps", "4", "--method", "spos", "--bits", "2,4,8"]
    base += ["--select-contexts", "1", "--select-batches", "1", "--lr-size", "64x64"]
    code, _, err = qnas(
        capsys, *base, "--ops", "conv3x3", "--target-gbitops", "0.02", "--out", tmp_path / "bits"
    )
    assert code == 0, err
    bits = read_genotype(tmp_path / "bits")["layers"]
    code, _, err = qnas(capsys, *base, "--fix-bits", tmp_path / "bits", "--out", tmp_path / "ops")
    assert code == 0, err
    g = read_genotype(tmp_path / "ops")
    assert {s: (c["w_bits"], c["a_bits"]) for s, c in g["layers"].items()} == {
        s: (c["w_bits"], c["a_bits"]) for s, c in bits.items()
    }
    sel = json.loads((tmp_path / "ops" / "selection.json").read_text())
    for slot, scores in sel["scores"].items():  # every op scored, at the fixed bits only
        assert all(k.endswith(f"@w{bits[slot]['w_bits']}a{bits[slot]['a_bits']}") for k in scores)
    assert max(len(scores) for scores in sel["scores"].values()) == 3
    config = json.loads((tmp_path / "ops" / "config.json").read_text())
    assert config["fixed_bits"] == {s: [c["w_bits"], c["a_bits"]] for s, c in bits.items()}
    from qnas.nas.derive import uniform_genotype

    for name, bits_ in (("basic", 4), ("tiny3", 3)):  # another space's layers; bits not searched here
        space = "basic" if name == "basic" else json.loads(space_file.read_text())
        (tmp_path / f"{name}.json").write_text(json.dumps(uniform_genotype(space, 2, "conv3x3", bits_)))
        code, _, err = qnas(capsys, *base, "--fix-bits", tmp_path / f"{name}.json", "--out", tmp_path / name)
        assert code == 2 and "--fix-bits" in err and len(err.strip().splitlines()) == 1, err
