"""`make gpu-check`: everything this project can check on a CUDA machine, in one command that needs no
.venv and no package index, with a report that survives any step failing.

    python3 scripts/gpu_check.py [--wheels DIR] [--report-dir DIR] [--deadline S] [--only STEP,...]
    python3 scripts/gpu_check.py --dry-run [--report-dir DIR]   # no GPU needed: checks this script
    python3 scripts/gpu_check.py --download-wheels DIR          # `make gpu-wheels`, where PyPI is reachable

Steps, each with its own timeout and all inside one deadline (default 8 minutes), in this order:

  environment      device, driver, CUDA, torch, Triton, nvcc (a subprocess: a broken torch is a result)
  wheels           requirements the interpreter lacks, from the wheel folder (pip --no-index --prefix;
                   what is already installed is kept)
  build            qops._C in place with CUDA for this GPU only (QOPS_CUDA_ARCH, MAX_JOBS = all cores)
  tests-cuda       the CUDA tests (pytest -k cuda)
  tests-triton     the Triton tests on the GPU (no TRITON_INTERPRET)
  bench-*          bench/bench_cuda.py, the GPU table, in four parts (each its own JSON)
  profile-steps    the demo's search step and training step on the GPU: seconds per step and the share
                   of the device time spent in qops ops (torch.profiler)

A failing or timed-out step does not stop the later ones. gpu-report.json and gpu-report.md are rewritten
after every step (and before it, marked running) in the report folder: --report-dir, else $GPU_REPORT_DIR,
else $OUT when set, else build/gpu-report; every step's output goes to gpu-check.log beside them.

Without a CUDA device the script says so in one line and runs the dry run instead (exit 0 if it passes):
fake steps (one passes, one fails, one times out, one reads the report already on disk) through the same
runner, parsers and report writer, and the wheel discovery, with no torch needed.

The script itself needs Python 3.11+ (tomllib) and the standard library only; the steps need torch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import tomllib

ROOT = Path(__file__).resolve().parent.parent
REPORT_FORMAT = "qnas-gpu-check/1"
DEADLINE_S = 480  # the whole run on the H200, the build included
MIN_STEP_S = 10  # a step with less time than this left before the deadline is skipped

# Never carried as wheels: the GPU machine's own torch stack, and the large compiled packages that every
# CUDA PyTorch image already has (the wheel folder travels to the machine and must stay small).
NOT_CARRIED = {
    "torch",
    "triton",
    "ruff",
    "numpy",
    "scipy",
    "matplotlib",
    "scikit-learn",
    "onnxruntime",
    "tensorboard",
}
NOT_CARRIED_PREFIXES = ("nvidia-", "cuda-")
WHEEL_BUDGET_MIB = 56  # the device transfer carries 64 MiB in all, the working tree included
# Versions the wheels must keep to so that the GPU machine's torch keeps working (torch 2.11 requires these).
WHEEL_CONSTRAINTS = ["setuptools<82"]
TARGET_PYTHON = "3.12"
TARGET_PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def say(msg: str) -> None:
    print(f"gpu-check: {msg}", flush=True)


# -- requirements and wheels -----------------------------------------------------------------------


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    return normalize(re.split(r"[\s<>=!~;\[(]", req.strip(), maxsplit=1)[0])


def project_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """What the GPU run needs from pyproject.toml: the build requirements, ninja (parallel builds), the
    runtime and test dependencies; torch, Triton and the linter excluded (the machine brings the first two)."""
    data = tomllib.loads(pyproject.read_text())
    reqs = list(data["build-system"]["requires"]) + ["ninja"]
    reqs += data["project"]["dependencies"] + data["project"]["optional-dependencies"]["test"]
    seen, out = set(), []
    for r in reqs:
        name = requirement_name(r)
        if name not in seen and name not in {"torch", "triton", "ruff"}:
            seen.add(name)
            out.append(r)
    return out


def wheel_distribution(filename: str) -> str:
    return normalize(filename.split("-", 1)[0])


def is_carried(dist: str) -> bool:
    return dist not in NOT_CARRIED and not dist.startswith(NOT_CARRIED_PREFIXES)


def installed_satisfies(req: str) -> tuple[bool, str | None]:
    """(satisfied, installed version) for this interpreter; the version range is checked with `packaging`
    (or pip's copy of it), else presence alone counts."""
    try:
        version = metadata.version(requirement_name(req))
    except metadata.PackageNotFoundError:
        return False, None
    try:
        from packaging.requirements import Requirement
    except ImportError:
        try:
            from pip._vendor.packaging.requirements import Requirement
        except ImportError:
            return True, version
    return Requirement(req).specifier.contains(version, prereleases=True), version


def wheel_plan(wheel_dir: Path, requirements: list[str]) -> dict[str, Any]:
    """Which requirements are satisfied here, which the wheel folder can supply, and which neither."""
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    offered = {wheel_distribution(w.name) for w in wheels}
    plan: dict[str, Any] = {
        "wheel_dir": str(wheel_dir),
        "wheels": len(wheels),
        "wheel_mib": round(sum(w.stat().st_size for w in wheels) / 2**20, 1),
        "satisfied": [],
        "install": [],
        "unavailable": [],
    }
    for req in requirements:
        ok, version = installed_satisfies(req)
        if ok:
            plan["satisfied"].append(f"{requirement_name(req)} {version}")
        elif requirement_name(req) in offered:
            plan["install"].append(req)
        else:
            plan["unavailable"].append(req + (f" (installed: {version})" if version else ""))
    return plan


def site_dirs(prefix: Path) -> list[str]:
    """The package folders pip created under --prefix (the scheme differs between Python builds)."""
    if not prefix.is_dir():
        return []
    found = sorted(
        p for p in prefix.rglob("*") if p.is_dir() and p.name in ("site-packages", "dist-packages")
    )
    return [str(p) for p in found]


def download_wheels(dest: Path, python_version: str = TARGET_PYTHON) -> int:
    """`make gpu-wheels`: the project's requirements and their dependencies as wheels for the GPU machine's
    Python (manylinux x86_64), minus NOT_CARRIED; fails if the folder would exceed WHEEL_BUDGET_MIB."""
    reqs = [r for r in project_requirements() if is_carried(requirement_name(r))]
    staging = ROOT / "build" / "gpu-wheels-download"
    if staging.exists():
        for f in staging.iterdir():
            f.unlink()
    staging.mkdir(parents=True, exist_ok=True)
    constraints = ROOT / "build" / "gpu-wheels-constraints.txt"
    constraints.write_text("\n".join(WHEEL_CONSTRAINTS) + "\n")
    platforms = [a for p in TARGET_PLATFORMS for a in ("--platform", p)]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--only-binary=:all:",
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        *platforms,
        "--dest",
        str(staging),
        "--constraint",
        str(constraints),
        *reqs,
    ]
    say(f"downloading wheels for Python {python_version}: {shlex.join(cmd[3:])}")
    if subprocess.run(cmd).returncode != 0:
        say("pip download failed (above); the wheel folder is unchanged")
        return 1
    kept = [w for w in sorted(staging.glob("*.whl")) if is_carried(wheel_distribution(w.name))]
    total = sum(w.stat().st_size for w in kept)
    if total > WHEEL_BUDGET_MIB * 2**20:
        biggest = sorted(kept, key=lambda w: -w.stat().st_size)[:5]
        say(
            f"{total / 2**20:.1f} MiB of wheels exceed the {WHEEL_BUDGET_MIB} MiB budget (largest: "
            + ", ".join(f"{w.name} {w.stat().st_size / 2**20:.1f} MiB" for w in biggest)
            + "); add the heavy ones to NOT_CARRIED"
        )
        return 1
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):  # one version of each distribution: two would stop the install
        old.unlink()
    for w in kept:
        w.replace(dest / w.name)
    for f in staging.iterdir():
        f.unlink()
    staging.rmdir()
    say(
        f"{len(kept)} wheels, {total / 2**20:.1f} MiB in {dest} (not carried: {', '.join(sorted(NOT_CARRIED))})"
    )
    return 0


