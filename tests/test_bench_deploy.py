"""bench/bench_deploy.py on a small edsr-baseline, one round: the JSON report's fields, and every impl computes
what it should (the packed runtime and onnxruntime on the QDQ export agree; the 8-bit impls stay near fp32)."""

import importlib.util
import json
import os

import pytest
import torch

from qnas.errors import QnasError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_deploy", os.path.join(ROOT, "bench", "bench_deploy.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def keep_torch_settings():
    threads, engine = torch.get_num_threads(), torch.backends.quantized.engine
    yield
    torch.set_num_threads(threads)
    torch.backends.quantized.engine = engine


def test_bench_deploy_small_network(tmp_path, keep_torch_settings):
    bench = _bench()
    impls = list(bench.IMPLS)
    if importlib.util.find_spec("onnxruntime.quantization") is None:
        impls.remove("ort-int8")
    out = tmp_path / "deploy.json"
    args = "--sizes 16x24 --scales 2 --threads 1 --rounds 1".split() + ["--impls", ",".join(impls)]
    args += ["--model-kwargs", '{"n_resblocks": 1, "n_feats": 32}', "--json", str(out)]
    bench.main(args)
    report = json.loads(out.read_text())

    assert report["command"].startswith("python bench/bench_deploy.py --sizes 16x24")
    m = report["machine"]
    for key in ("cpu", "logical_cpus", "peak_formula", "int8_peak_gmac_s_per_core_estimate", "loadavg_start"):
        assert key in m
    assert report["ort_session_options"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    (r,) = report["results"]
    assert r["lr_size"] == [16, 24] and r["scale"] == 2 and r["threads"] == 1 and r["macs"] > 0
    assert len(r["loadavg_1_5_15_before"]) == 3
    rows = r["impls"]
    assert list(rows) == impls
    if "x86" not in torch.backends.quantized.supported_engines:
        assert "error" in rows.pop("torch-int8")  # reported in one line, the rest still measured
    for name, row in rows.items():
        assert "error" not in row, (name, row)
        assert 0 < row["min_ms"] <= row["median_ms"] and len(row["rounds_ms"]) == 1
        assert row["cpu_median_ms"] > 0 and row["gmac_s_cpu"] > 0 and row["speedup_vs_packed"] > 0
        assert row["process_cpu_median_ms"] >= row["cpu_median_ms"] * 0.99
    assert rows["packed"]["speedup_vs_packed"] == 1.0
    assert rows["packed-float"]["psnr_vs_packed_db"] is None  # the float pipeline: identical output
    # What onnxruntime made of the QDQ graph: some convs fused into integer QLinearConv.
    assert rows["ort-qdq"]["ort_optimized_graph_ops"].get("QLinearConv", 0) > 0
    # Same 4-bit graph: onnxruntime (all optimizations) computes the packed runtime's numbers.
    p = rows["ort-qdq"]["psnr_vs_packed_db"]
    assert p is None or p >= 40  # None: identical
    # 8-bit versions of the float network: near it, not equal.
    for name in ("ort-int8", "torch-int8"):
        if name in rows:
            assert rows[name]["psnr_vs_fp32_db"] >= 30, (name, rows[name]["psnr_vs_fp32_db"])
    # Cost and peak appear in the table the script prints.
    text = bench.table(report["results"], m["int8_peak_gmac_s_per_core_estimate"])
    assert "| 16x24 | x2 | 1 | packed |" in text


@pytest.mark.parametrize(
    "args, match",
    [
        (["--sizes", "180"], "--sizes"),
        (["--scales", "2,x"], "--scales"),
        (["--impls", "tensorrt"], "--impls"),
        (["--rounds", "0"], "--rounds"),
    ],
)
def test_bench_deploy_bad_arguments(args, match):
    with pytest.raises(QnasError, match=match):
        _bench().main(args)


def test_int8_peak_formula():
    bench = _bench()
    amd = {"flags": {"avx2", "avx512_vnni"}, "mhz": 2600.0, "vendor": "AuthenticAMD", "model": "x"}
    assert bench.int8_peak(amd)[0] == pytest.approx(64 * 2.6)
    intel = dict(amd, vendor="GenuineIntel")
    assert bench.int8_peak(intel)[0] == pytest.approx(128 * 2.6)
    avx2 = dict(amd, flags={"avx2"})
    peak, formula = bench.int8_peak(avx2)
    assert peak == pytest.approx(64 * 2.6) and "vpmaddubsw" in formula
