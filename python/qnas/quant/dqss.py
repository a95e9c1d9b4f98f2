"""DQSS: differentiable quantization strategy search (Li, Yan, Chen, "Differentiable Search for
Finding Optimal Quantization Strategy", arXiv:2404.08010, 2024), as we read it (docs/quantization.md).

Every searched convolution holds all candidate quantizers ("strategies", qnas.quant.quantizers) for
its weight and for its input, with logits β (weights) and α (activations):

    y = Σ_i α_i Σ_j β_j  conv(Q^a_i(A), Q^w_j(W))  =  conv(Σ_i α_i Q^a_i(A), Σ_j β_j Q^w_j(W))

(α, β = softmax(logits / T)). Convolution is bilinear, so the whole mixture is ONE convolution:

- engine "fused": torch.ops.qops.mixed_quant_conv with one variant per strategy whose
  forward is a plain uniform quantizer s·clamp(round(x/s)) and that differs from the others only
  by its step: the same bit-width repeated, each variant given its strategy's step (LSQ's with
  LSQ's gradient scale, statistics-based steps detached), probs[o, j, i] = β_j·α_i. Strategies with
  another forward or another gradient rule (PACT's clipping gradient, DoReFa's tanh weights and
  its clip at 1 that stops the gradient half a step earlier than fake_quant's mask) go beside it:
  their weights enter the same call pre-quantized, as extra candidates at bits 0; their inputs are
  mixed first, Σ α_i Q^a_i(A), and convolved by a second call at bits 0.
- engine "factorized" (default): conv(Σ α_i Q^a_i(A), Σ β_j Q^w_j(W)) in plain torch, each
  quantizer's own forward: the same function (tests check both against each other). Because the
  probabilities factorize (α_i·β_j), the mixed input has Cin channels, while mixed_quant_conv,
  made for QuantNAS' joint (op, w_bits, a_bits) probabilities that do not factorize, concatenates
  its activation variants (n_a·Cin channels): measured on a 64-channel 3x3 layer (batch 4, 48x48,
  forward + backward, this 2-core machine) the fused engine took 1.1 s with all seven strategies
  and 4.1 s with five step-only ones vs 0.7 s for the factorized form, hence the default.

Search modes (`qnas strategy`): post-training (PTQ: network weights frozen; strategy logits and the
quantizers' own parameters minimize the error to the full-precision network's output on
calibration patches) and quantization-aware (QAT: logits, quantizer parameters and weights updated
in one forward-backward pass per step, against the ground truth, with the schedule that avoids
under-fitting described in `qat_phases`). The derived network keeps, per layer, the strategy with
the largest logit for weights and for activations.

Our additions to the PTQ search, each with its reason where it is defined: logits that start from
each candidate's local error (init_logits_from_local_error), a search objective that is the
expected loss of a sampled discrete network rather than the mixture's loss
(expected_loss_penalty), and a calibration loss that weighs patches as mean PSNR does
(log_mse_loss).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qnas.errors import QnasError
from qnas.quant.apply import check_bits, probe_network
from qnas.quant.quantizers import (
    QUANTIZERS,
    AsymmetricQuantizer,
    LSQQuantizer,
    Quantizer,
    build_quantizer,
)

#: The strategies of the seed: every quantizer of qnas.quant but FQSR's (`qnas strategy --quantizers all`).
DQSS_STRATEGIES = ("lsq", "pact", "dorefa", "hwgq", "minmax", "percentile", "mse")
# Candidate names beyond the plain quantizers: NAME_pc is NAME with one step per output channel
# (weights only), NAME_asym its asymmetric form with a zero point (activations only;
# qnas.quant.quantizers.AsymmetricQuantizer).
PER_CHANNEL, ASYMMETRIC = "_pc", "_asym"
#: `--quantizers extended`: candidates that differ in more than the step of one symmetric per-tensor
#: grid: the seed's strategies, ACIQ, per-channel weight steps and asymmetric activation ranges.
EXTENDED_STRATEGIES = (
    *DQSS_STRATEGIES,
    "aciq",
    "lsq_pc",
    "minmax_pc",
    "percentile_pc",
    "mse_pc",
    "aciq_pc",
    "minmax_asym",
    "percentile_asym",
    "mse_asym",
)
# Strategies whose forward is fake_quant(x, s) and whose gradient to x is its straight-through mask:
# they can be variants of mixed_quant_conv (per-tensor ones only). PACT (clipping gradient) and
# DoReFa (tanh weights, activation gradient cut at exactly 1) are not of that form.
_STEP_ONLY = {"lsq", "minmax", "percentile", "mse", "hwgq", "aciq"}


def candidate_spec(name: str) -> tuple[str, dict]:
    """(quantizer name, plan flags) of a candidate: "mse" -> ("mse", {}), "mse_pc" -> ("mse",
    {"per_channel": True}), "mse_asym" -> ("mse", {"asymmetric": True}). QnasError for a bad name."""
    base, flags = name, {}
    if name.endswith(PER_CHANNEL):
        base, flags = name[: -len(PER_CHANNEL)], {"per_channel": True}
    elif name.endswith(ASYMMETRIC):
        base, flags = name[: -len(ASYMMETRIC)], {"asymmetric": True}
    known = ", ".join([*sorted(QUANTIZERS), "NAME_pc", "NAME_asym"])
    if base not in QUANTIZERS:
        raise QnasError(f"--quantizers: unknown quantizer {name!r} (known: {known}, or 'all', 'extended')")
    if flags.get("per_channel") and not QUANTIZERS[base].weight_ok:
        raise QnasError(
            f"--quantizers: {name!r}: {base} does not quantize weights (per-channel is for weights)"
        )
    if flags.get("asymmetric") and base not in AsymmetricQuantizer.STATS:
        raise QnasError(
            f"--quantizers: {name!r}: asymmetric forms exist for {', '.join(AsymmetricQuantizer.STATS)}"
        )
    return base, flags


def candidate_name(spec: dict) -> str:
    """The candidate name of a plan entry {"quantizer", "per_channel"?, "asymmetric"?}."""
    suffix = PER_CHANNEL if spec.get("per_channel") else (ASYMMETRIC if spec.get("asymmetric") else "")
    return f"{spec['quantizer']}{suffix}"


def is_weight_candidate(name: str) -> bool:
    base, flags = candidate_spec(name)
    return QUANTIZERS[base].weight_ok and not flags.get("asymmetric")


def is_activation_candidate(name: str) -> bool:
    base, flags = candidate_spec(name)
    return QUANTIZERS[base].activation_ok and not flags.get("per_channel")


def build_candidate(name: str, bits: int, *, kind: str, signed: bool = True, channels: int = 1) -> Quantizer:
    """The quantizer of candidate `name` for a weight of `channels` output channels or an input."""
    base, flags = candidate_spec(name)
    per_channel = bool(flags.get("per_channel"))
    return build_quantizer(
        base,
        bits,
        kind=kind,
        signed=signed,
        channels=channels if per_channel else 1,
        per_channel=per_channel,
        asymmetric=bool(flags.get("asymmetric")),
    )


def parse_quantizers(spec: str | Sequence[str]) -> list[str]:
    """A comma-separated list (or "all", "extended") of candidate names, checked; QnasError names a
    bad one."""
    if spec == "all":
        names: str | Sequence[str] = list(DQSS_STRATEGIES)
    elif spec == "extended":
        names = list(EXTENDED_STRATEGIES)
    else:
        names = spec
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    if not names:
        raise QnasError("--quantizers: give at least one quantizer (or 'all')")
    for n in names:
        candidate_spec(n)
    if len(set(names)) != len(names):
        raise QnasError(f"--quantizers: {','.join(names)} names a quantizer twice")
    if not any(is_weight_candidate(n) for n in names):
        raise QnasError(
            f"--quantizers: {','.join(names)} has no weight quantizer (hwgq and NAME_asym quantize activations only)"
        )
    if not any(is_activation_candidate(n) for n in names):
        raise QnasError(
            f"--quantizers: {','.join(names)} has no activation quantizer (NAME_pc is for weights)"
        )
    return names


def _step_only(q: Quantizer) -> bool:
    return q.strategy in _STEP_ONLY and q.axis is None


def _op_scale(q: Quantizer, t: torch.Tensor) -> torch.Tensor:
    """The step a quantizer would use on t, as a 0-d tensor; LSQ's with LSQ's gradient scale g
    (value s, gradient g·dL/ds), the others detached (their steps are not learned by gradient)."""
    if isinstance(q, LSQQuantizer):
        s = q.step.clamp_min(1e-8).reshape(())
        g = q.lsq_grad_factor(t)
        return (s - s * g).detach() + s * g
    return q.scale().detach().abs().clamp_min(1e-8).reshape(())


class StrategyConv2d(nn.Conv2d):
    """A convolution searching its weight and activation quantization strategy (module docstring).

    Parameters `strategy_w_logits` [n_w] and `strategy_a_logits` [n_a] are the architecture
    parameters (see strategy_parameters); `temperature` divides them before the softmax."""

    def __init__(
        self,
        conv: nn.Conv2d,
        quantizers: Sequence[str],
        bits: int,
        *,
        a_signed: bool,
        engine: str = "factorized",
    ):
        with torch.device("meta"):
            super().__init__(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                stride=conv.stride,
                padding=conv.padding,
                dilation=conv.dilation,
                groups=conv.groups,
                bias=conv.bias is not None,
            )
        self.weight, self.bias = conv.weight, conv.bias
        if engine not in ("fused", "factorized"):
            raise QnasError(f"engine: expected 'fused' or 'factorized', got {engine!r}")
        self.bits = self.w_bits = self.a_bits = check_bits(bits)
        self.a_signed = bool(a_signed)
        self.w_names = [n for n in quantizers if is_weight_candidate(n)]
        self.a_names = [n for n in quantizers if is_activation_candidate(n)]
        device = conv.weight.device
        self.w_quants = nn.ModuleDict(
            {n: build_candidate(n, bits, kind="weight", channels=conv.out_channels) for n in self.w_names}
        ).to(device)
        self.a_quants = nn.ModuleDict(
            {n: build_candidate(n, bits, kind="activation", signed=a_signed) for n in self.a_names}
        ).to(device)
        self.strategy_w_logits = nn.Parameter(torch.zeros(len(self.w_names), device=device))
        self.strategy_a_logits = nn.Parameter(torch.zeros(len(self.a_names), device=device))
        self.temperature = 1.0
        self.hard = False  # straight-through one-hot samples in training (see _probs)
        # Expected-loss search (see expected_loss_penalty): when `gain` is set, training forwards
        # leave the layer's sampling variance in `variance`.
        self.gain: float | None = None
        self.variance: torch.Tensor | None = None
        kh, kw = self.kernel_size
        same = self.padding == (self.dilation[0] * (kh - 1) // 2, self.dilation[1] * (kw - 1) // 2)
        square = self.stride[0] == self.stride[1] and self.dilation[0] == self.dilation[1]
        # mixed_quant_conv pads "same" with one stride: other layers run the factorized form.
        self.engine = engine if (same and square and kh % 2 and kw % 2) else "factorized"
        self.train(conv.training)

    # -- the mixture ---------------------------------------------------------------------------
    def w_probs(self) -> torch.Tensor:
        return self._probs(self.strategy_w_logits)

    def a_probs(self) -> torch.Tensor:
        return self._probs(self.strategy_a_logits)

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax(logits / T); with `hard` in training, a straight-through Gumbel-softmax sample
        (Jang et al. 2017): one-hot forward (one discrete strategy per step, as deployed), soft
        gradient to every logit."""
        soft_logits = logits / self.temperature
        if not (self.hard and self.training):
            return torch.softmax(soft_logits, 0)
        gumbel = -torch.empty_like(logits).exponential_().log()
        soft = torch.softmax(soft_logits + gumbel, 0)
        one_hot = torch.zeros_like(soft).scatter_(0, soft.argmax().reshape(1), 1.0)
        return one_hot - soft.detach() + soft

    def choice(self) -> tuple[str, str]:
        """(weight strategy, activation strategy) with the largest logits."""
        return (
            self.w_names[int(self.strategy_w_logits.argmax())],
            self.a_names[int(self.strategy_a_logits.argmax())],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        track = self.gain is not None and self.training
        if self.engine == "fused":
            y = self._forward_fused(x)
            if track:
                qw = [q.quantize(self.weight) for q in self.w_quants.values()]
                qa = [q.quantize(x) for q in self.a_quants.values()]
                self.variance = self._variance(qw, qa, self.w_probs(), self.a_probs(), y)
            return y
        beta, alpha = self.w_probs(), self.a_probs()
        qw = [q(self.weight) for q in self.w_quants.values()]
        qa = [q(x) for q in self.a_quants.values()]
        w = sum(b * t for b, t in zip(beta, qw, strict=True))
        xa = sum(a * t for a, t in zip(alpha, qa, strict=True))
        y = F.conv2d(xa, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if track:
            self.variance = self._variance(qw, qa, beta, alpha, y)
        return y

    def _variance(self, qw, qa, beta, alpha, y) -> torch.Tensor:
        """Mean squared deviation per output element between a discrete network sampled from the
        strategy distribution (weight strategy j with probability β_j, input strategy i with α_i,
        independently) and the mixture this layer computes, to second order and diagonal in the
        input's channels (rounding errors are nearly uncorrelated across elements):

            Σ_j β_j Σ_{o,c,k} (Q^w_j(W) − W̄)²_{o,c,k} E_c  +  Σ_i α_i Σ_c ‖Q^a_i(A) − Ā‖²_c Σ_{o,k} W̄²_{o,c,k}

        with W̄ = Σ β_j Q^w_j(W), Ā = Σ α_i Q^a_i(A), E_c the energy of input channel c of Ā at the
        positions the kernel visits. The mixture's own loss cannot see this term (see
        expected_loss_penalty)."""
        w_bar = sum(b * t for b, t in zip(beta, qw, strict=True))
        a_bar = sum(a * t for a, t in zip(alpha, qa, strict=True))
        g = self.groups
        # Input positions per output position (1 for "same" stride-1 layers).
        visits = y.shape[-2] * y.shape[-1] / (a_bar.shape[-2] * a_bar.shape[-1])

        def per_in_channel(t: torch.Tensor) -> torch.Tensor:  # [O, C/g, kh, kw] -> [C], summed over o, k
            o, cg = t.shape[:2]
            return t.sum((2, 3)).reshape(g, o // g, cg).sum(1).reshape(-1)

        energy = a_bar.square().sum((0, 2, 3)) * visits
        var_w = sum(
            b * (per_in_channel((t - w_bar).square()) * energy).sum() for b, t in zip(beta, qw, strict=True)
        )
        w_norm = per_in_channel(w_bar.square())
        var_a = sum(
            a * ((t - a_bar).square().sum((0, 2, 3)) * visits * w_norm).sum()
            for a, t in zip(alpha, qa, strict=True)
        )
        return (var_w + var_a) / y.numel()

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        beta, alpha = self.w_probs(), self.a_probs()
        w_q = list(self.w_quants.values())
        a_q = list(self.a_quants.values())
        for q in w_q:
            q.observe(self.weight)
        for q in a_q:
            q.observe(x)
        w_in = [j for j, q in enumerate(w_q) if _step_only(q)]
        w_pre = [j for j, q in enumerate(w_q) if j not in w_in]
        a_in = [i for i, q in enumerate(a_q) if _step_only(q)]
        a_pre = [i for i, q in enumerate(a_q) if i not in a_in]
        # Candidate 0 is the raw weight with one variant per step-only strategy; candidate 1 + k is
        # the k-th other strategy's quantized weight, used at bits 0 (already on its grid).
        weights = [self.weight] + [w_q[j].quantize(self.weight) for j in w_pre]
        n_ops, n_w = len(weights), len(w_in) + len(w_pre)
        w_bits = [self.bits] * len(w_in) + [0] * len(w_pre)
        one = torch.ones((), device=x.device)
        row0 = [_op_scale(w_q[j], self.weight) for j in w_in] + [one] * len(w_pre)
        w_scales = torch.stack([torch.stack(row0)] + [torch.ones(n_w, device=x.device)] * (n_ops - 1))
        rows = [0] * len(w_in) + [1 + k for k in range(len(w_pre))]
        cols = list(range(n_w))
        p_w = torch.zeros(n_ops, n_w, device=x.device).index_put(
            (torch.tensor(rows, device=x.device), torch.tensor(cols, device=x.device)), beta[w_in + w_pre]
        )
        common = dict(
            w_bits=w_bits,
            w_scales=w_scales,
            a_signed=self.a_signed,
            groups=[self.groups] * n_ops,
            dilations=[self.dilation[0]] * n_ops,
            stride=self.stride[0],
        )
        y = None
        if a_in:
            a_scales = torch.stack([_op_scale(a_q[i], x) for i in a_in])
            probs = p_w[:, :, None] * alpha[a_in][None, None, :]
            y = torch.ops.qops.mixed_quant_conv(
                x, weights, probs, a_bits=[self.bits] * len(a_in), a_scales=a_scales, bias=self.bias, **common
            )
        if a_pre:  # the other strategies' inputs, mixed first (bilinearity again): one more call
            x_pre = sum(alpha[i] * a_q[i].quantize(x) for i in a_pre)
            part = torch.ops.qops.mixed_quant_conv(
                x_pre,
                weights,
                p_w[:, :, None],
                a_bits=[0],
                a_scales=torch.ones(1, device=x.device),
                bias=self.bias if y is None else None,
                **common,
            )
            y = part if y is None else y + part
        return y

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, bits={self.bits}, engine={self.engine}, "
            f"w: {','.join(self.w_names)}, a: {','.join(self.a_names)}"
        )


def strategy_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The architecture parameters of a supernet (strategy logits)."""
    return [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1].startswith("strategy_")]


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Learned parameters of quantizers (LSQ steps, PACT clipping values)."""
    return [p for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters(recurse=False)]


def network_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Everything else: the network's own weights."""
    special = {id(p) for p in strategy_parameters(model) + quantizer_parameters(model)}
    return [p for p in model.parameters() if id(p) not in special]


def searched_layers(model: nn.Module, example: torch.Tensor | None = None) -> dict[str, bool]:
    """{conv name: input is signed} for the convolutions a search quantizes: all but the first and
    the last (the coverage of the "uniform" baseline; qnas.quant.apply)."""
    if example is None:
        probe = probe_network(model)
        convs = probe["convs"]
    else:
        convs = _probe_with(model, example)
    order = list(convs)
    return {n: not nonneg for n, nonneg in convs.items() if n not in (order[0], order[-1])}


def _probe_with(model: nn.Module, example: torch.Tensor) -> dict[str, bool]:
    convs: dict[str, bool] = {}
    names = {m: n for n, m in model.named_modules()}

    def hook(m, args, out) -> None:
        convs.setdefault(names[m], bool((args[0] >= 0).all()))

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    _run_hooked(model, hooks, [example])
    return convs


def _run_hooked(model: nn.Module, hooks: list, batches: Iterable[torch.Tensor]) -> None:
    """Runs `model` in eval mode without gradients over `batches` for its forward `hooks`, then
    removes them and restores the mode."""
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()


def build_supernet(
    model: nn.Module,
    quantizers: Sequence[str],
    bits: int,
    *,
    layers: dict[str, bool] | None = None,
    engine: str = "factorized",
) -> nn.Module:
    """Replaces the convolutions `layers` ({name: signed input}, default searched_layers(model)) of
    `model` (in place; parameters shared) by StrategyConv2d over `quantizers` at `bits`."""
    names = parse_quantizers(list(quantizers))
    layers = searched_layers(model) if layers is None else layers
    for name, signed in layers.items():
        conv = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, StrategyConv2d(conv, names, bits, a_signed=signed, engine=engine))
    return model


def supernet_layers(model: nn.Module) -> dict[str, StrategyConv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, StrategyConv2d)}


