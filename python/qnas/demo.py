"""`qnas demo` (what `make demo` runs): a small QuantNAS search on the builtin images, the derived network
retrained, and compared with bicubic and the hand-made quantized baselines in one report.

Stages, each in its own run folder under OUT (default runs/demo):

  genotypes/         the fixed architecture (every layer `fixed_op`) at uniform 4 and 8 bits, and at 4 bits
                     with 8-bit first (and last) layers (qnas.nas.derive.uniform_genotype)
  spaces/            the search space at `search_channels` channels, when the settings widen it
  search/            the search: by default the single-path search of the bit-width of every layer of the
                     fixed architecture, {2, 4, 8} bits, in the space one width step wider, chosen by the
                     held-out loss within the BitOps of the strongest hand-made baseline (qnas.nas.search)
  search_bits/       with `bits_search` (differentiable search only): bits per layer of the fixed architecture
  quantnas/          the searched genotype retrained from scratch (qnas train --arch)
  uniform_w4a4/ ...  the hand-made genotypes retrained the same way
  report.json, pareto.png, report.md      qnas report of all of them and bicubic on the validation images
  demo.json          the settings, the seconds of every stage, and the comparison of the searched model
                     with each 4-bit baseline (read from report.json, never assumed)

Every retrained model gets the same retraining (steps, batch, patch, learning rate, seed, quantizers), so the
comparison is between architectures and bit allocations, not training budgets. A rerun skips every stage
whose folder is complete (search: genotype.json; training: model.pt), resumes a stage that was killed
(its checkpoint.pt), and refuses an OUT made with other settings. docs/quantnas.md, "The demo", explains the
chosen settings and what they show; DARTS_DEMO gives QuantNAS's differentiable joint search instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qnas.errors import QnasError

DEMO_FORMAT = "qnas-demo/1"
#: The fixed architecture at 4 bits but its first layer at 8 (the stronger hand-made baseline).
FIRST8 = "uniform_w4a4_first8"
FIRST8_WHAT = "uniform 4-bit with an 8-bit first layer"
#: ... and its last layer (the one that writes the image) at 8 too: the strongest hand-made 4-bit baseline,
#: whose BitOps are the search's target unless the settings give one.
FIRST_LAST8 = "uniform_w4a4_first_last8"
FIRST_LAST8_WHAT = "uniform 4-bit with 8-bit first and last layers"


@dataclass
class DemoSettings:
    """Everything that decides the demo's result (docs/quantnas.md explains the defaults: the search that
    won on the SunHays80 hold-out, "Bit-widths down to 2")."""

    space: str = "basic"
    scale: int = 4
    data: str = "builtin"
    #: The fixed architecture of the baselines: every layer of the space this op (the space's plain conv).
    fixed_op: str = "conv3x3"
    bits: list[int] = field(default_factory=lambda: [2, 4, 8])
    uniform_bits: list[int] = field(default_factory=lambda: [4, 8])
    # -- search
    #: "spos": single-path training of the shared weights, layers chosen by held-out loss; "darts": the
    #: differentiable search of QuantNAS (qnas search --method).
    method: str = "spos"
    #: Candidate ops of the search (None: the space's own list, six ops for "basic"; one op: bits only).
    ops: list[str] | None = field(default_factory=lambda: ["conv3x3"])
    #: Channels of the searched space (None: the space's own). 51 = 36 x sqrt(2): one width step wider
    #: than the baselines, where a 2-bit body pays (docs/quantnas.md).
    search_channels: int | None = 51
    mode: str = "quant"
    search_steps: int = 4000
    search_batch: int = 8
    search_patch: int = 64
    #: spos: random paths each candidate is scored in, and held-out batches it is scored on.
    select_contexts: int = 8
    select_batches: int = 4
    #: BitOps target of the searches at lr_size, in GBitOps (None: the BitOps of FIRST_LAST8, so that
    #: the searched model is compared with the strongest hand-made baseline at equal cost).
    target_gbitops: float | None = None
    #: The paper's BitOps penalty instead of a target (0: off; darts only, not with target_gbitops).
    penalty: float = 0.0
    entropy_coef: float = 1e-3
    alpha_lr: float = 1.5e-2
    alpha_warmup: float = 0.25
    #: A second, bits-only differentiable search of the fixed architecture (darts only: the spos search
    #: of one op is already the bits-only search).
    bits_search: bool = False
    bits_search_steps: int = 150
    # -- retraining, identical for every retrained model
    train_steps: int = 1200
    train_batch: int = 16
    train_patch: int = 64
    train_lr: float = 1e-3
    train_warmup: int = 0
    train_grad_clip: float = 0.0
    act_quantizer: str = "hwgq"
    seed: int = 0
    lr_size: list[int] = field(default_factory=lambda: [180, 320])

    @classmethod
    def from_dict(cls, d: dict) -> DemoSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise QnasError(f"demo settings: unknown keys {unknown} (known: {', '.join(sorted(known))})")
        defaults = dataclasses.asdict(cls())
        for key, value in d.items():
            _check_setting(key, value, defaults[key])
        return cls(**{**defaults, **d})

    def check(self) -> None:
        for b in self.uniform_bits:
            if b != 0 and not 2 <= b <= 8:
                raise QnasError(f"demo settings: uniform_bits {b} is not 0 or 2..8")
        if 4 not in self.uniform_bits:
            raise QnasError("demo settings: uniform_bits must include 4 (the baseline of the comparison)")
        if self.target_gbitops is not None and self.penalty > 0:
            raise QnasError("demo settings: target_gbitops and penalty are alternatives; give one of them")
        if self.method not in ("spos", "darts"):
            raise QnasError(f"demo settings: method {self.method!r} is not 'spos' or 'darts'")
        if self.method == "spos" and (self.penalty > 0 or self.bits_search):
            raise QnasError(
                "demo settings: penalty and bits_search are for method 'darts' (spos uses the target)"
            )


#: The settings of QuantNAS's differentiable joint search (ops and bits {4, 8} in noise mode, the paper's
#: setting, with a bits-only search beside it): `qnas demo --settings FILE` with this object runs it
#: instead of the default single-path bit search (docs/quantnas.md: it loses to the hand-made baselines).
DARTS_DEMO: dict[str, Any] = {
    "method": "darts",
    "ops": None,
    "bits": [4, 8],
    "mode": "noise",
    "search_channels": None,
    "search_steps": 200,
    "bits_search": True,
}


def _check_setting(key: str, value: object, default: object) -> None:
    """A settings value of its default's JSON type; step/batch/patch counts >= 1, other numbers finite
    and >= 0: the demo's last stages use them, so they are checked before the first one runs."""
    bad = QnasError(f"demo settings: {key}={value!r} (expected {type(default).__name__} like {default!r})")
    if key == "search_channels":  # null (the space's own) or a channel count >= 1
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise QnasError(
                f"demo settings: search_channels={value!r} (expected null or a channel count >= 1)"
            )
    elif isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad
    elif isinstance(default, (int, float)):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (isinstance(default, int) and not isinstance(value, int)):
            raise bad
        if not math.isfinite(value) or value < (1 if key.endswith(("_steps", "_batch", "_patch")) else 0):
            raise bad
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise bad
    elif default is None:  # target_gbitops: null or a positive number
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
        ):
            raise bad
    elif isinstance(default, list) and not (isinstance(value, list) or (key == "ops" and value is None)):
        raise bad


