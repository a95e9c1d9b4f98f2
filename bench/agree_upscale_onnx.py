"""Agreement of `qnas upscale` and onnxruntime on one image.

    qnas export RUN --format packed --out m.qnp && qnas export RUN --format onnx --out m.onnx
    qnas upscale --model m.qnp lr.png sr.png
    python bench/agree_upscale_onnx.py lr.png sr.png m.onnx

Runs the ONNX model on the whole LR image with onnxruntime's CPU provider, once exactly (basic optimization
level, the optimizers that change QDQ numbers off: qnas.export.onnx.ort_session) and once with all its default
optimizations, rounds each output to 8 bits as `qnas upscale` writes PNGs, and prints the PSNR against
the PNG for both.
"""

import sys

import numpy as np
from PIL import Image

from qnas.deploy.upscale import read_rgb
from qnas.export.onnx import ort_session

if __name__ == "__main__":
    lr_png, sr_png, onnx_path = sys.argv[1:4]
    x = read_rgb(lr_png)
    with Image.open(sr_png) as im:
        ours = np.asarray(im.convert("RGB")).astype(np.int64)
    for exact, what in ((True, "exact"), (False, "default optimizations")):
        y = ort_session(onnx_path, exact).run(None, {"input": x.numpy()})[0][0]
        ref = np.round(np.clip(y, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0).astype(np.int64)
        mse = float(((ours - ref) ** 2).mean())
        psnr = "inf (identical)" if mse == 0 else f"{10 * np.log10(255**2 / mse):.2f} dB"
        print(
            f"LR {tuple(x.shape[2:])}: qnas upscale PNG vs onnxruntime ({what}): {psnr}; "
            f"max |diff| {int(np.abs(ours - ref).max())}/255; pixels differing {np.mean(ours != ref):.4%}"
        )
