"""`qnas report`: evaluate trained runs (and bicubic) on validation images and compare PSNR with BitOps.

Writes DIR/report.json ({"data", "scale", "lr_size", "models": [{"name", "run", "kind", "psnr", "ssim",
"bitops", "macs", "params", "weight_bytes", "bits", "pareto"}], "pareto": [names]}), DIR/pareto.png and
DIR/report.md (the same table in markdown). BitOps are counted by qnas.cost at one LR input size for
every model (default 180x320, the LR side of a 720p output at x4), so they compare across runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

import qnas.nas.derive  # noqa: F401  (registers the network kind "genotype")
from qnas.atomic_write import atomic_write_bytes
from qnas.errors import QnasError
from qnas.nas.plots import pareto_front, plot_pareto

BICUBIC = "bicubic"


def _run_entry(run: str, net, blob: dict, data: str, lr_size: tuple[int, int], progress: bool) -> dict:
    from qnas.cost import count_cost
    from qnas.data.datasets import eval_dataset
    from qnas.evaluate import evaluate
    from qnas.runs.network import build_network, network_scale, network_upscaler

    p = Path(run)
    cfg = blob["network"]
    scale = network_scale(cfg)
    result = evaluate(network_upscaler(net), eval_dataset(data, scale), scale, progress=progress, label=run)
    with torch.device("meta"):
        meta_net = build_network(cfg)
    cost = count_cost(meta_net, lr_size)
    bits = sorted({(lc.w_bits, lc.a_bits) for lc in cost.layers if lc.macs})
    entry = {
        "name": p.name if p.is_dir() else p.stem,
        "run": str(run),
        "kind": cfg.get("kind"),
        "psnr": result["psnr"],
        "ssim": result["ssim"],
        "bitops": cost.bitops,
        "macs": cost.macs,
        "params": cost.params,
        "weight_bytes": cost.weight_bytes,
        "bits": [f"w{w}a{a}" for w, a in bits],
        "images": result["images"],
    }
    if cfg.get("kind") == "genotype":
        layers = cfg["genotype"]["layers"]
        entry["layers"] = {s: f"{c['op']} w{c['w_bits']}a{c['a_bits']}" for s, c in layers.items()}
    return entry


def build_report(
    runs: list[str],
    out: str | Path,
    *,
    data: str = "builtin",
    lr_size: tuple[int, int] = (180, 320),
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluates every run (a folder with model.pt, or "bicubic") and writes the report files to `out`.
    Every run is loaded and their scales compared before anything is evaluated."""
    from qnas.data.datasets import eval_dataset
    from qnas.evaluate import bicubic_upscaler, evaluate
    from qnas.runs.network import load_network, network_scale

    if not runs:
        raise QnasError("give at least one RUN (a trained run folder) or 'bicubic'")
    out = Path(out)
    try:  # before any evaluation: an unusable --out must not cost the whole report
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QnasError(f"{out}: cannot create the report folder ({e.strerror})") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise QnasError(f"{out}: the report folder is not writable")
    loaded, scales = {}, {}
    for r in runs:
        if r == BICUBIC or r in loaded:
            continue
        net, blob = load_network(r)
        loaded[r] = (net, blob)
        scales[r] = network_scale(blob["network"])
    if len(set(scales.values())) > 1:
        raise QnasError("runs have different scales: " + ", ".join(f"{r} x{s}" for r, s in scales.items()))
    if not scales:
        raise QnasError("give at least one trained RUN beside 'bicubic' (the scale comes from the runs)")
    scale = next(iter(scales.values()))
    entries = [_run_entry(r, *loaded[r], data, lr_size, progress) for r in loaded]
    names = [e["name"] for e in entries]
    for e in entries:  # disambiguate runs with the same folder name
        if names.count(e["name"]) > 1:
            e["name"] = f"{Path(e['run']).parent.name}/{e['name']}"
    baseline = None
    if BICUBIC in runs:
        res = evaluate(bicubic_upscaler(scale), eval_dataset(data, scale), scale, progress=progress)
        baseline = {
            "name": BICUBIC,
            "run": None,
            "kind": BICUBIC,
            "psnr": res["psnr"],
            "ssim": res["ssim"],
            "bitops": None,
            "macs": None,
            "params": 0,
            "weight_bytes": 0,
            "bits": [],
            "images": res["images"],
        }
    front = pareto_front([e for e in entries if e["bitops"]])
    for e in entries:
        e["pareto"] = e["name"] in front
    models = ([baseline] if baseline else []) + entries
    report = {
        "data": data,
        "split": "validation",
        "scale": scale,
        "lr_size": list(lr_size),
        "models": models,
        "pareto": front,
    }
    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    title = f"x{scale} on {data} (validation images); BitOps at LR {lr_size[0]}x{lr_size[1]}"
    plot_pareto(entries, out / "pareto.png", title=title, baseline=baseline)
    atomic_write_bytes(out / "report.md", (markdown_table(report) + "\n").encode())
    return report


def markdown_table(report: dict) -> str:
    """The report's models as a markdown table, best PSNR first."""
    h, w = report["lr_size"]
    lines = [
        f"x{report['scale']} on `{report['data']}` (validation images), PSNR/SSIM on Y; "
        f"BitOps for one {h}x{w} LR input. `*`: on the Pareto front.",
        "",
        "| model | PSNR (dB) | SSIM | GBitOps | params | bits (w/a) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for m in sorted(report["models"], key=lambda m: -m["psnr"]):
        gb = "-" if m["bitops"] is None else f"{m['bitops'] / 1e9:.2f}"
        star = " *" if m.get("pareto") else ""
        bits = ", ".join(m.get("bits") or []) or "-"
        lines.append(
            f"| {m['name']}{star} | {m['psnr']:.2f} | {m['ssim']:.4f} | {gb} | {m['params']:,} | {bits} |"
        )
    return "\n".join(lines)
