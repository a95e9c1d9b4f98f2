"""One QuantNAS search step on the basic space (Shvetsov et al., arXiv:2208.14839) at x4, batch 8 of 96x96 HR
patches (24x24 LR): the architecture step (supernet forward + backward to the alphas + Adam) and the weight
step (forward + backward to weights, biases and LSQ steps + clipping + Adam), exactly what `qnas search`
runs per step (qnas.nas.search.search_step), bits {4, 8} tied.

- "naive" (baseline): every (candidate, bits) term on its own: qops.reference.mixed_quant_conv's loop with
  torch's learnable fake quantization for the single convolutions, composites term by term, and in noise
  mode torch.randn noise (what the QuantNAS code does);
- "fused": torch.ops.qops.mixed_quant_conv for the single convolutions (one merged convolution per layer),
  the composites stacked (two convolutions per activation bit-width), qops.fake_quant / qops.quant_noise.

Groups for both modes ("quant": LSQ fake quantization, "noise": quantization noise) and, as the noise vs
quant comparison, the two fused modes in one group. Every group runs with all of torch's threads and with
one (on the shared 2-core machine a parallel region waits a time slice whenever another process holds a
core; one thread is immune to that). Both impls start from the same weights and see the same batches.
Run: python -m pytest bench/bench_search_step.py --benchmark-only -q
"""

import pytest
import torch

from qnas.nas.graph import compile_space
from qnas.nas.regularizers import BitOpsPenalty
from qnas.nas.search import search_step
from qnas.nas.supernet import Supernet
from qnas.spaces import load_space

SCALE, BATCH, PATCH = 4, 8, 96
# A step takes 1-4 s: 7 timed rounds (+2 warm-up) per case keep the whole file near 5 minutes.
ROUNDS = 7


def _setup(mode: str, impl: str, device="cpu", batch=BATCH, patch=PATCH):
    torch.manual_seed(0)
    net = Supernet(compile_space(load_space("basic"), SCALE), mode=mode, impl=impl).to(
        device, memory_format=torch.channels_last
    )
    net.train()
    w_opt = torch.optim.Adam(net.weight_parameters(), lr=1e-3)
    a_opt = torch.optim.Adam(net.alpha_parameters(), lr=3e-4, betas=(0.5, 0.999))
    gen = torch.Generator().manual_seed(1)
    lr_size = patch // SCALE

    def make_batch():
        lr = torch.rand(batch, 3, lr_size, lr_size, generator=gen).to(device)
        hr = torch.rand(batch, 3, patch, patch, generator=gen).to(device)
        return lr.contiguous(memory_format=torch.channels_last), hr

    w_batch, a_batch = make_batch(), make_batch()
    with torch.no_grad():
        penalty = BitOpsPenalty(0.1, float(net.expected_bitops_per_pixel(net.probs())))

    def step():
        return search_step(
            net,
            w_opt,
            a_opt,
            w_batch,
            a_batch,
            update_alphas=True,
            entropy_weight=1e-3,
            penalty=penalty,
            grad_clip=5.0,
        )

    step()  # LSQ steps initialised from data, oneDNN primitives created
    return step


@pytest.mark.parametrize("impl", ["naive", "fused"])
@pytest.mark.parametrize("mode", ["quant", "noise"])
def test_search_step(bench, mode, impl, threads):
    bench(
        _setup(mode, impl),
        group=f"search step basic x4 b{BATCH} {PATCH}px, mode {mode}, {threads}",
        impl=impl,
        baseline=impl == "naive",
        rounds=ROUNDS,
    )


@pytest.mark.parametrize("mode", ["quant", "noise"])
def test_search_step_modes(bench, mode, threads):
    bench(
        _setup(mode, "fused"),
        group=f"search step basic x4 b{BATCH} {PATCH}px fused, noise vs quant, {threads}",
        impl=f"fused {mode}",
        baseline=mode == "quant",
        rounds=ROUNDS,
    )
