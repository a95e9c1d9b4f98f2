"""qnas.quant strategies: every output lies on its quantization grid, steps are positive, the
documented gradients flow, and bad arguments are clear errors."""

import math

import pytest
import torch

from qnas.errors import QnasError
from qnas.quant import QUANTIZERS, HWGQQuantizer, build_quantizer, quant_range


def _on_grid(y, s, qmin, qmax):
    codes = y / s
    return (
        torch.allclose(codes, codes.round(), atol=1e-3)
        and codes.min() >= qmin - 1e-3
        and codes.max() <= qmax + 1e-3
    )


def _rounds_to_nearest(x, y, s, qmin, qmax):
    """Inside the grid's range every value moves by at most half a step (a quantizer that outputs zeros, or
    codes of the wrong level, fails this), and the whole tensor is closer to x than zero is."""
    inside = (x >= qmin * s) & (x <= qmax * s)
    near = ((y - x).abs() <= s / 2 * (1 + 1e-4) + 1e-6)[inside].all()
    return bool(near) and bool(inside.float().mean() > 0.5) and float((y - x).norm() / x.norm()) < 1


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_activation_outputs_on_grid(name, bits):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, 6) * 2
    q = build_quantizer(name, bits, kind="activation", signed=True)
    y = q(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    s = q.scale().detach().abs().clamp_min(1e-8)
    assert (q.scale().detach() > 0).all()
    assert _on_grid(y, s, *quant_range(bits, True))
    if name != "dorefa":  # DoReFa clips activations to [-1, 1] whatever its step
        assert _rounds_to_nearest(x, y, s, *quant_range(bits, True))
        if bits == 8:
            assert float((y - x).norm() / x.norm()) < 0.1


@pytest.mark.parametrize("name", sorted(n for n, c in QUANTIZERS.items() if c.weight_ok and n != "dorefa"))
def test_weight_per_channel(name):
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3) * torch.linspace(0.1, 2, 6).view(-1, 1, 1, 1)
    q = build_quantizer(name, 4, kind="weight", per_channel=True, channels=6)
    y = q(w)
    s = q.scale().detach().abs().view(-1, 1, 1, 1)
    assert q.scale().numel() == 6
    assert _on_grid(y, s, -8, 7)
    assert _rounds_to_nearest(w, y, s, -8, 7)


def test_dorefa_weight_keeps_magnitude_and_levels():
    """DoReFa's 2-bit weights: max|w| · round(tanh(w) / max|tanh(w)|), the three levels -max|w|, 0, max|w|."""
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    y = build_quantizer("dorefa", 2, kind="weight")(w)
    t = torch.tanh(w)
    expected = w.abs().max() * (t / t.abs().max()).round()
    torch.testing.assert_close(y, expected)
    m = float(w.abs().max())
    assert sorted(torch.unique(y).tolist()) == pytest.approx([-m, 0.0, m])


def test_lsq_gradients_are_lsqs():
    """LSQ's gradients (Esser et al., ICLR 2020) for a sum loss: dL/dx = 1 where the code round(x/s) lies
    in [qmin, qmax] and 0 elsewhere (straight-through, torch's learnable fake-quantize convention);
    dL/ds = g · Σ (round(x/s) - x/s) there, qmin or qmax elsewhere, with g = 1/sqrt(elements · qmax); the
    learned log-step's gradient is s · dL/ds."""
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 8, 8) * 3).requires_grad_()
    q = build_quantizer("lsq", 4, kind="activation", signed=True)
    q(x.detach())  # the data-driven init, then a step that clips some values
    q.set_step(torch.tensor([0.5]))
    q(x).sum().backward()
    qmin, qmax = quant_range(4, True)
    v = x.detach() / 0.5
    inside = (v.round() >= qmin) & (v.round() <= qmax)
    assert 0 < int(inside.sum()) < x.numel()  # both cases occur
    torch.testing.assert_close(x.grad, inside.float())
    ds = torch.where(inside, v.round() - v, v.clamp(qmin, qmax)).sum() / math.sqrt(x.numel() * qmax)
    torch.testing.assert_close(q.log_step.grad, (0.5 * ds).reshape(1), rtol=1e-4, atol=1e-6)


