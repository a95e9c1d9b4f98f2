"""PSNR/SSIM of a packed model (qnas.deploy runtime) beside the trained network it came from, under the
`qnas eval` protocol (Y channel, scale-pixel border) on the builtin validation images.

    python bench/quality_packed.py RUN m.qnp      # m.qnp from `qnas export RUN --format packed`
"""

import sys

from qnas.api import load_network, network_scale, network_upscaler
from qnas.data import eval_dataset
from qnas.deploy import PackedModel
from qnas.evaluate import evaluate

if __name__ == "__main__":
    run, packed_path = sys.argv[1:3]
    net, blob = load_network(run)
    scale = network_scale(blob["network"])
    ds = eval_dataset("builtin", scale)
    trained = evaluate(network_upscaler(net), ds, scale, progress=False)
    model = PackedModel.load(packed_path)
    packed = evaluate(model, ds, scale, progress=False)
    print(
        f"builtin validation x{scale} (PSNR-Y / SSIM, {len(ds)} images): trained network "
        f"{trained['psnr']:.3f} dB / {trained['ssim']:.4f}; packed runtime {packed['psnr']:.3f} dB / {packed['ssim']:.4f}"
    )
