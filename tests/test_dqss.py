"""DQSS (qnas.quant.dqss, `qnas strategy`, examples/dqss_digits.py): the two engines compute the same
function and gradients, the derived network is the supernet at its chosen strategies, PTQ and QAT
searches write a run `qnas eval` reads, and bad input is a one-line error. Tiny models."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from cli_run import run_cli
from torch import nn

from qnas.errors import QnasError
from qnas.quant.dqss import (
    DQSS_STRATEGIES,
    StrategyConv2d,
    build_supernet,
    calibrate,
    derive_network,
    derive_plan,
    estimate_gains,
    expected_loss_penalty,
    init_logits_from_local_error,
    local_errors,
    log_mse_loss,
    parse_quantizers,
    ptq_phases,
    ptq_search,
    qat_phases,
    recalibrate,
    set_temperature,
    strategy_parameters,
    supernet_layers,
)
from qnas.quant.modules import QuantConv2d
from qnas.runs.network import load_network
from qnas.sr import build_model
from qnas.train.train import TrainOptions, train

ROOT = Path(__file__).resolve().parents[1]
TINY = {"n_resblocks": 1, "n_feats": 8}


def calibrated_supernet(names, bits=3):
    """(tiny FP edsr-baseline in eval mode, its supernet over `names` calibrated, the 2 calibration
    batches), from seed 0: the setup of the PTQ tests."""
    torch.manual_seed(0)
    fp = build_model("edsr-baseline", 2, **TINY).eval()
    sup = build_supernet(copy.deepcopy(fp), names, bits)
    calib = [torch.rand(2, 3, 12, 12) for _ in range(2)]
    calibrate(sup, calib)
    return fp, sup, calib


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("names", [DQSS_STRATEGIES, ("lsq", "minmax"), ("pact", "dorefa")])
def test_fused_engine_equals_factorized(signed, names):
    """mixed_quant_conv with one variant per strategy (others beside it) = conv(Σα Qa(A), Σβ Qw(W)):
    outputs and every gradient (input, weight, bias, logits, LSQ steps, PACT clips)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1)
    x = torch.randn(2, 6, 9, 9) * 2
    if not signed:
        x = x.relu()
    a = StrategyConv2d(conv, names, 4, a_signed=signed, engine="fused")
    b = StrategyConv2d(copy.deepcopy(conv), names, 4, a_signed=signed, engine="factorized")
    assert a.engine == "fused"
    with torch.no_grad():
        for p, q in zip(strategy_parameters(a), strategy_parameters(b), strict=True):
            p.normal_()
            q.copy_(p)
    a(x), b(x)  # data-driven initialisation of every quantizer
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=2e-4, rtol=1e-4, msg=name)


def test_non_same_padding_falls_back_to_factorized():
    conv = nn.Conv2d(4, 4, 3, padding=0)
    assert StrategyConv2d(conv, ["lsq"], 4, a_signed=True, engine="fused").engine == "factorized"


def test_derived_network_is_the_supernet_at_its_choice():
    torch.manual_seed(0)
    fp = build_model("edsr-baseline", 2, **TINY)
    with torch.no_grad():  # the derived network rounds biases to its accumulator grid; the search does not
        for m in fp.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.zero_()
    sup = build_supernet(copy.deepcopy(fp), DQSS_STRATEGIES, 4)
    calib = [torch.rand(2, 3, 10, 10) for _ in range(2)]
    calibrate(sup, calib)
    with torch.no_grad():  # a random but decisive choice per layer
        for p in strategy_parameters(sup):
            p.normal_(0, 5)
    set_temperature(sup, 1e-4)  # softmax -> one-hot
    plan = derive_plan(sup, list(DQSS_STRATEGIES), 4)
    net = derive_network(sup, copy.deepcopy(fp), plan)
    assert all(isinstance(net.get_submodule(n), QuantConv2d) for n in plan["layers"])
    sup.eval(), net.eval()
    x = torch.rand(1, 3, 10, 10)
    torch.testing.assert_close(net(x), sup(x), atol=1e-5, rtol=1e-5)


