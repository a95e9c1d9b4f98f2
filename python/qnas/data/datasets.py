"""Data sets for training and evaluating x2/x3/x4 super-resolution, from a ``--data`` spec.

Specs (docs/data.md has the reasons):

* ``builtin`` - the photographs bundled with scikit-image (qnas.data.builtin): the training split
  for training/search, the validation split for evaluation. ``builtin:train`` / ``builtin:val``
  pick a split explicitly.
* a folder in the DIV2K layout: ``D/DIV2K_train_HR/0001.png`` with optional
  ``D/DIV2K_train_LR_bicubic/X2/0001x2.png`` (and ``DIV2K_valid_*`` for evaluation); or the
  ``DIV2K_train_HR`` / ``DIV2K_valid_HR`` folder itself, next to its ``*_LR_bicubic`` folder.
* a benchmark folder with ``HR/`` and optional ``LR_bicubic/X2/`` (``baby.png`` / ``babyx2.png``),
  the layout EDSR distributes Set5/Set14/B100/Urban100/Manga109 in;
* any other folder: its png/jpg/jpeg/bmp/tif images are the HR images (Set5 etc. as plain folders).

Every HR image is modcropped to a multiple of the scale. The LR image is the provided one when
the layout has it (cropped to HR/scale when it was made from the un-modcropped HR), otherwise
MATLAB bicubic ``imresize(HR, 1/scale)`` (qnas.data.imresize). Tensors are float32 in [0, 1], CxHxW,
RGB, values exactly ``uint8 / 255``.

Training draws random aligned patches: batch ``k`` of a run is a pure function of
``(seed, rank, k)`` (PatchSampler), so a resumed run sees exactly the batches an uninterrupted one
would have seen.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from qnas.data import builtin
from qnas.data.images import image_size, is_image_file, list_images, load_image
from qnas.data.imresize import imresize, modcrop
from qnas.errors import DataError
from qnas.scale import SCALES, check_scale

__all__ = [
    "SCALES",
    "check_batch",
    "check_scale",
    "ImageRecord",
    "resolve_data",
    "load_pair",
    "TrainPatches",
    "PatchSampler",
    "EvalImages",
    "train_dataset",
    "eval_dataset",
    "to_tensor",
]

_SPLITS = ("train", "eval")
_DIV2K_HR = re.compile(r"^DIV2K_(train|valid)_HR$")
_SSIM_WINDOW = 11  # the smallest Y image SSIM's 11x11 'valid' window accepts


# The most HR pixels one training batch may hold (batch size x patch side^2): 2^26, e.g. 1024 patches
# of 256x256, about 1 GB as float32 with the LR patches; far above what training here uses (16 x 64^2).
MAX_BATCH_PIXELS = 2**26


def check_batch(batch_size: int, patch_size: int) -> None:
    """DataError naming --batch-size unless batch_size x patch_size^2 HR pixels fit MAX_BATCH_PIXELS."""
    if batch_size * patch_size * patch_size > MAX_BATCH_PIXELS:
        raise DataError(
            f"--batch-size {batch_size} of {patch_size}x{patch_size} patches: more than the "
            f"{MAX_BATCH_PIXELS:,} pixels a batch may hold"
        )


@dataclass(frozen=True)
class ImageRecord:
    """One HR image of a data set and, when the layout provides it, its bicubic LR file."""

    name: str
    hr_path: Path
    lr_path: Path | None = None


# --------------------------------------------------------------------------------------------
# Resolving a spec into image records


def _find_lr(lr_dir: Path, stem: str, scale: int) -> Path | None:
    """The LR file of ``stem`` in ``lr_dir``: ``{stem}x{scale}.*`` (DIV2K/EDSR naming) or ``{stem}.*``."""
    if not lr_dir.is_dir():
        return None
    for candidate_stem in (f"{stem}x{scale}", stem):
        for p in sorted(lr_dir.glob(f"{candidate_stem}.*")):
            if p.is_file() and is_image_file(p):
                return p
    return None


def _folder_records(hr_dir: Path, lr_dir: Path | None, scale: int) -> list[ImageRecord]:
    files = list_images(hr_dir)
    if not files:
        raise DataError(f"{hr_dir}: no images (png, jpg, jpeg, bmp, tif) in this folder")
    return [
        ImageRecord(p.stem, p, _find_lr(lr_dir, p.stem, scale) if lr_dir is not None else None) for p in files
    ]


def _builtin_records(split: str) -> list[ImageRecord]:
    names = builtin.BUILTIN_TRAIN if split == "train" else builtin.BUILTIN_VALIDATION
    records = [ImageRecord(n, builtin.builtin_path(n)) for n in names]
    for r in records:
        if not r.hr_path.is_file():
            raise DataError(f"{r.hr_path}: builtin image missing from the scikit-image installation")
    return records


def resolve_data(spec: str, scale: int, split: str) -> list[ImageRecord]:
    """The images a ``--data`` spec names, for ``split`` "train" or "eval" (layouts in the module
    docstring). Raises DataError for an unknown spec, a missing or empty folder, or a bad scale."""
    scale = check_scale(scale)
    if split not in _SPLITS:
        raise ValueError(f"split: expected one of {_SPLITS}, got {split!r}")
    spec = str(spec)
    if spec == "builtin":
        return _builtin_records(split)
    if spec in ("builtin:train", "builtin:val"):
        return _builtin_records("train" if spec == "builtin:train" else "eval")
    if spec.startswith("builtin"):
        raise DataError(
            f"unknown data spec {spec!r}: expected builtin, builtin:train, builtin:val or a folder"
        )

    root = Path(spec).expanduser()
    if not root.exists():
        raise DataError(f"unknown data spec {spec!r}: not 'builtin' and no such folder")
    if not root.is_dir():
        raise DataError(f"{root}: expected a folder of images or 'builtin', got a file")

    div2k_part = "train" if split == "train" else "valid"
    if (root / "DIV2K_train_HR").is_dir() or (root / "DIV2K_valid_HR").is_dir():
        hr_dir = root / f"DIV2K_{div2k_part}_HR"
        if not hr_dir.is_dir():
            raise DataError(f"{hr_dir}: missing (the DIV2K layout needs it for {split})")
        return _folder_records(hr_dir, root / f"DIV2K_{div2k_part}_LR_bicubic" / f"X{scale}", scale)
    m = _DIV2K_HR.match(root.name)
    if m:
        return _folder_records(root, root.parent / f"DIV2K_{m.group(1)}_LR_bicubic" / f"X{scale}", scale)
    if (root / "HR").is_dir():
        return _folder_records(root / "HR", root / "LR_bicubic" / f"X{scale}", scale)
    return _folder_records(root, None, scale)


def load_pair(record: ImageRecord, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """(HR, LR) uint8 HxWx3 arrays: HR modcropped to a multiple of ``scale``; LR the provided file
    (checked to be HR/scale, or ceil(size/scale) of the un-cropped HR, then cropped) or else
    MATLAB bicubic ``imresize(HR, 1/scale)``."""
    hr_full = load_image(record.hr_path)
    hr = modcrop(hr_full, scale)
    if hr.shape[0] < 1 or hr.shape[1] < 1:
        raise DataError(
            f"{record.hr_path}: image is {hr_full.shape[0]}x{hr_full.shape[1]}, smaller than scale {scale}"
        )
    lr_shape = (hr.shape[0] // scale, hr.shape[1] // scale)
    if record.lr_path is None:
        return hr, imresize(hr, 1.0 / scale)
    lr = load_image(record.lr_path)
    ceil_shape = (-(-hr_full.shape[0] // scale), -(-hr_full.shape[1] // scale))
    if lr.shape[:2] not in (lr_shape, ceil_shape):
        raise DataError(
            f"{record.lr_path}: LR image is {lr.shape[0]}x{lr.shape[1]}, expected "
            f"{lr_shape[0]}x{lr_shape[1]} for HR {record.hr_path.name} ({hr_full.shape[0]}x{hr_full.shape[1]}) at x{scale}"
        )
    return hr, np.ascontiguousarray(lr[: lr_shape[0], : lr_shape[1]])


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 (or BxHxWx3) -> float32 3xHxW (Bx3xHxW) in [0, 1]."""
    arr = np.ascontiguousarray(img)
    if (
        not arr.flags.writeable
    ):  # torch.from_numpy warns on read-only arrays; the float copy below never writes back
        arr = arr.copy()
    t = torch.from_numpy(arr)
    return t.movedim(-1, -3).to(torch.float32).div_(255.0)


