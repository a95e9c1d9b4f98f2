"""torch.ops.qops.quant_noise: the Philox stream (known answers, header == reference bit for bit),
kernel == reference (every ISA, Triton, CUDA), noise statistics, determinism, per-axis ranges,
strides and dtypes, autograd, opcheck, torch.compile and the documented errors."""

from __future__ import annotations

import math
import shutil
import struct
import subprocess

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_examples import examples

import qops
from qops import reference

OP = torch.ops.qops.quant_noise
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)

# Random123 kat_vectors, "philox4x32 10" lines: counter[4], key[2] -> output[4].
PHILOX_KATS = [
    ([0, 0, 0, 0], (0, 0), [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, (0xFFFFFFFF, 0xFFFFFFFF), [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    (
        [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
        (0xA4093822, 0x299F31D0),
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
    ),
]


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same bit patterns (NaN-free float tensors)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    view = {torch.float32: torch.int32, torch.float64: torch.int64}.get(a.dtype, torch.int16)
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def isas() -> list[str]:
    order = ["DEFAULT", "AVX2", "AVX512"]
    return order[: order.index(qops._C.max_cpu_isa()) + 1]


@pytest.fixture
def restore_isa():
    yield
    qops.set_cpu_isa(qops._C.max_cpu_isa())


@st.composite
def shape_and_axis(draw, max_dims=4, max_size=9):
    shape = tuple(draw(st.lists(st.integers(1, max_size), min_size=0, max_size=max_dims)))
    axes = [-1] + list(range(len(shape))) + list(range(-len(shape), -1))
    return shape, draw(st.sampled_from(axes))


# ---------------------------------------------------------------------------------------------
# The stream


@pytest.mark.parametrize("counter,key,expected", PHILOX_KATS)
def test_reference_philox_known_answers(counter, key, expected):
    out = reference.philox4x32_10(torch.tensor(counter, dtype=torch.int64), key)
    assert out.tolist() == expected


def _compile_header_test(tmp_path, flags):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = tmp_path / ("test_philox" + "".join(f.replace("-", "_").replace("=", "_") for f in flags))
    subprocess.run(
        [cxx, "-std=c++17", *flags, "-I", os.path.join(root, "csrc", "include"),
         os.path.join(root, "tests", "cpp", "test_philox.cpp"), "-o", str(exe)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return exe


def _header_flag_sets():
    sets = [["-O0"], ["-O2"]]
    if qops.cpu_features()["fma"] and qops.cpu_features()["avx2"]:
        # FMA hardware and GCC's default contraction: the result must not change (philox.h).
        sets.append(["-O3", "-mavx2", "-mfma", "-ffp-contract=fast"])
    return sets


@pytest.mark.parametrize("flags", _header_flag_sets(), ids=lambda f: " ".join(f))
def test_header_matches_reference_bit_for_bit(tmp_path, flags):
    """csrc/include/qops/philox.h compiled without torch: Random123's known answers, then eps of
    several streams (incl. a counter high word, i.e. index >= 2^34) equal qops.reference's bits."""
    exe = _compile_header_test(tmp_path, flags)
    subprocess.run([str(exe)], check=True)  # known answers; exit status 1 on a mismatch
    for seed, stream, n, first in [(0, 0, 4099, 0), (-3, 7, 1001, 5), (2**63 - 1, 2**32 - 1, 64, 2**34 + 3)]:
        out = subprocess.run([str(exe), str(seed), str(stream), str(n), str(first)], check=True,
                             capture_output=True, text=True).stdout.split()  # fmt: skip
        rows = [out[i : i + 3] for i in range(0, len(out), 3)]
        assert [int(r[0]) for r in rows] == list(range(first, first + n))
        for column, dist in ((1, "gaussian"), (2, "uniform")):
            header = torch.tensor(
                [struct.unpack("<f", struct.pack("<I", int(r[column], 16)))[0] for r in rows]
            )
            ref = reference.philox_noise(n, seed, stream, dist, offset=first)
            assert bits_equal(header, ref), (seed, stream, dist)


def test_reference_helpers_are_correctly_rounded():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4096, generator=g), torch.randn(4096, generator=g)
    c = -(a.double() * b.double()).float() + torch.randn(4096, generator=g) * 1e-7  # cancellation
    fused = reference.fma_f32(a, b, c)
    # The exact a*b + c (float64 holds it here: |c| is tiny) rounded once.
    exact = (a.double() * b.double() + c.double()).float()
    assert bits_equal(fused, exact)
    x = torch.rand(100000, generator=g) * 100
    assert bits_equal(reference.sqrt_f32(x), torch.sqrt(x.double()).float())


def test_op_adds_exactly_the_stream():
    """With min -1, max 1 and bits = 1, delta / 2 = 1 and y = x + eps exactly where x = 0."""
    x = torch.zeros(4 * 1000 + 3)
    x[0], x[1] = -1.0, 1.0
    for dist in reference.NOISE_DISTS:
        y = OP(x, 1, 1234, -1, dist)
        assert bits_equal(y[2:], reference.philox_noise(x.numel(), 1234, 0, dist)[2:])


# ---------------------------------------------------------------------------------------------
# Kernel == reference


@settings(max_examples=examples(60), deadline=None)
@given(sa=shape_and_axis(), bits=st.integers(1, 16), seed=INT64, dist=st.sampled_from(reference.NOISE_DISTS))
def test_cpu_matches_reference_bitwise(sa, bits, seed, dist):
    shape, axis = sa
    x = torch.randn(shape) * 3 + 1
    assert bits_equal(OP(x, bits, seed, axis, dist), reference.quant_noise(x, bits, seed, axis, dist))


@pytest.mark.parametrize(
    "shape,axis",
    [
        ((2053,), -1),
        ((3, 37, 29), 1),
        ((5, 7, 11, 3), -1),
        ((6, 4, 700), -2),
        ((9, 40), 1),
        ((2, 40003), 1),  # last axis, few long slabs: threads split the slab
        ((40003, 3), 1),  # last axis, many short slabs: per-thread partials
    ],
)
@pytest.mark.parametrize("dist", reference.NOISE_DISTS)
def test_every_isa_matches_reference(shape, axis, dist, restore_isa):
    """The scalar DEFAULT path and the 8-lane AVX2 Philox give identical bits (and equal the reference)."""
    x = torch.randn(shape)
    ref = reference.quant_noise(x, 5, 99, axis, dist)
    for isa in isas():
        qops.set_cpu_isa(isa)
        assert bits_equal(OP(x, 5, 99, axis, dist), ref), isa


def test_multithreaded_equals_single_threaded():
    x = torch.randn(8, 16, 33, 31)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = [OP(x, 4, 3, axis) for axis in (-1, 1, 3)]
    finally:
        torch.set_num_threads(threads)
    for axis, ref in zip((-1, 1, 3), single, strict=True):
        assert bits_equal(OP(x, 4, 3, axis), ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_compute_in_float32(dtype):
    x = (torch.randn(3, 50, 7) * 4).to(dtype)
    for axis in (-1, 1):
        y = OP(x, 3, 5, axis)
        assert y.dtype == dtype
        assert bits_equal(y, reference.quant_noise(x, 3, 5, axis))
        assert bits_equal(y, OP(x.float(), 3, 5, axis).to(dtype))


def test_float64_within_an_ulp_of_reference():
    x = torch.randn(5, 300, dtype=torch.float64)
    for axis in (-1, 0):
        y = OP(x, 8, 11, axis)
        ref = reference.quant_noise(x, 8, 11, axis)  # not fused: within one rounding of the fma
        assert y.dtype == torch.float64
        torch.testing.assert_close(
            y, ref, rtol=0, atol=4 * torch.finfo(torch.float64).eps * x.abs().max().item()
        )


# ---------------------------------------------------------------------------------------------
# Semantics


def test_statistics_gaussian_and_uniform():
    """~1e6 elements: noise mean 0, std delta/2 (gaussian) and delta/(2 sqrt 3) (uniform), bounded
    uniform noise, a normal shape (Kolmogorov-Smirnov), uncorrelated neighbours."""
    from scipy import stats

    n = 1 << 20
    x = torch.rand(n, generator=torch.Generator().manual_seed(1)) * 6 - 2
    delta = (x.max() - x.min()).item() / (2**6 - 1)
    for dist, std in (("gaussian", delta / 2), ("uniform", delta / (2 * math.sqrt(3)))):
        noise = (OP(x, 6, 2024, -1, dist).double() - x.double()) / std
        assert abs(noise.mean().item()) < 5 / math.sqrt(n)
        assert abs(noise.std().item() - 1) < 5 / math.sqrt(2 * n) * (1.2 if dist == "uniform" else 1.5)
        for lag in (1, 2, 3, 4, 5, 8):
            corr = torch.corrcoef(torch.stack([noise[:-lag], noise[lag:]]))[0, 1].item()
            assert abs(corr) < 5 / math.sqrt(n), (dist, lag, corr)
        if dist == "gaussian":
            assert stats.kstest(noise.numpy(), "norm").pvalue > 1e-3
            assert abs(stats.kurtosis(noise.numpy(), fisher=False) - 3) < 0.05
        else:
            assert noise.abs().max().item() <= math.sqrt(3) * (1 + 1e-4)
            assert (
                stats.kstest(noise.numpy(), "uniform", args=(-math.sqrt(3), 2 * math.sqrt(3))).pvalue > 1e-3
            )


def test_determinism_and_independence_of_seeds_and_streams():
    x = torch.randn(1 << 16)
    a, b = OP(x, 4, 7), OP(x, 4, 7)
    assert bits_equal(a, b)
    c = OP(x, 4, 8)
    assert (a == c).float().mean().item() < 1e-3
    noise_a, noise_c = a - x, c - x
    assert abs(torch.corrcoef(torch.stack([noise_a, noise_c]))[0, 1].item()) < 5 / math.sqrt(x.numel())
    # Other streams of the same seed (what mixed_quant_conv uses) are independent of stream 0.
    s0 = reference.philox_noise(1 << 16, 7, 0)
    s1 = reference.philox_noise(1 << 16, 7, 1)
    assert abs(torch.corrcoef(torch.stack([s0, s1]))[0, 1].item()) < 5 / math.sqrt(s0.numel())


def test_per_axis_noise_follows_each_slice_range():
    scales = torch.tensor([0.01, 1.0, 100.0])
    x = torch.randn(64, 3, 4096) * scales.view(1, 3, 1)
    y = OP(x, 4, 1, 1)
    delta = (x.amax(dim=(0, 2)) - x.amin(dim=(0, 2))) / 15
    measured = (y - x).std(dim=(0, 2)) / (delta / 2)
    torch.testing.assert_close(measured, torch.ones(3), atol=0.01, rtol=0)
    # Per tensor: one delta for all.
    y_t = OP(x, 4, 1)
    torch.testing.assert_close(
        (y_t - x).std() / ((x.max() - x.min()) / 30), torch.tensor(1.0), atol=0.01, rtol=0
    )


def test_constant_tensor_and_constant_slice_unchanged():
    x = torch.full((5, 6), 3.25)
    assert bits_equal(OP(x, 8, 1), x)
    x = torch.randn(4, 3, 10)
    x[:, 1] = -0.0
    y = OP(x, 8, 1, 1)
    assert bits_equal(y[:, 1], x[:, 1])
    assert not torch.equal(y[:, 0], x[:, 0])
    scalar = torch.tensor(2.5)
    assert bits_equal(OP(scalar, 4, 0), scalar)


def test_empty_tensor():
    x = torch.empty(0, 3)
    for axis in (-1, 1):
        y = OP(x, 4, 0, axis)
        assert y.shape == (0, 3)


def test_nan_poisons_only_its_slice():
    x = torch.randn(3, 40)
    x[1, 7] = float("nan")
    y = OP(x, 4, 0, 0)
    assert torch.isnan(y[1]).all()
    assert not torch.isnan(y[0]).any() and not torch.isnan(y[2]).any()
    ref = reference.quant_noise(x, 4, 0, 0)
    assert bits_equal(y[[0, 2]], ref[[0, 2]]) and torch.isnan(ref[1]).all()


@pytest.mark.parametrize("bad", [float("inf"), -float("inf")])
def test_infinity_poisons_only_its_slice(bad):
    """A slice holding +-inf has no finite range: all of it is NaN, as with NaN (an infinite step would give
    +-inf or NaN depending on each element's noise), in the kernels as in the reference."""
    x = torch.randn(3, 40)
    x[1, 7] = bad
    y = OP(x, 4, 0, 0)
    assert torch.isnan(y[1]).all()
    ref = reference.quant_noise(x, 4, 0, 0)
    assert bits_equal(y[[0, 2]], ref[[0, 2]]) and torch.isnan(ref[1]).all()
    assert torch.isnan(OP(x, 4, 0)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("isa", ["DEFAULT", "AVX2", "AVX512"])
def test_ranges_near_the_largest_value_stay_finite(dtype, axis, isa, restore_isa):
    """Finite values more than the dtype's largest value apart: max - min overflows, so the step comes from the
    halves (an infinite step would make every output +-inf); the noise is the usual delta-sized one."""
    if isa not in isas():
        pytest.skip(f"{isa} is not available here")
    qops.set_cpu_isa(isa)
    big = torch.finfo(dtype).max
    x = torch.tensor(
        [[-0.9, 0.9, 0.1, 0.0, -0.5, 0.7], [0.8, -0.95, 1e-3, 0.2, 0.0, -0.1]], dtype=torch.float64
    )
    x = (x * big).to(dtype)
    y = OP(x, 8, 11, axis)
    assert torch.isfinite(y).all()
    ref = reference.quant_noise(x, 8, 11, axis)
    if dtype == torch.float32:
        assert bits_equal(y, ref)
    else:
        torch.testing.assert_close(y, ref, rtol=1e-15, atol=0)
    # delta / 2 = (max - min) / 255 / 2 ~ 0.9 * big / 255: noise of that size, not more.
    noise = (y.double() - x.double()).abs()
    assert 0 < noise.max() <= 5.8 * 1.9 * big / 255 / 2


def test_mixed_quant_conv_noise_near_the_largest_value_stays_finite():
    from qops.mixed_quant_conv import MixedQuantConvSpec, mixed_quant_conv

    x = torch.tensor([-3e38, 3e38, 1e37, 0.0]).reshape(1, 1, 2, 2)
    args = ([torch.ones(1, 1, 1, 1)], torch.ones(1, 1, 1), torch.ones(1, 1), torch.ones(1), None)
    spec = MixedQuantConvSpec([0], [8], [1], [1], a_signed=True, mode="noise")
    y = mixed_quant_conv(x, *args, spec, 4)
    ref = reference.mixed_quant_conv(x, *args, spec, 4)
    assert torch.isfinite(y).all() and torch.equal(y, ref)


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x.transpose(0, 2),
        lambda x: x[:, ::2],
        lambda x: x.contiguous(memory_format=torch.channels_last),
        lambda x: x[:, :1].expand(-1, 6, -1, -1),
    ],
    ids=["transpose", "slice", "channels_last", "expanded"],
)
def test_non_contiguous_equals_contiguous(make):
    x = make(torch.randn(4, 6, 5, 7))
    for axis in (-1, 1, -2):
        y = OP(x, 4, 17, axis)
        assert y.is_contiguous()
        assert bits_equal(y, OP(x.contiguous(), 4, 17, axis))


def test_gradient_is_identity():
    x = torch.randn(3, 4, 5, requires_grad=True)
    grad = torch.randn(3, 4, 5)
    qops.quant_noise(x, 4, 0, axis=1).backward(grad)
    assert torch.equal(x.grad, grad)


@pytest.mark.parametrize("axis,dist", [(-1, "gaussian"), (1, "uniform"), (-2, "gaussian")])
def test_opcheck(axis, dist):
    x = torch.randn(3, 5, 4, requires_grad=True)
    torch.library.opcheck(OP.default, (x, 4, 123, axis, dist))
    torch.library.opcheck(OP.default, (torch.randn(7, dtype=torch.float64), 8, -1, -1, dist))


def test_torch_compile_fullgraph():
    def step(w, x):
        noisy = qops.quant_noise(w, 4, 7, axis=0)
        return noisy, (noisy * x).sum(dim=1)

    w = torch.randn(6, 10, requires_grad=True)
    x = torch.randn(6, 10)
    noisy, out = torch.compile(step, fullgraph=True)(w, x)
    noisy_eager, out_eager = step(w, x)
    assert bits_equal(noisy, noisy_eager)
    torch.testing.assert_close(out, out_eager)  # inductor may sum in another order
    out.sum().backward()
    assert torch.equal(w.grad, x)


# ---------------------------------------------------------------------------------------------
# Errors (every one names its argument first)


ERROR_CASES = [
    (lambda op: op(torch.arange(6), 4, 0), r"^x: expected a floating-point tensor"),
    (lambda op: op(torch.randn(6), 0, 0), r"^bits: expected a bit-width in 1\.\.16, got 0"),
    (lambda op: op(torch.randn(6), 17, 0), r"^bits: expected a bit-width in 1\.\.16, got 17"),
    (
        lambda op: op(torch.randn(6), 4, 0, -1, "normal"),
        r'^dist: expected "gaussian" or "uniform", got "normal"',
    ),
    (lambda op: op(torch.randn(2, 3), 4, 0, 2), r"^axis: 2 is out of range for a tensor with 2 dimensions"),
    (lambda op: op(torch.randn(2, 3), 4, 0, -3), r"^axis: -3 is out of range for a tensor with 2 dimensions"),
]


@pytest.mark.parametrize("case", range(len(ERROR_CASES)))
def test_errors(case):
    call, message = ERROR_CASES[case]
    with pytest.raises(RuntimeError, match=message):
        call(OP)
    # The fake kernel raises the same, so torch.compile fails like eager.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with pytest.raises(RuntimeError, match=message.lstrip("^")), FakeTensorMode():
        call(OP)


# ---------------------------------------------------------------------------------------------
# CUDA (the Triton twins: tests/test_triton_twins.py)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "shape,axis", [(((1 << 20) + 3,), -1), ((16, 32, 33, 31), 1), ((7, 5, 3), -2), ((5, 300), 1)]
)
@pytest.mark.parametrize("dist", reference.NOISE_DISTS)
def test_cuda_matches_cpu(dtype, shape, axis, dist):
    x = (torch.randn(shape) * 3).to(dtype)
    y = OP(x.cuda(), 4, 77, axis, dist).cpu()
    expected = OP(x, 4, 77, axis, dist)
    if dtype == torch.float64:
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
    else:
        assert bits_equal(y, expected)


@pytest.mark.cuda
def test_cuda_non_contiguous_opcheck_and_triton():
    x = torch.randn(4, 6, 5, 7, device="cuda").transpose(1, 3)
    assert bits_equal(OP(x, 4, 3, 1).cpu(), OP(x.cpu(), 4, 3, 1))
    torch.library.opcheck(
        OP.default, (torch.randn(3, 5, device="cuda", requires_grad=True), 4, 1, 0, "gaussian")
    )
    import qops.triton.quant_noise  # noqa: F401

    big = torch.randn(1 << 20, device="cuda")
    assert bits_equal(torch.ops.qops_triton.quant_noise(big, 4, 9).cpu(), OP(big.cpu(), 4, 9))
    # Tracing into a triton_op needs a GPU: the interpreter would run the kernels on fake tensors.
    small = torch.randn(3, 5, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.qops_triton.quant_noise.default, (small, 4, 1, 0, "uniform"))
