"""torch.ops.qops.fake_quant / fake_quant_backward against torch's learnable fake-quantize built-ins
(qops/reference.py) and against an independent float32 specification written here in numpy.

Forward and grad_x must be bitwise equal to the built-in; grad_scale / grad_zero_point are sums and follow
the flash-attention rule against a float64 computation. The built-in's backward rounds two expressions with
an FMA when ATen runs its AVX2/AVX-512 kernels (docs/FAKE_QUANT.md); where ATen runs its DEFAULT kernels the
bitwise comparison of grad_x is made against the numpy specification only.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_examples import examples

import qops
from qops import reference

F32, F64 = np.float32, np.float64
EPS32 = float(np.finfo(F32).eps)
RANGES = [(0, 1), (-8, 7), (0, 255), (-128, 127), (-32768, 32767)]
# ATen's AVX2 / AVX-512 builds contract the backward's two roundings into FMAs (what qops implements).
BUILTIN_FMA = torch.backends.cpu.get_cpu_capability() != "DEFAULT"


def _supported_isas() -> list[str]:
    order = ["DEFAULT", "AVX2", "AVX512"]
    return order[: order.index(qops._C.max_cpu_isa()) + 1]


ISAS = _supported_isas()
# QOPS_HYPOTHESIS_EXAMPLES=5000 for a long fuzzing run.
HYPOTHESIS = settings(
    deadline=None,
    max_examples=examples(60),
    suppress_health_check=[HealthCheck.too_slow],
)


# ---------------------------------------------------------------------------------------------------------
# The specification in numpy: float32 arithmetic of the built-in, float64 sums for the reductions.


def fma32(a, b, c):
    """a * b + c rounded once to float32 (exact: the product is exact in float64, TwoSum keeps the error)."""
    a, b, c = (np.asarray(v, F32).astype(F64) for v in np.broadcast_arrays(a, b, c))
    p = a * b
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)
    r = s.astype(F32)
    r64 = r.astype(F64)
    other = np.nextafter(r, np.where(s > r64, F32(np.inf), F32(-np.inf)).astype(F32))
    midpoint = (s != r64) & (np.abs(s - r64) == np.abs(other.astype(F64) - s))
    toward_other = midpoint & (err != 0) & ((err > 0) == (other > r))
    return np.where(toward_other, other, r).astype(F32)


def _bcast(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """v shaped to broadcast along axis (-1: per tensor; other negative axes count from the end)."""
    if axis == -1:
        return v.reshape(())
    axis %= ndim
    return v.reshape([-1 if d == axis else 1 for d in range(ndim)])


def _zp_forward(zp, qmin, qmax):
    return np.clip(np.rint(zp), qmin, qmax).astype(F32)


def _zp_backward(zp, qmin, qmax, per_channel):
    if per_channel:
        return _zp_forward(zp, qmin, qmax)
    return np.trunc(np.clip((zp.astype(F32) + F32(0.5)).astype(F32), qmin, qmax)).astype(F32)


def spec_forward(x, scale, zp, axis, qmin, qmax):
    s = _bcast(scale.astype(F32), x.ndim, axis)
    inv = (F32(1) / s).astype(F32)
    z = _bcast(_zp_forward(zp, qmin, qmax), x.ndim, axis)
    q = (np.rint((x * inv).astype(F32)) + z).astype(F32)
    q = np.where(q >= qmin, q, F32(qmin))
    q = np.where(q > qmax, F32(qmax), q)
    return ((q - z) * s).astype(F32)


def spec_backward(dy, x, scale, zp, axis, qmin, qmax, grad_factor):
    """grad_x (float32, exact) and float64 grad_scale, grad_zero_point with the sums of |terms|."""
    s = _bcast(scale.astype(F32), x.ndim, axis)
    inv = (F32(1) / s).astype(F32)
    z = _bcast(_zp_backward(zp, qmin, qmax, axis != -1), x.ndim, axis)
    q = np.rint(fma32(x, inv, z))
    at_least_min = q >= qmin
    above = q > qmax
    inside = at_least_min & ~above
    dx = (dy * inside.astype(F32)).astype(F32)
    gf = F64(F32(grad_factor))
    dy64, s64, inv64, z64 = dy.astype(F64), s.astype(F64), inv.astype(F64), z.astype(F64)
    y_minus_x = (q.astype(F64) - z64) * s64 - x.astype(F64)
    t_scale = np.where(inside, dy64 * y_minus_x * inv64, 0.0)
    t_scale = (
        t_scale + np.where(at_least_min, 0.0, dy64 * (qmin - z64)) + np.where(above, dy64 * (qmax - z64), 0.0)
    )
    t_zp = np.where(inside, 0.0, -dy64 * s64)
    t_scale, t_zp = t_scale * gf, t_zp * gf
    dims = tuple(d for d in range(x.ndim) if d != axis % x.ndim) if axis != -1 else tuple(range(x.ndim))

    def reduce(t):
        return np.broadcast_to(t, x.shape).sum(axis=dims).reshape(-1)

    return dx, (reduce(t_scale), reduce(np.abs(t_scale))), (reduce(t_zp), reduce(np.abs(t_zp)))


def assert_flash(ours: torch.Tensor, builtin: torch.Tensor, ref: tuple[np.ndarray, np.ndarray], what: str):
    """Flash-attention rule: |ours - ref64| <= 2 |float32 reference - ref64| (+ 2 ulp of sum |terms|)."""
    exact, abs_sum = ref
    ours64 = ours.detach().double().reshape(-1).numpy()
    builtin64 = builtin.detach().double().reshape(-1).numpy()
    err_ours = np.abs(ours64 - exact)
    err_builtin = np.abs(builtin64 - exact)
    bound = 2 * err_builtin + 2 * EPS32 * abs_sum + 1e-30
    bad = err_ours > bound
    assert not bad.any(), (
        f"{what}: {bad.sum()} channels beyond the flash-attention bound, e.g. ours={ours64[bad][:3]} "
        f"builtin={builtin64[bad][:3]} float64={exact[bad][:3]}"
    )


def assert_bitwise(a: torch.Tensor, b, what: str, signed_zeros: bool = True):
    """Equal bit for bit (NaNs included); signed_zeros=False lets -0.0 equal 0.0 (sums start from +0.0)."""
    b = torch.as_tensor(b)
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    a32, b32 = a.detach().float().contiguous(), b.detach().float().contiguous()
    same = a32.view(torch.int32) == b32.view(torch.int32)
    if not signed_zeros:
        same |= (a32 == 0) & (b32 == 0)
    if not bool(same.all()):
        idx = (~same).nonzero()[:3].tolist()
        raise AssertionError(
            f"{what}: {int((~same).sum())} elements differ, e.g. at {idx}: {a32[~same][:3]} vs {b32[~same][:3]}"
        )


# ---------------------------------------------------------------------------------------------------------
# Inputs: ties at k + 0.5 steps, values around them, far outside the range; zero points with fractions.


def make_case(seed, shape, axis, qrange, grad_factor=1.0, pow2_scale=False):
    rng = np.random.default_rng(seed)
    qmin, qmax = qrange
    channels = 1 if axis == -1 else shape[axis]
    if pow2_scale:
        scale = (2.0 ** rng.integers(-8, 3, channels)).astype(F32)
    else:
        scale = np.exp(rng.uniform(np.log(1e-3), np.log(4.0), channels)).astype(F32)
    zp = rng.choice([0.0, 0.25, 0.5, 0.75], channels) + rng.integers(qmin - 2, qmax + 3, channels)
    # integers too, negative ones included
    zp = np.where(rng.random(channels) < 0.2, np.round(zp), zp).astype(F32)
    n = int(np.prod(shape))
    s = np.broadcast_to(_bcast(scale, len(shape), axis), shape).reshape(-1)
    z = np.broadcast_to(_bcast(np.rint(zp), len(shape), axis), shape).reshape(-1)
    span = min(qmax - qmin, 600)
    k = rng.integers(-span // 2 - 3, span // 2 + 4, n) + np.clip(np.round((qmin + qmax) / 2), -1e9, 1e9) - z
    kind = rng.integers(0, 5, n)
    ties = ((k + 0.5) * s).astype(F32)
    x = np.where(kind == 0, ties, 0)
    x = np.where(kind == 1, np.nextafter(ties, F32(np.inf)), x)
    x = np.where(kind == 2, np.nextafter(ties, F32(-np.inf)), x)
    x = np.where(kind == 3, (k + rng.uniform(-0.5, 0.5, n)) * s, x)
    x = np.where(kind == 4, rng.normal(0, 2 * span + 1, n) * s, x)
    x = x.astype(F32).reshape(shape)
    dy = rng.normal(0, 1, shape).astype(F32)
    return dict(x=x, dy=dy, scale=scale, zp=zp, axis=axis, qmin=qmin, qmax=qmax, grad_factor=grad_factor)


def run_qops(case, x=None, dy=None, op_ns=None):
    ops = op_ns or torch.ops.qops
    x = torch.from_numpy(case["x"]) if x is None else x
    dy = torch.from_numpy(case["dy"]) if dy is None else dy
    s, z = torch.from_numpy(case["scale"]), torch.from_numpy(case["zp"])
    args = (case["axis"], case["qmin"], case["qmax"], case["grad_factor"])
    y = ops.fake_quant(x, s, z, *args)
    grads = ops.fake_quant_backward(dy, x, s, z, *args)
    return y, grads


def check_case(case, y, grads):
    """y and grads (any device, any layout) against the built-in and the specification."""
    x, dy = torch.from_numpy(case["x"]), torch.from_numpy(case["dy"])
    s, z = torch.from_numpy(case["scale"]), torch.from_numpy(case["zp"])
    args = (case["axis"], case["qmin"], case["qmax"], case["grad_factor"])
    y_ref = reference.fake_quant(x, s, z, *args)
    dx_ref, ds_ref, dz_ref = reference.fake_quant_backward(dy, x, s, z, *args)
    spec_y = spec_forward(case["x"], case["scale"], case["zp"], case["axis"], case["qmin"], case["qmax"])
    spec_dx, spec_ds, spec_dz = spec_backward(
        case["dy"],
        case["x"],
        case["scale"],
        case["zp"],
        case["axis"],
        case["qmin"],
        case["qmax"],
        case["grad_factor"],
    )
    y, (dx, ds, dz) = y.cpu(), (g.cpu() for g in grads)
    assert_bitwise(y, y_ref, "forward vs built-in")
    assert_bitwise(y, spec_y, "forward vs spec")
    assert_bitwise(dx, spec_dx, "grad_x vs spec")
    if BUILTIN_FMA:
        assert_bitwise(dx, dx_ref, "grad_x vs built-in")
    assert ds.shape == s.shape and dz.shape == z.shape
    assert_flash(ds, ds_ref, spec_ds, "grad_scale")
    assert_flash(dz, dz_ref, spec_dz, "grad_zero_point")


@st.composite
def cases(draw, max_numel=3000):
    ndim = draw(st.integers(1, 5))
    shape = draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim))
    while int(np.prod(shape)) > max_numel:
        shape[int(np.argmax(shape))] //= 2
    axis = draw(st.sampled_from([-1] + list(range(-ndim, ndim))))
    qrange = draw(st.sampled_from(RANGES))
    grad_factor = draw(st.sampled_from([1.0, 0.5, 1 / 3, 0.01]))
    pow2 = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    return make_case(seed, tuple(shape), axis, qrange, grad_factor, pow2)


# ---------------------------------------------------------------------------------------------------------
# CPU


@HYPOTHESIS
@given(case=cases())
def test_cpu_matches_builtin_and_spec(case):
    check_case(case, *run_qops(case))


@pytest.mark.parametrize("qrange", RANGES)
@pytest.mark.parametrize("axis", [-1, 0, 1, 3])
def test_cpu_larger_tensors_all_ranges(qrange, axis):
    """Sizes that fill several tasks, blocks and flushes of the CPU kernels (long rows, last axis)."""
    case = make_case(hash((qrange, axis)) % 2**32, (3, 37, 21, 40), axis, qrange, grad_factor=0.3)
    check_case(case, *run_qops(case))


@pytest.mark.parametrize(
    "shape,axis",
    [
        ((2, 3), 1),
        ((5000, 3), 1),
        ((7, 2, 3), 2),
        ((40000,), 0),
        ((3, 70000), -1),
        ((64, 1100), 1),
        ((2, 5, 1), 1),
    ],
)
def test_cpu_task_grids(shape, axis):
    """Row mode with tails and tiles, short and long segments, one element per channel."""
    case = make_case(sum(shape) + axis, shape, axis, (-128, 127), pow2_scale=True)
    check_case(case, *run_qops(case))


def test_range_without_zero_against_spec():
    """The built-in backward wants quant_min <= 0 <= quant_max; ours does not: checked against the spec."""
    case = make_case(9, (5, 7, 11), 1, (2, 9), grad_factor=0.5)
    y, (dx, ds, dz) = run_qops(case)
    args = (case["scale"], case["zp"], case["axis"], 2, 9)
    assert_bitwise(y, spec_forward(case["x"], *args), "forward")
    spec_dx, spec_ds, spec_dz = spec_backward(case["dy"], case["x"], *args, 0.5)
    assert_bitwise(dx, spec_dx, "grad_x")
    for ours, (exact, abs_sum) in ((ds, spec_ds), (dz, spec_dz)):
        assert np.all(np.abs(ours.double().numpy() - exact) <= 4 * EPS32 * abs_sum + 1e-30)


def test_non_finite_inputs():
    """NaN counts as below the range (like the built-in on x86); +-inf saturate (docs/FAKE_QUANT.md)."""
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.3])
    s, z = torch.tensor([0.5]), torch.tensor([1.0])
    y = torch.ops.qops.fake_quant(x, s, z, -1, -8, 7)
    assert y.tolist() == [-4.5, 3.0, -4.5, 3.0, -4.5, 0.5]
    dx, ds, dz = torch.ops.qops.fake_quant_backward(torch.ones(6), x, s, z, -1, -8, 7)
    assert dx.tolist() == [0, 0, 0, 0, 0, 1]
    # below: NaN, -inf, -1e30 -> 3 * (-8 - 1); above: inf, 1e30 -> 2 * (7 - 1); inside: (0.5 - 0.3) / 0.5
    assert ds.item() == pytest.approx(-27 + 12 + 0.4, rel=1e-6)
    assert dz.item() == -5 * 0.5


def _layouts(x: torch.Tensor):
    """(name, tensor with x's values in another memory layout)."""
    yield "transposed", x.transpose(0, -1).contiguous().transpose(0, -1)
    yield "sliced", torch.cat([x, x], dim=-1)[..., : x.shape[-1]]
    yield "strided", torch.stack([x, x], dim=0)[1]
    if x.dim() == 4:
        yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    yield "expanded_copy", x.unsqueeze(0).expand(2, *x.shape)[1]


@pytest.mark.parametrize("axis", [-1, 0, 1, 2, 3])
def test_cpu_non_contiguous_inputs(axis):
    case = make_case(11 + axis, (3, 6, 5, 4), axis, (-8, 7), grad_factor=0.7)
    x, dy = torch.from_numpy(case["x"]), torch.from_numpy(case["dy"])
    for (name, xl), (_, dyl) in zip(_layouts(x), _layouts(dy), strict=True):
        y, grads = run_qops(case, x=xl, dy=dyl)
        assert y.stride() == torch.empty_like(xl).stride(), name
        assert grads[0].stride() == torch.empty_like(xl).stride(), name
        check_case(case, y, grads)
    # grad in another layout than x
    y, grads = run_qops(
        case,
        x=x.contiguous(memory_format=torch.channels_last),
        dy=dy.transpose(1, 2).contiguous().transpose(1, 2),
    )
    check_case(case, y, grads)


@pytest.mark.parametrize("shape,axis", [((0,), -1), ((0, 3), 1), ((4, 0, 2), 0), ((4, 0, 2), 2), ((0,), 0)])
def test_empty_tensors(shape, axis):
    x = torch.empty(shape)
    channels = 1 if axis == -1 else shape[axis]
    s, z = torch.full((channels,), 0.5), torch.ones(channels)
    y = torch.ops.qops.fake_quant(x, s, z, axis, -8, 7)
    assert y.shape == x.shape
    dx, ds, dz = torch.ops.qops.fake_quant_backward(x, x, s, z, axis, -8, 7)
    assert (
        dx.shape == x.shape and torch.equal(ds, torch.zeros_like(s)) and torch.equal(dz, torch.zeros_like(z))
    )


def test_scalar_tensor_and_scale_shapes():
    x = torch.tensor(0.73)
    y = torch.ops.qops.fake_quant(x, torch.tensor(0.25), torch.tensor(1.0), -1, 0, 255)
    assert y.shape == () and y.item() == 0.75
    dx, ds, dz = torch.ops.qops.fake_quant_backward(
        torch.tensor(1.0), x, torch.tensor(0.25), torch.tensor(1.0), -1, 0, 255
    )
    assert ds.shape == () and dz.shape == ()
    # scale given as [C, 1]: gradients keep that shape
    x = torch.randn(4, 3)
    _, ds, dz = torch.ops.qops.fake_quant_backward(x, x, torch.full((4, 1), 0.1), torch.zeros(4, 1), 0, -8, 7)
    assert ds.shape == (4, 1) and dz.shape == (4, 1)


@pytest.mark.parametrize("axis", [-1, 1, 3])
def test_cpu_isas_give_identical_results(axis):
    """Every output, the reductions included, is bitwise the same on every compiled ISA."""
    case = make_case(5 + axis, (4, 33, 9, 26), axis, (0, 255), grad_factor=0.1)
    best = qops._C.max_cpu_isa()
    outs = {}
    try:
        for isa in ISAS:
            qops.set_cpu_isa(isa)
            y, grads = run_qops(case)
            outs[isa] = (y, *grads)
    finally:
        qops.set_cpu_isa(best)
    first = outs[ISAS[0]]
    for isa in ISAS[1:]:
        for a, b, what in zip(
            first, outs[isa], ["y", "grad_x", "grad_scale", "grad_zero_point"], strict=True
        ):
            assert_bitwise(b, a, f"{isa} vs {ISAS[0]}: {what}")
    check_case(case, outs[ISAS[-1]][0], outs[ISAS[-1]][1:])


def test_cpu_results_do_not_depend_on_thread_count():
    case = make_case(3, (8, 16, 64, 64), 1, (-128, 127))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_qops(case)
    finally:
        torch.set_num_threads(threads)
    many = run_qops(case)
    assert_bitwise(many[0], one[0], "y")
    for a, b in zip(many[1], one[1], strict=True):
        assert_bitwise(a, b, "grads")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("axis", [-1, 1])
def test_cpu_reduced_precision_inputs_compute_in_float32(dtype, axis):
    case = make_case(21, (3, 20, 7), axis, (-128, 127))
    x = torch.from_numpy(case["x"]).to(dtype)
    dy = torch.from_numpy(case["dy"]).to(dtype)
    case.update(x=x.float().numpy(), dy=dy.float().numpy())
    y, (dx, ds, dz) = run_qops(case, x=x, dy=dy)
    assert y.dtype == dtype and dx.dtype == dtype
    y32, (dx32, ds32, dz32) = run_qops(case)  # the same values in float32
    assert_bitwise(y, y32.to(dtype), "y")
    assert_bitwise(dx, dx32.to(dtype), "grad_x")
    assert_bitwise(ds, ds32, "grad_scale")
    assert_bitwise(dz, dz32, "grad_zero_point")


def test_scale_and_zero_point_dtypes_are_kept():
    x = torch.randn(5, 4)
    s, z = torch.full((4,), 0.125, dtype=torch.float64), torch.zeros(4, dtype=torch.float16)
    dx, ds, dz = torch.ops.qops.fake_quant_backward(x, x, s, z, 1, -8, 7)
    assert ds.dtype == torch.float64 and dz.dtype == torch.float16


# ---------------------------------------------------------------------------------------------------------
# Python face: autograd, opcheck, torch.compile


@pytest.mark.parametrize("axis", [-1, 0, 2])
def test_autograd_matches_builtin(axis):
    case = make_case(7, (4, 6, 9), axis, (-8, 7), grad_factor=0.25)
    x = torch.from_numpy(case["x"]).requires_grad_()
    s = torch.from_numpy(case["scale"]).requires_grad_()
    z = torch.from_numpy(case["zp"]).requires_grad_()
    dy = torch.from_numpy(case["dy"])
    y = qops.fake_quant(x, s, z, axis, -8, 7, 0.25)
    gx, gs, gz = torch.autograd.grad(y, (x, s, z), dy)
    xb, sb, zb = (t.detach().clone().requires_grad_() for t in (x, s, z))
    if axis == -1:
        yb = torch._fake_quantize_learnable_per_tensor_affine(xb, sb, zb, -8, 7, 0.25)
    else:
        yb = torch._fake_quantize_learnable_per_channel_affine(xb, sb, zb, axis, -8, 7, 0.25)
    bx, bs, bz = torch.autograd.grad(yb, (xb, sb, zb), dy)
    assert_bitwise(y, yb, "y")
    if BUILTIN_FMA:
        assert_bitwise(gx, bx, "grad_x")
    torch.testing.assert_close(gs, bs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gz, bz, rtol=1e-5, atol=1e-5)


OPCHECK_CASES = [((5, 4), -1), ((3, 4, 5), 1), ((3, 4, 5), 2), ((2, 3, 4, 5), -3), ((6,), 0)]


@pytest.mark.parametrize("shape,axis", OPCHECK_CASES)
def test_opcheck_fake_quant(shape, axis):
    x = torch.randn(shape) * 3
    channels = 1 if axis == -1 else shape[axis]
    s = (torch.rand(channels) + 0.1).requires_grad_()
    z = (torch.randn(channels) * 2).requires_grad_()
    for xi in (
        x.requires_grad_(),
        x.detach().transpose(0, -1).contiguous().transpose(0, -1).requires_grad_(),
    ):
        torch.library.opcheck(torch.ops.qops.fake_quant.default, (xi, s, z, axis, -8, 7, 0.5))


@pytest.mark.parametrize("shape,axis", OPCHECK_CASES)
def test_opcheck_fake_quant_backward(shape, axis):
    x = torch.randn(shape) * 3
    channels = 1 if axis == -1 else shape[axis]
    s, z = torch.rand(channels) + 0.1, torch.randn(channels) * 2
    for g in (torch.randn(shape), torch.randn(shape).transpose(0, -1).contiguous().transpose(0, -1)):
        torch.library.opcheck(torch.ops.qops.fake_quant_backward.default, (g, x, s, z, axis, 0, 15, 2.0))


@pytest.mark.parametrize("axis", [-1, 1])
def test_double_backward_raises(axis):
    """torch's built-in raises here too (autograd would otherwise take the backward op for a constant: zeros)."""
    x = torch.randn(3, 4, requires_grad=True)
    channels = 1 if axis == -1 else 4
    s = torch.full((channels,), 0.1, requires_grad=True)
    y = qops.fake_quant(x, s, torch.zeros(channels), axis, -8, 7)
    (gx,) = torch.autograd.grad((y * y).sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="fake_quant: does not support double backward"):
        torch.autograd.grad(gx.sum(), [x])


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def lsq_layer(x, s, z):
        return (qops.fake_quant(x, s, z, 1, -8, 7, 0.5) * 2.0).sum()

    compiled = torch.compile(lsq_layer, fullgraph=True, backend="aot_eager")
    x = (torch.randn(2, 8, 5, 5) * 3).requires_grad_()
    s = (torch.rand(8) + 0.1).requires_grad_()
    z = torch.zeros(8).requires_grad_()
    out = compiled(x, s, z)
    grads = torch.autograd.grad(out, (x, s, z))
    out_e = lsq_layer(x, s, z)
    grads_e = torch.autograd.grad(out_e, (x, s, z))
    assert torch.equal(out, out_e)
    for a, b in zip(grads, grads_e, strict=True):
        assert torch.equal(a, b)


def test_torch_compile_inductor():
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, s, z: qops.fake_quant(x, s, z, -1, 0, 255) + 1, fullgraph=True)
    x, s, z = torch.randn(64, 32), torch.tensor([0.02]), torch.tensor([128.0])
    assert torch.equal(compiled(x, s, z), qops.fake_quant(x, s, z, -1, 0, 255) + 1)


