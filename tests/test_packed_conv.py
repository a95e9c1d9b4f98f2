"""pack_weight / packed_conv2d / quantized_conv2d against qops.reference (exact integers), every CPU path
forced with QOPS_PACKED_PATH, every (w_bits, a_bits) pair, signed and unsigned activations, errors,
opcheck, and PackedConv2d against the fake-quantized convolution it replaces."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis_examples import examples

import qops
from qops import reference as R
from qops.nn import PackedConv2d
from qops.packed import pack_weight, packed_conv2d, quantized_conv2d, unpack_weight, weight_code_range

VECTOR = qops._C.max_cpu_isa() != "DEFAULT"
PATHS = ["scalar"] + (["dot", "lut", "bitserial"] if VECTOR else [])
BIT_PAIRS = list(itertools.product(range(1, 9), range(1, 9)))


def lut_supports(w_bits: int, a_bits: int, a_signed: bool) -> bool:
    """Mirror of csrc/cpu/packed_conv2d.h: a_bits <= 2 and one table step spans at most a byte."""
    wabs = 1 if w_bits == 1 else 2 ** (w_bits - 1)
    return a_bits <= 2 and (4 // a_bits) * wabs * (2**a_bits - 1) <= 255


def runs_on(path: str, w_bits: int, a_bits: int, a_signed: bool) -> bool:
    return path != "lut" or lut_supports(w_bits, a_bits, a_signed)


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Each CPU path of packed_conv2d, forced for the test."""
    monkeypatch.setenv("QOPS_PACKED_PATH", request.param)
    return request.param


def act_codes(gen, shape, bits, signed):
    lo, hi = qops.quant_range(bits, signed)
    x = torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int16)
    return x.to(torch.int8 if signed else torch.uint8)


def weight_codes(gen, shape, bits):
    if bits == 1:
        return (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(torch.int8)
    lo, hi = weight_code_range(bits)
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int16).to(torch.int8)


def check_exact(x, w, w_bits, a_bits, a_signed, stride, padding):
    packed = pack_weight(w, w_bits)
    got = packed_conv2d(x, packed, w.shape, w_bits, a_bits, a_signed, stride, padding)
    want = R.packed_conv2d(x, packed, list(w.shape), w_bits, a_bits, a_signed, [stride] * 2, [padding] * 2)
    assert got.dtype == torch.int32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# (N, Cin, Cout, H, W, k, stride, padding): odd channels, rows wider than one vector (32/64 bytes) with a
# tail, outputs narrower than a segment, 1x1 and 3x3 and non-square kernels, Cin over 64 (two bit-serial
# words), strides 1/2 and paddings 0/1/2.
GEOMETRIES = [
    (2, 5, 7, 9, 11, 3, 1, 1),
    (1, 3, 4, 8, 37, 3, 2, 2),
    (1, 64, 5, 6, 40, 1, 1, 0),
    (1, 70, 3, 5, 9, 3, 1, 0),
    (1, 7, 13, 12, 70, 3, 1, 2),
    (2, 9, 6, 7, 33, 3, 2, 1),
]


@pytest.mark.parametrize("w_bits,a_bits", BIT_PAIRS)
@pytest.mark.parametrize("a_signed", [False, True])
def test_every_bit_pair_exact(path, w_bits, a_bits, a_signed):
    if not runs_on(path, w_bits, a_bits, a_signed):
        pytest.skip("the lut path needs a_bits <= 2 and byte-sized tables")
    gen = torch.Generator().manual_seed(1000 * w_bits + 10 * a_bits + a_signed)
    for i in range(2):  # two geometries per pair, rotating so that all of them meet every path
        n, cin, cout, h, w, k, s, p = GEOMETRIES[(w_bits + a_bits + 3 * a_signed + i) % len(GEOMETRIES)]
        x = act_codes(gen, (n, cin, h, w), a_bits, a_signed)
        wc = weight_codes(gen, (cout, cin, k, k), w_bits)
        check_exact(x, wc, w_bits, a_bits, a_signed, s, p)


