"""torch.ops.qops.mixed_quant_conv against qops.reference (the per-term loop with torch's LSQ fake quantize):
values, every gradient, every conv-group plan, both input layouts, each CPU ISA, opcheck, torch.compile,
the nn module, and every documented error."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_examples import examples

import qops
from qops.mixed_quant_conv import MixedQuantConvSpec, mixed_quant_conv, op_args
from qops.nn import MixedQuantConv2d, alpha_parameters, weight_parameters
from qops.reference import mixed_quant_conv as reference

# (kh, kw, groups, dilation)
POOL = [
    (1, 1, 1, 1),
    (3, 3, 1, 1),
    (5, 5, 1, 1),
    (3, 1, 1, 1),
    (1, 3, 1, 1),
    (3, 3, 3, 1),
    (3, 3, 1, 2),
    (5, 3, 2, 1),
]
FWD_TOL, GRAD_TOL = 1e-4, 2e-3


def make_case(
    cands,
    w_bits,
    a_bits,
    *,
    cin=6,
    cout=6,
    n=2,
    h=7,
    w=9,
    a_signed=False,
    stride=1,
    bias=True,
    layout="nchw",
    seed=0,
):
    g = torch.Generator().manual_seed(seed)
    weights = [
        (0.3 * torch.randn(cout, cin // grp, kh, kw, generator=g)).requires_grad_()
        for kh, kw, grp, _ in cands
    ]
    probs = torch.rand(len(cands), len(w_bits), len(a_bits), generator=g).requires_grad_()
    w_scales = (0.02 + 0.05 * torch.rand(len(cands), len(w_bits), generator=g)).requires_grad_()
    a_scales = (0.05 + 0.1 * torch.rand(len(a_bits), generator=g)).requires_grad_()
    b = torch.randn(cout, generator=g).requires_grad_() if bias else None
    x = torch.randn(n, cin, h, w, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(n, cin, h, 2 * w, generator=g)[..., ::2]
    x.requires_grad_()
    spec = MixedQuantConvSpec(w_bits, a_bits, [c[2] for c in cands], [c[3] for c in cands], a_signed, stride)
    args = (x, weights, probs, w_scales, a_scales, b, spec)
    leaves = [x, *weights, probs, w_scales, a_scales] + ([b] if bias else [])
    return args, leaves


def with_spec(args, **changes):
    """args of make_case with spec fields replaced (mode, stride, ...)."""
    return (*args[:6], dataclasses.replace(args[6], **changes))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def check_against_reference(args, leaves, fn=mixed_quant_conv):
    y_ref = reference(*args)
    y = fn(*args)
    assert y.shape == y_ref.shape
    assert rel_err(y, y_ref) <= FWD_TOL
    gy = torch.randn_like(y_ref)
    # Full-precision entries leave their scales out of the reference's graph: their gradient is 0.
    grads_ref = torch.autograd.grad(y_ref, leaves, gy, allow_unused=True)
    grads_ref = [torch.zeros_like(t) if g is None else g for g, t in zip(grads_ref, leaves, strict=True)]
    grads = torch.autograd.grad(y, leaves, gy)
    for k, (a, b) in enumerate(zip(grads, grads_ref, strict=True)):
        assert a.shape == b.shape, k
        if b.abs().max() == 0:
            assert a.abs().max() == 0, k
        else:
            assert rel_err(a, b) <= GRAD_TOL, (k, rel_err(a, b))


@settings(max_examples=examples(30), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cand_idx=st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=4),
    w_bits=st.lists(st.sampled_from([0, 2, 3, 4, 8]), min_size=1, max_size=3),
    a_bits=st.lists(st.sampled_from([0, 2, 4, 5, 8]), min_size=1, max_size=3),
    a_signed=st.booleans(),
    stride=st.sampled_from([1, 2]),
    bias=st.booleans(),
    layout=st.sampled_from(["nchw", "channels_last", "strided"]),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(cand_idx, w_bits, a_bits, a_signed, stride, bias, layout, seed):
    cands = [POOL[k] for k in cand_idx]
    args, leaves = make_case(
        cands, w_bits, a_bits, a_signed=a_signed, stride=stride, bias=bias, layout=layout, seed=seed
    )
    check_against_reference(args, leaves)


@pytest.mark.parametrize("engine", ["auto", "onednn", "nnpack"])
@pytest.mark.parametrize("plan", ["auto", "merged", "split"])
@pytest.mark.parametrize(
    "cands",
    [
        [(1, 1, 1, 1), (3, 3, 1, 1), (5, 5, 1, 1), (3, 3, 3, 1)],  # QuantNAS basic space
        [(3, 1, 1, 1), (1, 3, 1, 1)],  # windows that do not nest
        [(3, 3, 1, 2), (3, 3, 1, 1), (3, 3, 3, 3)],  # dilated beside undilated
        [(3, 3, 3, 1), (5, 5, 6, 1)],  # grouped only: native grouped convolution
    ],
)
def test_every_plan_matches_reference(monkeypatch, engine, plan, cands):
    monkeypatch.setenv("QOPS_MQC_PLAN", plan)
    monkeypatch.setenv("QOPS_MQC_ENGINE", engine)
    # Stride 1 lets NNPACK take the dense groups; stride 2 is covered by the hypothesis test.
    args, leaves = make_case(cands, [4, 8], [4, 8], cin=12, cout=6, stride=1, seed=3)
    check_against_reference(args, leaves)


def count_convolutions(args) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.no_grad():
            mixed_quant_conv(*args)
    return sum(
        1 for e in prof.events() if e.name in ("aten::convolution", "aten::_nnpack_spatial_convolution")
    )


@pytest.mark.parametrize(
    "cands, convs",
    [
        ([(1, 1, 1, 1), (3, 3, 1, 1), (5, 5, 1, 1), (3, 3, 3, 1)], 1),  # the 5x5 covers the others: merge
        ([(1, 1, 1, 1), (7, 7, 1, 1)], 1),  # embedding the 1x1 in the 7x7 adds no multiply-adds
        ([(3, 1, 1, 1), (1, 3, 1, 1)], 2),  # 3 + 3 taps beat a 3x3 window with 48 channels
        ([(3, 3, 1, 4), (3, 3, 1, 1)], 2),  # a dilated 3x3 (9x9 window) stays native
    ],
)
def test_split_rule(cands, convs):
    args, _ = make_case(cands, [4, 8], [4, 8], cin=48, cout=48, n=1, h=10, w=10, seed=1)
    assert count_convolutions(args) == convs


def test_engine_choice(monkeypatch):
    """auto: NNPACK for a dense 5x5 window at stride 1 (where torch has NNPACK), oneDNN otherwise."""

    def engines(args):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            with torch.no_grad():
                mixed_quant_conv(*args)
        return {e.name for e in prof.events() if "convolution" in e.name and e.name.startswith("aten::")}

    five, _ = make_case([(5, 5, 1, 1), (3, 3, 3, 1)], [4], [4], seed=1)
    three, _ = make_case([(3, 3, 1, 1), (1, 1, 1, 1)], [4], [4], seed=1)
    strided, _ = make_case([(5, 5, 1, 1)], [4], [4], stride=2, seed=1)
    nnpack = "aten::_nnpack_spatial_convolution"
    assert (nnpack in engines(five)) == torch._nnpack_available()
    assert nnpack not in engines(three) and nnpack not in engines(strided)
    monkeypatch.setenv("QOPS_MQC_ENGINE", "onednn")
    assert nnpack not in engines(five)


@pytest.mark.parametrize("isa", ["DEFAULT", "AVX2", "AVX512"])
@pytest.mark.parametrize("engine", ["onednn", "nnpack"])  # xq channels-last / NCHW
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_each_isa(monkeypatch, isa, engine, layout):
    monkeypatch.setenv("QOPS_MQC_ENGINE", engine)
    if ["DEFAULT", "AVX2", "AVX512"].index(isa) > ["DEFAULT", "AVX2", "AVX512"].index(qops._C.max_cpu_isa()):
        pytest.skip(f"{isa} not supported here")
    best = qops._C.max_cpu_isa()
    try:
        qops.set_cpu_isa(isa)
        # 20 channels: full vectors and a tail for 8 and 16 lanes; 11 columns: a partial NCHW tile.
        args, leaves = make_case(POOL[:3], [0, 4], [3, 8], cin=20, cout=4, h=5, w=11, layout=layout, seed=7)
        check_against_reference(args, leaves)
    finally:
        qops.set_cpu_isa(best)


def test_quantnas_layer_shape_and_bits_tied():
    """The benchmark's layer on a small image: tied bits make half the terms exactly 0."""
    cands = [(1, 1, 1, 1), (3, 3, 1, 1), (5, 5, 1, 1), (3, 3, 3, 1)]
    args, leaves = make_case(cands, [4, 8], [4, 8], cin=36, cout=36, n=1, h=6, w=6, seed=2)
    with torch.no_grad():
        args[2].mul_(torch.eye(2).expand(4, 2, 2))
    check_against_reference(args, leaves)