# ---------------------------------------------------------------------------------------------------------
# Errors: each documented check raises RuntimeError naming the argument, nothing crashes.


def _error_cases():
    x, s, z = torch.randn(4, 3), torch.tensor([0.1]), torch.tensor([0.0])
    sc, zc = torch.full((3,), 0.1), torch.zeros(3)
    fq = torch.ops.qops.fake_quant
    bw = torch.ops.qops.fake_quant_backward
    return [
        ("x int", lambda: fq(torch.ones(4, 3, dtype=torch.int32), s, z, -1, 0, 255), "x: expected a float32"),
        ("x double", lambda: fq(x.double(), s, z, -1, 0, 255), "x: expected a float32"),
        ("scale zero", lambda: fq(x, torch.tensor([0.0]), z, -1, 0, 255), "scale: expected positive"),
        (
            "scale negative",
            lambda: fq(x, torch.tensor([-1.0, 0.1, 0.1]), zc, 1, 0, 255),
            "scale: expected positive",
        ),
        ("scale nan", lambda: fq(x, torch.tensor([float("nan")]), z, -1, 0, 255), "scale: expected positive"),
        (
            "scale inf",
            lambda: bw(x, x, torch.tensor([float("inf")]), z, -1, 0, 255),
            "scale: expected positive",
        ),
        ("scale numel per tensor", lambda: fq(x, sc, z, -1, 0, 255), "scale: expected 1 element"),
        ("scale numel per channel", lambda: fq(x, s, zc, 1, 0, 255), "scale: expected 3 elements"),
        ("scale int", lambda: fq(x, torch.tensor([1]), z, -1, 0, 255), "scale: expected a floating-point"),
        (
            "zero_point nan",
            lambda: fq(x, s, torch.tensor([float("nan")]), -1, 0, 255),
            "zero_point: expected finite",
        ),
        (
            "zero_point inf",
            lambda: bw(x, x, sc, torch.tensor([0, float("inf"), 0]), 1, 0, 255),
            "zero_point: expected finite",
        ),
        ("zero_point numel", lambda: fq(x, sc, z, 1, 0, 255), "zero_point: expected 3 elements"),
        ("zero_point numel per tensor", lambda: fq(x, s, zc, -1, 0, 255), "zero_point: expected 1 element"),
        ("axis too big", lambda: fq(x, sc, zc, 2, 0, 255), "axis: 2 is out of range"),
        ("axis too small", lambda: fq(x, sc, zc, -3, 0, 255), "axis: -3 is out of range"),
        ("axis on a scalar", lambda: fq(torch.tensor(1.0), s, z, 0, 0, 255), "axis: 0 is out of range"),
        ("qmin == qmax", lambda: fq(x, s, z, -1, 3, 3), "quant_min: expected quant_min < quant_max"),
        ("qmin > qmax", lambda: bw(x, x, s, z, -1, 255, 0), "quant_min: expected quant_min < quant_max"),
        ("qmin huge", lambda: fq(x, s, z, -1, -(2**40), 0), "quant_min: expected a value in"),
        ("qmax huge", lambda: fq(x, s, z, -1, 0, 2**31), "quant_max: expected a value in"),
        ("grad shape", lambda: bw(torch.randn(3, 4), x, s, z, -1, 0, 255), "grad: expected shape"),
        ("grad dtype", lambda: bw(x.half(), x, s, z, -1, 0, 255), "grad: expected dtype"),
        ("scale device", lambda: fq(x, s.to("meta"), z, -1, 0, 255), "scale"),
        ("grad device", lambda: bw(x.to("meta"), x, s, z, -1, 0, 255), "grad"),
    ]


