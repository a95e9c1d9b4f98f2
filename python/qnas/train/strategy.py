"""`qnas strategy`: DQSS strategy search on an SR network (qnas.quant.dqss), writing a run folder:

RUN/
  config.json     the command's options
  metrics.jsonl   one JSON object per step (loss, temperature, phase), TensorBoard events beside it
  strategy.json   per searched layer: the chosen weight and activation quantizer, the final
                  strategy probabilities and (--init local) the candidates' relative local
                  errors; counts of each choice
  model.pt        the derived quantized network (qnas.runs.network format, scheme "dqss"),
                  which `qnas eval --checkpoint RUN` evaluates

Searches are short (minutes) and are not resumable: a killed search is started again.

Under `torchrun --nproc-per-node N` (qnas.runs.distributed) every rank calibrates on the whole
calibration batches (statistics-based steps, local errors and gains are those of one process), and
each search step computes on the rank's share of the global batch (--batch-size) with the gradients
of the network weights, quantizer parameters and strategy logits averaged over the ranks; rank 0
alone writes the run folder.
"""

from __future__ import annotations

import collections
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from qnas.atomic_write import atomic_write_bytes
from qnas.errors import CheckpointError
from qnas.quant.apply import load_float_weights
from qnas.quant.dqss import (
    PTQSearch,
    QATSearch,
    build_supernet,
    calibrate,
    candidate_name,
    derive_network,
    derive_plan,
    entropy,
    init_logits_from_local_error,
    log_mse_loss,
    relative_errors,
    searched_layers,
    supernet_layers,
)
from qnas.runs.folder import RunDir
from qnas.runs.loop import Loop
from qnas.runs.network import load_network, model_blob
from qnas.train.options import StrategyOptions


