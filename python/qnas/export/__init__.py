"""`qnas export`: a trained, fully quantized network (FQSR, Wang et al., ACM MM 2021) as a packed model
file (qnas.deploy.format, integer inference with qops) or as ONNX with QuantizeLinear/DequantizeLinear
(qnas.export.onnx). docs/deploy.md describes both.

The network is traced with torch.fx, keeping the quantized building blocks whole (QuantConv2d, QuantAdd,
quantizers, ReLU, PixelShuffle), and each becomes nodes of the deploy graph:

- QuantConv2d(a_quant, w_quant)  -> "conv" (input step, packed weight codes, per-channel weight steps, bias)
- QuantAdd z = Q(Q(x) + Q(y))    -> "quantize" x, "quantize" y, "add", "quantize" the sum
- x + buffer (MeanShift)         -> "add_const";  x * number (residual scaling) -> "mul_const"
- ReLU, PReLU, LeakyReLU, PixelShuffle -> "relu", "prelu", "leaky_relu", "pixel_shuffle"
- NearestAnchor y + up(x)         -> "upsample" (nearest) of x, "add" (the anchor skip, before the
                                    output quantizer, as the trained network adds it)
- torch.cat along channels (RFDN-style feature distillation) -> "concat"
- BatchNorm2d (inference)        -> "affine" (per-channel scale and shift)
- the output quantizer (a forward hook of the root module) -> "quantize", then "clamp" to the image range.

Anything else (a float convolution, a float skip connection, an unknown module or function) cannot run
on the integer path and is a one-line QnasError naming the layer: export is for fully quantized networks.
"""

from __future__ import annotations

import math
import operator
import os
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import qnas.nas.derive  # noqa: F401  (registers the network kind "genotype": retrained searched networks)
from qnas.deploy.format import FORMAT, bias_step, write_packed
from qnas.errors import QnasError
from qnas.quant.modules import OutputQuantizer, QuantAdd, QuantConv2d
from qnas.quant.quantizers import Quantizer
from qnas.runs.network import load_network, network_scale
from qnas.sr.common import NearestAnchor
from qops.nn import PackedConv2d

__all__ = ["ExportError", "packed_graph", "export_packed", "load_run_packed"]


class ExportError(QnasError):
    """A network that the packed / ONNX formats cannot represent."""


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (QuantConv2d, QuantAdd, Quantizer, OutputQuantizer, nn.Conv2d, NearestAnchor)):
            return True
        return super().is_leaf_module(m, qualname)


def quantizer_step(q: Quantizer, where: str) -> torch.Tensor:
    """The step its forward pass quantizes with (float32, [channels]); quantizers whose forward is not
    s * clamp(round(x / s)) (DoReFa's tanh weights) cannot be exported."""
    s = q.deploy_step()
    if s is None:
        raise ExportError(f"{where}: quantizer {q.strategy!r} is not a uniform step quantizer; cannot export")
    if not bool(q.initialized):
        raise ExportError(f"{where}: quantizer was never initialised (the run saw no data)")
    return s.clone()


