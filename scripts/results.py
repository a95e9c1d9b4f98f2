"""Rebuilds every run of docs/RESULTS.md from scratch and rewrites its table (idempotent).

    python scripts/results.py [--runs runs/results] [--only NAME,...] [--no-table] [--dry-run]

Each row is one `qnas` command (the full-precision edsr-baseline x2 run first, everything else
starts from it), then `qnas eval --checkpoint` on the builtin validation images and `qnas cost
--checkpoint` for BitOps. A row whose RUN/model.pt exists is not run again, and its evaluation and
cost are cached beside it (RUN/eval.json, RUN/cost.json), so the script continues where it stopped.

The machine is shared (CONVENTIONS.md): every command runs holding /tmp/qnas-cpu.lock (an flock,
the same lock as `flock /tmp/qnas-cpu.lock CMD`), and the recorded wall time (RUN/wall_s) is
measured while holding it, i.e. without the wait for the lock. Training runs are resumable: a
`qnas train` longer than --chunk-minutes is stopped (SIGINT/SIGTERM), the lock released so others
can run, and continued with --resume; its wall time is the sum of the chunks (work lost since the
last checkpoint counts, which is why the FP run checkpoints every 25 steps). Searches
(`qnas strategy`) are minutes long and run in one piece.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = "/tmp/qnas-cpu.lock"
LR_SIZE = "640x360"  # BitOps for a 1280x720 output at x2
BITS = 4
# One fine-tune budget for every `qnas train --quant` row (FQSR 8/4/2, uniform 4): 1000 steps of
# batch 4, 48x48 HR patches, Adam, cosine decay (docs/RESULTS.md says how it was chosen).
FINETUNE = ["--steps", "1000", "--batch-size", "4", "--patch-size", "48", "--lr", "2e-4"]
FINETUNE_LONG = ["--steps", "2000", *FINETUNE[2:]]
# One search budget for every `qnas strategy --mode ptq` row: the same 8 calibration batches of
# 4 patches (48x48 HR) from the train split, 60 steps.
PTQ = ["--steps", "60", "--calib-batches", "8", "--batch-size", "4", "--patch-size", "48"]
QAT = ["--steps", "300", "--batch-size", "4", "--patch-size", "48"]
SINGLE = ("lsq", "pact", "dorefa", "minmax", "percentile", "mse")  # hwgq quantizes activations only
# Calibration draws (--seed) beyond the table's seed 0, for DQSS and the two best single strategies.
DRAWS = (1, 2, 3, 4)
DRAWN = {"mse": "mse only", "lsq": "lsq only", "all": "all strategies"}


def drawn_name(q: str, seed: int) -> str:
    """The run of strategy list `q` at calibration draw `seed` (seed 0: the table's own row)."""
    base = f"ptq{BITS}_{'dqss' if q == 'all' else q}"
    return base if seed == 0 else f"{base}_seed{seed}"


def rows() -> list[dict]:
    """The table, in order: name, label, the qnas command (None for bicubic), resumable or not."""
    fp = "fp"
    table = [
        {"name": "bicubic", "label": "bicubic (MATLAB imresize)", "cmd": None},
        {
            "name": fp,
            "label": "FP edsr-baseline (32-bit)",
            "cmd": ["train", "--model", "edsr-baseline", "--scale", "2", "--checkpoint-every", "25"],
            "resumable": True,
        },
    ]
    for bits in (8, 4, 2):
        table.append(
            {
                "name": f"fqsr{bits}",
                "label": f"FQSR {bits}-bit (fully quantized)",
                "cmd": ["train", "--init", "@fp", "--quant", "fqsr", "--bits", str(bits), *FINETUNE],
                "resumable": True,
            }
        )
    table.append(
        {
            "name": "fqsr4_2000",
            "label": "FQSR 4-bit, fine-tuned twice as long (2000 steps)",
            "cmd": ["train", "--init", "@fp", "--quant", "fqsr", "--bits", "4", *FINETUNE_LONG],
            "resumable": True,
        }
    )
    table.append(
        {
            "name": f"uniform{BITS}",
            "label": f"uniform {BITS}-bit LSQ, float skips/first/last",
            "cmd": ["train", "--init", "@fp", "--quant", "uniform", "--bits", str(BITS), *FINETUNE],
            "resumable": True,
        }
    )

    def ptq(quantizers: str, *extra: str) -> list[str]:
        return [
            "strategy",
            "--checkpoint",
            "@fp",
            "--quantizers",
            quantizers,
            "--bits",
            str(BITS),
            *PTQ,
            *extra,
        ]

    for q in SINGLE:
        table.append({"name": f"ptq{BITS}_{q}", "label": f"PTQ {BITS}-bit, {q} only", "cmd": ptq(q)})
    table += [
        {"name": f"ptq{BITS}_dqss", "label": f"DQSS PTQ {BITS}-bit, all strategies", "cmd": ptq("all")},
        {
            "name": f"ptq{BITS}_dqss_search_only",
            "label": f"DQSS PTQ {BITS}-bit, all, search only (no discrete phase)",
            "cmd": ptq("all", "--discrete-fraction", "0"),
        },
        {
            "name": f"ptq{BITS}_dqss_plain",
            "label": f"DQSS PTQ {BITS}-bit, all, plain mixture search (uniform start, batch MSE)",
            "cmd": ptq("all", "--init", "uniform", "--objective", "mixture", "--loss", "mse"),
        },
    ]
    # Further draws of the calibration patches (--seed k) for DQSS and the two best single
    # strategies: one draw's margin is within the spread between draws (the draws table).
    for seed in DRAWS:
        for q in DRAWN:
            table.append(
                {
                    "name": drawn_name(q, seed),
                    "label": f"{'DQSS ' if q == 'all' else ''}PTQ {BITS}-bit, {DRAWN[q]}, seed {seed}",
                    "cmd": ptq(q, "--seed", str(seed)),
                    "draw": seed,
                }
            )
    table.append(
        {
            "name": f"qat{BITS}_dqss",
            "label": f"DQSS QAT {BITS}-bit, all strategies",
            "cmd": [
                "strategy",
                "--checkpoint",
                "@fp",
                "--quantizers",
                "all",
                "--bits",
                str(BITS),
                "--mode",
                "qat",
                *QAT,
            ],
        }
    )
    return table


@contextlib.contextmanager
def cpu_lock():
    """The shared machine's CPU lock (the flock of CONVENTIONS.md), held for one command; not taken
    again when the caller holds it for the whole script (QNAS_CPU_LOCK_HELD=1, e.g. under
    `flock /tmp/qnas-cpu.lock env QNAS_CPU_LOCK_HELD=1 python scripts/results.py --only ...`)."""
    if os.environ.get("QNAS_CPU_LOCK_HELD") == "1":
        yield
        return
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "python"), e.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    # Threads that wait on each other while other jobs hold the cores (docs/quantization.md).
    e.setdefault("OMP_NUM_THREADS", "2")
    return e


