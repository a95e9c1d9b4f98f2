"""Runs a packed model (qnas.deploy.format) with real low-bit integer convolutions, keeping activations as
integer codes (int8/uint8) between layers on the CPU (the integer pipeline):

- a "conv" whose every consumer quantizes its output the same way (the next conv's input quantizer, a skip's
  operand quantizer, through ReLU / pixel shuffle / upsample) is one torch.ops.qops.requantized_conv2d: codes
  (or the float input) in, exact integer convolution with the bit-packed weight, int32 bias, ReLU and the next
  quantizer in the epilogue, the next layer's codes out; other convs are quantized_conv2d (float out);
- a "quantize" node makes codes (torch.ops.qops.requantize from floats or from codes at another step; nothing
  when its input already has its codes), and FQSR's skip "add" of two code operands whose sum is quantized is
  one torch.ops.qops.quantized_add on codes;
- ReLU, pixel shuffle (in the epilogue of the conv before it), nearest upsampling and concatenation (at one
  step) move codes; every other node gets floats (codes times their step, what fake_quant returns).

Every step computes the float32 operations of the float pipeline (each conv's float output, fake_quant on
it) in the same order, so the codes, and the output, are those of the float pipeline bit for bit
(`PackedModel(..., integer=False)`: every conv a quantized_conv2d, every quantize node a fake_quant, as
on a CUDA device). Depends on torch, qops and safetensors only: no training code.

Large images are processed in overlapping tiles (`upscale`): with an overlap of at least the
network's receptive radius (`receptive_radius`), the tiled result equals the untiled one exactly,
because every step is either exact integer arithmetic or element-wise (docs/deploy.md).
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F

import qops  # noqa: F401  (registers torch.ops.qops.*)
from qnas.deploy.format import bias_step, quant_range, read_packed

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def retain_freed_memory() -> bool:
    """Makes glibc keep freed feature maps in the heap for reuse (process-wide; True when applied).

    A forward pass allocates and frees dozens of multi-MB tensors. With glibc's defaults each one is a
    fresh mmap or is trimmed back to the OS when freed, so every new tensor is first-touch page faults
    and zeroing: measured on edsr-baseline x2 at 160x160, that doubled the time of the quantizers and
    slowed every conv (docs/deploy.md). Blocks up to 32 MiB (glibc's maximum threshold) then come from
    the heap and freed memory stays there. `qnas upscale` calls this; a library user may.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
    return libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok


Spec = tuple[float, int, bool]  # a code grid: (step, bits, signed)
# Ops that only run on floats: a quantize node feeding only these keeps its float output (fake_quant).
_FLOAT_ONLY = frozenset({"add_const", "mul_const", "prelu", "leaky_relu", "affine", "clamp"})


class PackedModel:
    """A packed model ready to run: `model(x)` maps float32 [N, C, H, W] to [N, C, sH, sW].

    `graph`/`tensors` as read by qnas.deploy.format.read_packed (or made by qnas.export). `integer`: keep
    activations as codes between layers (CPU only; the same output as the float pipeline, bit for bit)."""

    def __init__(
        self,
        graph: dict,
        tensors: dict[str, torch.Tensor],
        device: str | torch.device = "cpu",
        integer: bool = True,
    ):
        self.graph = graph
        self.device = torch.device(device)
        self.tensors = {k: v.to(self.device) for k, v in tensors.items()}
        self.scale = int(graph["scale"])
        self.in_channels = int(graph["input"]["channels"])
        self.integer = integer and self.device.type == "cpu"
        nodes = graph["nodes"]
        self._consumers: dict[str, list[dict]] = {}
        self._last_use: dict[str, int] = {}
        for i, node in enumerate(nodes):
            for v in node["inputs"]:
                self._consumers.setdefault(v, []).append(node)
                self._last_use[v] = i
        consumers = self._consumers
        # Element-wise ops may overwrite an operand that dies with them (never the caller's input).
        keep = {graph["input"]["name"], graph["output"]}
        self._inplace = [
            bool(node["inputs"]) and node["inputs"][0] not in keep and self._last_use[node["inputs"][0]] == i
            and node["inputs"].count(node["inputs"][0]) == 1
            for i, node in enumerate(nodes)
        ]  # fmt: skip
        # A ReLU whose only consumer is a conv with unsigned input codes is already done by the conv's
        # quantization (clamp(round(x / s), 0, qmax) maps every x <= 0 to code 0): skip the pass.
        self._skip = [
            node["op"] == "relu"
            and node["output"] != graph["output"]
            and len(consumers.get(node["output"], [])) == 1
            and consumers[node["output"]][0]["op"] == "conv"
            and not consumers[node["output"]][0]["a_signed"]
            for node in nodes
        ]
        # The code grid of every value held as codes (absent: a float32 tensor), decided node by node.
        self._spec: dict[str, Spec] = {}
        self._nonneg: set[str] = set()  # codes values known to be >= 0 (a ReLU already applied)
        self._wanted: dict[str, tuple[Spec, bool] | None] = {}
        self._shuffled: set[str] = set()  # conv outputs written pixel-shuffled by the conv's epilogue
        self._steps = [
            self._compile(node, inplace) for node, inplace in zip(nodes, self._inplace, strict=True)
        ]
        out_spec = self._spec.get(graph["output"])
        self._finish = (lambda y: y) if out_spec is None else (lambda y: self._dequantize(y, out_spec))

    @property
    def code_values(self) -> dict[str, Spec]:
        """The values the integer pipeline holds as codes: name -> (step, bits, signed)."""
        return dict(self._spec)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> PackedModel:
        graph, tensors = read_packed(path)
        return cls(graph, tensors, device)

    # --- the integer pipeline's plan ---------------------------------------------------------------------

    def _node_spec(self, node: dict) -> Spec | None:
        """The code grid a "conv" quantizes its input to, or a "quantize" node's (None above 8 bits)."""
        if node["op"] == "conv":
            a_scale = float(self.tensors[node["tensors"]["a_scale"]].item())
            return (a_scale, int(node["a_bits"]), bool(node["a_signed"]))
        if node["op"] == "quantize" and int(node["bits"]) <= 8:
            return (
                float(self.tensors[node["tensors"]["scale"]].item()),
                int(node["bits"]),
                bool(node["signed"]),
            )
        return None

    def _wanted_spec(self, v: str) -> tuple[Spec, bool] | None:
        """(grid, relu) if every consumer of v quantizes v to that grid, after a ReLU when relu (through pixel
        shuffles, upsampling and concatenation, which commute with both): the producer may then emit those
        codes. (A consumer that still gets floats, dequantized, quantizes them again: the same codes, since
        quantizing is idempotent on its own grid.)"""
        if v in self._wanted:
            return self._wanted[v]
        found: set[tuple[Spec, bool]] = set()
        ok = self.integer and v != self.graph["output"] and bool(self._consumers.get(v))
        for c in self._consumers.get(v, []) if ok else []:
            if c["op"] in ("conv", "quantize"):
                spec = self._node_spec(c)
                want = None if spec is None else (spec, False)
            elif c["op"] in ("pixel_shuffle", "upsample", "concat"):
                want = self._wanted_spec(c["output"])
            elif c["op"] == "relu":
                w = self._wanted_spec(c["output"])
                want = None if w is None else (w[0], True)
            else:
                want = None
            if want is None:
                ok = False
                break
            found.add(want)
        self._wanted[v] = found.pop() if ok and len(found) == 1 else None
        return self._wanted[v]

    @staticmethod
    def _dequantize(codes: torch.Tensor, spec: Spec) -> torch.Tensor:
        """The floats these codes stand for: code * step in float32, what fake_quant returns."""
        return codes.to(torch.float32).mul_(torch.tensor(spec[0], dtype=torch.float32))

    def _float_input(self, v: str) -> Callable[[torch.Tensor], torch.Tensor]:
        spec = self._spec.get(v)
        if spec is None:
            return lambda t: t
        return lambda t: self._dequantize(t, spec)

    def _codes_input(self, v: str, want: Spec) -> Callable[[torch.Tensor], torch.Tensor]:
        """Codes of value v on grid `want` (v float, or codes on another grid: requantized)."""
        have = self._spec.get(v)
        if have == want:
            return lambda t: t
        requantize = torch.ops.qops.requantize
        step, bits, signed = want
        if have is None:
            return lambda t: requantize(t, step, bits, signed, None)
        return lambda t: requantize(t, step, bits, signed, have[0])

    # Each node becomes a closure over its (device-resident) tensors and Python scalars, so a forward
    # pass does no dictionary look-ups or host syncs beyond the ops themselves.
    def _compile(self, node: dict, inplace: bool) -> Callable[[list[torch.Tensor]], torch.Tensor]:
        op = node["op"]
        ins, out = node["inputs"], node["output"]
        t = {role: self.tensors[key] for role, key in node.get("tensors", {}).items()}
        if not self.integer:
            return self._compile_float(node, inplace, t)
        if op == "conv":
            w, w_shape, w_scale = t["weight"], list(node["w_shape"]), t["w_scale"]
            a_spec = self._node_spec(node)
            a_scale, w_bits, a_bits, a_signed = a_spec[0], int(node["w_bits"]), a_spec[1], a_spec[2]
            stride, padding = list(node["stride"]), list(node["padding"])
            # Floats go in as they are (quantized on load), codes on another grid are requantized first.
            x_in = self._codes_input(ins[0], a_spec) if ins[0] in self._spec else (lambda x: x)
            wanted = self._wanted_spec(out)
            if wanted is not None:
                (o_scale, o_bits, o_signed), relu = wanted
                bias = t.get("bias")  # int32 at the accumulator's step
                conv = torch.ops.qops.requantized_conv2d
                self._spec[out] = wanted[0]
                if relu or not o_signed:
                    self._nonneg.add(out)
                # A pixel shuffle that is the conv's only consumer is done by its epilogue.
                cons = self._consumers[out]
                r = int(cons[0]["factor"]) if len(cons) == 1 and cons[0]["op"] == "pixel_shuffle" else 1
                if w_shape[0] % (r * r):
                    r = 1
                if r > 1:
                    self._shuffled.add(out)
                return lambda xs: conv(
                    x_in(xs[0]), w, w_shape, w_scale, a_scale, w_bits, a_bits, a_signed, bias, stride, padding,
                    o_scale, o_bits, o_signed, relu, r,
                )  # fmt: skip
            bias = t.get("bias")
            if bias is not None:  # int32 at the accumulator's step (docs/deploy.md)
                bias = bias.to(torch.float32) * bias_step(t["a_scale"], w_scale)
            conv = torch.ops.qops.quantized_conv2d
            return lambda xs: conv(
                x_in(xs[0]), w, w_shape, w_scale, a_scale, w_bits, a_bits, a_signed, bias, stride, padding
            )
        if op == "quantize":
            spec = self._node_spec(node)
            takes_codes = any(c["op"] not in _FLOAT_ONLY for c in self._consumers.get(out, []))
            if spec is not None and takes_codes and out != self.graph["output"]:
                self._spec[out] = spec
                if not spec[2] or ins[0] in self._nonneg:
                    self._nonneg.add(out)
                f = self._codes_input(ins[0], spec)
                return lambda xs: f(xs[0])
        elif op == "add":
            specs = [self._spec.get(v) for v in ins]
            wanted = self._wanted_spec(out)
            if None not in specs and wanted is not None and (not wanted[1] or not wanted[0][2]):
                (o_scale, o_bits, o_signed), _ = wanted
                (sx, _, _), (sy, _, _) = specs
                self._spec[out] = wanted[0]
                if not o_signed:
                    self._nonneg.add(out)
                qadd = torch.ops.qops.quantized_add
                return lambda xs: qadd(xs[0], sx, xs[1], sy, o_scale, o_bits, o_signed)
        elif op == "relu" and ins[0] in self._spec:
            self._spec[out] = self._spec[ins[0]]
            self._nonneg.add(out)
            if ins[0] in self._nonneg or not self._spec[ins[0]][2]:
                return lambda xs: xs[0]
            return lambda xs: xs[0].clamp_min(0)
        elif op in ("pixel_shuffle", "upsample") and ins[0] in self._spec:
            self._spec[out] = self._spec[ins[0]]
            if ins[0] in self._nonneg:
                self._nonneg.add(out)
            if ins[0] in self._shuffled:  # done by the conv's epilogue
                return lambda xs: xs[0]
            return self._compile_float(node, False, t)  # both only move elements: any dtype
        elif (
            op == "concat"
            and ins[0] in self._spec
            and all(self._spec.get(v) == self._spec[ins[0]] for v in ins)
        ):
            self._spec[out] = self._spec[ins[0]]
            if all(v in self._nonneg for v in ins):
                self._nonneg.add(out)
            return lambda xs: torch.cat(xs, 1)
        # Everything else on floats: codes inputs are dequantized (a fresh tensor: in place is safe).
        f = self._compile_float(node, inplace, t)
        convert = [self._float_input(v) for v in ins]
        if not any(v in self._spec for v in ins):
            return f
        return lambda xs: f([c(x) for c, x in zip(convert, xs, strict=True)])

    def _compile_float(
        self, node: dict, inplace: bool, t: dict[str, torch.Tensor]
    ) -> Callable[[list[torch.Tensor]], torch.Tensor]:
        """The node on float32 values (pixel_shuffle / upsample / concat on any dtype)."""
        op = node["op"]
        if op == "conv":
            w, w_shape, w_scale = t["weight"], list(node["w_shape"]), t["w_scale"]
            a_scale = float(t["a_scale"].item())
            w_bits, a_bits, a_signed = int(node["w_bits"]), int(node["a_bits"]), bool(node["a_signed"])
            bias, stride, padding = t.get("bias"), list(node["stride"]), list(node["padding"])
            if bias is not None:  # int32 at the accumulator's step (docs/deploy.md)
                bias = bias.to(torch.float32) * bias_step(t["a_scale"], w_scale)
            conv = torch.ops.qops.quantized_conv2d
            return lambda xs: conv(
                xs[0], w, w_shape, w_scale, a_scale, w_bits, a_bits, a_signed, bias, stride, padding
            )
        if op == "quantize":
            qmin, qmax = quant_range(int(node["bits"]), bool(node["signed"]))
            s, zp = t["scale"].reshape(1), torch.zeros(1, device=self.device)
            fq = torch.ops.qops.fake_quant
            return lambda xs: fq(xs[0], s, zp, -1, qmin, qmax, 1.0)
        if op == "add":
            if inplace:
                return lambda xs: xs[0].add_(xs[1])
            return lambda xs: xs[0] + xs[1]
        if op == "add_const":
            value = t["value"]
            if inplace:
                return lambda xs: xs[0].add_(value)
            return lambda xs: xs[0] + value
        if op == "mul_const":
            factor = float(node["value"])
            if inplace:
                return lambda xs: xs[0].mul_(factor)
            return lambda xs: xs[0] * factor
        if op == "relu":
            if inplace:
                return lambda xs: xs[0].relu_()
            return lambda xs: torch.relu(xs[0])
        if op == "prelu":
            slope = t["slope"].reshape(-1)
            return lambda xs: F.prelu(xs[0], slope)
        if op == "leaky_relu":
            slope = float(node["slope"])
            if inplace:
                return lambda xs: F.leaky_relu_(xs[0], slope)
            return lambda xs: F.leaky_relu(xs[0], slope)
        if op == "affine":
            scale, shift = t["scale"].reshape(1, -1, 1, 1), t["shift"].reshape(1, -1, 1, 1)
            if inplace:
                return lambda xs: xs[0].mul_(scale).add_(shift)
            return lambda xs: torch.addcmul(shift, xs[0], scale)
        if op == "pixel_shuffle":
            r = int(node["factor"])
            return lambda xs: F.pixel_shuffle(xs[0], r)
        if op == "upsample":
            r = int(node["factor"])
            # What the trained network's NearestAnchor computes (the runtime imports no model code).
            return lambda xs: xs[0].repeat_interleave(r, dim=2).repeat_interleave(r, dim=3)
        if op == "concat":
            return lambda xs: torch.cat(xs, 1)
        if op == "clamp":
            lo, hi = float(node["min"]), float(node["max"])
            if inplace:
                return lambda xs: xs[0].clamp_(lo, hi)
            return lambda xs: xs[0].clamp(lo, hi)
        raise AssertionError(op)  # check_graph accepted only known ops

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected [N, {self.in_channels}, H, W], got {list(x.shape)}")
        values = {self.graph["input"]["name"]: x.to(self.device, torch.float32).contiguous()}
        out_name = self.graph["output"]
        with torch.inference_mode():
            for i, node in enumerate(self.graph["nodes"]):
                ins = node["inputs"]
                if self._skip[i]:
                    values[node["output"]] = values[ins[0]]
                else:
                    values[node["output"]] = self._steps[i]([values[v] for v in ins])
                # Free each value after its last use: peak memory is a few feature maps, not all of them.
                for v in ins:
                    if self._last_use[v] == i and v != out_name:
                        values.pop(v, None)
            return self._finish(values[out_name])

    def receptive_radius(self) -> int:
        """How far (in input pixels) an output pixel's value can depend on: the sum over the chain of
        convolutions of their padding, divided by the resolution they run at (pixel shuffle r multiplies
        it by r). Zero padding at a tile border changes nothing farther inside than this."""
        radius = {self.graph["input"]["name"]: 0.0}
        factor = {self.graph["input"]["name"]: 1}
        for node in self.graph["nodes"]:
            ins = node["inputs"]
            r, f = max(radius[v] for v in ins), max(factor[v] for v in ins)
            if node["op"] == "conv":
                kh, kw = node["w_shape"][2:]
                r += max((kh - 1) // 2, (kw - 1) // 2) / f
            elif node["op"] in ("pixel_shuffle", "upsample"):
                f *= int(node["factor"])
            radius[node["output"]], factor[node["output"]] = r, f
        return math.ceil(radius[self.graph["output"]])

    def upscale(
        self,
        x: torch.Tensor,
        tile: int = 0,
        overlap: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """model(x) for one image [1, C, H, W], in tiles of `tile` x `tile` input pixels (0: whole image)
        each extended by `overlap` pixels of context on every side (None: the receptive radius, which
        makes the result identical to the untiled one). `progress(n)` is called after each tile."""
        n, _, h, w = x.shape
        # The overlap argument needs stride-1 convs (every SR network here): otherwise run whole.
        if any(nd["op"] == "conv" and nd["stride"] != [1, 1] for nd in self.graph["nodes"]):
            tile = 0
        if overlap is None:
            overlap = self.receptive_radius()
        if tile <= 0 or (h <= tile and w <= tile):
            y = self(x)
            if progress:
                progress(1)
            return y
        s = self.scale
        out = torch.empty(n, self.in_channels, h * s, w * s, dtype=torch.float32, device=self.device)
        for y0 in range(0, h, tile):
            for x0 in range(0, w, tile):
                y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
                # The tile plus its context, cut at the image border (where the network zero-pads anyway).
                cy0, cx0 = max(y0 - overlap, 0), max(x0 - overlap, 0)
                cy1, cx1 = min(y1 + overlap, h), min(x1 + overlap, w)
                part = self(x[:, :, cy0:cy1, cx0:cx1])
                oy, ox = (y0 - cy0) * s, (x0 - cx0) * s
                out[:, :, y0 * s : y1 * s, x0 * s : x1 * s] = part[
                    :, :, oy : oy + (y1 - y0) * s, ox : ox + (x1 - x0) * s
                ]
                if progress:
                    progress(1)
        return out

    def count_tiles(self, h: int, w: int, tile: int) -> int:
        if tile <= 0 or (h <= tile and w <= tile):
            return 1
        return math.ceil(h / tile) * math.ceil(w / tile)
