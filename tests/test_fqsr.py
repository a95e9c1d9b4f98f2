"""FQSR fully quantized networks (qnas.quant.apply / modules / inspect) and `qnas train --quant`,
`qnas inspect`: coverage of the plans, the FQSR quantizer's warm-up and calibration loss, the
tracer's verdicts, loading full-precision weights, and the command-line errors. Tiny models."""

import json

import pytest
import torch
from cli_run import run_cli

from qnas.quant.apply import (
    calibration_loss,
    load_float_weights,
    probe_network,
    quantize_network,
    resolve_plan,
)
from qnas.quant.inspect import trace_network
from qnas.quant.modules import QuantAdd, QuantConv2d
from qnas.quant.quantizers import FQSRQuantizer, Quantizer
from qnas.runs.network import load_network
from qnas.sr import build_model
from qnas.sr.common import Add
from qnas.train.train import TrainOptions, train

TINY = {"edsr-baseline": {"n_resblocks": 1, "n_feats": 8}, "srresnet": {"n_blocks": 1, "n_feats": 8}}


def tiny(name="edsr-baseline", **kw):
    torch.manual_seed(0)
    return build_model(name, 2, **{**TINY[name], **kw})


@pytest.mark.parametrize("name,kw", [("edsr-baseline", {}), ("srresnet", {}), ("srresnet", {"bn": False})])
def test_fqsr_quantizes_every_conv_skip_and_output(name, kw):
    m = tiny(name, **kw)
    n_convs = sum(isinstance(x, torch.nn.Conv2d) for x in m.modules())
    n_adds = sum(isinstance(x, Add) for x in m.modules())
    quantize_network(m, {"scheme": "fqsr", "bits": 4})
    convs = [x for x in m.modules() if isinstance(x, torch.nn.Conv2d)]
    assert len(convs) == n_convs and all(isinstance(c, QuantConv2d) for c in convs)
    assert all(c.w_bits == 4 for c in convs)
    assert sum(isinstance(x, QuantAdd) for x in m.modules()) == n_adds
    plan = m.qnas_quant
    json.dumps(plan)  # stored in config.json / model.pt
    first = next(iter(plan["layers"]))
    assert plan["layers"][first]["a"]["bits"] == 8 and plan["output"]["bits"] == 8
    m.eval()
    m(torch.rand(1, 3, 12, 12))  # initialize
    trace = trace_network(m, torch.rand(1, 3, 12, 12))
    assert trace.float_rows == [], [r.flag for r in trace.float_rows]
    assert trace.output.startswith("Q8u")


def test_edsr_res_scale_and_signs():
    """EDSR's residual scaling (a scalar multiply) is folded into the skip's requantization; inputs
    after a ReLU get unsigned quantizers, the others signed."""
    m = tiny("edsr-baseline", res_scale=0.1)
    quantize_network(m, {"scheme": "fqsr", "bits": 4})
    layers = m.qnas_quant["layers"]
    assert layers["body.0.body.2"]["a"]["signed"] is False  # after ReLU
    assert layers["body.0.body.0"]["a"]["signed"] is True
    assert layers["head.0"]["a"]["signed"] is True  # image minus the mean
    m.eval()
    m(torch.rand(1, 3, 12, 12))
    assert trace_network(m, torch.rand(1, 3, 12, 12)).float_rows == []


class _Branches(torch.nn.Module):
    """image -> conv a -> + image (skip) -> relu -> conv b; conv c reads contrast + mean of conv a's
    output (RFDN's channel attention): which inputs are signed is a fact of this graph."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Conv2d(3, 3, 3, padding=1) for _ in range(3))
        self.add = Add()

    def forward(self, x):
        y = self.a(x)
        stats = y.std(dim=(2, 3), keepdim=True) + y.mean(dim=(2, 3), keepdim=True)
        return self.b(torch.relu(self.add(y, x))) + self.c(stats)


@pytest.mark.parametrize("bias", [0.0, 1.0, -1.0])
def test_probe_signs_do_not_depend_on_the_weights(bias):
    """A branch whose initial weights make its output non-negative on the probe's image (here: zero
    weights, a positive bias) still gets signed quantizers; the weights' sign pattern decides nothing."""
    m = _Branches()
    with torch.no_grad():
        m.a.weight.zero_()
        m.a.bias.fill_(bias)
    probe = probe_network(m)
    assert probe["convs"] == {"a": True, "b": True, "c": False}
    assert probe["adds"] == {"add": [False, True, False]}