def qnas(args: list[str], *, timeout: float | None = None) -> tuple[int, float, str]:
    """Runs `python -m qnas ARGS` holding the CPU lock: (exit code, seconds, stdout). A timeout
    stops it with SIGINT, then SIGTERM (exit code None)."""
    with cpu_lock():
        t0 = time.perf_counter()
        p = subprocess.Popen(
            [sys.executable, "-m", "qnas", *args], cwd=ROOT, env=env(), stdout=subprocess.PIPE, text=True
        )
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGINT)
            try:
                out, _ = p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                p.terminate()
                out, _ = p.communicate()
            return None, time.perf_counter() - t0, out
        return p.returncode, time.perf_counter() - t0, out


def make_run(row: dict, runs: Path, chunk_s: float) -> None:
    run = runs / row["name"]
    if (run / "model.pt").exists():
        return
    cmd = [str(runs / a[1:]) if a.startswith("@") else a for a in row["cmd"]]
    wall = run / "wall_s"
    spent = float(wall.read_text()) if wall.exists() else 0.0
    if not row.get("resumable"):
        if run.exists():  # a search killed half-way: not resumable, start again
            shutil.rmtree(run)
        spent = 0.0
    while True:
        resume = ["--resume"] if row.get("resumable") and (run / "checkpoint.pt").exists() else []
        full = [*cmd, "--out", str(run), "--quiet", *resume]
        print(f"[{now()}] qnas {' '.join(full)}", flush=True)
        code, seconds, out = qnas(full, timeout=chunk_s if row.get("resumable") else None)
        spent += seconds
        run.mkdir(parents=True, exist_ok=True)
        wall.write_text(f"{spent:.1f}\n")
        if out.strip():
            print(out.strip(), flush=True)
        if code == 0:
            return
        if code is None:
            print(f"[{now()}] chunk of {seconds:.0f} s done, released the lock; resuming", flush=True)
            continue
        raise SystemExit(f"{row['name']}: qnas exited with {code}")


