"""The `qnas` command (also `python -m qnas`), built on click.

Bad input raises qnas.errors.QnasError somewhere below; here it becomes one line on stderr and
exit code 2, with the traceback only behind `--debug` (or QNAS_DEBUG=1). Subcommands are added to
the `cli` group below, one function each.
"""

from __future__ import annotations

import os
import sys

import click

from qnas.errors import QnasError
from qnas.runconfig import config_option, run_record

_debug = {"on": os.environ.get("QNAS_DEBUG") == "1"}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="qnas", prog_name="qnas")
def cli(debug: bool) -> None:
    """Quantization-friendly super-resolution: search (QuantNAS), strategy (DQSS), train (FQSR),
    eval, cost, report, export, upscale."""
    if debug:
        _debug["on"] = True


@cli.command("eval")
@click.option(
    "--model", "model_name", metavar="NAME", help="Upscaler to evaluate: 'bicubic' (MATLAB imresize)."
)
@click.option(
    "--checkpoint",
    metavar="RUN",
    type=click.Path(path_type=str),
    help="A run folder (or its model.pt) written by `qnas train`, `search`, `strategy`, or a packed "
    "file of `qnas export --format packed` (run by the integer runtime).",
)
@click.option(
    "--data",
    default="builtin",
    show_default=True,
    help="'builtin' (validation split), 'builtin:train', or a folder (plain images, DIV2K, HR/ + LR_bicubic/).",
)
@click.option(
    "--scale", type=int, default=None, help="Upscaling factor: 2, 3 or 4 (a checkpoint knows its own)."
)
@click.option(
    "--best",
    is_flag=True,
    help="With --checkpoint RUN: evaluate RUN/best.pt (the best validation PSNR of `qnas train --val-data`).",
)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option(
    "--save-images",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    metavar="DIR",
    help="Write each upscaled image to DIR/<name>.png (never over an image of --data).",
)
@click.option("--force", is_flag=True, help="Replace images in --save-images DIR that exist.")
def eval_command(
    model_name: str | None,
    checkpoint: str | None,
    data: str,
    scale: int | None,
    best: bool,
    fmt: str,
    save_images: str | None,
    force: bool,
) -> None:
    """PSNR/SSIM (Y channel, scale-pixel border cropped, MATLAB protocol) per image and mean."""
    import json

    from qnas.data.datasets import check_scale, eval_dataset
    from qnas.evaluate import bicubic_upscaler, evaluate, format_table

    if (model_name is None) == (checkpoint is None):
        raise click.UsageError("give exactly one of --model bicubic or --checkpoint RUN")
    if best:
        if checkpoint is None:
            raise click.UsageError("--best needs --checkpoint RUN")
        checkpoint = _best_file(checkpoint)
    if checkpoint is not None:
        from qnas.api import load_network, network_scale, network_upscaler

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
        if model_name != "bicubic":
            raise QnasError(
                f"unknown model {model_name!r} for eval: expected 'bicubic' (or use --checkpoint RUN)"
            )
        if scale is None:
            raise click.UsageError("--scale is required with --model bicubic")
        scale = check_scale(scale)
        upscale, label = bicubic_upscaler(scale), model_name
    dataset = eval_dataset(data, scale)
    result = evaluate(upscale, dataset, scale, save_dir=save_images, label=label, force=force)
    if fmt == "json":
        click.echo(json.dumps({"model": label, "data": data, **result}, indent=2))
    else:
        where = f"{data} (validation split)" if data == "builtin" else data
        title = f"{label} x{scale} on {where}: {len(dataset)} images, PSNR/SSIM on Y, {scale}-pixel border cropped"
        click.echo(format_table(result, title))


def _best_file(run: str) -> str:
    """RUN/best.pt of `qnas eval --checkpoint RUN --best` (RUN: a run folder, or a file in one)."""
    folder = run if os.path.isdir(run) else os.path.dirname(run) or "."
    path = os.path.join(folder, "best.pt")
    if not os.path.isfile(path):
        raise QnasError(
            f"--best: {folder} has no best.pt (written by `qnas train --val-data SPEC`, at its best validation PSNR)"
        )
    return path


