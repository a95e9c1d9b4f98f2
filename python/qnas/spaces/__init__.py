"""QuantNAS search spaces as data: JSON documents describing a network graph whose layers are searched.

A space is a JSON object (docs/search_spaces.md is the reference, with an example made from EDSR):

    {"format": "qnas-space/1", "name": "basic", "channels": 36,
     "anchor": "nearest",                             # optional image path: the input, upsampled, added
     "candidates": ["conv1x1", "conv3x3", ...],      # default candidate ops of every searched layer
     "ops": {"my_op": {"kernel": [3, 1]}},            # optional: ops added to the builtin library
     "cells": {"body_cell": [node, ...]},             # named sub-graphs
     "network": [node, ...]}                          # the whole network, LR image -> SR image

Nodes (evaluated in order; "inputs" default to the previous node, the first one to "input"):
    {"name": "head1", "op": "layer", "out": "c"}             a searched layer (op and bit-widths)
    {"name": "sum", "op": "add", "inputs": ["a", "b"]}       element-wise sum
    {"name": "cat", "op": "concat", "inputs": [...]}         channel concatenation
    {"name": "act", "op": "act", "fn": "lrelu"}              relu | lrelu (slope 0.05)
    {"name": "ps", "op": "pixel_shuffle", "factor": "scale"}
    {"name": "body", "op": "residual", "cell": "body_cell"}  ADQ residual around a cell (qnas.nas.adq)
    {"name": "b", "op": "cell", "cell": "rfdb"}              a cell inlined, no residual
Cell nodes take "repeat": N (N chained instances b1..bN) and "alphas": NAME (every layer of the cell
draws its architecture parameters from the slots NAME.<layer>, so instances with the same NAME share
them). Channel counts ("out", "factor") are integers or arithmetic over c (the space's channels),
colors, scale and in (the node's input channels), e.g. "colors*scale*scale" or "c//2".

Ops (the candidates of a layer) are single convolutions {"kernel": k | [kh, kw], "groups": g,
"dilation": d}, mixed by torch.ops.qops.mixed_quant_conv, or composites {"sequence": [stage, ...]}
(stages as single convolutions plus "width": the stage's output channels as a multiple of the layer's
out channels, default 1 and always 1 for the last stage), mixed beside it in Python.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
from importlib import resources
from typing import Any

from qnas.errors import QnasError
from qnas.files import check_input_file

SPACE_FORMAT = "qnas-space/1"
BUILTIN_SPACES = ("basic", "rfdn")
NODE_OPS = ("layer", "add", "concat", "act", "pixel_shuffle", "residual", "cell")
ACTIVATIONS = ("relu", "lrelu")
LAYER_ACTS = ("relu", "none")
#: The global anchor skips a space can declare: the LR input image upsampled by the scale and added to
#: the network's output (qnas.nas.graph.GraphModule). "nearest" repeats each input pixel: 0 BitOps and
#: integer arithmetic on the 8-bit input, as INT8 mobile SR networks do it.
ANCHORS = ("nearest",)

#: The op library every space can name without declaring it. Single convolutions (the fused op mixes
#: them) and composites (two convolutions in sequence, mixed beside it).
BUILTIN_OPS: dict[str, dict[str, Any]] = {
    "conv1x1": {"kernel": 1},
    "conv3x3": {"kernel": 3},
    "conv5x5": {"kernel": 5},
    "conv7x7": {"kernel": 7},
    "conv1x1_g3": {"kernel": 1, "groups": 3},
    "conv3x3_g3": {"kernel": 3, "groups": 3},
    "conv5x5_g3": {"kernel": 5, "groups": 3},
    "conv3x3_d2": {"kernel": 3, "dilation": 2},
    "conv3x1_1x3": {"sequence": [{"kernel": [3, 1]}, {"kernel": [1, 3]}]},
    "conv5x1_1x5": {"sequence": [{"kernel": [5, 1]}, {"kernel": [1, 5]}]},
    "growth2_3x3": {"sequence": [{"kernel": 3, "width": 2}, {"kernel": 1}]},
    "growth2_5x5": {"sequence": [{"kernel": 5, "width": 2}, {"kernel": 1}]},
}

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SLOT = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_MAX_DEPTH = 16

# Size limits of a space (docs/guide.md): far above the builtin spaces (36-50 channels, a few dozen
# nodes) and the EDSR-sized example, low enough that a space cannot make qnas build a network for
# hours or allocate without bound.
MAX_CHANNELS = 4096  # "channels" and every channel expression's value
MAX_COLORS = 4
MAX_REPEAT = 256  # "repeat" of a cell node
MAX_NODES = 4096  # nodes of the whole network once cells are inlined and repeated


def list_spaces() -> list[str]:
    """The builtin space names."""
    return list(BUILTIN_SPACES)


def load_space(spec: str | os.PathLike | dict) -> dict[str, Any]:
    """A validated space (a deep copy) from a builtin name, a JSON file or a dict.

    Raises QnasError with one line naming the file or the offending node for anything malformed."""
    if isinstance(spec, dict):
        space, where = copy.deepcopy(spec), f"space {spec.get('name', '?')!r}"
    elif str(spec) in BUILTIN_SPACES:
        text = resources.files("qnas.spaces").joinpath(f"{spec}.json").read_text(encoding="utf-8")
        space, where = json.loads(text), f"space {spec!r}"
    else:
        path = os.fspath(spec)
        if not os.path.exists(path):
            raise QnasError(
                f"unknown search space {str(spec)!r}: not one of {', '.join(BUILTIN_SPACES)} and no such file"
            )
        check_input_file(path, "search space JSON file")
        try:
            with open(path, encoding="utf-8") as f:
                space = json.load(f)
        except IsADirectoryError as e:
            raise QnasError(f"{path}: is a folder, not a search space JSON file") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise QnasError(f"{path}: not valid JSON ({e})") from e
        except OSError as e:
            raise QnasError(f"{path}: cannot read ({e.strerror})") from e
        where = path
    validate_space(space, where)
    return space


def with_anchor(space: dict, anchor: str | None) -> dict[str, Any]:
    """A copy of a space with its global anchor skip set ("nearest") or removed (None)."""
    if anchor is not None and anchor not in ANCHORS:
        raise QnasError(f"anchor: expected None or one of {', '.join(ANCHORS)}, got {anchor!r}")
    return {**copy.deepcopy(space), "anchor": anchor}


def space_ops(space: dict) -> dict[str, dict]:
    """The op library of a space: the builtin ops updated with the space's own "ops"."""
    return {**BUILTIN_OPS, **space.get("ops", {})}