class _GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list[dict] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.count = 0

    def value(self) -> str:
        self.count += 1
        return f"v{self.count}"

    def add(
        self, op: str, name: str, inputs: list[str], tensors: dict[str, torch.Tensor] | None = None, **attrs
    ):
        out = self.value()
        node: dict[str, Any] = {"op": op, "name": name, "inputs": inputs, "output": out, **attrs}
        if tensors:
            node["tensors"] = {}
            for role, t in tensors.items():
                key = f"{name}.{role}"
                self.tensors[key] = t.detach().cpu().contiguous()
                node["tensors"][role] = key
        self.nodes.append(node)
        return out

    def quantize(self, q: Quantizer, name: str, x: str) -> str:
        if q.axis is not None:
            raise ExportError(f"{name}: per-channel activation quantizer; only per-tensor steps are exported")
        s = quantizer_step(q, name)
        return self.add("quantize", name, [x], {"scale": s}, bits=int(q.bits), signed=bool(q.signed))

    def conv(self, m: QuantConv2d, name: str, x: str) -> str:
        if m.w_quant is None or m.a_quant is None:
            side = "weight" if m.w_quant is None else "input"
            raise ExportError(
                f"{name}: convolution with a float {side}; export needs a fully quantized network"
            )
        if m.a_quant.axis is not None:
            raise ExportError(f"{name}: per-channel activation quantizer; only per-tensor steps are exported")
        if m.w_bits > 8 or m.a_bits > 8:
            raise ExportError(
                f"{name}: {m.w_bits}-bit weights / {m.a_bits}-bit inputs; the integer conv takes 1..8"
            )
        try:
            packed = PackedConv2d.from_conv(
                m, quantizer_step(m.w_quant, name), float(quantizer_step(m.a_quant, name)[0]), m.w_bits, m.a_bits,
                m.a_quant.signed,
            )  # fmt: skip
        except ValueError as e:
            raise ExportError(f"{name}: {e}") from e
        a_scale = quantizer_step(m.a_quant, name)
        tensors = {"weight": packed.w_packed, "w_scale": packed.w_scale, "a_scale": a_scale}
        if packed.bias is not None:
            # Integer inference adds the bias to the int32 accumulator: it is stored as int32 at the
            # product of the steps (what QDQ runtimes such as onnxruntime also do with a float bias).
            step = bias_step(a_scale, packed.w_scale)
            tensors["bias"] = torch.round(packed.bias / step).clamp(-(2**31), 2**31 - 1).to(torch.int32)
        return self.add(
            "conv",
            name,
            [x],
            tensors,
            w_shape=list(packed.w_shape),
            w_bits=packed.w_bits,
            a_bits=packed.a_bits,
            a_signed=packed.a_signed,
            stride=list(packed.stride),
            padding=list(packed.padding),
        )


def packed_graph(model: nn.Module, scale: int, description: dict | None = None) -> tuple[dict, dict]:
    """(graph, tensors) of the deploy format for a fully quantized SR network in eval mode."""
    try:
        fx = _Tracer().trace(model)
    except Exception as e:  # data-dependent control flow and the like: name it in one line
        raise ExportError(
            f"{type(model).__name__}: cannot be traced ({' '.join(str(e).split())[:160]})"
        ) from e
    modules = dict(model.named_modules())
    b = _GraphBuilder()
    env: dict[str, Any] = {}
    channels = int(getattr(model, "in_channels", 3))
    out_value = None
    for n in fx.nodes:
        if n.op == "placeholder":
            if env:
                raise ExportError(f"{type(model).__name__}: more than one input")
            env[n.name] = "input"
        elif n.op == "get_attr":
            env[n.name] = _attr(model, n.target)
        elif n.op == "call_module":
            env[n.name] = _module_node(b, modules[n.target], n.target, [env[a.name] for a in n.args])
        elif n.op == "call_function":
            env[n.name] = _function_node(b, n, [_arg(env, a) for a in n.args], n.kwargs)
        elif n.op == "call_method":
            raise ExportError(f"{n.name}: method .{n.target}() is not supported by the packed format")
        elif n.op == "output":
            out_value = _arg(env, n.args[0])
    if not isinstance(out_value, str):
        raise ExportError(f"{type(model).__name__}: the output is not a single tensor")
    oq = getattr(model, "output_quant", None)
    if not isinstance(oq, OutputQuantizer):
        raise ExportError(f"{type(model).__name__}: the network output is not quantized (not a FQSR network)")
    out_value = b.quantize(oq.quant, "output_quant", out_value)
    rgb_range = float((description or {}).get("kwargs", {}).get("rgb_range", 1.0))
    out_value = b.add("clamp", "output_clamp", [out_value], min=0.0, max=rgb_range)
    graph = {
        "format": FORMAT,
        "input": {"name": "input", "channels": channels},
        "scale": int(scale),
        "model": description or {},
        "nodes": b.nodes,
        "output": out_value,
    }
    return graph, b.tensors


def _attr(model: nn.Module, target: str) -> torch.Tensor:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _arg(env: dict, a: Any) -> Any:
    if isinstance(a, torch.fx.Node):
        return env[a.name]
    if isinstance(a, (list, tuple)):  # torch.cat's list of tensors
        return [_arg(env, v) for v in a]
    return a


