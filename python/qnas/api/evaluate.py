"""`qnas eval`, `qnas cost` and `qnas inspect` as API commands: what a network scores, costs and computes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from qnas.api.command import Command, load_network
from qnas.errors import QnasError
from qnas.options import option


@dataclass(kw_only=True)
class EvalOptions:
    """`qnas eval`: what to evaluate (bicubic, a run, a packed file) and on which images."""

    model: str | None = option(
        None, metavar="NAME", help="Upscaler to evaluate: 'bicubic' (MATLAB imresize)."
    )
    checkpoint: str | None = option(
        None,
        metavar="RUN",
        path="any",
        help="A run folder (or its model.pt) written by `qnas train`, `search`, `strategy`, or a packed "
        "file of `qnas export --format packed` (run by the integer runtime).",
    )
    data: str = option(
        "builtin",
        help="'builtin' (validation split), 'builtin:train', or a folder (plain images, DIV2K, HR/ + LR_bicubic/).",
    )
    scale: int | None = option(None, help="Upscaling factor: 2, 3 or 4 (a checkpoint knows its own).")
    best: bool = option(
        False,
        help="With --checkpoint RUN: evaluate RUN/best.pt (the best validation PSNR of `qnas train --val-data`).",
    )
    save_images: str | None = option(
        None,
        metavar="DIR",
        path="dir",
        help="Write each upscaled image to DIR/<name>.png (never over an image of --data).",
    )
    force: bool = option(False, help="Replace images in --save-images DIR that exist.")


def run_eval(opts: EvalOptions) -> dict[str, Any]:
    """PSNR/SSIM (Y channel, scale-pixel border cropped, MATLAB protocol) per image and mean."""
    from qnas.data.datasets import check_scale, eval_dataset
    from qnas.evaluate import bicubic_upscaler, evaluate

    checkpoint, scale = opts.checkpoint, opts.scale
    if (opts.model is None) == (checkpoint is None):
        raise QnasError("give exactly one of --model bicubic or --checkpoint RUN")
    if opts.best:
        if checkpoint is None:
            raise QnasError("--best needs --checkpoint RUN")
        checkpoint = _best_file(checkpoint)
    if checkpoint is not None:
        from qnas.runs.network import network_scale, network_upscaler

        if os.path.isfile(checkpoint) and checkpoint.lower().endswith(".qnp"):
            # A packed file (`qnas export --format packed`): what `qnas upscale` runs, on the CPU.
            from qnas.deploy import PackedModel

            packed = PackedModel.load(checkpoint, "cpu")
            own, upscale = packed.scale, packed
        else:
            net, blob = load_network(checkpoint)
            own, upscale = network_scale(blob["network"]), network_upscaler(net)
        if scale is not None and scale != own:
            raise QnasError(f"--scale {scale}: {checkpoint} is a x{own} network")
        scale, label = own, checkpoint
    else:
        if opts.model != "bicubic":
            raise QnasError(
                f"unknown model {opts.model!r} for eval: expected 'bicubic' (or use --checkpoint RUN)"
            )
        if scale is None:
            raise QnasError("--scale is required with --model bicubic")
        scale = check_scale(scale)
        upscale, label = bicubic_upscaler(scale), opts.model
    dataset = eval_dataset(opts.data, scale)
    result = evaluate(upscale, dataset, scale, save_dir=opts.save_images, label=label, force=opts.force)
    return {"model": label, "data": opts.data, "scale": scale, "count": len(dataset), "result": result}


def _best_file(run: str) -> str:
    """RUN/best.pt of `qnas eval --checkpoint RUN --best` (RUN: a run folder, or a file in one)."""
    folder = run if os.path.isdir(run) else os.path.dirname(run) or "."
    path = os.path.join(folder, "best.pt")
    if not os.path.isfile(path):
        raise QnasError(
            f"--best: {folder} has no best.pt (written by `qnas train --val-data SPEC`, at its best validation PSNR)"
        )
    return path


@dataclass(kw_only=True)
class CostOptions:
    """`qnas cost`: which network (a registered model, a config or genotype file, a run) at which size."""

    model: str | None = option(
        None,
        metavar="NAME",
        help="A registered model: edsr, edsr-baseline, srresnet, rfdn, rfdn-paper, rfdn-l (docs/models.md).",
    )
    arch: str | None = option(
        None,
        metavar="FILE",
        help='A JSON model config {"model": NAME, "scale": S, "kwargs": {...}} (what a checkpoint stores), '
        "a QuantNAS genotype (RUN/genotype.json): the derived network at its searched bits, or a run's "
        "config.json (a retrained genotype, or a full-precision model).",
    )
    checkpoint: str | None = option(
        None,
        metavar="RUN",
        path="any",
        help="A run folder: its network as trained (quantized layers count with their own bits). Runs one "
        "real forward pass on the CPU.",
    )
    scale: int | None = option(None, help="Upscaling factor 2, 3 or 4 (with --arch: taken from the file).")
    lr_size: str = option(metavar="HxW", help="LR input size in pixels, e.g. 48x48 (or 48).")
    bits: float | None = option(
        None,
        metavar="B",
        help="Bit-width for the weights and activations of every conv/linear that does not set its own "
        "w_bits/a_bits (default: 32, full precision).",
    )


def run_cost(opts: CostOptions) -> Any:
    """Per-layer and total MACs, parameters, BitOps (MACs x b_w x b_a) and weight memory of a model
    at an LR input size. The model is built on the meta device: nothing is computed or allocated."""
    import torch

    from qnas.cost import count_cost, parse_lr_size
    from qnas.runs.network import network_scale
    from qnas.sr import build_from_config, build_model, read_model_config

    scale, bits = opts.scale, opts.bits
    if sum(v is not None for v in (opts.model, opts.arch, opts.checkpoint)) != 1:
        raise QnasError("give exactly one of --model NAME, --arch FILE or --checkpoint RUN")
    # --checkpoint runs the network on a real input of that size; the others count on the meta device.
    size = parse_lr_size(opts.lr_size, max_side=1024) if opts.checkpoint else parse_lr_size(opts.lr_size)
    if bits is not None and not (1 <= bits <= 32):
        raise QnasError(f"--bits {bits:g} is out of range (1..32)")
    if bits is not None and bits.is_integer():
        bits = int(bits)
    if opts.checkpoint is not None:
        net, blob = load_network(opts.checkpoint)
        own = network_scale(blob["network"])
        if scale is not None and scale != own:
            raise QnasError(f"--scale {scale}: {opts.checkpoint} is a x{own} network")
        return count_cost(net, size, bits, name=blob["network"].get("model", {}).get("name"))
    with torch.device("meta"):
        if opts.arch is not None:
            from qnas.nas.derive import DerivedNetwork, is_genotype, read_genotype, run_genotype

            cfg = read_model_config(opts.arch)
            if not is_genotype(cfg) and ("network" in cfg or "search" in cfg):
                cfg = _run_config_model(cfg, opts.arch)
            if scale is not None and cfg.get("scale") != scale:
                raise QnasError(f"--scale {scale} differs from the scale {cfg.get('scale')!r} in {opts.arch}")
            if is_genotype(cfg) or run_genotype(cfg):
                model = DerivedNetwork(read_genotype(opts.arch))
            else:
                try:
                    model = build_from_config(cfg)
                except QnasError as e:
                    raise QnasError(f"{opts.arch}: {e}") from e
        else:
            if scale is None:
                raise QnasError("--scale is required with --model (2, 3 or 4)")
            model = build_model(opts.model, scale)
    return count_cost(model, size, bits)


def _run_config_model(cfg: dict, arch_file: str) -> dict:
    """What `qnas cost --arch` counts of a run's config.json: the genotype a run trained (at its bits),
    or the model config of a full-precision run. A quantized run's bits live in its plan, and a search
    run's result is its genotype.json: for those, the error names what to pass instead."""
    from qnas.nas.derive import run_genotype

    network = cfg.get("network")
    if run_genotype(cfg) is not None:
        return run_genotype(cfg)
    if isinstance(network, dict) and network.get("kind") == "sr" and isinstance(network.get("model"), dict):
        if network.get("quant"):
            raise QnasError(
                f"--arch {arch_file}: a quantized run (its bits are in the trained network's plan); "
                "use --checkpoint RUN"
            )
        return network["model"]
    if "search" in cfg:
        genotype = os.path.join(os.path.dirname(arch_file), "genotype.json")
        raise QnasError(f"--arch {arch_file}: a search run's config; its result is {genotype}")
    raise QnasError(f"--arch {arch_file}: a run config.json without a network qnas can count")


