"""Figures of the search and of reports (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: str | Path) -> None:
    import io

    from qnas.atomic_write import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_alphas(net, path: str | Path, title: str = "") -> None:
    """One panel per architecture slot: the probability of every allowed (op, bits) candidate, the argmax
    in a darker colour."""
    probs = {k: v.detach().cpu() for k, v in net.probs().items()}
    slots = list(probs)
    ncols = min(3, len(slots))
    nrows = math.ceil(len(slots) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 2.6 * nrows), squeeze=False)
    for ax, slot in zip(axes.flat, slots, strict=False):
        p = probs[slot]
        allowed = net.allowed(slot)
        labels, values = [], []
        for o, op in enumerate(net.compiled.slots[slot]):
            for i, wb in enumerate(net.w_bits):
                for j, ab in enumerate(net.a_bits):
                    if allowed[o, i, j]:
                        labels.append(f"{op} w{wb}a{ab}" if not net.tie_bits else f"{op} @{wb}")
                        values.append(float(p[o, i, j]))
        best = max(range(len(values)), key=values.__getitem__)
        colors = ["#1f4e79" if k == best else "#8fb3d9" for k in range(len(values))]
        ax.barh(range(len(values)), values, color=colors)
        ax.set_yticks(range(len(values)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(slot, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(slots) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_search_curves(metrics: list[dict], path: str | Path) -> None:
    """Losses, entropy and expected BitOps against the step."""
    if not metrics:
        return
    steps = [m["step"] for m in metrics]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.2))
    axes[0].plot(steps, [m.get("loss", float("nan")) for m in metrics], label="weights (L1)", lw=0.8)
    if any("loss_alpha" in m for m in metrics):
        axes[0].plot(steps, [m.get("loss_alpha", float("nan")) for m in metrics], label="alphas (L1)", lw=0.8)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[0].set_title("loss", fontsize=9)
    axes[1].plot(steps, [m.get("entropy", float("nan")) for m in metrics], lw=0.8)
    ax2 = axes[1].twinx()
    ax2.plot(steps, [m.get("entropy_coef", 0.0) for m in metrics], color="gray", ls="--", lw=0.8)
    axes[1].set_title("entropy Σ H (line), its coefficient (dashed)", fontsize=9)
    axes[2].plot(steps, [m.get("expected_bitops", float("nan")) / 1e9 for m in metrics], lw=0.8)
    axes[2].set_title("expected GBitOps", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    _save(fig, path)


def health_series(metrics: list[dict]) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """Per slot, from a search's metrics: (steps, loss gradient norms, regularizer gradient norms) of
    the architecture steps (search.py logs grad_loss/SLOT and grad_reg/SLOT)."""
    out: dict[str, tuple[list[int], list[float], list[float]]] = {}
    for m in metrics:
        for k, v in m.items():
            if k.startswith("grad_loss/"):
                slot = k[len("grad_loss/") :]
                steps, gl, gr = out.setdefault(slot, ([], [], []))
                steps.append(m["step"])
                gl.append(v)
                gr.append(m.get(f"grad_reg/{slot}", float("nan")))
    return out


def health_summary(metrics: list[dict], last: float = 0.5) -> dict[str, dict[str, float]]:
    """Per slot, over the last `last` fraction of the architecture steps: the median loss and regularizer
    gradient norms and their ratio (loss / regularizer; > 1: the loss decides more than the cost)."""
    import statistics

    out = {}
    for slot, (steps, gl, gr) in health_series(metrics).items():
        k = int(len(steps) * (1 - last))
        ml, mr = statistics.median(gl[k:]), statistics.median(gr[k:])
        out[slot] = {"grad_loss": ml, "grad_reg": mr, "ratio": ml / mr if mr > 0 else float("inf")}
    return out


def plot_search_health(metrics: list[dict], path: str | Path, window: int = 10) -> bool:
    """Per slot, the norm of the loss gradient on its alphas and its ratio to the regularizers' gradient
    (entropy and cost term), a moving median over `window` architecture steps. False if nothing was
    logged (no architecture step)."""
    import statistics

    series = health_series(metrics)
    if not series:
        return False

    def smooth(v: list[float]) -> list[float]:
        return [statistics.median(v[max(0, k - window + 1) : k + 1]) for k in range(len(v))]

    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
    for slot, (steps, gl, gr) in series.items():
        axes[0].plot(steps, smooth(gl), lw=0.9, label=slot)
        ratio = [a / b if b > 0 else float("nan") for a, b in zip(gl, gr, strict=True)]
        axes[1].plot(steps, smooth(ratio), lw=0.9, label=slot)
    axes[0].set_title("|loss gradient| on the slot's alphas", fontsize=9)
    axes[1].set_title("|loss gradient| / |regularizer gradient| (above 1: the loss leads)", fontsize=9)
    axes[1].axhline(1.0, color="gray", ls="--", lw=0.8)
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_pareto(models: list[dict], path: str | Path, title: str = "", baseline: dict | None = None) -> None:
    """PSNR against BitOps (log scale) of every model with a cost; the Pareto front as a step line;
    `baseline` (bicubic) as a horizontal line."""
    fig, ax = plt.subplots(figsize=(7, 4.6))
    pts = [m for m in models if m.get("bitops")]
    front = pareto_front(pts)
    for m in pts:
        on = m["name"] in front
        ax.scatter(
            m["bitops"] / 1e9, m["psnr"], s=46 if on else 30, color="#c0392b" if on else "#2e86c1", zorder=3
        )
        ax.annotate(
            m["name"], (m["bitops"] / 1e9, m["psnr"]), textcoords="offset points", xytext=(5, 4), fontsize=8
        )
    fr = sorted((m for m in pts if m["name"] in front), key=lambda m: m["bitops"])
    if len(fr) > 1:
        ax.plot([m["bitops"] / 1e9 for m in fr], [m["psnr"] for m in fr], color="#c0392b", lw=1, zorder=2)
    if baseline is not None:
        ax.axhline(baseline["psnr"], color="gray", ls="--", lw=1)
        ax.annotate(
            baseline["name"],
            (ax.get_xlim()[0], baseline["psnr"]),
            xytext=(4, 3),
            textcoords="offset points",
            fontsize=8,
            color="gray",
        )
    if pts:
        ax.set_xscale("log")
    ax.set_xlabel("GBitOps (lower is cheaper)")
    ax.set_ylabel("PSNR (dB, Y)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def pareto_front(models: list[dict]) -> list[str]:
    """Names of the models no other model beats on both BitOps (lower) and PSNR (higher)."""
    front = []
    for m in models:
        dominated = any(
            o is not m
            and o["bitops"] <= m["bitops"]
            and o["psnr"] >= m["psnr"]
            and (o["bitops"] < m["bitops"] or o["psnr"] > m["psnr"])
            for o in models
        )
        if not dominated:
            front.append(m["name"])
    return front


__all__ = [
    "health_series",
    "health_summary",
    "plot_alphas",
    "plot_pareto",
    "plot_search_curves",
    "plot_search_health",
    "pareto_front",
]