# -- parsers of the steps' outputs -----------------------------------------------------------------


def parse_junit(path: Path) -> list[dict[str, Any]]:
    """Every test case of a pytest --junitxml file: id, outcome, seconds, message."""
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        file = case.get("file") or case.get("classname", "").replace(".", "/") + ".py"
        outcome, message = "passed", ""
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            node = case.find(tag)
            if node is not None:
                text = (node.get("message") or node.text or "").strip()
                outcome, message = name, text.splitlines()[0][:300] if text else ""
                break
        out.append(
            {
                "id": f"{file}::{case.get('name')}",
                "outcome": outcome,
                "seconds": round(float(case.get("time") or 0), 3),
                "message": message,
            }
        )
    return out


def bench_rows(path: Path) -> list[dict[str, Any]]:
    """The figures of a pytest-benchmark JSON (bench/conftest.py conventions), each with its group's
    baseline: median ms, GB/s, GOP/s, speedup over the baseline, peak MB."""
    data = json.loads(path.read_text())
    groups: dict[str, list[dict]] = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], []).append(b)
    rows = []
    for group, cases in groups.items():
        base = next((c for c in cases if c["extra_info"].get("baseline")), None)
        for c in sorted(cases, key=lambda c: (not c["extra_info"].get("baseline"), c["stats"]["median"])):
            info, t = c["extra_info"], c["stats"]["median"]
            rows.append(
                {
                    "group": group,
                    "impl": info.get("impl", c["name"]),
                    "baseline": base["extra_info"].get("impl") if base else None,
                    "median_ms": round(t * 1e3, 4),
                    "baseline_median_ms": round(base["stats"]["median"] * 1e3, 4) if base else None,
                    "speedup": round(base["stats"]["median"] / t, 3) if base else None,
                    "gb_per_s": round(info["bytes"] / t / 1e9, 1) if info.get("bytes") else None,
                    "gop_per_s": round(info["ops"] / t / 1e9, 1) if info.get("ops") else None,
                    "peak_mb": info.get("peak_mb"),
                    "rounds": c["stats"].get("rounds"),
                }
            )
    return rows


def add_copy_share(rows: list[dict[str, Any]]) -> None:
    """GB/s of every memory-bound row as a share of the measured device-to-device copy bandwidth."""
    copy = [r["gb_per_s"] for r in rows if r["group"].startswith("device-to-device copy") and r["gb_per_s"]]
    for r in rows:
        r["share_of_copy"] = round(r["gb_per_s"] / copy[0], 3) if copy and r["gb_per_s"] is not None else None


# -- the report ------------------------------------------------------------------------------------


def _fmt(v, spec: str = "", suffix: str = "") -> str:
    return "" if v is None else f"{v:{spec}}{suffix}"


