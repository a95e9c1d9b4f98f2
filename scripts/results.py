"""Rebuilds every run of docs/RESULTS.md on the standard SR images and rewrites its tables.

    python scripts/results.py DATA_DIR [--scale 4] [--runs runs/xSCALE] [--only NAME,...]
                              [--lock PATH] [--chunk-minutes 14] [--no-table] [--dry-run]

DATA_DIR holds the standard image sets as plain folders of HR images (docs/RESULTS.md says where
they come from): SunHays80 (training), Set5, Set14 and BSD68 (test). The script splits SunHays80
into RUNS/data/train (64 images) and RUNS/data/holdout (every 5th image by name, 16), folders of
symbolic links: every choice (fine-tune recipe, FQSR additions, which single strategies DQSS is
compared with over several draws) is made on the hold-out; the test sets are only reported.

--scale 4 (default) or 2 picks the upscaling factor; x2 runs use the x4 recipes with HR patches
half as large (the same LR patches), skip the FQSR ablation (the x4 hold-out's recipes) and run DQSS
at 4 bits only; their tables go to the x2 blocks of docs/RESULTS.md.

Each row is one `qnas` command (the full-precision edsr-baseline run first, everything else
starts from it), then `qnas eval --checkpoint RUN --data SET` per evaluation set and `qnas cost`
for BitOps. A row whose RUN/model.pt exists is not run again; evaluations and cost are cached in
the run (RUN/eval_<set>.json, RUN/cost.json), so the script continues where it stopped. Training
runs are resumable: a `qnas train` longer than --chunk-minutes is stopped (SIGINT) and continued
with --resume, so a long row never holds the machine (or the --lock) for long. Every command's
CPU time (user + system of the child process) is summed into RUN/cpu_s, its wall time into
RUN/wall_s: CPU time is the figure that does not depend on what else the machine runs.

With --lock PATH, every command holds an flock on PATH (`flock PATH CMD` takes the same lock),
for machines shared by several users who agree to run heavy jobs one at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCALES = (2, 4)
TEST_SETS = ("Set5", "Set14", "BSD68")
TRAIN_SET = "SunHays80"
HOLDOUT_EVERY = 5  # every 5th training image (sorted by name) is held out for choosing settings
# Published numbers per scale (EDSR-baseline trained on DIV2K; DDTB, Zhong et al., ECCV 2022, which
# keeps the first and last layers in full precision). DDTB reports B100; BSD68 is its 68-image subset.
PUBLISHED = {
    4: {
        "fp": {"Set5": 32.10, "Set14": 28.58, "BSD68": 27.56},
        "ddtb": {
            4: {"Set5": 31.85, "Set14": 28.39, "BSD68": 27.44},
            2: {"Set5": 30.97, "Set14": 27.87, "BSD68": 27.09},
        },
    },
    2: {
        "fp": {"Set5": 37.99, "Set14": 33.57, "BSD68": 32.16},
        "ddtb": {4: {"Set5": 37.72, "Set14": 33.35, "BSD68": 32.01}},
    },
}
# x2 runs skip the FQSR ablation: their FQSR rows use the recipes the x4 hold-out chose (at 2 bits
# the 900-step variant of the chosen 2700-step recipe, a third of its CPU time).
X2_RECIPES = {4: "kd_tail8_long", 2: "kd_edge8_long"}


def split_training_images(data_dir: Path, runs: Path) -> dict[str, Path]:
    """RUNS/data/train and RUNS/data/holdout: symbolic links to the SunHays80 images, every
    HOLDOUT_EVERY-th (sorted by name) in the hold-out. Recreated when missing; idempotent."""
    src = data_dir / TRAIN_SET
    images = sorted(
        p for p in src.iterdir() if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp")
    )
    if len(images) < 2 * HOLDOUT_EVERY:
        raise SystemExit(f"{src}: expected the {TRAIN_SET} training images, found {len(images)}")
    out = {}
    for part in ("train", "holdout"):
        folder = runs / "data" / part
        folder.mkdir(parents=True, exist_ok=True)
        chosen = [p for i, p in enumerate(images) if (i % HOLDOUT_EVERY == 0) == (part == "holdout")]
        for p in chosen:
            link = folder / p.name
            if not link.is_symlink():
                link.symlink_to(p.resolve())
        out[part] = folder
    return out


# One fine-tune recipe for every fine-tuned row (300 steps of 8 HR patches of 64 pixels at x4, Adam,
# cosine decay), and the same at 900 and 2700 steps: the FQSR ablation's rows differ from each other in
# one thing each, and the table's FQSR rows are the ablation's best row at 3 seeds. Filled by set_scale.
FT: list[str] = []
FT_LONG: list[str] = []
FT_LONGER: list[str] = []
FT_COMMON = ["--data", "@data/train", "--checkpoint-every", "50"]
# The FQSR options the ablation varies, stated explicitly in every ablation command so that a change
# of the defaults never changes what a row measured.
FQSR_PLAIN = {"distill_weight": 0, "distill_feature_weight": 0, "tail_bits": None}
# Distillation, an 8-bit last input and 8-bit first/last weights: the 2-bit rows' options.
KD_EDGE8 = {"distill_weight": 1, "tail_bits": 8, "edge_weight_bits": 8}
ABLATION = [  # (suffix, label, options over FQSR_PLAIN, fine-tune recipe)
    ("plain", "FQSR as before: learnable clipping, MSE warm-up, calibration loss", {}, FT),
    ("kd", "+ L1 to the FP output (distill_weight 1)", {"distill_weight": 1}, FT),
    (
        "kdf",
        "+ L1 to the FP output and feature distillation at the skips (weights 1, 1)",
        {"distill_weight": 1, "distill_feature_weight": 1},
        FT,
    ),
    ("tail8", "+ 8-bit input of the last convolution", {"tail_bits": 8}, FT),
    (
        "kd_tail8",
        "+ L1 to the FP output + 8-bit last input",
        {"distill_weight": 1, "tail_bits": 8},
        FT,
    ),
    (
        "kd_edge8",
        "+ L1 to the FP output + 8-bit last input + 8-bit first/last weights",
        KD_EDGE8,
        FT,
    ),
    (
        "kd_tail8_long",
        "+ L1 to the FP output + 8-bit last input, 900 steps",
        {"distill_weight": 1, "tail_bits": 8},
        FT_LONG,
    ),
    (
        "kd_edge8_long",
        "+ L1 to the FP output + 8-bit last input + 8-bit first/last weights, 900 steps",
        KD_EDGE8,
        FT_LONG,
    ),
    (
        "kd_edge8_longer",
        "+ L1 to the FP output + 8-bit last input + 8-bit first/last weights, 2700 steps",
        KD_EDGE8,
        FT_LONGER,
    ),
]
ABLATION_BITS = (4, 2)
# Suffixes run at 2 bits only (8-bit first/last weights are a 2-bit remedy).
ABLATION_2BIT_ONLY = ("kd_edge8", "kd_edge8_long", "kd_edge8_longer")
# The table's FQSR rows: the ablation's kd_tail8 (seed 0) and the same command at seeds 1, 2.
TABLE_FQSR = "kd_tail8"
FQSR_SEEDS = (0, 1, 2)
# PTQ / DQSS: one calibration set per draw (--seed): 12 batches of 4 patches of 96x96 HR pixels at x4
# (48 patches from the 64 training images), 60 steps, the same for every strategy list; DQSS QAT:
# 600 steps of 8 patches of 64 pixels at x4. Filled by set_scale.
PTQ: list[str] = []
QAT: list[str] = []
SINGLE = ("lsq", "pact", "dorefa", "minmax", "percentile", "mse", "aciq")  # hwgq: activations only
# A fixed strategy with the stronger grids: per-channel weight steps and asymmetric activations.
FIXED_STRONG = "mse_pc,mse_asym"
DQSS_BITS = (4, 3, 2)
DRAWS = (0, 1, 2, 3, 4)


def set_scale(scale: int) -> None:
    """Sets the module's commands and published figures for `scale` (main's --scale; x4 at import).

    The x4 recipes' HR patch sizes are scaled by scale/4 so that every x2 run sees the same LR
    patches, and costs about the same CPU per step, as its x4 counterpart. The recipe lists are
    rewritten in place: ABLATION holds them."""
    global SCALE, LR_SIZE, PUBLISHED_FP, PUBLISHED_DDTB, FP, DQSS_BITS, RELEASE_FP, RELEASE_FQSR, BLOCK_SUFFIX
    SCALE = scale
    LR_SIZE = f"{720 // scale}x{1280 // scale}"  # BitOps for a 720x1280 output

    def patch(x4_patch: int) -> str:
        return str(x4_patch * scale // 4)

    PUBLISHED_FP, PUBLISHED_DDTB = PUBLISHED[scale]["fp"], PUBLISHED[scale]["ddtb"]
    FP = [
        "train", "--model", "edsr-baseline", "--scale", str(scale), "--data", "@data/train", "--steps", "3000",
        "--batch-size", "8", "--patch-size", patch(96), "--lr", "5e-4", "--checkpoint-every", "50",
    ]  # fmt: skip
    ft = ["--batch-size", "8", "--patch-size", patch(64), "--lr", "2e-4"]
    FT[:], FT_LONG[:], FT_LONGER[:] = (["--steps", steps, *ft] for steps in ("300", "900", "2700"))
    PTQ[:] = ["--steps", "60", "--calib-batches", "12", "--batch-size", "4", "--patch-size", patch(96)]
    PTQ.extend(["--data", "@data/train"])
    QAT[:] = ["--steps", "600", "--batch-size", "8", "--patch-size", patch(64), "--data", "@data/train"]
    # x2: 4 bits only; an x2 evaluation costs 4x an x4 one, and every draw row is evaluated on the test sets
    DQSS_BITS = (4, 3, 2) if scale == 4 else (4,)
    RELEASE_FP, RELEASE_FQSR = f"edsr-baseline-x{scale}-fp.pt", f"edsr-baseline-x{scale}-fqsr4.qnp"
    BLOCK_SUFFIX = "" if scale == 4 else f"-x{scale}"  # docs/RESULTS.md's generated blocks


def fqsr_cmd(bits: int, options: dict, recipe: list[str], seed: int = 0) -> list[str]:
    cmd = ["train", "--init", "@fp", "--quant", "fqsr", "--bits", str(bits), *recipe, *FT_COMMON]
    if options:
        cmd += ["--quant-options", json.dumps(options, sort_keys=True)]
    return cmd + (["--seed", str(seed)] if seed else [])


def ptq_cmd(quantizers: str, bits: int, seed: int, *extra: str) -> list[str]:
    cmd = ["strategy", "--checkpoint", "@fp", "--quantizers", quantizers, "--bits", str(bits), *PTQ, *extra]
    return cmd + (["--seed", str(seed)] if seed else [])


def ptq_name(quantizers: str, bits: int, seed: int) -> str:
    short = {"all": "dqss", "extended": "dqssx", FIXED_STRONG: "msepc_mseasym"}.get(quantizers, quantizers)
    return f"ptq{bits}_{short}" + (f"_seed{seed}" if seed else "")


def runs_list() -> list[dict]:
    """Every run, in order: name, the qnas command (None for bicubic), whether it is resumable, and
    whether it is evaluated on the test sets too ("test"; the hold-out always)."""
    out = [
        {"name": "bicubic", "cmd": None, "test": True},
        {"name": "fp", "cmd": FP, "resumable": True, "test": True},
    ]
    for bits in ABLATION_BITS if SCALE == 4 else ():
        rows = [
            {
                "name": f"fqsr{bits}_{suffix}",
                "cmd": fqsr_cmd(bits, {**FQSR_PLAIN, **options}, recipe),
                "resumable": True,
            }
            for suffix, _, options, recipe in ABLATION
            if bits == 2 or suffix not in ABLATION_2BIT_ONLY
        ]
        rows[-1]["ablation_done"] = bits  # then the table's recipe is chosen (main, table_fqsr_runs)
        out += rows
    if SCALE != 4:  # no ablation: the recipes x4's hold-out chose
        for bits in ABLATION_BITS:
            CHOSEN_RECIPE[bits] = X2_RECIPES[bits]
            out += table_fqsr_runs(bits, X2_RECIPES[bits])
    table_options = {**FQSR_PLAIN, **dict((a[0], a[2]) for a in ABLATION)[TABLE_FQSR]}
    out.append({"name": "release", "cmd": None, "release": True})
    out.append({"name": "fqsr8", "cmd": fqsr_cmd(8, table_options, FT), "resumable": True, "test": True})
    out.append(
        {
            "name": "uniform4",
            "cmd": ["train", "--init", "@fp", "--quant", "uniform", "--bits", "4", *FT, *FT_COMMON],
            "resumable": True,
            "test": True,
        }
    )
    for bits in DQSS_BITS:
        for q in (*SINGLE, FIXED_STRONG):
            out.append({"name": ptq_name(q, bits, 0), "cmd": ptq_cmd(q, bits, 0), "test": bits == 4})
        out.append({"name": ptq_name("all", bits, 0), "cmd": ptq_cmd("all", bits, 0), "test": bits == 4})
        for seed in DRAWS:
            out.append(
                {
                    "name": ptq_name("extended", bits, seed),
                    "cmd": ptq_cmd("extended", bits, seed),
                    "test": True,
                    "holdout": seed == 0,
                }
            )
    out.append(
        {
            "name": "qat4_dqssx",
            "cmd": [
                "strategy",
                "--checkpoint",
                "@fp",
                "--quantizers",
                "extended",
                "--bits",
                "4",
                "--mode",
                "qat",
                *QAT,
            ],
            "test": True,
        }
    )
    return out


def draw_runs(bits: int, best: list[str]) -> list[dict]:
    """The further calibration draws of the single strategies `best` (chosen on the hold-out at
    draw 0, best_singles), evaluated on the test sets like DQSS's draws."""
    out = []
    for q in best:
        for seed in DRAWS:
            out.append(
                {
                    "name": ptq_name(q, bits, seed),
                    "cmd": ptq_cmd(q, bits, seed),
                    "test": True,
                    "holdout": seed == 0,
                }
            )
    return out


