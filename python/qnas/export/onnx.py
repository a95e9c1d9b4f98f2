"""ONNX QDQ export of a deploy graph (qnas.deploy.format), built node by node with onnx.helper so the
graph is exactly the packed model's computation:

- "conv": the input goes through [Clip] -> QuantizeLinear -> DequantizeLinear at its step; the weight is
  stored as its integer codes (an int8 initializer, the packed codes unpacked) -> DequantizeLinear with
  the per-output-channel steps (axis 0); then Conv with the float bias.
- "quantize" (the operands and sum of every skip connection, the output): [Clip] -> QuantizeLinear ->
  DequantizeLinear.
- "add" -> Add, "add_const" -> Add of an initializer, "mul_const" -> Mul, "relu" -> Relu, "prelu" -> PRelu,
  "leaky_relu" -> LeakyRelu, "affine" -> Mul and Add of per-channel initializers,
  "pixel_shuffle" -> DepthToSpace (mode CRD, PixelShuffle's channel order), "upsample" -> Resize
  (nearest, asymmetric, floor: each pixel repeated), "clamp" -> Clip.

ONNX's QuantizeLinear saturates to the range of its 8-bit type. Codes of b < 8 bits are carried in int8
(signed) / uint8 (unsigned) with the clipped code range [qmin, qmax] of b bits: a Clip to
[qmin * step, qmax * step] precedes the QuantizeLinear (omitted at 8 bits, where the type's range is
the code range). Zero points are 0 (symmetric quantization). Input "input" and output "output" are
float32 NCHW with dynamic batch, height and width; opset 17.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from qnas.atomic_write import atomic_write_bytes
from qnas.deploy.format import bias_step, quant_range
from qnas.errors import QnasError
from qops.packed import unpack_weight

OPSET = 17

#: onnxruntime graph optimizers that change the numbers of a QDQ graph. DoubleQDQPairsRemover (a basic-level
#: optimizer) merges a chain Q1 -> DQ1 -> Q2 -> DQ2 (a value requantized to a second step, as a quantized
#: skip does with a sum that a skip already quantized) into one Q -> DQ pair: it drops one rounding, so
#: codes change. The extended level's QDQ fusions (DQ -> Conv -> Q into QLinearConv, QLinearAdd, ...)
#: requantize with onnxruntime's own fixed-point arithmetic; they apply where no Clip separates the nodes,
#: i.e. at 8 bits. An exact session therefore runs at the basic level without this optimizer, and then
#: computes the exported graph exactly (the packed runtime's output bit for bit).
ORT_INEXACT_OPTIMIZERS = ("DoubleQDQPairsRemover",)


def require_export_extra(module: str):
    """Imports onnx / onnxruntime, or a one-line QnasError naming the extra that installs them."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise QnasError(f"ONNX export needs {module}: pip install 'qnas[export]'") from None


def ort_session(model: str | os.PathLike | bytes, exact: bool = True):
    """An onnxruntime CPU session of an exported model (a path or the serialized bytes); `exact` runs the
    basic optimization level without ORT_INEXACT_OPTIMIZERS so that it computes what the packed runtime
    computes; otherwise every default optimization is on."""
    ort = require_export_extra("onnxruntime")

    src = model if isinstance(model, bytes) else str(model)
    options = ort.SessionOptions()  # default level: every optimization
    disabled = None
    if exact:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        disabled = list(ORT_INEXACT_OPTIMIZERS)
    return ort.InferenceSession(
        src, options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled
    )


