"""`qnas inspect`: every operation between a network's input and its output, with the quantization
of what it computes on, so a user sees whether anything stays in floating point.

One forward pass on a small input runs under a TorchDispatchMode that sees every ATen operation
(module code, functional calls and inline arithmetic alike), while module hooks say which module
each operation belongs to. Each tensor gets a domain:

- ``input``: the network input (an image, 8-bit data);
- ``Q``: the output of a quantizer: integer codes times a step (bits, signed, step);
- ``int``: exact integer arithmetic on quantized operands: a convolution of quantized input and
  weight (int32 accumulator; its bias is an int32 at the product of the steps), a sum of two
  quantized tensors, or a re-arrangement (view, pixel shuffle, ReLU, zero padding) of such values;
- ``requant``: an element-wise affine step with a constant (mean shift, scalar multiply, PReLU,
  inference batch norm, …) on integer or input values, or the sum of integer values and the (8-bit)
  input image (the anchor skip of the search spaces). Integer inference folds it into the next quantizer's requantization,
  so it is fine exactly when a quantizer consumes it;
- ``float``: anything else.

A row is flagged FLOAT when a convolution, a matrix product or a tensor-tensor add/mul sees an
operand that is not quantized (float weights included), when a non-affine operation computes on
activations (sigmoid, mean, …), or when the network output is not a quantizer's output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from qnas.quant.quantizers import Quantizer

aten = torch.ops.aten

# Operations that move or select values without arithmetic: the domain passes through.
_STRUCTURAL = {
    "view",
    "_unsafe_view",
    "reshape",
    "permute",
    "transpose",
    "t",
    "clone",
    "contiguous",
    "_to_copy",
    "detach",
    "alias",
    "expand",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "as_strided",
    "pixel_shuffle",
    "pixel_unshuffle",
    "relu",
    "relu_",
    "max_pool2d_with_indices",
    "max_pool2d",
    "copy_",
    "cat",
    "split",
    "split_with_sizes",
    "chunk",
    "flatten",
    "lift_fresh",
}
_CONV = {"convolution", "_convolution", "mkldnn_convolution", "conv2d"}
_MATMUL = {"mm", "addmm", "bmm", "matmul", "linear"}
_AFFINE = {
    "add",
    "add_",
    "sub",
    "sub_",
    "mul",
    "mul_",
    "div",
    "div_",
    "_prelu_kernel",
    "prelu",
    "leaky_relu",
    "leaky_relu_",
    "hardtanh",
    "clamp",
    "clamp_",
}
# Inference batch norm is a per-channel affine map: folded into the requantization like a bias.
_AFFINE |= {
    "native_batch_norm",
    "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit",
    "batch_norm",
}
_TENSOR_BINARY = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}


@dataclass
class OpRow:
    """One operation of the trace."""

    index: int
    module: str
    op: str
    inputs: list[str]
    output: str
    detail: str = ""
    flag: str = ""


@dataclass
class Trace:
    rows: list[OpRow] = field(default_factory=list)
    output: str = ""

    @property
    def float_rows(self) -> list[OpRow]:
        return [r for r in self.rows if r.flag]

    def to_dict(self) -> dict:
        return {
            "rows": [asdict(r) for r in self.rows],
            "output": self.output,
            "float_ops": len(self.float_rows),
            "quantizers": sum(1 for r in self.rows if r.op == "quantize"),
            "integer_convs": sum(1 for r in self.rows if r.op in _CONV and not r.flag),
        }


def _describe_q(q: Quantizer) -> str:
    s = q.scale().detach().abs().reshape(-1)
    step = f"{s.item():.4g}" if s.numel() == 1 else f"{s.min().item():.3g}..{s.max().item():.3g}"
    return f"Q{q.bits}{'s' if q.signed else 'u'} step {step}"


class _Tracer(TorchDispatchMode):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.names = {m: n or "(root)" for n, m in model.named_modules()}
        self.stack: list[nn.Module] = []
        self.domain: dict[int, str] = {}  # id(tensor) -> domain label
        self.keep: list[torch.Tensor] = []  # keeps traced tensors alive so ids stay unique
        self.trace = Trace()

    # -- domains -------------------------------------------------------------------------------
    def label(self, t: object) -> str:
        if not isinstance(t, torch.Tensor):
            return "scalar"
        return self.domain.get(id(t), "const")

    def set(self, t: torch.Tensor, label: str) -> None:
        self.domain[id(t)] = label
        self.keep.append(t)

    @staticmethod
    def kind(label: str) -> str:
        return "Q" if label.startswith("Q") else label.split(" ", 1)[0]

    def in_quantizer(self) -> bool:
        return any(isinstance(m, Quantizer) for m in self.stack)

    def module_name(self) -> str:
        return self.names[self.stack[-1]] if self.stack else "(root)"

    # -- dispatch ------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.in_quantizer():
            return out
        name = func.overloadpacket.__name__
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        for v in args:
            if isinstance(v, (list, tuple)):
                tensors += [a for a in v if isinstance(a, torch.Tensor)]
        labels = [self.label(t) for t in tensors]
        kinds = [self.kind(lab) for lab in labels]
        active = [k for k in kinds if k != "const"]
        if not active:  # arithmetic on constants only (e.g. a weight transform): not on the data path
            return out
        result, flag, detail = self.classify(name, tensors, labels, kinds)
        outs = out if isinstance(out, (tuple, list)) else [out]
        for o in outs:
            if isinstance(o, torch.Tensor):
                self.set(o, result)
        self.trace.rows.append(
            OpRow(len(self.trace.rows), self.module_name(), name, labels, result, detail, flag)
        )
        return out

    def classify(self, name, tensors, labels, kinds) -> tuple[str, str, str]:
        data = [k for k in kinds if k != "const"]
        if name in _CONV:
            x_kind, w_kind = kinds[0], kinds[1] if len(kinds) > 1 else "const"
            w = tensors[1]
            detail = "x".join(map(str, w.shape[-2:])) + f" {w.shape[1]}->{w.shape[0]}"
            if x_kind == "Q" and w_kind == "Q":
                return "int", "", f"conv {detail}"
            why = []
            if x_kind != "Q":
                why.append(f"input is {x_kind}")
            if w_kind != "Q":
                why.append("weight is float" if w_kind == "const" else f"weight is {w_kind}")
            return "float", "FLOAT: " + ", ".join(why), f"conv {detail}"
        if name in _MATMUL:
            if all(k == "Q" for k in kinds[-2:]):
                return "int", "", "matmul"
            return "float", "FLOAT: matrix product of non-quantized operands", "matmul"
        if name in _STRUCTURAL:
            if name == "cat" and len(set(data)) > 1:
                return "float", "FLOAT: concatenation of mixed domains", ""
            return labels[kinds.index(data[0])] if data[0] == "Q" else data[0], "", ""
        if name in _TENSOR_BINARY and len(data) == 2:
            if name.startswith(("add", "sub")) and all(k == "Q" for k in data):
                return "int", "", "sum of quantized operands"
            if name.startswith("add") and sorted(data) in (["Q", "input"], ["input", "int"]):
                # The anchor skip: the 8-bit input image added to integer values, which integer
                # inference does in the next quantizer's requantization (codes at two steps, one rescale).
                return "requant", "", "sum with the 8-bit input image"
            return "float", f"FLOAT: {name} of {data[0]} and {data[1]} tensors", ""
        if name in _AFFINE:
            if data[0] == "float":
                return "float", "", ""
            return "requant", "", f"{name} with a constant"
        if name == "constant_pad_nd":
            return data[0], "", "zero padding"
        return "float", f"FLOAT: {name} on {data[0]} values", ""

    # -- module hooks --------------------------------------------------------------------------
    def pre_hook(self, module, args):
        self.stack.append(module)

    def post_hook(self, module, args, output):
        self.stack.pop()
        if isinstance(module, Quantizer) and isinstance(output, torch.Tensor) and not self.in_quantizer():
            src = args[0] if args and isinstance(args[0], torch.Tensor) else None
            src_label = self.label(src) if src is not None else "?"
            q_label = _describe_q(module)
            self.trace.rows.append(
                OpRow(len(self.trace.rows), self.names[module], "quantize", [src_label], q_label)
            )
            self.set(output, q_label)


def trace_network(model: nn.Module, x: torch.Tensor) -> Trace:
    """The operations of model(x) with their domains and flags (see module docstring)."""
    tracer = _Tracer(model)
    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(tracer.pre_hook))
        handles.append(m.register_forward_hook(tracer.post_hook))
    was = model.training
    try:
        model.eval()
        with torch.no_grad(), tracer:
            x = x.clone()
            tracer.set(x, "input")
            y = model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    out_label = tracer.label(y)
    tracer.trace.output = out_label
    if _Tracer.kind(out_label) != "Q":
        tracer.trace.rows.append(
            OpRow(
                len(tracer.trace.rows),
                "(output)",
                "output",
                [out_label],
                out_label,
                "",
                "FLOAT: the network output is not quantized",
            )
        )
    _flag_requant_consumers(tracer.trace)
    return tracer.trace


def _flag_requant_consumers(trace: Trace) -> None:
    """A requant value is fine only where a quantizer consumes it; flag arithmetic that reads one."""
    for r in trace.rows:
        if r.op in ("quantize", "output") or r.flag:
            continue
        if "requant" in r.inputs and (r.op in _CONV or r.op in _MATMUL):
            r.flag = "FLOAT: computes on a value that was never requantized"


def format_trace(trace: Trace, title: str = "") -> str:
    """A table: one row per operation, FLOAT rows marked, then a summary line."""
    header = ["#", "module", "op", "inputs", "output", "note"]
    rows = [
        [str(r.index), r.module, r.op, ", ".join(r.inputs), r.output, r.flag or r.detail] for r in trace.rows
    ]
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    d = trace.to_dict()
    lines = [title] if title else []
    lines += [line(header), "-" * len(line(header)), *[line(r) for r in rows], "-" * len(line(header))]
    verdict = (
        "no float operation between input and output"
        if not d["float_ops"]
        else f"{d['float_ops']} FLOAT operation(s) between input and output"
    )
    lines.append(
        f"{d['quantizers']} quantizers, {d['integer_convs']} integer convolutions, output {trace.output}: {verdict}"
    )
    return "\n".join(lines)
