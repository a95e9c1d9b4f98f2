"""Uniform fake quantizers with different rules for the step size and its gradient.

A quantizer maps x to s·clamp(round(x/s), qmin, qmax) (half-to-even rounding, zero point 0), where
(qmin, qmax) = (−2^(b−1), 2^(b−1)−1) for signed tensors (weights, signed activations) and (0, 2^b−1)
for unsigned ones. `axis` selects one step per index of that axis (per output channel for weights).
The strategies (all usable for weights and for activations unless stated):

- ``lsq``: learned step, LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020): init
  2·mean|x|/√qmax, gradient scaled by 1/√(numel·qmax); runs on torch.ops.qops.fake_quant.
- ``pact``: learned clipping value α (Choi et al., "PACT: Parameterized Clipping Activation for
  Quantized Neural Networks", 2018): s = α/qmax, gradient to α only from clipped elements.
- ``dorefa``: DoReFa-Net (Zhou et al., 2016): weights through tanh normalised to [−1, 1],
  activations clipped to [−1, 1] or [0, 1]; no learned parameters.
- ``hwgq``: half-wave Gaussian quantizer (Cai et al., "Deep Learning with Low Precision by
  Half-wave Gaussian Quantization", CVPR 2017): the MSE-optimal uniform step for a (half-)Gaussian
  of the tensor's standard deviation; activations only.
- ``minmax``: s = max|x|/qmax.
- ``percentile``: s = percentile(|x|, p)/qmax (p = 99.99 by default).
- ``mse``: the clipping value on a grid in (0, max|x|] that minimizes ‖Q(x) − x‖².
- ``aciq``: analytical clipping, ACIQ (Banner, Nahshan, Soudry, "Post training 4-bit quantization
  of convolutional networks for rapid-deployment", NeurIPS 2019): the MSE-optimal clip of a
  Laplace distribution (half-Laplace for unsigned tensors) fitted to the tensor.

Statistics-based quantizers may also be asymmetric (``build_quantizer(..., asymmetric=True)``,
activations only): an affine grid over [lo, hi] with an integer zero point (AsymmetricQuantizer).
- ``fqsr``: FQSR's learnable clipping (Wang et al., ACM MM 2021): LSQ's learned step, initialised
  from statistics over the first `warmup` training iterations (pass-through meanwhile), keeping
  the quantization error for FQSR's calibration loss (see FQSRQuantizer).

Statistics-based steps (minmax, percentile, mse, hwgq) are computed from the first batch seen
and then tracked with an exponential moving average in training mode (`momentum`); `freeze()`
stops tracking (post-training quantization calibrates, then freezes). All steps are kept as
positive values; the straight-through estimator passes gradients to x inside the clipping range.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import qops  # also registers torch.ops.qops.fake_quant
from qnas.errors import QnasError


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """qops.quant_range (the one definition of a b-bit code range) for the bits a quantizer takes."""
    if not 1 <= int(bits) <= 16:
        raise QnasError(f"bits: {bits} is outside 1..16")
    return qops.quant_range(int(bits), signed)


def _reduce_dims(x: torch.Tensor, axis: int | None) -> list[int]:
    return [d for d in range(x.dim()) if axis is None or d != axis % x.dim()]


def _per_axis(v: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Reshapes a per-axis vector (or a scalar) so that it broadcasts against x."""
    if axis is None:
        return v.reshape([1] * x.dim()) if x.dim() else v.reshape(())
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return v.reshape(shape)


