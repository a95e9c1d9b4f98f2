"""Turning a float SR network into a quantized one from a JSON config (the "quant" entry of a
network config, see qnas.runs.network), so `qnas eval --checkpoint` and load_network rebuild it.

A quant config names a scheme and a bit-width; `resolve_plan` expands it into a per-layer plan
(which convolution, skip and output is quantized, with which quantizer, bits and signedness) that
is stored with the run, so rebuilding never depends on probing again:

    {"scheme": "fqsr" | "uniform" | "dqss", "bits": B, ...options...,
     "layers":  {conv name: {"w": {"quantizer", "bits"}, "a": {"quantizer", "bits", "signed"}} or null},
     "adds":    {Add name: {"quantizer", "bits", "signed": [x, y, out]}},       (fqsr)
     "output":  {"quantizer", "bits", "signed"} or null}                       (fqsr)

Schemes (docs/quantization.md):
- "fqsr": FQSR (Wang et al., ACM MM 2021): every convolution's weight and input at B bits except
  the first convolution's input, which is the network input, at `io_bits` (8); every skip
  connection z = Q(Q(x) + Q(y)) at `skip_bits` (default max(B, 8), as the paper's released
  configuration a4w4o8; 4-bit skips cost 1.8 dB before fine-tuning, docs/quantization.md); the
  network output at `io_bits`. All
  quantizers are FQSRQuantizer (learnable clipping, statistics warm-up) and training adds the
  calibration loss `calibration_weight` · mean over quantizers of mean|Q(x) − x|.
- "uniform": the common baseline: weights and inputs of every convolution but the first and the
  last at B bits with one `quantizer` (default lsq); skips, first and last layers in float.
- "dqss": like "uniform" in coverage, with a per-layer weight and activation quantizer chosen by
  the strategy search (qnas.quant.dqss); "layers" must be given.
- "genotype": the network derived from a QuantNAS genotype (qnas.nas.derive): every convolution at
  the bits its layer was searched at, skips and output as in "fqsr"; "layers" must be given, and
  "bits" is not used (each layer has its own).

A weight entry may say "per_channel": true (one step per output channel, as QuantNAS retrains); an
activation entry "asymmetric": true (an affine grid with a zero point, statistics-based quantizers;
qnas.quant.quantizers.AsymmetricQuantizer).
"""

from __future__ import annotations

import copy
import types
from typing import Any

import torch
from torch import nn

from qnas.errors import CheckpointError, QnasError
from qnas.quant.modules import OutputQuantizer, QuantAdd, QuantConv2d, quantizers
from qnas.quant.quantizers import QUANTIZERS, FQSRQuantizer, build_quantizer
from qnas.runs.network import load_network, register_network_kind
from qnas.sr import build_from_config
from qnas.sr.common import Add

SCHEMES = ("fqsr", "uniform", "dqss", "genotype")
#: Schemes whose plan must list its layers (they come from a search, not from probing).
GIVEN_LAYERS = ("dqss", "genotype")
BITS_RANGE = (2, 8)
DISTILL_KEYS = ("distill_weight", "distill_feature_weight")
DEFAULTS: dict[str, dict[str, Any]] = {
    "fqsr": {
        "quantizer": "fqsr",
        "io_bits": 8,
        "skip_bits": None,  # None: max(bits, 8), the paper's released configuration (a4w4o8)
        "warmup": 20,
        "init_stat": "mse",
        "calibration_weight": 0.3,
        "tail_bits": 8,  # bits of the last convolution's input (None: the same as "bits")
        "edge_weight_bits": None,  # bits of the first and last convolutions' weights (None: "bits")
        "teacher": None,  # full-precision run to distil from (`qnas train --init` sets it)
        "distill_weight": 1.0,  # weight of L1(student output, teacher output); 0 = off
        "distill_feature_weight": 0.0,  # weight of the skips' relative feature error; 0 = off
    },
    "uniform": {"quantizer": "lsq"},
    "dqss": {},
    "genotype": {},
}


def check_bits(bits: Any, what: str = "--bits") -> int:
    """bits as an int in BITS_RANGE, else QnasError naming it."""
    lo, hi = BITS_RANGE
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not float(bits).is_integer():
        raise QnasError(f"{what}: expected an integer in {lo}..{hi}, got {bits!r}")
    if not lo <= int(bits) <= hi:
        raise QnasError(f"{what} {int(bits)} is out of range ({lo}..{hi})")
    return int(bits)