@pytest.mark.parametrize("engine", ["onednn", "nnpack"])
def test_output_layout_follows_x_and_is_deterministic(monkeypatch, engine):
    monkeypatch.setenv("QOPS_MQC_ENGINE", engine)
    for layout in ("nchw", "channels_last"):
        args, _ = make_case(POOL[:3], [4, 8], [4, 8], seed=5, layout=layout)
        y1 = mixed_quant_conv(*args)
        y2 = mixed_quant_conv(*args)
        if layout == "channels_last":
            assert y1.is_contiguous(memory_format=torch.channels_last) and not y1.is_contiguous()
        else:
            assert y1.is_contiguous()
        assert torch.equal(y1, y2)


def test_channels_last_weights():
    """Candidate kernels in channels-last memory: same values, gradients in the kernels' layout."""
    args, leaves = make_case(POOL[:3], [4, 8], [4, 8], seed=9)
    cl = [w.detach().contiguous(memory_format=torch.channels_last).requires_grad_() for w in args[1]]
    args = (args[0], cl, *args[2:])
    leaves = [args[0], *cl, *leaves[1 + len(cl) :]]
    check_against_reference(args, leaves)
    y = mixed_quant_conv(*args)
    grads = torch.autograd.grad(y.sum(), cl)
    for g, w in zip(grads, cl, strict=True):
        assert g.stride() == w.stride()