def markdown(report: dict[str, Any]) -> str:
    env = report.get("environment", {})
    lines = [
        "# GPU check" + (" (dry run: fake steps, no figure is real)" if report.get("dry_run") else ""),
        "",
        f"Started {report['started']}, updated {report['updated']}, deadline {report['deadline_s']} s.",
        "",
        "| | |",
        "|---|---|",
    ]
    for key in (
        "device",
        "capability",
        "sm_count",
        "memory_gib",
        "driver",
        "torch",
        "torch_cuda",
        "cudnn",
        "triton",
        "nvcc",
        "python",
        "cpu_count",
        "torch_error",
    ):
        if env.get(key) is not None:
            lines.append(f"| {key} | {env[key]} |")
    lines += ["", "## Steps", "", "| step | status | seconds | what | note |", "|---|---|---:|---|---|"]
    for s in report["steps"]:
        lines.append(
            f"| {s['name']} | {s['status']} | {_fmt(s.get('seconds'), '.1f')} | {s['what']} | {s.get('detail', '')} |"
        )
    tests = report.get("tests", [])
    if tests:
        counts: dict[str, int] = {}
        for t in tests:
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
        lines += ["", "## Tests", "", ", ".join(f"{n} {k}" for k, n in sorted(counts.items())), ""]
        lines += ["| test | outcome | seconds | message |", "|---|---|---:|---|"]
        order = {"failed": 0, "error": 1, "skipped": 2, "passed": 3}
        for t in sorted(tests, key=lambda t: (order.get(t["outcome"], 4), t["id"])):
            lines.append(
                f"| {t['id']} | {t['outcome']} | {t['seconds']} | {t['message'].replace('|', '/')} |"
            )
    rows = report.get("bench", [])
    if rows:
        lines += ["", "## Benchmarks: ours vs the baseline of each group, same run", ""]
        lines += [
            "| group | impl | median ms | speedup vs baseline | GB/s | share of copy | GOP/s | peak MB |"
        ]
        lines += ["|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            base = " (baseline)" if r["impl"] == r["baseline"] else ""
            lines.append(
                f"| {r['group']} | {r['impl']}{base} | {r['median_ms']:.3f} | {_fmt(r['speedup'], '.2f', 'x')} | "
                f"{_fmt(r['gb_per_s'])} | {_fmt(r.get('share_of_copy'), '.0%')} | {_fmt(r['gop_per_s'])} | "
                f"{_fmt(r['peak_mb'])} |"
            )
    prof = report.get("profile", {})
    if prof:
        lines += ["", "## The demo's search and training steps", ""]
        lines += [
            "| step | setting | seconds/step | device busy | share in qops ops | largest qops ops (ms/step) |"
        ]
        lines += ["|---|---|---:|---:|---:|---|"]
        for name, p in prof.items():
            ops = ", ".join(f"{k} {v:.2f}" for k, v in list(p.get("qops_ms_per_step", {}).items())[:4])
            lines.append(
                f"| {name} | {p.get('setting', '')} | {_fmt(p.get('seconds_per_step'), '.4f')} | "
                f"{_fmt(p.get('device_busy'), '.0%')} | {_fmt(p.get('qops_share'), '.1%')} | {ops} |"
            )
    return "\n".join(lines) + "\n"


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- the step runner -------------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    what: str
    timeout_s: float
    commands: list[list[str]] = field(default_factory=list)
    env: dict[str, str] | None = None
    # Runs in this process before the commands (e.g. to decide them); its dict is merged into the record.
    prepare: Callable[[Step], dict[str, Any]] | None = None
    # Reads the step's outputs into the report after the commands ran (also after a failure).
    collect: Callable[[dict[str, Any]], None] | None = None


class Runner:
    """Runs steps in order under one deadline and rewrites the report after every change."""

    def __init__(self, report_dir: Path, deadline_s: float, *, dry_run: bool = False, quiet: bool = False):
        self.report_dir = report_dir
        self.quiet = quiet
        report_dir.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + deadline_s
        self.log_path = report_dir / "gpu-check.log"
        self.log_path.write_text("")
        self.report: dict[str, Any] = {
            "format": REPORT_FORMAT,
            "dry_run": dry_run,
            "started": now(),
            "updated": now(),
            "deadline_s": deadline_s,
            "environment": {},
            "steps": [],
            "tests": [],
            "bench": [],
            "profile": {},
        }
        self.write()

    def write(self) -> None:
        self.report["updated"] = now()
        atomic_write(self.report_dir / "gpu-report.json", json.dumps(self.report, indent=2) + "\n")
        atomic_write(self.report_dir / "gpu-report.md", markdown(self.report))

    def log(self, text: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(text)

    def run(self, step: Step) -> dict[str, Any]:
        rec: dict[str, Any] = {"name": step.name, "what": step.what, "status": "running", "started": now()}
        self.report["steps"].append(rec)
        self.write()
        left = self.deadline - time.monotonic()
        if left < MIN_STEP_S:
            rec.update(status="skipped", detail=f"deadline reached ({left:.0f} s left)")
            self.write()
            if not self.quiet:
                say(f"{step.name}: skipped, deadline reached")
            return rec
        budget = min(step.timeout_s, left)
        t0 = time.monotonic()
        self.log(f"\n==== {step.name} ({step.what}), timeout {budget:.0f} s, {now()}\n")
        status, rc = "passed", 0
        try:
            if step.prepare is not None:
                rec.update(step.prepare(step))
            for cmd in step.commands:
                rc = self._call(cmd, step.env, budget - (time.monotonic() - t0))
                if rc is None:
                    status = "timeout"
                    break
                if rc != 0:
                    status = "failed"
                    break
        except Exception as e:  # a bug in a step's own code is a result of that step, not the end of the run
            status, rec["detail"] = "failed", f"{type(e).__name__}: {e}"
        rec.update(status=status, returncode=rc, seconds=round(time.monotonic() - t0, 1))
        if status == "timeout":
            rec["detail"] = f"stopped after {budget:.0f} s"
        if step.collect is not None:
            try:
                step.collect(rec)
            except Exception as e:
                rec["collect_error"] = f"{type(e).__name__}: {e}"
        if status != "passed":
            rec["log_tail"] = self._tail(40)
        self.write()
        if not self.quiet:
            note = f" ({rec['detail']})" if rec.get("detail") else ""
            say(f"{step.name}: {status} in {rec['seconds']} s{note}")
            if status != "passed":
                print("\n".join("    " + line for line in rec["log_tail"][-15:]), flush=True)
        return rec

    def _call(self, cmd: list[str], env: dict[str, str] | None, timeout: float) -> int | None:
        """Exit code of `cmd` (output appended to the log), None when it ran out of time; the whole process
        group is stopped then (compilers, pytest's children)."""
        self.log(f"$ {shlex.join(cmd)}\n")
        with open(self.log_path, "a") as log:
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                return proc.wait(timeout=max(timeout, 0.1))
            except subprocess.TimeoutExpired:
                for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        proc.wait(timeout=wait)
                        break
                    except subprocess.TimeoutExpired:
                        continue
                self.log(f"\n[timed out after {timeout:.0f} s]\n")
                return None

    def _tail(self, n: int) -> list[str]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("==== ")]  # this step's header
        return lines[starts[-1] if starts else 0 :][-n:]


# -- the GPU run -----------------------------------------------------------------------------------


def probe_environment(out: Path) -> None:
    """Writes what this machine has (torch may be missing or broken: that is recorded, not raised)."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "cpu_count": os.cpu_count(),
    }

    def first_line(cmd: list[str]) -> str | None:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        lines = r.stdout.strip().splitlines()
        return lines[-1] if r.returncode == 0 and lines else None

    smi = first_line(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
    info["driver"] = smi.split(",")[-1].strip() if smi else None
    info["nvcc"] = first_line(["nvcc", "--version"])
    try:
        import torch

        info.update(
            torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available()
        )
        if torch.backends.cudnn.is_available():
            info["cudnn"] = torch.backends.cudnn.version()
        if info["cuda_available"]:
            p = torch.cuda.get_device_properties(0)
            info.update(
                device=p.name,
                capability=f"{p.major}.{p.minor}",
                sm_count=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1),
            )
    except Exception as e:
        info.update(cuda_available=False, torch_error=f"{type(e).__name__}: {e}")
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    out.write_text(json.dumps(info, indent=2) + "\n")


def probe_command(out: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--probe-environment", str(out)]


def environment_step(runner: Runner, out: Path, *, probe: bool = True) -> Step:
    """Records the probe's findings (probe=False: reads those of a probe that already ran)."""

    def collect(rec):
        runner.report["environment"] = json.loads(out.read_text())

    what = "device, driver, CUDA, torch, Triton, nvcc"
    return Step("environment", what, 60, [probe_command(out)] if probe else [], collect=collect)


def cuda_home() -> str | None:
    """The CUDA toolkit whose include/cuda_runtime.h sits beside nvcc, or /usr/local/cuda. torch takes nvcc's
    grandparent folder, which is wrong where nvcc is a link or a wrapper script (e.g. in /usr/local/bin)."""
    nvcc = shutil.which("nvcc")
    for home in ([Path(nvcc).resolve().parent.parent] if nvcc else []) + [Path("/usr/local/cuda")]:
        if (home / "include" / "cuda_runtime.h").exists():
            return str(home)
    return None


def step_env(extra_site: list[str], arch: str | None) -> dict[str, str]:
    """The environment of the steps after the wheels: the installed wheels and the source tree on the path,
    Triton native, the build for this GPU's architecture on every core."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # Triton runs natively on the GPU
    paths = [*extra_site, str(ROOT), str(ROOT / "python")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", QOPS_WITH_CUDA="1")
    env["MAX_JOBS"] = env.get("MAX_JOBS") or str(os.cpu_count() or 1)
    if arch and not env.get("QOPS_CUDA_ARCH"):
        env["QOPS_CUDA_ARCH"] = arch  # only this GPU's architecture: the build is part of the time budget
    if not env.get("CUDA_HOME") and not env.get("CUDA_PATH") and cuda_home():
        env["CUDA_HOME"] = cuda_home()
    return env


def wheels_step(
    wheel_dir: Path, prefix: Path, *, install: bool, requirements: list[str] | None = None
) -> Step:
    """Plans (and with install=True runs) the installation of what this interpreter lacks."""

    def prepare(step: Step) -> dict[str, Any]:
        plan = wheel_plan(wheel_dir, project_requirements() if requirements is None else requirements)
        if install and plan["install"]:
            pip = [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--no-index",
                "--find-links",
                str(wheel_dir),
                "--prefix",
                str(prefix),
                "--no-cache-dir",
                "--no-warn-script-location",
                "--disable-pip-version-check",
                "-q",
            ]
            step.commands = [pip + plan["install"]]
        detail = f"{len(plan['satisfied'])} satisfied, {len(plan['install'])} from wheels"
        if plan["unavailable"]:
            detail += f", unavailable: {', '.join(plan['unavailable'])}"
        return {"plan": plan, "detail": detail}

    return Step("wheels", "missing Python packages from the wheel folder", 90, prepare=prepare)


def pytest_step(name: str, what: str, timeout: float, selection: list[str], env, work: Path, runner) -> Step:
    xml = work / f"{name}.xml"

    def collect(rec):
        if xml.exists():
            cases = parse_junit(xml)
            for c in cases:
                c["step"] = name
            runner.report["tests"] = [t for t in runner.report["tests"] if t.get("step") != name] + cases

    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *selection,
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={xml}",
        "-o",
        "junit_family=xunit1",
    ]
    return Step(name, what, timeout, [cmd], env=env, collect=collect)


# This script's own tests check it on the CPU; on the GPU they would only cost time.
NOT_HERE = ["--ignore", "tests/test_gpu_check.py"]

# bench/bench_cuda.py in parts, so that a part that runs out of time costs only its own figures.
BENCH_PARTS = [
    (
        "bench-elementwise",
        "fake_quant, quant_noise, device copy",
        60,
        "fake_quant or device_copy or quant_noise",
    ),
    ("bench-mixed-quant-conv", "mixed_quant_conv fused / Triton / naive", 75, "mixed_quant_conv"),
    ("bench-search-step", "one QuantNAS search step, fused vs naive", 100, "search_step"),
    ("bench-conv", "packed / quantized conv vs cuDNN fp16 and int8", 75, "test_conv"),
]


def bench_step(name: str, what: str, timeout: float, keyword: str, env, work: Path, runner) -> Step:
    out = work / f"{name}.json"

    def collect(rec):
        if out.exists():
            rows = [dict(r, step=name) for r in bench_rows(out)]
            runner.report["bench"] = [r for r in runner.report["bench"] if r.get("step") != name] + rows
            add_copy_share(runner.report["bench"])

    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "bench/bench_cuda.py",
        "-k",
        keyword,
        "--benchmark-only",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--benchmark-json={out}",
        "--benchmark-columns=median,iqr,rounds",
        "--benchmark-sort=name",
    ]
    return Step(name, what, timeout, [cmd], env=env, collect=collect)


def profile_step(env, work: Path, runner, device: str = "cuda") -> Step:
    out = work / "profile.json"

    def collect(rec):
        if out.exists():
            runner.report["profile"] = json.loads(out.read_text())

    cmd = [sys.executable, str(Path(__file__).resolve()), "--profile-steps", str(out), "--device", device]
    return Step(
        "profile-steps",
        "the demo's search and training steps, torch.profiler",
        100,
        [cmd],
        env=env,
        collect=collect,
    )


def gpu_run(report_dir: Path, work: Path, wheel_dir: Path, deadline_s: float, only: set[str] | None) -> int:
    """The GPU run; on a machine without a CUDA device, one line and the (quiet) dry run instead."""
    work.mkdir(parents=True, exist_ok=True)
    probe = work / "environment.json"
    probe.unlink(missing_ok=True)
    try:
        subprocess.run(probe_command(probe), cwd=ROOT, timeout=120)
    except subprocess.TimeoutExpired:
        pass  # no probe file: reported below as no usable GPU
    env_info = json.loads(probe.read_text()) if probe.exists() else {"torch_error": "the probe wrote nothing"}
    if not env_info.get("cuda_available"):
        why = env_info.get("torch_error") or f"torch {env_info.get('torch')} sees no CUDA device"
        t0 = time.monotonic()
        rc = dry_run(work / "dry-run", quiet=True, environment=probe if probe.exists() else None)
        say(
            f"no CUDA GPU on this machine ({why}): nothing measured; dry run of this script "
            f"{'FAILED' if rc else 'OK'} in {time.monotonic() - t0:.1f} s ({work / 'dry-run'})"
        )
        return rc
    runner = Runner(report_dir, deadline_s)
    runner.run(environment_step(runner, probe, probe=False))
    prefix = work / "site"

    def wanted(name: str) -> bool:
        return only is None or name in only

    if wanted("wheels"):
        runner.run(wheels_step(wheel_dir, prefix, install=True))
    env = step_env(site_dirs(prefix), env_info.get("capability"))
    steps = [
        Step(
            "build",
            "qops._C with CUDA, in place",
            300,
            [
                [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                [
                    sys.executable,
                    "-c",
                    "import qops, sys; sys.exit(0 if qops.built_with_cuda() else "
                    "'qops._C was built without CUDA')",
                ],
            ],
            env=env,
        ),
        pytest_step(
            "tests-cuda",
            "CUDA tests",
            120,
            ["tests", "-k", "cuda and not triton", *NOT_HERE],
            env,
            work,
            runner,
        ),
        pytest_step(
            "tests-triton",
            "Triton tests, native",
            120,
            ["tests", "-k", "triton", *NOT_HERE],
            env,
            work,
            runner,
        ),
        *[bench_step(*part, env, work, runner) for part in BENCH_PARTS],
        profile_step(env, work, runner),
    ]
    for step in steps:
        if wanted(step.name):
            runner.run(step)
    print("\n" + markdown(runner.report), flush=True)
    failed = [s["name"] for s in runner.report["steps"] if s["status"] != "passed"]
    say(f"report: {report_dir}/gpu-report.md" + (f"; not passed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


# -- the demo's steps on a device --------------------------------------------------------------------


def qops_time_share(events, on_device: bool) -> tuple[float, float, dict[str, float]]:
    """(time in qops ops, all time, per qops op) of a torch.profiler event list, in microseconds.

    On a GPU, "all time" is every kernel's duration and an op's time the kernels launched inside it (the
    vendor convolutions a qops op calls count as qops); on the CPU both are ops' CPU time. Nested qops ops
    count once, under the outermost."""
    from torch.autograd import DeviceType

    def total(e):
        if on_device:
            return getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        return e.cpu_time_total

    def own(e):
        if on_device:
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        return e.self_cpu_time_total

    def is_qops(e):
        return e.name.startswith(("qops::", "qops_triton::"))

    def inside_qops(e):
        p = e.cpu_parent
        while p is not None:
            if is_qops(p):
                return True
            p = p.cpu_parent
        return False

    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    if on_device:
        everything = sum(total(e) for e in events if e.device_type != DeviceType.CPU)
    else:
        everything = sum(own(e) for e in cpu)
    per_op: dict[str, float] = {}
    for e in cpu:
        if is_qops(e) and not inside_qops(e):
            per_op[e.name] = per_op.get(e.name, 0.0) + total(e)
    return sum(per_op.values()), everything, per_op


def measure_step(step: Callable[[], Any], device: str, *, warmup: int, timed: int, profiled: int) -> dict:
    """Seconds per step (median of `timed`), then `profiled` steps under torch.profiler: the share of the
    time in qops ops and how busy the device was."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device == "cuda"

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(timed):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(profiled):
            step()
        sync()
    qops_us, all_us, per_op = qops_time_share(prof.events(), on_gpu)
    per_step_s = statistics.median(times)
    return {
        "seconds_per_step": round(per_step_s, 5),
        "steps_timed": timed,
        "steps_profiled": profiled,
        "device_busy": round(all_us / profiled / 1e6 / per_step_s, 3) if on_gpu else None,
        "qops_share": round(qops_us / all_us, 4) if all_us else None,
        "qops_ms_per_step": {
            k: round(v / profiled / 1e3, 3) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])
        },
    }