def test_lsq_init_is_lsq_paper():
    x = torch.randn(1000)
    q = build_quantizer("lsq", 4, kind="activation", signed=True)
    q(x)
    assert q.step.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(7), rel=1e-5)


def test_pact_gradient_only_from_clipped():
    q = build_quantizer("pact", 4, kind="activation", signed=False)
    q(torch.tensor([0.5, 1.0]))  # init alpha = 1
    x = torch.tensor([0.2, 0.4, 3.0, 5.0])
    q(x).sum().backward()
    assert q.alpha.grad.item() == pytest.approx(2.0)  # the two elements above alpha


def test_statistics_quantizers_track_and_freeze():
    q = build_quantizer("minmax", 8, kind="activation", signed=True)
    q(torch.ones(10))
    q.train()
    q(torch.full((10,), 3.0))
    tracked = q.scale().item()
    assert 1 / 127 < tracked < 3 / 127
    q.freeze()
    q(torch.full((10,), 100.0))
    assert q.scale().item() == tracked


def test_mse_clip_below_max_for_heavy_tails():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(10000), torch.tensor([40.0])])
    q = build_quantizer("mse", 4, kind="activation", signed=True)
    q(x)
    assert q.scale().item() * 7 < 40.0 * 0.5


def test_hwgq_step_is_mse_optimal():
    """The tabulated step beats its neighbours on Gaussian samples (checks the numeric optimisation)."""
    torch.manual_seed(0)
    x = torch.randn(400000, dtype=torch.float64)
    step = HWGQQuantizer.optimal_step(3, True)

    def mse(s):
        return ((torch.clamp(torch.round(x / s), -4, 3) * s - x) ** 2).mean().item()

    assert mse(step) < mse(step * 1.05) and mse(step) < mse(step * 0.95)


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda: build_quantizer("nope", 4, kind="weight"), "unknown"),
        (lambda: build_quantizer("lsq", 0, kind="weight"), "bits"),
        (lambda: build_quantizer("lsq", 17, kind="weight"), "bits"),
        (lambda: build_quantizer("hwgq", 4, kind="weight"), "activations only"),
        (lambda: build_quantizer("lsq", 4, kind="bias"), "kind"),
        (lambda: build_quantizer("percentile", 4, kind="activation", percentile=0), "percentile"),
    ],
)
def test_errors(call, needle):
    with pytest.raises(QnasError, match=needle):
        call()


def _laplace_mse(step: float, bits: int, signed: bool, n: int = 200_000) -> float:
    g = torch.Generator().manual_seed(0)
    x = (
        torch.distributions.Laplace(0.0, 1.0).sample((n,))
        if signed
        else torch.empty(n).exponential_(generator=g)
    )
    qmin, qmax = quant_range(bits, signed)
    return float(((torch.clamp(torch.round(x / step), qmin, qmax) * step - x) ** 2).mean())


@pytest.mark.parametrize("bits,signed", [(2, True), (4, True), (3, False)])
def test_aciq_step_is_mse_optimal_for_laplace(bits, signed):
    """ACIQ's unit step beats a 20 % smaller and a 20 % larger one on Laplace (exponential) samples,
    and a Laplace tensor of scale b gets b times the unit step."""
    from qnas.quant.quantizers import _optimal_unit_step

    torch.manual_seed(0)
    step = _optimal_unit_step("laplace", bits, signed)
    best = _laplace_mse(step, bits, signed)
    assert best < _laplace_mse(step * 0.8, bits, signed) and best < _laplace_mse(step * 1.2, bits, signed)
    x = torch.distributions.Laplace(0.0, 3.0).sample((100_000,))
    q = build_quantizer("aciq", bits, kind="activation", signed=True)
    q(x)
    expected = 3.0 * _optimal_unit_step("laplace", bits, True)
    assert q.scale().item() == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("stat", ["minmax", "percentile", "mse"])