@dataclass(kw_only=True)
class InspectOptions:
    """`qnas inspect`: the run whose network is traced, and the traced input's size."""

    run: str = option(argument=True, path="any")
    lr_size: str = option("16x16", metavar="HxW", help="Size of the traced input.")


def run_inspect(opts: InspectOptions) -> dict[str, Any]:
    """Every operation between the input and the output of a run's network, with the quantization
    (bits, step) of what it computes on; operations that stay in floating point are marked FLOAT."""
    import torch

    from qnas.cost import parse_lr_size
    from qnas.quant.apply import describe_plan
    from qnas.quant.inspect import trace_network

    h, w = parse_lr_size(opts.lr_size, max_side=1024)  # a real forward pass traces it
    net, _ = load_network(opts.run)
    plan = getattr(net, "qnas_quant", None)
    channels = int(getattr(net, "in_channels", 3))
    x = torch.rand(1, channels, h, w, generator=torch.Generator().manual_seed(0))
    trace = trace_network(net, x)
    return {
        "run": opts.run,
        "quant": describe_plan(plan) if plan else "full precision",
        "input": (channels, h, w),
        "trace": trace,
    }


evaluate = Command("eval", (EvalOptions,), run_eval)
cost = Command("cost", (CostOptions,), run_cost)
inspect = Command("inspect", (InspectOptions,), run_inspect)
