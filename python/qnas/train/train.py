"""Supervised training of an SR network (L1 on random patches, Adam), resumable bit for bit.

Every batch is a pure function of (seed, step) (qnas.data.PatchSampler) and the checkpoint holds
the model, optimizer, schedule, EMA and sampler state, so a run killed at any point and resumed
with `--resume` ends with exactly the weights of a run that was never interrupted.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import qnas.nas.derive  # noqa: F401  (registers the network kind "genotype"; "sr" is qnas.quant.apply's)
from qnas.errors import QnasError
from qnas.runs.folder import RunDir
from qnas.runs.loop import Loop, Validation
from qnas.runs.network import build_network, model_blob
from qnas.train.options import TrainOptions, ValidationOptions


def lr_factor(step: int, opts: TrainOptions) -> float:
    """Multiplier of the base learning rate at `step` (0-based)."""
    if opts.warmup_steps and step < opts.warmup_steps:
        return (step + 1) / opts.warmup_steps
    t = (step - opts.warmup_steps) / max(1, opts.steps - opts.warmup_steps)
    if opts.schedule == "cosine":
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    if opts.schedule == "step":
        return 0.5 ** ((t >= 0.5) + (t >= 0.75))
    return 1.0


def train(
    network: dict,
    opts: TrainOptions,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    init_state: dict | None = None,
    extra_config: dict | None = None,
    validation: ValidationOptions | None = None,
    compile: bool = False,
) -> dict[str, Any]:
    """Trains `network` (a network config, see qnas.runs.network) and writes the run folder `out`.

    init_state: weights to start from (e.g. a full-precision run before quantization-aware
    fine-tuning); ignored when resuming. validation: PSNR/SSIM logged as val_psnr/val_ssim, and
    RUN/best.pt (model.pt's format) written whenever val_psnr improves. compile: after
    COMPILE_AFTER_STEPS eager steps, the steps run the torch.compile'd network (the same numbers; see
    qnas.runs.loop). Returns a summary {"steps",
    "loss", "seconds", "run"} (with validation, "best": {"step", "psnr", "ssim"} too).
    """
    from qnas.data.datasets import PatchSampler, train_dataset
    from qnas.runs import distributed

    opts.check()
    if validation is not None:
        validation.check()
        validation = validation if validation.data is not None else None  # no images: no validation
    info = distributed.setup()
    distributed.check_batch(opts.batch_size, info)
    progress = progress and info.is_main
    run = RunDir(out, is_writer=info.is_main)
    config = {"network": network, "train": dataclasses.asdict(opts), **(extra_config or {})}
    if validation is not None:
        config["validation"] = dataclasses.asdict(validation)
    loop = Loop(
        run,
        "train",
        opts.steps,
        config,
        resume=resume,
        seed=opts.seed,
        checkpoint_every=opts.checkpoint_every,
        progress=progress,
        compile=compile,
    )
    config = loop.config
    model = build_network(network)
    if init_state is not None and not resume:
        model.load_state_dict(init_state)
    # oneDNN's convolutions (forward and, above all, backward) are several times faster in
    # channels_last than in NCHW on CPU for these layer shapes (measured: 0.85 s vs 5.4 s per
    # edsr-baseline step); outputs keep whatever format the last op gives.
    model = model.to(memory_format=torch.channels_last)
    model.train()
    data = train_dataset(opts.data, opts.scale, opts.patch_size, progress=progress)
    val_images = None
    if validation is not None and info.is_main:
        from qnas.data.datasets import eval_dataset

        val_images = eval_dataset(validation.data, opts.scale)
    sampler = PatchSampler(data, opts.batch_size, seed=opts.seed, rank=info.rank, world=info.world)
    net = distributed.wrap(model, info)  # DDP averages gradients over the ranks' shares
    optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, opts))
    ema = None
    if opts.ema > 0:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(opts.ema), use_buffers=True
        )
    loop.start(
        {"model": model, "optimizer": optimizer, "scheduler": scheduler, "sampler": sampler, "ema": ema}
    )

    def final_network() -> nn.Module:
        return ema.module if ema is not None else model

    def scores() -> dict[str, float]:
        """PSNR/SSIM of the network model.pt would hold now (the EMA one with --ema). On a copy in eval
        mode, under its own RNG state: the training run (weights, quantizer statistics, random stream) is
        the one it would be without validation."""
        from qnas.evaluate import evaluate
        from qnas.runs.network import network_upscaler

        scored = copy.deepcopy(final_network()).eval()
        devices = [p.device for p in scored.parameters() if p.device.type == "cuda"][:1]
        with torch.random.fork_rng(devices=devices):
            result = evaluate(
                network_upscaler(scored), val_images, opts.scale, progress=False, label=str(out)
            )
        return {"psnr": result["psnr"], "ssim": result["ssim"]}

    def save_best(best: dict) -> None:
        blob = model_blob(
            network, final_network(), train=config["train"], validation={**best, **config["validation"]}
        )
        run.save_model(blob, "best.pt")

    loss_fn = nn.L1Loss()
    auxiliary_loss = getattr(model, "auxiliary_loss", None)

    def train_step(step: int) -> dict[str, Any]:
        lr_img, hr_img = next(sampler)
        lr_img = lr_img.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(loop.forward(net)(lr_img), hr_img)
        # Auxiliary terms a network defines for itself (FQSR's calibration loss, qnas.quant.apply).
        aux = auxiliary_loss() if auxiliary_loss is not None else None
        total = loss if aux is None else loss + aux
        if not torch.isfinite(total):
            raise QnasError(f"training diverged at step {step} (loss {total.item()}); lower --lr")
        total.backward()
        if opts.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        record = {"loss": distributed.mean(loss.item(), info)}
        if aux is not None:
            record["aux_loss"] = distributed.mean(aux.item(), info)
        record["lr"] = optimizer.param_groups[0]["lr"]
        return record

    t_start = time.perf_counter()
    validate = None
    if val_images is not None:
        validate = Validation(validation.every, scores, save_best)
    last = loop.run(train_step, postfix=lambda r: {"loss": f"{r['loss']:.4f}"}, validation=validate)
    step = loop.step
    final = final_network()
    # A last step can leave inf/NaN weights behind a finite loss (it was computed before the update).
    if not all(bool(torch.isfinite(p).all()) for p in final.parameters()):
        raise QnasError(f"training diverged at step {step} (non-finite weights); lower --lr")
    run.save_model(model_blob(network, final, train=config["train"]))
    distributed.barrier(info)  # other ranks leave only once rank 0 has written the model
    distributed.teardown(info)
    summary = {
        "steps": step,
        "loss": last.get("loss", float("nan")),
        "seconds": time.perf_counter() - t_start,
        "run": str(run.path),
    }
    if loop.best is not None:
        summary["best"] = loop.best
    return summary
