"""Interleaved A/B timing of packed_conv2d against torch's int8 conv (64->64 3x3, pad 1, 1x64xHxH).

On a shared machine the medians of bench_packed_conv.py move with other people's load, because each case
runs its rounds back to back. Here every round calls every implementation once, in turn, so all of them see
the same load; with ``--threads 1`` the time is the calling thread's CPU time, which excludes the time the
thread was descheduled. Usage:

    python bench/ab_packed_conv.py --size 160 --bits 8x8 4x4 2x2 1x1 [--threads 1]

``--bits WxA`` runs the automatic path, ``WxAxPATH`` forces one (QOPS_PACKED_PATH).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch

from qops.packed import pack_weight, packed_conv2d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--bits", nargs="+", default=["8x8", "4x4", "2x2", "1x1"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="0: torch's default; 1: single thread, CPU time")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    h = args.size
    ops = 2 * 64 * 64 * 9 * h * h
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 64, h, h, generator=gen) * 2
    w = torch.randn(64, 64, 3, 3, generator=gen) * 0.1
    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.quantize_per_tensor is deprecated but is the int8 path
        qx = torch.quantize_per_tensor(
            x.contiguous(memory_format=torch.channels_last), 2 / 255, 0, torch.quint8
        )
        qw = torch.quantize_per_tensor(w, float(w.abs().max()) / 127, 0, torch.qint8)
        prepacked = torch.ops.quantized.conv2d_prepack(qw, None, [1, 1], [1, 1], [1, 1], 1)
    impls = {"torch int8 (x86)": lambda: torch.ops.quantized.conv2d(qx, prepacked, 0.1, 0)}
    for spec in args.bits:
        parts = spec.split("x")
        wb, ab = int(parts[0]), int(parts[1])
        path = parts[2] if len(parts) > 2 else "auto"
        lo, hi = (-1, 1) if wb == 1 else (-(2 ** (wb - 1)), 2 ** (wb - 1) - 1)
        codes = torch.randint(lo, hi + 1, (64, 64, 3, 3), generator=gen, dtype=torch.int16).to(torch.int8)
        if wb == 1:
            codes = torch.where(codes == 0, 1, codes).to(torch.int8)
        wp = pack_weight(codes, wb)
        xc = torch.randint(0, 2**ab, (1, 64, h, h), generator=gen, dtype=torch.int16).to(torch.uint8)

        def run(xc=xc, wp=wp, wb=wb, ab=ab, path=path):
            os.environ["QOPS_PACKED_PATH"] = path
            return packed_conv2d(xc, wp, (64, 64, 3, 3), wb, ab, False, 1, 1)

        impls[f"ours w{wb}a{ab} {path} ({wp.numel()} B weights)"] = run
    times = {k: [] for k in impls}
    for f in impls.values():
        f()
        f()
    for _ in range(args.rounds):
        for k, f in impls.items():
            t0 = clock()
            f()
            times[k].append(clock() - t0)
    base = statistics.median(times["torch int8 (x86)"])
    kind = (
        "thread CPU time, 1 thread" if args.threads == 1 else f"wall time, {torch.get_num_threads()} threads"
    )
    print(f"1x64x{h}x{h}, 64->64 3x3, {args.rounds} interleaved rounds, medians of {kind}")
    print("| impl | ms | GOP/s | vs torch int8 |")
    print("|---|---:|---:|---:|")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"| {k} | {m * 1e3:.2f} | {ops / m / 1e9:.0f} | {base / m:.2f}x |")


if __name__ == "__main__":
    main()