def set_temperature(model: nn.Module, t: float) -> None:
    for m in supernet_layers(model).values():
        m.temperature = float(t)


def freeze_statistics(model: nn.Module) -> None:
    """Stops statistics-based steps from tracking the data (after calibration)."""
    for m in model.modules():
        if isinstance(m, Quantizer):
            m.freeze()


def derive_plan(model: nn.Module, quantizers: Sequence[str], bits: int) -> dict:
    """The "dqss" quant plan of a searched supernet: per layer, the strategies with the largest logits,
    and the per-layer probabilities (for strategy.json)."""
    layers, probs = {}, {}
    for name, m in supernet_layers(model).items():
        w, a = m.choice()
        (w_base, w_flags), (a_base, a_flags) = candidate_spec(w), candidate_spec(a)
        layers[name] = {
            "w": {"quantizer": w_base, "bits": m.bits, **w_flags},
            "a": {"quantizer": a_base, "bits": m.bits, "signed": m.a_signed, **a_flags},
        }
        with torch.no_grad():
            probs[name] = {
                "w": {
                    n: round(float(p), 4)
                    for n, p in zip(m.w_names, torch.softmax(m.strategy_w_logits, 0), strict=True)
                },
                "a": {
                    n: round(float(p), 4)
                    for n, p in zip(m.a_names, torch.softmax(m.strategy_a_logits, 0), strict=True)
                },
            }
    return {
        "scheme": "dqss",
        "bits": int(bits),
        "quantizers": list(quantizers),
        "layers": layers,
        "probs": probs,
    }