def run_strategy(
    checkpoint: str,
    opts: StrategyOptions,
    out: str | Path,
    *,
    progress: bool = True,
    extra_config: dict | None = None,
    compile: bool = False,
) -> dict:
    """Searches per-layer quantization strategies for the full-precision run `checkpoint`; returns a
    summary {"run", "seconds", "counts", "mode"}. compile: the networks' forwards run torch.compile'd
    after their first steps (qnas.runs.loop)."""
    from qnas.data.datasets import PatchSampler, train_dataset
    from qnas.runs import distributed
    from qnas.sr import build_from_config

    opts.check()
    info = distributed.setup()
    distributed.check_batch(opts.batch_size, info)
    progress = progress and info.is_main
    teacher, blob = load_network(checkpoint)
    network = blob["network"]
    if network.get("kind") != "sr" or network.get("quant"):
        raise CheckpointError(
            f"{checkpoint}: expected a full-precision SR run (`qnas train` without --quant)"
        )
    model_cfg = network["model"]
    scale = int(model_cfg["scale"])
    run = RunDir(out, is_writer=info.is_main)
    config = {
        "checkpoint": str(checkpoint),
        "network": network,
        "strategy": asdict(opts),
        **(extra_config or {}),
    }
    loop = Loop(
        run,
        "strategy",
        opts.steps,
        config,
        seed=opts.seed,
        progress=progress,
        desc=f"strategy {opts.mode} {run.path.name}",
        compile=compile,
    )
    loop.start({})  # not resumable: a killed search is started again
    data = train_dataset(opts.data, scale, opts.patch_size, progress=progress)
    # The calibration set is the first calib_batches batches of the patch stream, whole on every rank;
    # the QAT search continues the stream, each rank drawing its share.
    calib_sampler = PatchSampler(data, opts.batch_size, seed=opts.seed)
    sampler = PatchSampler(
        data, opts.batch_size, seed=opts.seed, step=opts.calib_batches, rank=info.rank, world=info.world
    )
    cl = torch.channels_last
    supernet = build_from_config(model_cfg)
    load_float_weights(supernet, blob["model"], str(checkpoint))
    build_supernet(supernet, opts.quantizers, opts.bits, layers=searched_layers(supernet), engine=opts.engine)
    supernet = supernet.to(memory_format=cl)
    teacher = teacher.to(memory_format=cl)
    # The calibration set: the first calib_batches batches of the patch stream (PTQ optimizes on them).
    calib = [next(calib_sampler)[0].contiguous(memory_format=cl) for _ in range(opts.calib_batches)]
    with distributed.whole_batches():  # calibration: the same whole batches in every rank
        calibrate(supernet, calib)
        errors = init_logits_from_local_error(supernet, teacher, calib) if opts.init == "local" else {}

    def derive(sup):
        plan = derive_plan(sup, opts.quantizers, opts.bits)
        return derive_network(sup, build_from_config(model_cfg), plan).to(memory_format=cl)

    if opts.mode == "ptq":
        search = PTQSearch(
            supernet,
            teacher,
            calib,
            opts.steps,
            arch_lr=opts.arch_lr,
            quant_lr=opts.quant_lr,
            derive=derive,
            discrete_fraction=opts.discrete_fraction,
            hard=opts.sampling == "hard",
            expected_loss=opts.objective == "expected",
            loss_fn=log_mse_loss if opts.loss == "psnr" else F.mse_loss,
            dist=info,
        )
    else:

        def next_batch(step: int):
            lr_img, hr_img = next(sampler)
            return lr_img.contiguous(memory_format=cl), hr_img

        search = QATSearch(
            supernet,
            next_batch,
            opts.steps,
            F.l1_loss,
            lr=opts.lr,
            arch_lr=opts.arch_lr,
            quant_lr=opts.quant_lr,
            derive=derive,
            dist=info,
        )

    def step_fn(step: int) -> dict:
        record = search.step(step, loop.forward)
        # The losses of the whole batch: means over the ranks' shares.
        record.update(
            distributed.means({k: record[k] for k in ("loss", "variance_penalty") if k in record}, info)
        )
        return record

    t0 = time.perf_counter()
    try:
        loop.run(step_fn, postfix=lambda r: {"loss": f"{r['loss']:.4g}"})
    finally:
        search.close()
    net = search.result()
    # The plan of the searched strategies: the supernet's argmax (ptq: what the derived network was built from).
    plan = derive_plan(supernet, opts.quantizers, opts.bits)
    seconds = time.perf_counter() - t0
    counts = {
        "weight": dict(collections.Counter(candidate_name(s["w"]) for s in plan["layers"].values())),
        "activation": dict(collections.Counter(candidate_name(s["a"]) for s in plan["layers"].values())),
    }
    layers = supernet_layers(supernet)
    strategy = {
        "checkpoint": str(checkpoint),
        "mode": opts.mode,
        "bits": opts.bits,
        "quantizers": opts.quantizers,
        "layers": {
            name: {
                "weight": candidate_name(s["w"]),
                "activation": candidate_name(s["a"]),
                "probs": plan["probs"][name],
                **(
                    {
                        "local_error": {
                            "w": _relative(layers[name].w_names, errors[name][0]),
                            "a": _relative(layers[name].a_names, errors[name][1]),
                        }
                    }
                    if name in errors
                    else {}
                ),
            }
            for name, s in plan["layers"].items()
        },
        "counts": counts,
        "final_entropy": entropy(supernet),
        "seconds": seconds,
    }
    if info.is_main:
        atomic_write_bytes(run.path / "strategy.json", (json.dumps(strategy, indent=2) + "\n").encode())
    quant = {k: v for k, v in plan.items() if k != "probs"}
    net_cfg = {"kind": "sr", "model": model_cfg, "quant": quant}
    run.save_model(model_blob(net_cfg, net.to(memory_format=torch.contiguous_format), strategy=strategy))
    distributed.barrier(info)  # other ranks leave once rank 0 has written the run
    distributed.teardown(info)
    return {"run": str(run.path), "seconds": seconds, "counts": counts, "mode": opts.mode}


def _relative(names: list[str], errors: torch.Tensor) -> dict[str, float]:
    """{candidate: its local error relative to the layer's smallest}, for strategy.json."""
    return {n: round(float(r), 3) for n, r in zip(names, relative_errors(errors), strict=True)}