def best_singles(results: dict[str, dict], bits: int, n: int = 1) -> list[str]:
    """The `n` single strategies (SINGLE and FIXED_STRONG) with the highest hold-out PSNR at draw 0:
    the ones DQSS is compared with over the calibration draws."""
    have = [q for q in (*SINGLE, FIXED_STRONG) if ptq_name(q, bits, 0) in results]
    return sorted(have, key=lambda q: -results[ptq_name(q, bits, 0)]["sets"]["holdout"]["psnr"])[:n]


#: The table's FQSR recipe per bit-width: the ablation row with the best hold-out PSNR (best_recipe),
#: set by main once that bit-width's ablation is measured; TABLE_FQSR until then.
CHOSEN_RECIPE: dict[int, str] = {}


def fqsr_name(bits: int, seed: int) -> str:
    return f"fqsr{bits}_{CHOSEN_RECIPE.get(bits, TABLE_FQSR)}" + (f"_seed{seed}" if seed else "")


def best_recipe(results: dict[str, dict], bits: int) -> str:
    """The ablation suffix with the highest hold-out PSNR at `bits` (TABLE_FQSR when none is measured):
    the recipe is chosen on the hold-out, never on the test sets."""
    have = [a[0] for a in ABLATION if "holdout" in results.get(f"fqsr{bits}_{a[0]}", {}).get("sets", {})]
    if not have:
        return TABLE_FQSR
    return max(have, key=lambda suffix: results[f"fqsr{bits}_{suffix}"]["sets"]["holdout"]["psnr"])


