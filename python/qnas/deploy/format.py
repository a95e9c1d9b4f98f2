"""The packed model file of `qnas export --format packed` ("qnas-packed/1"), read and written without
the training code (torch, safetensors and qops only). The format is documented in docs/deploy.md.

A packed file is a safetensors file (no pickle): the tensors are the bit-packed weights
(qops.packed.pack_weight), per-output-channel weight steps, activation steps, biases and constants;
the safetensors metadata holds two strings:

- "format": FORMAT ("qnas-packed/<version>"); a reader refuses a newer version;
- "graph": JSON of the network as a list of nodes in execution order (op, inputs, output, attributes,
  and the names of its tensors), its input and output values and the model description.

Every value of the graph is a float32 NCHW tensor; the ops (OPS) are chosen so that the graph maps
one to one onto integer inference: "conv" quantizes its input and runs an exact integer convolution
(torch.ops.qops.quantized_conv2d), "quantize" puts a value on its integer grid (the operands and
sum of a quantized skip connection, the network output), the rest only move or shift values.
"""

from __future__ import annotations

import json
import math
import os
import struct
from fractions import Fraction
from typing import Any

import torch

from qnas.atomic_write import atomic_write_bytes
from qnas.errors import CheckpointError
from qnas.files import check_input_file
from qops.ranges import quant_range  # noqa: F401  (re-exported for the runtime and the ONNX writer)

FORMAT_NAME = "qnas-packed"
FORMAT_VERSION = 1
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"

