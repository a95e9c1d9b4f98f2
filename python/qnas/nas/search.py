"""The QuantNAS search loop (`qnas search`): DARTS-style alternating first-order updates, or one pass.

Per step (Shvetsov et al., arXiv:2208.14839; Liu et al., "DARTS", ICLR 2019, first-order variant):
  1. architecture step (from --alpha-warmup on): a batch of the alpha split of the TRAINING images,
     loss = L1 + entropy_coef(t) · Σ H(probs) + cost term, gradients to the alphas only (weights
     frozen), Adam(--alpha-lr, betas (0.5, 0.999)) step. The cost term is the BitOps target
     weight · log²(E[BitOps] / target) (--target-gbitops) or the paper's penalty · E[BitOps] / E0
     (--penalty), or nothing;
  2. weight step: a batch of the weight split, loss = L1 with the probabilities held fixed, gradients to
     weights, biases and LSQ steps, clipped to norm --grad-clip, Adam(--lr) with a cosine schedule.
With --single-pass (the one-pass scheme DQSS uses) one forward-backward of the regularized loss on a
batch of all training images updates both. With --method spos there are no architecture steps: the
weights train along uniformly sampled single paths (single_path_step) and the layers are chosen at the
end by the held-out loss on the alpha split (select_by_loss). The validation images of the data set are
never used here.

Every architecture step logs, per slot, the norm of the gradient the L1 loss and the regularizers
(entropy and cost) give its alphas (metrics.jsonl: grad_loss/SLOT, grad_reg/SLOT; health.png): whether
the choices come from the loss or from the cost term.

Under `torchrun --nproc-per-node N` (qnas.runs.distributed) every rank draws its share of each global
batch (--batch-size) and the gradients of the loss are averaged over the ranks after every backward,
both the weights' and the alphas', before clipping and before the entropy and cost terms are added to
the alphas' (those depend on the alphas alone: every rank adds the same, once); the ranks keep identical
weights and alphas, equal to a one-process search's with the same global batch. Noise mode is the
exception: each rank draws its own noise for its share (an independent stream per rank), which one
process would have drawn differently. LSQ's data-driven step init and ADQ's batch norm use the whole
batch (qnas.runs.distributed.whole_batch, batch_norm).

Everything that decides the result is in the checkpoint (weights, alphas, both optimizers, the schedule,
both batch samplers, torch's RNG: noise mode draws its seeds from it), so `--resume` continues a killed
search to the same genotype as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qnas.atomic_write import atomic_write_bytes
from qnas.errors import QnasError
from qnas.nas.derive import GENOTYPE_FORMAT, genotype_cost
from qnas.nas.graph import compile_space
from qnas.nas.options import DEFAULT_LR_SIZE, SearchOptions
from qnas.nas.regularizers import BitOpsPenalty, BitOpsTarget, entropy_coef, temperature_at
from qnas.nas.supernet import Supernet, slot_bitops
from qnas.runs.folder import RunDir
from qnas.runs.loop import Loop, Value
from qnas.spaces import load_space, with_anchor


def split_images(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """(weight images, alpha images): every image i with floor((i+1)·f) > floor(i·f) goes to the alphas
    (f = 0.5: the odd ones), so both splits interleave the data set's order. Needs n >= 2."""
    alpha = [i for i in range(n) if int((i + 1) * fraction) > int(i * fraction)]
    if not alpha:
        alpha = [n - 1]
    weight = [i for i in range(n) if i not in alpha]
    if not weight:
        weight, alpha = alpha[:-1], alpha[-1:]
    return weight, alpha


def _subset(data, idx: list[int]):
    from qnas.data.datasets import TrainPatches

    return TrainPatches(
        [data.names[i] for i in idx],
        [data.hr_images[i] for i in idx],
        [data.lr_images[i] for i in idx],
        data.scale,
        data.patch_size,
    )


def search_space(opts: SearchOptions) -> dict:
    """The space document a search runs on: --space, without its anchor skip under --no-anchor."""
    space = load_space(opts.space)
    return space if opts.anchor else with_anchor(space, None)


