"""Pure-torch references of every torch.ops.qops op: the specification the tests compare against.

Each function has the op's signature and semantics (shared/DESIGN.md, "Op contracts") and is written
for clarity, not speed. Where torch has a built-in with the same meaning (LSQ fake quantization), the
reference is that built-in.
"""

from __future__ import annotations

import torch


def mixed_quant_conv(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    probs: torch.Tensor,
    w_bits: list[int],
    a_bits: list[int],
    w_scales: torch.Tensor,
    a_scales: torch.Tensor,
    a_signed: bool,
    groups: list[int],
    dilations: list[int],
    stride: int = 1,
    bias: torch.Tensor | None = None,
    mode: str = "quant",
    seed: int = 0,
    terms=None,
) -> torch.Tensor:
    """The QuantNAS supernet layer written as its definition (Shvetsov et al., "QuantNAS for super
    resolution: searching for efficient quantization-friendly architectures against quantization
    noise"): the probability-weighted sum of every (operation, weight bits, activation bits) term,

        y = sum_{o,i,j} probs[o,i,j] * conv_o(FQa_j(x), FQw_i(weights[o])) + bias,

    with FQ the LSQ fake quantization (torch's learnable fake quantize, zero point 0), weights signed
    [-2^(b-1), 2^(b-1)-1], activations [0, 2^b-1] (or signed), bits 0 = full precision, "same" padding
    dilation*(k-1)/2 per side. mode "noise" replaces each FQ by quant_noise with the per-stream seeds of
    :func:`mixed_quant_conv_noise_seeds`. ``terms`` (nested [o][i][j] booleans, default all) limits the sum
    to those terms: the naive loop over the non-zero terms (tied bit-widths) that qops.nn and the benchmarks
    use as the baseline.
    """
    if mode not in ("quant", "noise"):
        raise RuntimeError(f'mode: expected "quant" or "noise", got "{mode}"')
    a_seeds, w_seeds = mixed_quant_conv_noise_seeds(seed, len(weights), len(w_bits), len(a_bits))

    def fq(t, scale, bits, signed, stream_seed):
        if bits == 0:
            return t
        if mode == "noise":
            return torch.ops.qops.quant_noise(t, bits, stream_seed)
        qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        zero_point = torch.zeros(1, dtype=torch.float32, device=t.device)
        return torch._fake_quantize_learnable_per_tensor_affine(
            t, scale.reshape(1), zero_point, qmin, qmax, 1.0
        )

    xq = [fq(x, a_scales[j], b, a_signed, a_seeds[j]) for j, b in enumerate(a_bits)]
    y = None
    for o, w in enumerate(weights):
        d = dilations[o]
        padding = (d * (w.shape[2] - 1) // 2, d * (w.shape[3] - 1) // 2)
        for i, wb in enumerate(w_bits):
            wq = None
            for j in range(len(a_bits)):
                if terms is not None and not terms[o][i][j]:
                    continue
                if wq is None:
                    wq = fq(w, w_scales[o, i], wb, True, w_seeds[o][i])
                term = probs[o, i, j] * torch.nn.functional.conv2d(
                    xq[j], wq, None, stride, padding, d, groups[o]
                )
                y = term if y is None else y + term
    if y is None:  # every term skipped: the sum is 0
        n, _, h, w_ = x.shape
        y = x.new_zeros(n, weights[0].shape[0], (h - 1) // stride + 1, (w_ - 1) // stride + 1)
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1)
    return y


_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mixed_quant_conv_noise_seeds(seed: int, n_ops: int, n_w_bits: int, n_a_bits: int):
    """The quant_noise seeds of mixed_quant_conv's noise mode (csrc/include/qops/mixed_quant_conv.h,
    mqc_stream_seed): stream s of a call with seed `seed` uses splitmix64(seed + s) as a non-negative
    int63, with s = j for activation variant j and s = n_a_bits + o * n_w_bits + i for weight o at
    weight bit-width i. Returns (a_seeds[j], w_seeds[o][i])."""

    def stream(s: int) -> int:
        return _splitmix64((seed + s) & _MASK64) >> 1

    a_seeds = [stream(j) for j in range(n_a_bits)]
    w_seeds = [[stream(n_a_bits + o * n_w_bits + i) for i in range(n_w_bits)] for o in range(n_ops)]
    return a_seeds, w_seeds
