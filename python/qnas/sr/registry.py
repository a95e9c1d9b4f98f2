"""Models by name: build_model(name, scale, **kwargs), and the JSON config that rebuilds one.

A model config is {"name": NAME, "scale": S, "kwargs": {...}} with every constructor argument
resolved (defaults included), so a checkpoint that stores it rebuilds the same architecture even
if a default changes later. "model" is accepted as an alias of "name" (the `qnas cost --arch` file).
The quantization hooks `conv` / `add` are not part of the config: whoever builds a quantized
variant records its own quantization settings beside it.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from qnas.errors import QnasError
from qnas.files import read_json_object
from qnas.sr.common import AddFactory, ConvFactory, check_scale
from qnas.sr.edsr import EDSR
from qnas.sr.rfdn import RFDN
from qnas.sr.srresnet import SRResNet

# Constructor arguments that are hooks or the scale, never stored in a config.
_NOT_CONFIG = {"self", "scale", "conv", "add"}


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: the class and the preset arguments that make the named model."""

    name: str
    cls: type[nn.Module]
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)

    def arguments(self) -> dict[str, Any]:
        """Every configurable constructor argument with its value for this preset."""
        params = inspect.signature(self.cls.__init__).parameters
        args = {
            n: p.default
            for n, p in params.items()
            if n not in _NOT_CONFIG and p.kind is p.POSITIONAL_OR_KEYWORD
        }
        args.update(self.defaults)
        return _json_normalised(args)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "edsr",
            EDSR,
            "EDSR (Lim et al. 2017): 32 residual blocks, 256 channels, residual scaling 0.1",
            {"n_resblocks": 32, "n_feats": 256, "res_scale": 0.1},
        ),
        ModelSpec(
            "edsr-baseline",
            EDSR,
            "EDSR baseline (Lim et al. 2017): 16 residual blocks, 64 channels, no residual scaling",
            {"n_resblocks": 16, "n_feats": 64, "res_scale": 1.0},
        ),
        ModelSpec(
            "srresnet",
            SRResNet,
            "SRResNet / SRGAN generator (Ledig et al. 2017): 16 residual blocks with BN and PReLU",
            {"n_blocks": 16, "n_feats": 64, "bn": True},
        ),
        ModelSpec(
            "rfdn",
            RFDN,
            "RFDN as in its reference code (Liu et al. 2020, E-RFDN of AIM 2020): nf=50, 4 RFDBs, ESA",
            {"nf": 50, "n_blocks": 4, "attention": "esa"},
        ),
        ModelSpec(
            "rfdn-paper",
            RFDN,
            "RFDN of the paper's tables (Liu et al. 2020): nf=48, 6 RFDBs, CCA",
            {"nf": 48, "n_blocks": 6, "attention": "cca"},
        ),
        ModelSpec(
            "rfdn-l",
            RFDN,
            "RFDN-L of the paper's tables (Liu et al. 2020): nf=52, 6 RFDBs, CCA",
            {"nf": 52, "n_blocks": 6, "attention": "cca"},
        ),
    )
}


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(MODELS)


def _spec(name: object) -> ModelSpec:
    if not isinstance(name, str) or name not in MODELS:
        raise QnasError(f"unknown model {name!r} (known: {', '.join(list_models())})")
    return MODELS[name]


def _json_normalised(value: Any) -> Any:
    """JSON round trip (tuples become lists), so a built model's config equals its reloaded one."""
    return json.loads(json.dumps(value))


def _check_value(model: str, key: str, value: Any, default: Any) -> None:
    """Rejects a kwarg whose JSON type differs from its default's, naming the argument."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        )
    else:
        ok = True
    if not ok:
        raise QnasError(
            f"{model}: argument {key}={value!r} has the wrong type (expected {type(default).__name__})"
        )


def build_model(
    name: str,
    scale: int,
    *,
    conv: ConvFactory | None = None,
    add: AddFactory | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Builds the registered model `name` for upscaling factor `scale` (2, 3 or 4).

    kwargs override the preset's constructor arguments (JSON values only; see MODELS[name].arguments()).
    conv / add: quantization hooks (qnas.sr.common.default_conv / Add by default).
    Raises QnasError for an unknown name (listing the known ones), a scale not in {2, 3, 4}, an
    unknown argument or a value of the wrong type. The result carries its config: model_config(m).
    """
    spec = _spec(name)
    check_scale(scale)
    args = spec.arguments()
    for key, value in kwargs.items():
        if key not in args:
            raise QnasError(f"{name}: unknown argument {key!r} (known: {', '.join(sorted(args))})")
        _check_value(name, key, value, args[key])
    try:
        user = _json_normalised(kwargs)
    except (TypeError, ValueError) as e:
        raise QnasError(f"{name}: arguments must be JSON values ({e})") from e
    args.update(user)
    hooks: dict[str, Any] = {}
    if conv is not None:
        hooks["conv"] = conv
    if add is not None:
        hooks["add"] = add
    model = spec.cls(scale, **args, **hooks)
    model.qnas_config = {"name": name, "scale": scale, "kwargs": args}
    return model


def model_config(model: nn.Module) -> dict[str, Any]:
    """{"name", "scale", "kwargs"} of a model made by build_model / build_from_config (a copy)."""
    cfg = getattr(model, "qnas_config", None)
    if cfg is None:
        raise QnasError(
            f"{type(model).__name__} was not built by qnas.sr.build_model: it has no model config"
        )
    return copy.deepcopy(cfg)


def build_from_config(
    cfg: Mapping[str, Any], *, conv: ConvFactory | None = None, add: AddFactory | None = None
) -> nn.Module:
    """Rebuilds a model from model_config(...) output (or the same dict read back from JSON).

    Keys: "name" (or "model"), "scale", optional "kwargs"; other keys are ignored, so richer
    files (a checkpoint's config, later a QuantNAS genotype) can carry this one inside them."""
    if not isinstance(cfg, Mapping):
        raise QnasError(f"a model config must be a JSON object, got {type(cfg).__name__}")
    name = cfg.get("name", cfg.get("model"))
    if name is None:
        raise QnasError('a model config needs "name" (or "model"), "scale" and optionally "kwargs"')
    if "scale" not in cfg:
        raise QnasError(f'model config for {name!r} has no "scale"')
    kwargs = cfg.get("kwargs", {}) or {}
    if not isinstance(kwargs, Mapping):
        raise QnasError(f'model config for {name!r}: "kwargs" must be a JSON object')
    return build_model(name, cfg["scale"], conv=conv, add=add, **kwargs)


def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a JSON model config file, raising QnasError naming the file if it is missing or corrupt."""
    if not os.path.exists(path):
        raise QnasError(f"{path}: file not found")
    if os.path.isdir(path):
        raise QnasError(f"{path}: is a folder, not a JSON file")
    return read_json_object(path, expected='a JSON object with "model", "scale" and "kwargs"')
