"""Genotypes (what a search found) and the networks derived from them.

A genotype file (RUN/genotype.json) is self-contained:

    {"format": "qnas-genotype/1",
     "space": {...the whole space document...}, "scale": 4, "candidates": null | [ops],
     "layers": {"head1": {"op": "conv3x3", "w_bits": 4, "a_bits": 4}, "cell.conv1": {...}, ...},
     "cost": {"lr_size": [h, w], "bitops": ..., "macs": ..., "params": ...},   (informative)
     "search": {...}}                                                              (informative)

"layers" has one entry per architecture slot (cells that share their slots share the choice). Files
written before the residual became a retraining choice may hold a top-level "adq"; it is ignored.
Importing this module registers the network kind "genotype" (qnas.runs.network):
{"kind": "genotype", "scale": S, "genotype": {...}, "act_quantizer": "hwgq" | "lsq", "adq": false},
which builds the derived network (DerivedNetwork) at the searched bits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qnas.errors import QnasError
from qnas.files import check_input_file
from qnas.nas.graph import GraphModule, LayerSite, compile_space, stage_channels
from qnas.nas.layers import ACT_QUANTIZERS, DerivedLayer
from qnas.quant.apply import probe_network, quantize_network
from qnas.runs.network import register_network_kind
from qnas.spaces import load_space, op_stages

GENOTYPE_FORMAT = "qnas-genotype/1"


class DerivedNetwork(nn.Module):
    """The network a genotype describes: the space's graph with the chosen op in every layer, fully
    quantized by qnas.quant.apply (genotype_plan): each convolution's weights (LSQ, one step per output
    channel) and input (`act_quantizer`) at the bits its layer was searched at, every skip connection
    z = Q(Q(x) + Q(y)) and the output at SKIP_BITS, as FQSR quantizes skips (Wang et al., ACM MM 2021).

    Residual cells are plain sums unless `adq`: ADQ (qnas.nas.adq) scales a branch by the standard
    deviation of the whole input image, which has no integer form and changes with the tile an image
    is cut into, so an ADQ network trains and evaluates but does not export."""

    def __init__(self, genotype: dict, act_quantizer: str = "hwgq", adq: bool = False):
        super().__init__()
        if act_quantizer not in ACT_QUANTIZERS:
            raise QnasError(
                f"act_quantizer: expected one of {', '.join(ACT_QUANTIZERS)}, got {act_quantizer!r}"
            )
        check_genotype(genotype)
        compiled = compile_space(genotype["space"], genotype["scale"], genotype.get("candidates"))
        layers = genotype["layers"]
        self.scale = compiled.scale
        self.in_channels = int(compiled.space.get("colors", 3))
        self.genotype = genotype
        self.adq = bool(adq)

        def make_layer(site: LayerSite) -> nn.Module:
            op = compiled.ops[layers[site.slot]["op"]]
            layer = DerivedLayer(op_stages(op), stage_channels(op, site.in_ch, site.out_ch), site.act)
            layer.slot = site.slot
            return layer

        self.net = GraphModule(compiled.graph, make_layer, self.adq)
        quantize_network(self, genotype_plan(self, act_quantizer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, None)


#: Bits of the skip connections and the output of a derived network (FQSR's released a4w4o8 keeps them
#: at 8 whatever the convolutions' bits).
SKIP_BITS = 8


def genotype_plan(net: nn.Module, act_quantizer: str) -> dict:
    """The quantization plan (qnas.quant.apply, scheme "genotype") of a float derived network: the bits of
    every convolution from its layer's choice (net.genotype), the signedness of every input from a probe."""
    probe = probe_network(net)
    choices = net.genotype["layers"]
    layers: dict[str, Any] = {}
    for name, m in net.named_modules():
        if not isinstance(m, DerivedLayer):
            continue
        choice = choices[m.slot]
        for k in range(len(m.convs)):
            conv = f"{name}.convs.{k}"
            w = {"quantizer": "lsq", "bits": choice["w_bits"], "per_channel": True}
            a = {"quantizer": act_quantizer, "bits": choice["a_bits"], "signed": not probe["convs"][conv]}
            layers[conv] = {"w": w if choice["w_bits"] else None, "a": a if choice["a_bits"] else None}
    # Skips and output: learnable clipping initialised from the first batch (MSE-optimal), as FQSR.
    skip = {"quantizer": "fqsr", "bits": SKIP_BITS}
    return {
        "scheme": "genotype",
        "bits": None,
        "init_stat": "mse",
        "warmup": 0,
        "layers": layers,
        "adds": {name: {**skip, "signed": [not s for s in signs]} for name, signs in probe["adds"].items()},
        "output": {**skip, "signed": True},
    }


