"""quant_noise on CPU: ours vs the plain torch composite (randn_like + amin/amax + arithmetic), on a
16x32x64x64 float32 activation, per tensor and per channel (axis 1), gaussian and uniform noise.

GB/s counts one read of x and one write of y (8 bytes per element) for every implementation, so the
column is proportional to speed; ours reads x twice (range pass, noise pass)."""

import pytest
import torch

import qops

SHAPE = (16, 32, 64, 64)
BITS = 4


def torch_quant_noise(x: torch.Tensor, bits: int, axis: int, dist: str) -> torch.Tensor:
    """The composite a user would write: range, delta, torch's own RNG."""
    if axis == -1:
        lo, hi = torch.aminmax(x)
    else:
        dims = [d for d in range(x.dim()) if d != axis]
        lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    eps = torch.randn_like(x) if dist == "gaussian" else torch.rand_like(x) * 2 - 1
    return x + (hi - lo) / (2**bits - 1) * 0.5 * eps


CASES = [(-1, "gaussian"), (1, "gaussian"), (-1, "uniform")]


@pytest.mark.parametrize("axis,dist", CASES, ids=["per_tensor", "per_channel", "per_tensor_uniform"])
@pytest.mark.parametrize("impl", ["torch composite", "qops"])
def test_quant_noise(bench, impl, axis, dist):
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    group = (
        f"quant_noise {'x'.join(map(str, SHAPE))} f32 {'per-tensor' if axis == -1 else 'per-channel'} {dist}"
    )
    nbytes = 2 * x.numel() * x.element_size()
    if impl == "qops":
        bench(lambda: qops.quant_noise(x, BITS, 1234, axis, dist), group=group, impl=f"qops ({qops.cpu_isa()})",
              bytes=nbytes)  # fmt: skip
    else:
        bench(
            lambda: torch_quant_noise(x, BITS, axis, dist),
            group=group,
            impl=impl,
            baseline=True,
            bytes=nbytes,
        )
