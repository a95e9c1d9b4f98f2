"""Cost of a network at a given LR input size: per-layer and total MACs, parameters, BitOps and
weight memory, counted by forward hooks during one forward pass on a [1, C, H, W] input.

What is counted (docs/models.md has the rules with examples):
- MAC layers: nn.Conv2d / nn.Linear (subclasses included, so quantized convolutions count
  too), MACs = output elements x (C_in / groups) x kh x kw (Linear: x in_features);
  and any module with an attribute `macs_per_output` (MACs = output elements x that number), whose
  submodules are then not counted separately. Batch size 1.
- Listed with 0 MACs: MeanShift, PixelShuffle, Add (skip connections, which FQSR quantizes), and
  any other module holding parameters of its own (BatchNorm, PReLU, ...).
- Bits of a MAC layer: its `w_bits` / `a_bits` attributes when present and not None (0 = full
  precision), else the global `bits` override (weights and activations of every MAC layer), else
  32. BitOps = MACs x b_w x b_a (full precision counts as 32 bits).
- Weight memory = parameters named weight* of MAC layers at b_w bits, every other parameter
  (biases, BN, PReLU, quantizer scales) at 32 bits, in bytes.
- params (the total) is the number of distinct parameters of the model, whether or not the forward
  pass used them; a layer called more than once is listed per call ("name#2"), its parameters once.

Counting works on the meta device (no memory, no arithmetic): `qnas cost` builds the model there.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from qnas.errors import QnasError
from qnas.sr.common import Add, MeanShift

FULL_PRECISION_BITS = 32
_ZERO_MAC_TYPES = (MeanShift, nn.PixelShuffle, Add)


@dataclass
class LayerCost:
    name: str
    type: str
    in_shape: list[int]
    out_shape: list[int]
    kernel: list[int] | None
    macs: int
    params: int
    w_bits: float | None
    a_bits: float | None
    bitops: float
    weight_bytes: float


@dataclass
class ModelCost:
    model: str | None
    scale: int | None
    lr_size: list[int]
    hr_size: list[int] | None
    bits: float | None
    macs: int
    params: int
    bitops: float
    weight_bytes: float
    layers: list[LayerCost] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def format_table(self) -> str:
        """A human-readable table: one row per layer, then the totals."""
        header = [
            "layer",
            "type",
            "in",
            "out",
            "kernel",
            "MACs",
            "params",
            "w/a bits",
            "BitOps",
            "weight bytes",
        ]
        rows = [
            [
                lc.name,
                lc.type,
                "x".join(map(str, lc.in_shape)),
                "x".join(map(str, lc.out_shape)),
                "x".join(map(str, lc.kernel)) if lc.kernel else "",
                _num(lc.macs),
                _num(lc.params),
                f"{_bits(lc.w_bits)}/{_bits(lc.a_bits)}" if lc.macs or lc.a_bits is not None else "",
                _num(lc.bitops),
                _num(lc.weight_bytes),
            ]
            for lc in self.layers
        ]
        rows.append(
            [
                "total",
                "",
                "",
                "",
                "",
                _num(self.macs),
                _num(self.params),
                "",
                _num(self.bitops),
                _num(self.weight_bytes),
            ]
        )
        right = {5, 6, 7, 8, 9}
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def line(r: list[str]) -> str:
            return "  ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()

        what = self.model or "model"
        if self.scale:
            what += f" x{self.scale}"
        size = f"LR {self.lr_size[0]}x{self.lr_size[1]}"
        if self.hr_size:
            size += f" -> HR {self.hr_size[0]}x{self.hr_size[1]}"
        bits = "module bits, else 32" if self.bits is None else f"module bits, else {_bits(self.bits)}"
        rule = "-" * len(line(header))
        return "\n".join(
            [
                f"{what}, {size}, bits: {bits}",
                line(header),
                rule,
                *[line(r) for r in rows[:-1]],
                rule,
                line(rows[-1]),
                f"= {self.macs / 1e9:.3f} GMACs, {self.params / 1e6:.4f} M params, "
                f"{self.bitops / 1e9:.2f} GBitOps, {self.weight_bytes / 2**20:.3f} MiB of weights",
            ]
        )


def _num(v: float) -> str:
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.2f}"


def _bits(b: float | None) -> str:
    if b is None:
        return "-"
    return str(int(b)) if float(b).is_integer() else f"{b:.2f}"


def _is_mac_layer(m: nn.Module) -> bool:
    return getattr(m, "macs_per_output", None) is not None or isinstance(m, (nn.Conv2d, nn.Linear))


def _module_bits(m: nn.Module, attr: str, override: float | None) -> float:
    b = getattr(m, attr, None)
    if isinstance(b, torch.Tensor):
        b = b.item()
    if b is not None:
        return FULL_PRECISION_BITS if b == 0 else b
    return override if override is not None else FULL_PRECISION_BITS


def _macs(m: nn.Module, out: torch.Tensor) -> int:
    per_sample = out.numel() // out.shape[0] if out.dim() else out.numel()
    mpo = getattr(m, "macs_per_output", None)
    if mpo is not None:
        return per_sample * mpo
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        return per_sample * (m.in_channels // m.groups) * kh * kw
    return per_sample * m.in_features  # nn.Linear


def _kernel(m: nn.Module) -> list[int] | None:
    if isinstance(m, nn.Conv2d):
        return list(m.kernel_size)
    k = getattr(m, "kernel_size", None)
    if isinstance(k, int):
        return [k, k]
    if isinstance(k, (tuple, list)) and all(isinstance(v, int) for v in k):
        return list(k)
    return None


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for v in x:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def _shape(t: torch.Tensor | None) -> list[int]:
    return [] if t is None else list(t.shape[1:])  # without the batch dimension


# The largest LR side --lr-size accepts: 16384 pixels (a x4 output of 65536), beyond any image qnas
# is for; counting stays exact and cheap (meta tensors). Commands that run the network on a real
# input of that size pass a smaller limit.
MAX_LR_SIDE = 16384


def parse_lr_size(text: str, max_side: int = MAX_LR_SIDE, option: str = "--lr-size") -> tuple[int, int]:
    """ "HxW" (e.g. "48x48") or "N" (square) -> (H, W), each side in 1..max_side; QnasError naming the
    option and the value otherwise."""
    parts = text.strip().lower().split("x")
    try:
        if len(parts) == 1:
            h = w = int(parts[0])
        elif len(parts) == 2:
            h, w = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise QnasError(f"{option} {text!r} is not HxW with positive integers (e.g. 48x48)") from None
    if h < 1 or w < 1:
        raise QnasError(f"{option} {text!r} is not HxW with positive integers (e.g. 48x48)")
    if max(h, w) > max_side:
        raise QnasError(f"{option} {text!r}: a side is larger than {max_side} pixels")
    return h, w


def count_cost(
    model: nn.Module,
    lr_size: tuple[int, int],
    bits: float | None = None,
    *,
    in_channels: int | None = None,
    name: str | None = None,
) -> ModelCost:
    """Counts `model`'s cost for one [1, C, H, W] input, (H, W) = lr_size, on the model's device
    (build it under `torch.device("meta")` to count without memory or arithmetic).

    bits: the global override for MAC layers without their own w_bits/a_bits (None: 32).
    in_channels: C (default: model.in_channels, else 3). name: the model name for the report
    (default: its registry config name when it has one).
    """
    h, w = lr_size
    if bits is not None and not (0 < bits <= FULL_PRECISION_BITS):
        raise QnasError(f"bits {bits!r} must be in 1..{FULL_PRECISION_BITS}")
    cfg = getattr(model, "qnas_config", None) or {}
    if name is None:
        name = cfg.get("name")
    min_size = getattr(model, "min_input_size", 1)
    if h < min_size or w < min_size:
        raise QnasError(
            f"lr-size {h}x{w} is too small for {name or type(model).__name__} (it needs at least {min_size}x{min_size})"
        )
    scale = getattr(model, "scale", None)
    channels = in_channels or getattr(model, "in_channels", 3)
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32

    # Which modules become rows: MAC layers (their submodules folded into them), the zero-MAC
    # types, and any other module with parameters of its own.
    selected: dict[nn.Module, str] = {}
    units: list[str] = []
    for mod_name, m in model.named_modules():
        if any(mod_name.startswith(u + ".") for u in units):
            continue
        if _is_mac_layer(m):
            units.append(mod_name)
            selected[m] = mod_name
        elif isinstance(m, _ZERO_MAC_TYPES) or next(m.parameters(recurse=False), None) is not None:
            selected.setdefault(m, mod_name)

    layers: list[LayerCost] = []
    calls: dict[nn.Module, int] = {}

    def hook(m: nn.Module, inputs: Any, output: Any) -> None:
        calls[m] = calls.get(m, 0) + 1
        first_call = calls[m] == 1
        out = _first_tensor(output)
        row_name = selected[m] if first_call else f"{selected[m]}#{calls[m]}"
        if _is_mac_layer(m):
            params = list(m.named_parameters())
            w_bits = _module_bits(m, "w_bits", bits)
            a_bits = _module_bits(m, "a_bits", bits)
            macs = _macs(m, out) if out is not None else 0
            bitops = macs * w_bits * a_bits
        else:
            params = list(m.named_parameters(recurse=False))
            w_bits = getattr(m, "w_bits", None) or (FULL_PRECISION_BITS if params else None)
            a_bits = getattr(m, "a_bits", None)
            macs, bitops = 0, 0
        if first_call:
            n_params = sum(p.numel() for _, p in params)
            weight_bytes = sum(
                p.numel()
                * (w_bits if (pn.split(".")[-1].startswith("weight") and macs) else FULL_PRECISION_BITS)
                / 8
                for pn, p in params
            )
        else:
            n_params, weight_bytes = 0, 0
        layers.append(
            LayerCost(
                name=row_name,
                type=type(m).__name__,
                in_shape=_shape(_first_tensor(inputs)),
                out_shape=_shape(out),
                kernel=_kernel(m),
                macs=int(macs),
                params=int(n_params),
                w_bits=w_bits,
                a_bits=a_bits,
                bitops=bitops,
                weight_bytes=weight_bytes,
            )
        )

    handles = [m.register_forward_hook(hook) for m in selected]
    was_training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, channels, h, w, device=device, dtype=dtype))
    finally:
        for hd in handles:
            hd.remove()
        for m, t in was_training.items():
            m.training = t

    def _tidy(v: float) -> float:
        return int(v) if float(v).is_integer() else v

    for lc in layers:
        lc.bitops = _tidy(lc.bitops)
        lc.weight_bytes = _tidy(lc.weight_bytes)
        lc.w_bits = None if lc.w_bits is None else _tidy(lc.w_bits)
        lc.a_bits = None if lc.a_bits is None else _tidy(lc.a_bits)
    # Parameters no forward call reached (unused modules) still count towards the total memory.
    seen = {
        id(p) for m in calls for p in (m.parameters() if _is_mac_layer(m) else m.parameters(recurse=False))
    }
    unused_bytes = sum(p.numel() * FULL_PRECISION_BITS / 8 for p in model.parameters() if id(p) not in seen)
    return ModelCost(
        model=name,
        scale=scale,
        lr_size=[h, w],
        hr_size=[h * scale, w * scale] if isinstance(scale, int) else None,
        bits=bits,
        macs=sum(lc.macs for lc in layers),
        params=sum(p.numel() for p in model.parameters()),
        bitops=_tidy(sum(lc.bitops for lc in layers)),
        weight_bytes=_tidy(sum(lc.weight_bytes for lc in layers) + unused_bytes),
        layers=layers,
    )