def fixed_bits(opts: SearchOptions) -> dict[str, list[int]] | None:
    """{slot: [w_bits, a_bits]} of the --fix-bits genotype, or None."""
    if opts.fix_bits is None:
        return None
    from qnas.nas.derive import read_genotype

    g = read_genotype(opts.fix_bits)
    return {slot: [int(c["w_bits"]), int(c["a_bits"])] for slot, c in g["layers"].items()}


def build_supernet(
    opts: SearchOptions, space: dict | None = None, fixed: dict[str, list[int]] | None = None
) -> Supernet:
    """The supernet of a search; `fixed`: the --fix-bits layers' bits (read from opts when None)."""
    space = search_space(opts) if space is None else space
    compiled = compile_space(space, opts.scale, opts.ops)
    fixed = fixed_bits(opts) if fixed is None else fixed
    return Supernet(
        compiled,
        w_bits=opts.bits,
        a_bits=opts.a_bits,
        tie_bits=opts.tie_bits,
        mode=opts.mode,
        impl=opts.impl,
        adq=opts.adq,
        mix_norm=opts.mix_norm,
        init=opts.supernet_init,
        fixed_bits=fixed,
    )


def cost_term(opts: SearchOptions, initial_bitops_per_pixel: float) -> BitOpsTarget | BitOpsPenalty | None:
    """The cost regularizer of the architecture loss: the BitOps target, the paper's penalty, or None."""
    if opts.target_gbitops is not None:
        pixels = opts.lr_size[0] * opts.lr_size[1]
        return BitOpsTarget(opts.target_weight, opts.target_gbitops * 1e9 / pixels)
    if opts.penalty > 0:
        return BitOpsPenalty(opts.penalty, initial_bitops_per_pixel)
    return None