@pytest.mark.parametrize("w_bits,a_bits", BIT_PAIRS)
@pytest.mark.parametrize("a_signed", [False, True])
def test_extreme_codes_exact(path, w_bits, a_bits, a_signed):
    """All activations and weights at the ends of their ranges: the largest partial sums, where an int16 or
    byte accumulation that is one step too long would overflow (K = 64 * 9 covers several chunks)."""
    if not runs_on(path, w_bits, a_bits, a_signed):
        pytest.skip("the lut path needs a_bits <= 2 and byte-sized tables")
    xlo, xhi = qops.quant_range(a_bits, a_signed)
    wlo, whi = weight_code_range(w_bits)
    dtype = torch.int8 if a_signed else torch.uint8
    for xv, wv in [(xhi, wlo), (xhi, whi), (xlo, wlo)]:
        x = torch.full((1, 64, 6, 40), xv, dtype=torch.int16).to(dtype)
        w = torch.full((7, 64, 3, 3), wv, dtype=torch.int8)
        check_exact(x, w, w_bits, a_bits, a_signed, 1, 1)


@pytest.mark.parametrize("n,cin,cout,h,w,k,s,p", GEOMETRIES)
def test_geometries_exact(path, n, cin, cout, h, w, k, s, p):
    gen = torch.Generator().manual_seed(cin * 100 + w)
    for w_bits, a_bits, signed in [(4, 4, False), (2, 2, False), (1, 1, True), (8, 8, False), (2, 1, False)]:
        if not runs_on(path, w_bits, a_bits, signed):
            continue
        x = act_codes(gen, (n, cin, h, w), a_bits, signed)
        check_exact(x, weight_codes(gen, (cout, cin, k, k), w_bits), w_bits, a_bits, signed, s, p)


def test_long_reduction_exact(path):
    """Cin large enough for the lut path to flush its int16 sums (> 128 byte chunks) and the dot path to widen
    many times; non-square kernel and mixed stride/padding through the op directly."""
    gen = torch.Generator().manual_seed(7)
    x = act_codes(gen, (1, 410, 4, 35), 2, False)
    w = weight_codes(gen, (7, 410, 3, 3), 2)
    check_exact(x, w, 2, 2, False, 1, 1)
    a_bits = 2 if path == "lut" else 3
    x = act_codes(gen, (1, 11, 9, 19), a_bits, True)
    w = weight_codes(gen, (5, 11, 3, 5), 2)
    packed = pack_weight(w, 2)
    got = packed_conv2d(x, packed, w.shape, 2, a_bits, True, (2, 1), (0, 2))
    want = R.packed_conv2d(x, packed, list(w.shape), 2, a_bits, True, [2, 1], [0, 2])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@settings(max_examples=examples(25), deadline=None)