def _train_options(f):
    """The options every training-like command shares (they define TrainOptions)."""
    opts = [
        click.option(
            "--data", default="builtin", show_default=True, help="Training data ('builtin' = train split)."
        ),
        click.option("--steps", type=int, default=1500, show_default=True),
        click.option("--batch-size", type=int, default=8, show_default=True),
        click.option(
            "--patch-size", type=int, default=64, show_default=True, help="HR patch side in pixels."
        ),
        click.option("--lr", type=float, default=5e-4, show_default=True, help="Adam learning rate."),
        click.option(
            "--schedule",
            type=click.Choice(["cosine", "step", "constant"]),
            default="cosine",
            show_default=True,
        ),
        click.option("--warmup-steps", type=int, default=0, show_default=True),
        click.option(
            "--ema", type=float, default=0.0, show_default=True, help="EMA decay of the weights (0 = off)."
        ),
        click.option(
            "--grad-clip", type=float, default=0.0, show_default=True, help="Max gradient norm (0 = off)."
        ),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--checkpoint-every", type=int, default=100, show_default=True),
        click.option("--out", required=True, type=click.Path(path_type=str), help="Run folder to write."),
        click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@cli.command("train")
@config_option
@click.option("--model", "model_name", metavar="NAME", help="A registered SR model (see `qnas cost --help`).")
@click.option(
    "--model-args", default=None, metavar="JSON", help="Constructor overrides, e.g. '{\"n_resblocks\": 8}'."
)
@click.option(
    "--arch",
    "arch_file",
    metavar="FILE",
    type=click.Path(path_type=str),
    help="A QuantNAS genotype (RUN/genotype.json of `qnas search`, `qnas genotype`, or the config.json of a "
    "run that trained one): retrain the derived network from scratch at its searched bits (LSQ per-channel "
    "weights, --act-quantizer activations).",
)
@click.option(
    "--act-quantizer",
    type=click.Choice(["hwgq", "lsq"]),
    default="hwgq",
    show_default=True,
    help="Activation quantizer of a --arch network (QuantNAS retrains with HWGQ).",
)
@click.option(
    "--adq",
    is_flag=True,
    help="Retrain a --arch network with ADQ residuals (as searched) instead of plain quantized ones; "
    "ADQ uses the whole image's standard deviation, so such a network does not export.",
)
@click.option(
    "--scale",
    type=int,
    default=None,
    help="Upscaling factor: 2, 3 or 4 (with --arch or --init: taken from there).",
)
@click.option(
    "--quant",
    type=click.Choice(["none", "fqsr", "uniform"]),
    default="none",
    show_default=True,
    help="fqsr: fully quantized (every conv, skip, input and output; FQSR). uniform: conv weights and "
    "inputs except first/last layers, skips in float (the common baseline). docs/quantization.md.",
)
@click.option(
    "--bits", type=int, default=None, help="Bit-width of weights and activations with --quant (2..8)."
)
@click.option(
    "--quantizer",
    default=None,
    metavar="NAME",
    help="Quantizer of --quant uniform (default lsq; any of qnas.quant.QUANTIZERS); fqsr uses its own.",
)
@click.option(
    "--skip-bits",
    type=int,
    default=None,
    help="--quant fqsr: bits of the skip connections (default max(--bits, 8)).",
)
@click.option(
    "--calibration-weight",
    type=float,
    default=None,
    help="--quant fqsr: weight of the calibration loss mean|Q(x)-x| (default 0.3; 0 = off).",
)
@click.option(
    "--quant-options",
    default=None,
    metavar="JSON",
    help="--quant fqsr: further plan options (docs/quantization.md), e.g. '{\"distill_weight\": 0}'.",
)
@click.option(
    "--init",
    "init_run",
    default=None,
    metavar="FP_RUN",
    type=click.Path(path_type=str),
    help="Start from the weights of a full-precision run (its model config is used).",
)
@click.option(
    "--val-data",
    default=None,
    metavar="SPEC",
    help="Validate on these images (as --data of `qnas eval`: 'builtin' = validation split): PSNR/SSIM "
    "on Y logged as val_psnr/val_ssim, RUN/best.pt kept at the best PSNR.",
)
@click.option(
    "--val-every",
    type=int,
    default=0,
    show_default=True,
    help="With --val-data: validate every N steps (0 = only at the end; always at the last step).",
)
@click.option(
    "--compile",
    "compile_net",
    is_flag=True,
    help="Run the training steps through torch.compile (one graph per step; the same numbers).",
)
@_train_options
def train_command(
    model_name,
    model_args,
    arch_file,
    act_quantizer,
    adq,
    scale,
    quant,
    bits,
    quantizer,
    skip_bits,
    calibration_weight,
    quant_options,
    init_run,
    val_data,
    val_every,
    compile_net,
    quiet,
    resume,
    out,
    **kw,
) -> None:
    """Train an SR network (L1, Adam, cosine/step schedule); --resume continues a killed run exactly.
    With --quant, a quantized network (quantization-aware training), usually fine-tuned from --init."""
    import json

    from qnas.train.train import TrainOptions, ValidationOptions, train

    if val_every and val_data is None:
        raise click.UsageError("--val-every needs --val-data SPEC (the validation images)")
    validation = ValidationOptions(val_data, val_every) if val_data is not None else None
    record = run_record(click.get_current_context())
    if adq and arch_file is None:
        raise click.UsageError("--adq applies to --arch networks")
    if arch_file is not None:
        from qnas.nas.derive import genotype_network_config, read_genotype

        if model_name is not None or model_args or init_run is not None or quant != "none":
            raise click.UsageError(
                "--arch retrains a genotype: it takes none of --model/--model-args/--init/--quant"
            )
        genotype = read_genotype(arch_file)
        if scale is not None and scale != genotype["scale"]:
            raise QnasError(f"--scale {scale}: {arch_file} is a x{genotype['scale']} genotype")
        scale = int(genotype["scale"])
        network = genotype_network_config(genotype, act_quantizer, adq)
        summary = train(
            network,
            TrainOptions(scale=scale, **kw),
            out,
            resume=resume,
            progress=not quiet,
            extra_config=record,
            validation=validation,
            compile=compile_net,
        )
        _train_summary(summary, out)
        return
    from qnas.sr import build_model, model_config

    init_state, init_cfg = None, None
    if init_run is not None:
        from qnas.api import load_network

        _, blob = load_network(init_run)
        if blob["network"].get("kind") != "sr" or blob["network"].get("quant"):
            raise QnasError(
                f"--init {init_run}: expected a full-precision SR run (`qnas train` without --quant)"
            )
        init_cfg, init_state = blob["network"]["model"], blob["model"]
    if model_name is None and init_cfg is None:
        raise click.UsageError("give --model NAME (or --init FP_RUN)")
    try:
        extra = json.loads(model_args) if model_args else {}
    except json.JSONDecodeError as e:
        raise QnasError(f"--model-args: not valid JSON ({e})") from e
    if not isinstance(extra, dict):
        raise QnasError("--model-args: expected a JSON object")
    if init_cfg is not None:
        if scale is not None and scale != init_cfg["scale"]:
            raise QnasError(f"--scale {scale}: {init_run} is a x{init_cfg['scale']} network")
        scale = init_cfg["scale"]
        if model_name is not None:
            with torch_meta():
                wanted = model_config(build_model(model_name, scale, **extra))
            if wanted != init_cfg:
                raise QnasError(
                    f"--init {init_run}: checkpoint of another model ({init_cfg['name']} "
                    f"{json.dumps(init_cfg['kwargs'], sort_keys=True)[:80]}), not --model {model_name}"
                )
        cfg = init_cfg
    else:
        if scale is None:
            raise click.UsageError("--scale is required (2, 3 or 4)")
        with torch_meta():
            cfg = model_config(build_model(model_name, scale, **extra))
    network = {"kind": "sr", "model": cfg}
    if quant != "none":
        network["quant"] = _quant_plan(
            cfg, quant, bits, quantizer, skip_bits, calibration_weight, kw["steps"]
        )
        if quant == "fqsr":
            network["quant"] = _fqsr_options(cfg, network["quant"], quant_options, init_run)
        elif quant_options is not None:
            raise QnasError("--quant-options applies to --quant fqsr only")
    elif any(v is not None for v in (bits, quantizer, skip_bits, calibration_weight, quant_options)):
        raise QnasError(
            "--bits/--quantizer/--skip-bits/--calibration-weight/--quant-options need --quant fqsr|uniform"
        )
    if init_state is not None and "quant" in network:
        from qnas.api import build_network
        from qnas.quant.apply import load_float_weights

        qnet = build_network(network)
        load_float_weights(qnet, init_state, init_run)
        init_state = qnet.state_dict()
    extra_config = {"init": init_run, **record} if init_run else record
    summary = train(
        network,
        TrainOptions(scale=scale, **kw),
        out,
        resume=resume,
        progress=not quiet,
        init_state=init_state,
        extra_config=extra_config,
        validation=validation,
        compile=compile_net,
    )
    _train_summary(summary, out)


def _train_summary(summary: dict, out: str) -> None:
    click.echo(
        f"trained {summary['steps']} steps in {summary['seconds']:.0f} s, final loss {summary['loss']:.4f}: {out}/model.pt"
    )
    if "best" in summary:
        b = summary["best"]
        click.echo(
            f"best validation PSNR {b['psnr']:.2f} dB, SSIM {b['ssim']:.4f} at step {b['step']}: {out}/best.pt"
        )


def _quant_plan(cfg, scheme, bits, quantizer, skip_bits, calibration_weight, steps) -> dict:
    """The resolved per-layer plan of `qnas train --quant` (qnas.quant.apply)."""
    from qnas.quant.apply import DEFAULTS, check_bits, check_quantizer, resolve_plan
    from qnas.sr import build_from_config

    if bits is None:
        raise QnasError(f"--quant {scheme} needs --bits (2..8)")
    quant: dict = {"scheme": scheme, "bits": check_bits(bits)}
    if scheme == "uniform":
        if skip_bits is not None or calibration_weight is not None:
            raise QnasError("--skip-bits and --calibration-weight apply to --quant fqsr only")
        quant["quantizer"] = check_quantizer(quantizer or "lsq", "weight")
    else:
        if quantizer is not None:
            raise QnasError("--quantizer applies to --quant uniform (fqsr uses FQSR's quantizer)")
        if skip_bits is not None:
            quant["skip_bits"] = check_bits(skip_bits, "--skip-bits")
        if calibration_weight is not None:
            if not calibration_weight >= 0:
                raise QnasError(f"--calibration-weight: must be >= 0, got {calibration_weight}")
            quant["calibration_weight"] = calibration_weight
        # FQSR's quantizers pass values through while they gather statistics for `warmup` steps: in a
        # short run that would be the whole run (trained in float, silently). Keep it to a quarter.
        warmup = DEFAULTS["fqsr"]["warmup"]
        if steps is not None and steps > 0 and warmup > steps // 4:
            quant["warmup"] = steps // 4
            click.echo(
                f"note: --steps {steps}: FQSR's statistics warm-up is {quant['warmup']} steps (a quarter "
                f"of the run) instead of {warmup}",
                err=True,
            )
    return resolve_plan(build_from_config(cfg), quant)


def _fqsr_options(cfg: dict, plan: dict, quant_options: str | None, init_run: str | None) -> dict:
    """The FQSR plan with --quant-options applied and the --init run as distillation teacher."""
    import json

    from qnas.quant.apply import fqsr_plan_options

    try:
        extra = json.loads(quant_options) if quant_options else {}
    except json.JSONDecodeError as e:
        raise QnasError(f"--quant-options: not valid JSON ({e})") from e
    return fqsr_plan_options(cfg, plan, extra, teacher=init_run)


def torch_meta():
    """Builds modules on the meta device: only to read a config, nothing is allocated."""
    import torch

    return torch.device("meta")


@cli.command("cost")
@click.option(
    "--model",
    "model_name",
    metavar="NAME",
    help="A registered model: edsr, edsr-baseline, srresnet, rfdn, rfdn-paper, rfdn-l (docs/models.md).",
)
@click.option(
    "--arch",
    "arch_file",
    metavar="FILE",
    help='A JSON model config {"model": NAME, "scale": S, "kwargs": {...}} (what a checkpoint stores), '
    "a QuantNAS genotype (RUN/genotype.json): the derived network at its searched bits, or a run's "
    "config.json (a retrained genotype, or a full-precision model).",
)
@click.option(
    "--checkpoint",
    "run_dir",
    metavar="RUN",
    type=click.Path(path_type=str),
    help="A run folder: its network as trained (quantized layers count with their own bits). Runs one "
    "real forward pass on the CPU.",
)
@click.option(
    "--scale", type=int, default=None, help="Upscaling factor 2, 3 or 4 (with --arch: taken from the file)."
)
@click.option("--lr-size", required=True, metavar="HxW", help="LR input size in pixels, e.g. 48x48 (or 48).")
@click.option(
    "--bits",
    type=float,
    default=None,
    metavar="B",
    help="Bit-width for the weights and activations of every conv/linear that does not set its own "
    "w_bits/a_bits (default: 32, full precision).",
)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def cost_command(
    model_name: str | None,
    arch_file: str | None,
    run_dir: str | None,
    scale: int | None,
    lr_size: str,
    bits: float | None,
    fmt: str,
) -> None:
    """Per-layer and total MACs, parameters, BitOps (MACs x b_w x b_a) and weight memory of a model
    at an LR input size. The model is built on the meta device: nothing is computed or allocated."""
    import torch

    from qnas.cost import count_cost, parse_lr_size
    from qnas.sr import build_from_config, build_model, read_model_config

    if sum(v is not None for v in (model_name, arch_file, run_dir)) != 1:
        raise QnasError("give exactly one of --model NAME, --arch FILE or --checkpoint RUN")
    # --checkpoint runs the network on a real input of that size; the others count on the meta device.
    size = parse_lr_size(lr_size, max_side=1024) if run_dir is not None else parse_lr_size(lr_size)
    if bits is not None and not (1 <= bits <= 32):
        raise QnasError(f"--bits {bits:g} is out of range (1..32)")
    if bits is not None and bits.is_integer():
        bits = int(bits)
    if run_dir is not None:
        from qnas.api import load_network, network_scale

        net, blob = load_network(run_dir)
        own = network_scale(blob["network"])
        if scale is not None and scale != own:
            raise QnasError(f"--scale {scale}: {run_dir} is a x{own} network")
        result = count_cost(net, size, bits, name=blob["network"].get("model", {}).get("name"))
        click.echo(result.to_json() if fmt == "json" else result.format_table())
        return
    with torch.device("meta"):
        if arch_file is not None:
            from qnas.nas.derive import DerivedNetwork, is_genotype, read_genotype, run_genotype

            cfg = read_model_config(arch_file)
            if not is_genotype(cfg) and ("network" in cfg or "search" in cfg):
                cfg = _run_config_model(cfg, arch_file)
            if scale is not None and cfg.get("scale") != scale:
                raise QnasError(f"--scale {scale} differs from the scale {cfg.get('scale')!r} in {arch_file}")
            if is_genotype(cfg) or run_genotype(cfg):
                model = DerivedNetwork(read_genotype(arch_file))
            else:
                try:
                    model = build_from_config(cfg)
                except QnasError as e:
                    raise QnasError(f"{arch_file}: {e}") from e
        else:
            if scale is None:
                raise QnasError("--scale is required with --model (2, 3 or 4)")
            model = build_model(model_name, scale)
    result = count_cost(model, size, bits)
    click.echo(result.to_json() if fmt == "json" else result.format_table())


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


def _int_list(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise QnasError(f"{option} {text!r}: expected comma-separated integers, e.g. 4,8") from None


@cli.command("search")
@config_option
@click.option(
    "--space",
    default="basic",
    show_default=True,
    metavar="basic|rfdn|FILE",
    help="A builtin search space or a space JSON file (docs/search_spaces.md).",
)
@click.option(
    "--ops",
    default=None,
    metavar="OP,...",
    help="Replace the space's default candidate ops (one op: a bits-only search on a fixed architecture).",
)
@click.option(
    "--data", default="builtin", show_default=True, help="Training images (both splits come from them)."
)
@click.option("--scale", type=int, default=4, show_default=True, help="Upscaling factor: 2, 3 or 4.")
@click.option("--steps", type=int, default=300, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--patch-size", type=int, default=96, show_default=True, help="HR patch side in pixels.")
@click.option(
    "--bits",
    default="4,8",
    show_default=True,
    metavar="B,...",
    help="Weight bit-widths (0 = full precision).",
)
@click.option("--a-bits", default=None, metavar="B,...", help="Activation bit-widths (default: --bits).")
@click.option(
    "--untie-bits", is_flag=True, help="Search weight and activation bits separately (default: tied)."
)
@click.option(
    "--mode",
    type=click.Choice(["noise", "quant"]),
    default="noise",
    show_default=True,
    help="noise: quantization noise (QuantNAS); quant: LSQ fake quantization.",
)
@click.option(
    "--impl",
    type=click.Choice(["fused", "naive"]),
    default="fused",
    show_default=True,
    help="fused: torch.ops.qops.mixed_quant_conv; naive: the per-candidate loop (baseline).",
)
@click.option("--no-adq", is_flag=True, help="Plain residuals instead of ADQ (ablation).")
@click.option(
    "--no-anchor",
    is_flag=True,
    help="Remove the space's anchor skip (input image upsampled, added to the output): the paper's space.",
)
@click.option(
    "--mix-norm",
    type=click.Choice(["rescale", "none"]),
    default="rescale",
    show_default=True,
    help="rescale: candidate mixture divided by sqrt(sum of squared op probabilities); none: plain sum.",
)
@click.option("--single-pass", is_flag=True, help="One forward-backward updates weights and alphas.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate of the weights.")
@click.option(
    "--alpha-lr", type=float, default=3e-4, show_default=True, help="Adam learning rate of the alphas."
)
@click.option("--grad-clip", type=float, default=5.0, show_default=True)
@click.option("--entropy-coef", type=float, default=1e-3, show_default=True, help="Final entropy weight.")
@click.option(
    "--entropy-warmup",
    type=float,
    default=0.25,
    show_default=True,
    help="Fraction of the steps with no entropy term; it then grows linearly to --entropy-coef.",
)
@click.option(
    "--target-gbitops",
    type=float,
    default=None,
    help="BitOps target at --lr-size (GBitOps): adds target-weight * log^2(expected BitOps / target).",
)
@click.option(
    "--target-weight", type=float, default=1.0, show_default=True, help="Weight of the BitOps target term."
)
@click.option(
    "--final-temperature",
    type=float,
    default=0.1,
    show_default=True,
    help="Softmax temperature of the alphas at the last step, annealed geometrically from 1 (1 = off).",
)
@click.option(
    "--penalty",
    type=float,
    default=0.0,
    show_default=True,
    help="The paper's BitOps penalty weight (expected BitOps / their initial value); "
    "an alternative to --target-gbitops.",
)
@click.option(
    "--alpha-warmup",
    type=float,
    default=0.0,
    show_default=True,
    help="Fraction of the steps that train the weights only.",
)
@click.option(
    "--alpha-split",
    type=float,
    default=0.5,
    show_default=True,
    help="Fraction of the training images that train the alphas (the rest train the weights).",
)
@click.option(
    "--lr-size", default="180x320", show_default=True, metavar="HxW", help="LR size BitOps are reported for."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--checkpoint-every", type=int, default=50, show_default=True)
@click.option(
    "--compile",
    "compile_net",
    is_flag=True,
    help="Run the supernet's forwards through torch.compile (one graph per step; the same numbers).",
)
@click.option("--out", required=True, type=click.Path(path_type=str), help="Run folder to write.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def search_command(
    space, ops, bits, a_bits, untie_bits, no_adq, no_anchor, lr_size, compile_net, out, resume, quiet, **kw
) -> None:
    """QuantNAS: search operations and bit-widths jointly; writes RUN/genotype.json and alpha plots."""
    from qnas.cost import parse_lr_size
    from qnas.nas.search import SearchOptions, search
    from qnas.sr.common import check_scale

    check_scale(kw["scale"])
    opts = SearchOptions(
        space=space,
        ops=[o.strip() for o in ops.split(",") if o.strip()] if ops else None,
        bits=_int_list(bits, "--bits"),
        a_bits=_int_list(a_bits, "--a-bits"),
        tie_bits=not untie_bits,
        adq=not no_adq,
        anchor=not no_anchor,
        lr_size=list(parse_lr_size(lr_size)),
        **kw,
    )
    summary = search(
        opts,
        out,
        resume=resume,
        progress=not quiet,
        extra_config=run_record(click.get_current_context()),
        compile=compile_net,
    )
    click.echo(
        f"searched {summary['steps']} steps in {summary['seconds']:.0f} s: {summary['genotype']} "
        f"({summary['bitops'] / 1e9:.2f} GBitOps at LR {opts.lr_size[0]}x{opts.lr_size[1]})"
    )
    if summary["health"]:
        ratios = ", ".join(f"{s} {h['ratio']:.2g}" for s, h in summary["health"].items())
        click.echo(f"|loss| / |regularizer| gradient on the alphas, median of the second half: {ratios}")


@cli.command("genotype")
@click.option("--space", default="basic", show_default=True, metavar="basic|rfdn|FILE")
@click.option("--scale", type=int, required=True, help="Upscaling factor: 2, 3 or 4.")
@click.option(
    "--op", default=None, metavar="OP", help="The op of every layer, e.g. conv3x3 (not with --random)."
)
@click.option(
    "--bits",
    default=None,
    metavar="B[,B...]",
    help="Bits of every weight and activation (0 = fp); with --random the bit-widths to draw from "
    "(default 4,8).",
)
@click.option(
    "--random",
    "random_draw",
    is_flag=True,
    help="A random genotype (op and tied bits of every layer) at --target-gbitops: the search's control.",
)
@click.option("--target-gbitops", type=float, default=None, help="With --random: its BitOps at --lr-size.")
@click.option("--seed", type=int, default=0, show_default=True, help="With --random: the draw.")
@click.option("--no-anchor", is_flag=True, help="Remove the space's anchor skip (the paper's space).")
@click.option("--lr-size", default="180x320", show_default=True, metavar="HxW")
@click.option("--out", required=True, type=click.Path(path_type=str), help="Genotype JSON file to write.")
@click.option("--force", is_flag=True, help="Replace --out if it exists (never a file of a run folder).")
def genotype_command(
    space, scale, op, bits, random_draw, target_gbitops, seed, no_anchor, lr_size, out, force
) -> None:
    """Write the genotype of a fixed architecture of a space (every layer one op, uniform bits): the
    uniform-quantization baseline to retrain with `qnas train --arch`; or with --random, a random
    genotype at a BitOps target (the control a search must beat)."""
    import json

    from qnas.atomic_write import atomic_write_bytes
    from qnas.cost import parse_lr_size
    from qnas.files import check_output_file
    from qnas.nas.derive import genotype_cost, uniform_genotype
    from qnas.nas.search import random_genotype
    from qnas.runs.folder import run_files
    from qnas.spaces import load_space, with_anchor

    parent = os.path.dirname(os.path.abspath(out))
    check_output_file(out, force=force, inputs=run_files(parent) + [space])
    size = parse_lr_size(lr_size)
    doc = load_space(space)
    if no_anchor:
        doc = with_anchor(doc, None)
    bit_list = _int_list(bits, "--bits")
    for b in bit_list or []:
        if b != 0 and not 2 <= b <= 8:
            raise QnasError(f"--bits {bits}: expected 0 (full precision) or 2..8")
    if random_draw:
        if op is not None:
            raise QnasError("--op: not with --random (every layer draws its own op)")
        if target_gbitops is None:
            raise QnasError("--random needs --target-gbitops (the BitOps the genotype should cost)")
        g = random_genotype(doc, scale, target_gbitops, seed, bits=bit_list or [4, 8], lr_size=size)
        what = f"random (seed {seed}) at target {target_gbitops:g}"
    else:
        if op is None or bit_list is None or len(bit_list) != 1:
            raise QnasError("--op OP and --bits B (one value) are required (or --random --target-gbitops X)")
        if target_gbitops is not None:
            raise QnasError("--target-gbitops: only with --random")
        g = uniform_genotype(doc, scale, op, bit_list[0])
        what = f"every layer {op} at {bit_list[0]} bits"
    g["cost"] = genotype_cost(g, size)
    path = os.path.abspath(out)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_bytes(path, (json.dumps(g, indent=2) + "\n").encode())
    click.echo(f"{out}: {g['space']['name']} x{scale}, {what}, {g['cost']['bitops'] / 1e9:.2f} GBitOps")


@cli.command("report")
@click.argument("runs", nargs=-1, metavar="RUN...")
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=str), help="Folder for the report."
)
@click.option(
    "--data", default="builtin", show_default=True, help="Evaluation images ('builtin': validation split)."
)
@click.option(
    "--lr-size", default="180x320", show_default=True, metavar="HxW", help="LR size BitOps are counted for."
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def report_command(runs, out, data, lr_size, quiet) -> None:
    """Compare trained runs (folders with model.pt) and 'bicubic': report.json, pareto.png (PSNR vs
    BitOps), report.md."""
    from qnas.cost import parse_lr_size
    from qnas.nas.report import build_report, markdown_table

    report = build_report(list(runs), out, data=data, lr_size=parse_lr_size(lr_size), progress=not quiet)
    click.echo(markdown_table(report))
    click.echo(f"\n{out}/report.json, {out}/pareto.png, {out}/report.md")


@cli.command("demo")
@click.option(
    "--out",
    default="runs/demo",
    show_default=True,
    type=click.Path(file_okay=False, path_type=str),
    help="Folder of the demo's runs and report.",
)
@click.option(
    "--settings",
    "--config",
    "settings_file",
    default=None,
    metavar="FILE",
    type=click.Path(dir_okay=False, path_type=str),
    help='JSON object overriding demo settings (qnas.demo.DemoSettings), e.g. {"train_steps": 500}; '
    "--config is the same option, as for the other commands.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo_command(out, settings_file, quiet) -> None:
    """Search -> derive -> retrain -> report on the builtin images, with bicubic and the uniform 4/8-bit
    and bits-only baselines (what `make demo` runs). Rerun to resume: finished stages are skipped."""
    import json

    from qnas.demo import DemoSettings, comparison_text, run_demo
    from qnas.nas.report import markdown_table

    overrides = {}
    if settings_file is not None:
        from qnas.files import check_input_file

        check_input_file(settings_file, "JSON file")
        try:
            with open(settings_file, encoding="utf-8") as f:
                overrides = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise QnasError(f"--settings {settings_file}: not a readable JSON file ({e})") from e
        if not isinstance(overrides, dict):
            raise QnasError(f"--settings {settings_file}: expected a JSON object")
    summary = run_demo(DemoSettings.from_dict(overrides), out, progress=not quiet)
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        click.echo(markdown_table(json.load(f)))
    for c in summary["comparisons"]:
        click.echo("\n" + comparison_text(c))
    click.echo(f"\n{out}/report.json, {out}/pareto.png, {out}/report.md, {out}/demo.json")


@cli.command("strategy")
@config_option
@click.option(
    "--checkpoint",
    required=True,
    metavar="FP_RUN",
    type=click.Path(path_type=str),
    help="A full-precision run (`qnas train` without --quant) whose network is quantized.",
)
@click.option(
    "--quantizers",
    default="all",
    show_default=True,
    metavar="LIST",
    help="Comma-separated strategies (lsq,pact,dorefa,hwgq,minmax,percentile,mse,aciq; NAME_pc: per-channel "
    "weights; NAME_asym: asymmetric activations), 'all' (the seed's 7) or 'extended' (docs/quantization.md). "
    "One quantizer = uniform quantization with it (the baseline).",
)
@click.option("--bits", type=int, required=True, help="Bit-width of weights and activations (2..8).")
@click.option(
    "--mode",
    type=click.Choice(["ptq", "qat"]),
    default="ptq",
    show_default=True,
    help="ptq: weights frozen, match the full-precision output on calibration patches; "
    "qat: strategies, quantizers and weights trained in one pass per step on the task loss.",
)
@click.option("--data", default="builtin", show_default=True, help="Calibration/training data (train split).")
@click.option("--steps", type=int, default=100, show_default=True, help="Optimization steps.")
@click.option(
    "--calib-batches", type=int, default=8, show_default=True, help="Batches of the calibration set."
)
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--patch-size", type=int, default=64, show_default=True, help="HR patch side in pixels.")
@click.option(
    "--lr", type=float, default=1e-4, show_default=True, help="Adam lr of the network weights (qat)."
)
@click.option(
    "--arch-lr", type=float, default=0.05, show_default=True, help="Adam lr of the strategy logits."
)
@click.option(
    "--quant-lr", type=float, default=1e-3, show_default=True, help="Adam lr of LSQ steps and PACT clips."
)
@click.option(
    "--engine",
    type=click.Choice(["factorized", "fused"]),
    default="factorized",
    show_default=True,
    help="How a mixed layer is computed: one convolution of the mixed input and weight, or "
    "torch.ops.qops.mixed_quant_conv (docs/quantization.md).",
)
@click.option(
    "--discrete-fraction",
    type=float,
    default=0.25,
    show_default=True,
    help="ptq: share of --steps spent on the derived network (statistics re-measured, learned steps "
    "tuned); 0 = search only.",
)
@click.option(
    "--init",
    type=click.Choice(["local", "uniform"]),
    default="local",
    show_default=True,
    help="Starting strategy probabilities: inversely proportional to each candidate's per-layer "
    "output error on the calibration patches, or uniform.",
)
@click.option(
    "--loss",
    type=click.Choice(["psnr", "mse"]),
    default="psnr",
    show_default=True,
    help="ptq: reconstruction loss against the full-precision output: mean per-patch log MSE "
    "(what mean PSNR scores) or the batch MSE.",
)
@click.option(
    "--objective",
    type=click.Choice(["expected", "mixture"]),
    default="expected",
    show_default=True,
    help="ptq: minimize the expected loss of a discrete network sampled from the strategy "
    "probabilities (mixture loss + per-layer sampling variance), or the mixture's loss alone.",
)
@click.option(
    "--sampling",
    type=click.Choice(["soft", "hard"]),
    default="soft",
    show_default=True,
    help="ptq: optimize the softmax mixture, or one straight-through Gumbel sample per step.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--compile",
    "compile_net",
    is_flag=True,
    help="Run the networks' forwards through torch.compile (one graph per step; the same numbers).",
)
@click.option("--out", required=True, type=click.Path(path_type=str), help="Run folder to write.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def strategy_command(checkpoint, compile_net, out, quiet, **kw) -> None:
    """DQSS: search the quantizer of every layer's weights and inputs (post-training or
    quantization-aware); writes RUN/strategy.json and RUN/model.pt for `qnas eval --checkpoint RUN`."""
    from qnas.train.strategy import StrategyOptions, run_strategy

    record = run_record(click.get_current_context())
    summary = run_strategy(
        checkpoint, StrategyOptions(**kw), out, progress=not quiet, extra_config=record, compile=compile_net
    )
    counts = summary["counts"]
    w = ", ".join(f"{k} {v}" for k, v in sorted(counts["weight"].items()))
    a = ", ".join(f"{k} {v}" for k, v in sorted(counts["activation"].items()))
    click.echo(
        f"{summary['mode']} search in {summary['seconds']:.0f} s: weights [{w}], activations [{a}]: {out}"
    )


@cli.command("inspect")
@click.argument("run", type=click.Path(path_type=str))
@click.option(
    "--lr-size", default="16x16", show_default=True, metavar="HxW", help="Size of the traced input."
)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--strict", is_flag=True, help="Exit with code 1 when any operation stays in float.")
def inspect_command(run: str, lr_size: str, fmt: str, strict: bool) -> None:
    """Every operation between the input and the output of a run's network, with the quantization
    (bits, step) of what it computes on; operations that stay in floating point are marked FLOAT."""
    import json

    import torch

    from qnas.api import load_network
    from qnas.cost import parse_lr_size
    from qnas.quant.apply import describe_plan
    from qnas.quant.inspect import format_trace, trace_network

    h, w = parse_lr_size(lr_size, max_side=1024)  # a real forward pass traces it
    net, blob = load_network(run)
    plan = getattr(net, "qnas_quant", None)
    channels = int(getattr(net, "in_channels", 3))
    x = torch.rand(1, channels, h, w, generator=torch.Generator().manual_seed(0))
    trace = trace_network(net, x)
    what = describe_plan(plan) if plan else "full precision"
    if fmt == "json":
        click.echo(json.dumps({"run": run, "quant": what, **trace.to_dict()}, indent=2))
    else:
        click.echo(format_trace(trace, f"{run}: {what}; input 1x{channels}x{h}x{w}"))
    if strict and trace.float_rows:
        sys.exit(1)


# ------------------------------------------------------------------------------------------------
# Deployment: `qnas export` and `qnas upscale` (docs/deploy.md)


@cli.command("export")
@click.argument("run", type=click.Path(path_type=str))
@click.option("--format", "fmt", type=click.Choice(["packed", "onnx"]), required=True)
@click.option("--out", required=True, type=click.Path(path_type=str), help="File to write.")
@click.option("--no-check", is_flag=True, help="Skip running the exported model against the trained one.")
@click.option("--force", is_flag=True, help="Replace --out if it exists (never a file of the run itself).")
def export_command(run, fmt, out, no_check, force) -> None:
    """Export a fully quantized run: a bit-packed safetensors file for `qnas upscale`, or ONNX QDQ."""
    from qnas.deploy.format import write_packed
    from qnas.export import check_export, load_run_packed
    from qnas.files import check_output_file
    from qnas.runs.folder import run_files
    from qnas.runs.network import model_file

    model = model_file(run)
    check_output_file(out, force=force, inputs=run_files(model.parent) + [model])
    graph, tensors = load_run_packed(run)
    if fmt == "packed":
        size = write_packed(out, graph, tensors)
    else:
        from qnas.export.onnx import write_onnx

        size = write_onnx(out, graph, tensors)
    click.echo(f"wrote {out} ({size / 1e6:.2f} MB, {fmt})")
    if not no_check:
        click.echo(check_export(run, out, fmt, (graph, tensors)))


@cli.command("upscale")
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(path_type=str),
    help="A packed file of `qnas export --format packed`, or a training RUN folder.",
)
@click.argument("paths", nargs=-1, required=True, metavar="IN... OUT", type=click.Path(path_type=str))
@click.option(
    "--tile",
    type=int,
    default=256,
    show_default=True,
    help="Tile side in input pixels (0 = whole image at once).",
)
@click.option(
    "--overlap",
    type=int,
    default=None,
    help="Context pixels around each tile (default: the receptive radius: exact result).",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--force", is_flag=True, help="Replace output images that exist (never an input).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def upscale_command(model_path, paths, tile, overlap, device, force, quiet) -> None:
    """Super-resolve IN... (image files or folders) into OUT (a .png for one input, else a folder)."""
    from qnas.deploy.upscale import run_upscale

    if len(paths) < 2:
        raise click.UsageError("give at least one input and the output: IN... OUT")
    r = run_upscale(model_path, paths[:-1], paths[-1], tile, overlap, device, not quiet, force)
    per = r["network_seconds"] / max(r["images"], 1)
    click.echo(
        f"upscaled {r['images']} image(s) x{r['scale']} on {r['device']} in {r['seconds']:.2f} s "
        f"(network {r['network_seconds']:.2f} s, {per:.3f} s/image; tile {tile}, overlap {r['overlap']}): {paths[-1]}"
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script; exit codes: 0 ok, 2 bad input or usage, 130 interrupted."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun, rank 0 alone prints
        from qnas.runs.distributed import silence_other_ranks

        silence_other_ranks()
    try:
        cli.main(args=argv, prog_name="qnas", standalone_mode=False)
    except QnasError as e:
        if _debug["on"]:
            raise
        print(f"qnas: error: {e}", file=sys.stderr)
        sys.exit(2)
    except click.ClickException as e:  # usage errors: unknown option, bad value, missing argument
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("qnas: interrupted", file=sys.stderr)
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