def op_stages(op: dict) -> list[dict]:
    """The convolutions of an op spec, normalised: [{"kernel": (kh, kw), "groups", "dilation", "width"}]."""
    raw = op["sequence"] if "sequence" in op else [op]
    stages = []
    for s in raw:
        k = s.get("kernel", 3)
        kh, kw = (k, k) if isinstance(k, int) else (int(k[0]), int(k[1]))
        stages.append(
            {
                "kernel": (kh, kw),
                "groups": int(s.get("groups", 1)),
                "dilation": int(s.get("dilation", 1)),
                "width": int(s.get("width", 1)),
            }
        )
    return stages


def is_single_conv(op: dict) -> bool:
    """Whether the op is one convolution (mixed by the fused op) rather than a composite."""
    return "sequence" not in op


def eval_channels(expr: Any, env: dict[str, int], where: str) -> int:
    """Evaluates a channel expression: an int, or arithmetic (+ - * // and parentheses) over env's names."""
    if isinstance(expr, bool):
        raise QnasError(f"{where}: expected a channel count, got {expr!r}")
    if isinstance(expr, int):
        value = expr
    elif isinstance(expr, str):
        try:
            tree = ast.parse(expr, mode="eval")
        except SyntaxError as e:
            raise QnasError(f"{where}: {expr!r} is not an arithmetic expression") from e
        value = _eval_node(tree.body, env, expr, where)
    else:
        raise QnasError(f"{where}: expected an integer or an expression string, got {expr!r}")
    if value < 1:
        raise QnasError(f"{where}: {expr!r} evaluates to {value}, expected a positive count")
    if value > MAX_CHANNELS:
        raise QnasError(f"{where}: {expr!r} evaluates to {value} channels, more than {MAX_CHANNELS}")
    return value


