"""QuantNAS against hand-made quantized networks on the standard SR images: a PSNR-BitOps Pareto.

    python scripts/quantnas_pareto.py DATA OUT [--seeds 0,1,2] [--control-seeds 0,1,2]
                                      [--widths 24,36,51] [--targets auto] [--search-bits 2,4,8]
                                      [--methods spos] [--search-ops conv3x3] [--train-steps 1200]
                                      [--no-heldout] [--budget-minutes M] [--only PATTERNS]
                                      [--no-run] [--dry-run]

The defaults are the settings of docs/RESULTS.md ("QuantNAS on the standard images"): the demo's
retraining (qnas.demo.DemoSettings) on SunHays80 instead of the builtin images, and the search that
won on the SunHays80 hold-out (docs/quantnas.md, "Bit-widths down to 2"). Two invocations with
disjoint --only patterns (or --seeds) can share OUT (each run has its own folder), then a last one
with --no-run writes the summary.

DATA holds the standard image sets as plain folders of HR images (docs/RESULTS.md says where they
come from): SunHays80 (training), Set5, Set14 and BSD68 (test). SunHays80 is split by
scripts/split_images.py into OUT/data/train and OUT/data/heldout (every 5th image by name held out);
every setting is chosen on the held-out part, the test sets are only reported.

Every model is made by the real CLI, one subprocess per command, at x4:
- searched: `qnas search --method spos --mode quant --ops conv3x3 --bits 2,4,8 --target-gbitops T
  --seed S` on the training part: the bit-width of every layer of the fixed 3x3 architecture, chosen
  by the held-out loss of the single-path supernet within the target (--methods darts and
  --search-ops space give QuantNAS's differentiable joint search, Shvetsov et al., arXiv:2208.14839);
  each target searched in the space one width step wider than the uniform w4a4 network that sets it
  (--search-widths wider: 36, 51, 72 channels);
- hand-made (--handmade): `qnas genotype --op conv3x3` at w4a4 and at w4a4 with 8-bit first and last
  layers (the uniform genotype with those two layers' bits edited), each at every --widths channel
  count (the space with its "channels" changed: narrower and wider uniform networks span the
  targets), and w8a8 at the space's own width;
- the search targets ("auto") are the BitOps of uniform w4a4 at each width, so every searched model
  has a hand-made model of each kind at (just above) its own cost;
- controls: a random genotype of the searched models' space at --random-targets (`qnas genotype
  --random`: random bits on the fixed architecture), the same search over the space's six ops at
  --joint-targets (joint_T), a search without a cost term (the penalty-0 control, "free"), and, when
  asked, a bits-only search at --bits-only-target;
then every genotype gets the same `qnas train --arch` (seed S) and `qnas eval --format json` on the
held-out part and each test set, `qnas cost` for its BitOps at LR 180x320 (a 720p output). The seed
drives the search, the random draw and the retraining.

A run whose genotype.json (search) or model.pt (training) exists is not run again; a killed one
continues with --resume; evaluations and costs are cached in the run folder, so rerunning the
command continues where it stopped. OUT/results.json holds every per-image number, OUT/summary.md
the tables (means over seeds; each searched model against each hand-made baseline as the mean
per-image PSNR difference, paired by image and seed, with its standard error) and OUT/pareto.png
the plot.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import Runner, cached_json, fmt_cpu, make_run, now  # noqa: E402

from qnas.demo import DARTS_DEMO, DemoSettings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCALE = 4
TRAIN_SET = "SunHays80"
TEST_SETS = ("Set5", "Set14", "BSD68")
HELDOUT = "heldout"
HANDMADE = "handmade"
#: Kinds of model made by `qnas search`.
SEARCH_KINDS = ("searched", "bits_only", "joint", "free")
#: --methods: darts (QuantNAS's differentiable search), spos (single-path, additive selection), spos_evo
#: (single-path, evolutionary selection of whole genotypes), spos_ops (two stages: the spos search of
#: the bits, then a single-path search of the space's own ops at those bits, `qnas search --fix-bits`).
METHODS = ("darts", "spos", "spos_evo", "spos_ops")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, help="Folder with SunHays80/, Set5/, Set14/, BSD68/ (HR images).")
    ap.add_argument("out", type=Path, help="Folder for the runs, results.json, summary.md, pareto.png.")
    ap.add_argument("--seeds", default="0,1,2", help="Seeds of the searched and hand-made models.")
    ap.add_argument(
        "--control-seeds",
        default="0,1,2",
        help="Seeds of the controls: w8a8, bits-only search, random genotypes.",
    )
    ap.add_argument(
        "--widths", default="24,36,51", help="Channel counts of the hand-made w4a4 and w4a4-fl8 networks."
    )
    ap.add_argument(
        "--handmade",
        default="w4a4,w4a4_fl8",
        help="Hand-made families at every width, comma-separated: wBaB (uniform B bits) or wBaB_fl8 (first "
        "and last layers at 8 bits).",
    )
    ap.add_argument(
        "--search-bits",
        default="2,4,8",
        help="Bit-widths the searches, the bits-only search and the random genotypes choose from (--bits).",
    )
    ap.add_argument(
        "--targets",
        default="auto",
        help="BitOps targets of the searches (GBitOps), or 'auto': uniform w4a4's at each of --widths.",
    )
    ap.add_argument(
        "--search-widths",
        default="wider",
        help="Channel count of the space each search runs in: 'wider' (the next of --widths above the "
        "target's uniform w4a4 width, the widest x sqrt(2)), 'space' (the space's own), one number, or one "
        "per target (in the order of --targets).",
    )
    ap.add_argument(
        "--random-targets",
        default="middle",
        help="Targets of the random genotypes ('middle': the middle target; 'all': every target).",
    )
    ap.add_argument(
        "--bits-only-target",
        default="none",
        help="Targets of the bits-only search ('max': the largest target; 'all': every target; 'none').",
    )
    ap.add_argument(
        "--search-ops",
        default="conv3x3",
        help="Candidate ops of the searched models (qnas search --ops; 'space': the space's own). The "
        "default searches bits on the fixed architecture: with the six ops the searches lose (docs/quantnas.md).",
    )
    ap.add_argument(
        "--joint-targets",
        default="middle",
        help="Unless --search-ops is 'space': targets of a control search over the space's own ops "
        "('middle', 'max', 'all', 'none' or GBitOps), named joint_T.",
    )
    ap.add_argument("--no-free", action="store_true", help="Skip the search without a cost term.")
    ap.add_argument("--space", default="basic", help="Search space (builtin name or JSON file).")
    ap.add_argument("--train-set", default=TRAIN_SET, help="Training folder inside DATA.")
    ap.add_argument("--test-sets", default=",".join(TEST_SETS), help="Test folders inside DATA.")
    ap.add_argument("--lr-size", default="180x320", help="LR size BitOps are counted for.")
    ap.add_argument(
        "--no-heldout", action="store_true", help="Do not evaluate the models on the held-out part."
    )
    d = DemoSettings.from_dict(DARTS_DEMO)  # --search-steps: the darts searches' steps
    ap.add_argument(
        "--methods",
        default="spos",
        help="Search methods of the searched models, comma-separated: darts (qnas search --method "
        "darts, models named quantnas_T), spos (--method spos, spos_T), spos_evo (--method spos "
        "--select evolution, spos_evo_T) or spos_ops (spos_T's bits, then the space's own ops searched at "
        "them with --fix-bits, spos_ops_T).",
    )
    ap.add_argument(
        "--search-mode",
        default="quant",
        choices=("noise", "quant"),
        help="qnas search --mode: quantization noise (QuantNAS) or direct quantization.",
    )
    ap.add_argument("--search-steps", type=int, default=d.search_steps)
    ap.add_argument(
        "--spos-steps",
        type=int,
        default=4000,
        help="Steps of the spos searches (a single-path step costs a fraction of a darts step).",
    )
    ap.add_argument("--search-batch-size", type=int, default=d.search_batch)
    ap.add_argument("--search-patch-size", type=int, default=d.search_patch)
    ap.add_argument("--alpha-lr", type=float, default=d.alpha_lr)
    ap.add_argument("--alpha-warmup", type=float, default=d.alpha_warmup)
    ap.add_argument("--train-steps", type=int, default=d.train_steps)
    ap.add_argument("--batch-size", type=int, default=d.train_batch)
    ap.add_argument("--patch-size", type=int, default=d.train_patch)
    ap.add_argument("--lr", type=float, default=d.train_lr)
    ap.add_argument("--warmup-steps", type=int, default=d.train_warmup)
    ap.add_argument("--grad-clip", type=float, default=d.train_grad_clip)
    ap.add_argument("--only", default=None, help="Comma-separated model-name patterns to run (default all).")
    ap.add_argument("--chunk-minutes", type=float, default=14.0, help="Longest piece of one command.")
    ap.add_argument(
        "--budget-minutes", type=float, default=None, help="Start no new run after this many minutes."
    )
    ap.add_argument("--lock", default=None, metavar="PATH", help="Hold an flock on PATH around each command.")
    ap.add_argument("--no-run", action="store_true", help="Only summarize the runs that exist.")
    ap.add_argument("--dry-run", action="store_true", help="Print the plan (models and seeds) only.")
    return ap.parse_args(argv)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _tag(t: float) -> str:
    return f"{t:g}".replace(".", "p")


def _pick(spec: str, targets: list[float], what: str) -> list[float]:
    """'middle' / 'max' of the targets, or explicit comma-separated GBitOps."""
    if spec == "middle":
        return [sorted(targets)[len(targets) // 2]]
    if spec == "max":
        return [max(targets)]
    if spec == "all":
        return sorted(targets)
    if spec == "none":
        return []
    try:
        return _floats(spec)
    except ValueError:
        raise SystemExit(f"{what}: expected 'middle', 'max' or numbers, got {spec!r}") from None


def plan(args: argparse.Namespace, targets: list[float]) -> list[dict]:
    """Every (model, seed) to make, in the order they run: the searched models and the hand-made
    baselines (each width) seed by seed (so that a cut-short run still has whole seeds), then the
    controls (w8a8, bits-only searches, random genotypes, searches over the space's own ops, the
    search without a cost term) at --control-seeds. `targets`: the searches' GBitOps (resolve_targets)."""
    seeds, controls = _ints(args.seeds), _ints(args.control_seeds)
    methods = _methods(args.methods)
    widths = _search_widths(args, targets)
    main_models = []
    for method in methods:
        prefix = "quantnas" if method == "darts" else method
        main_models += [
            {"name": f"{prefix}_{_tag(t)}", "kind": "searched", "target": t, "method": method, "width": w}
            for t, w in zip(targets, widths, strict=True)
        ]
    for w in _ints(args.widths):
        for family in _families(args.handmade):
            main_models.append(
                {**family, "name": f"uniform_{family['name']}_c{w}", "kind": HANDMADE, "width": w}
            )
    width_at = dict(zip(targets, widths, strict=True))

    def at_targets(kind: str, spec: str, option: str, **extra) -> list[dict]:
        """A control of `kind` at each target `spec` picks, in the space its target is searched in."""
        return [
            {"name": f"{kind}_{_tag(t)}", "kind": kind, "target": t, "width": width_at.get(t), **extra}
            for t in _pick(spec, targets, option)
        ]

    first = methods[0]  # the controls' search method
    control_models = [{"name": "uniform_w8a8", "kind": HANDMADE, "bits": 8}]
    control_models += at_targets("bits_only", args.bits_only_target, "--bits-only-target", method=first)
    control_models += at_targets("random", args.random_targets, "--random-targets")
    if searched_ops(args) is not None:
        control_models += at_targets("joint", args.joint_targets, "--joint-targets", method=first)
    if not args.no_free:
        control_models.append({"name": "free_search", "kind": "free", "target": None, "method": first})
    out = [{**m, "seed": s} for s in seeds for m in main_models]
    out += [{**m, "seed": s} for s in controls for m in control_models]
    if args.only:
        pats = args.only.split(",")
        out = [r for r in out if any(fnmatch.fnmatchcase(r["name"], p) for p in pats)]
    return out


