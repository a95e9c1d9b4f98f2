"""The integer pipeline's ops against qops.reference, bit for bit: requantized_conv2d (codes out: scale, int32
bias, ReLU, round, clamp in the epilogue), requantize and quantized_add, on every CPU path (QOPS_PACKED_PATH)
and every compiled ISA (qops.set_cpu_isa), fuzzed with hypothesis; their errors, fake kernels and opcheck."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_examples import examples

import qops
from qops import reference as R
from qops.packed import pack_weight, quantized_add, quantized_conv2d, requantize, requantized_conv2d

BEST = qops._C.max_cpu_isa()
ISAS = ["DEFAULT", "AVX2", "AVX512"][: ["DEFAULT", "AVX2", "AVX512"].index(BEST) + 1]
PATHS = ["scalar"] + (["dot", "lut", "bitserial"] if BEST != "DEFAULT" else [])


@contextlib.contextmanager
def forced(isa: str, path: str = "auto"):
    """Runs the kernels with the given ISA cap and packed path."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QOPS_PACKED_PATH", "scalar" if isa == "DEFAULT" else path)
        qops.set_cpu_isa(isa)
        try:
            yield
        finally:
            qops.set_cpu_isa(BEST)


def lut_supports(w_bits: int, a_bits: int) -> bool:
    wabs = 1 if w_bits == 1 else 2 ** (w_bits - 1)
    return a_bits <= 2 and (4 // a_bits) * wabs * (2**a_bits - 1) <= 255


def codes(gen, shape, bits, signed):
    lo, hi = qops.quant_range(bits, signed)
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int16).to(
        torch.int8 if signed else torch.uint8
    )


def weights(gen, shape, bits):
    if bits == 1:
        return (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(torch.int8)
    lo, hi = qops.quant_range(bits, True)
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int16).to(torch.int8)