def _search_options(
    s: DemoSettings, *, ops: list[str] | None, steps: int, target: float | None, space: str | None = None
):
    """The searches' options; `space` (a space file, the widened space) replaces s.space."""
    from qnas.nas.search import SearchOptions

    return SearchOptions(
        space=s.space if space is None else space,
        ops=ops,
        scale=s.scale,
        data=s.data,
        steps=steps,
        batch_size=s.search_batch,
        patch_size=s.search_patch,
        bits=list(s.bits),
        mode=s.mode,
        penalty=s.penalty,
        target_gbitops=target,
        entropy_coef=s.entropy_coef,
        alpha_lr=s.alpha_lr,
        alpha_warmup=s.alpha_warmup,
        method=s.method,
        select_contexts=s.select_contexts,
        select_batches=s.select_batches,
        seed=s.seed,
        lr_size=list(s.lr_size),
        checkpoint_every=max(1, min(50, steps)),
    )


def _train_options(s: DemoSettings):
    from qnas.train.train import TrainOptions

    return TrainOptions(
        data=s.data,
        scale=s.scale,
        steps=s.train_steps,
        batch_size=s.train_batch,
        patch_size=s.train_patch,
        lr=s.train_lr,
        warmup_steps=s.train_warmup,
        grad_clip=s.train_grad_clip,
        seed=s.seed,
        checkpoint_every=max(1, min(100, s.train_steps)),
    )


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _check_settings(out: Path, settings: DemoSettings) -> None:
    """Records the settings in OUT/demo_settings.json, or checks that OUT was made with the same ones."""
    from qnas.atomic_write import atomic_write_bytes

    path = out / "demo_settings.json"
    mine = json.loads(json.dumps(dataclasses.asdict(settings)))
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise QnasError(f"{path}: corrupt JSON ({e}); remove {out} to start over") from e
        diffs = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
        if diffs:
            raise QnasError(
                f"{out} holds a demo made with other settings ({', '.join(diffs)}); "
                "remove it or choose another --out"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(mine, indent=2) + "\n").encode())