def test_calibration_steps_are_the_mean_over_batches():
    """A statistics-based step after calibrate() is the equal-weight mean of its per-batch values
    (not the training-mode EMA, which favours the first batch); the momentum is restored."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = StrategyConv2d(conv, ["minmax", "lsq"], 4, a_signed=False)
    batches = [torch.rand(1, 3, 6, 6) * k for k in (1.0, 2.0, 4.0)]
    calibrate(layer, batches)
    q = layer.a_quants["minmax"]
    expected = sum(float(b.abs().max()) for b in batches) / len(batches) / q.qmax
    assert float(q.step) == pytest.approx(expected, rel=1e-6)
    assert q.momentum == 0.1 and bool(q.frozen)


def test_ptq_search_moves_logits_and_lowers_the_error():
    fp, sup, calib = calibrated_supernet(["lsq", "dorefa", "mse"])
    losses = []
    ptq_search(sup, fp, calib, 12, log=lambda step, loss, **kw: losses.append(loss))
    assert losses[-1] < losses[0]
    layer = next(iter(supernet_layers(sup).values()))
    assert layer.strategy_a_logits.abs().sum() > 0
    # Network weights stayed frozen.
    for n, p in fp.named_parameters():
        torch.testing.assert_close(sup.get_parameter(n), p)


def direct_errors(conv, layer, inputs):
    """The minmax weight's and the hwgq input's output errors of one layer, computed directly."""
    e_w = sum(
        float(
            (conv._conv_forward(x, layer.w_quants["minmax"].quantize(conv.weight), conv.bias) - conv(x))
            .square()
            .sum()
        )
        for x in inputs
    )
    e_a = sum(float((conv(layer.a_quants["hwgq"].quantize(x)) - conv(x)).square().sum()) for x in inputs)
    return e_w, e_a


def test_local_errors_match_a_direct_computation_and_set_the_logits():
    """Each candidate's error is that of the layer alone on the teacher's own input; the logits start
    at -log(error / smallest error), so the locally best candidate has logit 0 and the largest one."""
    names = ["lsq", "minmax", "mse", "hwgq"]
    fp, sup, calib = calibrated_supernet(names)
    errors = local_errors(sup, fp, calib)
    name = "body.0.body.2"  # input after a ReLU: unsigned activation quantizers
    layer = supernet_layers(sup)[name]
    inputs = []
    hook = fp.get_submodule(name).register_forward_hook(lambda m, a, o: inputs.append(a[0]))
    with torch.no_grad():
        for x in calib:
            fp(x)
    hook.remove()
    conv = fp.get_submodule(name)
    with torch.no_grad():
        e_w, e_a = direct_errors(conv, layer, inputs)
    w_err, a_err = errors[name]
    assert layer.w_names == ["lsq", "minmax", "mse"] and layer.a_names == names
    assert w_err[1].item() == pytest.approx(e_w, rel=1e-4)
    assert a_err[3].item() == pytest.approx(e_a, rel=1e-4)
    init_logits_from_local_error(sup, fp, calib)
    for n, m in supernet_layers(sup).items():
        for logits, e in ((m.strategy_w_logits, errors[n][0]), (m.strategy_a_logits, errors[n][1])):
            assert int(logits.argmax()) == int(e.argmin()) and logits.max().item() == 0
            torch.testing.assert_close(logits.double(), -(e / e.min()).log(), rtol=1e-5, atol=1e-5)
    with pytest.raises(QnasError, match="teacher: no convolution"):
        local_errors(sup, nn.Sequential(nn.Conv2d(3, 3, 1)), calib)


@pytest.mark.parametrize("signed", [True, False])
def test_variance_term_matches_the_expected_squared_deviation(signed):
    """StrategyConv2d's variance (second order, diagonal in the input channels) is within 15% of the
    exact E_{i~α, j~β} mean (conv(Q^a_i(A), Q^w_j(W)) - y_mixture)^2, and vanishes for one-hot
    probabilities (the mixture is then the discrete network)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 12, 3, padding=1)
    x = torch.randn(4, 16, 20, 20)
    x = x if signed else x.relu()
    m = StrategyConv2d(conv, DQSS_STRATEGIES, 4, a_signed=signed)
    with torch.no_grad():
        m.strategy_w_logits.normal_()
        m.strategy_a_logits.normal_()
    m.train()
    m(x)
    m.gain = 1.0
    y = m(x).detach()
    beta, alpha = m.w_probs().detach(), m.a_probs().detach()
    exact = sum(
        b
        * a
        * (nn.functional.conv2d(q_a.quantize(x), q_w.quantize(m.weight), m.bias, padding=1) - y)
        .square()
        .mean()
        for b, q_w in zip(beta, m.w_quants.values(), strict=True)
        for a, q_a in zip(alpha, m.a_quants.values(), strict=True)
    )
    assert m.variance.item() == pytest.approx(exact.item(), rel=0.15)
    with torch.no_grad():
        m.strategy_w_logits.copy_(torch.arange(len(m.w_names)) * 100.0)
        m.strategy_a_logits.copy_(torch.arange(len(m.a_names)) * 100.0)
    m(x)
    assert m.variance.item() == pytest.approx(0.0, abs=1e-9)
    assert expected_loss_penalty(nn.Sequential(m)).item() == pytest.approx(0.0, abs=1e-9)


