"""fake_quant (LSQ) forward + backward on a 16x32x64x64 float32 activation, per tensor and per channel
(axis=1), all implementations on the same inputs:

- "torch builtin" (baseline): torch._fake_quantize_learnable_per_{tensor,channel}_affine through autograd;
- "composite LSQ": plain torch ops with the straight-through detach trick, as LSQ is written by hand
  (Esser et al., ICLR 2020: gradient scaling of s and z, round with a straight-through estimator);
- "qops": torch.ops.qops.fake_quant through autograd (its fused backward op).

bytes = the minimal traffic: forward reads x and writes y, backward reads x and grad and writes grad_x.
Every group runs with all of torch's threads and with one thread: on the shared 2-core machine other
processes often hold both cores, and then every parallel region (of any implementation) waits a scheduler
time slice for its second thread; the one-thread groups are immune to that.
Run: python -m pytest bench/bench_fake_quant.py --benchmark-only -q
"""

import pytest
import torch

import qops

SHAPE = (16, 32, 64, 64)
QMIN, QMAX = -128, 127
GRAD_FACTOR = 0.01


def _inputs(per_channel: bool, shape=SHAPE, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 2
    grad = torch.randn(shape, generator=gen)
    channels = shape[1] if per_channel else 1
    scale = torch.rand(channels, generator=gen) * 0.02 + 0.01
    zero_point = torch.randint(-3, 4, (channels,), generator=gen).float()
    return tuple(t.to(device) for t in (x, grad, scale, zero_point))


def _builtin(x, s, z, axis):
    if axis == -1:
        return torch._fake_quantize_learnable_per_tensor_affine(x, s, z, QMIN, QMAX, GRAD_FACTOR)
    return torch._fake_quantize_learnable_per_channel_affine(x, s, z, axis, QMIN, QMAX, GRAD_FACTOR)


def _composite(x, s, z, axis):
    """LSQ in plain torch ops with straight-through estimators (detach trick)."""
    if axis != -1:
        view = [1] * x.dim()
        view[axis] = -1
        s, z = s.reshape(view), z.reshape(view)
    s = (s - s * GRAD_FACTOR).detach() + s * GRAD_FACTOR
    z = (z - z * GRAD_FACTOR).detach() + z * GRAD_FACTOR
    z = (z.round() - z).detach() + z
    xs = x / s
    q = torch.clamp((xs.round() - xs).detach() + xs + z, QMIN, QMAX)
    return (q - z) * s


def _qops(x, s, z, axis):
    return qops.fake_quant(x, s, z, axis, QMIN, QMAX, GRAD_FACTOR)


IMPLS = {"torch builtin": _builtin, "composite LSQ": _composite, "qops": _qops}
GRANULARITIES = {"per-tensor": -1, "per-channel axis=1": 1}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("granularity", list(GRANULARITIES))
def test_fake_quant_forward_backward(bench, impl, granularity, threads):
    axis = GRANULARITIES[granularity]
    x, grad, s, z = _inputs(axis != -1)
    x.requires_grad_()
    s.requires_grad_()
    z.requires_grad_()
    fn = IMPLS[impl]

    def step():
        y = fn(x, s, z, axis)
        return torch.autograd.grad(y, (x, s, z), grad)

    step()
    bench(
        step,
        group=f"fake_quant fwd+bwd {granularity} 16x32x64x64 f32, {threads}",
        impl=impl,
        baseline=impl == "torch builtin",
        bytes=5 * x.numel() * x.element_size(),
    )


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("granularity", list(GRANULARITIES))
def test_fake_quant_forward(bench, impl, granularity, threads):
    axis = GRANULARITIES[granularity]
    x, _, s, z = _inputs(axis != -1)
    fn = IMPLS[impl]

    def step():
        with torch.no_grad():
            return fn(x, s, z, axis)

    step()
    bench(
        step,
        group=f"fake_quant fwd {granularity} 16x32x64x64 f32, {threads}",
        impl=impl,
        baseline=impl == "torch builtin",
        bytes=2 * x.numel() * x.element_size(),
    )