def _search_stage(run: Path, opts, progress: bool) -> bool:
    """Runs (or resumes) one search unless its genotype exists; True when it ran."""
    from qnas.nas.search import search

    if (run / "genotype.json").exists():
        _say(f"{run.name}: done ({run / 'genotype.json'}), skipped", progress)
        return False
    resume = (run / "checkpoint.pt").exists()
    _say(f"{run.name}: {'resuming' if resume else 'running'} {opts.steps} search steps", progress)
    search(opts, run, resume=resume, progress=progress)
    return True


def _train_stage(run: Path, genotype: dict, s: DemoSettings, progress: bool) -> bool:
    """Retrains one genotype (or resumes) unless its model exists; True when it ran."""
    from qnas.nas.derive import genotype_network_config
    from qnas.train.train import train

    if (run / "model.pt").exists():
        _say(f"{run.name}: done ({run / 'model.pt'}), skipped", progress)
        return False
    resume = (run / "checkpoint.pt").exists()
    _say(f"{run.name}: {'resuming' if resume else 'running'} {s.train_steps} training steps", progress)
    train(
        genotype_network_config(genotype, s.act_quantizer),
        _train_options(s),
        run,
        resume=resume,
        progress=progress,
    )
    return True


#: What each baseline is, in the report's sentences.
BASELINE_WHAT = {
    "uniform_w4a4": "uniform 4-bit",
    FIRST8: FIRST8_WHAT,
    FIRST_LAST8: FIRST_LAST8_WHAT,
}


def compare_with_baseline(report: dict, searched: str, baseline: str) -> dict[str, Any]:
    """The searched model against a hand-made baseline, from the report's own per-image numbers: the mean
    PSNR difference, the standard error of the paired per-image differences, the BitOps ratio, and a
    verdict: "wins" (ahead by at least 2 standard errors at no more BitOps), "tie" (within 2 standard
    errors), or "loses" (behind by more)."""
    by_name = {m["name"]: m for m in report["models"]}
    a, b = by_name[searched], by_name[baseline]
    pa = {im["name"]: im["psnr"] for im in a["images"]}
    diffs = [pa[im["name"]] - im["psnr"] for im in b["images"]]
    n = len(diffs)
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else float("nan")
    if abs(mean) < 2 * se or n < 2:
        verdict = "tie"
    else:
        verdict = "wins" if mean > 0 else "loses"
    if verdict == "wins" and a["bitops"] > b["bitops"]:
        verdict = "wins at more BitOps"
    return {
        "searched": searched,
        "baseline": baseline,
        "psnr_delta_db": a["psnr"] - b["psnr"],
        "psnr_delta_se_db": se,
        "images": n,
        "ssim_delta": a["ssim"] - b["ssim"],
        "bitops_ratio": a["bitops"] / b["bitops"],
        "bitops_le": a["bitops"] <= b["bitops"],
        "verdict": verdict,
        "holds": verdict == "wins",
    }