def derive_network(supernet: nn.Module, float_model: nn.Module, plan: dict) -> nn.Module:
    """The discrete network of a plan: `float_model` (same architecture, any weights) quantized by
    the plan, with the supernet's weights and its chosen quantizers' state."""
    from qnas.quant.apply import quantize_network

    net = quantize_network(float_model, {k: v for k, v in plan.items() if k != "probs"})
    layers = supernet_layers(supernet)
    out = {}
    for key, value in supernet.state_dict().items():
        owner = next((n for n in layers if key.startswith(n + ".")), None)
        if owner is None:
            out[key] = value
            continue
        sub = key[len(owner) + 1 :]
        w_name = candidate_name(plan["layers"][owner]["w"])
        a_name = candidate_name(plan["layers"][owner]["a"])
        if sub in ("weight", "bias"):
            out[key] = value
        elif sub.startswith(f"w_quants.{w_name}."):
            out[f"{owner}.w_quant.{sub[len(f'w_quants.{w_name}.') :]}"] = value
        elif sub.startswith(f"a_quants.{a_name}."):
            out[f"{owner}.a_quant.{sub[len(f'a_quants.{a_name}.') :]}"] = value
    net.load_state_dict(out)
    freeze_statistics(net)
    return net


# ------------------------------------------------------------------------------------------------
# Search loops (shared by `qnas strategy` and examples/dqss_digits.py)