def table_fqsr_runs(bits: int, suffix: str) -> list[dict]:
    """The table's FQSR rows at `bits`: the ablation row `suffix` (seed 0), evaluated on the test sets
    too, and the same command at the other FQSR_SEEDS."""
    _, _, options, recipe = next(a for a in ABLATION if a[0] == suffix)
    return [
        {
            "name": f"fqsr{bits}_{suffix}" + (f"_seed{seed}" if seed else ""),
            "cmd": fqsr_cmd(bits, {**FQSR_PLAIN, **options}, recipe, seed),
            "resumable": True,
            "test": True,
        }
        for seed in FQSR_SEEDS
    ]


# ------------------------------------------------------------------------------------------------
# Running commands


class Runner:
    """Runs `python -m qnas ...` (holding the optional --lock), timing wall and CPU."""

    def __init__(self, lock: str | None):
        self.lock = lock

    @contextlib.contextmanager
    def locked(self):
        if not self.lock:
            yield
            return
        with open(self.lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def qnas(self, args: list[str], *, timeout: float | None = None) -> tuple[int | None, float, float, str]:
        """(exit code, wall seconds, CPU seconds, stdout); a timeout stops the command with SIGINT,
        then SIGTERM (exit code None)."""
        with self.locked():
            cpu0 = _children_cpu()
            t0 = time.perf_counter()
            p = subprocess.Popen(
                [sys.executable, "-m", "qnas", *args], cwd=ROOT, env=env(), stdout=subprocess.PIPE, text=True
            )
            code: int | None
            try:
                out, _ = p.communicate(timeout=timeout)
                code = p.returncode
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGINT)
                try:
                    out, _ = p.communicate(timeout=120)
                except subprocess.TimeoutExpired:
                    p.terminate()
                    out, _ = p.communicate()
                code = None
            return code, time.perf_counter() - t0, _children_cpu() - cpu0, out


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "python"), e.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    # One thread: on a machine whose cores other jobs keep busy, torch's OpenMP threads wait on each
    # other at every small operation (docs/quantization.md); the CPU time stays the work done.
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def _add(path: Path, seconds: float) -> None:
    before = float(path.read_text()) if path.exists() else 0.0
    path.write_text(f"{before + seconds:.1f}\n")