def check_genotype(g: Any, where: str = "genotype") -> None:
    """Structure of a genotype (the space inside is validated too); QnasError naming `where`."""
    if not isinstance(g, dict):
        raise QnasError(f"{where}: a genotype must be a JSON object")
    if g.get("format") != GENOTYPE_FORMAT:
        raise QnasError(
            f"{where}: not a QuantNAS genotype (format {g.get('format')!r}, expected {GENOTYPE_FORMAT!r})"
        )
    for key in ("space", "scale", "layers"):
        if key not in g:
            raise QnasError(f'{where}: missing "{key}"')
    space = load_space(g["space"]) if isinstance(g["space"], dict) else None
    if space is None:
        raise QnasError(f'{where}: "space" must be the space document (a JSON object)')
    cands = g.get("candidates")
    if cands is not None and not (isinstance(cands, list) and all(isinstance(c, str) for c in cands)):
        raise QnasError(f'{where}: "candidates" must be null or a list of op names, got {cands!r}')
    compiled = compile_space(space, g["scale"], g.get("candidates"))
    layers = g["layers"]
    if not isinstance(layers, dict):
        raise QnasError(f'{where}: "layers" must be an object slot -> choice')
    missing = [s for s in compiled.slots if s not in layers]
    if missing:
        raise QnasError(f"{where}: no choice for layer(s) {', '.join(missing)}")
    extra = [s for s in layers if s not in compiled.slots]
    if extra:
        raise QnasError(f"{where}: layer(s) {', '.join(extra)} are not in space {space['name']!r}")
    for slot, ch in layers.items():
        if not isinstance(ch, dict) or not {"op", "w_bits", "a_bits"} <= set(ch):
            raise QnasError(f'{where}: layer {slot}: expected {{"op", "w_bits", "a_bits"}}')
        if not isinstance(ch["op"], str) or ch["op"] not in compiled.ops:
            raise QnasError(f"{where}: layer {slot}: unknown op {ch['op']!r}")
        for k in ("w_bits", "a_bits"):
            b = ch[k]
            if isinstance(b, bool) or not isinstance(b, int) or (b != 0 and not 2 <= b <= 8):
                raise QnasError(f"{where}: layer {slot}: {k} {b!r} is not in {{0, 2..8}}")
        for site in compiled.slot_sites(slot):
            op = compiled.ops[ch["op"]]
            for st, (ci, co) in zip(op_stages(op), stage_channels(op, site.in_ch, site.out_ch), strict=True):
                if ci % st["groups"] or co % st["groups"]:
                    raise QnasError(
                        f"{where}: layer {slot}: {ch['op']} has groups={st['groups']}, which does not divide {ci} -> {co}"
                    )


def read_genotype(path: str | os.PathLike) -> dict:
    """A genotype from a file (or a run folder holding genotype.json), or the genotype of a run that
    trained one (its config.json, or its folder); one-line QnasError otherwise."""
    p = Path(path)
    if p.is_dir():
        folder, p = p, p / "genotype.json"
        if not p.exists() and (folder / "config.json").exists():
            p = folder / "config.json"  # a run that trained a genotype
    if not p.exists():
        raise QnasError(f"{p}: file not found")
    check_input_file(p, "genotype JSON file")
    try:
        g = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise QnasError(f"{p}: file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QnasError(f"{p}: not valid JSON ({e})") from e
    except OSError as e:
        raise QnasError(f"{p}: cannot read ({e.strerror})") from e
    g = run_genotype(g) or g
    try:
        check_genotype(g, str(p))
    except QnasError as e:
        msg = str(e)
        raise QnasError(msg if msg.startswith(str(p)) else f"{p}: {msg}") from e
    return g


def is_genotype(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("format") == GENOTYPE_FORMAT


def run_genotype(doc: Any) -> dict | None:
    """The genotype a run's config.json trained (`qnas train --arch`), else None."""
    network = doc.get("network") if isinstance(doc, dict) else None
    if (
        isinstance(network, dict)
        and network.get("kind") == "genotype"
        and is_genotype(network.get("genotype"))
    ):
        return network["genotype"]
    return None


def uniform_genotype(
    space: dict, scale: int, op: str, bits: int, *, candidates: list[str] | None = None
) -> dict:
    """The fixed architecture of a space with every layer set to `op` at `bits` (weights and activations),
    the uniform-quantization baseline. Layers whose own candidate list lacks `op` take their first one."""
    space = load_space(space)
    compiled = compile_space(space, scale, candidates)
    if op not in compiled.ops:
        raise QnasError(f"--op: unknown op {op!r} (known: {', '.join(sorted(compiled.ops))})")
    layers = {
        slot: {"op": op if op in cands else cands[0], "w_bits": int(bits), "a_bits": int(bits)}
        for slot, cands in compiled.slots.items()
    }
    return {
        "format": GENOTYPE_FORMAT,
        "space": space,
        "scale": compiled.scale,
        "candidates": candidates,
        "layers": layers,
    }


def genotype_cost(genotype: dict, lr_size: tuple[int, int]) -> dict:
    """MACs, parameters and BitOps (qnas.cost) of the derived network at an LR input size."""
    from qnas.cost import count_cost

    with torch.device("meta"):
        net = DerivedNetwork(genotype)
    c = count_cost(net, lr_size, name=f"genotype:{genotype['space']['name']}")
    return {"lr_size": list(lr_size), "bitops": c.bitops, "macs": c.macs, "params": c.params}


def _build_genotype_network(cfg: dict) -> nn.Module:
    if "genotype" not in cfg:
        raise QnasError('network config of kind "genotype" needs "genotype"')
    return DerivedNetwork(cfg["genotype"], cfg.get("act_quantizer", "hwgq"), bool(cfg.get("adq", False)))


def genotype_network_config(genotype: dict, act_quantizer: str = "hwgq", adq: bool = False) -> dict:
    """The network config (qnas.runs.network) of a genotype's derived network."""
    return {
        "kind": "genotype",
        "scale": int(genotype["scale"]),
        "genotype": genotype,
        "act_quantizer": act_quantizer,
        "adq": bool(adq),
    }


register_network_kind("genotype", _build_genotype_network)