def cached_json(path: Path, args: list[str], name: str, label: str) -> dict:
    """The JSON that `qnas ARGS` prints, run once and cached in `path` (`label` names the command in
    the error of a failed run of row `name`)."""
    if not path.exists():
        code, _, out = qnas(args)
        if code != 0:
            raise SystemExit(f"{name}: qnas {label} exited with {code}")
        path.write_text(out)
    return json.loads(path.read_text())


def measure(row: dict, runs: Path) -> dict:
    """eval.json (PSNR/SSIM on the builtin validation images), eval_train.json (on the training
    images) and cost.json, cached in the run."""
    run = runs / row["name"]
    run.mkdir(parents=True, exist_ok=True)
    what = ["--checkpoint", str(run)] if row["cmd"] else ["--model", "bicubic", "--scale", "2"]
    result = cached_json(run / "eval.json", ["eval", *what, "--format", "json"], row["name"], "eval")
    # The training images too (whole images; calibration and fine-tuning saw patches of them): a
    # method that only fits the training distribution shows as a gap between the two columns.
    train_args = ["eval", *what, "--data", "builtin:train", "--format", "json"]
    result["psnr_train"] = cached_json(
        run / "eval_train.json", train_args, row["name"], "eval --data builtin:train"
    )["psnr"]
    cost_args = ["cost", "--checkpoint", str(run), "--lr-size", LR_SIZE, "--format", "json"]
    result["cost"] = cached_json(run / "cost.json", cost_args, row["name"], "cost") if row["cmd"] else None
    wall = run / "wall_s"
    result["wall_s"] = float(wall.read_text()) if wall.exists() else None
    strategy = run / "strategy.json"
    result["strategy"] = json.loads(strategy.read_text()) if strategy.exists() else None
    return result


def now() -> str:
    return datetime.datetime.now().strftime("%H:%M:%S")


def fmt_bitops(cost: dict | None) -> str:
    if cost is None:
        return "–"
    return f"{cost['bitops'] / 1e12:.2f}"