def search(
    opts: SearchOptions,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    extra_config: dict | None = None,
    compile: bool = False,
) -> dict[str, Any]:
    """Runs a search into the run folder `out`; returns {"steps", "genotype", "bitops", "seconds", "run"}.

    Writes RUN/config.json, metrics.jsonl (+ TensorBoard), checkpoint.pt, and at the end genotype.json,
    alphas.png (final probabilities per layer) and search.png (losses, entropy, expected BitOps).
    compile: the supernet's forwards run torch.compile'd after the first steps (qnas.runs.loop)."""
    from qnas.data.datasets import PatchSampler, train_dataset
    from qnas.runs import distributed

    opts.check()
    info = distributed.setup()
    distributed.check_batch(opts.batch_size, info)
    progress = progress and info.is_main
    space = search_space(opts)
    run = RunDir(out, is_writer=info.is_main)
    fixed = fixed_bits(opts)  # recorded: a resumed run checks its config, so the file cannot change under it
    config = {"search": dataclasses.asdict(opts), "space": space, **(extra_config or {})}
    if fixed is not None:
        config["fixed_bits"] = fixed
    loop = Loop(
        run,
        "search",
        opts.steps,
        config,
        resume=resume,
        result="genotype.json",
        seed=opts.seed,
        checkpoint_every=opts.checkpoint_every,
        progress=progress,
        compile=compile,
    )
    net = build_supernet(opts, space, fixed).to(memory_format=torch.channels_last)
    net.train()
    net.set_noise_stream(info.rank)
    data = train_dataset(opts.data, opts.scale, opts.patch_size, progress=progress)
    if opts.single_pass:
        w_data, a_data = data, None
    else:
        if len(data) < 2:
            raise QnasError(
                f"--data {opts.data}: the alternating search needs at least 2 training images "
                "(one split for the weights, one for the alphas); use --single-pass"
            )
        w_idx, a_idx = split_images(len(data), opts.alpha_split)
        w_data, a_data = _subset(data, w_idx), _subset(data, a_idx)
    shard = {"rank": info.rank, "world": info.world}
    w_sampler = PatchSampler(w_data, opts.batch_size, seed=opts.seed, **shard)
    a_sampler = None
    if a_data is not None:
        a_sampler = PatchSampler(a_data, opts.batch_size, seed=opts.seed + 1, **shard)

    weights, alphas = net.weight_parameters(), net.alpha_parameters()
    w_opt = torch.optim.Adam(weights, lr=opts.lr)
    a_opt = torch.optim.Adam(alphas, lr=opts.alpha_lr, betas=(0.5, 0.999))
    w_sched = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, T_max=opts.steps, eta_min=opts.lr / 100)
    pixels = opts.lr_size[0] * opts.lr_size[1]
    with torch.no_grad():
        initial_bitops = Value(float(net.expected_bitops_per_pixel(net.probs())) * pixels)
    loop.start(
        {
            "model": net,
            "w_opt": w_opt,
            "a_opt": a_opt,
            "w_sched": w_sched,
            "w_sampler": w_sampler,
            "a_sampler": a_sampler,
            "initial_bitops": initial_bitops,
        }
    )
    penalty = cost_term(opts, initial_bitops.value / pixels)
    alpha_start = int(opts.alpha_warmup * opts.steps)
    sync = None if info.world == 1 else lambda params: distributed.average_gradients(params, info)
    if opts.method == "spos" and compile:
        raise QnasError("--compile: not with --method spos (every step runs another path through the graph)")

    def spos_step_fn(step: int) -> dict[str, float]:
        rec = single_path_step(net, w_opt, _batch(w_sampler), grad_clip=opts.grad_clip, step=step, sync=sync)
        rec.update(distributed.means({"loss": rec["loss"]}, info))
        w_sched.step()
        rec["lr"] = w_opt.param_groups[0]["lr"]
        return rec

    def step_fn(step: int) -> dict[str, float]:
        ent_w = entropy_coef(step, opts.steps, opts.entropy_coef, opts.entropy_warmup)
        update_alphas = step >= alpha_start
        net.temperature = temperature_at(step, opts.steps, alpha_start, opts.final_temperature)
        a_batch = _batch(a_sampler) if (update_alphas and a_sampler is not None) else None
        rec = search_step(
            net,
            w_opt,
            a_opt,
            _batch(w_sampler),
            a_batch,
            update_alphas=update_alphas,
            entropy_weight=ent_w,
            penalty=penalty,
            grad_clip=opts.grad_clip,
            step=step,
            sync=sync,
            forward=loop.forward(net),
        )
        rec.update(distributed.means({k: rec[k] for k in ("loss", "loss_alpha") if k in rec}, info))
        w_sched.step()
        with torch.no_grad():
            probs = net.probs()
            expected = float(net.expected_bitops_per_pixel(probs)) * pixels
            rec.setdefault("entropy", float(net.entropy(probs)))
        rec.update(
            entropy_coef=ent_w,
            temperature=net.temperature,
            expected_bitops=expected,
            lr=w_opt.param_groups[0]["lr"],
        )
        return rec

    def postfix(rec: dict[str, float]) -> dict[str, str]:
        if opts.method == "spos":
            return {"loss": f"{rec['loss']:.4f}"}
        return {
            "loss": f"{rec['loss']:.4f}",
            "H": f"{rec['entropy']:.2f}",
            "GBitOps": f"{rec['expected_bitops'] / 1e9:.1f}",
        }

    t_start = time.perf_counter()
    loop.run(spos_step_fn if opts.method == "spos" else step_fn, postfix=postfix)
    step = loop.step
    selection = None
    if opts.method == "spos":
        selection = select_by_loss(net, opts, a_sampler, info, progress=progress)
        if opts.select == "evolution":
            selection = select_by_evolution(net, opts, a_sampler, info, selection, progress=progress)
    genotype = make_genotype(net, opts, space, initial_bitops.value, selection)
    summary = {
        "health": {},
        "steps": step,
        "genotype": str(run.path / "genotype.json"),
        "bitops": genotype["cost"]["bitops"],
        "run": str(run.path),
    }
    if not info.is_main:
        distributed.barrier(info)  # leave once rank 0 has written the genotype and plots
        distributed.teardown(info)
        return {**summary, "seconds": time.perf_counter() - t_start}
    atomic_write_bytes(run.path / "genotype.json", (json.dumps(genotype, indent=2) + "\n").encode())
    from qnas.nas.plots import health_summary, plot_alphas, plot_search_curves, plot_search_health

    metrics = run.read_metrics()
    plot_search_curves(metrics, run.path / "search.png")
    if selection is not None:
        atomic_write_bytes(run.path / "selection.json", (json.dumps(selection, indent=1) + "\n").encode())
    else:
        plot_alphas(
            net, run.path / "alphas.png", title=f"{space['name']} x{opts.scale}, {opts.mode}, step {step}"
        )
        plot_search_health(metrics, run.path / "health.png")
    distributed.barrier(info)
    distributed.teardown(info)
    return {**summary, "health": health_summary(metrics), "seconds": time.perf_counter() - t_start}


