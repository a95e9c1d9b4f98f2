"""Images, MATLAB-compatible bicubic resize, the builtin set and the SR data sets (docs/data.md)."""

from qnas.data.datasets import (
    SCALES,
    EvalImages,
    ImageRecord,
    PatchSampler,
    TrainPatches,
    eval_dataset,
    resolve_data,
    train_dataset,
)
from qnas.data.images import load_image, save_image
from qnas.data.imresize import imresize, modcrop

__all__ = [
    "SCALES",
    "EvalImages",
    "ImageRecord",
    "PatchSampler",
    "TrainPatches",
    "eval_dataset",
    "imresize",
    "load_image",
    "modcrop",
    "resolve_data",
    "save_image",
    "train_dataset",
]