def searched_ops(args: argparse.Namespace) -> str | None:
    """--search-ops: the searched models' candidate ops, None for the space's own ('space')."""
    return None if args.search_ops == "space" else args.search_ops


def width_space(args: argparse.Namespace, out: Path, width: int | None, ops: str | None = None) -> str:
    """The search space at `width` channels, its candidates `ops` when given (a JSON file in
    OUT/spaces), or --space itself."""
    if width is None and ops is None:
        return str(args.space)
    from qnas.spaces import load_space

    space = load_space(args.space)
    if width is not None:
        space["channels"] = int(width)
        space["name"] = f"{space['name']}_c{width}"
    if ops is not None:
        space["candidates"] = ops.split(",")
        space["name"] = f"{space['name']}_{ops.replace(',', '_')}"
    path = out / "spaces" / f"{space['name']}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(space, indent=1) + "\n")
    return str(path)


def uniform_genotype(
    runner: Runner, args: argparse.Namespace, out: Path, bits: int, width: int | None
) -> Path:
    """`qnas genotype --op conv3x3 --bits B` in the space at `width` channels, made once."""
    gdir = out / "genotypes"
    gdir.mkdir(parents=True, exist_ok=True)
    path = gdir / (f"uniform_w{bits}a{bits}" + (f"_c{width}" if width is not None else "") + ".json")
    if not path.exists():
        cmd = ["genotype", "--space", width_space(args, out, width), "--scale", str(SCALE)]
        cmd += ["--lr-size", args.lr_size, "--op", "conv3x3", "--bits", str(bits), "--out", str(path)]
        code, _, _, text = runner.qnas(cmd)
        if code != 0:
            raise SystemExit(f"uniform w{bits}a{bits} at {width} channels: qnas genotype exited with {code}")
        print(text.strip(), flush=True)
    return path