def test_derived_network_signs_do_not_depend_on_the_random_init():
    """A derived network is rebuilt (randomly initialised, then loaded) in every process that evaluates
    it: its quantizers' code ranges must come out the same every time. (The tail's residual branch,
    freshly initialised, outputs only positive values on the probe's image for some seeds; its skip
    quantizer was then unsigned and the loaded network's negative residuals were clipped to zero.)"""
    from qnas.nas.derive import DerivedNetwork, uniform_genotype
    from qnas.spaces import load_space

    g = uniform_genotype(load_space("basic"), 2, "conv3x3", 4)
    ranges = []
    for seed in (0, 7, 16, 21):
        torch.manual_seed(seed)
        net = DerivedNetwork(g)
        ranges.append({n: (m.qmin, m.qmax) for n, m in net.named_modules() if isinstance(m, Quantizer)})
    assert all(r == ranges[0] for r in ranges[1:])
    assert ranges[0]["net.nodes.tail.add.q_x"][0] < 0


def test_uniform_and_float_networks_are_flagged():
    m = tiny()
    quantize_network(m, {"scheme": "uniform", "bits": 4})
    assert not isinstance(m.head[0], QuantConv2d) and not isinstance(m.tail[1], QuantConv2d)
    assert isinstance(m.body[0].body[0], QuantConv2d)
    m.eval()
    m(torch.rand(1, 3, 12, 12))
    flags = [r.flag for r in trace_network(m, torch.rand(1, 3, 12, 12)).float_rows]
    assert any("weight is float" in f for f in flags)  # first/last layers
    assert any("add of" in f for f in flags)  # skips in float
    assert any("output is not quantized" in f for f in flags)
    fp = trace_network(tiny(), torch.rand(1, 3, 12, 12))
    assert len(fp.float_rows) > 3


def test_fqsr_quantizer_warmup_then_quantizes():
    q = FQSRQuantizer(4, signed=True, warmup=3, init_stat="max")
    xs = [torch.randn(1000) * (k + 1) for k in range(3)]
    for x in xs:
        assert torch.equal(q(x), x)  # pass-through while collecting statistics
        assert q.calibration_error is None
    expected = sum(x.abs().max() for x in xs) / 3 / 7
    assert q.step.item() == pytest.approx(expected.item(), rel=1e-5)
    x = torch.randn(1000, requires_grad=True)
    y = q(x)
    codes = y.detach() / q.step.detach()
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 8
    q.calibration_error.backward()
    assert q.log_step.grad is not None and q.log_step.grad.abs() > 0


def test_calibration_loss_reaches_training():
    m = tiny()
    quantize_network(m, {"scheme": "fqsr", "bits": 4, "warmup": 1, "calibration_weight": 0.5})
    m.train()
    m(torch.rand(2, 3, 12, 12))  # warm-up
    assert calibration_loss(m) is None
    m(torch.rand(2, 3, 12, 12))
    loss = m.auxiliary_loss()
    assert loss is not None and loss.requires_grad and loss.item() > 0
    loss.backward()
    assert m.head[0].a_quant.log_step.grad is not None


def test_load_float_weights_and_other_model():
    fp = tiny()
    q = tiny()
    quantize_network(q, {"scheme": "fqsr", "bits": 4})
    load_float_weights(q, fp.state_dict(), "fp")
    assert torch.equal(q.head[0].weight, fp.head[0].weight)
    other = build_model("edsr-baseline", 2, n_resblocks=1, n_feats=16)
    with pytest.raises(Exception, match="another model"):
        load_float_weights(q, other.state_dict(), "other")


def test_plan_errors():
    from qnas.errors import QnasError

    with pytest.raises(QnasError, match="out of range"):
        resolve_plan(tiny(), {"scheme": "fqsr", "bits": 9})
    with pytest.raises(QnasError, match="unknown"):
        resolve_plan(tiny(), {"scheme": "uniform", "bits": 4, "quantizer": "nope"})
    with pytest.raises(QnasError, match="scheme"):
        resolve_plan(tiny(), {"scheme": "fancy", "bits": 4})


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "fp"
    network = {"kind": "sr", "model": {"name": "edsr-baseline", "scale": 2, "kwargs": TINY["edsr-baseline"]}}
    opts = TrainOptions(steps=2, batch_size=2, patch_size=16, checkpoint_every=2)
    train(network, opts, out, progress=False)
    return out


