"""A search space instantiated for one scale: every node with its channels and resolution, every searched
layer with its architecture slot, and the module that runs such a graph (shared by the supernet and the
derived network, so both have the same structure, state-dict names, anchor skip and initialisation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qnas.errors import QnasError
from qnas.nas.adq import ADQ
from qnas.spaces import eval_channels, op_stages, space_ops
from qnas.sr.common import Add, NearestAnchor, check_scale


@dataclass
class LayerSite:
    """One searched layer as it sits in the network: the slot its architecture parameters come from
    (shared slots appear at several sites), its channels and the candidate ops allowed there."""

    path: str  # module path, e.g. "body.cell2.conv1"
    slot: str  # architecture slot, e.g. "cell.conv1"
    in_ch: int
    out_ch: int
    candidates: list[str]
    act: str  # pre-activation: "relu" (activations quantized unsigned) or "none" (signed)
    pixels: int  # output pixels per LR input pixel (1 before the upsampler, scale^2 after)


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str]
    out_ch: int
    spec: dict[str, Any]
    site: LayerSite | None = None
    sub: Graph | None = None  # residual / cell


@dataclass
class Graph:
    nodes: list[Node] = field(default_factory=list)
    in_ch: int = 0
    out_ch: int = 0
    output: str = ""
    anchor: str | None = None  # the whole network only: its global anchor skip (qnas.spaces.ANCHORS)
    scale: int = 1  # the whole network only: the upscaling factor the anchor skip applies


@dataclass
class CompiledSpace:
    """A space for one scale (see compile_space)."""

    space: dict[str, Any]
    scale: int
    ops: dict[str, dict]
    graph: Graph
    sites: list[LayerSite]
    slots: dict[str, list[str]]  # slot -> candidate ops (identical at every site of the slot)

    def slot_sites(self, slot: str) -> list[LayerSite]:
        return [s for s in self.sites if s.slot == slot]


def stage_channels(op: dict, in_ch: int, out_ch: int) -> list[tuple[int, int]]:
    """(in, out) channels of every convolution of an op placed between in_ch and out_ch channels."""
    chans, cin = [], in_ch
    for k, st in enumerate(op_stages(op)):
        cout = out_ch if k == len(op_stages(op)) - 1 else out_ch * st["width"]
        chans.append((cin, cout))
        cin = cout
    return chans


def op_macs_per_pixel(op: dict, in_ch: int, out_ch: int) -> int:
    """Multiply-adds per output pixel of an op (every stage keeps the resolution)."""
    return sum(
        cout * (cin // st["groups"]) * st["kernel"][0] * st["kernel"][1]
        for st, (cin, cout) in zip(op_stages(op), stage_channels(op, in_ch, out_ch), strict=True)
    )


def compile_space(space: dict, scale: int, candidates: list[str] | None = None) -> CompiledSpace:
    """Instantiates a validated space (qnas.spaces.load_space) for `scale`.

    candidates: replaces the space's default candidate list (layers that name their own keep them),
    e.g. ["conv3x3"] for a bits-only search on a fixed architecture. Raises QnasError naming the node for
    channel counts that do not work out (groups that do not divide, adds of different widths, ...)."""
    scale = check_scale(scale)
    ops = space_ops(space)
    default = list(candidates) if candidates is not None else space.get("candidates")
    if candidates is not None:
        for c in candidates:
            if c not in ops:
                raise QnasError(f"--ops: unknown op {c!r} (known: {', '.join(sorted(ops))})")
    name = space["name"]
    sites: list[LayerSite] = []
    colors = int(space.get("colors", 3))

    def build(nodes: list[dict], in_ch: int, pixels: int, prefix: str, ns: str, depth: int) -> Graph:
        g = Graph(in_ch=in_ch)
        chans = {"input": in_ch}
        res = {"input": pixels}
        alias: dict[str, str] = {}
        prev = "input"
        for spec in nodes:
            base = spec["name"]
            reps = int(spec.get("repeat", 1)) if spec["op"] in ("residual", "cell") else 1
            for r in range(1, reps + 1):
                nname = f"{base}{r}" if reps > 1 else base
                where = f"space {name}: node {prefix}{nname}"
                raw_inputs = spec.get("inputs") if r == 1 else None
                inputs = [alias.get(i, i) for i in raw_inputs] if raw_inputs else [prev]
                in_chs = [chans[i] for i in inputs]
                in_res = {res[i] for i in inputs}
                if len(in_res) != 1:
                    raise QnasError(f"{where}: inputs have different resolutions")
                px = in_res.pop()
                env = {"c": int(space["channels"]), "colors": colors, "scale": scale, "in": in_chs[0]}
                op = spec["op"]
                node = Node(nname, op, inputs, in_chs[0], spec)
                if op == "layer":
                    out = eval_channels(spec["out"], env, where)
                    cands = list(spec["candidates"]) if "candidates" in spec else list(default or [])
                    if not cands:
                        raise QnasError(f"{where}: no candidate ops")
                    for c in cands:
                        for (ci, co), st in zip(
                            stage_channels(ops[c], in_chs[0], out), op_stages(ops[c]), strict=True
                        ):
                            gr = st["groups"]
                            if ci % gr or co % gr:
                                raise QnasError(
                                    f"{where}: candidate {c} has groups={gr}, which does not divide {ci} -> {co} channels"
                                )
                    slot = f"{ns}.{nname}" if ns else nname
                    node.site = LayerSite(
                        prefix + nname, slot, in_chs[0], out, cands, spec.get("act", "relu"), px
                    )
                    sites.append(node.site)
                    node.out_ch = out
                elif op == "add":
                    if len(set(in_chs)) != 1:
                        raise QnasError(f"{where}: adds inputs of different widths {in_chs}")
                elif op == "concat":
                    node.out_ch = sum(in_chs)
                elif op == "pixel_shuffle":
                    f = eval_channels(spec.get("factor", "scale"), env, where)
                    if in_chs[0] % (f * f):
                        raise QnasError(
                            f"{where}: {in_chs[0]} channels do not shuffle by {f} (need a multiple of {f * f})"
                        )
                    node.out_ch = in_chs[0] // (f * f)
                    node.spec = {**spec, "factor": f}
                    px = px * f * f
                elif op in ("residual", "cell"):
                    child_ns = spec.get("alphas") or (f"{ns}.{nname}" if ns else nname)
                    sub = build(
                        space["cells"][spec["cell"]], in_chs[0], px, f"{prefix}{nname}.", child_ns, depth + 1
                    )
                    if op == "residual" and sub.out_ch != in_chs[0]:
                        raise QnasError(
                            f"{where}: a residual cell must keep the width ({in_chs[0]} in, {sub.out_ch} out)"
                        )
                    node.sub = sub
                    node.out_ch = sub.out_ch
                g.nodes.append(node)
                chans[nname], res[nname] = node.out_ch, px
                prev = nname
            if reps > 1:
                alias[base] = prev
                chans[base], res[base] = chans[prev], res[prev]
        g.output = prev
        g.out_ch = chans[prev]
        return g

    graph = build(space["network"], colors, 1, "", "", 0)
    graph.anchor, graph.scale = space.get("anchor"), scale
    if graph.out_ch != colors:
        raise QnasError(f"space {name}: the network ends with {graph.out_ch} channels, expected {colors}")
    if not _ends_upscaled(graph, scale):
        raise QnasError(
            f'space {name}: the network does not upscale by {scale} (add a pixel_shuffle with factor "scale")'
        )
    slots: dict[str, list[str]] = {}
    for s in sites:
        if s.slot in slots and slots[s.slot] != s.candidates:
            raise QnasError(f"space {name}: layers sharing slot {s.slot} have different candidates")
        slots.setdefault(s.slot, s.candidates)
    return CompiledSpace(space, scale, ops, graph, sites, slots)


def _ends_upscaled(graph: Graph, scale: int) -> bool:
    px = 1

    def walk(g: Graph, px: int) -> int:
        for n in g.nodes:
            if n.op == "pixel_shuffle":
                px *= n.spec["factor"] ** 2
            elif n.sub is not None:
                px = walk(n.sub, px)
        return px

    return walk(graph, px) == scale * scale


# ----------------------------------------------------------------------------------------------------
# Running a compiled graph.

LayerFactory = Callable[[LayerSite], nn.Module]


class GraphModule(nn.Module):
    """Runs a compiled graph. Layer modules come from `make_layer(site)` and are called as
    ``layer(x, ctx)``: ctx is what the owning network passes down (the supernet: architecture
    probabilities by slot; a derived network: None). Residual cells are wrapped in ADQ, or a plain
    residual when `adq` is False.

    The whole network's module (the graph compile_space returns) adds the space's anchor skip to its
    output (qnas.sr.common.NearestAnchor). The layers create their kernels with init_kernel, so the
    supernet and the derived network start from the same kind of weights."""

    def __init__(self, graph: Graph, make_layer: LayerFactory, adq: bool, *, _cell: bool = False):
        super().__init__()
        self.spec = graph
        self.nodes = nn.ModuleDict()
        for n in graph.nodes:
            if n.op == "layer":
                self.nodes[n.name] = make_layer(n.site)
            elif n.op == "add":
                self.nodes[n.name] = Add()
            elif n.op == "act":
                fn = n.spec.get("fn", "relu")
                self.nodes[n.name] = nn.LeakyReLU(0.05) if fn == "lrelu" else nn.ReLU()
            elif n.op == "pixel_shuffle":
                self.nodes[n.name] = nn.PixelShuffle(n.spec["factor"])
            elif n.op == "residual":
                self.nodes[n.name] = Residual(n.out_ch, GraphModule(n.sub, make_layer, adq, _cell=True), adq)
            elif n.op == "cell":
                self.nodes[n.name] = GraphModule(n.sub, make_layer, adq, _cell=True)
        self.anchor = None if _cell else graph.anchor
        self.scale = graph.scale
        if self.anchor is not None:
            if self.anchor != "nearest":
                raise ValueError(f"anchor: expected 'nearest', got {self.anchor!r}")
            self.anchor_skip = NearestAnchor(graph.scale)

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        values = {"input": x}
        for n in self.spec.nodes:
            mod = self.nodes[n.name] if n.op != "concat" else None
            ins = [values[i] for i in n.inputs]
            if n.op in ("layer", "residual", "cell"):
                y = mod(ins[0], ctx)
            elif n.op == "add":
                y = ins[0]
                for t in ins[1:]:
                    y = mod(y, t)
            elif n.op == "concat":
                y = torch.cat(ins, dim=1)
            else:
                y = mod(ins[0])
            values[n.name] = y
        y = values[self.spec.output]
        if self.anchor is not None:
            y = self.anchor_skip(y, x)
        return y


class Residual(nn.Module):
    """out = ADQ(x, cell) (see qnas.nas.adq.ADQ), or cell(x) + x with ADQ disabled."""

    def __init__(self, channels: int, cell: GraphModule, adq: bool):
        super().__init__()
        self.cell = cell
        self.adq = ADQ(channels) if adq else None
        self.add = Add()

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        if self.adq is None:
            return self.add(self.cell(x, ctx), x)
        return self.adq(x, lambda t: self.cell(t, ctx))


def same_padding(kernel: tuple[int, int], dilation: int) -> tuple[int, int]:
    return dilation * (kernel[0] - 1) // 2, dilation * (kernel[1] - 1) // 2


def conv2d_same(x: torch.Tensor, w: torch.Tensor, groups: int, dilation: int, bias=None) -> torch.Tensor:
    return F.conv2d(x, w, bias, 1, same_padding((w.shape[2], w.shape[3]), dilation), dilation, groups)


def init_kernel(shape: tuple[int, ...], relu: bool) -> torch.Tensor:
    """A variance-preserving kernel of this shape (He et al., "Delving Deep into Rectifiers", ICCV 2015):
    uniform with variance gain²/fan_in, gain √2 for a convolution that reads relu'd activations, 1 for
    signed ones. (nn.Conv2d's default, kaiming_uniform with a=√5, has variance 1/(3·fan_in): every layer
    of a chain then shrinks the signal about √6 times.)"""
    w = torch.empty(shape)
    nn.init.kaiming_uniform_(w, a=0.0, nonlinearity="relu" if relu else "linear")
    return w