def resolve_targets(runner: Runner, args: argparse.Namespace, out: Path) -> list[float]:
    """--targets as GBitOps; 'auto': uniform w4a4's BitOps at each of --widths, rounded down to
    0.1 G (the search lands at or below its target, so each baseline costs at least as much)."""
    if args.targets != "auto":
        return _floats(args.targets)
    targets = []
    for w in _ints(args.widths):
        g = json.loads(uniform_genotype(runner, args, out, 4, w).read_text())
        targets.append(math.floor(g["cost"]["bitops"] / 1e8) / 10)
    return targets


def search_cmd(
    args: argparse.Namespace, item: dict, train_dir: Path, out: Path, fix_bits: Path | None = None
) -> list[str]:
    """The `qnas search` of a searched model or control; `fix_bits`: spos_ops's second stage, which
    searches the space's own ops at the bits of that genotype."""
    space = width_space(args, out, item.get("width"))
    cmd = ["search", "--space", space, "--data", str(train_dir), "--scale", str(SCALE)]
    steps = args.spos_steps if item.get("method", "darts") != "darts" else args.search_steps
    cmd += ["--steps", str(steps), "--batch-size", str(args.search_batch_size)]
    cmd += ["--patch-size", str(args.search_patch_size), "--alpha-lr", str(args.alpha_lr)]
    cmd += ["--alpha-warmup", str(args.alpha_warmup), "--lr-size", args.lr_size, "--seed", str(item["seed"])]
    if item["target"] is not None:
        cmd += ["--target-gbitops", f"{item['target']:g}"]
    cmd += ["--bits", args.search_bits, "--mode", args.search_mode]
    if item["kind"] == "bits_only":
        cmd += ["--ops", "conv3x3"]
    elif item["kind"] in ("searched", "free") and searched_ops(args) is not None and fix_bits is None:
        cmd += ["--ops", searched_ops(args)]
    if fix_bits is not None:
        cmd += ["--fix-bits", str(fix_bits)]
    if item.get("method", "darts") != "darts":
        cmd += ["--method", "spos", "--select-batches", "4", "--select-contexts", "8"]
    if item.get("method") == "spos_evo":
        cmd += ["--select", "evolution"]
    return cmd