def demo_steps(device: str, *, batch: int | None = None, patch: int | None = None):
    """The step functions of `qnas search` and `qnas train` with the demo's sizes (qnas.demo) on `device`:
    the differentiable joint search (DARTS_DEMO: search_step, noise mode, the fused supernet kernel) and
    the retraining of the fixed architecture at 4 bits (the training loop's step). batch/patch override
    the demo's sizes (tests)."""
    import torch
    from torch import nn

    from qnas.data.datasets import PatchSampler, train_dataset
    from qnas.demo import DARTS_DEMO, DemoSettings, _search_options, search_target
    from qnas.nas.derive import genotype_network_config, uniform_genotype
    from qnas.nas.search import _batch, _subset, build_supernet, cost_term, search_step, split_images
    from qnas.runs.network import build_network
    from qnas.train.train import TrainOptions, lr_factor

    s = DemoSettings.from_dict(DARTS_DEMO)  # the differentiable search: the fused supernet kernel's step
    if batch is not None:
        s.search_batch = s.train_batch = batch
    if patch is not None:
        s.search_patch = s.train_patch = patch
    cl = torch.channels_last
    opts = _search_options(s, ops=s.ops, steps=s.search_steps, target=search_target(s))
    torch.manual_seed(opts.seed)
    net = build_supernet(opts).to(device, memory_format=cl)
    net.train()
    data = train_dataset(opts.data, opts.scale, opts.patch_size, progress=False)
    w_idx, a_idx = split_images(len(data), opts.alpha_split)
    w_sampler = PatchSampler(_subset(data, w_idx), opts.batch_size, seed=opts.seed)
    a_sampler = PatchSampler(_subset(data, a_idx), opts.batch_size, seed=opts.seed + 1)
    w_opt = torch.optim.Adam(net.weight_parameters(), lr=opts.lr)
    a_opt = torch.optim.Adam(net.alpha_parameters(), lr=opts.alpha_lr, betas=(0.5, 0.999))
    with torch.no_grad():
        penalty = cost_term(opts, float(net.expected_bitops_per_pixel(net.probs())))

    def on_device(batch_pair):
        lr_img, hr_img = batch_pair
        return lr_img.to(device).contiguous(memory_format=cl), hr_img.to(device)

    def search():
        return search_step(
            net,
            w_opt,
            a_opt,
            on_device(_batch(w_sampler)),
            on_device(_batch(a_sampler)),
            update_alphas=True,
            entropy_weight=opts.entropy_coef,
            penalty=penalty,
            grad_clip=opts.grad_clip,
        )

    t_opts = TrainOptions(scale=s.scale, batch_size=s.train_batch, patch_size=s.train_patch, lr=s.train_lr)
    genotype = uniform_genotype(s.space, s.scale, s.fixed_op, 4)
    model = build_network(genotype_network_config(genotype, s.act_quantizer)).to(device, memory_format=cl)
    model.train()
    t_data = train_dataset(s.data, s.scale, s.train_patch, progress=False)
    sampler = PatchSampler(t_data, s.train_batch, seed=s.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=t_opts.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, t_opts))
    loss_fn = nn.L1Loss()
    auxiliary_loss = getattr(model, "auxiliary_loss", None)

    def train():  # the body of qnas.train.train's loop (no EMA, no clipping in the demo)
        lr_img, hr_img = on_device(next(sampler))
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(lr_img), hr_img)
        aux = auxiliary_loss() if auxiliary_loss is not None else None
        total = loss if aux is None else loss + aux
        if not torch.isfinite(total):
            raise RuntimeError("training diverged")
        total.backward()
        optimizer.step()
        scheduler.step()
        return loss.item()

    settings = {
        "search": f"{s.space} x{s.scale}, ops {','.join(s.ops or [])}, bits {s.bits}, {s.mode} mode, "
        f"batch {opts.batch_size} of {opts.patch_size}px HR",
        "train": f"{s.fixed_op} w4a4 ({s.act_quantizer}), batch {s.train_batch} of {s.train_patch}px HR",
    }
    return {"search": search, "train": train}, settings