def check_quantizer(name: Any, kind: str = "activation") -> str:
    if name not in QUANTIZERS:
        raise QnasError(f"quantizer: unknown {name!r} (known: {', '.join(sorted(QUANTIZERS))})")
    cls = QUANTIZERS[name]
    if kind == "weight" and not cls.weight_ok:
        raise QnasError(f"quantizer: {name!r} quantizes activations only, not weights")
    return name


# ------------------------------------------------------------------------------------------------
# Probing the float network: execution order of convolutions, signs of their inputs, skips


def probe_network(model: nn.Module) -> dict[str, Any]:
    """Forward passes on a random image-like input with hooks: the convolutions in execution order
    with whether their input is non-negative (after a ReLU, or the image itself), and each Add's
    operands and sum likewise. Structural facts, independent of the weights: every convolution's
    output is replaced by seeded values with a large per-channel offset, v = a_c + n, in one pass
    and by -v in a second, and a tensor counts as non-negative only when it is in both. (With the
    network's own random weights a branch's output on one small image is often all positive: its
    quantizer would be unsigned, clip the trained network's negative values, and differ from one
    process to the next.)"""
    convs: dict[str, bool] = {}
    adds: dict[str, list[bool]] = {}
    names = {m: n for n, m in model.named_modules()}
    on_meta = any(p.is_meta for p in model.parameters())
    noise = torch.Generator()
    sign = [1.0]

    def nonneg(t: torch.Tensor) -> bool:
        return (not on_meta) and bool((t.detach() >= 0).all())

    def conv_hook(m, args, out):
        name = names[m]
        convs[name] = convs.get(name, True) and nonneg(args[0])
        if on_meta:
            return None
        shape = [1] * out.dim()
        shape[1] = out.shape[1]
        offset = 4 * torch.randn(shape, generator=noise)
        v = offset + torch.randn(out.shape, generator=noise)
        return (sign[0] * v).to(device=out.device, dtype=out.dtype)

    def add_hook(m, args, out):
        seen = adds.get(names[m], [True, True, True])
        now = [nonneg(args[0]), nonneg(args[1]), nonneg(out)]
        adds[names[m]] = [a and b for a, b in zip(seen, now, strict=True)]

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, Add):
            handles.append(m.register_forward_hook(add_hook))
    size = max(16, int(getattr(model, "min_input_size", 1)))
    channels = int(getattr(model, "in_channels", 3))
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, channels, size, size, generator=g).to(device)
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            for s in (1.0, -1.0) if not on_meta else (1.0,):
                sign[0] = s
                noise.manual_seed(1)  # the same values in both passes, negated in the second
                model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    if not convs:
        raise QnasError(f"{type(model).__name__}: no convolution to quantize")
    return {"convs": convs, "adds": adds}