def _search_widths(args: argparse.Namespace, targets: list[float]) -> list[int | None]:
    """--search-widths as one channel count (None: the space's own) per target. 'wider' (with --targets
    auto): each target's uniform w4a4 width one step up --widths, the last one x sqrt(2)."""
    text = args.search_widths
    if text == "space":
        return [None] * len(targets)
    if text == "wider":
        if args.targets != "auto":
            raise SystemExit("--search-widths wider needs --targets auto (give the widths instead)")
        w = _ints(args.widths)
        return [*w[1:], round(w[-1] * math.sqrt(2))]
    widths = _ints(text)
    if len(widths) == 1:
        return widths * len(targets)
    if len(widths) != len(targets):
        raise SystemExit(f"--search-widths: {len(widths)} widths for {len(targets)} targets")
    return widths


def _families(text: str) -> list[dict]:
    """--handmade: [{"name", "bits", "edge_bits"?}] from 'w4a4,w4a4_fl8,...'."""
    out = []
    for f in (f.strip() for f in text.split(",") if f.strip()):
        m = re.fullmatch(r"w(\d+)a(\d+)(_fl8)?", f)
        if not m or m.group(1) != m.group(2):
            raise SystemExit(f"--handmade: expected wBaB or wBaB_fl8 (tied bits), got {f!r}")
        out.append({"name": f, "bits": int(m.group(1)), **({"edge_bits": 8} if m.group(3) else {})})
    return out


def _methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SystemExit(f"--methods: expected some of {', '.join(METHODS)}, got {text!r}")
    return methods


def train_cmd(args: argparse.Namespace, genotype: Path, train_dir: Path, seed: int) -> list[str]:
    return [
        "train", "--arch", str(genotype), "--data", str(train_dir), "--steps", str(args.train_steps),
        "--batch-size", str(args.batch_size), "--patch-size", str(args.patch_size), "--lr", str(args.lr),
        "--warmup-steps", str(args.warmup_steps), "--grad-clip", str(args.grad_clip), "--seed", str(seed),
        "--checkpoint-every", "100",
    ]  # fmt: skip


def edge_layers_at(genotype: dict, bits: int) -> dict:
    """A copy of `genotype` whose first layer (it reads the image) and last layer (it writes the
    output) run at `bits` bits: the common hand-made mixed-precision baseline."""
    g = json.loads(json.dumps(genotype))
    names = list(g["layers"])
    for name in (names[0], names[-1]):
        g["layers"][name] = {**g["layers"][name], "w_bits": int(bits), "a_bits": int(bits)}
    g.pop("cost", None)
    return g


def make_genotype(runner: Runner, args: argparse.Namespace, item: dict, out: Path, train_dir: Path) -> Path:
    """The genotype file of one (model, seed), made if missing: a search run, `qnas genotype`, or
    the uniform genotype with its edge layers edited."""
    if item["kind"] in SEARCH_KINDS:
        fix_bits = None
        if item.get("method") == "spos_ops":  # first stage: the spos search of the bits (shared with spos_T)
            first = {**item, "method": "spos", "name": f"spos_{_tag(item['target'])}"}
            fix_bits = make_genotype(runner, args, first, out, train_dir)
        cmd = search_cmd(args, item, train_dir, out, fix_bits)
        row = {"name": f"{item['name']}_seed{item['seed']}", "cmd": cmd}
        row.update(resumable=True, done="genotype.json")
        make_run(runner, row, out / "search", args.chunk_minutes * 60)
        return out / "search" / row["name"] / "genotype.json"
    gdir = out / "genotypes"
    gdir.mkdir(parents=True, exist_ok=True)
    if item["kind"] == "random":
        path = gdir / f"{item['name']}_seed{item['seed']}.json"
        if not path.exists():
            space = width_space(args, out, item.get("width"), searched_ops(args))
            cmd = ["genotype", "--space", space, "--scale", str(SCALE), "--lr-size", args.lr_size]
            cmd += ["--random", "--target-gbitops", f"{item['target']:g}", "--seed", str(item["seed"])]
            cmd += ["--bits", args.search_bits]
            code, _, _, text = runner.qnas([*cmd, "--out", str(path)])
            if code != 0:
                raise SystemExit(f"{item['name']}: qnas genotype exited with {code}")
            print(text.strip(), flush=True)
    else:
        path = uniform_genotype(runner, args, out, item["bits"], item.get("width"))
    if item.get("edge_bits"):
        edited = gdir / f"{item['name']}.json"
        if not edited.exists():
            g = edge_layers_at(json.loads(path.read_text()), item["edge_bits"])
            edited.write_text(json.dumps(g, indent=2) + "\n")
        path = edited
    return path