def fmt_wall(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s"


def command_text(row: dict) -> str:
    if row["cmd"] is None:
        return "qnas eval --model bicubic --scale 2"
    args = [("RUNS/" + a[1:]) if a.startswith("@") else a for a in row["cmd"]]
    return f"qnas {' '.join(args)} --out RUNS/{row['name']}"


def strategy_text(s: dict | None) -> str:
    if not s or len(s["quantizers"]) == 1:
        return ""
    w = ", ".join(f"{k} {v}" for k, v in sorted(s["counts"]["weight"].items(), key=lambda kv: -kv[1]))
    a = ", ".join(f"{k} {v}" for k, v in sorted(s["counts"]["activation"].items(), key=lambda kv: -kv[1]))
    return f"W: {w}; A: {a}"


def table(table_rows: list[dict], results: dict[str, dict]) -> str:
    fp = results.get("fp", {}).get("psnr")
    lines = [
        "| run | PSNR (dB) | Δ vs FP | SSIM | PSNR, training images | TBitOps | wall time | chosen strategies (layers) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in table_rows:
        if "draw" in row:  # in draws_table
            continue
        r = results.get(row["name"])
        if r is None:
            lines.append(f"| {row['label']} | not run | | | | | | |")
            continue
        delta = "" if fp is None or row["name"] == "fp" else f"{r['psnr'] - fp:+.2f}"
        lines.append(
            f"| {row['label']} | {r['psnr']:.2f} | {delta} | {r['ssim']:.4f} | {r['psnr_train']:.2f} "
            f"| {fmt_bitops(r['cost'])} "
            f"| {fmt_wall(r['wall_s'])} | {strategy_text(r['strategy'])} |"
        )
    return "\n".join(lines)


def draws_table(results: dict[str, dict]) -> str:
    """Validation PSNR (training images in brackets) of mse, lsq and DQSS for every calibration
    draw, DQSS minus the better of the two single strategies of the same draw, and mean ± sample
    standard deviation over the draws that have all three runs."""
    import statistics

    lines = [
        "| calibration draw (`--seed`) | mse only | lsq only | DQSS, all strategies | DQSS − best single |",
        "|---|---|---|---|---|",
    ]
    cols: dict[str, list[float]] = {k: [] for k in ("mse", "lsq", "all", "margin", "mse_t", "lsq_t", "all_t")}
    for seed in (0, *DRAWS):
        r = {q: results.get(drawn_name(q, seed)) for q in DRAWN}
        if any(v is None for v in r.values()):
            lines.append(f"| {seed} | not run | | | |")
            continue
        margin = r["all"]["psnr"] - max(r["mse"]["psnr"], r["lsq"]["psnr"])
        for q in DRAWN:
            cols[q].append(r[q]["psnr"])
            cols[f"{q}_t"].append(r[q]["psnr_train"])
        cols["margin"].append(margin)
        cells = " | ".join(f"{r[q]['psnr']:.2f} ({r[q]['psnr_train']:.2f})" for q in DRAWN)
        lines.append(f"| {seed} | {cells} | {margin:+.2f} |")
    if len(cols["margin"]) >= 2:

        def ms(v: list[float], sign: str = "") -> str:
            return f"{statistics.mean(v):{sign}.2f} ± {statistics.stdev(v):.2f}"

        cells = " | ".join(f"{ms(cols[q])} ({ms(cols[q + '_t'])})" for q in DRAWN)
        lines.append(f"| mean ± std ({len(cols['margin'])} draws) | {cells} | {ms(cols['margin'], '+')} |")
    return "\n".join(lines)


def commands(table_rows: list[dict]) -> str:
    return "\n".join(command_text(r) for r in table_rows)


def write_doc(text: str, path: Path, block: str = "results") -> None:
    """Replaces a generated block of docs/RESULTS.md (between its two markers; a block whose markers
    are missing is appended at the end)."""
    begin, end = f"<!-- {block}:begin (scripts/results.py) -->", f"<!-- {block}:end -->"
    doc = path.read_text() if path.exists() else ""
    if begin not in doc or end not in doc:
        doc = f"{doc.rstrip()}\n\n{begin}\n{end}\n".lstrip()
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default=str(ROOT / "runs" / "results"), help="Folder of the runs.")
    ap.add_argument("--only", default=None, help="Comma-separated row names (default: all).")
    ap.add_argument("--chunk-minutes", type=float, default=14.0, help="Longest hold of the CPU lock.")
    ap.add_argument("--no-table", action="store_true", help="Do not rewrite docs/RESULTS.md.")
    ap.add_argument("--dry-run", action="store_true", help="Print the commands only.")
    args = ap.parse_args(argv)
    runs = Path(args.runs)
    table_rows = rows()
    wanted = set(args.only.split(",")) if args.only else {r["name"] for r in table_rows}
    unknown = wanted - {r["name"] for r in table_rows}
    if unknown:
        raise SystemExit(f"--only: unknown rows {sorted(unknown)}")
    if args.dry_run:
        print(commands([r for r in table_rows if r["name"] in wanted]))
        return
    results: dict[str, dict] = {}
    for row in table_rows:
        if row["name"] in wanted:
            if row["cmd"]:
                make_run(row, runs, args.chunk_minutes * 60)
            results[row["name"]] = measure(row, runs)
            r = results[row["name"]]
            print(f"[{now()}] {row['name']}: {r['psnr']:.2f} dB / {r['ssim']:.4f}", flush=True)
        elif (runs / row["name"] / "eval.json").exists() and (
            row["cmd"] is None or (runs / row["name"] / "cost.json").exists()
        ):
            results[row["name"]] = measure(row, runs)  # cached (but a missing eval_train.json)
    text = table(table_rows, results)
    draws = draws_table(results)
    print(text, draws, sep="\n\n")
    if not args.no_table:
        # The doc names the runs folder relative to the checkout, so it reads the same on every machine.
        runs_label = os.path.relpath(os.path.abspath(runs), ROOT)
        stamp = f"Generated {datetime.date.today()} on {platform.node()} ({platform.machine()}); runs in {runs_label}."
        write_doc(
            f"{text}\n\n{stamp}\n\nCommands (RUNS = {runs_label}):\n\n```\n{commands(table_rows)}\n```",
            ROOT / "docs" / "RESULTS.md",
        )
        write_doc(draws, ROOT / "docs" / "RESULTS.md", block="draws")


if __name__ == "__main__":
    main()