def onnx_model(graph: dict, tensors: dict[str, torch.Tensor]):
    """An onnx.ModelProto of a deploy graph (checked by onnx.checker)."""
    onnx = require_export_extra("onnx")
    from onnx import TensorProto, helper, numpy_helper

    nodes: list = []
    inits: list = []
    names: set[str] = set()

    def init(name: str, array: np.ndarray) -> str:
        assert name not in names, name
        names.add(name)
        inits.append(numpy_helper.from_array(array, name))
        return name

    def qdq(x: str, prefix: str, step: float, bits: int, signed: bool) -> str:
        qmin, qmax = quant_range(bits, signed)
        s = init(f"{prefix}.step", np.array(step, dtype=np.float32))
        zp = init(f"{prefix}.zero_point", np.array(0, dtype=np.int8 if signed else np.uint8))
        full = (-128, 127) if signed else (0, 255)
        if (qmin, qmax) != full:
            lo = init(f"{prefix}.clip_min", np.array(np.float32(qmin) * np.float32(step), dtype=np.float32))
            hi = init(f"{prefix}.clip_max", np.array(np.float32(qmax) * np.float32(step), dtype=np.float32))
            nodes.append(helper.make_node("Clip", [x, lo, hi], [f"{prefix}.clipped"], name=f"{prefix}.clip"))
            x = f"{prefix}.clipped"
        nodes.append(
            helper.make_node("QuantizeLinear", [x, s, zp], [f"{prefix}.q"], name=f"{prefix}.quantize")
        )
        nodes.append(
            helper.make_node(
                "DequantizeLinear", [f"{prefix}.q", s, zp], [f"{prefix}.dq"], name=f"{prefix}.dequantize"
            )
        )
        return f"{prefix}.dq"

    def arr(key: str) -> np.ndarray:
        return tensors[key].detach().cpu().numpy()

    value = {graph["input"]["name"]: "input"}
    for node in graph["nodes"]:
        op, name, out = node["op"], node["name"], node["output"]
        xs = [value[v] for v in node["inputs"]]
        t = node.get("tensors", {})
        y = f"{name}.out"
        if op == "conv":
            a_step = float(arr(t["a_scale"]).reshape(-1)[0])
            x = qdq(xs[0], f"{name}.input", a_step, node["a_bits"], node["a_signed"])
            codes = unpack_weight(tensors[t["weight"]], node["w_shape"], node["w_bits"]).numpy()
            w = init(f"{name}.weight_codes", codes.astype(np.int8))
            ws = init(f"{name}.weight_step", arr(t["w_scale"]).astype(np.float32))
            wz = init(f"{name}.weight_zero_point", np.zeros(node["w_shape"][0], dtype=np.int8))
            nodes.append(
                helper.make_node(
                    "DequantizeLinear", [w, ws, wz], [f"{name}.weight"], name=f"{name}.weight_dq", axis=0
                )
            )
            ins = [x, f"{name}.weight"]
            if "bias" in t:  # int32 codes at the step a_scale * w_scale[c], dequantized per channel
                b = init(f"{name}.bias_codes", arr(t["bias"]).astype(np.int32))
                bs = init(
                    f"{name}.bias_step", bias_step(tensors[t["a_scale"]], tensors[t["w_scale"]]).numpy()
                )
                nodes.append(
                    helper.make_node(
                        "DequantizeLinear", [b, bs], [f"{name}.bias"], name=f"{name}.bias_dq", axis=0
                    )
                )
                ins.append(f"{name}.bias")
            ph, pw = node["padding"]
            nodes.append(
                helper.make_node(
                    "Conv",
                    ins,
                    [y],
                    name=name,
                    kernel_shape=node["w_shape"][2:],
                    pads=[ph, pw, ph, pw],
                    strides=node["stride"],
                )
            )
        elif op == "quantize":
            step = float(arr(t["scale"]).reshape(-1)[0])
            y = qdq(xs[0], name, step, node["bits"], node["signed"])
        elif op == "add":
            nodes.append(helper.make_node("Add", xs, [y], name=name))
        elif op == "add_const":
            c = init(f"{name}.value", arr(t["value"]).astype(np.float32))
            nodes.append(helper.make_node("Add", [xs[0], c], [y], name=name))
        elif op == "mul_const":
            c = init(f"{name}.value", np.array(node["value"], dtype=np.float32))
            nodes.append(helper.make_node("Mul", [xs[0], c], [y], name=name))
        elif op == "relu":
            nodes.append(helper.make_node("Relu", xs, [y], name=name))
        elif op == "prelu":
            c = init(f"{name}.slope", arr(t["slope"]).astype(np.float32).reshape(-1, 1, 1))
            nodes.append(helper.make_node("PRelu", [xs[0], c], [y], name=name))
        elif op == "leaky_relu":
            nodes.append(helper.make_node("LeakyRelu", xs, [y], name=name, alpha=float(node["slope"])))
        elif op == "affine":
            sc = init(f"{name}.scale", arr(t["scale"]).astype(np.float32).reshape(1, -1, 1, 1))
            sh = init(f"{name}.shift", arr(t["shift"]).astype(np.float32).reshape(1, -1, 1, 1))
            nodes.append(helper.make_node("Mul", [xs[0], sc], [f"{name}.scaled"], name=f"{name}.mul"))
            nodes.append(helper.make_node("Add", [f"{name}.scaled", sh], [y], name=name))
        elif op == "pixel_shuffle":
            nodes.append(
                helper.make_node("DepthToSpace", xs, [y], name=name, blocksize=node["factor"], mode="CRD")
            )
        elif op == "upsample":
            r = float(node["factor"])
            sc = init(f"{name}.scales", np.array([1.0, 1.0, r, r], dtype=np.float32))
            # asymmetric + floor: output pixel i reads input pixel floor(i / r), a pixel repeated r times.
            nodes.append(
                helper.make_node(
                    "Resize",
                    [xs[0], "", sc],
                    [y],
                    name=name,
                    mode="nearest",
                    coordinate_transformation_mode="asymmetric",
                    nearest_mode="floor",
                )  # fmt: skip
            )
        elif op == "concat":
            nodes.append(helper.make_node("Concat", xs, [y], name=name, axis=1))
        elif op == "clamp":
            lo = init(f"{name}.min", np.array(node["min"], dtype=np.float32))
            hi = init(f"{name}.max", np.array(node["max"], dtype=np.float32))
            nodes.append(helper.make_node("Clip", [xs[0], lo, hi], [y], name=name))
        else:  # check_graph admits only the ops above
            raise AssertionError(op)
        value[out] = y
    # The graph output gets its fixed name through an Identity.
    nodes.append(helper.make_node("Identity", [value[graph["output"]]], ["output"], name="output"))
    c = int(graph["input"]["channels"])
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c, "H", "W"])
    outp = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", c, "H_out", "W_out"])
    g = helper.make_graph(
        nodes, "qnas_" + str(graph.get("model", {}).get("name", "network")), [inp], [outp], inits
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="qnas")
    model.ir_version = 8  # what opset 17 needs; keeps the file loadable by older runtimes
    model.doc_string = f"qnas export of a x{graph['scale']} network; QDQ, see docs/deploy.md"
    onnx.checker.check_model(model, full_check=True)
    return model


def write_onnx(path: str | os.PathLike, graph: dict, tensors: dict[str, torch.Tensor]) -> int:
    """Writes the ONNX model atomically; returns its size in bytes."""
    data = onnx_model(graph, tensors).SerializeToString()
    atomic_write_bytes(path, data)
    return len(data)