# A tap entirely left of a 1-pixel row with stride 2 (found by hypothesis: the scalar path read past the row).
@example(1, 1, 1, 1, 1, 1, 3, 1, 2, 0, 1, 1, 1, False, "scalar", 0)
@given(
    n=st.integers(1, 2),
    cin=st.integers(1, 20),
    cout=st.integers(1, 9),
    h=st.integers(1, 12),
    w=st.integers(1, 45),
    kh=st.sampled_from([1, 3, 5]),
    kw=st.sampled_from([1, 2, 3]),
    sh=st.integers(1, 3),
    sw=st.integers(1, 3),
    ph=st.integers(0, 2),
    pw=st.integers(0, 2),
    w_bits=st.integers(1, 8),
    a_bits=st.integers(1, 8),
    a_signed=st.booleans(),
    path=st.sampled_from(PATHS),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_shapes_exact(n, cin, cout, h, w, kh, kw, sh, sw, ph, pw, w_bits, a_bits, a_signed, path, seed):
    if h + 2 * ph < kh or w + 2 * pw < kw:
        return
    if not runs_on(path, w_bits, a_bits, a_signed):
        path = "auto"
    gen = torch.Generator().manual_seed(seed)
    x = act_codes(gen, (n, cin, h, w), a_bits, a_signed)
    wc = weight_codes(gen, (cout, cin, kh, kw), w_bits)
    packed = pack_weight(wc, w_bits)
    if ph >= kh or pw >= kw:
        with pytest.raises(RuntimeError, match="padding: expected values below the kernel size"):
            packed_conv2d(x, packed, wc.shape, w_bits, a_bits, a_signed, (sh, sw), (ph, pw))
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QOPS_PACKED_PATH", path)
        got = packed_conv2d(x, packed, wc.shape, w_bits, a_bits, a_signed, (sh, sw), (ph, pw))
    want = R.packed_conv2d(x, packed, list(wc.shape), w_bits, a_bits, a_signed, [sh, sw], [ph, pw])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_default_isa_runs_scalar_and_matches():
    gen = torch.Generator().manual_seed(3)
    x = act_codes(gen, (1, 6, 7, 35), 3, False)
    w = weight_codes(gen, (4, 6, 3, 3), 2)
    best = qops._C.max_cpu_isa()
    try:
        qops.set_cpu_isa("DEFAULT")
        check_exact(x, w, 2, 3, False, 1, 1)
    finally:
        qops.set_cpu_isa(best)


# ---------------------------------------------------------------------------------------------------------
# pack_weight


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(3, 5, 3, 3), (64, 64, 3, 3), (2, 1, 1, 1), (4, 7, 1, 5)])
def test_pack_weight_layout_and_round_trip(bits, shape):
    gen = torch.Generator().manual_seed(bits)
    w = weight_codes(gen, shape, bits)
    packed = pack_weight(w, bits)
    k = shape[1] * shape[2] * shape[3]
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == shape[0] * bits * ((k + 31) // 32) * 4
    torch.testing.assert_close(packed, R.pack_weight(w, bits), rtol=0, atol=0)
    torch.testing.assert_close(unpack_weight(packed, list(shape), bits), w, rtol=0, atol=0)
    if k % 32 == 0:  # no padding: exactly bits/8 bytes per weight
        assert packed.numel() * 8 == w.numel() * bits


def test_pack_weight_bit_order():
    """Plane j, word q, bit r holds bit j of code 32q + r (two's complement): the documented layout."""
    w = torch.zeros(1, 40, 1, 1, dtype=torch.int8)
    w[0, 33, 0, 0] = -2  # pattern 0b10 at 2 bits
    packed = pack_weight(w, 2)
    words = packed.view(torch.int32).tolist()  # [plane0 word0, plane0 word1, plane1 word0, plane1 word1]
    assert words == [0, 0, 0, 1 << 1]


# ---------------------------------------------------------------------------------------------------------
# quantized_conv2d


@pytest.mark.parametrize(
    "w_bits,a_bits,a_signed", [(8, 8, False), (4, 4, False), (2, 2, True), (1, 1, False), (3, 5, True)]
)
@pytest.mark.parametrize("per_channel,with_bias", [(True, True), (False, False)])
def test_quantized_conv2d_matches_reference(path, w_bits, a_bits, a_signed, per_channel, with_bias):
    if not runs_on(path, w_bits, a_bits, a_signed):
        pytest.skip("the lut path needs a_bits <= 2 and byte-sized tables")
    gen = torch.Generator().manual_seed(w_bits * 10 + a_bits)
    x = torch.randn(2, 6, 9, 37, generator=gen) * 2
    x[0, 0, 0, :4] = torch.tensor([float("inf"), -float("inf"), 1e30, -1e30])  # clamped like fake_quant
    w = weight_codes(gen, (5, 6, 3, 3), w_bits)
    w_scale = torch.rand(5 if per_channel else 1, generator=gen) * 0.1 + 0.01
    bias = torch.randn(5, generator=gen) if with_bias else None
    a_scale = 0.173
    packed = pack_weight(w, w_bits)
    got = quantized_conv2d(x, packed, w.shape, w_scale, a_scale, w_bits, a_bits, a_signed, bias, 1, 1)
    want = R.quantized_conv2d(
        x, packed, list(w.shape), w_scale, a_scale, w_bits, a_bits, a_signed, bias, [1, 1], [1, 1]
    )
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)


def test_quantized_conv2d_codes_match_packed_conv2d():
    """quantized_conv2d = dequantized packed_conv2d on the codes fake_quant would produce."""
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(1, 8, 10, 50, generator=gen) * 3
    w = weight_codes(gen, (6, 8, 3, 3), 4)
    packed = pack_weight(w, 4)
    a_scale = 0.1
    codes = R.quantize_activation(x, a_scale, 4, False).to(torch.uint8)
    acc = packed_conv2d(codes, packed, w.shape, 4, 4, False, 1, 1)
    ones = torch.ones(6)
    y = quantized_conv2d(x, packed, w.shape, ones, a_scale, 4, 4, False, None, 1, 1)
    s = torch.tensor(a_scale, dtype=torch.float32)
    torch.testing.assert_close(y, acc.to(torch.float32) * s, rtol=0, atol=0)


