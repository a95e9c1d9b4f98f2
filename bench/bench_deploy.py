"""Deployment benchmark: one exported network, one input, every way of running it, in one run.

edsr-baseline (Lim et al., CVPRW 2017) with random weights; its 4-bit FQSR version (Wang et al., ACM MM
2021), quantizers calibrated on the input as bench/bench_upscale.py does, is exported once and run by

  packed      qnas.deploy.PackedModel on the packed export: the integer pipeline (activations stay int8/uint8
              codes between layers: requantized_conv2d, quantized_add, requantize);
  packed-float  the same file with PackedModel(..., integer=False): every conv a quantized_conv2d with float
              output, every quantize node a fake_quant (the same output bit for bit);
  ort-qdq     onnxruntime on the QDQ ONNX export of the same graph (qnas.export.onnx.onnx_model), default
              session options: every graph optimization on (ORT_ENABLE_ALL), unlike ort_session(), which
              turns DoubleQDQPairsRemover off for bit-exactness;
  ort-int8    onnxruntime on an 8-bit version of the same architecture: the fp32 network through
              torch.onnx.export (opset 17) and onnxruntime.quantization.quantize_static (QDQ, per-channel
              int8 weights, uint8 activations, MinMax calibration on crops of the input and random images);
  torch-fp32  the float network in torch.inference_mode (channels_last, oneDNN);
  torch-int8  torch.ao.quantization quantize_fx (prepare_fx / convert_fx, get_default_qconfig_mapping("x86"),
              x86 engine), when this torch has it.

Rounds are interleaved (each round calls every impl once, in turn) so that all impls see the same load on a
shared machine; per impl the median and min of N rounds of wall time, and with 1 thread also the calling
thread's CPU time (time.thread_time: excludes the time it was descheduled). Threads are set for torch
(torch.set_num_threads) and onnxruntime (intra_op_num_threads, inter_op_num_threads = 1) alike. MACs come
from qnas.cost.count_cost of the fp32 network; the int8 peak is an estimate from the CPU flags and clock
(int8_peak). With 1 thread the table's GMAC/s, % of peak and ratios use the CPU time; with more, wall time.
Every impl's output is compared with the packed runtime's and the fp32 network's (PSNR), and the op counts
of the graphs onnxruntime runs after its optimizations are printed (which convs became QLinearConv).

    python bench/bench_deploy.py [--sizes 180x320,360x640] [--scales 2,4] [--threads 1,2] [--bits 4]
                                 [--rounds N] [--json OUT] [--impls packed,ort-qdq,...]
    python bench/bench_deploy.py --from-json OUT      # the table of a saved report

docs/PERFORMANCE.md ("Deployment") has a measured table and how to read it.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import torch

import qops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_upscale import RETAINED, networks  # noqa: E402

from qnas.cost import count_cost  # noqa: E402
from qnas.errors import QnasError  # noqa: E402
from qnas.export import agreement_psnr  # noqa: E402
from qnas.export.onnx import OPSET, onnx_model, require_export_extra  # noqa: E402

IMPLS = ("packed", "packed-float", "ort-qdq", "ort-int8", "torch-fp32", "torch-int8")
DESCRIPTION = {
    "packed": "packed w{bits}a{bits} runtime (qnas.deploy), integer pipeline (codes between layers)",
    "packed-float": "packed w{bits}a{bits} runtime, float pipeline (float32 between layers)",
    "ort-qdq": "onnxruntime, QDQ export of the same {bits}-bit network (ORT_ENABLE_ALL)",
    "ort-int8": "onnxruntime int8 quantize_static (QDQ, per-channel w, u8 act), fp32 net",
    "torch-fp32": "torch fp32 (oneDNN, channels_last, inference_mode)",
    "torch-int8": "torch int8 quantize_fx, x86 engine",
}


def _pair(text: str, what: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise QnasError(f"{what}: {text!r} is not HxW (e.g. 180x320)") from None
    if h < 8 or w < 8:
        raise QnasError(f"{what}: {text!r} is smaller than 8x8")
    return h, w


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise QnasError(f"{what}: {text!r} is not a comma-separated list of integers") from None
    if any(v < 1 for v in values):
        raise QnasError(f"{what}: {text!r} has a value below 1")
    return values


def cpu_info() -> dict:
    """Model name, vendor, family, flags and a nominal clock (MHz) from /proc/cpuinfo (Linux)."""
    info = {"model": platform.processor() or platform.machine(), "vendor": "", "flags": set(), "mhz": None}
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return info
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = (s.strip() for s in line.partition(":"))
        if key == "model name":
            info["model"] = value
        elif key == "vendor_id":
            info["vendor"] = value
        elif key == "flags":
            info["flags"] = set(value.split())
        elif key == "cpu MHz":
            info["mhz"] = float(value)
    if "@" in info["model"] and info["model"].endswith("GHz"):  # Intel names carry the base clock
        info["mhz"] = float(info["model"].rsplit("@", 1)[1][:-3]) * 1000
    return info


def int8_peak(cpu: dict) -> tuple[float | None, str]:
    """(estimated int8 GMAC/s per core, the formula): MACs per instruction x instructions per cycle x clock.

    AVX-512 VNNI: vpdpbusd on zmm = 16 int32 lanes x 4 u8*s8 = 64 MACs; 2 per cycle on Intel cores with two
    512-bit FMA ports, 1 per cycle on AMD Zen 4 (512-bit ops in two 256-bit halves; 2 ymm vpdpbusd per
    cycle is the same 64 MACs). AVX-VNNI (ymm): 32 MACs x 2. AVX2 without VNNI: vpmaddubsw = 32 u8*s8
    products into int16 pairs, 2 per cycle (the vpmaddwd / vpaddd that widen them share the ports, so this
    is an upper bound). An estimate: the nominal clock (turbo and throttling ignored), no memory limits.
    """
    flags, mhz = cpu["flags"], cpu["mhz"]
    if not mhz:
        return None, "unknown clock"
    if "avx512_vnni" in flags:
        per_cycle = 1 if cpu["vendor"] == "AuthenticAMD" else 2
        macs, how = 64 * per_cycle, f"AVX-512 VNNI: 64 MACs per vpdpbusd zmm x {per_cycle}/cycle"
    elif "avx_vnni" in flags:
        macs, how = 64, "AVX-VNNI: 32 MACs per vpdpbusd ymm x 2/cycle"
    elif "avx2" in flags:
        macs, how = 64, "AVX2 without VNNI: 32 MACs per vpmaddubsw ymm x 2/cycle"
    else:
        return None, "no AVX2: no estimate"
    return macs * mhz / 1e3, f"{how} x {mhz / 1e3:.2f} GHz nominal = {macs * mhz / 1e3:.0f} GMAC/s per core"


# --- the implementations: each builder returns threads -> a callable returning the output -----------------


def _ort_options(threads: int):
    ort = require_export_extra("onnxruntime")
    so = ort.SessionOptions()  # graph_optimization_level ORT_ENABLE_ALL by default
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return so


def ort_optimized_ops(model_bytes: bytes, tmp: str) -> dict[str, int]:
    """Op counts of the graph onnxruntime runs after its optimizations (what got fused into integer
    kernels such as QLinearConv, and what stayed float)."""
    import onnx

    ort = require_export_extra("onnxruntime")
    so = _ort_options(1)
    so.log_severity_level = 3  # the note that an NCHWc-optimized file is hardware specific
    so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
    ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    ops: dict[str, int] = {}
    for node in onnx.load(so.optimized_model_filepath).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return dict(sorted(ops.items(), key=lambda kv: -kv[1]))


def _ort_runner(model_bytes: bytes, x: torch.Tensor) -> Callable[[int], Callable[[], torch.Tensor]]:
    ort = require_export_extra("onnxruntime")
    feed = {"input": x.numpy()}

    def make(threads: int):
        sess = ort.InferenceSession(model_bytes, _ort_options(threads), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        feed_ = {name: feed["input"]}
        return lambda: torch.from_numpy(sess.run(None, feed_)[0])

    return make


def calibration_images(x: torch.Tensor, n: int = 4, crop: int = 64) -> list[torch.Tensor]:
    """Crops of the input and random images, small so that calibration (which keeps every intermediate
    tensor of every batch) stays cheap."""
    gen = torch.Generator().manual_seed(1)
    h, w = x.shape[2:]
    ch, cw = min(crop, h), min(crop, w)
    out = [x[:, :, :ch, :cw].contiguous(), x[:, :, h - ch :, w - cw :].contiguous()]
    out += [torch.rand(1, 3, ch, cw, generator=gen) for _ in range(n - len(out))]
    return out


def float_onnx(fp32: torch.nn.Module, x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    kwargs = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            fp32, (x,), buf, opset_version=OPSET, input_names=["input"], output_names=["output"],
            dynamic_axes={"input": {2: "H", 3: "W"}, "output": {2: "H_out", 3: "W_out"}}, **kwargs,
        )  # fmt: skip
    return buf.getvalue()


def ort_int8(fp32: torch.nn.Module, x: torch.Tensor, calib: list[torch.Tensor], tmp: str) -> bytes:
    require_export_extra("onnxruntime")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": c.numpy()} for c in calib])

        def get_next(self):
            return next(self.it, None)

    src, dst = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
    with open(src, "wb") as f:
        f.write(float_onnx(fp32, x))
    logging.getLogger().setLevel(logging.ERROR)  # "consider pre-processing" advice
    quantize_static(
        src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
    return open(dst, "rb").read()


def torch_int8(fp32: torch.nn.Module, calib: list[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if "x86" not in torch.backends.quantized.supported_engines:
        raise RuntimeError(
            f"no x86 quantized engine (this torch has {torch.backends.quantized.supported_engines})"
        )
    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
        prepared = prepare_fx(copy.deepcopy(fp32).eval(), get_default_qconfig_mapping("x86"), (calib[0],))
        with torch.inference_mode():
            for c in calib:
                prepared(c)
        q = convert_fx(prepared)
    return q


# --- one configuration -------------------------------------------------------------------------------------


def run_config(h, w, scale, thread_list, bits, rounds, impls, tmp, model_kwargs, log=print) -> list[dict]:
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    x, fp32, packed = networks(scale, x, bits, **model_kwargs)
    macs = count_cost(fp32, (h, w)).macs
    calib = calibration_images(x)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    makers: dict[str, Callable[[int], Callable[[], torch.Tensor]]] = {}
    errors: dict[str, str] = {}
    graph_ops: dict[str, dict[str, int]] = {}

    def ort_impl(name: str, model_bytes: bytes):
        graph_ops[name] = ort_optimized_ops(model_bytes, tmp)
        return _ort_runner(model_bytes, x)

    builders = {
        "packed": lambda: lambda n: lambda: packed(x),
        "packed-float": lambda: _packed_float_maker(packed, x),
        "ort-qdq": lambda: ort_impl("ort-qdq", onnx_model(packed.graph, packed.tensors).SerializeToString()),
        "ort-int8": lambda: ort_impl("ort-int8", ort_int8(fp32, x, calib, tmp)),
        "torch-fp32": lambda: _fp32_maker(fp32, x_cl),
        "torch-int8": lambda: _int8_maker(torch_int8(fp32, calib), x_cl),
    }
    for name in impls:
        try:
            makers[name] = builders[name]()
        except Exception as e:  # a missing module or an unsupported op: one line, and go on
            errors[name] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
            log(f"  {name}: not measured ({errors[name]})")
    results = []
    for threads in thread_list:
        torch.set_num_threads(threads)
        calls: dict[str, Callable[[], torch.Tensor]] = {}
        for name, make in makers.items():
            try:
                calls[name] = make(threads)
            except Exception as e:
                errors[name] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        outputs = {}
        with torch.inference_mode():
            for name, f in list(calls.items()):
                try:
                    outputs[name] = f().float()
                    f()  # second warm-up
                except Exception as e:
                    errors[name] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
                    log(f"  {name}: failed to run ({errors[name]})")
                    del calls[name]
            load = os.getloadavg()
            wall = {k: [] for k in calls}
            cpu = {k: [] for k in calls}
            proc = {k: [] for k in calls}
            for _ in range(rounds):
                for name, f in calls.items():
                    p0, c0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
                    f()
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.thread_time() - c0)
                    proc[name].append(time.process_time() - p0)
        ref = outputs.get("packed")
        fp = outputs.get("torch-fp32")
        rows = {}
        for name in impls:
            if name not in calls:
                rows[name] = {"description": DESCRIPTION[name].format(bits=bits), "error": errors.get(name)}
                continue
            med, best = statistics.median(wall[name]), min(wall[name])
            row = {
                "description": DESCRIPTION[name].format(bits=bits),
                "median_ms": med * 1e3,
                "min_ms": best * 1e3,
                "rounds_ms": [t * 1e3 for t in wall[name]],
                "gmac_s_median": macs / med / 1e9,
                "gmac_s_min": macs / best / 1e9,
                "psnr_vs_packed_db": _psnr(outputs[name], ref),
                "psnr_vs_fp32_db": _psnr(outputs[name], fp),
            }
            if threads == 1:  # the calling thread does all the work: its CPU time excludes descheduling
                row["cpu_median_ms"] = statistics.median(cpu[name]) * 1e3
                row["gmac_s_cpu"] = macs / statistics.median(cpu[name]) / 1e9
                # All threads of the process: equal to cpu_median_ms when no helper thread does work.
                row["process_cpu_median_ms"] = statistics.median(proc[name]) * 1e3
            if "packed" in calls:
                row["speedup_vs_packed"] = statistics.median(wall["packed"]) / med
            if name in graph_ops:
                row["ort_optimized_graph_ops"] = graph_ops[name]
            rows[name] = row
        results.append(
            {
                "lr_size": [h, w], "scale": scale, "threads": threads, "bits": bits, "macs": macs,
                "rounds": rounds, "loadavg_1_5_15_before": list(load), "loadavg_1_5_15_after": list(os.getloadavg()),
                "impls": rows,
            }
        )  # fmt: skip
    return results


def _packed_float_maker(packed, x):
    from qnas.deploy import PackedModel

    model = PackedModel(packed.graph, packed.tensors, integer=False)
    return lambda threads: lambda: model(x)


def _fp32_maker(fp32, x_cl):
    net = fp32.to(memory_format=torch.channels_last)

    def make(threads):
        def run():
            with torch.inference_mode():
                return net(x_cl).clamp(0, 1)  # the exported networks clamp to the image range too

        return run

    return make


def _int8_maker(q, x_cl):
    def make(threads):
        def run():
            with torch.inference_mode():
                return q(x_cl).clamp(0, 1)

        return run

    return make


def _psnr(a: torch.Tensor, b: torch.Tensor | None) -> float | None:
    if b is None or a.shape != b.shape:
        return None
    p = agreement_psnr(a.clamp(0, 1), b.clamp(0, 1))
    return None if p == float("inf") else p  # JSON has no infinity: null with "identical" in the table


# --- the report -------------------------------------------------------------------------------------------


TABLE_NOTE = (
    "With 1 thread, GMAC/s, % of the estimated int8 peak and the ratio to the packed runtime come from the\n"
    "median CPU time of the calling thread (robust to other jobs' load); with more threads from wall time\n"
    "(GMAC/s and % peak: the fastest round; ratio: medians). 'packed / it' > 1: faster than the packed runtime."
)


def table(results: list[dict], peak_core: float | None) -> str:
    """The markdown table of run_config results (also of a saved report: --from-json)."""
    lines = [
        "| LR | scale | threads | impl | median ms | min ms | CPU ms | GMAC/s | % int8 peak (est.) | "
        "packed / it | PSNR vs packed | PSNR vs fp32 |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ref = r["impls"].get("packed", {})
        for name, row in r["impls"].items():
            head = f"| {r['lr_size'][0]}x{r['lr_size'][1]} | x{r['scale']} | {r['threads']} | {name} |"
            if "error" in row:
                lines.append(head + f" not measured: {row['error']} | | | | | | | |")
                continue
            if "cpu_median_ms" in row:
                gmacs = r["macs"] / row["cpu_median_ms"] / 1e6
                cpu = f"{row['cpu_median_ms']:.0f}"
                ratio = ref.get("cpu_median_ms", float("nan")) / row["cpu_median_ms"]
            else:
                gmacs, cpu = r["macs"] / row["min_ms"] / 1e6, ""
                ratio = ref.get("median_ms", float("nan")) / row["median_ms"]
            peak = f"{gmacs / (peak_core * r['threads']):.0%}" if peak_core else ""
            lines.append(
                head
                + f" {row['median_ms']:.0f} | {row['min_ms']:.0f} | {cpu} | {gmacs:.0f} | {peak} | {ratio:.2f}x |"
                f" {_db(row['psnr_vs_packed_db'], name, 'packed')} |"
                f" {_db(row['psnr_vs_fp32_db'], name, 'torch-fp32')} |"
            )
    return "\n".join(lines)


def _db(v, name, ref):
    if name == ref:
        return "-"
    return "identical" if v is None else f"{v:.1f} dB"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="180x320", help="LR sizes HxW, comma-separated")
    ap.add_argument("--scales", default="2,4")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--bits", type=int, default=4, help="bits of the FQSR network (packed, ort-qdq)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--model-kwargs", default="{}", help="JSON overrides of the edsr-baseline preset")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--from-json", help="print the table of a saved report instead of measuring")
    args = ap.parse_args(argv)
    if args.from_json:
        try:
            report = json.load(open(args.from_json))
            peak = report["machine"]["int8_peak_gmac_s_per_core_estimate"]
            print(
                f"{report['command']}\n{report['started']}, {report['machine']['cpu']}; {report['machine']['peak_formula']}"
            )
            print(table(report["results"], peak) + "\n" + TABLE_NOTE)
        except (OSError, ValueError, KeyError) as e:
            raise QnasError(f"--from-json {args.from_json}: not a report of this script ({e})") from None
        return report
    sizes = [_pair(s, "--sizes") for s in args.sizes.split(",")]
    scales, thread_list = _ints(args.scales, "--scales"), _ints(args.threads, "--threads")
    impls = args.impls.split(",")
    if unknown := [i for i in impls if i not in IMPLS]:
        raise QnasError(f"--impls: unknown {unknown}; known: {', '.join(IMPLS)}")
    if not 1 <= args.bits <= 8:
        raise QnasError(f"--bits {args.bits} must be in 1..8")
    if args.rounds < 1:
        raise QnasError(f"--rounds {args.rounds} must be at least 1")
    model_kwargs = json.loads(args.model_kwargs)

    cpu = cpu_info()
    peak_core, formula = int8_peak(cpu)
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load0 = os.getloadavg()
    print(
        f"{cpu['model']} ({cpu['vendor']}), {os.cpu_count()} logical CPUs, "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
    )
    print(f"int8 peak (estimate): {formula}")
    print(f"{started}; load average at start {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f} (1/5/15 min)")
    print(
        "onnxruntime sessions: CPUExecutionProvider, graph_optimization_level ORT_ENABLE_ALL (default), "
        "intra_op_num_threads = threads, inter_op_num_threads = 1, sequential execution"
    )
    print(
        f"glibc keeps freed memory (qnas.deploy.runtime.retain_freed_memory): {RETAINED}; {args.rounds} interleaved rounds"
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for h, w in sizes:
            for scale in scales:
                print(f"edsr-baseline x{scale}, LR {h}x{w}: building, exporting, calibrating ...", flush=True)
                rs = run_config(h, w, scale, thread_list, args.bits, args.rounds, impls, tmp, model_kwargs)
                print(table(rs, peak_core) + "\n" + TABLE_NOTE, flush=True)
                for name, row in rs[0]["impls"].items():
                    if "ort_optimized_graph_ops" in row:
                        ops = ", ".join(f"{k} {v}" for k, v in row["ort_optimized_graph_ops"].items())
                        print(f"  {name}, graph after onnxruntime's optimizations: {ops}")
                results.extend(rs)
    load1 = os.getloadavg()
    report = {
        "started": started,
        "command": "python bench/bench_deploy.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {
            "cpu": cpu["model"], "vendor": cpu["vendor"], "logical_cpus": os.cpu_count(),
            "nominal_mhz": cpu["mhz"], "int8_peak_gmac_s_per_core_estimate": peak_core, "peak_formula": formula,
            "vnni": "avx512_vnni" in cpu["flags"] or "avx_vnni" in cpu["flags"], "avx2": "avx2" in cpu["flags"],
            "loadavg_start": list(load0), "loadavg_end": list(load1),
            "qops_cpu_features": qops.cpu_features(),  # which kernel variants (VNNI, ...) run
        },
        "versions": versions,
        "network": {"name": "edsr-baseline", "kwargs": model_kwargs, "weights": "random (seed 0)",
                    "fqsr_bits": args.bits, "calibration": "FQSR quantizers: the input; int8: 2 crops + 2 random 64x64"},
        "ort_session_options": {"graph_optimization_level": "ORT_ENABLE_ALL", "intra_op_num_threads": "threads",
                                "inter_op_num_threads": 1, "provider": "CPUExecutionProvider"},
        "timing": "interleaved rounds after 2 warm-up calls; wall time (perf_counter); with 1 thread also the "
                  "calling thread's CPU time (cpu_median_ms, gmac_s_cpu); speedup_vs_packed: wall medians",
        "freed_memory_retained": RETAINED,
        "results": results,
    }  # fmt: skip
    print(f"load average at end {load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    try:
        main()
    except QnasError as e:
        sys.exit(f"error: {e}")