def profile_steps(out: Path, device: str, *, warmup: int = 3, timed: int = 10, profiled: int = 3, **sizes):
    """Writes {"search": {...}, "train": {...}} (measure_step's figures per step) to `out`, after each."""
    steps, settings = demo_steps(device, **sizes)
    result: dict[str, Any] = {}
    for name, step in steps.items():
        try:
            result[name] = measure_step(step, device, warmup=warmup, timed=timed, profiled=profiled)
        except Exception as e:
            result[name] = {"error": f"{type(e).__name__}: {e}"}
        result[name]["setting"] = settings[name]
        result[name]["device"] = device
        atomic_write(out, json.dumps(result, indent=2) + "\n")
    return result


# -- the dry run ------------------------------------------------------------------------------------


def write_fake(kind: str, path: Path) -> None:
    """Outputs shaped like the real steps' (pytest junit XML, pytest-benchmark JSON, profile JSON)."""
    if kind == "junit":
        path.write_text(
            '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="3">'
            '<testcase classname="tests.test_a" file="tests/test_a.py" name="test_ok[cuda]" time="0.5"/>'
            '<testcase classname="tests.test_a" file="tests/test_a.py" name="test_bad[cuda]" time="0.1">'
            '<failure message="AssertionError: 1 != 2">trace</failure></testcase>'
            '<testcase classname="tests.test_b" file="tests/test_b.py" name="test_skip" time="0">'
            '<skipped message="needs a CUDA GPU"/></testcase></testsuite></testsuites>'
        )
    elif kind == "bench":

        def case(group, impl, median, baseline=False, **info):
            return {
                "group": group,
                "name": impl,
                "stats": {"median": median, "rounds": 15},
                "extra_info": {"impl": impl, "baseline": baseline, **info},
            }

        # Copy: 2 GB in 1 ms (2000 GB/s); ours: 1000 GB/s, twice the baseline's speed, half the copy's.
        benchmarks = [
            case("device-to-device copy", "torch copy_", 1e-3, True, bytes=2e9),
            case("fake_quant fwd+bwd", "torch builtin", 4e-3, True, bytes=2e9),
            case("fake_quant fwd+bwd", "qops", 2e-3, bytes=2e9),
            case("conv3x3", "cuDNN fp16", 1e-4, True, ops=2e9),
            case("conv3x3", "ours w4a4", 5e-5, ops=2e9),
        ]
        path.write_text(json.dumps({"benchmarks": benchmarks}))
    elif kind == "profile":
        path.write_text(
            json.dumps(
                {
                    "search": {
                        "setting": "fake",
                        "seconds_per_step": 0.05,
                        "device_busy": 0.8,
                        "qops_share": 0.4,
                        "qops_ms_per_step": {"qops::mixed_quant_conv": 20.0},
                    }
                }
            )
        )
    else:
        raise SystemExit(f"--write-fake: unknown kind {kind!r}")