def test_quantized_conv2d_has_no_gradient():
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    packed = pack_weight(torch.ones(3, 2, 3, 3, dtype=torch.int8), 2)
    y = quantized_conv2d(x, packed, (3, 2, 3, 3), torch.ones(3), 0.1, 2, 2, False, None, 1, 1)
    with pytest.raises(RuntimeError, match="inference-only"):
        y.sum().backward()


# ---------------------------------------------------------------------------------------------------------
# PackedConv2d against the fake-quantized convolution


def fake_quant_conv(x, weight, w_scale, a_scale, w_bits, a_bits, a_signed, bias, stride, padding, dtype):
    """conv2d(FQa(x), FQw(w)) + bias with torch's fake quantization (zero point 0), in `dtype`."""
    wlo, whi = weight_code_range(w_bits)
    alo, ahi = qops.quant_range(a_bits, a_signed)
    zp = torch.zeros(weight.shape[0], dtype=torch.int32)
    wq = torch.fake_quantize_per_channel_affine(weight, w_scale, zp, 0, wlo, whi)
    xq = torch.fake_quantize_per_tensor_affine(x, a_scale, 0, alo, ahi)
    b = None if bias is None else bias.to(dtype)
    return torch.nn.functional.conv2d(xq.to(dtype), wq.to(dtype), b, stride=stride, padding=padding)


@pytest.mark.parametrize(
    "w_bits,a_bits,a_signed", [(8, 8, False), (4, 4, False), (2, 2, False), (3, 4, True), (2, 8, True)]
)
def test_packed_conv2d_module_equals_fake_quant_conv(w_bits, a_bits, a_signed):
    gen = torch.Generator().manual_seed(11)
    conv = torch.nn.Conv2d(16, 12, 3, stride=1, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.2)
        conv.bias.copy_(torch.randn(12, generator=gen) * 0.1)
    w_scale = conv.weight.detach().abs().amax(dim=(1, 2, 3)) / max(2 ** (w_bits - 1) - 1, 1)
    a_scale = 0.05
    x = torch.randn(2, 16, 13, 21, generator=gen)
    if not a_signed:
        x = x.abs()
    m = PackedConv2d.from_conv(conv, w_scale, a_scale, w_bits, a_bits, a_signed)
    got = m(x)
    args = (x, conv.weight.detach(), w_scale, a_scale, w_bits, a_bits, a_signed, conv.bias.detach(), 1, 1)
    ref64 = fake_quant_conv(*args, torch.float64)
    ref32 = fake_quant_conv(*args, torch.float32)
    err32 = (ref32.double() - ref64).abs().max().item()
    err = (got.double() - ref64).abs().max().item()
    # flash-attention rule, with one float32 ulp of the output's magnitude as the floor
    assert err <= 2 * err32 + 2 * torch.finfo(torch.float32).eps * ref64.abs().max().item(), (err, err32)


def test_packed_conv2d_module_binary_weights_and_repr():
    w = torch.tensor([[[[0.3, -0.2], [0.0, -1.0]]]])
    m = PackedConv2d.from_float(w, torch.tensor([0.5]), 1.0, 1, 2, bias=None, stride=1, padding=0)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 0.0]]]])
    # sign codes (+1, -1, +1, -1) * 0.5 against activations (1, 2, 3, 0): 0.5 * (1 - 2 + 3 - 0) = 1
    torch.testing.assert_close(m(x), torch.tensor([[[[1.0]]]]))
    assert "w_bits=1" in repr(m) and m.w_packed.numel() == 4


# ---------------------------------------------------------------------------------------------------------
# errors


def _ok_args():
    x = torch.zeros(1, 3, 5, 5, dtype=torch.uint8)
    w = torch.zeros(2, 3, 3, 3, dtype=torch.int8)
    return x, pack_weight(w, 4), [2, 3, 3, 3]


