"""Agreement of `qnas upscale` and onnxruntime on one image (the issue 9 check: >= 40 dB PSNR).

    qnas export RUN --format packed --out m.qnp && qnas export RUN --format onnx --out m.onnx
    qnas upscale --model m.qnp lr.png sr.png
    python bench/agree_upscale_onnx.py lr.png sr.png m.onnx

Runs the ONNX model on the whole LR image with onnxruntime's CPU provider (default optimizations),
rounds its output to 8 bits as `qnas upscale` writes PNGs, and prints the PSNR between the two.
"""

import sys

import numpy as np
import onnxruntime as ort
from PIL import Image

from qnas.deploy.upscale import read_rgb

if __name__ == "__main__":
    lr_png, sr_png, onnx_path = sys.argv[1:4]
    x = read_rgb(lr_png)
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"input": x.numpy()})[0][0]
    ref = np.round(np.clip(y, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0).astype(np.int64)
    with Image.open(sr_png) as im:
        ours = np.asarray(im.convert("RGB")).astype(np.int64)
    mse = float(((ours - ref) ** 2).mean())
    psnr = "inf (identical)" if mse == 0 else f"{10 * np.log10(255**2 / mse):.2f} dB"
    print(
        f"LR {tuple(x.shape[2:])}: qnas upscale PNG vs onnxruntime: {psnr}; "
        f"max |diff| {int(np.abs(ours - ref).max())}/255; pixels differing {np.mean(ours != ref):.4%}"
    )