def test_zero_batch():
    args, _ = make_case(POOL[:2], [4], [4], n=0, seed=0)
    y = mixed_quant_conv(*args)
    assert y.shape == (0, 6, 7, 9)


@pytest.mark.parametrize("h, w, stride", [(0, 9, 1), (7, 0, 2), (0, 0, 3)])
def test_input_without_rows_or_columns(h, w, stride):
    """An empty spatial axis gives an empty output and zero gradients (the engines themselves refuse such a
    convolution, with a message that names no argument)."""
    args, leaves = make_case(POOL[:3], [4, 8], [4, 8], h=h, w=w, stride=stride, seed=0)
    y = mixed_quant_conv(*args)
    assert y.shape == (2, 6, (h - 1) // stride + 1 if h else 0, (w - 1) // stride + 1 if w else 0)
    assert y.numel() == 0
    grads = torch.autograd.grad(y.sum(), leaves)
    for g, t in zip(grads, leaves, strict=True):
        assert g.shape == t.shape and not g.any()


@pytest.mark.parametrize("frozen_weights", [False, True])
def test_double_backward_raises(frozen_weights):
    args, leaves = make_case(POOL[:2], [4], [4], seed=0)
    if frozen_weights:
        for w in args[1]:
            w.requires_grad_(False)
    y = mixed_quant_conv(*args)
    (gx,) = torch.autograd.grad(y.sum(), [args[0]], create_graph=True)
    with pytest.raises(RuntimeError, match="mixed_quant_conv: does not support double backward"):
        gx.sum().backward()


@pytest.mark.parametrize("trainable", ["x", "probs", "scales", "nothing"])
def test_backward_with_frozen_weights(trainable):
    """No candidate weight requires grad (a frozen layer, post-training calibration): the weights' gradient
    is one None per weight, and the other gradients equal the reference's."""
    args, leaves = make_case(POOL[:3], [4, 8], [4, 8], seed=2)
    x, weights, probs, w_scales, a_scales = args[:5]
    wanted = {"x": [x], "probs": [probs], "scales": [w_scales, a_scales], "nothing": []}[trainable]
    for t in leaves:
        t.requires_grad_(any(t is u for u in wanted))
    y = mixed_quant_conv(*args)
    y_ref = reference(*args)
    if not wanted:
        assert not y.requires_grad
        return
    gy = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, wanted, gy)
    grads_ref = torch.autograd.grad(y_ref, wanted, gy)
    for a, b in zip(grads, grads_ref, strict=True):
        assert rel_err(a, b) <= GRAD_TOL