def test_gains_measure_how_a_layer_error_reaches_the_output():
    """A layer right before a x1 identity tail reaches the output with gain 1; scaling the network
    after the layer by 3 multiplies the gain by 9."""
    torch.manual_seed(0)
    first, second = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
    last = nn.Conv2d(4, 4, 1, bias=False)
    with torch.no_grad():
        last.weight.copy_(torch.eye(4)[:, :, None, None])
    fp = nn.Sequential(first, second, last)
    sup = build_supernet(copy.deepcopy(fp), ["minmax", "mse"], 4, layers={"1": True})
    calib = [torch.rand(2, 3, 8, 8) for _ in range(2)]
    assert estimate_gains(sup, fp, calib)["1"] == pytest.approx(1.0, rel=1e-4)
    with torch.no_grad():
        last.weight.mul_(3)
    assert estimate_gains(sup, fp, calib)["1"] == pytest.approx(9.0, rel=1e-4)


def test_log_mse_loss_is_mean_psnr_up_to_constants():
    torch.manual_seed(0)
    target = torch.rand(3, 3, 8, 8)
    pred = target + torch.randn(3, 1, 1, 1) * torch.randn_like(target) * 0.1
    psnr = torch.stack([-10 * torch.log10(((p - t) ** 2).mean()) for p, t in zip(pred, target, strict=True)])
    assert log_mse_loss(pred, target).item() == pytest.approx(
        -(psnr.mean() * torch.log(torch.tensor(10.0)) / 10).item(), rel=1e-5
    )


def test_ptq_expected_loss_search_logs_the_penalty():
    fp, sup, calib = calibrated_supernet(["lsq", "minmax", "mse"])
    records = []
    ptq_search(
        sup,
        fp,
        calib,
        6,
        expected_loss=True,
        loss_fn=log_mse_loss,
        log=lambda step, loss, **kw: records.append(kw),
    )
    assert all(r["variance_penalty"] >= 0 for r in records) and records[0]["variance_penalty"] > 0
    assert all(m.gain is None and m.variance is None for m in supernet_layers(sup).values())


def test_ptq_discrete_phase_tunes_the_derived_network():
    names = ["minmax", "mse"]  # statistics only: the discrete phase re-measures and learns nothing
    fp, sup, calib = calibrated_supernet(names)
    phases = []

    def derive(s):
        return derive_network(s, copy.deepcopy(fp), derive_plan(s, names, 3))

    net = ptq_search(
        sup, fp, calib, 8, derive=derive, log=lambda step, loss, **kw: phases.append(kw["phase"])
    )
    assert phases == ["search"] * ptq_phases(8) + ["discrete"] * (8 - ptq_phases(8)) and ptq_phases(8) == 6
    assert isinstance(net.get_submodule("body.0.body.0"), QuantConv2d)
    # The statistics-based steps are those of the derived network's own activations: measuring
    # them again changes nothing.
    steps = {n: b.clone() for n, b in net.named_buffers() if n.endswith("step")}
    recalibrate(net, calib)
    for n, b in net.named_buffers():
        if n in steps:
            torch.testing.assert_close(b, steps[n])
    with pytest.raises(QnasError, match="discrete fraction"):
        ptq_phases(8, 1.0)


