"""The one loop of every long job: `qnas train`, `qnas search` and `qnas strategy` each define their step
(one optimization step that returns the values to log) and what state it keeps; the loop does the rest,
the same way for all three:

- the run folder: a fresh run refuses a folder that already holds one and writes config.json; a resume
  needs checkpoint.pt and the same config (RunDir.check_same_config);
- the seed, and the named state (whatever has state_dict/load_state_dict: networks, optimizers,
  schedules, samplers, a Value) saved in checkpoint.pt with torch's RNG and the step every
  `checkpoint_every` steps and at the last; a resume restores all of it and cuts metrics.jsonl back to
  the checkpoint's step, so a killed run resumed ends with the files of one never interrupted;
- metrics.jsonl and TensorBoard (the step's values and its wall time), the progress bar;
- validation every N steps and at the last, best.pt at the best score (Validation);
- `--compile`: `loop.forward(net)` is the network a step calls: `net` itself for its first
  COMPILE_AFTER_STEPS steps in this process, then compile_network(net).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from qnas.errors import CheckpointError, QnasError
from qnas.runs.folder import RunDir

#: Steps that run eagerly before a `--compile` run switches to the compiled network: the quantizers
#: initialise their steps from the first batches (a one-time, data-dependent branch), and FQSR's warm-up
#: averages a few batches; after that every step is the same graph.
COMPILE_AFTER_STEPS = 3


def compile_network(net: torch.nn.Module) -> torch.nn.Module:
    """torch.compile(net, fullgraph=True) for training: one graph per step, no break (tests/test_compile.py
    counts them). The supernet's quantization noise draws its seed per call with a traced .item(), so
    scalar outputs are captured in the graph (the seed is a SymInt of the qops ops) instead of breaking it."""
    import torch._dynamo

    torch._dynamo.config.capture_scalar_outputs = True
    return torch.compile(net, fullgraph=True)


class Value:
    """A plain value (a number, a dict, None) kept in the checkpoint among a loop's named state."""

    def __init__(self, value: Any = None):
        self.value = value

    def state_dict(self) -> Any:
        return self.value

    def load_state_dict(self, value: Any) -> None:
        self.value = value


@dataclass
class Validation:
    """Validation while a loop runs: every `every` steps (0: only at the last step) and at the last step,
    `evaluate()` gives the scores ({"psnr": .., "ssim": ..}), logged as val_<name>. When scores[key] beats
    the best so far, `save_best(best)` gets {"step", **scores} (it writes best.pt). The best so far is part
    of the checkpoint: a resumed run keeps it."""

    every: int
    evaluate: Callable[[], dict[str, float]]
    save_best: Callable[[dict], None]
    key: str = "psnr"

    def due(self, step: int, steps: int) -> bool:
        return step == steps or bool(self.every and step % self.every == 0)