def dry_run(report_dir: Path, *, quiet: bool = False, environment: Path | None = None) -> int:
    """The runner, the parsers, the report and the wheel discovery on fake steps; 0 if all behaved.
    `environment`: the file of a probe that already ran (else the probe runs as the first step)."""
    t0 = time.monotonic()
    work = report_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(report_dir, deadline_s=120, dry_run=True, quiet=quiet)
    me = [sys.executable, str(Path(__file__).resolve())]
    py = [sys.executable, "-c"]
    runner.run(environment_step(runner, environment or work / "environment.json", probe=environment is None))
    # Wheel discovery on a folder with one wheel this interpreter lacks and one it has (pip).
    wheel_dir = work / "wheels"
    wheel_dir.mkdir(exist_ok=True)
    for name in ("qnas_dry_run_missing-1.0-py3-none-any.whl", "pip-99.0-py3-none-any.whl"):
        (wheel_dir / name).write_bytes(b"")
    reqs = ["qnas-dry-run-missing>=1", "pip", "qnas-dry-run-absent"]
    wheels = runner.run(wheels_step(wheel_dir, work / "site", install=False, requirements=reqs))
    plan = wheels.get("plan", {})
    xml, bench, prof = work / "tests.xml", work / "bench.json", work / "profile.json"

    def collect_tests(rec):
        runner.report["tests"] = parse_junit(xml)

    def collect_bench(rec):
        runner.report["bench"] = bench_rows(bench)
        add_copy_share(runner.report["bench"])

    def collect_profile(rec):
        runner.report["profile"] = json.loads(prof.read_text())

    report_json = report_dir / "gpu-report.json"
    runner.run(
        Step(
            "fake-tests",
            "a junit file, parsed",
            30,
            [me + ["--write-fake", "junit", str(xml)]],
            collect=collect_tests,
        )
    )
    runner.run(
        Step("fake-failing", "exits 3", 30, [py + ["import sys; print('failing on purpose'); sys.exit(3)"]])
    )
    runner.run(Step("fake-timeout", "sleeps past its 1 s timeout", 1, [py + ["import time; time.sleep(60)"]]))
    runner.run(
        Step(
            "fake-report-on-disk",
            "reads the report: the earlier steps are in it",
            30,
            [
                py
                + [
                    f"import json,sys; s=json.load(open({str(report_json)!r}))['steps']; "
                    "st={x['name']: x['status'] for x in s}; "
                    "sys.exit(0 if st.get('fake-failing')=='failed' and st.get('fake-timeout')=='timeout' "
                    "and st.get('fake-report-on-disk')=='running' else 1)"
                ]
            ],
        )
    )
    runner.run(
        Step(
            "fake-bench",
            "a pytest-benchmark JSON, parsed",
            30,
            [me + ["--write-fake", "bench", str(bench)]],
            collect=collect_bench,
        )
    )
    runner.run(
        Step(
            "fake-profile",
            "a profile JSON, read",
            30,
            [me + ["--write-fake", "profile", str(prof)]],
            collect=collect_profile,
        )
    )
    report = json.loads(report_json.read_text())
    status = {s["name"]: s["status"] for s in report["steps"]}
    fq = {r["impl"]: r for r in report["bench"]}
    problems = []
    expect = {
        "environment": "passed",
        "wheels": "passed",
        "fake-tests": "passed",
        "fake-failing": "failed",
        "fake-timeout": "timeout",
        "fake-report-on-disk": "passed",
        "fake-bench": "passed",
        "fake-profile": "passed",
    }
    for name, want in expect.items():
        if status.get(name) != want:
            problems.append(f"step {name}: {status.get(name)}, expected {want}")
    if [t["outcome"] for t in report["tests"]] != ["passed", "failed", "skipped"]:
        problems.append(f"tests parsed as {[t['outcome'] for t in report['tests']]}")
    if fq.get("qops", {}).get("speedup") != 2.0 or fq.get("qops", {}).get("share_of_copy") != 0.5:
        problems.append(f"bench row parsed as {fq.get('qops')}")
    if plan.get("install") != ["qnas-dry-run-missing>=1"] or plan.get("unavailable") != [
        "qnas-dry-run-absent"
    ]:
        problems.append(f"wheel plan {plan}")
    if report["profile"].get("search", {}).get("qops_share") != 0.4:
        problems.append("profile not in the report")
    md = (report_dir / "gpu-report.md").read_text()
    for heading in ("## Steps", "## Tests", "## Benchmarks", "## The demo's search and training steps"):
        if heading not in md:
            problems.append(f"gpu-report.md lacks {heading!r}")
    for p in problems:
        say(f"dry run: {p}")
    if not quiet:
        say(
            f"dry run {'FAILED' if problems else 'OK'} in {time.monotonic() - t0:.1f} s: {report_dir}/gpu-report.md"
        )
    return 1 if problems else 0


