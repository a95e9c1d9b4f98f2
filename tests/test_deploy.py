"""Deployment: `qnas export --format packed|onnx`, the packed runtime (qnas.deploy), tiling, and
`qnas upscale`, with their errors. A tiny FQSR edsr-baseline trained for two steps keeps it fast."""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from cli_run import run_cli
from PIL import Image

from qnas.deploy import FORMAT, PackedModel, PackedModelError, read_packed
from qnas.deploy.format import bias_step, packed_bytes
from qnas.export import agreement_psnr, check_image, load_run_packed
from qnas.quant.modules import QuantConv2d
from qnas.runs.network import load_network
from qnas.train.train import TrainOptions, train

TINY = {"n_resblocks": 2, "n_feats": 8}


@pytest.fixture(scope="module")
def fqsr_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "fqsr"
    network = {
        "kind": "sr",
        "model": {"name": "edsr-baseline", "scale": 2, "kwargs": TINY},
        "quant": {"scheme": "fqsr", "bits": 4, "warmup": 1},
    }
    train(
        network,
        TrainOptions(scale=2, steps=2, batch_size=2, patch_size=16, checkpoint_every=2),
        out,
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def packed_file(fqsr_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "tiny.qnp"
    graph, tensors = load_run_packed(fqsr_run)
    path.write_bytes(packed_bytes(graph, tensors))
    return path


def _pngs(folder, n, size=(14, 11)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)).save(
            folder / f"im{i}.png"
        )
    return folder


def test_export_packed_cli_and_format(fqsr_run, tmp_path, capsys):
    out = tmp_path / "m.qnp"
    code, text, err = run_cli(["export", fqsr_run, "--format", "packed", "--out", out], capsys)
    assert code == 0, err
    assert "reloads" in text and "dB" in text
    graph, tensors = read_packed(out)
    assert graph["format"] == FORMAT and graph["scale"] == 2
    # No pickle: a plain safetensors header followed by raw bytes.
    data = out.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    assert header["__metadata__"]["format"] == FORMAT
    convs = [nd for nd in graph["nodes"] if nd["op"] == "conv"]
    net, _ = load_network(fqsr_run)
    assert len(convs) == sum(isinstance(m, QuantConv2d) for m in net.modules())
    assert {c["w_bits"] for c in convs} == {4} and convs[0]["a_bits"] == 8 and convs[0]["a_signed"]
    assert tensors[convs[1]["tensors"]["weight"]].dtype == torch.uint8
    assert tensors[convs[1]["tensors"]["bias"]].dtype == torch.int32
    # Every skip is Q(Q(x) + Q(y)) and the output is quantized, then clamped to the image range.
    adds = [i for i, nd in enumerate(graph["nodes"]) if nd["op"] == "add"]
    assert len(adds) == TINY["n_resblocks"] + 1
    for i in adds:
        ins = {nd["output"]: nd for nd in graph["nodes"][:i]}
        assert all(ins[v]["op"] == "quantize" for v in graph["nodes"][i]["inputs"])
        assert graph["nodes"][i + 1]["op"] == "quantize"
    assert [nd["op"] for nd in graph["nodes"][-2:]] == ["quantize", "clamp"]


def test_packed_runtime_is_the_trained_network(fqsr_run, packed_file):
    """What you train is what you ship: the fake-quantized network uses its biases on the int32 grid of
    the accumulator (what the packed file stores), so the packed runtime computes it bit for bit."""
    net, _ = load_network(fqsr_run)
    graph, tensors = read_packed(packed_file)
    by_name = {nd["name"]: nd for nd in graph["nodes"]}
    for name, m in net.named_modules():
        if isinstance(m, QuantConv2d):
            t = by_name[name]["tensors"]
            step = bias_step(tensors[t["a_scale"]], tensors[t["w_scale"]])
            torch.testing.assert_close(m.integer_bias(), tensors[t["bias"]].float() * step, rtol=0, atol=0)
    x = torch.rand(1, 3, 13, 17, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = net(x).clamp(0, 1)
    y = PackedModel(graph, tensors)(x)
    assert y.shape == (1, 3, 26, 34)
    assert torch.equal(y, ref)


def test_integer_pipeline_keeps_codes_between_layers(packed_file):
    """Activations stay int8/uint8 codes from the first conv to the output quantizer, and the result is the
    float pipeline's (every conv dequantized, every quantize node a fake_quant) bit for bit."""
    graph, tensors = read_packed(packed_file)
    model = PackedModel(graph, tensors)
    codes = model.code_values
    nodes = graph["nodes"]
    convs = [nd for nd in nodes if nd["op"] == "conv"]
    # All convs emit codes but the head (its output feeds three quantizers on different grids) and the
    # tail (its output goes on to the mean shift, then the output quantizer).
    assert [nd["name"] for nd in convs if nd["output"] not in codes] == [convs[0]["name"], convs[-1]["name"]]
    for nd in nodes:
        if nd["op"] in ("add", "relu", "pixel_shuffle") or (nd["op"] == "quantize" and nd is not nodes[-2]):
            assert nd["output"] in codes, nd["name"]
    x = torch.rand(2, 3, 21, 19, generator=torch.Generator().manual_seed(3))
    assert torch.equal(model(x), PackedModel(graph, tensors, integer=False)(x))


def test_runtime_needs_no_training_code(packed_file):
    code = (
        "import sys, torch\n"
        "from qnas.deploy import PackedModel\n"
        f"m = PackedModel.load({str(packed_file)!r})\n"
        "y = m(torch.rand(1, 3, 9, 10))\n"
        "assert y.shape == (1, 3, 18, 20)\n"
        "bad = [n for n in sys.modules if n.startswith(('qnas.quant', 'qnas.train', 'qnas.sr', 'qnas.nas'))]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr


def test_export_onnx_qdq_and_onnxruntime(fqsr_run, packed_file, tmp_path, capsys):
    import onnx

    from qnas.export.onnx import ort_session

    out = tmp_path / "m.onnx"
    code, text, err = run_cli(["export", fqsr_run, "--format", "onnx", "--out", out], capsys)
    assert code == 0, err
    assert "onnx.checker passes" in text
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == sum(1 for nd in read_packed(packed_file)[0]["nodes"] if nd["op"] == "conv")
    for c in convs:
        x_dq, w_dq = producer[c.input[0]], producer[c.input[1]]
        assert x_dq.op_type == "DequantizeLinear" and producer[x_dq.input[0]].op_type == "QuantizeLinear"
        assert w_dq.op_type == "DequantizeLinear" and inits[w_dq.input[0]].data_type == onnx.TensorProto.INT8
    for a in (n for n in model.graph.node if n.op_type == "Add" and not any(i in inits for i in n.input)):
        assert all(producer[i].op_type == "DequantizeLinear" for i in a.input)
    # 4-bit codes travel in int8 / uint8 with a Clip to their code range before QuantizeLinear.
    assert any(n.op_type == "Clip" and producer.get(n.input[0]) is not None for n in model.graph.node)
    sess = ort_session(out)
    packed = PackedModel.load(packed_file)
    for shape in [(1, 3, 12, 12), (1, 3, 9, 21)]:  # dynamic height and width
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(2))
        y = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
        assert y.shape == (1, 3, 2 * shape[2], 2 * shape[3]) and y.dtype == torch.float32
        assert agreement_psnr(y, packed(x)) >= 40


def test_tiles_with_receptive_overlap_are_exact(packed_file):
    m = PackedModel.load(packed_file)
    radius = m.receptive_radius()
    # head + 2 x 2 block convs + body conv + upsampler conv = 7 LR convs, then one at 2x: 7.5 -> 8.
    assert radius == 8
    x = torch.rand(1, 3, 23, 30, generator=torch.Generator().manual_seed(3))
    whole = m(x)
    calls = []
    tiled = m.upscale(x, tile=7, progress=calls.append)
    assert len(calls) == m.count_tiles(23, 30, 7) == 4 * 5
    assert torch.equal(tiled, whole)
    assert not torch.equal(m.upscale(x, tile=7, overlap=1), whole)  # too little context: not exact


def test_upscale_cli_folder_file_and_run(fqsr_run, packed_file, tmp_path, capsys):
    src = _pngs(tmp_path / "in", 2)
    code, text, err = run_cli(
        ["upscale", "--model", packed_file, src, tmp_path / "out", "--tile", "8"], capsys
    )
    assert code == 0, err
    assert "upscaled 2 image(s) x2" in text and " s/image" in text
    for i in range(2):
        with Image.open(tmp_path / "out" / f"im{i}.png") as im:
            assert im.size == (22, 28)
    # A training run folder works too, and gives the same pixels as its packed export.
    code, _, err = run_cli(
        ["upscale", "--model", fqsr_run, src / "im0.png", tmp_path / "one.png", "--quiet"], capsys
    )
    assert code == 0, err
    a = np.asarray(Image.open(tmp_path / "one.png"))
    b = np.asarray(Image.open(tmp_path / "out" / "im0.png"))
    assert np.array_equal(a, b)
    assert not [p for p in tmp_path.rglob("*.tmp")]


def _bad_version(path, tmp_path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["format"] = "qnas-packed/2"
    new = json.dumps(header).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    out = tmp_path / "newer.qnp"
    out.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n :])
    return out


def test_bad_packed_files(packed_file, tmp_path, capsys):
    img = _pngs(tmp_path / "in", 1) / "im0.png"
    newer = _bad_version(packed_file, tmp_path)
    truncated = tmp_path / "cut.qnp"
    truncated.write_bytes(packed_file.read_bytes()[: packed_file.stat().st_size // 2])
    garbage = tmp_path / "junk.qnp"
    garbage.write_bytes(b"\x00" * 3)
    for path, needle in [(newer, "newer"), (truncated, "truncated"), (garbage, "truncated")]:
        with pytest.raises(PackedModelError, match=needle):
            read_packed(path)
        code, _, err = run_cli(["upscale", "--model", path, img, tmp_path / "o.png"], capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "o.png").exists()


def test_graph_checks(packed_file):
    graph, tensors = read_packed(packed_file)
    bad = json.loads(json.dumps(graph))
    bad["nodes"][3]["op"] = "sigmoid"
    with pytest.raises(PackedModelError, match="unknown op 'sigmoid'"):
        packed_bytes(bad, tensors)
    bad = json.loads(json.dumps(graph))
    conv = next(nd for nd in bad["nodes"] if nd["op"] == "conv")
    conv["w_bits"] = 3
    with pytest.raises(PackedModelError, match="does not match"):
        packed_bytes(bad, tensors)
    bad = json.loads(json.dumps(graph))
    bad["nodes"][1]["inputs"] = ["v999"]
    with pytest.raises(PackedModelError, match="not defined"):
        packed_bytes(bad, tensors)


def test_upscale_bad_images_and_outputs(packed_file, tmp_path, capsys):
    src = _pngs(tmp_path / "in", 2)
    (src / "zz_broken.png").write_bytes(b"this is not a png")
    out = tmp_path / "out"
    code, _, err = run_cli(["upscale", "--model", packed_file, src, out], capsys)
    assert code == 2 and "zz_broken.png: not a readable image" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())  # checked before anything was written
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = run_cli(["upscale", "--model", packed_file, src / "im0.png", blocker / "sub"], capsys)
    assert code == 2 and "cannot create the output folder" in err
    code, _, err = run_cli(["upscale", "--model", packed_file, src / "im0.png", blocker], capsys)
    assert code == 2 and "not a folder" in err


def test_export_errors(tmp_path, capsys):
    fp = tmp_path / "fp"
    network = {"kind": "sr", "model": {"name": "edsr-baseline", "scale": 2, "kwargs": TINY}}
    train(
        network,
        TrainOptions(scale=2, steps=1, batch_size=1, patch_size=16, checkpoint_every=1),
        fp,
        progress=False,
    )
    code, _, err = run_cli(["export", fp, "--format", "packed", "--out", tmp_path / "x.qnp"], capsys)
    assert code == 2 and "full-precision" in err
    assert not (tmp_path / "x.qnp").exists()


def test_check_image_is_deterministic():
    x = check_image(32)
    assert x.shape == (1, 3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert torch.equal(check_image(32), x) and float(x.std()) > 0.05  # the same real image every time


def test_srresnet_with_prelu_and_batchnorm_exports():
    """SRResNet's PReLU and inference batch norm become "prelu" / "affine" nodes; onnxruntime agrees."""

    from qnas.export import packed_graph
    from qnas.export.onnx import onnx_model, ort_session
    from qnas.quant.apply import quantize_network
    from qnas.sr import build_model

    torch.manual_seed(0)
    m = build_model("srresnet", 2, n_blocks=1, n_feats=8)
    quantize_network(m, {"scheme": "fqsr", "bits": 4})
    m(torch.rand(2, 3, 16, 16))  # training mode: batch-norm statistics move
    m.eval()
    graph, tensors = packed_graph(m, 2)
    ops = {nd["op"] for nd in graph["nodes"]}
    assert {"prelu", "affine"} <= ops
    x = torch.rand(1, 3, 11, 13, generator=torch.Generator().manual_seed(4))
    packed = PackedModel(graph, tensors)
    y = packed(x)
    with torch.inference_mode():
        # Inference batch norm runs as a float affine map here and in the runtime: equal to rounding.
        assert agreement_psnr(y, m(x).clamp(0, 1)) > 60
    sess = ort_session(onnx_model(graph, tensors).SerializeToString())
    assert agreement_psnr(torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]), y) >= 40
    assert torch.equal(packed.upscale(x, tile=5), y)


def test_unsupported_layers_are_named():
    from qnas.export import ExportError, packed_graph
    from qnas.quant.apply import quantize_network
    from qnas.sr import build_model

    m = build_model("rfdn", 2, nf=8, n_blocks=1)
    quantize_network(m, {"scheme": "fqsr", "bits": 4})
    m.eval()
    m(torch.rand(1, 3, 16, 16))
    with pytest.raises(ExportError, match="not supported by the packed format"):
        packed_graph(m, 2)


def test_searched_network_with_concat_exports():
    """A derived network of an RFDN-style space (feature distillation by concatenation, LeakyReLU) is fully
    quantized and exports: the concatenation is a graph node in both formats."""

    from qnas.export import packed_graph
    from qnas.export.onnx import onnx_model, ort_session
    from qnas.nas.derive import DerivedNetwork, uniform_genotype

    space = {
        "name": "distill",
        "channels": 8,
        "candidates": ["conv3x3", "conv1x1"],
        "cells": {
            "block": [
                {"name": "d", "op": "layer", "inputs": ["input"], "out": "c//2"},
                {"name": "r", "op": "layer", "inputs": ["input"], "out": "c"},
                {"name": "r_sum", "op": "add", "inputs": ["r", "input"]},
                {"name": "r_act", "op": "act", "fn": "lrelu"},
                {"name": "r2", "op": "layer", "out": "c//2"},
                {"name": "cat", "op": "concat", "inputs": ["d", "r2"]},
            ]
        },
        "network": [
            {"name": "head", "op": "layer", "out": "c"},
            {"name": "body", "op": "residual", "cell": "block"},
            {"name": "up", "op": "layer", "out": "colors*scale*scale"},
            {"name": "ps", "op": "pixel_shuffle"},
        ],
    }
    torch.manual_seed(0)
    net = DerivedNetwork(uniform_genotype(space, 2, "conv3x3", 4))
    net.train()
    net(torch.rand(2, 3, 12, 12))  # initialises every quantizer
    net.eval()
    graph, tensors = packed_graph(net, 2)
    assert any(n["op"] == "concat" and len(n["inputs"]) == 2 for n in graph["nodes"])
    x = torch.rand(1, 3, 10, 9)
    model = PackedModel(graph, tensors)
    assert any(nd["op"] == "concat" and nd["output"] in model.code_values for nd in graph["nodes"])
    packed = model(x)
    assert torch.equal(packed, PackedModel(graph, tensors, integer=False)(x))
    with torch.inference_mode():
        assert torch.equal(packed, net(x).clamp(0, 1))
    sess = ort_session(onnx_model(graph, tensors).SerializeToString())
    assert agreement_psnr(torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]), packed) >= 40