def resolve_plan(model: nn.Module, quant: dict) -> dict:
    """The full per-layer plan of a quant config (see module docstring); a config that already has
    "layers" is checked and returned as is."""
    if not isinstance(quant, dict):
        raise QnasError("quant config: expected a JSON object")
    scheme = quant.get("scheme")
    if scheme not in SCHEMES:
        raise QnasError(f"quant scheme {scheme!r} is unknown (known: {', '.join(SCHEMES)})")
    plan = {**DEFAULTS[scheme], **copy.deepcopy(quant)}
    if scheme == "fqsr" and not plan.get("teacher"):
        # Distillation is on by default when there is a teacher (fine-tuning from an FP run) and
        # off without one; asked for explicitly without a teacher it is an error (below).
        for key in DISTILL_KEYS:
            if key not in quant:
                plan[key] = 0.0
    if scheme in GIVEN_LAYERS and "layers" not in plan:
        made_by = "`qnas strategy`" if scheme == "dqss" else "qnas.nas.derive"
        raise QnasError(f'quant scheme "{scheme}" needs per-layer "layers" (made by {made_by})')
    if scheme != "genotype":
        bits = check_bits(plan.get("bits"))
    if "layers" in plan:
        return plan
    q = check_quantizer(plan["quantizer"], "weight")
    probe = probe_network(model)
    order = list(probe["convs"])
    first, last = order[0], order[-1]
    layers: dict[str, Any] = {}
    if scheme == "uniform":
        for name, nonneg in probe["convs"].items():
            if name in (first, last):
                layers[name] = None
            else:
                layers[name] = {
                    "w": {"quantizer": q, "bits": bits},
                    "a": {"quantizer": q, "bits": bits, "signed": not nonneg},
                }
        plan.update(layers=layers, adds={}, output=None)
        return plan
    io_bits = check_bits(plan["io_bits"], "io_bits")
    skip_bits = check_bits(plan["skip_bits"] if plan["skip_bits"] is not None else max(bits, 8), "skip_bits")
    tail_bits = check_bits(plan["tail_bits"] if plan["tail_bits"] is not None else bits, "tail_bits")
    edge_w = plan.get("edge_weight_bits")
    edge_w = check_bits(edge_w if edge_w is not None else bits, "edge_weight_bits")
    plan["skip_bits"], plan["tail_bits"], plan["edge_weight_bits"] = skip_bits, tail_bits, edge_w
    for key in ("distill_weight", "distill_feature_weight", "calibration_weight"):
        value = plan.get(key) or 0.0
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise QnasError(f"{key}: expected a number >= 0, got {value!r}")
    if (plan["distill_weight"] or plan["distill_feature_weight"]) and not plan.get("teacher"):
        raise QnasError("distillation needs a full-precision teacher run (`qnas train --init FP_RUN`)")
    for name, nonneg in probe["convs"].items():
        a_bits = io_bits if name == first else (tail_bits if name == last else bits)
        layers[name] = {
            "w": {"quantizer": q, "bits": edge_w if name in (first, last) else bits},
            "a": {"quantizer": q, "bits": a_bits, "signed": not nonneg},
        }
    adds = {
        name: {"quantizer": q, "bits": skip_bits, "signed": [not s for s in signs]}
        for name, signs in probe["adds"].items()
    }
    plan.update(layers=layers, adds=adds, output={"quantizer": q, "bits": io_bits, "signed": False})
    return plan


#: Plan options of the "fqsr" scheme a user may set (`qnas train --quant-options`).
FQSR_OPTIONS = tuple(k for k in DEFAULTS["fqsr"] if k not in ("quantizer", "teacher"))


def fqsr_plan_options(model_cfg: dict, plan: dict, options: dict, teacher: str | None = None) -> dict:
    """An FQSR plan with `options` (keys of FQSR_OPTIONS) applied and `teacher` (the full-precision
    run it is fine-tuned from) as distillation teacher, resolved again for the model of `model_cfg`.
    Without a teacher the default distillation is off (resolve_plan); asking for it is an error."""
    if not isinstance(options, dict):
        raise QnasError("quant options: expected a JSON object")
    unknown = sorted(set(options) - set(FQSR_OPTIONS))
    if unknown:
        raise QnasError(f"quant options: unknown {', '.join(unknown)} (known: {', '.join(FQSR_OPTIONS)})")
    quant = {k: v for k, v in plan.items() if k not in ("layers", "adds", "output", *DISTILL_KEYS)}
    quant.update(options, teacher=teacher)
    return resolve_plan(build_from_config(model_cfg), quant)


# ------------------------------------------------------------------------------------------------
# Applying a plan


def _quantizer_kwargs(name: str, plan: dict) -> dict:
    if name == "fqsr":
        return {"warmup": int(plan.get("warmup", 0)), "init_stat": plan.get("init_stat", "max")}
    return {}