def test_cli_fqsr_train_eval_inspect(fp_run, tmp_path, capsys):
    out = tmp_path / "fqsr"
    args = ["train", "--init", fp_run, "--quant", "fqsr", "--bits", "4", "--steps", "3"]
    args += ["--batch-size", "2", "--patch-size", "16", "--out", out, "--quiet"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    net, blob = load_network(out)
    assert blob["network"]["quant"]["scheme"] == "fqsr"
    fp, _ = load_network(fp_run)
    # The quantized run started from the FP weights (3 small steps later they are still close).
    assert torch.allclose(net.body[1].weight, fp.body[1].weight, atol=1e-2)
    assert all(c.w_quant.initialized for c in net.modules() if isinstance(c, QuantConv2d))
    code, text, err = run_cli(["inspect", out, "--strict"], capsys)
    assert code == 0, text + err
    assert "no float operation between input and output" in text
    code, text, err = run_cli(["eval", "--checkpoint", out, "--format", "json"], capsys)
    assert code == 0 and json.loads(text)["psnr"] > 10
    code, text, err = run_cli(["inspect", fp_run, "--strict"], capsys)
    assert code == 1 and "FLOAT" in text


def test_cli_uniform_cost_reports_bits(fp_run, tmp_path, capsys):
    out = tmp_path / "u"
    args = ["train", "--init", fp_run, "--quant", "uniform", "--bits", "3", "--quantizer", "pact"]
    args += ["--steps", "1", "--batch-size", "2", "--patch-size", "16", "--out", out, "--quiet"]
    assert run_cli(args, capsys)[0] == 0
    from qnas.cost import count_cost

    net, _ = load_network(out)
    cost = {lc.name: lc for lc in count_cost(net, (8, 8)).layers}
    assert cost["body.0.body.0"].w_bits == 3 and cost["head.0"].w_bits == 32


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--quant", "fqsr", "--bits", "9"], "out of range"),
        (["--quant", "fqsr"], "needs --bits"),
        (["--quant", "uniform", "--bits", "4", "--quantizer", "nope"], "unknown"),
        (["--quant", "uniform", "--bits", "4", "--quantizer", "hwgq"], "activations only"),
        (["--bits", "4"], "need --quant"),
        (["--model", "edsr-baseline", "--quant", "fqsr", "--bits", "4"], "another model"),
        (["--model", "srresnet", "--quant", "fqsr", "--bits", "4"], "another model"),
        (["--quant", "uniform", "--bits", "1"], "out of range"),
        (["--quant", "fqsr", "--bits", "4", "--skip-bits", "16"], "out of range"),
        (["--quant", "uniform", "--bits", "4", "--quantizer", "lsq", "--skip-bits", "8"], "fqsr only"),
    ],
)
def test_cli_train_errors(fp_run, tmp_path, capsys, extra, needle):
    args = ["train", "--init", fp_run, *extra, "--steps", "1", "--out", tmp_path / "x", "--quiet"]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_tail_bits_sets_the_last_input_only():
    plan = resolve_plan(tiny(), {"scheme": "fqsr", "bits": 2, "tail_bits": 8})
    bits = {name: spec["a"]["bits"] for name, spec in plan["layers"].items()}
    names = list(bits)
    assert bits[names[0]] == 8 and bits[names[-1]] == 8  # the image, and the last convolution's input
    assert set(bits[n] for n in names[1:-1]) == {2}
    assert all(spec["w"]["bits"] == 2 for spec in plan["layers"].values())
    same = resolve_plan(tiny(), {"scheme": "fqsr", "bits": 2, "tail_bits": None})
    assert same["layers"][names[-1]]["a"]["bits"] == 2 and same["tail_bits"] == 2
    # The default: an 8-bit last input (docs/RESULTS.md, the FQSR ablation); weights at "bits".
    default = resolve_plan(tiny(), {"scheme": "fqsr", "bits": 2})
    assert default["layers"][names[-1]]["a"]["bits"] == 8 and default["layers"][names[-1]]["w"]["bits"] == 2
    edge = resolve_plan(tiny(), {"scheme": "fqsr", "bits": 2, "edge_weight_bits": 8})
    assert [edge["layers"][n]["w"]["bits"] for n in (names[0], names[1], names[-1])] == [8, 2, 8]