def make_run(runner: Runner, row: dict, runs: Path, chunk_s: float) -> None:
    """Runs row["cmd"] into RUNS/NAME unless its row["done"] file (default model.pt) exists; a
    resumable command is run in chunks of chunk_s seconds, each continuing with --resume."""
    run = runs / row["name"]
    if (run / row.get("done", "model.pt")).exists():
        return
    cmd = [str(runs / a[1:]) if a.startswith("@") else a for a in row["cmd"]]
    if not row.get("resumable") and run.exists():  # a search killed half-way: start again
        shutil.rmtree(run)
    while True:
        resume = ["--resume"] if row.get("resumable") and (run / "checkpoint.pt").exists() else []
        full = [*cmd, "--out", str(run), "--quiet", *resume]
        print(f"[{now()}] qnas {' '.join(full)}", flush=True)
        code, wall, cpu, out = runner.qnas(full, timeout=chunk_s if row.get("resumable") else None)
        run.mkdir(parents=True, exist_ok=True)
        _add(run / "wall_s", wall)
        _add(run / "cpu_s", cpu)
        if out.strip():
            print(out.strip(), flush=True)
        if code == 0:
            return
        if code is None:
            if (run / row.get("done", "model.pt")).exists():  # it finished as the chunk ran out
                return
            print(f"[{now()}] chunk of {wall:.0f} s done; resuming", flush=True)
            continue
        raise SystemExit(f"{row['name']}: qnas exited with {code}")


def cached_json(runner: Runner, path: Path, args: list[str], name: str) -> dict:
    """The JSON that `qnas ARGS` prints, run once and cached in `path`; its CPU time is added to
    the run's eval_cpu_s."""
    if not path.exists():
        code, _, cpu, out = runner.qnas(args)
        if code != 0:
            raise SystemExit(f"{name}: qnas {' '.join(args[:1])} exited with {code}")
        path.write_text(out)
        _add(path.parent / "eval_cpu_s", cpu)
    return json.loads(path.read_text())


def eval_sets(row: dict, data: dict[str, Path]) -> dict[str, Path]:
    """{set name: folder} a row is evaluated on: the hold-out always, the test sets for the rows of
    the main table."""
    sets = {"holdout": data["holdout"]} if row.get("holdout", True) else {}
    if row.get("test"):
        sets.update({s: data[s] for s in TEST_SETS})
    return sets