def first_stage_run(out: Path, item: dict) -> Path:
    """The bits search a spos_ops model's op search started from (the spos model's search run)."""
    return out / "search" / f"spos_{_tag(item['target'])}_seed{item['seed']}"


def eval_folders(args: argparse.Namespace, out: Path) -> dict[str, Path]:
    tests = {s: args.data / s for s in args.test_sets.split(",")}
    return tests if args.no_heldout else {HELDOUT: out / "data" / HELDOUT, **tests}


def measure(runner: Runner, run: Path, what: list[str], sets: dict[str, Path], name: str) -> dict:
    """{set: `qnas eval --format json` result}, cached in RUN/eval_<set>.json."""
    return {
        s: cached_json(
            runner, run / f"eval_{s}.json", ["eval", *what, "--data", str(f), "--format", "json"], name
        )
        for s, f in sets.items()
    }


def search_health(search_run: Path) -> dict | None:
    """Per slot, the median |gradient| of the loss and of the cost terms on the alphas over the second
    half of a search (qnas.nas.plots.health_summary), from its metrics.jsonl; None without a search."""
    path = search_run / "metrics.jsonl"
    if not path.exists():
        return None
    from qnas.nas.plots import health_summary

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return health_summary(rows) or None


def genotype_text(layers: dict | None) -> str:
    """'op@w/a' per slot, in the genotype's order."""
    if not layers:
        return "–"
    return ", ".join(f"{slot} {v['op']}@{v['w_bits']}/{v['a_bits']}" for slot, v in layers.items())


def _read(path: Path) -> float | None:
    return float(path.read_text()) if path.exists() else None


def collect(runner: Runner, args: argparse.Namespace, out: Path, items: list[dict], run_new: bool) -> dict:
    """Makes (when run_new) and measures every item; returns the results.json document."""
    train_dir = out / "data" / "train"
    sets = eval_folders(args, out)
    t_start = time.monotonic()
    doc: dict = {
        "scale": SCALE,
        "lr_size": args.lr_size,
        "test_sets": args.test_sets.split(","),
        "models": {},
    }
    bic = out / "bicubic"
    bic.mkdir(parents=True, exist_ok=True)
    doc["bicubic"] = measure(runner, bic, ["--model", "bicubic", "--scale", str(SCALE)], sets, "bicubic")
    for item in items:
        run = out / "train" / f"{item['name']}_seed{item['seed']}"
        finished = (run / "model.pt").exists()
        if not finished:
            over = args.budget_minutes is not None and time.monotonic() - t_start > args.budget_minutes * 60
            if not run_new or over:
                continue
            genotype = make_genotype(runner, args, item, out, train_dir)
            row = {
                "name": run.name,
                "cmd": train_cmd(args, genotype, train_dir, item["seed"]),
                "resumable": True,
            }
            make_run(runner, row, out / "train", args.chunk_minutes * 60)
        elif not all((run / f"eval_{s}.json").exists() for s in sets) and not run_new:
            continue
        res = measure(runner, run, ["--checkpoint", str(run)], sets, run.name)
        cost_args = ["cost", "--checkpoint", str(run), "--lr-size", args.lr_size, "--format", "json"]
        cost = cached_json(runner, run / "cost.json", cost_args, run.name)
        search_run = out / "search" / run.name
        model = doc["models"].setdefault(
            item["name"], {"kind": item["kind"], "target_gbitops": item.get("target"), "seeds": {}}
        )
        blob = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
        layers = blob.get("network", {}).get("genotype", {}).get("layers")
        model["seeds"][str(item["seed"])] = {
            "gbitops": cost["bitops"] / 1e9,
            "params": cost.get("params"),
            "layers": layers,
            "health": search_health(search_run),
            "cpu_s": {
                "search": _read(search_run / "cpu_s"),
                **(
                    {"first_stage": _read(first_stage_run(out, item) / "cpu_s")}
                    if item.get("method") == "spos_ops"
                    else {}
                ),
                "train": _read(run / "cpu_s"),
                "eval": _read(run / "eval_cpu_s"),
            },
            "wall_s": {"search": _read(search_run / "wall_s"), "train": _read(run / "wall_s")},
            "sets": {s: {k: r[k] for k in ("psnr", "ssim", "images")} for s, r in res.items()},
        }
        print(
            f"[{now()}] {run.name}: " + ", ".join(f"{s} {r['psnr']:.2f}" for s, r in res.items()), flush=True
        )
    return doc