def conv_case(gen, n, cin, cout, h, w, k, w_bits, a_bits, a_signed, float_in, out_bits, per_channel):
    """Arguments of requantized_conv2d whose outputs spread over the whole output code range."""
    wc = weights(gen, (cout, cin, k, k), w_bits)
    packed = pack_weight(wc, w_bits)
    a_scale = float(torch.rand((), generator=gen) * 0.2 + 0.01)
    x = codes(gen, (n, cin, h, w), a_bits, a_signed)
    if float_in:  # floats around the code grid, some exactly halfway between two codes
        x = (x.float() + torch.randint(-2, 3, x.shape, generator=gen) * 0.25) * a_scale
    w_scale = torch.rand(cout if per_channel else 1, generator=gen) * 0.1 + 0.005
    bias = torch.randint(-300, 301, (cout,), generator=gen, dtype=torch.int32)
    args = [x, packed, list(wc.shape), w_scale, a_scale, w_bits, a_bits, a_signed, bias, [1, 1], [k // 2] * 2]
    y = R.quantized_conv2d(*args[:8], None, *args[9:])
    out_scale = float(y.abs().max().clamp_min(1e-3)) / 2 ** max(out_bits - 1, 1)
    return args, out_scale


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "w_bits,a_bits,a_signed,out_bits,out_signed,relu",
    [
        (
            4,
            4,
            True,
            4,
            False,
            True,
        ),  # EDSR block, first conv: ReLU then the unsigned 4-bit input of the next
        (4, 4, False, 8, True, False),  # second conv: the skip's 8-bit operand
        (2, 2, False, 2, True, True),  # signed output after ReLU: the epilogue clamps the negatives
        (8, 8, True, 8, True, False),
        (1, 1, False, 1, False, False),
        (3, 5, True, 6, True, True),
    ],
)
@pytest.mark.parametrize("shuffle", [1, 2])
@pytest.mark.parametrize("float_in", [False, True])
def test_requantized_conv2d_exact(
    isa, path, w_bits, a_bits, a_signed, out_bits, out_signed, relu, float_in, shuffle
):  # fmt: skip
    if path == "lut" and not lut_supports(w_bits, a_bits):
        pytest.skip("the lut path needs a_bits <= 2 and byte-sized tables")
    gen = torch.Generator().manual_seed(w_bits * 100 + a_bits * 10 + out_bits)
    cout = 8 * shuffle * shuffle - 1 if shuffle == 1 else 4 * shuffle * shuffle  # 7 (odd) or 16 channels
    args, out_scale = conv_case(gen, 2, 9, cout, 6, 37, 3, w_bits, a_bits, a_signed, float_in, out_bits, True)
    extra = (out_scale, out_bits, out_signed, relu, shuffle)
    with forced(isa, path):
        got = requantized_conv2d(*args, *extra)
    want = R.requantized_conv2d(*args, *extra)
    assert got.dtype == (torch.int8 if out_signed else torch.uint8)
    assert torch.equal(got, want)
    assert len(torch.unique(got)) >= 2


@settings(max_examples=examples(40), deadline=None)
@given(
    n=st.integers(1, 2),
    cin=st.integers(1, 20),
    cout=st.integers(1, 9),
    h=st.integers(1, 9),
    w=st.integers(1, 45),
    k=st.sampled_from([1, 3]),
    w_bits=st.integers(1, 8),
    a_bits=st.integers(1, 8),
    a_signed=st.booleans(),
    out_bits=st.integers(1, 8),
    out_signed=st.booleans(),
    relu=st.booleans(),
    float_in=st.booleans(),
    per_channel=st.booleans(),
    shuffle=st.sampled_from([1, 1, 2, 3]),
    isa=st.sampled_from(ISAS),
    path=st.sampled_from(PATHS),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_requantized_conv2d(
    n, cin, cout, h, w, k, w_bits, a_bits, a_signed, out_bits, out_signed, relu, float_in, per_channel, shuffle,
    isa, path, seed,
):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    if shuffle > 1:
        cout = shuffle * shuffle * (cout % 3 + 1)
    args, out_scale = conv_case(
        gen, n, cin, cout, h, w, k, w_bits, a_bits, a_signed, float_in, out_bits, per_channel
    )
    if path == "lut" and not lut_supports(w_bits, a_bits):
        path = "auto"
    extra = (out_scale, out_bits, out_signed, relu, shuffle)
    with forced(isa, path):
        got = requantized_conv2d(*args, *extra)
        step = args[3] * torch.tensor(args[4], dtype=torch.float32)  # the accumulator's step, float32
        as_float = quantized_conv2d(*args[:8], args[8].float() * step, *args[9:])
    assert torch.equal(got, R.requantized_conv2d(*args, *extra))
    # The codes are what requantize (fake_quant's codes) makes of quantized_conv2d's float output.
    if relu:
        as_float = torch.relu(as_float)
    as_float = torch.nn.functional.pixel_shuffle(as_float, shuffle)
    assert torch.equal(got, requantize(as_float, out_scale, out_bits, out_signed))


@pytest.mark.parametrize("isa", ISAS)
def test_quantized_conv2d_takes_codes(isa):
    gen = torch.Generator().manual_seed(4)
    args, _ = conv_case(gen, 1, 8, 5, 7, 40, 3, 4, 4, True, False, 8, True)
    x_codes = args[0]
    x_float = x_codes.float() * args[4]  # on the grid: quantizing it gives x_codes back
    with forced(isa):
        a = quantized_conv2d(x_codes, *args[1:8], None, *args[9:])
        b = quantized_conv2d(x_float, *args[1:8], None, *args[9:])
    assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match=r"x: codes must be in \[-8, 7\]"):
        quantized_conv2d(x_codes * 2, *args[1:8], None, *args[9:])


@settings(max_examples=examples(40), deadline=None)
@given(
    shape=st.lists(st.integers(1, 13), min_size=1, max_size=4),
    x_signed=st.booleans(),
    y_signed=st.booleans(),
    x_bits=st.integers(1, 8),
    y_bits=st.integers(1, 8),
    out_bits=st.integers(1, 8),
    out_signed=st.booleans(),
    isa=st.sampled_from(ISAS),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_quantized_add_and_requantize(
    shape, x_signed, y_signed, x_bits, y_bits, out_bits, out_signed, isa, seed
):
    gen = torch.Generator().manual_seed(seed)
    x, y = codes(gen, shape, x_bits, x_signed), codes(gen, shape, y_bits, y_signed)
    sx, sy = (float(torch.rand((), generator=gen)) * 0.1 + 1e-3 for _ in range(2))
    so = (sx * 2 ** (x_bits - 1) + sy * 2 ** (y_bits - 1)) / 2 ** max(out_bits - 1, 1)
    xf = torch.randn(shape, generator=gen) * so * 2 ** (out_bits - 1)
    with forced(isa):
        got = quantized_add(x, sx, y, sy, so, out_bits, out_signed)
        rq = requantize(x, so, out_bits, out_signed, sx)
        rf = requantize(xf, so, out_bits, out_signed)
    assert torch.equal(got, R.quantized_add(x, sx, y, sy, so, out_bits, out_signed))
    assert torch.equal(rq, R.requantize(x, so, out_bits, out_signed, sx))
    assert torch.equal(rf, R.requantize(xf, so, out_bits, out_signed))
    # fake_quant of the float sum, as the float pipeline computes the quantized skip.
    lo, hi = qops.quant_range(out_bits, out_signed)
    s = torch.tensor([so], dtype=torch.float32)
    ref = torch.ops.qops.fake_quant(x.float() * sx + y.float() * sy, s, torch.zeros(1), -1, lo, hi, 1.0)
    assert torch.equal(got.float() * s, ref)


def test_requantize_special_values():
    """NaN goes to the bottom of the range and infinities saturate, as in fake_quant."""
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5, 1.5, -0.5, 2.5] * 3)
    for isa in ISAS:
        with forced(isa):
            assert requantize(x, 1.0, 4, True).tolist() == [-8, 7, -8, 0, 2, 0, 2] * 3
            assert requantize(x, 1.0, 3, False).tolist() == [0, 7, 0, 0, 2, 0, 2] * 3