def measure(runner: Runner, row: dict, runs: Path, data: dict[str, Path]) -> dict:
    """{"sets": {set: eval result}, "cost", "cpu_s", "wall_s", "strategy"}, cached in the run."""
    run = runs / row["name"]
    run.mkdir(parents=True, exist_ok=True)
    if row.get("file"):
        what = ["--checkpoint", str(row["file"])]
    elif row["cmd"]:
        what = ["--checkpoint", str(run)]
    else:
        what = ["--model", "bicubic", "--scale", str(SCALE)]
    result: dict = {"sets": {}}
    for set_name, folder in eval_sets(row, data).items():
        args = ["eval", *what, "--data", str(folder), "--format", "json"]
        result["sets"][set_name] = cached_json(runner, run / f"eval_{set_name}.json", args, row["name"])
    if row.get("file"):  # a released file: evaluated as it is shipped, no cost or run times
        return result
    cost_args = ["cost", "--checkpoint", str(run), "--lr-size", LR_SIZE, "--format", "json"]
    result["cost"] = cached_json(runner, run / "cost.json", cost_args, row["name"]) if row["cmd"] else None
    for k in ("cpu_s", "wall_s"):
        f = run / k
        result[k] = float(f.read_text()) if f.exists() else None
    strategy = run / "strategy.json"
    result["strategy"] = json.loads(strategy.read_text()) if strategy.exists() else None
    return result


def now() -> str:
    return datetime.datetime.now().strftime("%H:%M:%S")


# ------------------------------------------------------------------------------------------------
# Tables


def per_image(result: dict, set_name: str) -> dict[str, float]:
    return {im["name"]: im["psnr"] for im in result["sets"][set_name]["images"]}


def paired(a: list[dict], b: list[dict], set_name: str) -> tuple[float, float]:
    """Mean and standard error over images of the PSNR difference a − b, where a and b are lists of
    results of one row at several seeds (each image's PSNR averaged over the seeds first)."""

    def avg(rs: list[dict]) -> dict[str, float]:
        ims = [per_image(r, set_name) for r in rs]
        return {k: statistics.mean(d[k] for d in ims) for k in ims[0]}

    pa, pb = avg(a), avg(b)
    diffs = [pa[k] - pb[k] for k in pa]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return statistics.mean(diffs), se


def mean_of(rs: list[dict], set_name: str, key: str = "psnr") -> float:
    return statistics.mean(r["sets"][set_name][key] for r in rs)


def test_average(r: dict) -> float:
    """Mean PSNR of the three test sets (each set's mean weighted equally, as tables average)."""
    return statistics.mean(r["sets"][s]["psnr"] for s in TEST_SETS)


def fmt_cpu(s: float | None) -> str:
    if s is None:
        return "–"
    if s >= 5400:
        return f"{s / 3600:.1f} h"
    return f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s"


def fmt_delta(d: float, se: float, digits: int = 2) -> str:
    return f"{d:+.{digits}f} ± {se:.{digits}f}".replace("-", "−")


def table_rows() -> list[tuple[str, str, list[str]]]:
    """The main table: (label, W/A bits, runs averaged into the row)."""
    rows = [
        ("bicubic (MATLAB imresize)", "–", ["bicubic"]),
        ("FP edsr-baseline", "32/32", ["fp"]),
        ("uniform LSQ, first/last layers and skips float", "4/4", ["uniform4"]),
        ("FQSR, fully quantized", "8/8", ["fqsr8"]),
        (
            f"FQSR, fully quantized, {fqsr_name(4, 0)[6:]} (3 seeds)",
            "4/4",
            [fqsr_name(4, s) for s in FQSR_SEEDS],
        ),
        (
            f"FQSR, fully quantized, {fqsr_name(2, 0)[6:]} (3 seeds)",
            "2/2",
            [fqsr_name(2, s) for s in FQSR_SEEDS],
        ),
    ]
    rows += [(f"PTQ, {q} only", "4/4", [ptq_name(q, 4, 0)]) for q in SINGLE]
    rows += [
        ("PTQ, mse per-channel weights + asymmetric mse activations", "4/4", [ptq_name(FIXED_STRONG, 4, 0)]),
        ("DQSS PTQ, the seed's 7 strategies", "4/4", [ptq_name("all", 4, 0)]),
        (
            f"DQSS PTQ, extended candidates ({len(DRAWS)} draws)",
            "4/4",
            [ptq_name("extended", 4, d) for d in DRAWS],
        ),
        ("DQSS QAT, extended candidates", "4/4", ["qat4_dqssx"]),
        (f"released `release/{RELEASE_FP}` (float16 weights)", "16/32", [f"release_{Path(RELEASE_FP).stem}"]),
        (
            f"released `release/{RELEASE_FQSR}` (packed, integer runtime)",
            "4/4",
            [f"release_{Path(RELEASE_FQSR).stem}"],
        ),
    ]
    return rows


