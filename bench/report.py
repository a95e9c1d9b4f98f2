"""Prints the table of a `make bench` run: per group, each implementation's median time, its GB/s or
GOP/s and its speedup over the group's baseline. Usage: python bench/report.py build/bench.json"""

import json
import platform
import sys
from collections import defaultdict


def main(path: str) -> None:
    data = json.load(open(path))
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    mi = data.get("machine_info", {})
    cpu = mi.get("cpu", {}).get("brand_raw", platform.processor())
    print(
        f"\nmachine: {cpu}, {mi.get('cpu', {}).get('count', '?')} cores, python {mi.get('python_version', '?')}"
    )
    # Suites that measure memory put peak_mb in extra_info; the column shows only then.
    mem = any("peak_mb" in b["extra_info"] for b in data["benchmarks"])
    print("| group | impl | median ms | GB/s | GOP/s | speedup vs baseline |" + (" peak MB |" if mem else ""))
    print("|---|---|---:|---:|---:|---:|" + ("---:|" if mem else ""))
    for group in sorted(groups):
        rows = groups[group]
        base = [r for r in rows if r["extra_info"].get("baseline")]
        base_t = base[0]["stats"]["median"] if base else None
        for r in sorted(rows, key=lambda r: (not r["extra_info"].get("baseline"), r["stats"]["median"])):
            t = r["stats"]["median"]
            info = r["extra_info"]
            gbs = f"{info['bytes'] / t / 1e9:.2f}" if info.get("bytes") else ""
            gops = f"{info['ops'] / t / 1e9:.1f}" if info.get("ops") else ""
            speed = f"{base_t / t:.2f}x" if base_t else ""
            peak = (
                f" {info['peak_mb']} |" if mem and info.get("peak_mb") is not None else (" |" if mem else "")
            )
            print(
                f"| {group} | {info.get('impl', r['name'])} | {t * 1e3:.3f} | {gbs} | {gops} | {speed} |"
                + peak
            )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "build/bench.json")