def _module_node(b: _GraphBuilder, m: nn.Module, name: str, args: list) -> str:
    if not all(isinstance(a, str) for a in args):
        raise ExportError(f"{name}: takes a constant input")
    if isinstance(m, QuantConv2d):
        return b.conv(m, name, args[0])
    if isinstance(m, nn.Conv2d):
        raise ExportError(f"{name}: float convolution; export needs a fully quantized network (--quant fqsr)")
    if isinstance(m, QuantAdd):
        qx = b.quantize(m.q_x, f"{name}.q_x", args[0])
        qy = b.quantize(m.q_y, f"{name}.q_y", args[1])
        return b.quantize(m.q_out, f"{name}.q_out", b.add("add", name, [qx, qy]))
    if isinstance(m, Quantizer):
        return b.quantize(m, name, args[0])
    if isinstance(m, nn.ReLU):
        return b.add("relu", name, args)
    if isinstance(m, nn.PReLU):
        return b.add("prelu", name, args, {"slope": m.weight.detach().float().reshape(-1)})
    if isinstance(m, nn.LeakyReLU):
        return b.add("leaky_relu", name, args, slope=float(m.negative_slope))
    if isinstance(m, nn.BatchNorm2d):  # inference batch norm: a per-channel affine map
        if m.running_mean is None or m.running_var is None:
            raise ExportError(f"{name}: batch norm without running statistics")
        scale = (m.weight.detach() if m.affine else 1.0) / torch.sqrt(m.running_var + m.eps)
        shift = (m.bias.detach() if m.affine else 0.0) - m.running_mean * scale
        return b.add("affine", name, args, {"scale": scale.float(), "shift": shift.float()})
    if isinstance(m, NearestAnchor):
        up = b.add("upsample", f"{name}.upsample", [args[1]], factor=m.scale)
        return b.add("add", name, [args[0], up])
    if isinstance(m, nn.PixelShuffle):
        return b.add("pixel_shuffle", name, args, factor=int(m.upscale_factor))
    if isinstance(m, nn.Identity):
        return args[0]
    raise ExportError(f"{name}: {type(m).__name__} is not supported by the packed format")


def _function_node(b: _GraphBuilder, n: torch.fx.Node, args: list, kwargs: dict) -> str:
    f = n.target
    name = n.name
    if f in (operator.add, torch.add, operator.sub, torch.sub) and len(args) == 2 and not kwargs:
        values = [a for a in args if isinstance(a, str)]
        consts = [a for a in args if not isinstance(a, str)]
        if len(values) == 2:
            raise ExportError(
                f"{name}: a float sum of two tensors (a skip connection that is not a QuantAdd)"
            )
        if len(values) == 1:
            c = torch.as_tensor(consts[0], dtype=torch.float32).detach()
            if f in (operator.sub, torch.sub):
                if not isinstance(args[0], str):
                    raise ExportError(f"{name}: constant minus tensor is not supported")
                c = -c
            return b.add("add_const", name, values, {"value": c.reshape(c.shape if c.dim() else (1,))})
    if f in (operator.mul, torch.mul) and len(args) == 2 and not kwargs:
        values = [a for a in args if isinstance(a, str)]
        consts = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        if len(values) == 1 and len(consts) == 1:
            return b.add("mul_const", name, values, value=float(consts[0]))
    if f in (torch.relu, F.relu) and len(args) == 1 and isinstance(args[0], str):
        return b.add("relu", name, args)
    if f is torch.cat and len(args) >= 1 and isinstance(args[0], (list, tuple)):
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if dim == 1 and len(args[0]) >= 2 and all(isinstance(a, str) for a in args[0]):
            return b.add("concat", name, list(args[0]))
    if f in (F.pixel_shuffle, torch.pixel_shuffle) and isinstance(args[0], str):
        return b.add("pixel_shuffle", name, [args[0]], factor=int(args[1]))
    what = getattr(f, "__name__", str(f))
    raise ExportError(f"{name}: {what} is not supported by the packed format")