def test_qat_phases_cover_the_budget():
    assert qat_phases(100) == (25, 75)
    warm, discrete = qat_phases(3)
    assert 0 <= warm <= discrete <= 3


@pytest.mark.parametrize(
    "spec, needle",
    [("nope", "unknown"), ("", "at least one"), ("hwgq", "no weight quantizer"), ("lsq,lsq", "twice")],
)
def test_parse_quantizers_errors(spec, needle):
    with pytest.raises(QnasError, match=needle):
        parse_quantizers(spec)


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "fp"
    network = {"kind": "sr", "model": {"name": "edsr-baseline", "scale": 2, "kwargs": TINY}}
    train(
        network, TrainOptions(steps=2, batch_size=2, patch_size=16, checkpoint_every=2), out, progress=False
    )
    return out


SMALL = ["--batch-size", "2", "--patch-size", "16", "--calib-batches", "2", "--quiet"]


@pytest.mark.parametrize("mode", ["ptq", "qat"])
def test_cli_strategy_run(fp_run, tmp_path, capsys, mode):
    out = tmp_path / mode
    args = [
        "strategy",
        "--checkpoint",
        fp_run,
        "--bits",
        "4",
        "--mode",
        mode,
        "--steps",
        "4",
        *SMALL,
        "--out",
        out,
    ]
    code, text, err = run_cli(args, capsys)
    assert code == 0, err
    strategy = json.loads((out / "strategy.json").read_text())
    assert set(strategy["layers"]) == {"body.0.body.0", "body.0.body.2", "body.1", "tail.0.0"}
    for layer in strategy["layers"].values():
        assert layer["weight"] in DQSS_STRATEGIES and layer["activation"] in DQSS_STRATEGIES
        assert sum(layer["probs"]["w"].values()) == pytest.approx(1, abs=1e-3)
        assert min(layer["local_error"]["w"].values()) == 1.0  # the default --init local
    net, blob = load_network(out)
    assert blob["network"]["quant"]["scheme"] == "dqss"
    chosen = blob["network"]["quant"]["layers"]["body.1"]
    assert net.body[1].w_quant.strategy == chosen["w"]["quantizer"]
    code, text, err = run_cli(["eval", "--checkpoint", out, "--format", "json"], capsys)
    assert code == 0 and json.loads(text)["psnr"] > 10


def test_cli_single_quantizer_is_uniform(fp_run, tmp_path, capsys):
    out = tmp_path / "mse"
    args = ["strategy", "--checkpoint", fp_run, "--quantizers", "mse", "--bits", "3", "--steps", "1", *SMALL]
    assert run_cli([*args, "--out", out], capsys)[0] == 0
    counts = json.loads((out / "strategy.json").read_text())["counts"]
    assert counts == {"weight": {"mse": 4}, "activation": {"mse": 4}}


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--bits", "9"], "out of range"),
        (["--bits", "1"], "out of range"),
        (["--bits", "4", "--quantizers", "lsq,foo"], "unknown quantizer 'foo'"),
        (["--bits", "4", "--quantizers", "hwgq"], "no weight quantizer"),
        (["--bits", "4", "--quantizers", "lsq,lsq"], "twice"),
        (["--bits", "4", "--quantizers", ","], "at least one"),
    ],
)
def test_cli_strategy_errors(fp_run, tmp_path, capsys, extra, needle):
    code, _, err = run_cli(
        ["strategy", "--checkpoint", fp_run, *extra, "--out", tmp_path / "x", "--quiet"], capsys
    )
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("extra", [["--init", "random"], ["--sampling", "gumbel"]])
def test_cli_strategy_rejects_unknown_choices(fp_run, tmp_path, capsys, extra):
    code, _, err = run_cli(
        ["strategy", "--checkpoint", fp_run, "--bits", "4", *extra, "--out", tmp_path / "x", "--quiet"],
        capsys,
    )
    assert code == 2 and extra[0] in err and extra[1] in err