# op -> (number of inputs (None: two or more), required attributes, required tensors, optional tensors)
OPS: dict[str, tuple[int, tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "conv": (
        1,
        ("w_shape", "w_bits", "a_bits", "a_signed", "stride", "padding"),
        ("weight", "w_scale", "a_scale"),
        ("bias",),
    ),
    "quantize": (1, ("bits", "signed"), ("scale",), ()),
    "add": (2, (), (), ()),
    "add_const": (1, (), ("value",), ()),
    "mul_const": (1, ("value",), (), ()),
    "relu": (1, (), (), ()),
    "prelu": (1, (), ("slope",), ()),
    "leaky_relu": (1, ("slope",), (), ()),
    "affine": (1, (), ("scale", "shift"), ()),
    "pixel_shuffle": (1, ("factor",), (), ()),
    "upsample": (1, ("factor",), (), ()),  # nearest: every pixel repeated factor x factor times
    "clamp": (1, ("min", "max"), (), ()),
    "concat": (None, (), (), ()),  # along channels
}


class PackedModelError(CheckpointError):
    """A packed model file that cannot be used (missing, truncated, corrupt, newer format)."""


def packed_weight_bytes(w_shape: list[int], bits: int) -> int:
    """Size of a pack_weight buffer: Cout * bits * ceil(Cin*kh*kw / 32) * 4 bytes."""
    k = w_shape[1] * w_shape[2] * w_shape[3]
    return w_shape[0] * bits * ((k + 31) // 32) * 4


def bias_step(a_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """The step of an int32 conv bias: a_scale * w_scale[c] in float32 (the accumulator's step)."""
    return (a_scale.to(torch.float32).reshape(1) * w_scale.to(torch.float32)).reshape(-1)


# ------------------------------------------------------------------------------------------------
# Writing


def packed_bytes(graph: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    """The bytes of a packed file (graph checked first)."""
    from safetensors.torch import save

    check_graph(graph, tensors, "graph")
    metadata = {"format": FORMAT, "graph": json.dumps(graph, separators=(",", ":"))}
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def write_packed(path: str | os.PathLike, graph: dict, tensors: dict[str, torch.Tensor]) -> int:
    """Writes a packed file atomically; returns its size in bytes."""
    data = packed_bytes(graph, tensors)
    atomic_write_bytes(path, data)
    return len(data)


# ------------------------------------------------------------------------------------------------
# Reading


def _header(data: bytes, where: str) -> dict:
    """The safetensors header (8-byte little-endian length + JSON), checked against the file size."""
    if len(data) < 8:
        raise PackedModelError(f"{where}: not a packed model file (truncated: {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise PackedModelError(f"{where}: not a packed model file, or truncated (header of {n} bytes)")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PackedModelError(f"{where}: not a packed model file (unreadable header)") from e
    if not isinstance(header, dict):
        raise PackedModelError(f"{where}: not a packed model file (unreadable header)")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise PackedModelError(f"{where}: not a packed model file (malformed tensor table)") from e
    if 8 + n + end > len(data):
        raise PackedModelError(
            f"{where}: truncated file ({len(data)} bytes, the header describes {8 + n + end})"
        )
    return header


def check_format(fmt: Any, where: str) -> None:
    """Accepts FORMAT; a newer version or another format is a one-line PackedModelError."""
    if not isinstance(fmt, str) or not fmt.startswith(FORMAT_NAME + "/"):
        raise PackedModelError(f"{where}: not a qnas packed model (format {fmt!r}, expected {FORMAT})")
    version = fmt.split("/", 1)[1]
    if not version.isdigit():
        raise PackedModelError(f"{where}: unknown format version {fmt!r}")
    if int(version) > FORMAT_VERSION:
        raise PackedModelError(
            f"{where}: format {fmt} is newer than this qnas reads ({FORMAT}); upgrade qnas to load it"
        )
    if int(version) < 1:
        raise PackedModelError(f"{where}: unknown format version {fmt!r}")


def read_packed(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(graph, tensors) of a packed file, fully checked (check_graph). Any problem is a one-line
    PackedModelError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = check_input_file(path, "packed model file", PackedModelError)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PackedModelError(f"{path}: cannot read ({e.strerror or e})") from e
    header = _header(data, str(path))
    meta = header.get("__metadata__") or {}
    check_format(meta.get("format"), str(path))
    try:
        graph = json.loads(meta["graph"])
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise PackedModelError(f"{path}: the graph metadata is missing or not JSON") from e
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise PackedModelError(f"{path}: corrupt tensor data ({' '.join(str(e).split())[:120]})") from e
    check_graph(graph, tensors, str(path))
    return graph, tensors


# ------------------------------------------------------------------------------------------------
# Checking a graph against its tensors

# Limits of what a packed file may describe: far above the SR networks qnas trains (EDSR: 256
# channels, x4 in two pixel shuffles of 2, 3x3 kernels), low enough that a file cannot make the
# runtime allocate without bound or run an op out of its range. docs/guide.md lists them.
MAX_NODES = 10_000
MAX_CHANNELS = 4096
MAX_KERNEL = 31
MAX_STRIDE = 64
MAX_SHUFFLE = 8
MAX_SCALE = 8
MAX_QUANT_BITS = 16


def _fail(where: str, what: str) -> None:
    raise PackedModelError(f"{where}: {what}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_list(v: Any, n: int | None = None) -> bool:
    return isinstance(v, list) and all(_is_int(t) for t in v) and (n is None or len(v) == n)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_graph(graph: Any, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Everything a packed file says, before anything runs: structure, attribute types and ranges, values
    defined before use (each once), tensor presence, dtypes and sizes, finite constants, the channels
    of every value (each node's input against what it needs, the output against the input), and the
    spatial factor of every value (strides divide it, pixel shuffles multiply it; the output's is the
    graph's scale). Raises PackedModelError naming `where` and the node."""
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
        _fail(where, "graph: expected an object with a list of nodes")
    if len(graph["nodes"]) > MAX_NODES:
        _fail(where, f"graph: {len(graph['nodes'])} nodes, more than the {MAX_NODES} a packed model may have")
    scale = graph.get("scale")
    if not _is_int(scale) or not 1 <= scale <= MAX_SCALE:
        _fail(where, f'graph: "scale" must be an integer in 1..{MAX_SCALE}, got {scale!r}')
    inp = graph.get("input")
    if not isinstance(inp, dict) or not isinstance(inp.get("name"), str) or not _is_int(inp.get("channels")):
        _fail(where, 'graph: "input" must be {"name", "channels"}')
    if not 1 <= inp["channels"] <= MAX_CHANNELS:
        _fail(where, f"graph: input channels {inp['channels']} outside 1..{MAX_CHANNELS}")
    # value name -> (channels, spatial factor relative to the input)
    values: dict[str, tuple[int, Fraction]] = {inp["name"]: (inp["channels"], Fraction(1))}
    for i, node in enumerate(graph["nodes"]):
        if not isinstance(node, dict):
            _fail(where, f"node {i}: expected an object")
        op, name = node.get("op"), node.get("name", f"#{i}")
        at = f"node {i} ({name})"
        if op not in OPS:
            _fail(where, f"{at}: unknown op {op!r} (known: {', '.join(OPS)})")
        n_in, attrs, required, optional = OPS[op]
        inputs = node.get("inputs")
        if not isinstance(inputs, list) or (len(inputs) != n_in if n_in else len(inputs) < 2):
            _fail(where, f"{at}: {op} takes {n_in or 'two or more'} input(s)")
        for v in inputs:
            if not isinstance(v, str) or v not in values:
                _fail(where, f"{at}: input {v!r} is not defined before it")
        for a in attrs:
            if a not in node:
                _fail(where, f"{at}: missing attribute {a!r}")
        params = node.get("tensors", {})
        if not isinstance(params, dict):
            _fail(where, f"{at}: 'tensors' must be an object")
        for role in required:
            if role not in params:
                _fail(where, f"{at}: missing tensor {role!r}")
        for role, key in params.items():
            if role not in required + optional:
                _fail(where, f"{at}: unexpected tensor {role!r}")
            if not isinstance(key, str) or key not in tensors:
                _fail(where, f"{at}: tensor {key!r} is not in the file")
            t = tensors[key]
            want = {"weight": torch.uint8, "bias": torch.int32}.get(role, torch.float32)
            if t.dtype != want:
                _fail(where, f"{at}: tensor {key!r} is {t.dtype}, expected {want}")
            if t.dtype == torch.float32 and not bool(torch.isfinite(t).all()):
                _fail(where, f"{at}: tensor {key!r} has non-finite values")
        ins = [values[v] for v in inputs]
        channels, factor = ins[0]
        if op == "conv":
            channels, factor = _check_conv(node, params, tensors, channels, factor, at, where)
        elif op == "quantize":
            if not (_is_int(node["bits"]) and 1 <= node["bits"] <= MAX_QUANT_BITS):
                _fail(where, f"{at}: bits {node['bits']!r} outside 1..{MAX_QUANT_BITS}")
            if not isinstance(node["signed"], bool):
                _fail(where, f"{at}: signed must be true or false")
            _check_scale(tensors[params["scale"]], 1, at, where)
        elif op == "add":
            if ins[0] != ins[1]:
                _fail(
                    where,
                    f"{at}: adds values of {ins[0][0]} and {ins[1][0]} channels at different sizes"
                    if ins[0][1] != ins[1][1]
                    else f"{at}: adds {ins[0][0]} and {ins[1][0]} channels",
                )
        elif op == "add_const":
            _check_broadcast(tensors[params["value"]], channels, at, where)
        elif op in ("mul_const", "leaky_relu"):
            key = "value" if op == "mul_const" else "slope"
            if not _is_number(node[key]):
                _fail(where, f"{at}: {key} must be a finite number")
        elif op == "prelu":
            if tensors[params["slope"]].numel() not in (1, channels):
                _fail(where, f"{at}: slope must have 1 or {channels} values")
        elif op == "affine":
            for role in ("scale", "shift"):
                if tensors[params[role]].numel() != channels:
                    _fail(where, f"{at}: {role} must have {channels} values (one per channel)")
        elif op == "pixel_shuffle":
            r = node["factor"]
            if not (_is_int(r) and 1 <= r <= MAX_SHUFFLE):
                _fail(where, f"{at}: factor must be an integer in 1..{MAX_SHUFFLE}, got {r!r}")
            if channels % (r * r):
                _fail(where, f"{at}: {channels} channels do not divide by factor^2 = {r * r}")
            channels, factor = channels // (r * r), factor * r
        elif op == "upsample":
            r = node["factor"]
            if not (_is_int(r) and 1 <= r <= MAX_SHUFFLE):
                _fail(where, f"{at}: factor must be an integer in 1..{MAX_SHUFFLE}, got {r!r}")
            factor = factor * r
        elif op == "clamp":
            if not (_is_number(node["min"]) and _is_number(node["max"]) and node["min"] <= node["max"]):
                _fail(where, f"{at}: min and max must be finite numbers with min <= max")
        out = node.get("output")
        if not isinstance(out, str):
            _fail(where, f"{at}: missing output name")
        if out in values:
            _fail(where, f"{at}: output {out!r} is already defined (every value is defined once)")
        values[out] = (channels, factor)
    out = graph.get("output")
    if not isinstance(out, str) or out not in values:
        _fail(where, f"graph: output {out!r} is not defined")
    channels, factor = values[out]
    if channels != inp["channels"]:
        _fail(where, f"graph: the output has {channels} channels, the input {inp['channels']}")
    if factor != scale:
        _fail(where, f'graph: "scale" is {scale} but the nodes upscale by {factor}')


def _check_scale(t: torch.Tensor, n: int, at: str, where: str) -> None:
    if t.numel() != n or not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        _fail(where, f"{at}: expected {n} positive finite step(s)")


def _check_broadcast(t: torch.Tensor, channels: int, at: str, where: str) -> None:
    """A constant added to an NCHW value: a scalar, [C], or [1, C, 1, 1]-like (no batch or pixel extent)."""
    shape = list(t.shape)
    if t.numel() == 1:
        return
    ok = (
        (len(shape) == 1 and shape[0] == channels)
        or (len(shape) == 4 and shape[0] == 1 and shape[1] == channels and shape[2] == shape[3] == 1)
        or (len(shape) == 3 and shape[0] == channels and shape[1] == shape[2] == 1)
    )
    if not ok:
        _fail(where, f"{at}: value of shape {shape} does not broadcast over {channels} channels")


def _check_conv(
    node: dict, params: dict, tensors: dict, channels: int, factor: Fraction, at: str, where: str
) -> tuple[int, Fraction]:
    shape = node["w_shape"]
    if not _int_list(shape, 4) or min(shape) < 1:
        _fail(where, f"{at}: w_shape must be 4 positive integers")
    if max(shape[:2]) > MAX_CHANNELS or max(shape[2:]) > MAX_KERNEL:
        _fail(where, f"{at}: w_shape {shape} exceeds {MAX_CHANNELS} channels or a {MAX_KERNEL}-pixel kernel")
    if shape[1] != channels:
        _fail(where, f"{at}: takes {shape[1]} input channels (w_shape), its input has {channels}")
    for b in ("w_bits", "a_bits"):
        if not (_is_int(node[b]) and 1 <= node[b] <= 8):
            _fail(where, f"{at}: {b} {node[b]!r} outside 1..8")
    if not isinstance(node["a_signed"], bool):
        _fail(where, f"{at}: a_signed must be true or false")
    stride, padding = node["stride"], node["padding"]
    if not _int_list(stride, 2) or not all(1 <= v <= MAX_STRIDE for v in stride):
        _fail(where, f"{at}: stride must be two integers in 1..{MAX_STRIDE}, got {stride!r}")
    if not _int_list(padding, 2) or not all(0 <= p <= k for p, k in zip(padding, shape[2:], strict=True)):
        _fail(where, f"{at}: padding must be two integers in 0..kernel size {shape[2:]}, got {padding!r}")
    w = tensors[params["weight"]]
    if w.dim() != 1 or w.numel() != packed_weight_bytes(shape, node["w_bits"]):
        _fail(
            where, f"{at}: packed weight of {w.numel()} bytes does not match {shape} at {node['w_bits']} bits"
        )
    _check_scale(tensors[params["w_scale"]], shape[0], at, where)
    _check_scale(tensors[params["a_scale"]], 1, at, where)
    if "bias" in params and tensors[params["bias"]].numel() != shape[0]:
        _fail(where, f"{at}: bias must have {shape[0]} values")
    if stride[0] != stride[1]:
        _fail(where, f"{at}: stride {stride} differs between height and width (the scale would too)")
    return shape[0], factor / stride[0]