def main_table(results: dict[str, dict]) -> str:
    head = "| method | W/A bits | " + " | ".join(TEST_SETS) + " | TBitOps | CPU time |"
    lines = [
        head,
        "|---|---|" + "---|" * len(TEST_SETS) + "---|---|",
        "| *published*: EDSR-baseline (DIV2K, 300k steps of 16 patches) | 32/32 | "
        + " | ".join(f"{PUBLISHED_FP[s]:.2f}" for s in TEST_SETS)
        + " | | |",
    ]
    for bits, ddtb in PUBLISHED_DDTB.items():
        cells = " | ".join(
            f"{ddtb[s]:.2f} ({ddtb[s] - PUBLISHED_FP[s]:+.2f})".replace("-", "−") for s in TEST_SETS
        )
        lines.append(f"| *published*: DDTB (first/last layers float) | {bits}/{bits} | {cells} | | |")
    fp = results.get("fp")
    for label, bits, names in table_rows():
        have = [results[n] for n in names if n in results and all(s in results[n]["sets"] for s in TEST_SETS)]
        if len(have) < len(names):
            lines.append(f"| {label} | {bits} | " + " | ".join("not run" for _ in TEST_SETS) + " | | |")
            continue
        cells = []
        for s in TEST_SETS:
            text = f"{mean_of(have, s):.2f} / {mean_of(have, s, 'ssim'):.4f}"
            if fp is not None and names != ["fp"]:
                text += f" ({fmt_delta(*paired(have, [fp], s))})"
            cells.append(text)
        cost = have[0].get("cost")  # a released file has none (its run's row has it)
        bitops = f"{cost['bitops'] / 1e12:.2f}" if cost else "–"
        cpu = [r["cpu_s"] for r in have if r.get("cpu_s") is not None]
        cpu_text = fmt_cpu(statistics.mean(cpu)) if cpu else "–"
        if len(have) > 1 and cpu:
            cpu_text += " each"
        lines.append(f"| {label} | {bits} | {' | '.join(cells)} | {bitops} | {cpu_text} |")
    return "\n".join(lines)


def ablation_table(results: dict[str, dict]) -> str:
    """FQSR additions on the hold-out (one seed each): PSNR, Δ vs FP and vs the plain recipe."""
    lines = [
        "| bits | FQSR recipe | hold-out PSNR | Δ vs FP | Δ vs the first row | CPU time |",
        "|---|---|---|---|---|---|",
    ]
    fp = results.get("fp")
    for bits in ABLATION_BITS:
        base = results.get(f"fqsr{bits}_plain")
        entries = [
            (f"fqsr{bits}_{suffix}", label)
            for suffix, label, _, _ in ABLATION
            if bits == 2 or suffix not in ABLATION_2BIT_ONLY
        ]
        entries = [
            (n, label + (" (the table's recipe, seed 0)" if n == fqsr_name(bits, 0) else ""))
            for n, label in entries
        ]
        for name, label in entries:
            r = results.get(name)
            if r is None or "holdout" not in r["sets"]:
                lines.append(f"| {bits} | {label} | not run | | | |")
                continue
            d_fp = fmt_delta(*paired([r], [fp], "holdout")) if fp else ""
            d_base = (
                fmt_delta(*paired([r], [base], "holdout"), 3) if base and name != f"fqsr{bits}_plain" else ""
            )
            lines.append(
                f"| {bits} | {label} | {r['sets']['holdout']['psnr']:.2f} | {d_fp} | {d_base} | {fmt_cpu(r['cpu_s'])} |"
            )
    return "\n".join(lines)


def strategy_text(s: dict | None) -> str:
    if not s or len(s["quantizers"]) == 1:
        return ""
    w = ", ".join(f"{k} {v}" for k, v in sorted(s["counts"]["weight"].items(), key=lambda kv: -kv[1]))
    a = ", ".join(f"{k} {v}" for k, v in sorted(s["counts"]["activation"].items(), key=lambda kv: -kv[1]))
    return f"W: {w}; A: {a}"


def dqss_table(results: dict[str, dict]) -> str:
    """PTQ at each bit-width, calibration draw 0, on the hold-out: every single strategy, the fixed
    strong pair, DQSS over the seed's strategies and over the extended candidates."""
    lines = ["| bits | strategies | hold-out PSNR | Δ vs FP | chosen (layers) |", "|---|---|---|---|---|"]
    fp = results.get("fp")
    for bits in DQSS_BITS:
        for q in (*SINGLE, FIXED_STRONG, "all", "extended"):
            r = results.get(ptq_name(q, bits, 0))
            label = {"all": "DQSS, the seed's 7", "extended": "DQSS, extended"}.get(q, q)
            if r is None or "holdout" not in r["sets"]:
                lines.append(f"| {bits} | {label} | not run | | |")
                continue
            d = fmt_delta(*paired([r], [fp], "holdout")) if fp else ""
            lines.append(
                f"| {bits} | {label} | {r['sets']['holdout']['psnr']:.2f} | {d} | {strategy_text(r['strategy'])} |"
            )
    return "\n".join(lines)