def search_step(
    net: Supernet,
    w_opt: torch.optim.Optimizer,
    a_opt: torch.optim.Optimizer,
    w_batch: tuple[torch.Tensor, torch.Tensor],
    a_batch: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    update_alphas: bool,
    entropy_weight: float,
    penalty: BitOpsTarget | BitOpsPenalty | None,
    grad_clip: float,
    step: int = 0,
    sync: Callable[[list[torch.Tensor]], None] | None = None,
    forward: Callable[..., torch.Tensor] | None = None,
) -> dict[str, float]:
    """One search step (module docstring): with `a_batch`, the architecture step on it then the weight step
    on `w_batch` (alternating); without, one pass on `w_batch` that updates the weights and, if
    `update_alphas`, the alphas. Returns the values to log (losses, entropy, cost term, and per slot the
    gradient norms of the loss and of the regularizers on its alphas). `sync(params)`, called after every
    backward, averages the loss's gradients over the ranks (qnas.runs.distributed.average_gradients).
    `forward`: what computes net(x, probs) (the compiled supernet under --compile; default net)."""
    forward = net if forward is None else forward
    l1 = nn.L1Loss()
    weights = [p for g in w_opt.param_groups for p in g["params"]]
    alphas = [p for g in a_opt.param_groups for p in g["params"]]
    rec: dict[str, float] = {}
    if a_batch is None:
        lr_img, hr_img = w_batch
        w_opt.zero_grad(set_to_none=True)
        a_opt.zero_grad(set_to_none=True)
        probs = net.probs() if update_alphas else _detached(net.probs())
        rec_loss = l1(forward(lr_img, probs), hr_img)
        _check_finite(rec_loss, step)
        rec_loss.backward()
        if sync is not None:
            sync(weights + alphas)
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(weights, grad_clip)
        w_opt.step()
        if update_alphas:
            _add_regularizer_grads(net, entropy_weight, penalty, rec)
            a_opt.step()
        rec["loss"] = rec_loss.item()
        return rec
    lr_a, hr_a = a_batch
    a_opt.zero_grad(set_to_none=True)
    a_loss = l1(forward(lr_a, net.probs()), hr_a)
    _check_finite(a_loss, step)
    # Gradients to the alphas only: autograd skips the weight gradients of every convolution on the way.
    a_loss.backward(inputs=alphas)
    if sync is not None:
        sync(alphas)
    _add_regularizer_grads(net, entropy_weight, penalty, rec)
    a_opt.step()
    rec["loss_alpha"] = a_loss.item()
    lr_w, hr_w = w_batch
    w_opt.zero_grad(set_to_none=True)
    w_loss = l1(forward(lr_w, _detached(net.probs())), hr_w)
    _check_finite(w_loss, step)
    w_loss.backward()
    if sync is not None:
        sync(weights)
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(weights, grad_clip)
    w_opt.step()
    rec["loss"] = w_loss.item()
    return rec


def single_path_step(
    net: Supernet,
    w_opt: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    *,
    grad_clip: float,
    step: int = 0,
    sync: Callable[[list[torch.Tensor]], None] | None = None,
) -> dict[str, float]:
    """One weight step of the single-path search (--method spos): one allowed entry per slot drawn
    uniformly (torch's RNG, the same on every rank), L1 of that path, gradients to the weights it used.
    Every candidate is trained on its share of the steps whatever the others' quality, so the held-out
    loss can compare candidates (Guo et al., "Single Path One-Shot Neural Architecture Search with
    Uniform Sampling", ECCV 2020, which searches bit-widths the same way)."""
    weights = [p for g in w_opt.param_groups for p in g["params"]]
    lr_img, hr_img = batch
    w_opt.zero_grad(set_to_none=True)
    loss = nn.functional.l1_loss(net.forward_path(lr_img, net.sample_path()), hr_img)
    _check_finite(loss, step)
    loss.backward()
    if sync is not None:
        sync(weights)
    if grad_clip > 0:
        nn.utils.clip_grad_norm_([p for p in weights if p.grad is not None], grad_clip)
    w_opt.step()
    return {"loss": loss.item()}