# -- command line -----------------------------------------------------------------------------------


def default_report_dir() -> Path:
    for var in ("GPU_REPORT_DIR", "OUT"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return ROOT / "build" / "gpu-report"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--report-dir", type=Path, default=None, help="default: $GPU_REPORT_DIR, $OUT, build/gpu-report"
    )
    ap.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="wheel folder (default .whl)")
    ap.add_argument(
        "--work-dir", type=Path, default=ROOT / "build" / "gpu-check", help="step outputs, installed wheels"
    )
    ap.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds for the whole run")
    ap.add_argument("--only", default=None, help="comma-separated step names (environment always runs)")
    ap.add_argument(
        "--dry-run", action="store_true", help="check this script with fake steps (no GPU needed)"
    )
    ap.add_argument(
        "--download-wheels", type=Path, metavar="DIR", help="fill DIR with the wheels (needs PyPI)"
    )
    ap.add_argument("--python-version", default=TARGET_PYTHON, help="of the wheels (--download-wheels)")
    # Internal: the steps that run in their own process.
    ap.add_argument("--probe-environment", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--profile-steps", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--write-fake", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe_environment:
        probe_environment(args.probe_environment)
        return 0
    if args.profile_steps:
        result = profile_steps(args.profile_steps, args.device)
        return 0 if all("error" not in r for r in result.values()) else 1
    if args.write_fake:
        write_fake(args.write_fake[0], Path(args.write_fake[1]))
        return 0
    if args.download_wheels:
        return download_wheels(args.download_wheels.resolve(), args.python_version)
    report_dir = (
        args.report_dir or (ROOT / "build" / "gpu-report-dry-run" if args.dry_run else default_report_dir())
    ).resolve()
    if args.dry_run:
        return dry_run(report_dir)
    only = set(args.only.split(",")) if args.only else None
    return gpu_run(report_dir, args.work_dir.resolve(), args.wheels.resolve(), args.deadline, only)


if __name__ == "__main__":
    sys.exit(main())