def make_quantizer(spec: dict, kind: str, plan: dict, channels: int = 1) -> nn.Module:
    """A quantizer from a plan entry {"quantizer", "bits", "signed"?, "per_channel"?}: per-tensor steps,
    or for a weight with "per_channel" one step per output channel (`channels` of them)."""
    name = check_quantizer(spec.get("quantizer"), kind)
    bits = check_bits(spec.get("bits"), f"{kind} bits")
    signed = True if kind == "weight" else bool(spec.get("signed", True))
    per_channel = kind == "weight" and bool(spec.get("per_channel", False))
    return build_quantizer(
        name,
        bits,
        kind=kind,
        signed=signed,
        channels=channels if per_channel else 1,
        per_channel=per_channel,
        asymmetric=bool(spec.get("asymmetric", False)),
        **_quantizer_kwargs(name, plan),
    )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_network(model: nn.Module, quant: dict) -> nn.Module:
    """Replaces `model`'s convolutions and skip connections by quantized ones following the plan of
    `quant` (resolved first when it has no "layers"), installs the output quantizer, and returns the
    model (the same object). Float parameters keep their names; `model.qnas_quant` holds the plan."""
    plan = resolve_plan(model, quant)
    modules = dict(model.named_modules())
    for name, spec in plan["layers"].items():
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d):
            raise QnasError(f"quant plan: {name!r} is not a convolution of {type(model).__name__}")
        if spec is None:
            continue
        w_q = make_quantizer(spec["w"], "weight", plan, conv.out_channels) if spec.get("w") else None
        a_q = make_quantizer(spec["a"], "activation", plan) if spec.get("a") else None
        _set_submodule(model, name, QuantConv2d.from_conv(conv, w_q, a_q))
    for name, spec in (plan.get("adds") or {}).items():
        if not isinstance(modules.get(name), Add):
            raise QnasError(f"quant plan: {name!r} is not a skip connection (Add) of {type(model).__name__}")
        signs = spec.get("signed", [True, True, True])
        qs = [make_quantizer({**spec, "signed": s}, "activation", plan) for s in signs]
        _set_submodule(model, name, QuantAdd(*qs))
    if plan.get("output"):
        model.output_quant = OutputQuantizer(make_quantizer(plan["output"], "activation", plan))
        model.register_forward_hook(_quantize_output)
    device = next(model.parameters()).device
    if device.type != "meta":
        for _, q in quantizers(model):
            q.to(device)
    model.qnas_quant = plan
    weight = float(plan.get("calibration_weight") or 0.0)
    model.calibration_weight = weight
    if float(plan.get("distill_weight") or 0.0) > 0 or float(plan.get("distill_feature_weight") or 0.0) > 0:
        Distillation(model, plan)
    if weight > 0 or getattr(model, "distillation", None) is not None:
        model.auxiliary_loss = types.MethodType(auxiliary_loss, model)
    return model