@torch.no_grad()
def select_by_loss(net: Supernet, opts: SearchOptions, sampler, info, *, progress: bool = False) -> dict:
    """The single-path search's choice: every allowed entry of every slot is scored by the mean L1 of
    the supernet on --select-batches batches of the held-out split (images the weights never trained
    on), along --select-contexts random paths with that slot set to the entry (the same paths, batches
    and noise for every entry of a slot, so their differences are paired). The genotype is the one with
    the lowest total score within the BitOps target (Supernet.best_within; without a target, the
    lowest-scoring entry of each slot): a first-order, additive estimate of each choice's effect on the
    loss, in place of the architecture parameters. Returns {"layers", "scores"} (scores[slot][entry
    label] = mean L1; layers carry their score and its excess over the slot's best)."""
    from tqdm import tqdm

    from qnas.runs.distributed import means

    batches = [_batch(sampler) for _ in range(opts.select_batches)]
    gen = torch.Generator().manual_seed(opts.seed + 7919)
    contexts = [net.sample_path(gen) for _ in range(opts.select_contexts)]
    entries = {s: net.entries(s) for s in net.slots}
    total = sum(len(e) for e in entries.values()) * len(contexts) * len(batches)
    rng = torch.get_rng_state()
    net.train()  # ADQ's batch norm on batch statistics: its running ones mix every path
    losses: dict[str, float] = {}
    with tqdm(total=total, desc="select", disable=not progress, leave=False) as bar:
        for s in net.slots:
            for e in entries[s]:
                acc = 0.0
                for k, ctx in enumerate(contexts):
                    path = {**ctx, s: e}
                    for b, (lr_img, hr_img) in enumerate(batches):
                        torch.manual_seed(opts.seed * 1_000_003 + 1000 * k + b)  # same noise for every entry
                        acc += float(nn.functional.l1_loss(net.forward_path(lr_img, path), hr_img))
                        bar.update()
                losses[f"{s}|{e}"] = acc / (len(contexts) * len(batches))
    torch.set_rng_state(rng)
    losses = means(losses, info)
    scores = {}
    for s in net.slots:
        t = torch.full((net.allowed(s).numel(),), float("inf"), dtype=torch.float64)
        for e in entries[s]:
            t[e] = losses[f"{s}|{e}"]
        scores[s] = t
    pixels = opts.lr_size[0] * opts.lr_size[1]
    if opts.target_gbitops is not None:
        picks = net.best_within({s: -t for s, t in scores.items()}, opts.target_gbitops * 1e9 / pixels)
    else:
        picks = {s: int(torch.argmin(t)) for s, t in scores.items()}
    layers = {}
    for s in net.slots:
        best = float(scores[s].min())
        layers[s] = {
            **net.entry(s, picks[s]),
            "heldout_l1": round(float(scores[s][picks[s]]), 6),
            "excess_l1": round(float(scores[s][picks[s]]) - best, 6),
        }
    table = {
        s: {_label(net.entry(s, e)): round(float(scores[s][e]), 6) for e in entries[s]} for s in net.slots
    }
    return {
        "layers": layers,
        "scores": table,
        "contexts": len(contexts),
        "batches": len(batches),
        "picks": {s: int(picks[s]) for s in net.slots},
    }


