"""Splits a folder of training images into a training part and a held-out part, deterministically.

    python scripts/split_images.py SRC OUT [--every 5] [--lr-scales 4]

Images are taken in sorted file-name order; every `--every`-th one (the 5th, 10th, ...) goes to
OUT/heldout, the others to OUT/train. Each part is a folder in the `--data` layout with HR/LR
(docs/data.md): HR/ holds symbolic links to the source files, LR_bicubic/X{s}/ the LR images made
once with the project's MATLAB-compatible bicubic (what `--data` would compute at every start
otherwise). Search and retrain on OUT/train, choose every setting on OUT/heldout; keep the test
sets for the end. Re-running with the same arguments changes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))


def split(src: Path, out: Path, every: int, lr_scales: list[int]) -> dict[str, list[str]]:
    from qnas.data.images import list_images, load_image, save_image
    from qnas.data.imresize import imresize, modcrop

    files = sorted(list_images(src), key=lambda p: p.name)
    if not files:
        raise SystemExit(f"{src}: no images")
    parts: dict[str, list[str]] = {"train": [], "heldout": []}
    for k, path in enumerate(files, start=1):
        part = "heldout" if k % every == 0 else "train"
        parts[part].append(path.name)
        hr_dir = out / part / "HR"
        hr_dir.mkdir(parents=True, exist_ok=True)
        link = hr_dir / path.name
        if not link.is_symlink():
            link.symlink_to(path.resolve())
        for s in lr_scales:
            lr_path = out / part / "LR_bicubic" / f"X{s}" / f"{path.stem}x{s}.png"
            if not lr_path.exists():
                lr_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = lr_path.with_name(f".{lr_path.name}.tmp.png")
                save_image(tmp, imresize(modcrop(load_image(path), s), 1.0 / s))
                os.replace(tmp, lr_path)
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="folder of images")
    ap.add_argument("out", type=Path, help="folder to write train/ and heldout/ into")
    ap.add_argument("--every", type=int, default=5, help="every N-th image is held out (default 5)")
    ap.add_argument("--lr-scales", default="4", help="scales to precompute LR images for, e.g. 2,4 ('' none)")
    args = ap.parse_args()
    if args.every < 2:
        raise SystemExit("--every: must be at least 2")
    scales = [int(s) for s in args.lr_scales.split(",") if s.strip()]
    parts = split(args.src, args.out, args.every, scales)
    print(f"{args.out}: {len(parts['train'])} training images, {len(parts['heldout'])} held out")


if __name__ == "__main__":
    main()
