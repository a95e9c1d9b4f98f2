"""The two regularizers of the QuantNAS architecture loss (Shvetsov et al., arXiv:2208.14839).

- Entropy of the architecture distribution, Σ_slots H(softmax(alphas[slot])), weighted by a coefficient
  that grows during the search (entropy_coef): free exploration first, then a push towards one
  (op, bits) per layer, so that the argmax genotype is the network the supernet actually became.
- Hardware penalty: the expected BitOps Σ probs · BitOps(term) over every layer, divided by its value
  for the supernet's initial architecture distribution (so --penalty weighs a number near 1 at the start,
  whatever the space and scale), times --penalty.
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


class BitOpsPenalty:
    """penalty · E[BitOps] / E0[BitOps], E0 fixed at the supernet's initial probabilities."""

    def __init__(self, weight: float, initial: float):
        if not initial > 0:
            raise ValueError(f"initial expected BitOps must be positive, got {initial}")
        self.weight = float(weight)
        self.initial = float(initial)

    def normalized(self, expected: torch.Tensor) -> torch.Tensor:
        return expected / self.initial

    def __call__(self, expected: torch.Tensor) -> torch.Tensor:
        return self.weight * self.normalized(expected)