@torch.no_grad()
def select_by_evolution(
    net: Supernet, opts: SearchOptions, sampler, info, additive: dict, *, progress: bool = False
) -> dict:
    """`--select evolution`: the evolutionary architecture search of single-path one-shot NAS (Guo et
    al., ECCV 2020, Sec. 3.3) on the trained supernet, under the BitOps target. A genotype's fitness is
    the supernet's mean L1 along its whole path on --select-batches fresh batches of the held-out split
    (the same batches and noise for every genotype), so interactions between layers count, which the
    additive per-slot score (select_by_loss, whose pick seeds the population) cannot see.

    Each generation breeds --select-population children from the 10 best genotypes so far, half by
    mutation (each slot redrawn with probability 0.1), half by uniform crossover; a child over the
    target is repaired by moving random slots to cheaper entries until it fits. After the last
    generation the 10 best are scored again on as many new batches and the best of that second score
    is the genotype (fitness measured on the batches that chose it is biased low). Returns the additive
    selection's dict with the chosen layers and an "evolution" record (best fitness per generation,
    the additive pick's and the chosen genotype's scores on the final batches)."""
    from tqdm import tqdm

    from qnas.runs.distributed import means

    slots = list(net.slots)
    entries = {s: net.entries(s) for s in slots}
    cost = {s: net.entry_bitops(s).tolist() for s in slots}
    pixels = opts.lr_size[0] * opts.lr_size[1]
    budget = None if opts.target_gbitops is None else opts.target_gbitops * 1e9 / pixels
    gen = torch.Generator().manual_seed(opts.seed + 104729)
    top_k, p_mutate = 10, 0.1

    def draw(n: int) -> int:
        return int(torch.randint(n, (1,), generator=gen))

    def total(g: tuple[int, ...]) -> float:
        return sum(cost[s][e] for s, e in zip(slots, g, strict=True))

    def repair(g: tuple[int, ...]) -> tuple[int, ...]:
        g = list(g)
        while budget is not None:
            over = total(tuple(g)) - budget
            if over <= 0:
                break
            movable = [k for k, s in enumerate(slots) if any(cost[s][e] < cost[s][g[k]] for e in entries[s])]
            if not movable:
                break  # the cheapest genotype itself exceeds the target (best_within keeps it too)
            k = movable[draw(len(movable))]
            cheaper = [e for e in entries[slots[k]] if cost[slots[k]][e] < cost[slots[k]][g[k]]]
            g[k] = cheaper[draw(len(cheaper))]
        return tuple(g)

    def score(genotypes: list[tuple[int, ...]], batches, noise_seed: int) -> dict[tuple[int, ...], float]:
        losses = {}
        for g in genotypes:
            path = dict(zip(slots, g, strict=True))
            acc = 0.0
            for b, (lr_img, hr_img) in enumerate(batches):
                torch.manual_seed(noise_seed + 7 * b)  # the same noise for every genotype
                acc += float(nn.functional.l1_loss(net.forward_path(lr_img, path), hr_img))
            losses[",".join(map(str, g))] = acc / len(batches)
        losses = means(losses, info)  # every rank scores its share of the batches; all decide alike
        return {g: losses[",".join(map(str, g))] for g in genotypes}

    rng = torch.get_rng_state()
    net.train()
    fit_batches = [_batch(sampler) for _ in range(opts.select_batches)]
    fit_seed = opts.seed * 1_000_003
    seed_pick = tuple(additive["picks"][s] for s in slots)
    fitness: dict[tuple[int, ...], float] = {}
    population = [seed_pick]
    for _ in range(50 * opts.select_population):  # a small space may hold fewer distinct genotypes
        if len(population) >= opts.select_population:
            break
        g = repair(tuple(entries[s][draw(len(entries[s]))] for s in slots))
        if g not in population:
            population.append(g)
    history = []
    initial = population
    with tqdm(total=opts.select_generations, desc="evolution", disable=not progress, leave=False) as bar:
        for _ in range(opts.select_generations):
            fitness.update(score([g for g in population if g not in fitness], fit_batches, fit_seed))
            best = sorted(fitness, key=fitness.get)[:top_k]
            history.append(round(fitness[best[0]], 6))
            children: list[tuple[int, ...]] = []
            tries = 0
            while len(children) < opts.select_population and tries < 50 * opts.select_population:
                tries += 1
                a = best[draw(len(best))]
                if len(children) % 2 == 0:
                    child = tuple(
                        entries[s][draw(len(entries[s]))]
                        if float(torch.rand(1, generator=gen)) < p_mutate
                        else e
                        for s, e in zip(slots, a, strict=True)
                    )
                else:
                    b = best[draw(len(best))]
                    child = tuple(
                        x if float(torch.rand(1, generator=gen)) < 0.5 else y
                        for x, y in zip(a, b, strict=True)
                    )
                child = repair(child)
                if child not in fitness and child not in children:
                    children.append(child)
            population = children
            bar.update()
    fitness.update(score([g for g in population if g not in fitness], fit_batches, fit_seed))
    finalists = sorted(fitness, key=fitness.get)[:top_k]
    if seed_pick not in finalists:
        finalists.append(seed_pick)
    check_batches = [_batch(sampler) for _ in range(opts.select_batches)]
    rescored = score(finalists, check_batches, fit_seed + 500_009)
    torch.set_rng_state(rng)
    chosen = min(finalists, key=rescored.get)
    table = additive["scores"]
    layers = {}
    for s, e in zip(slots, chosen, strict=True):
        entry = net.entry(s, e)
        slot_scores = table[s]
        layers[s] = {
            **entry,
            "heldout_l1": slot_scores[_label(entry)],
            "excess_l1": round(slot_scores[_label(entry)] - min(slot_scores.values()), 6),
        }
    return {
        **additive,
        "layers": layers,
        "evolution": {
            "population": opts.select_population,
            "generations": opts.select_generations,
            "evaluated": len(fitness),
            "best_fitness_per_generation": history,
            # the spread a random genotype within the target has: how much the choice matters
            "initial_median_fitness": round(statistics.median(fitness[g] for g in initial), 6),
            "additive_pick": {
                "fitness": round(fitness[seed_pick], 6),
                "check": round(rescored[seed_pick], 6),
            },
            "chosen": {"fitness": round(fitness[chosen], 6), "check": round(rescored[chosen], 6)},
        },
    }