def test_onnx_export_without_the_extra_names_it(fqsr_run, tmp_path, capsys, monkeypatch):
    """onnx and onnxruntime are the `export` extra: without them the command says so in one line."""
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ModuleNotFoundError
    code, _, err = run_cli(["export", fqsr_run, "--format", "onnx", "--out", tmp_path / "m.onnx"], capsys)
    assert code == 2 and "qnas[export]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_trained_packed_and_onnxruntime_agree_bit_for_bit(bits, tmp_path):
    """FQSR at 2, 4 and 8 bits, trained a few steps: the trained (fake-quantized) network, the packed
    runtime and onnxruntime (exact session) give the same floats."""
    from qnas.export.onnx import onnx_model, ort_session

    out = tmp_path / f"fqsr{bits}"
    network = {
        "kind": "sr",
        "model": {"name": "edsr-baseline", "scale": 2, "kwargs": TINY},
        "quant": {"scheme": "fqsr", "bits": bits},
    }
    train(network, TrainOptions(scale=2, steps=3, batch_size=2, patch_size=16), out, progress=False)
    net, _ = load_network(out)
    graph, tensors = load_run_packed(out)
    x = torch.rand(1, 3, 15, 12, generator=torch.Generator().manual_seed(bits))
    with torch.inference_mode():
        trained = net(x).clamp(0, 1)
    packed = PackedModel(graph, tensors)(x)
    via_onnx = ort_session(onnx_model(graph, tensors).SerializeToString()).run(None, {"input": x.numpy()})[0]
    assert torch.equal(packed, trained)
    assert torch.equal(torch.from_numpy(via_onnx), packed)
