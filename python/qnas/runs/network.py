"""How a run's network is described, rebuilt and stored, whatever produced it: the model file format and
the registry of network kinds.

A network config is a JSON object with a "kind"; the module that defines a kind registers its builder
with `register_network_kind` when it is imported:
- "sr" (qnas.quant.apply): {"kind": "sr", "model": {"name", "scale", "kwargs"}}, a registered SR model
  (qnas.sr), with "quant": {...} for a quantized one;
- "genotype" (qnas.nas.derive): the network derived from a QuantNAS genotype.
Code that loads runs of any kind imports both (qnas.train, qnas.export, qnas.api do).
model.pt = {"format": MODEL_FORMAT, "network": network config, "model": state_dict, "train": {...}}:
everything needed to rebuild and evaluate the network without the command line that trained it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from qnas.errors import CheckpointError, QnasError
from qnas.runs.folder import load_torch_file

MODEL_FORMAT = "qnas-model/1"

_BUILDERS: dict[str, Callable[[dict], nn.Module]] = {}


def register_network_kind(kind: str, builder: Callable[[dict], nn.Module]) -> None:
    """Makes build_network({"kind": kind, ...}) call builder(config)."""
    _BUILDERS[kind] = builder


def network_kinds() -> list[str]:
    """The kinds registered so far."""
    return sorted(_BUILDERS)


# The most parameters a network config may ask for (2 GB of float32): about 12x EDSR (43 M), the
# largest model here. A config beyond it (a corrupt or hostile model.pt, a typo in --model-args) is an
# error before anything is allocated, not a machine running out of memory.
MAX_PARAMETERS = 500_000_000


def build_network(cfg: dict) -> nn.Module:
    """Rebuilds a network from its config (see module docstring). Outside a meta-device context the
    config is first built on the meta device (nothing allocated) and refused beyond MAX_PARAMETERS."""
    import torch

    if not isinstance(cfg, dict) or "kind" not in cfg:
        raise QnasError('a network config must be a JSON object with a "kind"')
    kind = cfg["kind"]
    if not isinstance(kind, str):
        raise QnasError(f'a network config\'s "kind" must be a string, got {kind!r}')
    if kind not in _BUILDERS:
        raise QnasError(
            f"network kind {kind!r} is unknown (registered: {', '.join(network_kinds()) or 'none'}; "
            "qnas.api.load_network knows every kind qnas defines)"
        )
    if torch.get_default_device().type != "meta":
        with torch.device("meta"):
            n = sum(p.numel() for p in _BUILDERS[kind](cfg).parameters())
        if n > MAX_PARAMETERS:
            raise QnasError(f"the network has {n:,} parameters, more than the {MAX_PARAMETERS:,} qnas builds")
    return _BUILDERS[kind](cfg)


def model_file(path: str | os.PathLike) -> Path:
    """A run folder's model.pt, or the given file. A folder without one is a CheckpointError that says
    what to do: retrain a search run's genotype, or resume an unfinished training run."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.pt"
        if not p.exists():
            if (Path(path) / "genotype.json").exists():
                raise CheckpointError(
                    f"{path}: a search run has no trained model; retrain its genotype first: "
                    f"qnas train --arch {Path(path) / 'genotype.json'} --out RUN"
                )
            if (Path(path) / "checkpoint.pt").exists():
                raise CheckpointError(
                    f"{path}: no model.pt, the run did not finish; the command that started it, "
                    "with its options and --resume, continues it"
                )
            raise CheckpointError(f"{path}: no model.pt (not a finished qnas run folder)")
    return p


def load_network(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """(network with its trained weights, in eval mode; the whole model.pt dict) from a run folder or
    a model.pt file. Every failure is a one-line CheckpointError naming the file."""
    p = model_file(path)
    blob = load_torch_file(p, "model file")
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT or "network" not in blob:
        raise CheckpointError(f"{p}: not a qnas model file (expected format {MODEL_FORMAT})")
    try:
        net = build_network(blob["network"])
    except QnasError as e:
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(str(p)) else f"{p}: {msg}") from e
    try:
        net.load_state_dict(blob["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{p}: weights do not match the network it describes ({first[:160]})") from e
    net.eval()
    return net, blob


def model_blob(network_cfg: dict, model: nn.Module, **extra: Any) -> dict:
    return {"format": MODEL_FORMAT, "network": network_cfg, "model": model.state_dict(), **extra}


def network_scale(cfg: dict) -> int:
    """The upscaling factor of a network config."""
    if "scale" in cfg:
        return int(cfg["scale"])
    if isinstance(cfg.get("model"), dict) and "scale" in cfg["model"]:
        return int(cfg["model"]["scale"])
    raise QnasError("network config has no scale")


def network_upscaler(net: nn.Module):
    """An upscale_fn for qnas.evaluate.evaluate: LR [1,3,h,w] in [0,1] -> SR clamped to [0,1] (an
    output with NaN or inf is returned as it is, for evaluate to refuse)."""
    import torch

    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    net = net.to(memory_format=torch.channels_last)  # oneDNN's fast path on CPU

    def upscale(lr):
        with torch.inference_mode():
            x = lr.to(device).contiguous(memory_format=torch.channels_last)
            y = net(x)
            if not bool(torch.isfinite(y).all()):
                return y.contiguous().cpu()  # unclamped (inf would clamp to white): evaluate refuses it
            return y.clamp_(0, 1).contiguous().cpu()

    return upscale