def test_errors_pack_weight():
    with pytest.raises(RuntimeError, match=r"w_codes: codes must be in \[-8, 7\]"):
        pack_weight(torch.full((1, 1, 1, 1), 8, dtype=torch.int8), 4)
    with pytest.raises(RuntimeError, match="w_codes: .*nonzero"):
        pack_weight(torch.zeros(1, 1, 1, 1, dtype=torch.int8), 1)
    with pytest.raises(RuntimeError, match="w_codes: expected dtype Char"):
        pack_weight(torch.zeros(1, 1, 1, 1), 4)
    with pytest.raises(RuntimeError, match="w_codes: expected 4 dimensions"):
        pack_weight(torch.zeros(3, 3, dtype=torch.int8), 4)
    for bits in (0, 9):
        with pytest.raises(RuntimeError, match="bits: expected a bit-width in 1..8"):
            pack_weight(torch.zeros(1, 1, 1, 1, dtype=torch.int8), bits)


def test_errors_packed_conv2d():
    x, packed, shape = _ok_args()
    op = torch.ops.qops.packed_conv2d
    with pytest.raises(RuntimeError, match=r"x_codes: codes must be in \[0, 15\]"):
        op(torch.full((1, 3, 5, 5), 16, dtype=torch.uint8), packed, shape, 4, 4, False, [1, 1], [0, 0])
    with pytest.raises(RuntimeError, match=r"x_codes: codes must be in \[-2, 1\]"):
        op(
            torch.full((1, 3, 5, 5), 2, dtype=torch.int8),
            pack_weight(torch.zeros(2, 3, 3, 3, dtype=torch.int8), 4),
            shape,
            4,
            2,
            True,
            [1, 1],
            [0, 0],
        )
    with pytest.raises(RuntimeError, match="x_codes: expected dtype Byte"):
        op(x.to(torch.int8), packed, shape, 4, 4, False, [1, 1], [0, 0])
    with pytest.raises(RuntimeError, match="x_codes: expected dtype Char"):
        op(x, packed, shape, 4, 4, True, [1, 1], [0, 0])
    with pytest.raises(RuntimeError, match="w_packed: expected dtype Byte"):
        op(x, packed.to(torch.int8), shape, 4, 4, False, [1, 1], [0, 0])
    with pytest.raises(RuntimeError, match="w_shape: .* needs a packed buffer of"):
        op(x, packed, shape, 3, 4, False, [1, 1], [0, 0])
    with pytest.raises(RuntimeError, match="w_shape: .* needs a packed buffer of"):
        op(x, packed, [4, 3, 3, 3], 4, 4, False, [1, 1], [0, 0])
    with pytest.raises(RuntimeError, match="w_shape: Cin = 2 does not match the 3 channels"):
        op(x, packed, [3, 2, 3, 3], 4, 4, False, [1, 1], [0, 0])
    with pytest.raises(RuntimeError, match=r"w_shape: expected \[Cout, Cin, kh, kw\]"):
        op(x, packed, [2, 3, 9], 4, 4, False, [1, 1], [0, 0])
    for wb, ab, name in [(0, 4, "w_bits"), (9, 4, "w_bits"), (4, 0, "a_bits"), (4, 9, "a_bits")]:
        with pytest.raises(RuntimeError, match=f"{name}: expected a bit-width in 1..8"):
            op(x, packed, shape, wb, ab, False, [1, 1], [0, 0])
    with pytest.raises(RuntimeError, match="padding: expected values >= 0"):
        op(x, packed, shape, 4, 4, False, [1, 1], [-1, 0])
    with pytest.raises(RuntimeError, match="stride: expected values >= 1"):
        op(x, packed, shape, 4, 4, False, [0, 1], [0, 0])
    with pytest.raises(RuntimeError, match="x_codes: padded input 2x2 is smaller than the kernel"):
        op(x[:, :, :2, :2], packed, shape, 4, 4, False, [1, 1], [0, 0])


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize("stride", [(1, 2**60), (2**62, 1), (2**63 - 1, 2**63 - 1), (1, 30_000_000), (12, 1)])
def test_stride_beyond_the_padded_input_is_clamped(path_name, stride, monkeypatch):
    """Beyond the padded input a stride (2^60 from a crafted .qnp file, or 3e7) leaves one output row or column:
    the result is the convolution at stride = padded size, computed in input-sized buffers (unclamped, the
    activation layout's SW * plane overflows and 3e7 asks for gigabytes)."""
    monkeypatch.setenv("QOPS_PACKED_PATH", path_name)
    gen = torch.Generator().manual_seed(1)
    x = act_codes(gen, (1, 5, 9, 11), 2, False)
    wc = weight_codes(gen, (3, 5, 3, 3), 2)
    packed = pack_weight(wc, 2)
    got = packed_conv2d(x, packed, wc.shape, 2, 2, False, stride, (1, 1))
    clamped = [min(stride[0], 9 + 2), min(stride[1], 11 + 2)]
    want = R.packed_conv2d(x, packed, list(wc.shape), 2, 2, False, clamped, [1, 1])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    xf = torch.rand(1, 5, 9, 11, generator=gen)
    got = quantized_conv2d(
        xf, packed, wc.shape, torch.full((3,), 0.1), 0.07, 2, 2, False, None, stride, (1, 1)
    )
    want = R.quantized_conv2d(
        xf, packed, list(wc.shape), torch.full((3,), 0.1), 0.07, 2, 2, False, None, clamped, [1, 1]
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_sizes_that_would_overflow_are_refused():
    x, packed, shape = _ok_args()
    op = torch.ops.qops.packed_conv2d
    for w_shape in ([2, 3, 2**40, 2**40], [2, 3, 2**62, 3], [2**62, 3, 3, 3], [2**61, 3, 1, 1]):
        with pytest.raises(RuntimeError, match="w_shape: "):
            op(x, packed, w_shape, 4, 4, False, [1, 1], [0, 0])
    for padding in ([3, 0], [0, 2**62], [2**63 - 1, 2**63 - 1]):
        with pytest.raises(RuntimeError, match="padding: expected values below the kernel size"):
            op(x, packed, shape, 4, 4, False, [1, 1], padding)


@pytest.mark.parametrize(
    "a_scale", [1e39, 1e-46, 1e-40, float("inf"), float("nan"), 0.0, -0.5, -float("inf")]
)
def test_a_scale_must_be_a_usable_float32_step(a_scale):
    """1e39 is finite as a double but infinite in float32, where it would make every output NaN."""
    x, packed, shape = _ok_args()
    with pytest.raises(RuntimeError, match="a_scale: "):
        torch.ops.qops.quantized_conv2d(
            x.float(), packed, shape, torch.ones(2), a_scale, 4, 4, False, None, [1, 1], [0, 0]
        )
    meta = (x.float().to("meta"), packed.to("meta"), shape, torch.ones(2, device="meta"), a_scale)
    with pytest.raises(RuntimeError, match="a_scale: "):
        torch.ops.qops.quantized_conv2d(*meta, 4, 4, False, None, [1, 1], [0, 0])


def _mixed_device_cases():
    x, packed, shape = _ok_args()
    xf, ws, b = x.float(), torch.ones(2), torch.zeros(2)
    pc, qc = torch.ops.qops.packed_conv2d, torch.ops.qops.quantized_conv2d
    m = {"x": lambda t: t.to("meta")}
    return [
        ("w_packed", lambda: pc(x, packed.to("meta"), shape, 4, 4, False, [1, 1], [0, 0])),
        ("w_packed", lambda: pc(m["x"](x), packed, shape, 4, 4, False, [1, 1], [0, 0])),
        ("w_packed", lambda: qc(xf, packed.to("meta"), shape, ws, 0.1, 4, 4, False, b, [1, 1], [0, 0])),
        ("w_scale", lambda: qc(xf, packed, shape, ws.to("meta"), 0.1, 4, 4, False, b, [1, 1], [0, 0])),
        ("bias", lambda: qc(xf, packed, shape, ws, 0.1, 4, 4, False, b.to("meta"), [1, 1], [0, 0])),
    ]


@pytest.mark.parametrize("case", range(len(_mixed_device_cases())))
def test_meta_mixed_with_cpu_tensors_is_refused(case):
    """A meta tensor among CPU tensors dispatches to the fake kernel: it must refuse, not return uninitialised memory."""
    name, call = _mixed_device_cases()[case]
    with pytest.raises(RuntimeError, match=f"{name}: expected a tensor on"):
        call()


def test_fake_kernels_check_like_the_kernels():
    """On meta tensors (and under torch.compile) the fake kernels raise the kernels' errors and shapes."""
    x, packed, shape = _ok_args()
    xm, pm = x.to("meta"), packed.to("meta")
    op = torch.ops.qops.packed_conv2d
    assert op(xm, pm, shape, 4, 4, False, [2, 2**60], [1, 1]).shape == (1, 2, 3, 1)
    for args, match in [
        ((xm.float(), pm, shape, 4, 4, False, [1, 1], [0, 0]), "x_codes: expected dtype"),
        ((xm, pm, shape, 3, 4, False, [1, 1], [0, 0]), "w_shape: .* needs a packed buffer"),
        ((xm, pm, [2, 4, 3, 3], 4, 4, False, [1, 1], [0, 0]), "w_shape: Cin = 4"),
        ((xm, pm, shape, 4, 9, False, [1, 1], [0, 0]), "a_bits: expected a bit-width"),
        ((xm, pm, shape, 4, 4, False, [0, 1], [0, 0]), "stride: expected values >= 1"),
        ((xm, pm, shape, 4, 4, False, [1, 1], [3, 0]), "padding: expected values below"),
        ((xm[:, :, :2], pm, shape, 4, 4, False, [1, 1], [0, 0]), "x_codes: padded input"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            op(*args)
    with pytest.raises(RuntimeError, match="w_codes: expected dtype"):
        pack_weight(torch.zeros(1, 1, 1, 1, device="meta"), 4)


def test_errors_quantized_conv2d():
    x, packed, shape = _ok_args()
    xf = x.float()
    op = torch.ops.qops.quantized_conv2d
    ws = torch.ones(2)
    with pytest.raises(RuntimeError, match="x: expected dtype float32 or activation codes uint8"):
        op(x.to(torch.int8), packed, shape, ws, 0.1, 4, 4, False, None, [1, 1], [0, 0])
    with pytest.raises(RuntimeError, match="x: expected dtype float32 or activation codes int8"):
        op(x, packed, shape, ws, 0.1, 4, 4, True, None, [1, 1], [0, 0])
    with pytest.raises(RuntimeError, match="a_scale: expected a positive"):
        op(xf, packed, shape, ws, 0.0, 4, 4, False, None, [1, 1], [0, 0])
    with pytest.raises(RuntimeError, match="w_scale: expected shape"):
        op(xf, packed, shape, torch.ones(3), 0.1, 4, 4, False, None, [1, 1], [0, 0])
    with pytest.raises(RuntimeError, match="w_scale: expected positive"):
        op(xf, packed, shape, torch.tensor([1.0, -1.0]), 0.1, 4, 4, False, None, [1, 1], [0, 0])
    with pytest.raises(RuntimeError, match="bias: expected shape"):
        op(xf, packed, shape, ws, 0.1, 4, 4, False, torch.ones(3), [1, 1], [0, 0])


def test_errors_packed_conv2d_module():
    w = torch.randn(2, 3, 3, 3)
    with pytest.raises(ValueError, match="w_scale: expected 2 positive"):
        PackedConv2d.from_float(w, torch.tensor([0.1, 0.0]), 0.1, 4, 4)
    with pytest.raises(ValueError, match="a_scale: expected a positive"):
        PackedConv2d.from_float(w, torch.tensor([0.1, 0.1]), -1.0, 4, 4)
    with pytest.raises(ValueError, match="conv: PackedConv2d supports groups=1"):
        PackedConv2d.from_conv(torch.nn.Conv2d(4, 4, 3, groups=2), 0.1, 0.1, 4, 4)


def test_errors_forced_path(monkeypatch):
    x, packed, shape = _ok_args()
    monkeypatch.setenv("QOPS_PACKED_PATH", "simd")
    with pytest.raises(RuntimeError, match="QOPS_PACKED_PATH: unknown path 'simd'"):
        packed_conv2d(x, packed, shape, 4, 4)
    if VECTOR:
        monkeypatch.setenv("QOPS_PACKED_PATH", "lut")
        with pytest.raises(
            RuntimeError, match="QOPS_PACKED_PATH=lut: the lookup-table path needs a_bits <= 2"
        ):
            packed_conv2d(x, packed, shape, 4, 4)


# ---------------------------------------------------------------------------------------------------------
# opcheck (schemas, fake tensors, autograd registration)


def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    w = weight_codes(gen, (3, 4, 3, 3), 3)
    packed = pack_weight(w, 3)
    x = act_codes(gen, (2, 4, 6, 7), 2, False)
    xf = torch.rand(2, 4, 6, 7, generator=gen)
    torch.library.opcheck(torch.ops.qops.pack_weight, (w, 3))
    torch.library.opcheck(
        torch.ops.qops.packed_conv2d, (x, packed, [3, 4, 3, 3], 3, 2, False, [1, 2], [1, 0])
    )
    torch.library.opcheck(
        torch.ops.qops.quantized_conv2d,
        (xf, packed, [3, 4, 3, 3], torch.rand(3) + 0.1, 0.2, 3, 2, False, torch.randn(3), [1, 1], [1, 1]),
        test_utils=(
            "test_schema",
            "test_faketensor",
            "test_aot_dispatch_static",
            "test_aot_dispatch_dynamic",
        ),
    )


def test_compile_quantized_conv2d():
    m = PackedConv2d.from_float(torch.randn(4, 3, 3, 3), torch.full((4,), 0.1), 0.05, 4, 4, padding=1)
    x = torch.rand(1, 3, 8, 9)
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@pytest.mark.cuda
@pytest.mark.parametrize("w_bits,a_bits", BIT_PAIRS)
@pytest.mark.parametrize("a_signed", [False, True])
def test_cuda_every_bit_pair_exact(w_bits, a_bits, a_signed):
    gen = torch.Generator().manual_seed(w_bits * 16 + a_bits)
    for n, cin, cout, h, w, k, s, p in GEOMETRIES[:4]:
        x = act_codes(gen, (n, cin, h, w), a_bits, a_signed)
        wc = weight_codes(gen, (cout, cin, k, k), w_bits)
        packed = pack_weight(wc, w_bits)
        packed_cuda = pack_weight(wc.cuda(), w_bits)
        torch.testing.assert_close(packed_cuda.cpu(), packed, rtol=0, atol=0)
        got = packed_conv2d(x.cuda(), packed_cuda, wc.shape, w_bits, a_bits, a_signed, s, p)
        want = packed_conv2d(x, packed, wc.shape, w_bits, a_bits, a_signed, s, p)
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_quantized_conv2d_matches_cpu():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 20, 23, generator=gen)
    w = weight_codes(gen, (8, 16, 3, 3), 4)
    packed = pack_weight(w, 4)
    ws, bias = torch.rand(8, generator=gen) + 0.05, torch.randn(8, generator=gen)
    want = quantized_conv2d(x, packed, w.shape, ws, 0.1, 4, 4, True, bias, 1, 1)
    got = quantized_conv2d(x.cuda(), packed.cuda(), w.shape, ws.cuda(), 0.1, 4, 4, True, bias.cuda(), 1, 1)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("signed", [False, True])
def test_quant_range_is_what_the_kernels_accept(bits, signed):
    """qops.quant_range is the activation code range of packed_conv2d at every bit-width, 1 included (signed
    1-bit codes are {-1, 0}); one step beyond either end is refused."""
    lo, hi = qops.quant_range(bits, signed)
    assert (lo, hi) == ((-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1))
    w = pack_weight(torch.ones(1, 1, 1, 1, dtype=torch.int8), 2)
    dtype = torch.int8 if signed else torch.uint8
    x = torch.tensor([lo, hi], dtype=torch.int16).to(dtype).reshape(1, 1, 1, 2)
    assert packed_conv2d(x, w, [1, 1, 1, 1], 2, bits, signed).flatten().tolist() == [lo, hi]
    for outside in (lo - 1, hi + 1):
        if torch.iinfo(dtype).min <= outside <= torch.iinfo(dtype).max:
            bad = torch.tensor([outside], dtype=torch.int16).to(dtype).reshape(1, 1, 1, 1)
            with pytest.raises(RuntimeError, match="x_codes: codes must be in"):
                packed_conv2d(bad, w, [1, 1, 1, 1], 2, bits, signed)
    assert weight_code_range(bits) == ((-1, 1) if bits == 1 else qops.quant_range(bits, True))
    with pytest.raises(ValueError, match="bits: expected a bit-width >= 1"):
        qops.quant_range(0, signed)
