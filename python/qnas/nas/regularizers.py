"""The regularizers of the QuantNAS architecture loss.

- Entropy of the architecture distribution, Σ_slots H(softmax(alphas[slot])), weighted by a coefficient
  that grows during the search (entropy_coef): free exploration first, then a push towards one
  (op, bits) per layer, so that the argmax genotype is the network the supernet actually became
  (Shvetsov et al., "QuantNAS for super resolution", arXiv:2208.14839).
- BitOps target (BitOpsTarget, `--target-gbitops`): weight · log²(E[BitOps] / target), a cost
  constraint in the spirit of the resource targets of FBNet (Wu et al., CVPR 2019) and ProxylessNAS
  (Cai et al., ICLR 2019): the expected cost is driven to the target whatever the space, and the
  loss decides which layers pay for it.
- Hardware penalty (BitOpsPenalty, `--penalty`, the paper's term): the expected BitOps divided by
  their value for the supernet's initial architecture distribution, times a weight.
"""

from __future__ import annotations

import torch


def entropy_coef(step: int, total_steps: int, coef: float, warmup: float) -> float:
    """Entropy weight at `step` (0-based) of a `total_steps` search.

    Zero during the first `warmup` fraction of the steps, then increasing linearly to `coef` at the last
    step: w(t) = coef · clip((t - W) / (T - 1 - W), 0, 1) with W = warmup · T. (The QuantNAS code ramps
    over epochs with a linear factor times a logarithmic one; a linear ramp after a warm-up is the same
    idea with one knob less.)"""
    if coef == 0 or total_steps <= 0:
        return 0.0
    start = warmup * total_steps
    if step < start:
        return 0.0
    span = max(total_steps - 1 - start, 1e-9)
    return float(coef * min(1.0, (step - start) / span))


def temperature_at(step: int, total_steps: int, start: int, final: float) -> float:
    """Softmax temperature of the architecture distribution at `step` (0-based): 1 until the architecture
    steps begin (`start`), then geometric down to `final` at the last step,
    τ(t) = final^((t - start) / (T - 1 - start)).

    Annealing the temperature (as SNAS, Xie et al., ICLR 2019, and FBNet, Wu et al., CVPR 2019, anneal
    their Gumbel-softmax) sharpens the distribution without reordering it, so by the end the supernet
    is close to the argmax network it will be derived into: the weights adapt to it, and the BitOps
    target constrains the expected cost of a near one-hot distribution, i.e. the derived network's."""
    if final == 1.0 or step <= start:
        return 1.0
    span = max(total_steps - 1 - start, 1)
    return float(final ** min(1.0, (step - start) / span))


class BitOpsPenalty:
    """penalty · E[BitOps] / E0[BitOps], E0 fixed at the supernet's initial probabilities (QuantNAS)."""

    def __init__(self, weight: float, initial: float):
        if not initial > 0:
            raise ValueError(f"initial expected BitOps must be positive, got {initial}")
        self.weight = float(weight)
        self.initial = float(initial)

    def normalized(self, expected: torch.Tensor) -> torch.Tensor:
        return expected / self.initial

    def __call__(self, expected: torch.Tensor) -> torch.Tensor:
        return self.weight * self.normalized(expected)


class BitOpsTarget:
    """weight · log²(E[BitOps] / target): zero at the target, the same pull at 2x over it as at 2x under,
    and, being a function of the ratio, the same pressure in any space, scale or candidate set.

    Its gradient on a slot's alphas is 2 · weight · log(E/target) · ∂E/∂α / E: the relative cost of
    the slot's candidates, signed by which side of the target the expectation is on."""

    def __init__(self, weight: float, target: float):
        if not target > 0:
            raise ValueError(f"target BitOps must be positive, got {target}")
        self.weight = float(weight)
        self.target = float(target)

    def normalized(self, expected: torch.Tensor) -> torch.Tensor:
        return expected / self.target

    def __call__(self, expected: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.log(self.normalized(expected)).square()