# --------------------------------------------------------------------------------------------
# Training patches


def _apply_dihedral(img: np.ndarray, transform: int) -> np.ndarray:
    """One of the 8 flips/rotations by 90 degrees of an HxWxC array: bit 0 flips left-right,
    bit 1 flips up-down, bit 2 transposes (with the flips, all of rot90 x flips)."""
    if transform & 1:
        img = img[:, ::-1]
    if transform & 2:
        img = img[::-1]
    if transform & 4:
        img = img.transpose(1, 0, 2)
    return img


def _batch_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """A generator seeded from (seed, rank, step) only, so batch k never depends on batches < k."""
    state = np.random.SeedSequence([int(seed), int(rank), int(step)]).generate_state(1, dtype=np.uint64)[0]
    g = torch.Generator()
    g.manual_seed(int(state))
    return g


class TrainPatches:
    """Training images held in memory as uint8 (HR modcropped, LR precomputed once), from which
    aligned random LR/HR patch pairs are cut: an HR patch of ``patch_size`` pixels at HR offset
    (scale*i, scale*j) pairs with the LR patch of ``patch_size/scale`` pixels at (i, j).

    Memory is about 1 + 1/scale^2 bytes per HR subpixel (DIV2K train at x2: ~8.3 GB)."""

    def __init__(
        self,
        names: Sequence[str],
        hr_images: Sequence[np.ndarray],
        lr_images: Sequence[np.ndarray],
        scale: int,
        patch_size: int,
        sources: Sequence[Path] | None = None,
    ) -> None:
        self.scale = check_scale(scale)
        if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
            raise DataError(f"patch size {patch_size!r} is not a positive integer")
        if patch_size % self.scale:
            raise DataError(
                f"patch size {patch_size} is not a multiple of scale {self.scale} (LR patch = patch size / scale)"
            )
        if not hr_images:
            raise DataError("no training images")
        self.patch_size = int(patch_size)
        self.lr_patch_size = self.patch_size // self.scale
        self.names = list(names)
        self.hr_images = list(hr_images)
        self.lr_images = list(lr_images)
        sources = list(sources) if sources is not None else self.names
        for name, src, hr, lr in zip(self.names, sources, self.hr_images, self.lr_images, strict=True):
            if hr.shape[0] != lr.shape[0] * self.scale or hr.shape[1] != lr.shape[1] * self.scale:
                raise ValueError(f"{name}: HR {hr.shape} is not LR {lr.shape} times {self.scale}")
            if min(hr.shape[:2]) < self.patch_size:
                raise DataError(
                    f"{src}: image is {hr.shape[0]}x{hr.shape[1]} after modcrop, smaller than the "
                    f"{self.patch_size}x{self.patch_size} training patch"
                )

    def __len__(self) -> int:
        return len(self.hr_images)

    def crop(self, index: int, top: int, left: int, transform: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The aligned uint8 (LR, HR) patches of image ``index`` at LR offset (top, left), with
        dihedral ``transform`` 0..7 applied to both."""
        p, s = self.lr_patch_size, self.scale
        lr = self.lr_images[index][top : top + p, left : left + p]
        hr = self.hr_images[index][s * top : s * (top + p), s * left : s * (left + p)]
        return _apply_dihedral(lr, transform), _apply_dihedral(hr, transform)

    def batch(
        self, batch_size: int, seed: int, step: int, rank: int = 0, world: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``step`` of the stream ``seed``: (LR [B,3,p/s,p/s], HR [B,3,p,p]), float32
        in [0, 1]. Each sample: a uniformly chosen image, a uniform LR offset, one of the 8
        flips/rotations uniformly.

        ``batch_size`` is the global batch; with ``world`` > 1 (DDP) rank ``rank`` gets the
        samples [rank·B/world, (rank+1)·B/world) of it, so the ranks together see exactly the
        batch one process would (what a DistributedSampler does for an indexable data set)."""
        if world < 1 or not 0 <= rank < world or batch_size % world:
            raise ValueError(f"batch of {batch_size} cannot be split over rank {rank} of {world}")
        g = _batch_generator(seed, 0, step)
        share = batch_size // world
        lrs, hrs = [], []
        for i in range(batch_size):
            index = int(torch.randint(len(self.lr_images), (1,), generator=g))
            h, w = self.lr_images[index].shape[:2]
            top = int(torch.randint(h - self.lr_patch_size + 1, (1,), generator=g))
            left = int(torch.randint(w - self.lr_patch_size + 1, (1,), generator=g))
            transform = int(torch.randint(8, (1,), generator=g))
            if rank * share <= i < (rank + 1) * share:
                lr, hr = self.crop(index, top, left, transform)
                lrs.append(lr)
                hrs.append(hr)
        return to_tensor(np.stack(lrs)), to_tensor(np.stack(hrs))


class PatchSampler:
    """Endless stream of training batches whose whole state is (seed, step): ``next()`` returns
    ``dataset.batch(batch_size, seed, step, rank, world)`` and advances ``step``. Save
    ``state_dict()`` beside a checkpoint and ``load_state_dict()`` it on resume: batches continue
    exactly as in an uninterrupted run. Under DDP, ``batch_size`` is the global batch and each of
    the ``world`` ranks draws its own share of it."""

    def __init__(
        self,
        dataset: TrainPatches,
        batch_size: int,
        seed: int = 0,
        step: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if seed < 0 or step < 0 or rank < 0:
            raise ValueError(f"seed, step and rank must be >= 0, got {seed}, {step}, {rank}")
        if world < 1 or rank >= world or batch_size % world:
            raise ValueError(f"batch_size {batch_size} must split evenly over {world} ranks (rank {rank})")
        check_batch(batch_size, dataset.patch_size)
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.step = int(step)
        self.rank = int(rank)
        self.world = int(world)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.dataset.batch(self.batch_size, self.seed, self.step, self.rank, self.world)
        self.step += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["batch_size"]) != self.batch_size:
            raise ValueError(
                f"sampler state has batch_size {state['batch_size']}, this run uses {self.batch_size}"
            )
        self.seed = int(state["seed"])
        self.step = int(state["step"])


def train_dataset(spec: str, scale: int, patch_size: int, progress: bool = True) -> TrainPatches:
    """The training images of ``spec`` (train split) loaded into memory with their LR images.

    Checks sizes from the file headers first, so an image smaller than the patch, a bad scale or
    a bad patch size fails before anything is decoded."""
    scale = check_scale(scale)
    if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
        raise DataError(f"patch size {patch_size!r} is not a positive integer")
    if patch_size % scale:
        raise DataError(
            f"patch size {patch_size} is not a multiple of scale {scale} (LR patch = patch size / scale)"
        )
    records = resolve_data(spec, scale, "train")
    for r in records:
        h, w = image_size(r.hr_path)
        if min(h - h % scale, w - w % scale) < patch_size:
            raise DataError(
                f"{r.hr_path}: image is {h}x{w}, smaller than the {patch_size}x{patch_size} training patch"
            )
    hrs, lrs = [], []
    for r in tqdm(records, desc="loading training images", unit="img", file=sys.stderr, disable=not progress):
        hr, lr = load_pair(r, scale)
        hrs.append(hr)
        lrs.append(lr)
    return TrainPatches([r.name for r in records], hrs, lrs, scale, patch_size, [r.hr_path for r in records])


# --------------------------------------------------------------------------------------------
# Evaluation images


class EvalImages(torch.utils.data.Dataset):
    """Whole images for evaluation: item i is {"name", "lr": 3xhxw, "hr": 3xHxW} (float32 in
    [0, 1], HR modcropped, H = scale*h). Decoded on first access and kept (benchmarks are small)."""

    def __init__(self, records: Sequence[ImageRecord], scale: int) -> None:
        self.scale = check_scale(scale)
        if not records:
            raise DataError("no evaluation images")
        self.records = list(records)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.records)

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(HR, LR) uint8 HxWx3 of image ``index``."""
        if index not in self._cache:
            record = self.records[index]
            hr, lr = load_pair(record, self.scale)
            if min(hr.shape[:2]) < 2 * self.scale + _SSIM_WINDOW:
                raise DataError(
                    f"{record.hr_path}: image is {hr.shape[0]}x{hr.shape[1]}, too small to evaluate at x{self.scale} "
                    f"(needs {2 * self.scale + _SSIM_WINDOW} pixels per side: {self.scale}-pixel border + 11x11 SSIM window)"
                )
            self._cache[index] = (hr, lr)
        return self._cache[index]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.records):
            raise IndexError(index)
        hr, lr = self.pair(index)
        return {"name": self.records[index].name, "lr": to_tensor(lr), "hr": to_tensor(hr)}


def eval_dataset(spec: str, scale: int) -> EvalImages:
    """The evaluation images of ``spec`` (the validation split for builtin and DIV2K)."""
    return EvalImages(resolve_data(spec, scale, "eval"), scale)