@pytest.mark.parametrize("name,call,match", _error_cases(), ids=[c[0] for c in _error_cases()])
def test_errors_raise_runtime_error(name, call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


@pytest.mark.parametrize("name,call,match", _error_cases(), ids=[c[0] for c in _error_cases()])
def test_fake_kernels_raise_the_same_errors(name, call, match):
    """Under fake tensors (torch.compile, meta) the fake kernels check what the kernels check, except values."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        if (
            "expected positive" in match or "expected finite" in match
        ):  # values: a fake kernel cannot read them
            call()
            return
        with pytest.raises(RuntimeError, match=match):
            call()


# ---------------------------------------------------------------------------------------------------------
# The shared element math (csrc/include/qops/fake_quant_math.h) compiled on its own, element by element.

_MATH_CAPI = r"""
#include "qops/fake_quant_math.h"
extern "C" void fq_math_forward(const float* x, const float* s, const float* zp, long n, long qmin, long qmax,
                                float* y) {
  for (long i = 0; i < n; ++i) {
    const float z = qops::fq_zero_point_forward(zp[i], qmin, qmax);
    y[i] = qops::fq_forward(x[i], s[i], 1.0f / s[i], z, (float)qmin, (float)qmax);
  }
}
extern "C" void fq_math_backward(const float* x, const float* dy, const float* s, const float* zp, long n,
                                 long qmin, long qmax, float gf, int per_channel, float* out) {
  for (long i = 0; i < n; ++i) {
    const float z = qops::fq_zero_point_backward_for(per_channel != 0, zp[i], qmin, qmax);
    const qops::FqGrad g = qops::fq_backward(x[i], dy[i], s[i], 1.0f / s[i], z, (float)qmin, (float)qmax, gf);
    out[3 * i] = g.dx;
    out[3 * i + 1] = g.dscale;
    out[3 * i + 2] = g.dzp;
  }
}
"""


def _build_math_lib(tmp_path, flags):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "fq_math.cpp"
    src.write_text(_MATH_CAPI)
    lib = tmp_path / f"fq_math{abs(hash(tuple(flags)))}.so"
    include = os.path.join(os.path.dirname(os.path.dirname(__file__)), "csrc", "include")
    subprocess.run(
        [cxx, "-O2", "-shared", "-fPIC", *flags, "-I", include, str(src), "-o", str(lib)], check=True
    )
    return ctypes.CDLL(str(lib))


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


@pytest.mark.parametrize("flags", [[], ["-march=haswell"]], ids=["baseline", "fma-target"])
def test_shared_math_header_matches_builtin_elementwise(tmp_path, flags):
    """fq_forward / fq_backward per element against the built-ins, over every range, ties at k + 0.5 steps,
    fractional and negative zero points, clamping and grad_factor; each element is its own channel so the
    built-in's per-channel sum is that element's gradient. Also compiled for an FMA target (contraction must
    not change anything)."""
    if flags and not qops.cpu_features()["fma"]:
        pytest.skip("CPU without FMA")
    lib = _build_math_lib(tmp_path, flags)
    for i, (qrange, gf) in enumerate(itertools.product(RANGES, [1.0, 0.37])):
        case = make_case(100 + i, (20000,), 0, qrange, grad_factor=gf, pow2_scale=i % 2 == 0)
        x, dy, s, zp = case["x"], case["dy"], case["scale"], case["zp"]
        n, (qmin, qmax) = x.size, qrange
        y = np.empty(n, F32)
        lib.fq_math_forward(
            _ptr(x), _ptr(s), _ptr(zp), ctypes.c_long(n), ctypes.c_long(qmin), ctypes.c_long(qmax), _ptr(y)
        )
        xt, st_, zt = torch.from_numpy(x), torch.from_numpy(s), torch.from_numpy(zp)
        assert_bitwise(
            torch.from_numpy(y),
            torch._fake_quantize_learnable_per_channel_affine(xt, st_, zt, 0, qmin, qmax, gf),
            "fq_forward",
        )
        assert_bitwise(torch.from_numpy(y), spec_forward(x, s, zp, 0, qmin, qmax), "fq_forward vs spec")
        for per_channel in (1, 0):
            out = np.empty((n, 3), F32)
            lib.fq_math_backward(
                _ptr(x), _ptr(dy), _ptr(s), _ptr(zp), ctypes.c_long(n), ctypes.c_long(qmin), ctypes.c_long(qmax),
                ctypes.c_float(gf), ctypes.c_int(per_channel), _ptr(out),
            )  # fmt: skip
            if per_channel:
                dx_b, ds_b, dz_b = torch.ops.aten._fake_quantize_learnable_per_channel_affine_backward(
                    torch.from_numpy(dy)[:, None], xt[:, None], st_, zt, 0, qmin, qmax, gf
                )
            else:  # per tensor: one element at a time is too slow; check on 300 elements
                idx = np.arange(0, n, n // 300)
                res = [
                    torch.ops.aten._fake_quantize_learnable_per_tensor_affine_backward(
                        torch.from_numpy(dy[j : j + 1]),
                        xt[j : j + 1],
                        st_[j : j + 1],
                        zt[j : j + 1],
                        qmin,
                        qmax,
                        gf,
                    )
                    for j in idx
                ]
                out = out[idx]
                dx_b, ds_b, dz_b = (torch.cat([r[k] for r in res]) for k in range(3))
            if BUILTIN_FMA:
                assert_bitwise(
                    torch.from_numpy(out[:, 0].copy()),
                    dx_b.reshape(-1),
                    f"fq_backward dx per_channel={per_channel}",
                )
                assert_bitwise(
                    torch.from_numpy(out[:, 1].copy()),
                    ds_b.reshape(-1),
                    f"fq_backward dscale per_channel={per_channel}",
                    False,
                )
                assert_bitwise(
                    torch.from_numpy(out[:, 2].copy()),
                    dz_b.reshape(-1),
                    f"fq_backward dzp per_channel={per_channel}",
                    False,
                )


# ---------------------------------------------------------------------------------------------------------
# CUDA (the Triton twins: tests/test_triton_twins.py)


@pytest.mark.cuda
@pytest.mark.parametrize("axis", [-1, 0, 1, 3])
@pytest.mark.parametrize("qrange", [(-8, 7), (0, 255), (-32768, 32767)])
def test_cuda_matches_builtin(axis, qrange):
    case = make_case(41 + axis, (4, 33, 17, 24), axis, qrange, grad_factor=0.5)
    x, dy = torch.from_numpy(case["x"]).cuda(), torch.from_numpy(case["dy"]).cuda()
    y, grads = run_qops(case, x=x, dy=dy)
    assert y.is_cuda and all(g.is_cuda for g in grads)
    check_case(case, y, grads)
    # against the CUDA built-in on the same GPU
    s, z = torch.from_numpy(case["scale"]).cuda(), torch.from_numpy(case["zp"]).cuda()
    assert_bitwise(
        y.cpu(), reference.fake_quant(x, s, z, axis, *qrange, 0.5).cpu(), "forward vs CUDA built-in"
    )
    for _name, xl in _layouts(x):
        y2, grads2 = run_qops(case, x=xl, dy=dy)
        check_case(case, y2, grads2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_reduced_precision(dtype):
    case = make_case(5, (4, 32, 16, 16), 1, (-128, 127))
    x, dy = torch.from_numpy(case["x"]).to("cuda", dtype), torch.from_numpy(case["dy"]).to("cuda", dtype)
    y, grads = run_qops(case, x=x, dy=dy)
    y_cpu, grads_cpu = run_qops(case, x=x.cpu(), dy=dy.cpu())
    assert_bitwise(y.cpu(), y_cpu, "y")
    assert_bitwise(grads[0].cpu(), grads_cpu[0], "grad_x")
    torch.testing.assert_close(grads[1].cpu(), grads_cpu[1], rtol=1e-5, atol=1e-4)


@pytest.mark.cuda
def test_cuda_autograd_compile_and_opcheck():
    x = (torch.randn(2, 8, 5, 5, device="cuda") * 3).requires_grad_()
    s = (torch.rand(8, device="cuda") + 0.1).requires_grad_()
    z = torch.zeros(8, device="cuda").requires_grad_()
    torch.library.opcheck(torch.ops.qops.fake_quant.default, (x, s, z, 1, -8, 7, 0.5))
    torch.library.opcheck(
        torch.ops.qops.fake_quant_backward.default,
        (torch.randn_like(x), x.detach(), s.detach(), z.detach(), 1, -8, 7, 0.5),
    )
    compiled = torch.compile(lambda x, s, z: qops.fake_quant(x, s, z, 1, -8, 7, 0.5).sum(), fullgraph=True)
    g = torch.autograd.grad(compiled(x, s, z), (x, s, z))
    ge = torch.autograd.grad(qops.fake_quant(x, s, z, 1, -8, 7, 0.5).sum(), (x, s, z))
    for a, b in zip(g, ge, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
def test_cuda_errors_do_not_crash():
    x = torch.randn(4, 3, device="cuda")
    with pytest.raises(RuntimeError, match="scale"):
        torch.ops.qops.fake_quant(x, torch.tensor([0.1]), torch.tensor([0.0], device="cuda"), -1, 0, 255)
    with pytest.raises(RuntimeError, match="zero_point: expected 3"):
        torch.ops.qops.fake_quant(
            x, torch.full((3,), 0.1, device="cuda"), torch.zeros(2, device="cuda"), 1, 0, 255
        )
    # non-positive scale: no host sync to check it, NaN out
    y = torch.ops.qops.fake_quant(
        x, torch.tensor([-1.0], device="cuda"), torch.tensor([0.0], device="cuda"), -1, 0, 255
    )
    assert torch.isnan(y).all()