# ------------------------------------------------------------------------------------------------
# Summary (pure functions of results.json)


def model_summary(model: dict, sets: list[str]) -> dict:
    """Means over the seeds: per set PSNR/SSIM, their average over `sets` (each set weighted
    equally), its standard error over the seeds (None with one seed), GBitOps and CPU seconds."""
    seeds = sorted(model["seeds"], key=int)
    runs = [model["seeds"][s] for s in seeds]
    out: dict = {"seeds": [int(s) for s in seeds], "sets": {}}
    for s in {k for r in runs for k in r["sets"]}:
        out["sets"][s] = {k: statistics.mean(r["sets"][s][k] for r in runs) for k in ("psnr", "ssim")}
    per_seed = [statistics.mean(r["sets"][s]["psnr"] for s in sets) for r in runs]
    out["avg_psnr"] = statistics.mean(per_seed)
    out["avg_ssim"] = statistics.mean(statistics.mean(r["sets"][s]["ssim"] for s in sets) for r in runs)
    out["avg_psnr_se"] = statistics.stdev(per_seed) / math.sqrt(len(runs)) if len(runs) > 1 else None
    out["gbitops"] = statistics.mean(r["gbitops"] for r in runs)
    cpu = [sum(v for v in r["cpu_s"].values() if v) for r in runs]
    out["cpu_s"] = statistics.mean(cpu)
    return out


def paired_difference(a: dict, b: dict, sets: list[str]) -> dict | None:
    """PSNR of model a minus model b, paired by image and seed (the seeds both have).

    Per set: the mean over the (seed, image) pairs, and two standard errors: over those pairs
    (stdev / sqrt(pairs): the spread between images) and over the seeds (stdev of the per-seed mean
    differences / sqrt(seeds): how much retraining with another seed moves the margin). "se" is the
    larger of the two; a margin under 2 se is a tie. "avg" is the same for the mean of the sets'
    means (the image standard errors combined as independent, sqrt(sum se^2) / number of sets)."""
    seeds = sorted(set(a["seeds"]) & set(b["seeds"]), key=int)
    if not seeds:
        return None
    out: dict = {"seeds": [int(s) for s in seeds], "sets": {}}
    per_seed_avg = {s: 0.0 for s in seeds}
    for name in sets:
        diffs, seed_means = [], []
        for s in seeds:
            pa = {im["name"]: im["psnr"] for im in a["seeds"][s]["sets"][name]["images"]}
            pb = {im["name"]: im["psnr"] for im in b["seeds"][s]["sets"][name]["images"]}
            if set(pa) != set(pb):
                raise ValueError(f"{name}: the two models were evaluated on different images")
            d = [pa[k] - pb[k] for k in sorted(pa)]
            diffs += d
            seed_means.append(statistics.mean(d))
            per_seed_avg[s] += statistics.mean(d) / len(sets)
        se_img = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
        se_seed = statistics.stdev(seed_means) / math.sqrt(len(seeds)) if len(seeds) > 1 else None
        out["sets"][name] = _verdict(statistics.mean(diffs), se_img, se_seed, len(diffs))
    se_img = math.sqrt(sum(out["sets"][n]["se_image"] ** 2 for n in sets)) / len(sets)
    vals = list(per_seed_avg.values())
    se_seed = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else None
    out["avg"] = _verdict(statistics.mean(vals), se_img, se_seed, None)
    return out


def _verdict(mean: float, se_image: float, se_seed: float | None, n: int | None) -> dict:
    se = max(se_image, se_seed) if se_seed is not None else se_image
    verdict = "win" if mean > 2 * se else ("loss" if mean < -2 * se else "tie")
    return {"mean": mean, "se_image": se_image, "se_seed": se_seed, "se": se, "pairs": n, "verdict": verdict}


def comparisons(doc: dict) -> list[tuple[str, str, dict]]:
    """(a, b, paired_difference) for every searched or control model against every hand-made
    baseline, and every searched model against the random genotype and bits-only search at its target."""
    models, sets = doc["models"], doc["test_sets"]
    base = [n for n, m in models.items() if m["kind"] == HANDMADE]
    out = []
    for n, m in models.items():
        if m["kind"] == HANDMADE:
            continue
        others = list(base)
        if m["kind"] == "searched":
            others += [
                o for o, mo in models.items()
                if mo["kind"] in ("random", "bits_only", "joint") and mo["target_gbitops"] == m["target_gbitops"]
            ]  # fmt: skip
        for o in others:
            d = paired_difference(m, models[o], sets)
            if d is not None:
                out.append((n, o, d))
    return out


#: The margin a searched model must have over a hand-made one at no more BitOps to dominate it (dB),
#: with the paired standard error below half of it.
DOMINANCE_MARGIN = 0.1