def draws_table(results: dict[str, dict]) -> str:
    """Test-set average PSNR (mean of the three sets) per calibration draw: DQSS over the extended
    candidates and the best single strategy of the hold-out (best_singles); DQSS minus it, mean ±
    standard error over the draws."""
    lines = [
        "| bits | draw | DQSS, extended | single strategies (test average) | DQSS − best single |",
        "|---|---|---|---|---|",
    ]
    for bits in DQSS_BITS:
        best = best_singles(results, bits)
        per_draw = []
        for d in DRAWS:
            dq = results.get(ptq_name("extended", bits, d))
            singles = {q: results.get(ptq_name(q, bits, d)) for q in best}
            ok = dq is not None and all(
                r is not None and all(s in r["sets"] for s in TEST_SETS) for r in (dq, *singles.values())
            )
            if not ok:
                lines.append(f"| {bits} | {d} | not run | | |")
                continue
            per_draw.append((test_average(dq), {q: test_average(r) for q, r in singles.items()}))
            cells = ", ".join(f"{q} {test_average(r):.3f}" for q, r in singles.items())
            lines.append(f"| {bits} | {d} | {test_average(dq):.3f} | {cells} | |")
        if len(per_draw) >= 2 and best:
            top = max(best, key=lambda q: statistics.mean(v[1][q] for v in per_draw))
            diffs = [v[0] - v[1][top] for v in per_draw]
            se = statistics.stdev(diffs) / math.sqrt(len(diffs))
            verdict = (
                "DQSS wins"
                if statistics.mean(diffs) > 2 * se
                else ("DQSS loses" if statistics.mean(diffs) < -2 * se else "tie")
            )
            lines.append(
                f"| {bits} | mean of {len(per_draw)} | {statistics.mean(v[0] for v in per_draw):.3f} | "
                f"{top} {statistics.mean(v[1][top] for v in per_draw):.3f} | "
                f"{fmt_delta(statistics.mean(diffs), se)} ({verdict}) |"
            )
    return "\n".join(lines)


def command_text(row: dict) -> str:
    if row.get("release"):
        return (
            f"qnas export RUNS/{fqsr_name(4, 0)} --format packed --out release/{RELEASE_FQSR}  "
            f"# and RUNS/fp/model.pt in float16 as release/{RELEASE_FP}"
        )
    if row["cmd"] is None:
        return f"qnas eval --model bicubic --scale {SCALE} --data DATA/SET"
    args = [("RUNS/" + a[1:]) if a.startswith("@") else a for a in row["cmd"]]
    args = [f"'{a}'" if a.startswith("{") else a for a in args]
    return f"qnas {' '.join(args)} --out RUNS/{row['name']}"


def write_doc(text: str, path: Path, block: str) -> None:
    """Replaces a generated block of docs/RESULTS.md (between its two markers; a block whose markers
    are missing is appended at the end)."""
    begin, end = f"<!-- {block}:begin (scripts/results.py) -->", f"<!-- {block}:end -->"
    doc = path.read_text() if path.exists() else ""
    if begin not in doc or end not in doc:
        doc = f"{doc.rstrip()}\n\n{begin}\n{end}\n".lstrip()
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


RELEASE = ROOT / "release"
# The published checkpoints: the FP network (its model.pt with float16 weights: half the bytes, the
# released file's own PSNR is what docs/RESULTS.md and release/README.md report) and FQSR 4-bit
# (seed 0) as a packed file.
RELEASE_FP, RELEASE_FQSR = "edsr-baseline-x4-fp.pt", "edsr-baseline-x4-fqsr4.qnp"
set_scale(4)


def make_release(runner: Runner, runs: Path) -> None:
    """release/: the FP and FQSR 4-bit models of the table with their configs (paths replaced by
    RUNS/...); files that exist are kept."""
    import torch

    RELEASE.mkdir(exist_ok=True)
    fp_out = RELEASE / RELEASE_FP
    if not fp_out.exists() and (runs / "fp" / "model.pt").exists():
        blob = torch.load(runs / "fp" / "model.pt", map_location="cpu", weights_only=True)
        blob["model"] = {k: v.half() if v.is_floating_point() else v for k, v in blob["model"].items()}
        blob["train"] = json.loads(_portable(json.dumps(blob.get("train", {})), runs))
        torch.save(blob, fp_out)
    q_out = RELEASE / RELEASE_FQSR
    if not q_out.exists() and (runs / fqsr_name(4, 0) / "model.pt").exists():
        code, _, _, out = runner.qnas(
            ["export", str(runs / fqsr_name(4, 0)), "--format", "packed", "--out", str(q_out)]
        )
        if code != 0:
            raise SystemExit(f"release: qnas export exited with {code}")
        print(out.strip(), flush=True)
    for name, run in ((RELEASE_FP, "fp"), (RELEASE_FQSR, fqsr_name(4, 0))):
        config = runs / run / "config.json"
        if config.exists():
            target = RELEASE / f"{Path(name).stem}.config.json"
            target.write_text(_portable(config.read_text(), runs))


def _portable(text: str, runs: Path) -> str:
    """`text` with the runs folder written as RUNS (no machine's paths in released files)."""
    return text.replace(str(runs), "RUNS")


def cached(row: dict, runs: Path, data: dict[str, Path]) -> bool:
    """Whether every evaluation (and the cost) of a row is cached: measure() will run nothing."""
    run = runs / row["name"]
    files = [run / f"eval_{s}.json" for s in eval_sets(row, data)] + (
        [run / "cost.json"] if row["cmd"] and not row.get("file") else []
    )
    return all(f.exists() for f in files)