def test_distillation_loss_is_the_l1_to_the_teacher(fp_run):
    """distill_weight · mean|y_q − y_fp| (+ the feature term), added to the calibration loss; the
    teacher is loaded from its run, stays out of the state dict, and only the student gets gradients."""
    fp, _ = load_network(fp_run)
    m = tiny()
    plan = {"scheme": "fqsr", "bits": 4, "warmup": 0, "calibration_weight": 0.0, "teacher": str(fp_run)}
    quantize_network(m, {**plan, "distill_weight": 2.0})
    load_float_weights(m, fp.state_dict(), "fp")
    keys = set(m.state_dict())
    m.train()
    x = torch.rand(2, 3, 12, 12)
    y = m(x)
    loss = m.auxiliary_loss()
    with torch.no_grad():
        expected = 2.0 * (y - fp(x)).abs().mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and loss.item() > 0
    loss.backward()
    assert m.body[1].weight.grad is not None and m.body[1].weight.grad.abs().sum() > 0
    assert set(m.state_dict()) == keys and not any(p.grad is not None for p in fp.parameters())
    assert m.auxiliary_loss() is None  # consumed; evaluation forwards record nothing
    m.eval()
    m(x)
    assert m.auxiliary_loss() is None
    # Features: zero at identical networks' skips is impossible after quantization, positive here.
    f = tiny()
    quantize_network(f, {**plan, "distill_feature_weight": 1.0})
    load_float_weights(f, fp.state_dict(), "fp")
    f.train()
    f(x)
    assert f.auxiliary_loss().item() > 0


def test_cli_fqsr_quant_options_and_packed_eval(fp_run, tmp_path, capsys):
    """--quant-options sets plan options (the --init run becomes the teacher); the exported packed
    file evaluates with `qnas eval --checkpoint FILE` like the run it came from."""
    out = tmp_path / "kd"
    options = json.dumps({"distill_weight": 1, "tail_bits": 8})
    args = ["train", "--init", fp_run, "--quant", "fqsr", "--bits", "4", "--steps", "3", "--quant-options"]
    args += [options, "--batch-size", "2", "--patch-size", "16", "--out", out, "--quiet"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    plan = load_network(out)[1]["network"]["quant"]
    assert plan["teacher"] == str(fp_run) and plan["distill_weight"] == 1 and plan["tail_bits"] == 8
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["aux_loss"] > 0 for r in metrics if r["step"] > 1)
    qnp = tmp_path / "kd.qnp"
    assert run_cli(["export", out, "--format", "packed", "--out", qnp, "--no-check"], capsys)[0] == 0
    code, text, err = run_cli(["eval", "--checkpoint", qnp, "--format", "json"], capsys)
    assert code == 0, err
    packed = json.loads(text)
    code, text, _ = run_cli(["eval", "--checkpoint", out, "--format", "json"], capsys)
    trained = json.loads(text)
    assert packed["scale"] == 2 and abs(packed["psnr"] - trained["psnr"]) < 0.1
    bad = tmp_path / "bad.qnp"
    bad.write_bytes(b"not a model")
    code, _, err = run_cli(["eval", "--checkpoint", bad], capsys)
    assert code == 2 and str(bad) in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--quant-options", '{"nope": 1}'], "unknown nope"),
        (["--quant-options", "{"], "not valid JSON"),
        (["--quant-options", '{"tail_bits": 9}'], "out of range"),
        (["--quant-options", '{"distill_weight": -1}'], "distill_weight"),
    ],
)
def test_cli_quant_options_errors(fp_run, tmp_path, capsys, extra, needle):
    args = ["train", "--init", fp_run, "--quant", "fqsr", "--bits", "4", *extra]
    code, _, err = run_cli([*args, "--steps", "80", "--out", tmp_path / "x", "--quiet"], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_distillation_needs_a_teacher(tmp_path, capsys):
    args = [
        "train",
        "--model",
        "edsr-baseline",
        "--model-args",
        json.dumps(TINY["edsr-baseline"]),
        "--scale",
        "2",
    ]
    args += [
        "--quant",
        "fqsr",
        "--bits",
        "4",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--patch-size",
        "16",
        "--quiet",
    ]
    code, _, err = run_cli(
        [*args, "--quant-options", '{"distill_weight": 1}', "--out", tmp_path / "a"], capsys
    )
    assert code == 2 and "teacher" in err
    # Without --init the default distillation is simply off.
    code, _, err = run_cli([*args, "--out", tmp_path / "b"], capsys)
    assert code == 0, err
    assert load_network(tmp_path / "b")[1]["network"]["quant"]["distill_weight"] == 0
    code, _, err = run_cli(
        [*args, "--quant", "uniform", "--quant-options", "{}", "--out", tmp_path / "c"], capsys
    )
    assert code == 2 and "fqsr only" in err
