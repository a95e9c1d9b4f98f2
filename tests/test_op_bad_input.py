"""Bad input for every torch.ops.qops op: wrong dtypes and devices, bad shapes, zero-size tensors, non-finite and
non-positive scales, huge or negative strides, paddings and dilations, bits out of range. Each call must either
raise a RuntimeError whose message starts with the name of an argument, or return the reference's result; never
crash, hang, or return garbage. Hypothesis draws the calls (fewer under `make asan`)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_examples import examples

from qops import reference as R
from qops.mixed_quant_conv import MixedQuantConvSpec, op_args
from qops.packed import pack_weight, unpack_weight, weight_code_range

SETTINGS = settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
BIG = [2**31, 2**40, 2**62, 2**63 - 1]
DEVICES = ["cpu", "cpu", "cpu", "meta"]  # mostly real tensors; sometimes one meta tensor among them
FLOATS = [0.5, 1e-3, 0.0, -0.25, math.nan, math.inf, -math.inf, 1e39, 1e-46, 3e38]


def outcome(call, names):
    """(True, result) or (False, None) after a RuntimeError naming one of `names`; anything else fails."""
    try:
        return True, call()
    except RuntimeError as e:
        first = str(e).split("\n")[0]
        m = re.match(r"([A-Za-z_]+)(\[\d+\])?:", first)
        assert m and m.group(1) in names, f"error does not name an argument: {first!r}"
        return False, None


def _tensor(draw, shape, dtype=torch.float32, values=st.floats(-4, 4, width=32)):
    n = math.prod(shape)
    data = draw(st.lists(values, min_size=n, max_size=n))
    return torch.tensor(data, dtype=torch.float32).reshape(shape).to(dtype)


def _full(shape, value: float) -> torch.Tensor:
    """float32 filled with value rounded to float32 (1e39 becomes inf, as a float32 step would)."""
    return torch.tensor(value, dtype=torch.float64).float().expand(shape).clone()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


# ---------------------------------------------------------------------------------------------------------
# fake_quant


@st.composite
def fake_quant_calls(draw):
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)))
    x = _tensor(draw, shape, values=st.sampled_from([0.0, 1.5, -3.0, 100.0, math.nan, math.inf, 1e38]))
    x = x.to(draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.float64, torch.int32])))
    axis = draw(st.sampled_from([-1, -1, 0, 1, 2, -2, 5, -7]))
    channels = shape[axis] if axis != -1 and -len(shape) <= axis < len(shape) else 1
    n = draw(st.sampled_from([channels, channels, 1, channels + 1]))
    scale = torch.tensor(draw(st.lists(st.sampled_from(FLOATS), min_size=n, max_size=n)), dtype=torch.float32)
    zp = torch.tensor(
        draw(st.lists(st.sampled_from([0.0, 3.0, -2.5, 1e9, math.nan]), min_size=n, max_size=n))
    )
    if draw(st.integers(0, 3)) == 0:
        zp = zp.nan_to_num(0.0).to(torch.int64)
    scale = scale.to(draw(st.sampled_from(DEVICES)))
    qmin, qmax = draw(
        st.sampled_from([(-8, 7), (0, 255), (0, 1), (5, 5), (7, -8), (-(2**40), 0), (0, 2**31)])
    )
    return x, scale, zp, axis, qmin, qmax


NAMES_FQ = {"x", "scale", "zero_point", "axis", "quant_min", "quant_max", "grad"}


@SETTINGS
@given(call=fake_quant_calls())
def test_fake_quant_bad_input(call):
    x, scale, zp, axis, qmin, qmax = call
    # +inf (and |x / s| >= 2^63) saturate to quant_max here; the built-in (the reference) takes them for
    # "below" in its per-channel forward and both backwards (docs/FAKE_QUANT.md): there, only what does not
    # depend on it is compared.
    s = scale.cpu() if scale.device.type == "cpu" else torch.ones(1)  # a meta scale: the call raises anyway
    finite_scales = s[torch.isfinite(s) & (s > 0)]
    huge = 2.0**62 * (float(finite_scales.min()) if finite_scales.numel() else 1.0)
    built_in_differs = x.is_floating_point() and bool((x.double().abs() >= huge).any())
    if x.numel() == 0:  # the per-channel built-in refuses empty tensors: the result is empty like x
        ok, y = outcome(lambda: torch.ops.qops.fake_quant(x, scale, zp, axis, qmin, qmax), NAMES_FQ)
        assert not ok or (y.shape == x.shape and y.dtype == x.dtype)
        return
    ok, y = outcome(lambda: torch.ops.qops.fake_quant(x, scale, zp, axis, qmin, qmax), NAMES_FQ)
    if ok and not (built_in_differs and axis != -1):
        assert _same(y, R.fake_quant(x, scale, zp, axis, qmin, qmax))
    dy = torch.ones_like(x)
    ok, g = outcome(lambda: torch.ops.qops.fake_quant_backward(dy, x, scale, zp, axis, qmin, qmax), NAMES_FQ)
    if ok:
        ref = R.fake_quant_backward(dy, x, scale, zp, axis, qmin, qmax)
        assert _same(g[0], ref[0])
        for a, b in zip(g[1:], ref[1:], strict=True):
            if not built_in_differs:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------
# quant_noise


@st.composite
def quant_noise_calls(draw):
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    x = _tensor(
        draw,
        shape,
        values=st.sampled_from([0.0, 1.0, -2.0, 3e38, -3e38, 1e-45, math.nan, math.inf, -math.inf]),
    )
    x = x.to(
        draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.int64]))
    )
    bits = draw(st.sampled_from([1, 4, 8, 16, 0, -1, 17, 2**40]))
    axis = draw(st.sampled_from([-1, -1, 0, 1, -2, 3, -9]))
    dist = draw(st.sampled_from(["gaussian", "uniform", "normal", ""]))
    seed = draw(st.sampled_from([0, -1, 2**63 - 1, -(2**63)]))
    return x, bits, seed, axis, dist


@SETTINGS
@given(call=quant_noise_calls())
def test_quant_noise_bad_input(call):
    x, bits, seed, axis, dist = call
    ok, y = outcome(
        lambda: torch.ops.qops.quant_noise(x, bits, seed, axis, dist), {"x", "bits", "axis", "dist"}
    )
    if ok:
        ref = R.quant_noise(x, bits, seed, axis, dist)
        if x.dtype == torch.float64:  # not fused in the reference: within an ulp
            torch.testing.assert_close(y, ref, rtol=1e-15, atol=0, equal_nan=True)
        else:
            assert _same(y, ref)
        # Finite inputs of a finite range give finite noise unless the value itself lands beyond the dtype.
        finite_range = x.numel() == 0 or torch.isfinite(x.double()).all()
        if finite_range and bits >= 8 and x.numel():
            assert torch.isfinite(y.double()).all() or x.double().abs().max() > 0.9 * torch.finfo(x.dtype).max


# ---------------------------------------------------------------------------------------------------------
# pack_weight, packed_conv2d, quantized_conv2d


@st.composite
def packed_calls(draw):
    w_bits, a_bits = draw(st.sampled_from([1, 2, 4, 8])), draw(st.sampled_from([1, 2, 4, 8]))
    cout, cin = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kh, kw = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 3]))
    lo, hi = weight_code_range(w_bits)
    codes = torch.tensor(
        draw(
            st.lists(st.sampled_from([lo, hi]), min_size=cout * cin * kh * kw, max_size=cout * cin * kh * kw)
        ),
        dtype=torch.int8,
    ).reshape(cout, cin, kh, kw)
    w_shape = [cout, cin, kh, kw]
    k = draw(st.integers(0, 9))
    if k < 4:  # one entry of w_shape off: zero, negative, huge
        w_shape[k] = draw(st.sampled_from([0, -1, 2, *BIG]))
    n, h, w = draw(st.integers(0, 2)), draw(st.integers(0, 6)), draw(st.integers(0, 6))
    stride = [draw(st.sampled_from([1, 2, 3, 0, -1, *BIG])) for _ in range(2)]
    padding = [draw(st.sampled_from([0, 0, 1, 2, -1, *BIG])) for _ in range(2)]
    bits_off = draw(st.sampled_from([None, None, None, ("w_bits", 0), ("a_bits", 9), ("w_bits", -3)]))
    a_signed = draw(st.booleans())
    x_codes = torch.zeros(n, cin, h, w, dtype=torch.int8 if a_signed else torch.uint8)
    if draw(st.booleans()):
        x_codes = x_codes.to(draw(st.sampled_from([torch.float32, torch.int32, torch.uint8, torch.int8])))
    x = _tensor(draw, (n, cin, h, w), values=st.sampled_from([0.0, 0.3, -1.0, 50.0, math.nan]))
    w_scale = torch.tensor(draw(st.lists(st.sampled_from(FLOATS[:3] + [0.1]), min_size=1, max_size=1)) * cout)
    a_scale = draw(st.sampled_from([0.05, 1.0, *FLOATS]))
    bias = draw(st.sampled_from([None, torch.zeros(cout), torch.zeros(cout + 1)]))
    device = draw(st.sampled_from(DEVICES + ["cpu"] * 4))
    return dict(
        codes=codes, w_shape=w_shape, w_bits=w_bits, a_bits=a_bits, a_signed=a_signed, x_codes=x_codes, x=x,
        w_scale=w_scale.to(device), a_scale=a_scale, bias=bias, stride=stride, padding=padding, bits_off=bits_off,
    )  # fmt: skip


NAMES_PACKED = {
    "w_codes",
    "bits",
    "x_codes",
    "x",
    "w_packed",
    "w_shape",
    "w_bits",
    "a_bits",
    "stride",
    "padding",
}
NAMES_PACKED |= {"w_scale", "a_scale", "bias"}


def _clamped_stride(c, x):
    """The stride the kernels use: beyond the padded input it is the padded input (the same output)."""
    return [min(c["stride"][d], x.shape[2 + d] + 2 * c["padding"][d]) for d in range(2)]


def _padded(x, padding):
    """(x, padding), or x zero-padded and no padding where x has no rows or columns (which torch's convolution,
    the reference, refuses): the same convolution."""
    if 0 not in x.shape[2:]:
        return x, padding
    return torch.nn.functional.pad(x, (padding[1], padding[1], padding[0], padding[0])), [0, 0]


@SETTINGS
@given(c=packed_calls())
def test_packed_convolutions_bad_input(c):
    w_bits, a_bits = c["w_bits"], c["a_bits"]
    if c["bits_off"]:
        name, value = c["bits_off"]
        w_bits, a_bits = (value, a_bits) if name == "w_bits" else (w_bits, value)
    ok, packed = outcome(lambda: pack_weight(c["codes"], w_bits), NAMES_PACKED)
    if not ok:
        return
    assert torch.equal(unpack_weight(packed, list(c["codes"].shape), w_bits), c["codes"])
    args = (c["w_shape"], w_bits, a_bits, c["a_signed"], c["stride"], c["padding"])
    ok, y = outcome(lambda: torch.ops.qops.packed_conv2d(c["x_codes"], packed, *args), NAMES_PACKED)
    if ok:
        stride = _clamped_stride(c, c["x_codes"])
        want = R.packed_conv2d(
            c["x_codes"], packed, c["w_shape"], w_bits, a_bits, c["a_signed"], stride, c["padding"]
        )
        assert torch.equal(y, want)
    qargs = (c["w_shape"], c["w_scale"], c["a_scale"], w_bits, a_bits, c["a_signed"], c["bias"])
    call = lambda: torch.ops.qops.quantized_conv2d(c["x"], packed, *qargs, c["stride"], c["padding"])  # noqa: E731
    ok, y = outcome(call, NAMES_PACKED)
    if ok and y.device.type == "cpu":
        stride = _clamped_stride(c, c["x"])
        x, padding = _padded(c["x"], c["padding"])
        want = R.quantized_conv2d(x, packed, *qargs, stride, padding)
        torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
        assert torch.isfinite(y).all()  # finite steps, codes clamped into range: NaN input becomes a code


# ---------------------------------------------------------------------------------------------------------
# mixed_quant_conv


@st.composite
def mixed_calls(draw):
    cin, cout = draw(st.sampled_from([2, 4])), draw(st.sampled_from([2, 4]))
    n_ops = draw(st.integers(1, 2))
    kernels = [draw(st.sampled_from([(1, 1), (3, 3), (3, 1), (2, 3)])) for _ in range(n_ops)]
    groups = [draw(st.sampled_from([1, 1, 2, 0, -1, 3, 2**62])) for _ in range(n_ops)]
    dilations = [draw(st.sampled_from([1, 1, 2, 0, -2, *BIG])) for _ in range(n_ops)]
    weights = []
    for (kh, kw), g in zip(kernels, groups, strict=True):
        ci = cin // g if g > 0 and cin % g == 0 else cin
        weights.append(torch.randn(cout, ci, kh, kw, generator=torch.Generator().manual_seed(len(weights))))
    w_bits = draw(st.lists(st.sampled_from([0, 2, 4, 8, 1, 9, -1]), min_size=1, max_size=2))
    a_bits = draw(st.lists(st.sampled_from([0, 2, 4, 8, 1, 9]), min_size=1, max_size=2))
    n, h, w = draw(st.integers(0, 2)), draw(st.integers(0, 5)), draw(st.integers(1, 5))
    x = torch.randn(n, cin, h, w, generator=torch.Generator().manual_seed(9))
    probs = torch.rand(n_ops, len(w_bits), len(a_bits), generator=torch.Generator().manual_seed(3))
    if draw(st.integers(0, 5)) == 0:
        probs = probs[..., :1] if len(a_bits) > 1 else probs.unsqueeze(0)
    w_scales = _full((n_ops, len(w_bits)), draw(st.sampled_from([0.05, 0.05, *FLOATS])))
    a_scales = _full((len(a_bits),), draw(st.sampled_from([0.1, 0.1, *FLOATS])))
    bias = draw(st.sampled_from([None, torch.zeros(cout), torch.zeros(cout + 1)]))
    stride = draw(st.sampled_from([1, 2, 0, -1, *BIG]))
    mode = draw(st.sampled_from(["quant", "quant", "noise", "fast"]))
    dtype = draw(st.sampled_from([torch.float32] * 5 + [torch.float64]))
    device = draw(st.sampled_from(DEVICES + ["cpu"] * 4))
    tensors = [x.to(dtype), weights, probs.to(device), w_scales, a_scales, bias]
    spec = MixedQuantConvSpec(w_bits, a_bits, groups, dilations, draw(st.booleans()), stride, mode)
    return tensors, spec


NAMES_MQC = {"x", "weights", "probs", "w_bits", "a_bits", "w_scales", "a_scales", "groups", "dilations"}
NAMES_MQC |= {"stride", "bias", "mode", "grad"}


@SETTINGS
@given(call=mixed_calls())
def test_mixed_quant_conv_bad_input(call):
    tensors, spec = call
    flat = op_args(*tensors, spec, 5)
    ok, y = outcome(lambda: torch.ops.qops.mixed_quant_conv(*flat), NAMES_MQC)
    if not ok or y.device.type != "cpu":
        return
    x = tensors[0]
    if x.shape[2] == 0:  # no rows: an empty output (the reference's convolution refuses the input)
        assert y.shape == (x.shape[0], tensors[1][0].shape[0], 0, (x.shape[3] - 1) // spec.stride + 1)
        return
    extent = max(x.shape[2], x.shape[3], 1)
    clamped = MixedQuantConvSpec(
        spec.w_bits, spec.a_bits, spec.groups, [min(d, extent) for d in spec.dilations], spec.a_signed,
        min(spec.stride, extent), spec.mode,
    )  # fmt: skip
    want = R.mixed_quant_conv(*tensors, clamped, 5)
    assert y.shape == want.shape
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(y).all()  # finite inputs, finite positive scales
    grad = torch.ones_like(y)
    ok, g = outcome(
        lambda: torch.ops.qops.mixed_quant_conv_backward(
            grad, *flat[:11], flat[11] is not None, *flat[12:], [True] * 6
        ),
        NAMES_MQC,
    )
    assert ok
    for t in (g[0], g[2], g[3], g[4], *g[1]):
        assert torch.isfinite(t).all()


def test_outcome_rejects_unnamed_errors():
    with pytest.raises(AssertionError, match="does not name an argument"):
        outcome(lambda: torch.empty(-1), {"x"})