def _amax(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return x.detach().abs().amax().reshape(1)
    return x.detach().abs().amax(dim=_reduce_dims(x, axis))


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class Quantizer(nn.Module):
    """Base class: a uniform symmetric fake quantizer of `bits` bits (see module docstring)."""

    strategy = "base"
    weight_ok = True
    activation_ok = True
    #: The step is a statistic of the data (calibrated, then frozen), not learned by gradient.
    from_statistics = False
    #: Quantizes activations (build_quantizer sets it): a batch, which torch.distributed splits.
    activation = False

    def __init__(
        self, bits: int, *, signed: bool, axis: int | None = None, channels: int = 1, momentum: float = 0.1
    ):
        super().__init__()
        self.qmin, self.qmax = quant_range(bits, signed)
        self.bits, self.signed, self.axis = int(bits), bool(signed), axis
        self.momentum = float(momentum)
        n = channels if axis is not None else 1
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        self._channels = n
        # Python copies of the two flags: forward branches on these, so a compiled graph has no host sync
        # or data-dependent branch (torch.compile guards on them and recompiles once when one changes).
        self._initialized = False
        self._frozen = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized, self._frozen = bool(self.initialized), bool(self.frozen)

    # Subclasses: `scale()` returns the current step (shape [n]); `_init(x)` sets it from data.
    def scale(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _init(self, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def deploy_step(self) -> torch.Tensor | None:
        """The step forward quantizes with as integer inference uses it (float32, flat, detached), or
        None when forward is not s * clamp(round(x / s)) with zero point 0 (asymmetric, DoReFa)."""
        return None

    def _track(self, x: torch.Tensor) -> None:
        """Statistics-based strategies update their step in training mode; learned ones do not."""

    def freeze(self) -> None:
        self.frozen.fill_(True)
        self._frozen = True

    def reset(self) -> None:
        """Forget the step's initialisation and unfreeze: the next tensor seen sets it again."""
        self.initialized.fill_(False)
        self.frozen.fill_(False)
        self._initialized = self._frozen = False

    def _mark_initialized(self) -> None:
        self.initialized.fill_(True)
        self._initialized = True

    def extra_repr(self) -> str:
        axis = "per-tensor" if self.axis is None else f"axis={self.axis}"
        return f"bits={self.bits}, signed={self.signed}, {axis}"

    def observe(self, x: torch.Tensor) -> None:
        """The data-driven part of forward without quantizing: initializes the step from the first
        tensor seen, then (training mode, not frozen) lets statistics-based steps track the data.
        Fused layers that quantize with torch.ops.qops.mixed_quant_conv call this, then `scale()`."""
        if not self._initialized:
            with torch.no_grad():
                self._init(self._whole(x))
            self._mark_initialized()
        elif self.training and not self._frozen:
            with torch.no_grad():
                self._track(self._whole(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_meta:  # cost counting on the meta device: quantization does not change shapes
            return x
        self.observe(x)
        return self.quantize(x)

    def lsq_grad_factor(self, x: torch.Tensor) -> float:
        """LSQ's gradient scale 1/sqrt(elements per step · qmax) for a tensor like x."""
        per_scale = x.numel() * self._shares() // max(self._channels, 1)
        return 1.0 / math.sqrt(max(per_scale, 1) * max(self.qmax, 1))

    def _whole(self, x: torch.Tensor) -> torch.Tensor:
        """The whole batch an activation is a rank's share of (torch.distributed): statistics and inits
        computed on it are one process's, and the same in every rank."""
        if not self.activation:
            return x
        from qnas.runs.distributed import whole_batch

        return whole_batch(x)

    def _shares(self) -> int:
        """How many ranks' shares the batch x of an activation quantizer is one of: LSQ counts the
        elements of the whole batch (1 for weights and outside torch.distributed)."""
        if not self.activation:
            return 1
        from qnas.runs.distributed import batch_shares

        return batch_shares()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Fake quantization with the current step; gradients to x by the straight-through estimator."""
        s = self.scale().detach()
        if self.axis is None:
            return torch.ops.qops.fake_quant(
                x, s.reshape(1), torch.zeros(1, device=x.device), -1, self.qmin, self.qmax, 1.0
            )
        zp = torch.zeros_like(s)
        return torch.ops.qops.fake_quant(x, s, zp, self.axis % x.dim(), self.qmin, self.qmax, 1.0)


class _StatQuantizer(Quantizer):
    """A step computed from statistics of the data (EMA in training mode), not learned."""

    from_statistics = True

    def __init__(self, bits: int, **kw):
        super().__init__(bits, **kw)
        self.register_buffer("step", torch.ones(self._channels))

    def scale(self) -> torch.Tensor:
        return self.step

    def deploy_step(self) -> torch.Tensor:
        return self.step.detach().to(torch.float32).reshape(-1)

    def _clip(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _init(self, x: torch.Tensor) -> None:
        self.step.copy_(self._clip(x).clamp_min(1e-8) / self.qmax)

    def _track(self, x: torch.Tensor) -> None:
        new = self._clip(x).clamp_min(1e-8) / self.qmax
        self.step.mul_(1 - self.momentum).add_(new, alpha=self.momentum)


class MinMaxQuantizer(_StatQuantizer):
    strategy = "minmax"

    def _clip(self, x):
        return _amax(x, self.axis)


class PercentileQuantizer(_StatQuantizer):
    strategy = "percentile"

    def __init__(self, bits: int, *, percentile: float = 99.99, **kw):
        super().__init__(bits, **kw)
        if not 0 < percentile <= 100:
            raise QnasError(f"percentile: {percentile} is outside (0, 100]")
        self.percentile = float(percentile)

    def _clip(self, x):
        a = x.detach().abs().float()
        q = self.percentile / 100
        if self.axis is None:
            flat = a.reshape(-1)
            # torch.quantile is limited to 2^24 elements: subsample deterministically beyond that.
            if flat.numel() > 1 << 24:
                flat = flat[:: flat.numel() // (1 << 24) + 1]
            return torch.quantile(flat, q).reshape(1)
        a = a.movedim(self.axis % x.dim(), 0).reshape(x.shape[self.axis], -1)
        return torch.quantile(a, q, dim=1)


class MSEQuantizer(_StatQuantizer):
    """Clipping value minimizing the quantization MSE over `grid` candidates c·max|x|, c ∈ (0, 1]."""

    strategy = "mse"

    def __init__(self, bits: int, *, grid: int = 80, **kw):
        super().__init__(bits, **kw)
        self.grid = int(grid)

    def _clip(self, x):
        return mse_optimal_clip(x, self.axis, self.qmin, self.qmax, self.grid)


_MSE_SAMPLE = 1 << 14


def mse_optimal_clip(x: torch.Tensor, axis: int | None, qmin: int, qmax: int, grid: int = 80) -> torch.Tensor:
    """The clipping value c·max|x| (c on a grid of `grid` values in (0, 1]) minimizing ‖Q(x) − x‖².

    Per-tensor, the error is measured on at most 2^14 elements (an evenly strided subsample that
    always keeps the maximum), so the search costs the same on a feature map as on a weight."""
    x = x.detach().float()
    amax = _amax(x, axis).clamp_min(1e-8)
    if axis is None:
        flat = x.reshape(-1)
        if flat.numel() > _MSE_SAMPLE:
            flat = torch.cat([flat[:: flat.numel() // _MSE_SAMPLE + 1], amax])
        rows = flat.unsqueeze(0)  # [1, n]
    else:
        rows = x.movedim(axis % x.dim(), 0).reshape(x.shape[axis], -1)  # [C, n]
    fractions = torch.arange(1, grid + 1, device=x.device, dtype=x.dtype) / grid
    best_err, best = None, None
    # All candidates at once, in chunks of the grid that keep the temporary below ~2^23 elements.
    chunk = max(1, (1 << 23) // max(rows.numel(), 1))
    for lo in range(0, grid, chunk):
        clips = fractions[lo : lo + chunk, None] * amax[None, :]  # [g, C]
        s = (clips / qmax)[:, :, None]
        err = ((torch.clamp(torch.round(rows[None] / s), qmin, qmax) * s - rows[None]) ** 2).sum(-1)  # [g, C]
        k = err.argmin(0)
        err_k = err.gather(0, k[None])[0]
        clip_k = clips.gather(0, k[None])[0]
        if best_err is None:
            best_err, best = err_k, clip_k
        else:
            better = err_k < best_err
            best_err = torch.where(better, err_k, best_err)
            best = torch.where(better, clip_k, best)
    return best


def mse_optimal_range(x: torch.Tensor, levels: int, grid: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) = (a·min(x, 0), b·max(x, 0)), a and b on a grid of `grid` values in (0, 1] each,
    minimizing ‖Q(x) − x‖² for an affine grid of `levels` codes over [lo, hi] with an integer zero
    point; on at most 2^14 evenly strided elements (plus the extremes). A non-negative tensor gets
    lo = 0 and a one-dimensional search."""
    x = x.detach().float().reshape(-1)
    lo0, hi0 = x.min().clamp_max(0), x.max().clamp_min(0)
    if x.numel() > _MSE_SAMPLE:
        x = torch.cat([x[:: x.numel() // _MSE_SAMPLE + 1], lo0.reshape(1), hi0.reshape(1)])
    f = torch.arange(1, grid + 1, device=x.device, dtype=x.dtype) / grid
    a = f if bool(lo0 < 0) else torch.zeros(1, device=x.device, dtype=x.dtype)
    lo = (a[:, None] * lo0).expand(-1, grid).reshape(-1)  # [n_a * grid]
    hi = (f[None, :] * hi0).expand(len(a), -1).reshape(-1)
    s = ((hi - lo) / (levels - 1)).clamp_min(1e-8)
    z = torch.round(-lo / s).clamp(0, levels - 1)
    q = (torch.clamp(torch.round(x[None] / s[:, None]) + z[:, None], 0, levels - 1) - z[:, None]) * s[:, None]
    k = int(((q - x[None]) ** 2).sum(1).argmin())
    return lo[k], hi[k]


class AsymmetricQuantizer(Quantizer):
    """y = s·(clamp(round(x/s) + z, 0, 2^b − 1) − z): an affine grid over [lo, hi] with an integer
    zero point z, for activations whose range is not centred on zero (the residual stream of a
    network without batch norm; DDTB, Zhong et al., ECCV 2022, motivates asymmetric bounds for
    SR). Zero is a code, so zero padding stays exact. lo and hi are statistics of the data, like
    the symmetric quantizer of the same name: `stat` "minmax" (min, max), "percentile" (the
    0.01th and 99.99th percentiles) or "mse" (mse_optimal_range); EMA in training mode until
    frozen. Activations only; the packed integer format does not represent a zero point, so
    networks with these quantizers do not export."""

    weight_ok = False
    from_statistics = True
    STATS = ("minmax", "percentile", "mse")

    def __init__(self, bits: int, *, stat: str = "minmax", signed: bool = True, **kw):
        if stat not in self.STATS:
            raise QnasError(f"asymmetric quantizer: statistic {stat!r} is not one of {', '.join(self.STATS)}")
        super().__init__(bits, signed=False, **kw)
        if self.axis is not None:
            raise QnasError("asymmetric quantizer: per-tensor only")
        self.signed = bool(signed)  # what the tensor is; the codes are unsigned with a zero point
        self.stat = stat
        self.strategy = f"{stat}_asym"
        self.register_buffer("lo", torch.zeros(1))
        self.register_buffer("hi", torch.ones(1))

    def _range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().float()
        if self.stat == "minmax":
            return x.min().clamp_max(0), x.max().clamp_min(0)
        if self.stat == "percentile":
            flat = x.reshape(-1)
            if flat.numel() > 1 << 24:
                flat = flat[:: flat.numel() // (1 << 24) + 1]
            q = torch.quantile(flat, torch.tensor([1e-4, 1 - 1e-4], device=flat.device))
            return q[0].clamp_max(0), q[1].clamp_min(0)
        return mse_optimal_range(x, self.qmax + 1)

    def _init(self, x: torch.Tensor) -> None:
        lo, hi = self._range(x)
        self.lo.fill_(float(lo))
        self.hi.fill_(float(hi))

    def _track(self, x: torch.Tensor) -> None:
        lo, hi = self._range(x)
        self.lo.mul_(1 - self.momentum).add_(lo, alpha=self.momentum)
        self.hi.mul_(1 - self.momentum).add_(hi, alpha=self.momentum)

    def scale(self) -> torch.Tensor:
        return ((self.hi - self.lo) / self.qmax).clamp_min(1e-8)

    def zero_point(self) -> torch.Tensor:
        return torch.round(-self.lo / self.scale()).clamp(0, self.qmax)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale().detach()
        return torch.ops.qops.fake_quant(x, s, self.zero_point().detach(), -1, 0, self.qmax, 1.0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, asymmetric {self.stat}"


class HWGQQuantizer(_StatQuantizer):
    """Step = σ·Δ*(bits), Δ* the MSE-optimal uniform step for a unit (half-)Gaussian (Cai et al. 2017).

    Unsigned activations see the half-wave case (x > 0 after ReLU): σ is the RMS of the positive
    part and Δ* minimizes the error of a half-normal; signed ones use the full normal."""

    strategy = "hwgq"
    weight_ok = False

    @staticmethod
    def optimal_step(bits: int, signed: bool) -> float:
        """Δ* for a unit Gaussian (signed) or half-Gaussian (unsigned), found numerically."""
        return _optimal_gaussian_step(bits, signed)

    def _clip(self, x):
        x = x.detach().float()
        dims = _reduce_dims(x, self.axis)
        if self.signed:
            sigma = x.pow(2).mean(dim=dims).sqrt()
        else:
            pos = x.clamp_min(0)
            n = (x > 0).sum(dim=dims).clamp_min(1)
            sigma = (pos.pow(2).sum(dim=dims) / n).sqrt()
        return sigma.reshape(-1) * self.optimal_step(self.bits, self.signed) * self.qmax


class ACIQQuantizer(_StatQuantizer):
    """Step = b·Δ*(bits), Δ* the MSE-optimal uniform step for a unit Laplace distribution (ACIQ,
    Banner, Nahshan, Soudry, NeurIPS 2019, who find activations and weights closer to Laplace than
    to Gaussian). Signed tensors: b = mean|x| (Laplace(0, b)); unsigned ones see the positive half,
    an exponential of mean b = mean of the positive values. Weights and activations."""

    strategy = "aciq"

    def _clip(self, x):
        x = x.detach().float()
        dims = _reduce_dims(x, self.axis)
        if self.signed:
            b = x.abs().mean(dim=dims)
        else:
            b = x.clamp_min(0).sum(dim=dims) / (x > 0).sum(dim=dims).clamp_min(1)
        return b.reshape(-1) * _optimal_unit_step("laplace", self.bits, self.signed) * self.qmax


_GAUSS_STEP_CACHE: dict[tuple[str, int, bool], float] = {}


def _optimal_gaussian_step(bits: int, signed: bool) -> float:
    return _optimal_unit_step("gaussian", bits, signed)


def _optimal_unit_step(dist: str, bits: int, signed: bool) -> float:
    """The step minimizing the expected squared error of quantizing a unit `dist` ("gaussian":
    N(0, 1); "laplace": Laplace(0, 1)), its positive half when unsigned, found numerically."""
    key = (dist, bits, signed)
    if key not in _GAUSS_STEP_CACHE:
        import numpy as np
        from scipy import integrate, optimize, stats

        qmin, qmax = quant_range(bits, signed)
        tail = 12.0 if dist == "gaussian" else 30.0
        lo = 0.0 if not signed else -tail  # the half-wave case only sees x > 0 (ReLU)
        pdf = stats.norm.pdf if dist == "gaussian" else (lambda x: 0.5 * np.exp(-abs(x)))

        def mse(step: float) -> float:
            def err(x):
                q = min(max(round(x / step), qmin), qmax) * step
                return (x - q) ** 2 * pdf(x)

            # Integrate piecewise between the rounding thresholds, where the integrand is smooth.
            cuts = [(k + 0.5) * step for k in range(qmin, qmax) if lo < (k + 0.5) * step < tail]
            edges = [lo, *cuts, tail]
            return sum(integrate.quad(err, a, b)[0] for a, b in zip(edges[:-1], edges[1:], strict=True))

        res = optimize.minimize_scalar(mse, bounds=(1e-3, 4.0), method="bounded", options={"xatol": 1e-6})
        _GAUSS_STEP_CACHE[key] = float(res.x)
    return _GAUSS_STEP_CACHE[key]


def load_log_steps(state_dict: dict, prefix: str, names: tuple[str, ...]) -> None:
    """Converts, in a state dict being loaded, each learned step `prefix + name` of a file written before
    the steps were learned as logarithms into the `prefix + "log_" + name` that is learned now."""
    for name in names:
        legacy = state_dict.pop(prefix + name, None)
        if legacy is not None and prefix + "log_" + name not in state_dict:
            state_dict[prefix + "log_" + name] = legacy.abs().clamp_min(1e-8).log()


class LSQQuantizer(Quantizer):
    """Learned step size (Esser et al., ICLR 2020) on torch.ops.qops.fake_quant."""

    strategy = "lsq"

    def __init__(self, bits: int, **kw):
        super().__init__(bits, **kw)
        # The step is learned as its logarithm, as TQT learns its thresholds (Jain et al., "Trained
        # Quantization Thresholds for Accurate and Efficient Fixed-Point Inference of Deep Neural
        # Networks", MLSys 2020): Adam moves a parameter by about its learning rate per update whatever
        # the gradient's size, so a step of 2e-3 (an 8-bit skip connection) learned directly at lr 1e-3
        # changes by half its value per update, crosses zero and collapses the clipping range of the
        # skip quantizers (a retrained network then outputs its anchor skip alone). In the log domain the
        # same update is a 0.1 % change, whatever the tensor's range, and the step stays positive.
        self.log_step = nn.Parameter(torch.zeros(self._channels))

    @property
    def step(self) -> torch.Tensor:
        """The step (exp of the learned log-step), in the autograd graph."""
        return self.log_step.exp()

    def set_step(self, value: torch.Tensor) -> None:
        """Sets the step to `value` (clamped to >= 1e-8), outside autograd."""
        with torch.no_grad():
            self.log_step.copy_(value.detach().clamp_min(1e-8).log().reshape(self.log_step.shape))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Files written before the step was learned in the log domain hold "step" itself.
        load_log_steps(state_dict, prefix, ("step",))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scale(self) -> torch.Tensor:
        return self.step

    def deploy_step(self) -> torch.Tensor:
        return self.step.detach().clamp_min(1e-8).to(torch.float32).reshape(-1)

    def _init(self, x: torch.Tensor) -> None:
        mean_abs = x.detach().abs().mean(dim=_reduce_dims(x, self.axis)).reshape(-1)
        self.set_step(2 * mean_abs / math.sqrt(max(self.qmax, 1)))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        per_scale = x.numel() * self._shares() // self.log_step.numel()
        grad_factor = 1.0 / math.sqrt(max(per_scale, 1) * max(self.qmax, 1))
        s = self.step.clamp_min(1e-8)
        zp = torch.zeros_like(s)
        axis = -1 if self.axis is None else self.axis % x.dim()
        return torch.ops.qops.fake_quant(x, s, zp, axis, self.qmin, self.qmax, grad_factor)


class FQSRQuantizer(LSQQuantizer):
    """The quantizer of FQSR (Wang, Chen, Zhuang, Shen, "Fully Quantized Image Super-Resolution
    Networks", ACM MM 2021, arXiv:2011.14265), as we read it (docs/quantization.md):

    - per-layer learnable clipping: each tensor has its own clipping value c = qmax·s, learned with
      LSQ's gradient, because weight and activation ranges differ widely from layer to layer;
    - initialised from activation statistics over the first `warmup` training iterations: during
      them the quantizer passes x through unchanged and sets c to the running mean of the per-batch
      statistic (`init_stat`: "max" = max|x|, the paper's code; "mse" = the MSE-optimal clip);
    - the calibration loss: in training mode it keeps `calibration_error` = mean|Q(x) − x| (a
      tensor in the graph) that the training loop adds to the task loss (qnas.quant.apply), so
      clipping values and the features themselves are pulled towards a small quantization error.

    Outside training, or with warmup = 0, an uninitialised quantizer takes its clip from the first
    tensor it sees."""

    strategy = "fqsr"

    def __init__(self, bits: int, *, warmup: int = 0, init_stat: str = "max", **kw):
        super().__init__(bits, **kw)
        if init_stat not in ("max", "mse"):
            raise QnasError(f"init_stat: expected 'max' or 'mse', got {init_stat!r}")
        if int(warmup) < 0:
            raise QnasError(f"warmup: must not be negative, got {warmup}")
        self.warmup = int(warmup)
        self.init_stat = init_stat
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("stat_sum", torch.zeros(self._channels))
        self._seen = 0  # Python copy of `seen` (see Quantizer._initialized)
        self.calibration_error: torch.Tensor | None = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._seen = int(self.seen)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, warmup={self.warmup}, init={self.init_stat}"

    def _statistic(self, x: torch.Tensor) -> torch.Tensor:
        if self.init_stat == "max":
            return _amax(x, self.axis)
        # 40 candidates (2.5 % of max|x| apart) keep the warm-up cheap; it is refined by learning.
        return mse_optimal_clip(x, self.axis, self.qmin, self.qmax, grid=40)

    def _init(self, x: torch.Tensor) -> None:
        self.set_step(self._statistic(x) / max(self.qmax, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_meta:
            return super().forward(x)
        if self.training and self._seen < self.warmup:
            with torch.no_grad():
                self.stat_sum.add_(self._statistic(self._whole(x)))
                self.seen.add_(1)
                self._seen += 1
                self.set_step(self.stat_sum / self.seen / max(self.qmax, 1))
                self._mark_initialized()
            self.calibration_error = None
            return x
        self.observe(x)
        y = self.quantize(x)
        self.calibration_error = (y - x).abs().mean() if self.training else None
        return y


class PACTQuantizer(Quantizer):
    """Learned clipping value α (Choi et al. 2018): y = s·round(clip(x)/s), s = α/qmax.

    The gradient to α is 1 for x above α (and −1 below −α when signed), 0 inside: PACT's rule, which
    differs from LSQ in ignoring the rounding error inside the range."""

    strategy = "pact"

    def __init__(self, bits: int, **kw):
        super().__init__(bits, **kw)
        self.alpha = nn.Parameter(torch.ones(self._channels))

    def scale(self) -> torch.Tensor:
        return self.alpha.detach().abs() / self.qmax

    def deploy_step(self) -> torch.Tensor:
        return (self.alpha.detach().abs().clamp_min(1e-8) / self.qmax).to(torch.float32).reshape(-1)

    def _init(self, x: torch.Tensor) -> None:
        self.alpha.data.copy_(_amax(x, self.axis).clamp_min(1e-8))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        alpha = _per_axis(self.alpha.abs().clamp_min(1e-8), x, self.axis)
        lo = -alpha if self.signed else torch.zeros_like(alpha)
        clipped = torch.minimum(torch.maximum(x, lo), alpha)
        s = alpha.detach() / self.qmax
        return _ste_round(clipped / s) * s


class DoReFaQuantizer(Quantizer):
    """DoReFa-Net (Zhou et al. 2016). Weights: w' = tanh(w)/max|tanh(w)| quantized on [−1, 1]
    (signed) and rescaled by max|w| so the layer keeps its magnitude; activations: clipped to [0, 1]
    (unsigned) or [−1, 1] (signed) and quantized there. No learned parameters."""

    strategy = "dorefa"

    def __init__(self, bits: int, *, weight: bool = False, **kw):
        super().__init__(bits, **kw)
        self.weight = bool(weight)
        self.register_buffer("step", torch.full((self._channels,), 1.0 / max(self.qmax, 1)))

    def scale(self) -> torch.Tensor:
        return self.step

    def _init(self, x: torch.Tensor) -> None:
        pass

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        s = 1.0 / max(self.qmax, 1)
        if self.weight:
            t = torch.tanh(x)
            tmax = _per_axis(_amax(t, self.axis).clamp_min(1e-8), x, self.axis)
            mag = _per_axis(_amax(x, self.axis).clamp_min(1e-8), x, self.axis)
            q = torch.clamp(_ste_round(t / tmax / s), self.qmin, self.qmax) * s
            return q * mag
        lo = -1.0 if self.signed else 0.0
        return torch.clamp(_ste_round(torch.clamp(x, lo, 1.0) / s), self.qmin, self.qmax) * s


QUANTIZERS: dict[str, type[Quantizer]] = {
    q.strategy: q
    for q in (
        LSQQuantizer,
        FQSRQuantizer,
        PACTQuantizer,
        DoReFaQuantizer,
        HWGQQuantizer,
        MinMaxQuantizer,
        PercentileQuantizer,
        MSEQuantizer,
        ACIQQuantizer,
    )
}


def build_quantizer(
    name: str,
    bits: int,
    *,
    kind: str,
    signed: bool | None = None,
    channels: int = 1,
    per_channel: bool = False,
    asymmetric: bool = False,
    **kw,
) -> Quantizer:
    """A quantizer by strategy name for `kind` "weight" (signed, per output channel when
    `per_channel`) or "activation" (unsigned unless `signed`, per tensor; an AsymmetricQuantizer
    with the statistic `name` when `asymmetric`)."""
    if name not in QUANTIZERS:
        raise QnasError(f"quantizer: unknown '{name}' (known: {', '.join(sorted(QUANTIZERS))})")
    cls = QUANTIZERS[name]
    if asymmetric:
        if kind != "activation":
            raise QnasError(f"quantizer: asymmetric '{name}' quantizes activations only")
        if name not in AsymmetricQuantizer.STATS:
            raise QnasError(
                f"quantizer: '{name}' has no asymmetric form (known: {', '.join(AsymmetricQuantizer.STATS)})"
            )
        q = AsymmetricQuantizer(bits, stat=name, signed=bool(signed), **kw)
        q.activation = True
        return q
    if kind == "weight":
        if not cls.weight_ok:
            raise QnasError(f"quantizer: '{name}' quantizes activations only")
        axis = 0 if per_channel else None
        extra = {"weight": True} if cls is DoReFaQuantizer else {}
        return cls(
            bits, signed=True if signed is None else signed, axis=axis, channels=channels, **extra, **kw
        )
    if kind == "activation":
        if not cls.activation_ok:
            raise QnasError(f"quantizer: '{name}' quantizes weights only")
        q = cls(bits, signed=bool(signed), axis=None, **kw)
        q.activation = True
        return q
    raise QnasError(f"kind: expected 'weight' or 'activation', got {kind!r}")