def _label(entry: dict) -> str:
    return f"{entry['op']}@w{entry['w_bits']}a{entry['a_bits']}"


def _add_regularizer_grads(
    net: Supernet, ent_w: float, penalty: BitOpsTarget | BitOpsPenalty | None, rec: dict
) -> None:
    """Adds the gradient of entropy_coef · H + cost term to the alphas' .grad (which holds the loss's)
    and logs both per slot: grad_loss/SLOT and grad_reg/SLOT are the norms of the two parts."""
    slots = net.slots
    alphas = [net.alpha(s) for s in slots]
    for s, a in zip(slots, alphas, strict=True):
        rec[f"grad_loss/{s}"] = float(a.grad.norm()) if a.grad is not None else 0.0
    probs = net.probs()
    h = net.entropy(probs)
    rec["entropy"] = float(h.detach())
    reg = ent_w * h
    if penalty is not None:
        e = net.expected_bitops_per_pixel(probs)
        pen = penalty(e)
        rec["penalty"] = float(pen.detach())
        rec["bitops_ratio"] = float(penalty.normalized(e).detach())
        reg = reg + pen
    grads = torch.autograd.grad(reg, alphas, allow_unused=True) if reg.requires_grad else [None] * len(alphas)
    for s, a, g in zip(slots, alphas, grads, strict=True):
        rec[f"grad_reg/{s}"] = float(g.norm()) if g is not None else 0.0
        if g is not None:
            a.grad = g if a.grad is None else a.grad + g


def make_genotype(
    net: Supernet, opts: SearchOptions, space: dict, initial_bitops: float, selection: dict | None = None
) -> dict:
    """The genotype of a supernet (each slot's argmax; with a BitOps target the most probable genotype
    within it: Supernet.choices; or the single-path `selection`, select_by_loss), with its cost and the
    search it came from."""
    pixels = opts.lr_size[0] * opts.lr_size[1]
    budget = None if opts.target_gbitops is None else opts.target_gbitops * 1e9 / pixels
    g = {
        "format": GENOTYPE_FORMAT,
        "space": space,
        "scale": opts.scale,
        "candidates": opts.ops,
        "layers": net.choices(budget) if selection is None else selection["layers"],
    }
    g["cost"] = genotype_cost(g, tuple(opts.lr_size))
    # With a target the genotype is the most probable one within it; the plain argmax's cost is kept to
    # show how far the distribution was from one-hot.
    argmax_bitops = None
    if selection is None:
        argmax_bitops = genotype_cost({**g, "layers": net.choices()}, tuple(opts.lr_size))["bitops"]
    with torch.no_grad():
        expected = float(net.expected_bitops_per_pixel(net.probs())) * pixels
    g["search"] = {
        "method": opts.method,
        "mode": opts.mode,
        "impl": opts.impl,
        "adq": opts.adq,
        "bits": opts.bits,
        "a_bits": opts.a_bits if opts.a_bits is not None else opts.bits,
        "tie_bits": opts.tie_bits,
        "steps": opts.steps,
        "penalty": opts.penalty,
        "target_gbitops": opts.target_gbitops,
        "target_weight": opts.target_weight,
        "mix_norm": opts.mix_norm,
        "supernet_init": opts.supernet_init,
        "alpha_lr": opts.alpha_lr,
        "final_temperature": opts.final_temperature,
        "single_pass": opts.single_pass,
        "initial_expected_bitops": initial_bitops,
        "final_expected_bitops": expected,
        "argmax_bitops": argmax_bitops,
    }
    if selection is not None:
        g["search"].update(
            select=opts.select, select_contexts=selection["contexts"], select_batches=selection["batches"]
        )
        if "evolution" in selection:
            g["search"]["evolution"] = selection["evolution"]
    return g