def _quantize_output(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return module.output_quant(output)


def auxiliary_loss(model: nn.Module) -> torch.Tensor | None:
    """What training adds to the task loss of a quantized network (`model.auxiliary_loss()`, called
    by the training loop after each forward): FQSR's calibration loss and the distillation losses."""
    terms = [calibration_loss(model) if model.calibration_weight > 0 else None]
    if getattr(model, "distillation", None) is not None:
        terms.append(model.distillation.loss())
    terms = [t for t in terms if t is not None]
    return sum(terms) if terms else None


class Distillation:
    """Distillation from the full-precision network a quantized one was fine-tuned from, as the
    quantized-SR literature does at 2-4 bits (PAMS, Li et al., ECCV 2020: structured knowledge
    transfer of features; CADyQ, Hong et al., ECCV 2022: L1 to the full-precision output):

    - output: `distill_weight` · mean|y_q − y_fp| on the training patch;
    - features: `distill_feature_weight` · mean over the skip connections (QuantAdd, the residual
      stream) of mean|z_q − z_fp| / mean|z_fp|, matched by module name.

    The teacher (plan["teacher"], a run folder) is loaded on the first training forward and is not
    part of the network's state: evaluation never needs it. Hooks record the training input, the
    (quantized) output and the skips' sums; `loss()` runs the teacher on the same input."""

    def __init__(self, model: nn.Module, plan: dict):
        self.model = model
        self.source = str(plan["teacher"])
        self.weight = float(plan.get("distill_weight") or 0.0)
        self.feature_weight = float(plan.get("distill_feature_weight") or 0.0)
        self._teacher: nn.Module | None = None
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._features: dict[str, torch.Tensor] = {}
        self.skips = [n for n, m in model.named_modules() if isinstance(m, QuantAdd)]
        model.register_forward_pre_hook(self._record_input)
        # Registered after the output quantizer's hook: sees the quantized output.
        model.register_forward_hook(self._record_output)
        if self.feature_weight > 0:
            for name in self.skips:
                model.get_submodule(name).register_forward_hook(self._feature_hook(name))
        # Not an nn.Module attribute: the teacher stays out of the state dict and of .parameters().
        object.__setattr__(model, "distillation", self)

    def _record_input(self, module: nn.Module, args: tuple) -> None:
        self._input = args[0] if module.training else None
        self._features = {}

    def _record_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._output = output if module.training else None

    def _feature_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if module.training:
                self._features[name] = output

        return hook

    def teacher(self) -> nn.Module:
        if self._teacher is None:
            net, blob = load_network(self.source)
            if blob["network"].get("quant"):
                raise QnasError(f"distillation teacher {self.source}: expected a full-precision run")
            device = next(self.model.parameters()).device
            self._teacher = net.to(device).to(memory_format=torch.channels_last).eval()
            for p in self._teacher.parameters():
                p.requires_grad_(False)
        return self._teacher

    def loss(self) -> torch.Tensor | None:
        if self._input is None or self._output is None:
            return None
        teacher = self.teacher()
        features: dict[str, torch.Tensor] = {}
        hooks = []
        if self.feature_weight > 0:
            modules = dict(teacher.named_modules())
            for name in self.skips:

                def keep(_m, _a, out, name=name):
                    features[name] = out

                hooks.append(modules[name].register_forward_hook(keep))
        try:
            with torch.no_grad():
                target = teacher(self._input)
        finally:
            for h in hooks:
                h.remove()
        total = self.weight * (self._output - target).abs().mean() if self.weight > 0 else None
        if self.feature_weight > 0 and self._features:
            rel = [
                (self._features[n] - features[n]).abs().mean() / features[n].abs().mean().clamp_min(1e-8)
                for n in self._features
            ]
            term = self.feature_weight * torch.stack(rel).mean()
            total = term if total is None else total + term
        self._input = self._output = None
        self._features = {}
        return total


def calibration_loss(model: nn.Module) -> torch.Tensor | None:
    """FQSR's calibration loss: `model.calibration_weight` times the mean, over the FQSR quantizers
    that quantized something in the last training forward, of mean|Q(x) − x|. None when no
    quantizer recorded an error (evaluation mode, or still in the warm-up)."""
    errors = [
        m.calibration_error
        for m in model.modules()
        if isinstance(m, FQSRQuantizer) and m.calibration_error is not None
    ]
    if not errors:
        return None
    return model.calibration_weight * torch.stack(errors).mean()


def load_float_weights(model: nn.Module, state: dict, source: str) -> None:
    """Loads a full-precision state_dict into a quantized network built from the same float model:
    every float parameter must match; only quantizer state may be missing (it initialises from data).
    A checkpoint of another model is a CheckpointError naming `source`."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line), first[0])
        raise CheckpointError(f"{source}: weights of another model ({detail[:160]})") from e
    quant_keys = {f"{n}.{k}" for n, q in quantizers(model) for k in q.state_dict()}
    missing = [k for k in missing if k not in quant_keys]
    if missing or unexpected:
        what = ", ".join((missing + list(unexpected))[:3])
        raise CheckpointError(f"{source}: weights of another model (keys differ: {what})")


def describe_plan(plan: dict) -> str:
    """One line: scheme, bits and coverage."""
    layers = plan.get("layers", {})
    n_q = sum(1 for s in layers.values() if s)
    if plan.get("bits") is not None:
        head = f"{plan['scheme']} {plan['bits']}-bit"
    else:  # per-layer bits (a searched network)
        bits = sorted({s[k]["bits"] for s in layers.values() if s for k in ("w", "a") if s.get(k)})
        head = f"{plan['scheme']} {'/'.join(map(str, bits))}-bit"
    parts = [head, f"{n_q}/{len(layers)} convolutions quantized"]
    if plan.get("adds"):
        parts.append(f"{len(plan['adds'])} skips at {plan.get('skip_bits')} bits")
    if plan.get("output"):
        parts.append(f"output at {plan['output']['bits']} bits")
    return ", ".join(parts)


def build_sr_network(cfg: dict) -> nn.Module:
    """The network of a config of kind "sr" (qnas.runs.network): a registered SR model (qnas.sr),
    quantized by the plan in "quant" if the config has one."""
    if "model" not in cfg:
        raise QnasError('network config of kind "sr" needs "model"')
    model = build_from_config(cfg["model"])
    return quantize_network(model, cfg["quant"]) if cfg.get("quant") else model


register_network_kind("sr", build_sr_network)