class Loop:
    """One run of a job's step function into a run folder (module docstring).

    Construct it before anything expensive is built (it checks the folder and the config, then seeds
    torch with `seed`), call `start(state)` once the state exists (restores it on a resume, writes
    config.json otherwise), then `run(step)`. `checkpoint_every=None`: a job that cannot resume."""

    def __init__(
        self,
        run: RunDir,
        command: str,
        steps: int,
        config: dict,
        *,
        resume: bool = False,
        result: str = "model.pt",
        seed: int | None = None,
        checkpoint_every: int | None = None,
        progress: bool = True,
        desc: str | None = None,
        compile: bool = False,
    ):
        self.run_dir = run
        self.command = command
        self.steps = steps
        self.config = json.loads(json.dumps(config))  # what config.json will hold, for exact comparison
        self.resume = resume
        self.checkpoint_every = checkpoint_every
        self.progress = progress
        self.desc = desc or f"{command} {run.path.name}"
        self.compile = compile
        self.step = 0
        self.best: dict | None = None  # {"step", **scores} of the best validation (Validation)
        self.record: dict[str, Any] = {}  # the values of the last step
        self.state: dict[str, Any] = {}
        self._compiled: dict[int, list] = {}
        if resume:
            if not run.has_checkpoint():
                raise QnasError(f"{run.path}: nothing to resume (no checkpoint.pt)")
            run.check_same_config(self.config)
        elif run.is_writer and (run.has_checkpoint() or (run.path / result).exists()):
            hint = (
                "pass --resume to continue it or choose another --out"
                if checkpoint_every
                else "choose another --out"
            )
            raise QnasError(f"{run.path}: already holds a run; {hint}")
        if seed is not None:
            torch.manual_seed(seed)

    def start(self, state: dict[str, Any]) -> int:
        """Registers the named state (None entries are kept as None). On a resume, restores it, the RNG,
        the step and the best validation from checkpoint.pt and cuts metrics.jsonl back to that step; on a
        fresh start, writes config.json. Returns the step the run continues from."""
        self.state = state
        if not self.resume:
            self.run_dir.write_config(self.config)
            return 0
        path = self.run_dir.checkpoint_path
        saved = self.run_dir.load_checkpoint()
        try:
            for name, obj in state.items():
                if obj is not None:
                    obj.load_state_dict(saved[name])
            torch.set_rng_state(saved["rng"])
            step = int(saved["step"])
            self.best = saved.get("best")
        except KeyError as e:
            raise CheckpointError(f"{path}: not a checkpoint of `qnas {self.command}` (no {e})") from e
        except (RuntimeError, ValueError, TypeError, AttributeError) as e:
            first = " ".join(str(e).split())[:160] or type(e).__name__
            raise CheckpointError(f"{path}: does not match this run's network or options ({first})") from e
        if not 0 <= step <= self.steps:
            raise CheckpointError(f"{path}: step {step} is outside this run's 0..{self.steps}")
        self.run_dir.truncate_metrics(step)
        self.step = step
        return step

    def checkpoint(self) -> None:
        state = {name: obj.state_dict() if obj is not None else None for name, obj in self.state.items()}
        self.run_dir.save_checkpoint(
            {"step": self.step, **state, "rng": torch.get_rng_state(), "best": self.best}
        )

    def forward(self, net: torch.nn.Module) -> torch.nn.Module:
        """What a step calls for `net`: `net` itself, or under `compile`, once `net` has run
        COMPILE_AFTER_STEPS steps in this process (the quantizers' one-time initialisation runs eagerly,
        also after a resume or when a job swaps in a new network), its compiled twin."""
        if not self.compile:
            return net
        entry = self._compiled.get(id(net))
        if entry is None or entry[0] is not net:
            entry = self._compiled[id(net)] = [net, self.step + COMPILE_AFTER_STEPS, None]
        if self.step < entry[1]:
            return net
        if entry[2] is None:
            entry[2] = compile_network(net)
        return entry[2]

    def run(
        self,
        step_fn: Callable[[int], dict[str, Any]],
        *,
        postfix: Callable[[dict[str, Any]], dict[str, str]] | None = None,
        validation: Validation | None = None,
    ) -> dict[str, Any]:
        """Runs step_fn(step) for step = the start step .. steps-1 (step_fn returns the values to log for
        step + 1); returns the values of the last step."""
        from tqdm import tqdm

        bar = tqdm(
            total=self.steps, initial=self.step, desc=self.desc, disable=not self.progress, unit="step"
        )
        try:
            while self.step < self.steps:
                t0 = time.perf_counter()
                record = step_fn(self.step)
                self.step += 1
                record["step_time_s"] = time.perf_counter() - t0
                if validation is not None and validation.due(self.step, self.steps):
                    record.update(self._validate(validation))
                self.run_dir.log(self.step, **record)
                self.record = record
                bar.update(1)
                if postfix is not None:
                    bar.set_postfix(postfix(record))
                if self.checkpoint_every and (
                    self.step % self.checkpoint_every == 0 or self.step == self.steps
                ):
                    self.checkpoint()
        finally:
            bar.close()
            self.run_dir.close()
        return self.record

    def _validate(self, validation: Validation) -> dict[str, float]:
        scores = validation.evaluate()
        if self.best is None or scores[validation.key] > self.best[validation.key]:
            self.best = {"step": self.step, **scores}
            validation.save_best(self.best)
        return {f"val_{name}": value for name, value in scores.items()}