def temperature_at(step: int, steps: int, start: float = 1.0, end: float = 0.05) -> float:
    """Geometric annealing of the softmax temperature, so the mixture ends close to one-hot and the
    derived network is close to what was optimized."""
    t = min(max(step / max(steps - 1, 1), 0.0), 1.0)
    return start * (end / start) ** t


def calibrate(supernet: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Initializes every quantizer from data, then freezes the statistics: a statistics-based step
    is the equal-weight mean of its per-batch values over the calibration batches.

    Why not the quantizers' training-mode EMA (momentum 0.1): over 8 batches it gives the first
    batch about half the weight, so the step of a PTQ run came mostly from its first few patches."""
    stats = [m for m in supernet.modules() if isinstance(m, Quantizer) and m.from_statistics]
    saved = [m.momentum for m in stats]
    supernet.train()
    try:
        with torch.no_grad():
            for k, x in enumerate(batches):
                for m in stats:  # batch k enters the running mean with weight 1/(k+1)
                    m.momentum = 1.0 / (k + 1)
                supernet(x)
    finally:
        for m, momentum in zip(stats, saved, strict=True):
            m.momentum = momentum
    freeze_statistics(supernet)


def local_errors(
    supernet: nn.Module, teacher: nn.Module, batches: Iterable[torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (weight errors [n_w], activation errors [n_a])}: for every searched layer, the squared
    error of its output when only its weight (resp. only its input) is quantized by each candidate,
    on the full-precision network's own input to that layer, summed over the calibration batches.

    `teacher` is the full-precision network the supernet was built from (same module names); the
    supernet's quantizers must be calibrated (their steps are used as they are)."""
    layers = supernet_layers(supernet)
    modules = dict(teacher.named_modules())
    missing = [n for n in layers if not isinstance(modules.get(n), nn.Conv2d)]
    if missing:
        raise QnasError(f"teacher: no convolution named {missing[0]!r} (not the supernet's network)")
    sums = {
        n: (
            torch.zeros(len(m.w_names), dtype=torch.float64),
            torch.zeros(len(m.a_names), dtype=torch.float64),
        )
        for n, m in layers.items()
    }

    def hook_for(name: str, m: StrategyConv2d):
        def conv(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return F.conv2d(a, w, m.bias, m.stride, m.padding, m.dilation, m.groups)

        def hook(_module, args, _out) -> None:
            x = args[0]
            y = conv(x, m.weight)
            e_w, e_a = sums[name]
            for j, q in enumerate(m.w_quants.values()):
                e_w[j] += float((conv(x, q.quantize(m.weight)) - y).square().sum())
            for i, q in enumerate(m.a_quants.values()):
                e_a[i] += float((conv(q.quantize(x), m.weight) - y).square().sum())

        return hook

    _run_hooked(
        teacher, [modules[n].register_forward_hook(hook_for(n, m)) for n, m in layers.items()], batches
    )
    return sums


def relative_errors(errors: torch.Tensor) -> torch.Tensor:
    """A layer's candidate errors over its smallest (1.0 = the locally best candidate)."""
    return errors / errors.min().clamp_min(1e-30)


def init_logits_from_local_error(
    supernet: nn.Module, teacher: nn.Module, batches: Iterable[torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Starts every layer's strategy distribution at probabilities inversely proportional to the
    candidates' local output errors (`local_errors`): logit = -log(error / smallest error).

    Why: the gradient of the mixture's loss does not contain a candidate's own error (see
    expected_loss_penalty), so a uniform start spends a short search budget drifting; the local
    errors are the classical per-layer sensitivity measure and cost one forward pass of the
    teacher per calibration batch. The search then refines these logits on the network's output,
    where layers interact. Returns the errors (for strategy.json)."""
    errors = local_errors(supernet, teacher, batches)
    layers = supernet_layers(supernet)
    with torch.no_grad():
        for name, (e_w, e_a) in errors.items():
            m = layers[name]
            for logits, e in ((m.strategy_w_logits, e_w), (m.strategy_a_logits, e_a)):
                logits.copy_((-relative_errors(e).clamp_min(1.0).log()).to(logits.dtype))
    return errors


def log_mse_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Mean over samples of ln(per-sample MSE), i.e. -ln(10)/10 · mean PSNR + const.

    Why for calibration: SR is scored by PSNR averaged over images, and a plain MSE over a batch is
    dominated by its worst (high-contrast) patches, so a reconstruction fitted to it trades the
    easy images' decibels for the hard ones' (measured: fitted steps that won on the training
    images lost on unseen ones). Each sample's log makes every patch count as its PSNR does."""
    m = (pred - target).square().flatten(1).mean(1)
    return (m + eps).log().mean()


def estimate_gains(
    supernet: nn.Module, teacher: nn.Module, batches: Sequence[torch.Tensor], *, rel_noise: float = 1e-2
) -> dict[str, float]:
    """{layer: gain}: how much the network's mean squared output error grows per unit of mean squared
    error added to that layer's output, measured on the full-precision `teacher` by adding white
    noise of `rel_noise` times the output's RMS to one layer at a time (small: the linear regime)
    over the first two calibration batches. Deterministic (a fixed generator)."""
    layers = supernet_layers(supernet)
    modules = dict(teacher.named_modules())
    sample = list(batches[:2])
    teacher.eval()
    gains = {}
    with torch.no_grad():
        clean = [teacher(x) for x in sample]
        for name in layers:
            gen = torch.Generator(device=sample[0].device).manual_seed(0)
            added = []

            def hook(_m, _a, out, added=added, gen=gen):
                sigma = rel_noise * float(out.square().mean().sqrt().clamp_min(1e-12))
                noise = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype) * sigma
                added.append(float(noise.square().mean()))
                return out + noise

            h = modules[name].register_forward_hook(hook)
            try:
                err = [float((teacher(x) - c).square().mean()) for x, c in zip(sample, clean, strict=True)]
            finally:
                h.remove()
            gains[name] = sum(err) / max(sum(added), 1e-30)
    return gains


def expected_loss_penalty(model: nn.Module) -> torch.Tensor | None:
    """Σ over layers of gain · variance (StrategyConv2d._variance): with the mixture's loss, a
    second-order estimate of the expected loss of a discrete network sampled from the strategy
    distribution, E_sample[L] ≈ L(mixture) + Σ_l gain_l · Var_l.

    Why: the mixture's loss alone cannot rank candidates by their own error. A mixture of
    differently rounded copies of W is closer to W than any one of them, so its gradient rewards
    moving probability toward any candidate whose rounding error is uncorrelated with the others',
    however large that error is (it favours mixing, not the best choice; measured on
    edsr-baseline x2 at 4 bits with the batch-MSE loss: from a start at the locally best
    strategies, mse weights in all 34 layers, 60 steps of the plain search kept mse in 5 and the
    derived network was 0.95 dB below the same search with this penalty; docs/RESULTS.md). The
    variance term is what discretizing costs; it grows with each candidate's own error, so the sum
    ranks candidates the way the deployed argmax network will be scored."""
    terms = [
        m.gain * m.variance
        for m in supernet_layers(model).values()
        if m.gain is not None and m.variance is not None
    ]
    return sum(terms) if terms else None


def _eager(net: nn.Module) -> nn.Module:
    return net


class PTQSearch:
    """Post-training search, one step at a time (`qnas strategy --mode ptq` runs its steps in the run
    loop, qnas.runs.loop; ptq_search runs them in memory): network weights frozen; strategy logits (Adam,
    `arch_lr`) and quantizer parameters (Adam, `quant_lr`) minimize loss_fn(supernet(x), teacher(x)) over
    the calibration batches (cycled), the temperature annealed by temperature_at.

    With `derive` (supernet -> discrete network), the last `discrete_fraction` of the steps go to the
    derived network (see ptq_phases): its statistics-based steps are re-measured on the calibration
    batches (`recalibrate`) and its learned quantizer parameters minimize the same loss; result() is the
    derived network. Without `derive`, every step searches and result() is the supernet.
    `hard`: every search step runs one sampled discrete network (StrategyConv2d._probs) instead of
    the mixture. `expected_loss`: the search minimizes loss + expected_loss_penalty, the expected
    loss of a sampled discrete network, with per-layer gains from estimate_gains.

    `dist` (qnas.runs.distributed.DistInfo): under torch.distributed `batches` are the whole
    calibration batches on every rank (calibration and gains see them all); each step computes on this
    rank's share and averages the gradients over the ranks (the one-process step on the whole batch)."""

    def __init__(
        self,
        supernet: nn.Module,
        teacher: nn.Module,
        batches: Sequence[torch.Tensor],
        steps: int,
        *,
        arch_lr: float = 0.05,
        quant_lr: float = 1e-3,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.mse_loss,
        derive: Callable[[nn.Module], nn.Module] | None = None,
        discrete_fraction: float = 0.25,
        hard: bool = False,
        expected_loss: bool = False,
        dist=None,
    ):
        self.supernet, self.net, self.batches, self.steps = supernet, supernet, batches, steps
        self.arch_lr, self.quant_lr, self.loss_fn, self.derive = arch_lr, quant_lr, loss_fn, derive
        self.split = dist is not None and dist.world > 1
        self.dist = dist
        self.n_search = ptq_phases(steps, discrete_fraction if derive is not None else 0.0)
        teacher.eval()
        with torch.no_grad():
            self.targets = [teacher(x) for x in batches]
        gains = estimate_gains(supernet, teacher, batches) if expected_loss else {}
        for name, m in supernet_layers(supernet).items():
            m.hard = bool(hard)
            m.gain = gains.get(name)
        self.opt: torch.optim.Optimizer | None = None
        self.phase: str | None = None  # "search", then "discrete" (with derive)
        self.searched = False

    def close(self) -> None:
        """Ends the search phase's sampling settings on the supernet (also after an error)."""
        for m in supernet_layers(self.supernet).values():
            m.hard, m.gain, m.variance = False, None, None

    def _end_search(self) -> None:
        """After the search phase: the supernet back to plain mixtures at temperature 1; with `derive`, the
        derived network, its statistics-based steps re-measured on the whole calibration batches."""
        self.close()
        set_temperature(self.supernet, 1.0)
        if self.derive is not None:
            from qnas.runs.distributed import whole_batches

            self.net = self.derive(self.supernet)
            with whole_batches():  # the whole calibration batches, in every rank
                recalibrate(self.net, self.batches)
        self.searched = True

    def _begin(self, phase: str) -> None:
        """Start of a phase: weights frozen; Adam over the logits (search) and quantizer parameters."""
        if phase == "discrete" and not self.searched:
            self._end_search()
        self.phase = phase
        for p in network_parameters(self.net):
            p.requires_grad_(False)
        groups = [{"params": strategy_parameters(self.net), "lr": self.arch_lr}] if phase == "search" else []
        qp = quantizer_parameters(self.net)
        if qp:
            groups.append({"params": qp, "lr": self.quant_lr})
        self.opt = torch.optim.Adam(groups) if groups and any(g["params"] for g in groups) else None
        self.net.train()

    def step(self, step: int, forward: Callable[[nn.Module], nn.Module] = _eager) -> dict:
        """Step `step` (0-based) of the search; returns the values to log. forward(net) is what computes
        net(x) (qnas.runs.loop.Loop.forward: the compiled network under --compile)."""
        from qnas.runs import distributed

        phase = "search" if step < self.n_search else "discrete"
        if phase != self.phase:
            self._begin(phase)
        search, net, opt = phase == "search", self.net, self.opt
        if search:
            set_temperature(net, temperature_at(step, self.n_search))
        x, target = self.batches[step % len(self.batches)], self.targets[step % len(self.batches)]
        if self.split:
            x, target = distributed.shard(x, self.dist), distributed.shard(target, self.dist)
        if opt is None:  # nothing to learn (e.g. a derived network of statistics-based steps only)
            with torch.no_grad():
                net_out = forward(net)(x)
                loss = self.loss_fn(net_out, target)
        else:
            opt.zero_grad(set_to_none=True)
            net_out = forward(net)(x)
            loss = self.loss_fn(net_out, target)
        penalty = expected_loss_penalty(net) if search else None
        if penalty is not None and self.loss_fn is log_mse_loss:
            # The penalty estimates an increase of the MSE; d ln(m) = dm / m (m: the batch's MSE).
            mse = (net_out.detach() - target).square().mean()
            if self.split:  # the MSE of the whole batch: a mean of the ranks' (equal shares)
                mse = mse.new_tensor(distributed.mean(float(mse), self.dist))
            penalty = penalty / mse.clamp_min(1e-12)
        objective = loss if penalty is None else loss + penalty
        if not torch.isfinite(objective):
            raise QnasError(
                f"strategy search diverged at step {step} (loss {objective.item()}); lower --arch-lr/--quant-lr"
            )
        if opt is not None:
            objective.backward()
            if self.split:
                distributed.average_gradients([p for g in opt.param_groups for p in g["params"]], self.dist)
            opt.step()
        record = {"loss": loss.item(), "phase": phase}
        if search:
            record["temperature"] = supernet_temperature(net)
        if penalty is not None:
            record["variance_penalty"] = penalty.item()
        return record

    def result(self) -> nn.Module:
        """After the last step: the derived network with its statistics frozen (the supernet without
        `derive`)."""
        if not self.searched:
            self._end_search()
        if self.derive is None:
            return self.supernet
        freeze_statistics(self.net)
        return self.net


def ptq_search(
    supernet: nn.Module,
    teacher: nn.Module,
    batches: Sequence[torch.Tensor],
    steps: int,
    *,
    log: Callable[..., None] | None = None,
    progress=None,
    **kwargs,
) -> nn.Module:
    """PTQSearch's steps in memory (arguments: PTQSearch's); log(step, **values) and progress(loss) after
    every step. Returns PTQSearch.result()."""
    return run_steps(PTQSearch(supernet, teacher, batches, steps, **kwargs), steps, log, progress)


def run_steps(search: PTQSearch | QATSearch, steps: int, log=None, progress=None) -> nn.Module:
    """The steps of a strategy search without a run folder (`qnas strategy` runs them in qnas.runs.loop)."""
    try:
        for step in range(steps):
            record = search.step(step)
            if log is not None:
                log(step + 1, **record)
            if progress is not None:
                progress(record["loss"])
    finally:
        search.close()
    return search.result()


def ptq_phases(steps: int, discrete_fraction: float = 0.25) -> int:
    """Steps of a PTQ search spent on the supernet (the rest on the derived network).

    Why a discrete phase: the search optimizes a mixture, the deployed network is its argmax, and
    they differ in two ways the mixture hides. (1) Statistics-based steps (minmax, percentile, mse,
    hwgq) were measured on the supernet's activations, i.e. on inputs produced by mixtures of the
    earlier layers' strategies, not by the chosen ones. (2) Learned steps (LSQ, PACT) were trained
    as one term of a mixture, with their share of the gradient. A single-strategy run has neither
    gap (its supernet is its discrete network), so without this phase the search competes at a
    disadvantage against its own candidates. The phase costs no extra budget: the same steps on the
    same calibration batches; for a single strategy it is the same optimization continued."""
    if not 0.0 <= discrete_fraction < 1.0:
        raise QnasError(f"discrete fraction: expected a value in [0, 1), got {discrete_fraction}")
    return steps - int(round(steps * discrete_fraction))


def recalibrate(net: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Re-measures the statistics-based steps (minmax, percentile, mse, hwgq) of a derived network
    on the activations it computes itself, then freezes them; learned steps (LSQ, PACT) keep their
    values. For a network whose activations did not change this reproduces the same steps."""
    for m in net.modules():
        if isinstance(m, Quantizer) and m.from_statistics:
            m.reset()
    calibrate(net, batches)


def supernet_temperature(model: nn.Module) -> float:
    layers = list(supernet_layers(model).values())
    return layers[0].temperature if layers else 1.0


def qat_phases(steps: int) -> tuple[int, int]:
    """(end of the weight warm-up, start of the discrete fine-tune) for a QAT search of `steps`.

    Our adjustment against under-fitting (the seed updates strategies and weights in one pass and
    adjusts the optimization so the network does not under-fit): the first quarter trains weights and
    quantizer parameters under the uniform mixture with the logits frozen (they would otherwise
    follow a network that has not adapted to quantization yet), the middle half updates logits,
    quantizer parameters and weights in one forward-backward pass with the temperature annealed,
    and the last quarter fine-tunes the derived discrete network, so the deployed strategies are
    trained as they run rather than as part of a mixture."""
    warm = steps // 4
    return warm, steps - steps // 4


class QATSearch:
    """Quantization-aware search in one forward-backward pass per step (see qat_phases), one step at a time;
    result() is the derived discrete network after its fine-tune. `derive(supernet)` builds it. With `dist`
    (qnas.runs.distributed.DistInfo), next_batch gives this rank's share of each batch and the gradients
    are averaged over the ranks."""

    def __init__(
        self,
        supernet: nn.Module,
        next_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
        steps: int,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        lr: float = 1e-4,
        arch_lr: float = 0.05,
        quant_lr: float = 1e-3,
        derive: Callable[[nn.Module], nn.Module],
        dist=None,
    ):
        self.supernet, self.net, self.next_batch, self.loss_fn = supernet, supernet, next_batch, loss_fn
        self.lr, self.quant_lr, self.derive, self.dist = lr, quant_lr, derive, dist
        self.warm, self.discrete = qat_phases(steps)
        self.arch = strategy_parameters(supernet)
        self.opt = torch.optim.Adam(
            [
                {"params": network_parameters(supernet), "lr": lr},
                {"params": quantizer_parameters(supernet), "lr": quant_lr},
                {"params": self.arch, "lr": arch_lr},
            ]
        )
        supernet.train()

    def close(self) -> None:
        pass

    def step(self, step: int, forward: Callable[[nn.Module], nn.Module] = _eager) -> dict:
        """Step `step` (0-based); returns the values to log (PTQSearch.step)."""
        from qnas.runs import distributed

        supernet = self.supernet
        if step == self.discrete:
            self.net = self.derive(supernet)
            self.net.train()
            self.opt = torch.optim.Adam(
                [
                    {"params": network_parameters(self.net), "lr": self.lr},
                    {"params": quantizer_parameters(self.net), "lr": self.quant_lr},
                ]
            )
        searching = self.warm <= step < self.discrete
        for p in self.arch:
            p.requires_grad_(searching)
        if self.net is supernet:
            warm, discrete = self.warm, self.discrete
            set_temperature(supernet, temperature_at(step - warm, discrete - warm) if step >= warm else 1.0)
        x, target = self.next_batch(step)
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(forward(self.net)(x), target)
        if not torch.isfinite(loss):
            raise QnasError(
                f"strategy search diverged at step {step} (loss {loss.item()}); lower the learning rates"
            )
        loss.backward()
        if self.dist is not None:
            distributed.average_gradients([p for g in self.opt.param_groups for p in g["params"]], self.dist)
        self.opt.step()
        phase = "warmup" if step < self.warm else ("search" if searching else "finetune")
        return {"loss": loss.item(), "phase": phase, "temperature": supernet_temperature(supernet)}

    def result(self) -> nn.Module:
        """After the last step: the derived network, its statistics frozen."""
        if self.net is self.supernet:  # fewer than 4 steps: no fine-tune phase
            self.net = self.derive(self.supernet)
        freeze_statistics(self.net)
        return self.net


def qat_search(
    supernet: nn.Module,
    next_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    log: Callable[..., None] | None = None,
    progress=None,
    **kwargs,
) -> nn.Module:
    """QATSearch's steps in memory (arguments: QATSearch's; log and progress as ptq_search's)."""
    return run_steps(QATSearch(supernet, next_batch, steps, loss_fn, **kwargs), steps, log, progress)


def entropy(model: nn.Module) -> float:
    """Mean entropy (nats) of the strategy distributions, a convergence indicator."""
    hs = []
    with torch.no_grad():
        for m in supernet_layers(model).values():
            for p in (m.w_probs(), m.a_probs()):
                hs.append(float(-(p * p.clamp_min(1e-12).log()).sum()))
    return sum(hs) / len(hs) if hs else 0.0


__all__ = [
    "DQSS_STRATEGIES",
    "EXTENDED_STRATEGIES",
    "StrategyConv2d",
    "build_candidate",
    "candidate_name",
    "candidate_spec",
    "build_supernet",
    "calibrate",
    "derive_network",
    "derive_plan",
    "entropy",
    "estimate_gains",
    "expected_loss_penalty",
    "init_logits_from_local_error",
    "local_errors",
    "log_mse_loss",
    "parse_quantizers",
    "PTQSearch",
    "QATSearch",
    "ptq_phases",
    "ptq_search",
    "qat_phases",
    "recalibrate",
    "qat_search",
    "relative_errors",
    "searched_layers",
    "strategy_parameters",
    "temperature_at",
]