def main(argv: list[str] | None = None) -> None:
    import fnmatch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir", metavar="DATA_DIR", help="Folder with SunHays80, Set5, Set14, BSD68.")
    ap.add_argument("--scale", type=int, choices=SCALES, default=4, help="Upscaling factor (x4 or x2).")
    ap.add_argument("--runs", default=None, help="Folder of the runs (default runs/xSCALE).")
    ap.add_argument(
        "--only", default=None, help="Comma-separated run names or patterns (fqsr4_*); default all."
    )
    ap.add_argument("--chunk-minutes", type=float, default=14.0, help="Longest piece of a training run.")
    ap.add_argument("--lock", default=None, metavar="PATH", help="Hold an flock on PATH around each command.")
    ap.add_argument("--no-table", action="store_true", help="Do not rewrite docs/RESULTS.md.")
    ap.add_argument("--dry-run", action="store_true", help="Print the commands only.")
    args = ap.parse_args(argv)
    set_scale(args.scale)
    data_dir = Path(args.data_dir)
    missing = [s for s in (TRAIN_SET, *TEST_SETS) if not (data_dir / s).is_dir()]
    if missing:
        raise SystemExit(f"{data_dir}: no {', '.join(missing)} folder (docs/RESULTS.md: the data)")
    runs = Path(os.path.abspath(args.runs or ROOT / "runs" / f"x{SCALE}"))
    patterns = args.only.split(",") if args.only else ["*"]

    def wanted(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    all_runs = runs_list()
    if args.dry_run:
        print("\n".join(command_text(r) for r in all_runs if wanted(r["name"])))
        return
    data = {**split_training_images(data_dir, runs), **{s: data_dir / s for s in TEST_SETS}}
    runner = Runner(args.lock)
    results: dict[str, dict] = {}

    def visit(row: dict) -> None:
        if wanted(row["name"]) and not row.get("never_run"):
            if row["cmd"] and not row.get("file"):  # a released file is evaluated, not made
                make_run(runner, row, runs, args.chunk_minutes * 60)
            results[row["name"]] = measure(runner, row, runs, data)
            r = results[row["name"]]["sets"]
            print(
                f"[{now()}] {row['name']}: " + ", ".join(f"{k} {v['psnr']:.2f}" for k, v in r.items()),
                flush=True,
            )
        elif (row["cmd"] is None or row.get("file") or (runs / row["name"] / "model.pt").exists()) and cached(
            row, runs, data
        ):
            results[row["name"]] = measure(runner, row, runs, data)

    released = [(f"release_{Path(n).stem}", RELEASE / n) for n in (RELEASE_FP, RELEASE_FQSR)]
    drawn: set[int] = set()
    for row in list(all_runs):
        if row.get("release"):
            if wanted("release"):
                make_release(runner, runs)
            for name, f in released:
                if f.exists():
                    visit(
                        {
                            "name": name,
                            "cmd": ["release"],
                            "test": True,
                            "file": f,
                            "never_run": not wanted("release"),
                        }
                    )
            continue
        visit(row)
        if "ablation_done" in row:  # the table's FQSR rows at this bit-width, with the hold-out's best recipe
            bits = row["ablation_done"]
            CHOSEN_RECIPE[bits] = best_recipe(results, bits)
            extra = table_fqsr_runs(bits, CHOSEN_RECIPE[bits])
            all_runs += [r for r in extra if r["name"] not in {x["name"] for x in all_runs}]
            for r in extra:
                visit(r)
        # Once a bit-width's single strategies are measured at draw 0, the best one (hold-out) runs
        # over the further calibration draws, before the next block.
        for bits in DQSS_BITS:
            if bits not in drawn and all(ptq_name(q, bits, 0) in results for q in (*SINGLE, FIXED_STRONG)):
                drawn.add(bits)
                extra = draw_runs(bits, best_singles(results, bits))
                all_runs += [r for r in extra if r["name"] not in {x["name"] for x in all_runs}]
                for r in extra:
                    visit(r)
    tables = {
        "results": main_table(results),
        **({"ablation": ablation_table(results)} if SCALE == 4 else {}),  # x2 runs no ablation
        "dqss": dqss_table(results),
        "draws": draws_table(results),
    }
    print("\n\n".join(tables.values()))
    if not args.no_table:
        runs_label = os.path.relpath(runs, ROOT)
        stamp = (
            f"Generated {datetime.date.today()} on {platform.node()} ({platform.machine()}, "
            f"{os.cpu_count()} cores); runs in {runs_label}."
        )
        commands = "\n".join(command_text(r) for r in all_runs)
        tables["results"] += (
            f"\n\n{stamp}\n\nCommands (RUNS = {runs_label}, DATA = the data folder; each run is then "
            f"evaluated with `qnas eval --checkpoint RUNS/NAME --data DATA/SET`):\n\n```\n{commands}\n```"
        )
        for block, text in tables.items():
            write_doc(text, ROOT / "docs" / "RESULTS.md", block + BLOCK_SUFFIX)


if __name__ == "__main__":
    main()