def _meta(args):
    return [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]


def test_errors_code_ops():
    """One-line errors naming the argument, from the kernels and (on meta tensors) from the fake kernels."""
    c8, u8 = torch.zeros(2, 3, dtype=torch.int8), torch.zeros(2, 3, dtype=torch.uint8)
    f = torch.zeros(2, 3)
    gen = torch.Generator().manual_seed(0)
    args, _ = conv_case(gen, 1, 3, 2, 5, 5, 3, 4, 4, False, False, 8, True)
    cases = [
        (requantize, (c8, 0.1, 4, True), "x_scale: codes need their step"),
        (requantize, (f, 0.1, 4, True, 0.1), "x_scale: only codes"),
        (requantize, (f.int(), 0.1, 4, True, 0.1), "x: expected dtype"),
        (requantize, (f, 0.1, 9, True), "bits: expected a bit-width in 1..8"),
        (requantize, (f, 0.0, 4, True), "scale: expected a positive finite step"),
        (requantize, (c8, 0.1, 4, True, 1e-50), "x_scale: .* is not a usable float32 step"),
        (quantized_add, (c8, 0.1, f, 0.1, 0.1, 8, True), "y: expected dtype int8 or uint8"),
        (quantized_add, (c8, 0.1, u8[:1], 0.1, 0.1, 8, True), "y: expected the shape of x"),
        (quantized_add, (c8, 0.1, u8, -1.0, 0.1, 8, True), "y_scale: expected a positive"),
        (quantized_add, (c8, 0.1, u8, 0.1, float("inf"), 8, True), "out_scale: expected a positive"),
        (quantized_add, (c8, 0.1, u8, 0.1, 0.1, 0, True), "out_bits: expected a bit-width"),
        (requantized_conv2d, (*args[:8], args[8].float(), *args[9:], 0.1, 8, True), "bias: expected dtype"),
        (requantized_conv2d, (*args, 0.0, 8, True), "out_scale: expected a positive finite step"),
        (requantized_conv2d, (*args, 0.1, 9, True), "out_bits: expected a bit-width in 1..8"),
        (requantized_conv2d, (*args, 0.1, 8, True, False, 2), "pixel_shuffle: expected a factor in 1..8"),
        (
            requantized_conv2d,
            (args[0].to(torch.int8), *args[1:], 0.1, 8, True),
            "x: expected dtype float32 or activation codes uint8",
        ),
    ]
    for fn, a, match in cases:
        with pytest.raises(RuntimeError, match=match):
            fn(*a)
        with pytest.raises(RuntimeError, match=match):
            fn(*_meta(a))


def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    args, out_scale = conv_case(gen, 2, 4, 3, 6, 7, 3, 3, 2, False, False, 4, True)
    test_utils = ("test_schema", "test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic")
    torch.library.opcheck(
        torch.ops.qops.requantized_conv2d, (*args, out_scale, 4, True, True), test_utils=test_utils
    )
    xf = args[0].float() * args[4]
    torch.library.opcheck(
        torch.ops.qops.requantized_conv2d, (xf, *args[1:], out_scale, 4, False, False), test_utils=test_utils
    )
    args, out_scale = conv_case(gen, 1, 4, 8, 5, 6, 3, 4, 4, True, False, 8, False)
    torch.library.opcheck(
        torch.ops.qops.requantized_conv2d, (*args, out_scale, 8, True, False, 2), test_utils=test_utils
    )
    c = codes(gen, (2, 3, 5), 8, True)
    torch.library.opcheck(torch.ops.qops.requantize, (c, 0.3, 4, False, 0.1), test_utils=test_utils)
    torch.library.opcheck(torch.ops.qops.requantize, (torch.randn(4, 5), 0.3, 4, True), test_utils=test_utils)
    torch.library.opcheck(
        torch.ops.qops.quantized_add, (c, 0.1, c.flip(0), 0.2, 0.25, 8, True), test_utils=test_utils
    )


@pytest.mark.parametrize("isa", ISAS[1:] or ISAS)
def test_threads_share_the_work_exactly(isa):
    """Large enough to run on two threads (row blocks and chunks taken from a shared counter): the same codes."""
    gen = torch.Generator().manual_seed(9)
    args, out_scale = conv_case(gen, 1, 32, 32, 48, 80, 3, 4, 4, True, False, 8, True)  # 35 M MACs
    c = codes(gen, (3, 300_000), 8, True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with forced(isa):
            got = requantized_conv2d(*args, out_scale, 8, True, True)
            q = quantized_add(c, 0.1, c.flip(1), 0.05, 0.12, 8, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got, R.requantized_conv2d(*args, out_scale, 8, True, True))
    assert torch.equal(q, R.quantized_add(c, 0.1, c.flip(1), 0.05, 0.12, 8, True))
