"""What network `qnas train` trains, from its options (qnas.train.options.NetworkOptions): the network
config (qnas.runs.network), its upscaling factor and the weights it starts from."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import torch

from qnas.errors import QnasError
from qnas.quant.apply import (
    DEFAULTS,
    check_bits,
    check_quantizer,
    fqsr_plan_options,
    load_float_weights,
    resolve_plan,
)
from qnas.runs.network import build_network, load_network
from qnas.sr import build_from_config, build_model, model_config
from qnas.train.options import NetworkOptions


@dataclass
class ResolvedNetwork:
    network: dict  # the network config
    scale: int
    init_state: dict | None  # the weights to start from (--init), already quantized with the network
    extra_config: dict  # further sections of config.json ({"init": FP_RUN})


def resolve_network(opts: NetworkOptions, steps: int) -> ResolvedNetwork:
    """The network `qnas train` trains (NetworkOptions); a combination of options that does not make one
    is a QnasError naming them. `steps`: the run's (FQSR's statistics warm-up is kept to a quarter)."""
    if opts.adq and opts.arch is None:
        raise QnasError("--adq applies to --arch networks")
    if opts.arch is not None:
        return _genotype_network(opts)
    init_state, init_cfg = None, None
    if opts.init is not None:
        _, blob = load_network(opts.init)
        if blob["network"].get("kind") != "sr" or blob["network"].get("quant"):
            raise QnasError(
                f"--init {opts.init}: expected a full-precision SR run (`qnas train` without --quant)"
            )
        init_cfg, init_state = blob["network"]["model"], blob["model"]
    if opts.model is None and init_cfg is None:
        raise QnasError("give --model NAME (or --init FP_RUN)")
    extra = opts.model_args if opts.model_args is not None else {}
    if not isinstance(extra, dict):
        raise QnasError("--model-args: expected a JSON object")
    scale = opts.scale
    if init_cfg is not None:
        if scale is not None and scale != init_cfg["scale"]:
            raise QnasError(f"--scale {scale}: {opts.init} is a x{init_cfg['scale']} network")
        scale = init_cfg["scale"]
        if opts.model is not None:
            with torch.device("meta"):  # only to read the config: nothing is allocated
                wanted = model_config(build_model(opts.model, scale, **extra))
            if wanted != init_cfg:
                raise QnasError(
                    f"--init {opts.init}: checkpoint of another model ({init_cfg['name']} "
                    f"{json.dumps(init_cfg['kwargs'], sort_keys=True)[:80]}), not --model {opts.model}"
                )
        cfg = init_cfg
    else:
        if scale is None:
            raise QnasError("--scale is required (2, 3 or 4)")
        with torch.device("meta"):
            cfg = model_config(build_model(opts.model, scale, **extra))
    network = {"kind": "sr", "model": cfg}
    if opts.quant != "none":
        network["quant"] = _quant_plan(cfg, opts, steps)
        if opts.quant == "fqsr":
            network["quant"] = fqsr_plan_options(cfg, network["quant"], opts.quant_options or {}, opts.init)
        elif opts.quant_options is not None:
            raise QnasError("--quant-options applies to --quant fqsr only")
    elif any(
        v is not None
        for v in (opts.bits, opts.quantizer, opts.skip_bits, opts.calibration_weight, opts.quant_options)
    ):
        raise QnasError(
            "--bits/--quantizer/--skip-bits/--calibration-weight/--quant-options need --quant fqsr|uniform"
        )
    if init_state is not None and "quant" in network:
        qnet = build_network(network)
        load_float_weights(qnet, init_state, opts.init)
        init_state = qnet.state_dict()
    return ResolvedNetwork(network, int(scale), init_state, {"init": opts.init} if opts.init else {})


def _genotype_network(opts: NetworkOptions) -> ResolvedNetwork:
    from qnas.nas.derive import genotype_network_config, read_genotype

    if opts.model is not None or opts.model_args or opts.init is not None or opts.quant != "none":
        raise QnasError("--arch retrains a genotype: it takes none of --model/--model-args/--init/--quant")
    genotype = read_genotype(opts.arch)
    if opts.scale is not None and opts.scale != genotype["scale"]:
        raise QnasError(f"--scale {opts.scale}: {opts.arch} is a x{genotype['scale']} genotype")
    network = genotype_network_config(genotype, opts.act_quantizer, opts.adq)
    return ResolvedNetwork(network, int(genotype["scale"]), None, {})


def _quant_plan(cfg: dict, opts: NetworkOptions, steps: int) -> dict:
    """The resolved per-layer plan of `qnas train --quant` (qnas.quant.apply)."""
    scheme = opts.quant
    if opts.bits is None:
        raise QnasError(f"--quant {scheme} needs --bits (2..8)")
    quant: dict = {"scheme": scheme, "bits": check_bits(opts.bits)}
    if scheme == "uniform":
        if opts.skip_bits is not None or opts.calibration_weight is not None:
            raise QnasError("--skip-bits and --calibration-weight apply to --quant fqsr only")
        quant["quantizer"] = check_quantizer(opts.quantizer or "lsq", "weight")
    else:
        if opts.quantizer is not None:
            raise QnasError("--quantizer applies to --quant uniform (fqsr uses FQSR's quantizer)")
        if opts.skip_bits is not None:
            quant["skip_bits"] = check_bits(opts.skip_bits, "--skip-bits")
        if opts.calibration_weight is not None:
            if not opts.calibration_weight >= 0:
                raise QnasError(f"--calibration-weight: must be >= 0, got {opts.calibration_weight}")
            quant["calibration_weight"] = opts.calibration_weight
        # FQSR's quantizers pass values through while they gather statistics for `warmup` steps: in a
        # short run that would be the whole run (trained in float, silently). Keep it to a quarter.
        warmup = DEFAULTS["fqsr"]["warmup"]
        if steps > 0 and warmup > steps // 4:
            quant["warmup"] = steps // 4
            print(
                f"note: --steps {steps}: FQSR's statistics warm-up is {quant['warmup']} steps (a quarter "
                f"of the run) instead of {warmup}",
                file=sys.stderr,
            )
    return resolve_plan(build_from_config(cfg), quant)