def random_genotype(
    space: dict,
    scale: int,
    target_gbitops: float,
    seed: int,
    *,
    bits: list[int] = (4, 8),
    candidates: list[str] | None = None,
    lr_size: tuple[int, int] = DEFAULT_LR_SIZE,
    tolerance: float = 0.05,
) -> dict:
    """The control of a search at a BitOps target: a genotype drawn uniformly among those of the space
    (every slot an op and tied weight/activation bits from `bits`) whose BitOps at `lr_size` are within
    ±tolerance of the target. Rejection sampling: every slot drawn uniformly, the first draw in the band
    kept (a torch.Generator seeded with `seed`, so the same arguments give the same genotype).

    QnasError naming --target-gbitops when no draw lands in the band (the message gives the range)."""
    compiled = compile_space(space, scale, candidates)
    bits = [int(b) for b in bits]
    pixels = lr_size[0] * lr_size[1]
    costs = slot_bitops(compiled, bits, bits)
    # Tied bits: the choices of a slot are (op, i) with cost[o, i, i]; flattened op-major.
    tables = {
        s: torch.stack([c[:, i, i] for i in range(len(bits))], 1).flatten() * pixels for s, c in costs.items()
    }
    target = float(target_gbitops) * 1e9
    gen = torch.Generator().manual_seed(int(seed))
    batch, rounds = 1 << 14, 64
    for _ in range(rounds):
        picks = {s: torch.randint(len(t), (batch,), generator=gen) for s, t in tables.items()}
        total = sum(t[picks[s]] for s, t in tables.items())
        hits = ((total - target).abs() <= tolerance * target).nonzero()
        if len(hits):
            k = int(hits[0])
            layers = {}
            for s in tables:
                o, i = divmod(int(picks[s][k]), len(bits))
                layers[s] = {"op": compiled.slots[s][o], "w_bits": bits[i], "a_bits": bits[i]}
            return {
                "format": GENOTYPE_FORMAT,
                "space": compiled.space,
                "scale": compiled.scale,
                "candidates": candidates,
                "layers": layers,
                "random": {
                    "seed": int(seed),
                    "target_gbitops": float(target_gbitops),
                    "tolerance": tolerance,
                },
            }
    lo = sum(float(t.min()) for t in tables.values()) / 1e9
    hi = sum(float(t.max()) for t in tables.values()) / 1e9
    raise QnasError(
        f"--target-gbitops {target_gbitops:g}: no random genotype within {tolerance:.0%} of it in "
        f"{batch * rounds} draws (genotypes of this space cost {lo:.1f} to {hi:.1f} GBitOps at "
        f"{lr_size[0]}x{lr_size[1]}, most of them near the middle)"
    )


def _batch(sampler) -> tuple[torch.Tensor, torch.Tensor]:
    lr_img, hr_img = next(sampler)
    return lr_img.contiguous(memory_format=torch.channels_last), hr_img


def _detached(probs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in probs.items()}


def _check_finite(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise QnasError(f"search diverged at step {step} (loss {loss.item()}); lower --lr or --alpha-lr")