def baseline_family(name: str) -> str:
    """The hand-made family a baseline belongs to: its name without the width (uniform_w4a4_c24 ->
    uniform_w4a4)."""
    head, _, tail = name.rpartition("_c")
    return head if head and tail.isdigit() else name


def dominance(doc: dict, summary: dict) -> list[dict]:
    """Each searched model against the cheapest model of each hand-made family that costs at least
    as much (mean GBitOps over seeds): the paired average margin, and "dominates" when it is at least
    DOMINANCE_MARGIN with the standard error below half of it."""
    models, sets = doc["models"], doc["test_sets"]
    handmade = [n for n, m in models.items() if m["kind"] == HANDMADE]
    rows = []
    for n, m in models.items():
        if m["kind"] != "searched":
            continue
        cost = summary["models"][n]["gbitops"]
        for family in sorted({baseline_family(b) for b in handmade}):
            above = [
                b
                for b in handmade
                if baseline_family(b) == family and summary["models"][b]["gbitops"] >= cost
            ]
            if not above:
                continue
            b = min(above, key=lambda x: summary["models"][x]["gbitops"])
            d = paired_difference(m, models[b], sets)
            if d is None:
                continue
            avg = d["avg"]
            rows.append({
                "searched": n, "baseline": b, "gbitops": cost, "baseline_gbitops": summary["models"][b]["gbitops"],
                "margin": avg["mean"], "se": avg["se"],
                "dominates": avg["mean"] >= DOMINANCE_MARGIN and avg["se"] < avg["mean"] / 2,
            })  # fmt: skip
    return rows


def summarize(doc: dict) -> dict:
    sets = doc["test_sets"]
    summary = {"models": {n: model_summary(m, sets) for n, m in doc["models"].items()}}
    b = doc["bicubic"]
    summary["bicubic"] = {
        "sets": {s: {k: b[s][k] for k in ("psnr", "ssim")} for s in b},
        "avg_psnr": statistics.mean(b[s]["psnr"] for s in sets),
        "avg_ssim": statistics.mean(b[s]["ssim"] for s in sets),
    }
    summary["comparisons"] = [{"a": a, "b": o, **d} for a, o, d in comparisons(doc)]
    summary["dominance"] = dominance(doc, summary)
    return summary


def _pm(d: dict, digits: int = 2) -> str:
    return f"{d['mean']:+.{digits}f} ± {d['se']:.{digits}f}".replace("-", "−")