def test_asymmetric_quantizer_grid_and_error(stat):
    """On a skewed tensor (range [-1, 3]) the asymmetric grid has zero as a code, outputs lie on
    lo + k·s, and its error is well below the symmetric quantizer's of the same statistic."""
    torch.manual_seed(0)
    x = torch.rand(4, 8, 16, 16) * 4 - 1
    qa = build_quantizer(stat, 3, kind="activation", signed=True, asymmetric=True)
    qs = build_quantizer(stat, 3, kind="activation", signed=True)
    ya, ys = qa(x), qs(x)
    s, z = qa.scale(), qa.zero_point()
    codes = ya / s + z
    assert (
        torch.allclose(codes, codes.round(), atol=1e-3) and codes.min() >= -1e-3 and codes.max() <= 7 + 1e-3
    )
    assert qa(torch.zeros(3)).abs().max() == 0
    assert float((ya - x).square().mean()) < 0.6 * float((ys - x).square().mean())
    assert qa.strategy == f"{stat}_asym" and qa.from_statistics


def test_mse_optimal_range_beats_minmax_on_outliers():
    from qnas.quant.quantizers import mse_optimal_range

    torch.manual_seed(0)
    x = torch.cat([torch.randn(10_000) + 1.0, torch.tensor([-20.0, 30.0])])

    def err(lo, hi):
        s = (hi - lo) / 15
        z = torch.round(-lo / s)
        return float(((torch.clamp(torch.round(x / s) + z, 0, 15) - z) * s - x).square().mean())

    lo, hi = mse_optimal_range(x, 16)
    assert lo < 0 < hi and err(lo, hi) < 0.3 * err(x.min(), x.max())


def test_asymmetric_errors():
    with pytest.raises(QnasError, match="activations only"):
        build_quantizer("mse", 4, kind="weight", asymmetric=True)
    with pytest.raises(QnasError, match="no asymmetric form"):
        build_quantizer("lsq", 4, kind="activation", asymmetric=True)


def test_asymmetric_quantizer_is_not_exported():
    """The packed format has no zero point: export must refuse, not drop it."""
    from qnas.export import ExportError, quantizer_step

    q = build_quantizer("minmax", 4, kind="activation", signed=True, asymmetric=True)
    q(torch.rand(10) * 4 - 1)
    with pytest.raises(ExportError, match="cannot export"):
        quantizer_step(q, "layer")


def test_lsq_step_learned_in_log_domain_survives_adam():
    """Adam moves a parameter by about lr per update; a small step learned directly crosses zero and
    the clipping range collapses. Learned as a log-step it changes by a bounded factor and stays
    positive: 200 Adam updates at lr 1e-2 against a loss that pushes the step down move it by at most
    exp(200 * 1e-2 * 1.01)."""
    q = build_quantizer("lsq", 8, kind="activation", signed=True)
    x = 1e-3 * torch.randn(4096)
    q(x)
    s0 = float(q.step)
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        q.step.sum().backward()  # a loss that only wants a smaller step
        opt.step()
    assert 0 < float(q.step) < s0 and float(q.step) >= s0 * math.exp(-200 * 1e-2 * 1.01)


def test_lsq_loads_files_that_hold_the_step_itself():
    q = build_quantizer("lsq", 4, kind="activation", signed=True)
    state = {k: v for k, v in q.state_dict().items() if k != "log_step"}
    state["step"] = torch.tensor([0.25])
    q.load_state_dict(state)
    assert float(q.step) == pytest.approx(0.25, rel=1e-6) and "step" not in q.state_dict()