def _eval_node(node: ast.AST, env: dict[str, int], expr: str, where: str) -> int:
    ops = {
        ast.Add: lambda a, b: a + b,
        ast.Sub: lambda a, b: a - b,
        ast.Mult: lambda a, b: a * b,
        ast.FloorDiv: lambda a, b: a // b,
    }
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in env:
            raise QnasError(
                f"{where}: unknown name {node.id!r} in {expr!r} (known: {', '.join(sorted(env))})"
            )
        return env[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in ops:
        a, b = _eval_node(node.left, env, expr, where), _eval_node(node.right, env, expr, where)
        if isinstance(node.op, ast.FloorDiv) and b == 0:
            raise QnasError(f"{where}: division by zero in {expr!r}")
        return ops[type(node.op)](a, b)
    raise QnasError(f"{where}: {expr!r} may only use integers, names, + - * // and parentheses")


# ----------------------------------------------------------------------------------------------------
# Validation: structure only (channel arithmetic and group divisibility are checked when a space is
# instantiated for a scale, by qnas.nas.graph.compile_space, which names the node as well).


def validate_space(space: Any, where: str = "space") -> None:
    """Checks the structure of a space document; QnasError naming `where` and the node otherwise."""
    if not isinstance(space, dict):
        raise QnasError(f"{where}: a search space must be a JSON object")
    fmt = space.get("format", SPACE_FORMAT)
    if fmt != SPACE_FORMAT:
        raise QnasError(f"{where}: format {fmt!r} is not {SPACE_FORMAT!r}")
    for key in ("name", "channels", "network"):
        if key not in space:
            raise QnasError(f'{where}: missing "{key}"')
    if not isinstance(space["name"], str) or not space["name"]:
        raise QnasError(f'{where}: "name" must be a non-empty string')
    c = space["channels"]
    if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= MAX_CHANNELS:
        raise QnasError(f'{where}: "channels" must be an integer in 1..{MAX_CHANNELS}, got {c!r}')
    colors = space.get("colors", 3)
    if isinstance(colors, bool) or not isinstance(colors, int) or not 1 <= colors <= MAX_COLORS:
        raise QnasError(f'{where}: "colors" must be an integer in 1..{MAX_COLORS}, got {colors!r}')
    anchor = space.get("anchor")
    if anchor is not None and anchor not in ANCHORS:
        raise QnasError(f'{where}: "anchor" must be null or one of {", ".join(ANCHORS)}, got {anchor!r}')
    ops = space.get("ops", {})
    if not isinstance(ops, dict):
        raise QnasError(f'{where}: "ops" must be an object of op specs')
    for name, op in ops.items():
        _check_op(name, op, where)
    library = space_ops(space)
    default = space.get("candidates")
    if default is not None:
        _check_candidates(default, library, f"{where}: candidates")
    cells = space.get("cells", {})
    if not isinstance(cells, dict):
        raise QnasError(f'{where}: "cells" must be an object of node lists')
    for cname, nodes in cells.items():
        if not isinstance(cname, str) or not _NAME.match(cname):
            raise QnasError(f"{where}: cell name {cname!r} must be an identifier")
        _check_nodes(nodes, library, cells, default, f"{where}: cell {cname}")
    _check_nodes(space["network"], library, cells, default, f"{where}: network")
    _check_cell_cycles(space, where)
    _check_total_nodes(space, where)


def _check_op(name: Any, op: Any, where: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise QnasError(f"{where}: op name {name!r} must be an identifier")
    if not isinstance(op, dict):
        raise QnasError(f"{where}: op {name}: expected an object")
    stages = op.get("sequence", [op]) if "sequence" in op else [op]
    if not isinstance(stages, list) or not stages:
        raise QnasError(f'{where}: op {name}: "sequence" must be a non-empty list of convolutions')
    for k, s in enumerate(stages):
        w = f"{where}: op {name}" + (f" stage {k}" if "sequence" in op else "")
        if not isinstance(s, dict):
            raise QnasError(f"{w}: expected an object")
        unknown = set(s) - {"kernel", "groups", "dilation", "width"} - ({"sequence"} if s is op else set())
        if unknown:
            raise QnasError(f"{w}: unknown keys {sorted(unknown)}")
        kern = s.get("kernel", 3)
        ks = [kern, kern] if isinstance(kern, int) and not isinstance(kern, bool) else kern
        if (
            not isinstance(ks, list)
            or len(ks) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 and v % 2 == 1 for v in ks)
        ):
            raise QnasError(f"{w}: kernel {kern!r} must be an odd positive int or [kh, kw] of odd ints")
        for key in ("groups", "dilation", "width"):
            v = s.get(key, 1)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise QnasError(f"{w}: {key} must be a positive integer, got {v!r}")
        if s.get("width", 1) != 1 and (k == len(stages) - 1):
            raise QnasError(f"{w}: the last stage outputs the layer's channels (width must be 1)")


def _check_candidates(cands: Any, library: dict, where: str) -> None:
    if not isinstance(cands, list) or not cands or not all(isinstance(c, str) for c in cands):
        raise QnasError(f"{where}: expected a non-empty list of op names")
    for c in cands:
        if c not in library:
            raise QnasError(f"{where}: unknown op {c!r} (known: {', '.join(sorted(library))})")
    if len(set(cands)) != len(cands):
        raise QnasError(f"{where}: an op is listed twice")


def _check_nodes(nodes: Any, library: dict, cells: dict, default: Any, where: str) -> None:
    if not isinstance(nodes, list) or not nodes:
        raise QnasError(f"{where}: expected a non-empty list of nodes")
    seen = {"input"}
    for k, node in enumerate(nodes):
        w = f"{where}: node {k}"
        if not isinstance(node, dict):
            raise QnasError(f"{w}: expected an object")
        name = node.get("name")
        if not isinstance(name, str) or not _NAME.match(name) or name == "input":
            raise QnasError(f'{w}: "name" must be an identifier other than "input", got {name!r}')
        w = f"{where}: node {name}"
        if name in seen:
            raise QnasError(f"{w}: name used twice")
        op = node.get("op")
        if op not in NODE_OPS:
            raise QnasError(f"{w}: op {op!r} is not one of {', '.join(NODE_OPS)}")
        inputs = node.get("inputs")
        if inputs is not None:
            if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
                raise QnasError(f'{w}: "inputs" must be a non-empty list of node names')
            for i in inputs:
                if i not in seen:
                    raise QnasError(f"{w}: input {i!r} is not an earlier node (or 'input')")
        n_in = len(inputs) if inputs is not None else 1
        if op in ("layer", "act", "pixel_shuffle", "residual", "cell") and n_in != 1:
            raise QnasError(f"{w}: a {op} node takes exactly one input")
        if op == "add" and n_in < 2:
            raise QnasError(f"{w}: an add node needs at least two inputs")
        if op == "layer":
            if "out" not in node:
                raise QnasError(f'{w}: a layer needs "out" (its output channels)')
            cands = node.get("candidates", default)
            if cands is None:
                raise QnasError(f'{w}: no "candidates" here and no default "candidates" in the space')
            _check_candidates(cands, library, f"{w}: candidates")
            if node.get("act", "relu") not in LAYER_ACTS:
                raise QnasError(f"{w}: act {node.get('act')!r} is not one of {', '.join(LAYER_ACTS)}")
        if op == "act" and node.get("fn", "relu") not in ACTIVATIONS:
            raise QnasError(f"{w}: fn {node.get('fn')!r} is not one of {', '.join(ACTIVATIONS)}")
        if op in ("residual", "cell"):
            if not isinstance(node.get("cell"), str) or node["cell"] not in cells:
                raise QnasError(f'{w}: cell {node.get("cell")!r} is not defined in "cells"')
            rep = node.get("repeat", 1)
            if isinstance(rep, bool) or not isinstance(rep, int) or not 1 <= rep <= MAX_REPEAT:
                raise QnasError(f'{w}: "repeat" must be an integer in 1..{MAX_REPEAT}, got {rep!r}')
            alphas = node.get("alphas")
            if alphas is not None and (not isinstance(alphas, str) or not _SLOT.match(alphas)):
                raise QnasError(f'{w}: "alphas" must be a name like "cell", got {alphas!r}')
            if rep > 1:
                for r in range(1, rep + 1):
                    seen.add(f"{name}{r}")
        seen.add(name)


def _check_cell_cycles(space: dict, where: str) -> None:
    cells = space.get("cells", {})

    def visit(nodes: list, stack: tuple) -> None:
        if len(stack) > _MAX_DEPTH:
            raise QnasError(f"{where}: cells nested deeper than {_MAX_DEPTH} ({' > '.join(stack)})")
        for node in nodes:
            if node["op"] in ("residual", "cell"):
                c = node["cell"]
                if c in stack:
                    raise QnasError(f"{where}: cell {c} contains itself ({' > '.join((*stack, c))})")
                visit(cells[c], (*stack, c))

    visit(space["network"], ())


def _check_total_nodes(space: dict, where: str) -> None:
    """Refuses a network of more than MAX_NODES nodes once its cells are inlined and repeated (counted
    per cell once, so a deep nest of repeats is counted, not built)."""
    cells = space.get("cells", {})
    sizes: dict[str, int] = {}

    def size(nodes: list) -> int:
        total = 0
        for node in nodes:
            total += 1
            if node["op"] in ("residual", "cell"):
                c = node["cell"]
                if c not in sizes:
                    sizes[c] = size(cells[c])
                total += node.get("repeat", 1) * sizes[c]
        return total

    n = size(space["network"])
    if n > MAX_NODES:
        raise QnasError(f"{where}: the network has {n} nodes once cells are repeated, more than {MAX_NODES}")