def test_frozen_module_backward():
    """A layer whose parameters are frozen still back-propagates to its input: the input's gradient of the
    trainable layer, and no parameter gets one."""
    torch.manual_seed(0)
    layer = MixedQuantConv2d(4, 4, BASIC[:3], w_bits=(4, 8), a_bits=(4, 8))
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    layer(x).sum().backward()
    expected = x.grad.clone()
    x.grad = None
    layer.zero_grad(set_to_none=True)
    layer.requires_grad_(False)
    layer(x).sum().backward()
    assert x.grad.abs().sum() > 0 and torch.equal(x.grad, expected)
    assert all(p.grad is None for p in layer.parameters())


def test_backward_output_mask_skips_unneeded():
    args, _ = make_case(POOL[:2], [4], [4], seed=0)
    probs = args[2]
    y = mixed_quant_conv(*args)
    mask = [False, False, True, False, False, False]
    outs = torch.ops.qops.mixed_quant_conv_backward(
        torch.ones_like(y), *op_args(*args)[:11], True, "quant", 0, mask
    )
    gx, gw, gp, gws, gas, gb = outs
    assert gx.numel() == 0 and gw == [] and gws.numel() == 0 and gas.numel() == 0 and gb.numel() == 0
    assert gp.shape == probs.shape


# ---------------------------------------------------------------------------------------------------------
# noise mode
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["onednn", "nnpack"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_noise_matches_reference(monkeypatch, engine, layout):
    monkeypatch.setenv("QOPS_MQC_ENGINE", engine)
    args, leaves = make_case(POOL[:6], [0, 3, 8], [2, 0, 8], layout=layout, seed=5)
    y = mixed_quant_conv(*with_spec(args, mode="noise"), 1234)
    y_ref = reference(*with_spec(args, mode="noise"), 1234)
    assert rel_err(y, y_ref) <= FWD_TOL
    gy = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, leaves, gy)
    grads_ref = torch.autograd.grad(y_ref, leaves, gy, allow_unused=True)
    for a, b in zip(grads, grads_ref, strict=True):
        if b is None:  # scales: unused in noise mode
            assert a.abs().max() == 0
        else:
            assert rel_err(a, b) <= GRAD_TOL


def _identity_layer(x, a_bits, mode="noise", seed=0):
    """A 1x1 identity convolution at full-precision weights: y = sum_j probs[j] * noisy_j(x)."""
    c = x.shape[1]
    w = torch.eye(c).view(c, c, 1, 1)
    probs = torch.full((1, 1, len(a_bits)), 1.0 / len(a_bits))
    spec = MixedQuantConvSpec([0], a_bits, [1], [1], mode=mode)
    return mixed_quant_conv(x, [w], probs, torch.ones(1, 1), torch.ones(len(a_bits)), None, spec, seed)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_noise_statistics(bits):
    """y - x = delta/2 * eps with eps ~ N(0, 1), delta = (max - min) / (2^bits - 1) over x."""
    x = torch.rand(4, 8, 32, 32) * 3 - 1
    y = _identity_layer(x, [bits], seed=7)
    eps = (y - x) / (((x.max() - x.min()) / (2**bits - 1)) / 2)
    assert abs(eps.mean().item()) < 0.02
    assert abs(eps.std().item() - 1) < 0.02
    assert abs((eps.abs() < 1).float().mean().item() - 0.6827) < 0.01


def test_noise_determinism_and_streams():
    x = torch.randn(2, 4, 9, 9)
    y1 = _identity_layer(x, [4], seed=3)
    assert torch.equal(y1, _identity_layer(x, [4], seed=3))  # same seed, same noise
    assert not torch.equal(y1, _identity_layer(x, [4], seed=4))  # another seed, other noise
    # Two variants with the same bit-width draw from different streams: their average has less noise.
    y2 = _identity_layer(x, [4, 4], seed=3)
    assert not torch.equal(y2, y1)
    ratio = (y2 - x).std() / (y1 - x).std()
    assert abs(ratio.item() - 0.5**0.5) < 0.05
    # quant_noise draws stream 0 of the same seed: variant 0 (stream 1) is independent of it.
    assert not torch.equal(y1, qops.quant_noise(x, 4, 3))


