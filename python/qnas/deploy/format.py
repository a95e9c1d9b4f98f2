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
import os
import struct
from pathlib import Path
from typing import Any

import torch

from qnas.atomic_write import atomic_write_bytes
from qnas.errors import CheckpointError

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
    "clamp": (1, ("min", "max"), (), ()),
    "concat": (None, (), (), ()),  # along channels
}


class PackedModelError(CheckpointError):
    """A packed model file that cannot be used (missing, truncated, corrupt, newer format)."""


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """(qmin, qmax) of a `bits`-bit code (two's complement when signed), as qnas.quant.quantizers."""
    if signed:
        return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if bits > 1 else (-1, 1)
    return 0, 2**bits - 1


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

    path = Path(path)
    if not path.exists():
        raise PackedModelError(f"{path}: no such file")
    if path.is_dir():
        raise PackedModelError(f"{path}: is a folder, expected a packed model file")
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


def _fail(where: str, what: str) -> None:
    raise PackedModelError(f"{where}: {what}")


def _int_list(v: Any, n: int | None = None) -> bool:
    return (
        isinstance(v, list)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
        and (n is None or len(v) == n)
    )


def check_graph(graph: Any, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Structure, attribute types, value definitions before use, tensor presence, dtypes and shapes.
    Raises PackedModelError naming `where` and the node."""
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
        _fail(where, "graph: expected an object with a list of nodes")
    inp = graph.get("input")
    if (
        not isinstance(inp, dict)
        or not isinstance(inp.get("name"), str)
        or not isinstance(inp.get("channels"), int)
    ):
        _fail(where, 'graph: "input" must be {"name", "channels"}')
    defined = {inp["name"]}
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
            if v not in defined:
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
            if key not in tensors:
                _fail(where, f"{at}: tensor {key!r} is not in the file")
            t = tensors[key]
            want = {"weight": torch.uint8, "bias": torch.int32}.get(role, torch.float32)
            if t.dtype != want:
                _fail(where, f"{at}: tensor {key!r} is {t.dtype}, expected {want}")
        if op == "conv":
            _check_conv(node, params, tensors, at, where)
        elif op == "quantize":
            if not (isinstance(node["bits"], int) and 1 <= node["bits"] <= 16):
                _fail(where, f"{at}: bits {node['bits']!r} outside 1..16")
            _check_scale(tensors[params["scale"]], 1, at, where)
        elif op == "pixel_shuffle" and not (isinstance(node["factor"], int) and node["factor"] >= 1):
            _fail(where, f"{at}: factor must be a positive integer")
        out = node.get("output")
        if not isinstance(out, str):
            _fail(where, f"{at}: missing output name")
        defined.add(out)
    if graph.get("output") not in defined:
        _fail(where, f"graph: output {graph.get('output')!r} is not defined")
    if not isinstance(graph.get("scale"), int) or graph["scale"] < 1:
        _fail(where, 'graph: "scale" must be a positive integer')


def _check_scale(t: torch.Tensor, n: int, at: str, where: str) -> None:
    if t.numel() != n or not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        _fail(where, f"{at}: expected {n} positive finite step(s)")


def _check_conv(node: dict, params: dict, tensors: dict, at: str, where: str) -> None:
    shape = node["w_shape"]
    if not _int_list(shape, 4) or min(shape) < 1:
        _fail(where, f"{at}: w_shape must be 4 positive integers")
    for b in ("w_bits", "a_bits"):
        if not (isinstance(node[b], int) and 1 <= node[b] <= 8):
            _fail(where, f"{at}: {b} {node[b]!r} outside 1..8")
    for a in ("stride", "padding"):
        if not _int_list(node[a], 2):
            _fail(where, f"{at}: {a} must be two integers")
    w = tensors[params["weight"]]
    if w.dim() != 1 or w.numel() != packed_weight_bytes(shape, node["w_bits"]):
        _fail(
            where, f"{at}: packed weight of {w.numel()} bytes does not match {shape} at {node['w_bits']} bits"
        )
    _check_scale(tensors[params["w_scale"]], shape[0], at, where)
    _check_scale(tensors[params["a_scale"]], 1, at, where)
    if "bias" in params and tensors[params["bias"]].numel() != shape[0]:
        _fail(where, f"{at}: bias must have {shape[0]} values")