def run_demo(settings: DemoSettings, out: str | Path = "runs/demo", *, progress: bool = True) -> dict:
    """Runs the demo's stages into `out` (skipping finished ones); returns the content of OUT/demo.json."""
    from qnas.atomic_write import atomic_write_bytes
    from qnas.nas.derive import read_genotype, uniform_genotype
    from qnas.nas.report import BICUBIC, build_report, markdown_table
    from qnas.spaces import load_space

    settings.check()
    out = Path(out)
    _check_settings(out, settings)
    t_all = time.perf_counter()
    seconds: dict[str, float] = {}
    ran = False

    def timed(name: str, fn) -> Any:
        nonlocal ran
        t0 = time.perf_counter()
        did = fn()
        if did:
            seconds[name] = round(time.perf_counter() - t0, 1)
            ran = True
        return did

    # 1. the hand-made baselines: the fixed architecture at uniform bits, and with 8-bit first (and last)
    # layers, the common hand-made choice for the layers that read and write the image
    space = load_space(settings.space)
    (out / "genotypes").mkdir(exist_ok=True)
    baselines: dict[str, dict] = {}
    for b in settings.uniform_bits:
        baselines[f"uniform_w{b}a{b}" if b else "float"] = uniform_genotype(
            space, settings.scale, settings.fixed_op, b
        )
    baselines[FIRST8] = layers_at(baselines["uniform_w4a4"], 8, first=True)
    baselines[FIRST_LAST8] = layers_at(baselines["uniform_w4a4"], 8, first=True, last=True)
    for name, g in baselines.items():
        atomic_write_bytes(out / "genotypes" / f"{name}.json", (json.dumps(g, indent=2) + "\n").encode())
    target = search_target(settings, baselines[FIRST_LAST8])
    # 2. the search (in the widened space when search_channels is set), and with bits_search a second,
    # bits-only one on the fixed architecture, at the same target
    searched_space = widened_space(space, settings.search_channels, out / "spaces")
    timed(
        "search",
        lambda: _search_stage(
            out / "search",
            _search_options(
                settings, ops=settings.ops, steps=settings.search_steps, target=target, space=searched_space
            ),
            progress,
        ),
    )
    if settings.bits_search:
        timed(
            "search_bits",
            lambda: _search_stage(
                out / "search_bits",
                _search_options(
                    settings, ops=[settings.fixed_op], steps=settings.bits_search_steps, target=target
                ),
                progress,
            ),
        )
    genotypes: dict[str, dict] = {"quantnas": read_genotype(out / "search")}
    if settings.bits_search:
        genotypes["bits_only"] = read_genotype(out / "search_bits")
    genotypes.update(baselines)
    # 3. retraining, the same for every model
    for name, g in genotypes.items():
        timed(f"train {name}", lambda name=name, g=g: _train_stage(out / name, g, settings, progress))
    # 4. report (redone whenever a stage ran, or when it is missing)
    runs = [BICUBIC] + [str(out / name) for name in genotypes]
    if ran or not (out / "report.json").exists() or not (out / "pareto.png").exists():
        _say("report: evaluating every model on the validation images", progress)
        t0 = time.perf_counter()
        report = build_report(
            runs, out, data=settings.data, lr_size=tuple(settings.lr_size), progress=progress
        )
        seconds["report"] = round(time.perf_counter() - t0, 1)
    else:
        _say("report: done, skipped", progress)
        report = json.loads((out / "report.json").read_text())
    comparisons = [
        compare_with_baseline(report, "quantnas", base)
        for base in ("uniform_w4a4", FIRST8, FIRST_LAST8)
        if base in genotypes
    ]
    previous = json.loads((out / "demo.json").read_text()) if (out / "demo.json").exists() else {}
    stage_seconds = {**previous.get("stage_seconds", {}), **seconds}
    summary = {
        "format": DEMO_FORMAT,
        "settings": dataclasses.asdict(settings),
        "target_gbitops": target,
        "stage_seconds": stage_seconds,
        "seconds_this_call": round(time.perf_counter() - t_all, 1),
        "comparisons": comparisons,
        "models": [m["name"] for m in report["models"]],
    }
    atomic_write_bytes(out / "demo.json", (json.dumps(summary, indent=2) + "\n").encode())
    text = markdown_table(report) + "\n\n" + "\n\n".join(comparison_text(c) for c in comparisons) + "\n"
    atomic_write_bytes(out / "report.md", text.encode())
    return summary


def comparison_text(c: dict) -> str:
    what = BASELINE_WHAT.get(c["baseline"], c["baseline"])
    return (
        f"Searched vs {what} ({c['searched']} vs {c['baseline']}): PSNR {c['psnr_delta_db']:+.3f} dB "
        f"(standard error of the paired per-image differences {c['psnr_delta_se_db']:.3f} dB over "
        f"{c['images']} images), SSIM {c['ssim_delta']:+.4f}, BitOps x{c['bitops_ratio']:.3f}: "
        f"{c['verdict']} (a margin under 2 standard errors is a tie)."
    )


def search_target(settings: DemoSettings, first_last8: dict | None = None) -> float | None:
    """The searches' BitOps target in GBitOps: the settings' own, else (no penalty either) the BitOps of
    the fixed architecture at 4 bits with 8-bit first and last layers (FIRST_LAST8) at lr_size."""
    from qnas.nas.derive import genotype_cost, uniform_genotype
    from qnas.spaces import load_space

    if settings.target_gbitops is not None or settings.penalty > 0:
        return settings.target_gbitops
    if first_last8 is None:
        g4 = uniform_genotype(load_space(settings.space), settings.scale, settings.fixed_op, 4)
        first_last8 = layers_at(g4, 8, first=True, last=True)
    return genotype_cost(first_last8, tuple(settings.lr_size))["bitops"] / 1e9


def widened_space(space: dict, channels: int | None, folder: Path) -> str | None:
    """The space file of `space` at `channels` channels, written once into `folder` (None: no change)."""
    from qnas.atomic_write import atomic_write_bytes

    if channels is None or channels == space["channels"]:
        return None
    wide = {**space, "channels": int(channels), "name": f"{space['name']}_c{channels}"}
    path = folder / f"{wide['name']}.json"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(wide, indent=1) + "\n").encode())
    return str(path)


def layers_at(genotype: dict, bits: int, *, first: bool = False, last: bool = False) -> dict:
    """A copy of `genotype` whose first layer (it reads the image) and/or last layer (it writes the
    image) run at `bits` bits."""
    g = json.loads(json.dumps(genotype))
    slots = list(g["layers"])
    for slot in ([slots[0]] if first else []) + ([slots[-1]] if last else []):
        g["layers"][slot] = {**g["layers"][slot], "w_bits": int(bits), "a_bits": int(bits)}
    return g