def test_cli_strategy_rejects_quantized_and_missing_checkpoints(fp_run, tmp_path, capsys):
    q = tmp_path / "q"
    args = ["strategy", "--checkpoint", fp_run, "--bits", "4", "--steps", "1", *SMALL, "--out", q]
    assert run_cli(args, capsys)[0] == 0
    code, _, err = run_cli(["strategy", "--checkpoint", q, "--bits", "4", "--out", tmp_path / "y"], capsys)
    assert code == 2 and "full-precision" in err
    code, _, err = run_cli(
        ["strategy", "--checkpoint", tmp_path / "none", "--bits", "4", "--out", tmp_path / "z"], capsys
    )
    assert code == 2 and "none" in err


def test_digits_example_tiny_budget():
    spec = importlib.util.spec_from_file_location("dqss_digits", ROOT / "examples" / "dqss_digits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--epochs", "6", "--steps", "2", "--calib", "1", "--quantizers", "lsq,mse,hwgq"])
    acc = res["accuracy"]
    assert set(acc) == {"float", "lsq", "mse", "dqss"}
    assert acc["float"] > 0.5 and all(0 <= v <= 1 for v in acc.values())
    assert set(res["chosen"]) == {"conv1", "conv2", "conv3"}


def test_candidate_names():
    from qnas.quant.dqss import EXTENDED_STRATEGIES, candidate_name, candidate_spec

    assert parse_quantizers("extended") == list(EXTENDED_STRATEGIES)
    assert candidate_spec("mse_pc") == ("mse", {"per_channel": True})
    assert candidate_spec("minmax_asym") == ("minmax", {"asymmetric": True})
    assert candidate_name({"quantizer": "mse", "per_channel": True}) == "mse_pc"
    for bad, needle in [
        ("mse_pcx", "unknown"),
        ("hwgq_pc", "does not quantize weights"),
        ("lsq_asym", "asymmetric forms exist"),
        ("mse_pc", "no activation quantizer"),
        ("hwgq,mse_asym", "no weight quantizer"),
    ]:
        with pytest.raises(QnasError, match=needle):
            parse_quantizers(bad)


@pytest.mark.parametrize("w_choice,a_choice", [("mse_pc", "mse_asym"), ("aciq", "percentile_asym")])
def test_derived_network_of_extended_candidates(w_choice, a_choice):
    """Per-channel weights and asymmetric activations survive the derivation: at one-hot logits the
    derived network is the supernet, the plan names the flags, and the quantizers are the right kind."""
    names = ["mse", "mse_pc", "aciq", "mse_asym", "percentile_asym"]
    fp, sup, calib = calibrated_supernet(names)
    for m in supernet_layers(sup).values():
        with torch.no_grad():
            m.strategy_w_logits.fill_(-30).index_fill_(0, torch.tensor(m.w_names.index(w_choice)), 30)
            m.strategy_a_logits.fill_(-30).index_fill_(0, torch.tensor(m.a_names.index(a_choice)), 30)
        assert "mse_asym" not in m.w_names and "mse_pc" not in m.a_names
    plan = derive_plan(sup, names, 3)
    net = derive_network(sup, build_model("edsr-baseline", 2, **TINY), plan)
    sup.eval()
    x = calib[0]
    with torch.no_grad():
        assert torch.allclose(net(x), sup(x), atol=1e-5)
    spec = plan["layers"]["body.0.body.0"]
    assert spec["w"].get("per_channel", False) == w_choice.endswith("_pc")
    assert spec["a"]["asymmetric"] is True
    conv = net.get_submodule("body.0.body.0")
    assert conv.w_quant.scale().numel() == (conv.out_channels if w_choice.endswith("_pc") else 1)
    assert conv.a_quant.strategy == a_choice