def load_run_packed(run: str | os.PathLike) -> tuple[dict, dict]:
    """(graph, tensors) of a training run folder (or model.pt) of a fully quantized SR network: an FQSR
    run (`qnas train --quant fqsr`) or a retrained searched network (`qnas train --arch`)."""
    from qnas.nas.adq import ADQ

    net, blob = load_network(run)
    cfg = blob["network"]
    plan = getattr(net, "qnas_quant", None)
    if not plan:
        raise ExportError(
            f"{run}: a full-precision run; export a fully quantized one (`qnas train --quant fqsr`)"
        )
    for name, m in net.named_modules():
        if isinstance(m, ADQ):
            raise ExportError(
                f"{run}: {name}: ADQ scales by the whole image's standard deviation, which has no integer "
                "form; retrain without --adq"
            )
    if cfg.get("kind") == "genotype":
        description = {"name": f"genotype:{cfg['genotype']['space']['name']}", "scale": network_scale(cfg)}
    else:
        description = dict(cfg.get("model", {}))
    description["quant"] = {k: plan.get(k) for k in ("scheme", "bits", "skip_bits", "io_bits")}
    return packed_graph(net, network_scale(cfg), description)


def export_packed(run: str | os.PathLike, out: str | os.PathLike) -> int:
    """Writes the packed file of `run` to `out` atomically; returns its size in bytes."""
    graph, tensors = load_run_packed(run)
    return write_packed(out, graph, tensors)


def agreement_psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> float:
    """PSNR (dB, RGB, whole image) between two renderings of the same image; inf when identical."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)


def check_image(size: int = 96) -> torch.Tensor:
    """The check input: a size x size centre crop of the builtin validation photograph "chelsea" in [0, 1]."""
    from qnas.data.builtin import builtin_path
    from qnas.data.images import load_image

    img = torch.from_numpy(load_image(builtin_path("chelsea"))).permute(2, 0, 1).float() / 255
    h, w = img.shape[1:]
    y0, x0 = (h - size) // 2, (w - size) // 2
    return img[None, :, y0 : y0 + size, x0 : x0 + size].contiguous()


def check_export(
    run: str | os.PathLike, path: str | os.PathLike, fmt: str, exported: tuple[dict, dict] | None = None
) -> str:
    """Reads the written file back with the deploy code only and runs it on check_image(): one line with
    the agreement with the trained (fake-quantized) network and, for ONNX, onnxruntime's agreement with
    the packed runtime. A file that does not load or run is an ExportError."""
    from qnas.deploy import PackedModel
    from qnas.deploy.format import read_packed

    net, _ = load_network(run)
    x = check_image()
    with torch.inference_mode():
        trained = net(x).clamp(0, 1)
    graph, tensors = exported if exported is not None else load_run_packed(run)
    packed = PackedModel(graph, tensors)(x)
    fp32_bytes = sum(p.numel() * 4 for p in net.parameters() if not _is_quantizer_param(net, p))
    if fmt == "packed":
        g2, t2 = read_packed(path)
        again = PackedModel(g2, t2)(x)
        if not torch.equal(again, packed):
            raise ExportError(f"{path}: reading the file back gives another network")
        size = os.path.getsize(path)
        return (
            f"check: {path} reloads; {size / fp32_bytes:.1%} of the fp32 parameter bytes ({fp32_bytes} B); "
            f"packed runtime vs trained network on a 96x96 crop: {agreement_psnr(again, trained):.2f} dB"
        )
    import numpy as np

    from qnas.export.onnx import ort_session, require_export_extra

    onnx = require_export_extra("onnx")

    try:
        onnx.checker.check_model(str(path), full_check=True)
        out, default = (
            torch.from_numpy(np.asarray(ort_session(path, exact).run(None, {"input": x.numpy()})[0]))
            for exact in (True, False)
        )
    except Exception as e:  # checker / runtime errors have many types: report them in one line
        raise ExportError(f"{path}: onnx check failed ({' '.join(str(e).split())[:160]})") from e
    return (
        f"check: onnx.checker passes; onnxruntime (CPU) vs packed runtime on a 96x96 crop: "
        f"{agreement_psnr(out, packed):.2f} dB ({agreement_psnr(default, packed):.2f} dB with all of "
        f"onnxruntime's optimizations, see docs/deploy.md), vs trained network: "
        f"{agreement_psnr(out, trained):.2f} dB"
    )


def _is_quantizer_param(net: nn.Module, p: torch.Tensor) -> bool:
    return any(p is q for m in net.modules() if isinstance(m, Quantizer) for q in m.parameters())