def test_noise_ignores_scales():
    args, _ = make_case(POOL[:2], [4], [4], seed=0)
    x, weights, probs, _, a_scales, b, spec = args
    noise = dataclasses.replace(spec, mode="noise")
    y = mixed_quant_conv(x, weights, probs, args[3], a_scales, b, noise)
    w_scales = -torch.ones(2, 1)  # would be rejected in quant mode
    y_neg = mixed_quant_conv(x, weights, probs, w_scales, a_scales, b, noise)
    assert torch.isfinite(y).all() and torch.equal(y_neg, y)


# ---------------------------------------------------------------------------------------------------------
# torch.library.opcheck and torch.compile
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["quant", "noise"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck(layout, mode):
    args, _ = make_case([(3, 3, 1, 1), (1, 3, 3, 1)], [0, 4], [2, 8], stride=2, layout=layout, seed=11)
    flat = op_args(*with_spec(args, mode=mode), 5)
    torch.library.opcheck(torch.ops.qops.mixed_quant_conv.default, flat)
    x, weights, probs, w_bits, a_bits, w_scales, a_scales, a_signed, groups, dilations, stride, b = flat[:12]
    ho, wo = (x.shape[2] - 1) // 2 + 1, (x.shape[3] - 1) // 2 + 1
    grad = torch.randn(x.shape[0], weights[0].shape[0], ho, wo)
    # The backward op is not differentiable itself (double backward raises): check it on plain tensors.
    x, probs, w_scales, a_scales = (t.detach() for t in (x, probs, w_scales, a_scales))
    weights = [w.detach() for w in weights]
    for mask in ([True] * 6, [True, False, True, False, True, False]):
        bargs = (
            grad,
            x,
            weights,
            probs,
            w_bits,
            a_bits,
            w_scales,
            a_scales,
            a_signed,
            groups,
            dilations,
            stride,
            True,
            mode,
            5,
            mask,
        )
        torch.library.opcheck(torch.ops.qops.mixed_quant_conv_backward.default, bargs)


def test_torch_compile_fullgraph():
    args, leaves = make_case(POOL[:4], [4, 8], [4, 8], seed=13)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def layer(x, weights, probs, w_scales, a_scales, b):
        return torch.relu(mixed_quant_conv(x, weights, probs, w_scales, a_scales, b, args[6])).sum()

    loss = layer(*args[:6])
    grads = torch.autograd.grad(loss, leaves)
    y_ref = reference(*args)
    loss_ref = torch.relu(y_ref).sum()
    grads_ref = torch.autograd.grad(loss_ref, leaves)
    assert rel_err(loss, loss_ref) <= FWD_TOL
    for a, c in zip(grads, grads_ref, strict=True):
        assert rel_err(a, c) <= GRAD_TOL


# ---------------------------------------------------------------------------------------------------------
# qops.nn.MixedQuantConv2d
# ---------------------------------------------------------------------------------------------------------
BASIC = [dict(kernel=1), dict(kernel=3), dict(kernel=5), dict(kernel=3, groups=3)]


def test_module_fused_equals_naive():
    torch.manual_seed(0)
    fused = MixedQuantConv2d(6, 6, BASIC, impl="fused")
    naive = MixedQuantConv2d(6, 6, BASIC, impl="naive")
    naive.load_state_dict(fused.state_dict())
    x = torch.randn(2, 6, 8, 8).abs()
    y_f, y_n = fused(x), naive(x)
    assert fused._scales_initialized and bool(fused.scales_initialized)
    assert torch.equal(fused.w_scales, naive.w_scales) and torch.equal(fused.a_scales, naive.a_scales)
    assert rel_err(y_f, y_n) <= FWD_TOL
    y_f.square().sum().backward()
    y_n.square().sum().backward()
    for (name, pf), pn in zip(fused.named_parameters(), naive.parameters(), strict=True):
        assert rel_err(pf.grad, pn.grad) <= GRAD_TOL, name


def test_module_tied_bits_and_parameter_groups():
    m = MixedQuantConv2d(6, 6, BASIC, w_bits=(4, 8), a_bits=(4, 8), tie_bits=True)
    p = m.probs()
    assert p[:, 0, 1].eq(0).all() and p[:, 1, 0].eq(0).all()
    assert torch.allclose(p.sum(), torch.tensor(1.0))
    assert [id(a) for a in alpha_parameters(m)] == [id(m.alphas)]
    assert id(m.alphas) not in {id(w) for w in weight_parameters(m)}
    assert len(list(weight_parameters(m))) == len(BASIC) + 3  # weights, bias, w_scales, a_scales


def test_module_lsq_init_and_grad_scale():
    torch.manual_seed(0)
    m = MixedQuantConv2d(4, 4, [dict(kernel=3)], w_bits=(4,), a_bits=(4,))
    x = torch.rand(2, 4, 6, 6)
    m(x).sum().backward()
    assert torch.allclose(m.a_scales.detach(), 2 * x.abs().mean() / 15**0.5)
    assert torch.allclose(m.w_scales.detach()[0, 0], 2 * m.weights[0].detach().abs().mean() / 7**0.5)
    # LSQ's gradient scale: the raw scale gradient of the op times 1/sqrt(numel * qmax).
    x2 = x.clone().requires_grad_()
    a_scales = m.a_scales.detach().clone().requires_grad_()
    y = mixed_quant_conv(x2, [m.weights[0]], m.probs(), m.w_scales, a_scales, m.bias, m.spec)
    (ga,) = torch.autograd.grad(y.sum(), a_scales)
    assert torch.allclose(m.a_scales.grad, ga / (x[0].numel() * 15) ** 0.5, rtol=1e-3)


def test_module_compiles():
    torch.manual_seed(0)
    m = MixedQuantConv2d(6, 6, BASIC)
    x = torch.randn(2, 6, 8, 8)
    m(x)  # data-driven scale init happens once, eagerly
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    y = cm(x)
    assert rel_err(y, m(x)) <= FWD_TOL
    y.sum().backward()
    assert m.alphas.grad is not None and m.weights[2].grad is not None


def test_module_noise_fused_equals_naive():
    torch.manual_seed(0)
    fused = MixedQuantConv2d(6, 6, BASIC, mode="noise", impl="fused")
    naive = MixedQuantConv2d(6, 6, BASIC, mode="noise", impl="naive")
    naive.load_state_dict(fused.state_dict())
    x = torch.randn(2, 6, 8, 8)
    y_f, y_n = fused(x, seed=11), naive(x, seed=11)
    assert rel_err(y_f, y_n) <= FWD_TOL
    torch.manual_seed(5)
    y_a = fused(x)
    torch.manual_seed(5)
    assert torch.equal(y_a, fused(x))  # the drawn seed follows torch's generator


def test_module_state_dict_round_trip():
    m = MixedQuantConv2d(6, 6, BASIC)
    m(torch.randn(1, 6, 5, 5))
    m2 = MixedQuantConv2d(6, 6, BASIC)
    m2.load_state_dict(m.state_dict())
    assert m2._scales_initialized
    assert torch.equal(m2.w_scales, m.w_scales)


def test_module_rejects_bad_config():
    with pytest.raises(ValueError, match="kernel sizes must be odd"):
        MixedQuantConv2d(4, 4, [dict(kernel=2)])
    with pytest.raises(ValueError, match="groups=3"):
        MixedQuantConv2d(4, 4, [dict(kernel=3, groups=3)])
    with pytest.raises(ValueError, match="share no bit-width"):
        MixedQuantConv2d(4, 4, BASIC[:1], w_bits=(4,), a_bits=(8,))
    with pytest.raises(ValueError, match="impl"):
        MixedQuantConv2d(4, 4, BASIC[:1], impl="fast")


# ---------------------------------------------------------------------------------------------------------
# errors: a RuntimeError naming the argument
# ---------------------------------------------------------------------------------------------------------
def _base():
    """The flat schema arguments (x, weights, probs, w_bits, a_bits, w_scales, a_scales, a_signed, groups,
    dilations, stride, bias, mode, seed) of a valid call."""
    args, _ = make_case([(3, 3, 1, 1), (1, 1, 1, 1)], [4, 8], [4, 8], cin=6, cout=6, seed=0)
    return [a.detach() if isinstance(a, torch.Tensor) else a for a in op_args(*args)]


def _with(k, value):
    args = _base()
    args[k] = value
    return args


def _error_cases():
    x = torch.randn(2, 6, 7, 9)
    w3 = torch.randn(6, 6, 3, 3)
    return [
        ("groups", _with(8, [1])),
        ("dilations", _with(9, [1, 1, 1])),
        ("weights\\[1\\]: kernel sizes must be odd", _with(1, [w3, torch.randn(6, 6, 2, 1)])),
        ("weights\\[1\\]: expected in-channels", _with(1, [w3, torch.randn(6, 3, 1, 1)])),
        ("weights\\[1\\]: expected 6 output channels", _with(1, [w3, torch.randn(4, 6, 1, 1)])),
        ("groups: entry 1 \\(4\\) does not divide", _with(8, [1, 4])),
        ("w_bits: bit-widths must be 0", _with(3, [1, 8])),
        ("a_bits: bit-widths must be 0", _with(4, [4, 9])),
        ("w_scales: every scale", _with(5, torch.tensor([[0.1, 0.1], [0.1, 0.0]]))),
        ("a_scales: every scale", _with(6, torch.tensor([-0.1, 0.1]))),
        ("w_scales: every scale", _with(5, torch.tensor([[0.1, float("inf")], [0.1, 0.1]]))),
        ("a_scales: every scale", _with(6, torch.tensor([0.1, float("nan")]))),
        ("probs: expected shape", _with(2, torch.rand(2, 2))),
        ("w_scales: expected shape", _with(5, torch.rand(2))),
        ("a_scales: expected shape", _with(6, torch.rand(3))),
        ("bias: expected shape", _with(11, torch.rand(5))),
        ("x: expected 4 dimensions", _with(0, x[0])),
        ("x: expected dtype Float", _with(0, x.double())),
        ("stride: expected >= 1", _with(10, 0)),
        ("weights: expected at least one", _with(1, [])),
        ("w_bits: expected at least one", _with(3, [])),
    ]


@pytest.mark.parametrize("match, args", _error_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_errors(match, args):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.qops.mixed_quant_conv(*args)


@pytest.mark.parametrize(
    "k, name", [(1, "weights\\[1\\]"), (2, "probs"), (5, "w_scales"), (6, "a_scales"), (11, "bias"), (0, "")]
)
def test_meta_mixed_with_cpu_tensors_is_refused(k, name):
    """A meta tensor among CPU ones dispatches to the fake kernel: it must refuse, not return uninitialised memory."""
    args = _base()
    if k == 1:
        args[1] = [args[1][0], args[1][1].to("meta")]
    else:
        args[k] = args[k].to("meta")
    with pytest.raises(
        RuntimeError, match=f"{name}: expected a tensor on" if name else "expected a tensor on"
    ):
        torch.ops.qops.mixed_quant_conv(*args)
    y = torch.ops.qops.mixed_quant_conv(*_base())
    bargs = (torch.ones_like(y).to("meta"), *_base()[:10], 1, True, "quant", 0, [True] * 6)
    with pytest.raises(RuntimeError, match="grad: expected a tensor on|expected a tensor on"):
        torch.ops.qops.mixed_quant_conv_backward(*bargs)


@pytest.mark.parametrize("match, args", _error_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_fake_kernel_errors(match, args):
    """On meta tensors (and under torch.compile) the fake kernel raises the kernels' errors."""
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    meta[1] = [w.to("meta") for w in meta[1]]
    if "every scale" in match:  # values: the kernels read them, a fake kernel cannot
        torch.ops.qops.mixed_quant_conv(*meta)
        return
    with pytest.raises(RuntimeError, match=match):
        torch.ops.qops.mixed_quant_conv(*meta)


@pytest.mark.parametrize("mode", ["quant", "noise"])
def test_stride_and_dilation_beyond_the_input_are_clamped(mode):
    """A stride or dilation of 2^40 and more (no tap but the centre reaches the input; one output pixel per
    image row) gives the result at stride / dilation = the input's size, in input-sized buffers."""
    args, leaves = make_case([(3, 3, 1, 1), (5, 3, 1, 2)], [0, 4], [4, 8], h=7, w=9, seed=6)
    y = mixed_quant_conv(*with_spec(args, dilations=(2**40, 2**62), stride=2**62, mode=mode), 3)
    y_ref = reference(*with_spec(args, dilations=(9, 9), stride=9, mode=mode), 3)
    assert y.shape == (2, 6, 1, 1) and rel_err(y, y_ref) <= FWD_TOL
    g = torch.autograd.grad(y.sum(), leaves, allow_unused=True)
    g_ref = torch.autograd.grad(y_ref.sum(), leaves, allow_unused=True)
    for a, b in zip(g, g_ref, strict=True):
        if b is None:
            assert a.abs().max() == 0
        else:
            assert rel_err(a, b) <= GRAD_TOL


def test_error_unknown_mode():
    with pytest.raises(RuntimeError, match='mode: expected "quant" or "noise"'):
        torch.ops.qops.mixed_quant_conv(*_with(12, "fancy"))


def test_full_precision_entries_ignore_their_scale():
    """bits 0 quantizes nothing, so its scale is not checked and gets no gradient."""
    args, leaves = make_case([(3, 3, 1, 1)], [0, 4], [0, 8], seed=4)
    with torch.no_grad():
        args[3][:, 0] = -1.0
        args[4][0] = 0.0
    y = mixed_quant_conv(*args)
    g = torch.autograd.grad(y.sum(), [args[3], args[4]])
    assert g[0][:, 0].eq(0).all() and g[1][0] == 0


def test_random_layer_sets_smoke():
    """A few wider random candidate sets (more channels, more candidates) than the hypothesis test."""
    rng = random.Random(0)
    for _ in range(3):
        cands = rng.sample(POOL, 5)
        args, leaves = make_case(cands, [2, 4, 8], [4, 8], cin=12, cout=6, h=9, w=8, seed=rng.randrange(1000))
        check_against_reference(args, leaves)


def _to(args, leaves, device):
    if device == "cpu":
        return args, leaves
    moved = {id(t): t.detach().to(device).requires_grad_() for t in leaves}

    def conv(a):
        if isinstance(a, torch.Tensor):
            return moved.get(id(a), a.to(device))
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            return [conv(t) for t in a]
        return a

    return tuple(conv(a) for a in args), [moved[id(t)] for t in leaves]


@pytest.mark.cuda
@pytest.mark.parametrize("plan", ["auto", "split"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cuda_matches_reference(monkeypatch, plan, layout):
    monkeypatch.setenv("QOPS_MQC_PLAN", plan)
    args, leaves = make_case(POOL, [0, 4, 8], [4, 8], cin=12, cout=6, stride=2, layout=layout, seed=21)
    args, leaves = _to(args, leaves, "cuda")
    check_against_reference(args, leaves)


@pytest.mark.cuda
def test_cuda_quantnas_layer_equals_cpu():
    cands = [(1, 1, 1, 1), (3, 3, 1, 1), (5, 5, 1, 1), (3, 3, 3, 1)]
    args, leaves = make_case(cands, [4, 8], [4, 8], cin=36, cout=36, n=2, h=16, w=16, seed=8)
    y_cpu = mixed_quant_conv(*args)
    g_cpu = torch.autograd.grad(y_cpu.sum(), leaves)
    cargs, cleaves = _to(args, leaves, "cuda")
    y = mixed_quant_conv(*cargs)
    g = torch.autograd.grad(y.sum(), cleaves)
    assert rel_err(y.cpu(), y_cpu) <= FWD_TOL
    for a, b in zip(g, g_cpu, strict=True):
        assert rel_err(a.cpu(), b) <= GRAD_TOL


def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)  # identical initial weights on both ranks (DDP also broadcasts them)
    m = MixedQuantConv2d(4, 4, [dict(kernel=1), dict(kernel=3)], w_bits=(4, 8), a_bits=(4, 8))
    ddp = torch.nn.parallel.DistributedDataParallel(m)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    x = torch.rand(2, 4, 6, 6, generator=torch.Generator().manual_seed(rank)) * (rank + 1)  # per-rank data
    for _ in range(2):
        opt.zero_grad()
        ddp(x).square().mean().backward()
        opt.step()
    out[rank] = torch.cat([p.detach().flatten() for p in m.parameters()])
    dist.destroy_process_group()


def test_ddp_keeps_replicas_identical():
    """Data-driven scale init and every gradient stay in sync across DDP ranks (gloo, 2 processes)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
    assert torch.equal(out[0], out[1])


@pytest.mark.cuda
def test_cuda_noise_equals_cpu():
    """Noise mode draws the same Philox numbers on the GPU: the outputs agree to rounding."""
    args, leaves = make_case(POOL[:5], [0, 4], [2, 8], cin=12, cout=6, seed=31)
    y_cpu = mixed_quant_conv(*with_spec(args, mode="noise"), 77)
    cargs, _ = _to(args, leaves, "cuda")
    y = mixed_quant_conv(*with_spec(cargs, mode="noise"), 77)
    assert rel_err(y.cpu(), y_cpu) <= FWD_TOL
