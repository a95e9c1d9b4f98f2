"""`qnas upscale`'s network: edsr-baseline x2 (Lim et al., CVPRW 2017) in fp32 torch (baseline) vs the
same architecture fully quantized at 4 bits (FQSR, Wang et al. 2021) and run by the packed runtime
(qnas.deploy: torch.ops.qops.quantized_conv2d per conv), on one 1x3x160x160 image -> 320x320.

Weights are random (speed does not depend on their values); the FQSR quantizers are calibrated on the
input. QNAS_BENCH_PACKED=FILE times a packed file of `qnas export` instead. GOP/s count 2 ops per MAC
of the convolutions.

    python -m pytest bench/bench_upscale.py --benchmark-only \
        --benchmark-json=build/b.json -q && python bench/report.py build/b.json

`python bench/bench_upscale.py` prints where the packed runtime's time goes, per op type. Both impls
run with glibc keeping freed memory (qnas.deploy.runtime.retain_freed_memory, as `qnas upscale`);
QNAS_BENCH_MALLOC=default keeps glibc's defaults.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict

import pytest
import torch

from qnas.deploy import PackedModel
from qnas.deploy.runtime import retain_freed_memory
from qnas.export import packed_graph
from qnas.quant.apply import quantize_network
from qnas.sr import build_model, model_config

SIZE = 160
# As `qnas upscale` does; process-wide, so the fp32 baseline gets the same allocator behaviour.
RETAINED = os.environ.get("QNAS_BENCH_MALLOC", "retain") == "retain" and retain_freed_memory()


def networks(
    scale: int = 2, x: torch.Tensor | None = None, bits: int = 4, **kwargs
) -> tuple[torch.Tensor, torch.nn.Module, PackedModel]:
    """(input, fp32 edsr-baseline, its FQSR `bits`-bit version as a PackedModel) with random weights;
    the FQSR quantizers are calibrated on `x` (default: a random 1x3xSIZExSIZE image). kwargs override
    the edsr-baseline preset (bench/bench_deploy.py's smoke test builds a small one)."""
    torch.manual_seed(0)
    if x is None:
        x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    fp32 = build_model("edsr-baseline", scale, **kwargs).eval()
    path = os.environ.get("QNAS_BENCH_PACKED")
    if path:
        return x, fp32, PackedModel.load(path)
    fq = build_model("edsr-baseline", scale, **kwargs)
    fq.load_state_dict(fp32.state_dict())
    quantize_network(fq, {"scheme": "fqsr", "bits": bits, "warmup": 0})
    fq.eval()
    with torch.no_grad():
        fq(x)  # initialises every quantizer from this image
    graph, tensors = packed_graph(fq, scale, model_config(fp32))
    return x, fp32, PackedModel(graph, tensors)


def _networks():
    return networks()


def conv_ops(model: PackedModel, h: int, w: int) -> int:
    """2 x the MACs of every conv of the graph for an h x w input."""
    res = {model.graph["input"]["name"]: 1}
    ops = 0
    for node in model.graph["nodes"]:
        f = max(res[v] for v in node["inputs"])
        if node["op"] == "pixel_shuffle":
            f *= node["factor"]
        if node["op"] == "conv":
            co, ci, kh, kw = node["w_shape"]
            ops += 2 * co * ci * kh * kw * (h * f) * (w * f)
        res[node["output"]] = f
    return ops


@pytest.fixture(scope="module")
def nets():
    return _networks()


def test_upscale_edsr_baseline(bench, nets):
    x, fp32, packed = nets
    ops = conv_ops(packed, SIZE, SIZE)
    group = f"edsr-baseline x2 1x3x{SIZE}x{SIZE}"
    fp32_cl = fp32.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def run_fp32():
        with torch.inference_mode():
            return fp32_cl(x_cl)

    bench(
        run_fp32,
        group=group,
        impl="torch fp32 (oneDNN, channels_last)",
        baseline=True,
        ops=ops,
        malloc=RETAINED,
    )


def test_upscale_packed_4bit(bench, nets):
    x, _, packed = nets
    ops = conv_ops(packed, SIZE, SIZE)
    group = f"edsr-baseline x2 1x3x{SIZE}x{SIZE}"
    bench(
        lambda: packed(x),
        group=group,
        impl="packed w4a4 runtime (qops quantized_conv2d)",
        ops=ops,
        malloc=RETAINED,
    )


def test_upscale_onnxruntime_qdq(bench, nets):
    """onnxruntime on the QDQ export of the same 4-bit network, default session (every graph optimization;
    bench/bench_deploy.py compares more runtimes, interleaved)."""
    ort = pytest.importorskip("onnxruntime")
    from qnas.export.onnx import onnx_model

    x, _, packed = nets
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(
        onnx_model(packed.graph, packed.tensors).SerializeToString(), so, providers=["CPUExecutionProvider"]
    )
    feed = {"input": x.numpy()}
    bench(
        lambda: sess.run(None, feed),
        group=f"edsr-baseline x2 1x3x{SIZE}x{SIZE}",
        impl="onnxruntime, QDQ export of the same w4a4 network (ORT_ENABLE_ALL)",
        ops=conv_ops(packed, SIZE, SIZE),
        malloc=RETAINED,
    )


def profile(model: PackedModel, x: torch.Tensor, rounds: int = 5) -> dict[str, float]:
    """Median seconds per op type of one forward pass (each node timed on its own; ReLUs that the next
    conv's quantization already does are skipped, as in PackedModel.__call__)."""
    per_round = []
    for _ in range(rounds):
        values = {model.graph["input"]["name"]: x.clone()}
        acc: dict[str, float] = defaultdict(float)
        with torch.inference_mode():
            for i, node in enumerate(model.graph["nodes"]):
                ins = [values[v] for v in node["inputs"]]
                if model._skip[i]:
                    values[node["output"]] = ins[0]
                    continue
                t0 = time.perf_counter()
                values[node["output"]] = model._steps[i](ins)
                acc[_key(node)] += time.perf_counter() - t0
        per_round.append(acc)
    return {k: sorted(r[k] for r in per_round)[rounds // 2] for k in per_round[0]}


def _key(node: dict) -> str:
    if node["op"] == "conv":
        return f"conv w{node['w_bits']}a{node['a_bits']} {node['w_shape'][1]}->{node['w_shape'][0]}"
    return node["op"]


if __name__ == "__main__":
    x, fp32, packed = _networks()
    prof = profile(packed, x)
    total = sum(prof.values())
    counts = defaultdict(int)
    for node, skip in zip(packed.graph["nodes"], packed._skip, strict=True):
        counts[_key(node)] += not skip
    print(
        f"packed runtime, 1x3x{SIZE}x{SIZE}, {torch.get_num_threads()} threads, freed memory retained: {RETAINED}: {total * 1e3:.1f} ms"
    )
    for k, v in sorted(prof.items(), key=lambda kv: -kv[1]):
        print(f"  {k:28s} x{counts[k]:<3d} {v * 1e3:8.2f} ms  {v / total:6.1%}")
