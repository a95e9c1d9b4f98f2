"""Deployment without the training code: the packed model format (format.py) and its integer runtime
(runtime.py), used by `qnas upscale`. Depends on torch, qops and safetensors only."""

from qnas.deploy.format import FORMAT, PackedModelError, read_packed, write_packed
from qnas.deploy.runtime import PackedModel

__all__ = ["FORMAT", "PackedModel", "PackedModelError", "read_packed", "write_packed"]
