"""Low-bit inference convolution: 64->64 3x3, padding 1, on 1x64x160x160 and 1x64x256x256.

Per size one group times, on the same input: torch's int8 quantized conv (x86 engine, quint8 input
quantized per tensor beforehand and channels_last, prepacked qint8 weights: only the conv is timed; the
baseline), torch's fp32 conv (channels_last, its fastest layout here), and ours at w8a8, w4a4, w2a2, w1a1:
packed_conv2d on uint8 codes (int32 out) and quantized_conv2d (float in, float out). GOP/s count 2 ops per
MAC; the impl names carry the weight bytes. A third group compares our CPU paths (QOPS_PACKED_PATH).

    python -m pytest bench/bench_packed_conv.py --benchmark-only \
        --benchmark-json=build/b.json -q && python bench/report.py build/b.json
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from qops.packed import pack_weight, packed_conv2d, quantized_conv2d

SIZES = [160, 256]
BITS = [(8, 8), (4, 4), (2, 2), (1, 1)]
CIN = COUT = 64


def _ops(h: int) -> int:
    return 2 * COUT * CIN * 9 * h * h


def _codes(bits: int, gen: torch.Generator) -> torch.Tensor:
    if bits == 1:
        return (torch.randint(0, 2, (COUT, CIN, 3, 3), generator=gen) * 2 - 1).to(torch.int8)
    return torch.randint(
        -(2 ** (bits - 1)), 2 ** (bits - 1), (COUT, CIN, 3, 3), generator=gen, dtype=torch.int8
    )


def _x(h: int) -> torch.Tensor:
    return torch.rand(1, CIN, h, h, generator=torch.Generator().manual_seed(h)) * 2


@pytest.mark.parametrize("h", SIZES)
def test_torch_int8(bench, h):
    x = _x(h)
    w = torch.randn(COUT, CIN, 3, 3, generator=torch.Generator().manual_seed(1)) * 0.1
    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # quantize_per_tensor is deprecated in torch 2.13 but still the int8 path
        qx = torch.quantize_per_tensor(
            x.contiguous(memory_format=torch.channels_last), 2 / 255, 0, torch.quint8
        )
        qw = torch.quantize_per_tensor(w, float(w.abs().max()) / 127, 0, torch.qint8)
        packed = torch.ops.quantized.conv2d_prepack(qw, None, [1, 1], [1, 1], [1, 1], 1)
    bench(
        lambda: torch.ops.quantized.conv2d(qx, packed, 0.1, 0),
        group=f"conv3x3 64->64 1x64x{h}x{h}",
        impl=f"torch int8 quantized conv, x86 engine ({COUT * CIN * 9} B weights)",
        baseline=True,
        ops=_ops(h),
    )


@pytest.mark.parametrize("h", SIZES)
def test_torch_fp32(bench, h):
    x = _x(h).contiguous(memory_format=torch.channels_last)
    w = torch.randn(COUT, CIN, 3, 3).contiguous(memory_format=torch.channels_last)
    bench(
        lambda: torch.nn.functional.conv2d(x, w, padding=1),
        group=f"conv3x3 64->64 1x64x{h}x{h}",
        impl=f"torch fp32 conv, channels_last ({COUT * CIN * 9 * 4} B weights)",
        ops=_ops(h),
    )


@pytest.mark.parametrize("h", SIZES)
@pytest.mark.parametrize("w_bits,a_bits", BITS)
def test_ours_packed_conv2d(bench, h, w_bits, a_bits):
    gen = torch.Generator().manual_seed(w_bits)
    w_packed = pack_weight(_codes(w_bits, gen), w_bits)
    x = torch.randint(0, 2**a_bits, (1, CIN, h, h), generator=gen, dtype=torch.int16).to(torch.uint8)
    bench(
        lambda: packed_conv2d(x, w_packed, (COUT, CIN, 3, 3), w_bits, a_bits, False, 1, 1),
        group=f"conv3x3 64->64 1x64x{h}x{h}",
        impl=f"ours packed_conv2d w{w_bits}a{a_bits}, codes -> int32 ({w_packed.numel()} B weights)",
        ops=_ops(h),
    )


@pytest.mark.parametrize("h", SIZES)
@pytest.mark.parametrize("w_bits,a_bits", BITS)
def test_ours_quantized_conv2d(bench, h, w_bits, a_bits):
    gen = torch.Generator().manual_seed(w_bits)
    w_packed = pack_weight(_codes(w_bits, gen), w_bits)
    x = _x(h)
    w_scale = torch.full((COUT,), 0.01)
    bias = torch.zeros(COUT)
    a_scale = 2 / (2**a_bits - 1)
    bench(
        lambda: quantized_conv2d(
            x, w_packed, (COUT, CIN, 3, 3), w_scale, a_scale, w_bits, a_bits, False, bias, 1, 1
        ),
        group=f"conv3x3 64->64 1x64x{h}x{h}",
        impl=f"ours quantized_conv2d w{w_bits}a{a_bits}, float -> float ({w_packed.numel()} B weights)",
        ops=_ops(h),
    )


@pytest.mark.parametrize("path", ["scalar", "dot", "lut", "bitserial"])
@pytest.mark.parametrize("w_bits,a_bits", BITS)
def test_ours_paths(bench, path, w_bits, a_bits):
    h = 160
    if path == "lut" and a_bits > 2:
        pytest.skip("the lut path needs a_bits <= 2")
    if path == "scalar" and (w_bits, a_bits) != (4, 4):
        pytest.skip("one scalar figure is enough")
    gen = torch.Generator().manual_seed(w_bits)
    w_packed = pack_weight(_codes(w_bits, gen), w_bits)
    x = torch.randint(0, 2**a_bits, (1, CIN, h, h), generator=gen, dtype=torch.int16).to(torch.uint8)

    def run():
        os.environ["QOPS_PACKED_PATH"] = path
        try:
            return packed_conv2d(x, w_packed, (COUT, CIN, 3, 3), w_bits, a_bits, False, 1, 1)
        finally:
            del os.environ["QOPS_PACKED_PATH"]

    bench(run, group=f"packed_conv2d CPU paths 1x64x{h}x{h}", impl=f"{path} w{w_bits}a{a_bits}", ops=_ops(h))