def markdown(doc: dict, summary: dict) -> str:
    sets = doc["test_sets"]
    cols = [*sets, HELDOUT]
    lines = [
        "| model | kind | seeds | GBitOps | "
        + " | ".join(f"{s} PSNR / SSIM" for s in cols[:-1])
        + " | average of the 3 | held-out | CPU per seed |",
        "|---|---|---|---:|" + "---|" * len(sets) + "---|---|---:|",
    ]
    bic = summary["bicubic"]
    cells = [f"{bic['sets'][s]['psnr']:.2f} / {bic['sets'][s]['ssim']:.4f}" for s in sets]
    held = bic["sets"].get(HELDOUT)
    lines.append(
        f"| bicubic | – | – | – | {' | '.join(cells)} | {bic['avg_psnr']:.2f} / {bic['avg_ssim']:.4f} | "
        f"{held['psnr']:.2f} |  |"
        if held
        else f"| bicubic | – | – | – | {' | '.join(cells)} | {bic['avg_psnr']:.2f} |  |  |"
    )
    for name, m in sorted(summary["models"].items(), key=lambda kv: kv[1]["gbitops"]):
        cells = [f"{m['sets'][s]['psnr']:.2f} / {m['sets'][s]['ssim']:.4f}" for s in sets]
        avg = f"{m['avg_psnr']:.2f}" + (f" ± {m['avg_psnr_se']:.2f}" if m["avg_psnr_se"] is not None else "")
        held = f"{m['sets'][HELDOUT]['psnr']:.2f}" if HELDOUT in m["sets"] else "–"
        seeds = ",".join(map(str, m["seeds"]))
        kind = doc["models"][name]["kind"]
        lines.append(
            f"| {name} | {kind} | {seeds} | {m['gbitops']:.1f} | {' | '.join(cells)} | "
            f"{avg} / {m['avg_ssim']:.4f} | {held} | {fmt_cpu(m['cpu_s'])} |"
        )
    lines += [
        "",
        "Paired PSNR differences (dB, model − baseline, same image and seed; ± the larger of the image "
        "and seed standard errors; a margin under 2 SE is a tie):",
        "",
        "| model | vs | seeds | " + " | ".join(sets) + " | average | verdict |",
        "|---|---|---|" + "---|" * len(sets) + "---|---|",
    ]
    for c in summary["comparisons"]:
        cells = " | ".join(_pm(c["sets"][s]) for s in sets)
        seeds = ",".join(map(str, c["seeds"]))
        lines.append(f"| {c['a']} | {c['b']} | {seeds} | {cells} | {_pm(c['avg'])} | {c['avg']['verdict']} |")
    searched = [
        (n, s, r) for n, m in doc["models"].items() if m["kind"] in SEARCH_KINDS
        for s, r in sorted(m["seeds"].items(), key=lambda kv: int(kv[0]))
    ]  # fmt: skip
    if searched:
        lines += [
            "",
            "What each search chose (slot op@weight/activation bits) and its health: per slot the ratio of "
            "the loss gradient's to the cost terms' gradient on the alphas (median, second half of the search; "
            "> 1: the loss decides more than the cost):",
            "",
            "| model | seed | GBitOps | genotype | loss/cost gradient ratio per slot |",
            "|---|---|---:|---|---|",
        ]
        for n, seed, r in searched:
            health = r.get("health") or {}
            ratios = ", ".join(f"{k} {v['ratio']:.2g}" for k, v in health.items()) or "–"
            lines.append(
                f"| {n} | {seed} | {r['gbitops']:.1f} | {genotype_text(r.get('layers'))} | {ratios} |"
            )
    rows = summary.get("dominance", [])
    if rows:
        lines += [
            "",
            f"Each searched model against the cheapest model of each hand-made family that costs at least as "
            f"much (average of the test sets; dominates: margin >= {DOMINANCE_MARGIN} dB with SE below half of it):",
            "",
            "| searched | GBitOps | baseline | GBitOps | margin (dB) | dominates |",
            "|---|---:|---|---:|---|---|",
        ]
        for r in rows:
            margin = f"{r['margin']:+.2f} ± {r['se']:.2f}".replace("-", "−")
            lines.append(
                f"| {r['searched']} | {r['gbitops']:.1f} | {r['baseline']} | {r['baseline_gbitops']:.1f} | "
                f"{margin} | {'yes' if r['dominates'] else 'no'} |"
            )
        targets = sorted({r["searched"] for r in rows})
        won = [t for t in targets if all(r["dominates"] for r in rows if r["searched"] == t)]
        lines += ["", f"Searched models that dominate every hand-made family at their cost: {len(won)} of {len(targets)}"
                  + (f" ({', '.join(won)})" if won else "") + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


KIND_STYLE = {
    "searched": ("tab:red", "o", "searched (qnas search)"),
    HANDMADE: ("tab:blue", "s", "hand-made (conv3x3)"),
    "bits_only": ("tab:green", "^", "bits-only search"),
    "joint": ("tab:orange", "D", "search of ops and bits"),
    "random": ("tab:gray", "x", "random genotype"),
    "free": ("tab:purple", "v", "search without a cost term"),
}


def plot(doc: dict, summary: dict, path: Path) -> None:
    """Average PSNR of the test sets against GBitOps (log axis), standard error over the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=100)
    seen = set()
    for name, m in summary["models"].items():
        kind = doc["models"][name]["kind"]
        color, marker, label = KIND_STYLE.get(kind, ("black", "d", kind))
        ax.errorbar(
            m["gbitops"], m["avg_psnr"], yerr=m["avg_psnr_se"] or 0, color=color, marker=marker,
            capsize=3, linestyle="none", label=None if kind in seen else label,
        )  # fmt: skip
        seen.add(kind)
        ax.annotate(
            name, (m["gbitops"], m["avg_psnr"]), fontsize=7, xytext=(4, 3), textcoords="offset points"
        )
    ax.axhline(summary["bicubic"]["avg_psnr"], color="black", linestyle=":", label="bicubic")
    ax.set_xscale("log")
    ax.set_xlabel(f"GBitOps (LR {doc['lr_size']}, x{doc['scale']})")
    ax.set_ylabel(f"PSNR-Y (dB), mean of {', '.join(doc['test_sets'])}")
    ax.set_title("Searched vs hand-made quantized networks (mean ± SE over seeds)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(os.path.abspath(args.out))
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.lock)
    items = plan(args, resolve_targets(runner, args, out))
    if args.dry_run:
        for it in items:
            print(f"{it['name']} seed {it['seed']}")
        return
    missing = [s for s in (args.train_set, *args.test_sets.split(",")) if not (args.data / s).is_dir()]
    if missing:
        raise SystemExit(f"{args.data}: no {', '.join(missing)} folder (docs/RESULTS.md: the data)")
    args.data = Path(os.path.abspath(args.data))
    split = [sys.executable, str(ROOT / "scripts" / "split_images.py"), str(args.data / args.train_set)]
    subprocess.run([*split, str(out / "data"), "--every", "5", "--lr-scales", str(SCALE)], check=True)
    t0 = time.monotonic()
    doc = collect(runner, args, out, items, run_new=not args.no_run)
    doc["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    doc["settings"].update(data="DATA", out="OUT")
    doc["wall_s_this_invocation"] = time.monotonic() - t0
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    summary = summarize(doc)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = markdown(doc, summary)
    (out / "summary.md").write_text(text)
    if summary["models"]:
        plot(doc, summary, out / "pareto.png")
    print(text)


if __name__ == "__main__":
    main()
