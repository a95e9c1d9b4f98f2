"""mixed_quant_conv, forward + backward of one supernet layer: the naive loop over the non-zero
(op, w_bits, a_bits) terms (qops.reference, what a plain PyTorch QuantNAS does; baseline) vs the fused op.

Layers (the search spaces' shapes):
  quantnas: c=36 -> 36, candidates 1x1, 3x3, 5x5, 3x3 with 3 groups, bits {4, 8} tied (8 terms),
            batch 16 of 48x48;
  rfdn:     c=48 -> 48, candidates 1x1, 3x3, 5x5, 3x3 with 3 groups, bits {4, 8} tied, batch 16 of 48x48.
"fused" picks the convolution engine by the op's rule (NNPACK's FFT for the dense 5x5 window, stride 1),
"fused-onednn" forces oneDNN for every convolution (QOPS_MQC_ENGINE). A last group times noise mode (quantization noise instead of
fake quantization), the naive loop calling torch.ops.qops.quant_noise per tensor. Each case runs on NCHW input (what a model hands over by default) and on channels-last input (what the
fused op returns, so a stack of fused layers stays channels-last). Peak memory of one forward + backward
(bytes allocated by torch above what existed before, from the profiler's allocation events) is in
extra_info.peak_mb and in the report's table.

    python -m pytest bench/bench_mixed_quant_conv.py --benchmark-only \
        --benchmark-json=build/b.json -q && python bench/report.py build/b.json
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import qops  # noqa: F401  (registers torch.ops.qops)
from qops.mixed_quant_conv import MixedQuantConvSpec
from qops.mixed_quant_conv import mixed_quant_conv as fused
from qops.reference import mixed_quant_conv as naive_loop

LAYERS = {
    "quantnas": dict(c=36, candidates=[(1, 1, 1), (3, 3, 1), (5, 5, 1), (3, 3, 3)]),
    "rfdn": dict(c=48, candidates=[(1, 1, 1), (3, 3, 1), (5, 5, 1), (3, 3, 3)]),
}
BITS = [4, 8]
BATCH, SIZE = 16, 48


def _layer(name: str, channels_last: bool, device="cpu", batch=BATCH, size=SIZE):
    torch.manual_seed(0)
    cfg = LAYERS[name]
    c = cfg["c"]
    ws = [
        (0.1 * torch.randn(c, c // g, kh, kw)).to(device).requires_grad_() for kh, kw, g in cfg["candidates"]
    ]
    groups = [g for _, _, g in cfg["candidates"]]
    n = len(ws)
    tie = torch.eye(len(BITS), dtype=torch.bool).expand(n, -1, -1)
    logits = torch.randn(n, len(BITS), len(BITS)).masked_fill(~tie, float("-inf"))
    probs = torch.softmax(logits.flatten(), 0).view(n, len(BITS), len(BITS)).to(device).requires_grad_()
    w_scales = torch.full((n, len(BITS)), 0.02, device=device).requires_grad_()
    a_scales = torch.tensor([0.1, 0.01], device=device).requires_grad_()
    bias = torch.zeros(c, device=device).requires_grad_()
    x = torch.randn(batch, c, size, size).abs().to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    spec = MixedQuantConvSpec(BITS, BITS, groups, [1] * n)
    args = (x, ws, probs, w_scales, a_scales, bias, spec)
    leaves = [x, *ws, probs, w_scales, a_scales, bias]
    terms = tie.tolist()
    macs = sum(batch * size * size * c * (c // g) * kh * kw for kh, kw, g in cfg["candidates"]) * len(BITS)
    return args, leaves, terms, macs


def _naive_noise_loop(x, weights, probs, w_scales, a_scales, bias, spec, terms, seed=0):
    """The per-term loop of noise mode with torch.ops.qops.quant_noise (one seed per noise tensor; the same
    statistics as the fused op's streams, other numbers), identity gradients."""
    w_bits, a_bits, groups, dilations, stride = (
        spec.w_bits,
        spec.a_bits,
        spec.groups,
        spec.dilations,
        spec.stride,
    )

    def noisy(t, bits, k):
        return t if bits == 0 else t + (torch.ops.qops.quant_noise(t.detach(), bits, seed + k) - t).detach()

    xq = [noisy(x, b, j) for j, b in enumerate(a_bits)]
    y = 0
    for o, w in enumerate(weights):
        pad = (dilations[o] * (w.shape[2] - 1) // 2, dilations[o] * (w.shape[3] - 1) // 2)
        for i, wb in enumerate(w_bits):
            wq = noisy(w, wb, 100 + o * len(w_bits) + i)
            for j in range(len(a_bits)):
                if terms[o][i][j]:
                    conv = torch.nn.functional.conv2d(xq[j], wq, None, stride, pad, dilations[o], groups[o])
                    y = y + probs[o, i, j] * conv
    return y + bias.reshape(1, -1, 1, 1)


def _step(impl, args, leaves, terms, mode="quant"):
    for t in leaves:
        t.grad = None
    if impl == "naive" and mode == "noise":
        y = _naive_noise_loop(*args, terms)
    elif impl == "naive":
        y = naive_loop(*args, terms=terms)
    else:
        y = fused(*args[:6], dataclasses.replace(args[6], mode=mode))
    y.backward(torch.ones_like(y))


def peak_bytes(fn) -> int:
    """Peak of the bytes torch allocates while fn runs (CPU), from the profiler's allocation events."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("impl", ["naive", "fused", "fused-onednn"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_mixed_quant_conv_fwd_bwd(bench, monkeypatch, layer, impl, layout):
    # fused: the engine rule (NNPACK for the 5x5 window); fused-onednn: oneDNN for every convolution.
    monkeypatch.setenv("QOPS_MQC_ENGINE", "onednn" if impl == "fused-onednn" else "auto")
    args, leaves, terms, macs = _layer(layer, layout == "channels_last")
    _step(impl, args, leaves, terms)  # warm up (oneDNN primitive caches)
    peak = peak_bytes(lambda: _step(impl, args, leaves, terms))
    bench(
        lambda: _step(impl, args, leaves, terms),
        group=f"mixed_quant_conv {layer} c={LAYERS[layer]['c']} fwd+bwd",
        impl=f"{impl} ({layout})",
        baseline=(impl == "naive" and layout == "nchw"),
        ops=6 * macs,  # the naive terms' multiply-adds, forward + two backward convolutions
        peak_mb=round(peak / 2**20, 1),
    )


@pytest.mark.parametrize("impl", ["naive", "fused"])
def test_mixed_quant_conv_noise_fwd_bwd(bench, impl):
    """Noise mode (QuantNAS' search mode), the QuantNAS layer, NCHW input."""
    args, leaves, terms, macs = _layer("quantnas", False)
    _step(impl, args, leaves, terms, "noise")
    peak = peak_bytes(lambda: _step(impl, args, leaves, terms, "noise"))
    bench(
        lambda: _step(impl, args, leaves, terms, "noise"),
        group="mixed_quant_conv quantnas c=36 noise mode fwd+bwd",
        impl=f"{impl} (nchw)",
        baseline=impl == "naive",
        ops=6 * macs,
        peak_mb=round(peak / 2**20, 1),
    )
