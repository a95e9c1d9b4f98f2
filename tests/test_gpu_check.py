"""scripts/gpu_check.py (`make gpu-check`) on a machine without a GPU: the dry run, the step runner, the
parsers, the wheel plan, the profile of the demo's steps and bench/bench_cuda.py, all on the CPU."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import qops

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path taken without a GPU")
def test_without_gpu_one_line_dry_run_and_exit_0(tmp_path):
    args = ["--work-dir", str(tmp_path / "work"), "--report-dir", str(tmp_path / "r")]
    r = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "dry run of this script OK" in lines[0], r.stdout
    assert not (tmp_path / "r").exists()  # nothing measured, no report
    report = json.loads((tmp_path / "work" / "dry-run" / "gpu-report.json").read_text())
    status = {s["name"]: s["status"] for s in report["steps"]}
    assert status["fake-failing"] == "failed" and status["fake-timeout"] == "timeout"
    assert status["fake-report-on-disk"] == "passed" and status["fake-profile"] == "passed"
    assert report["dry_run"] is True
    assert [t["outcome"] for t in report["tests"]] == ["passed", "failed", "skipped"]


def test_timeout_stops_the_process_group_and_the_run_goes_on(gpu_check, tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    spawn = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    runner = gpu_check.Runner(tmp_path / "r", 60)
    t0 = time.monotonic()
    rec = runner.run(gpu_check.Step("hangs", "a child that hangs", 1, [[sys.executable, "-c", spawn]]))
    assert rec["status"] == "timeout" and time.monotonic() - t0 < 15
    pid = int(pid_file.read_text())
    for _ in range(50):  # the grandchild was signalled with its group; wait until it is reaped
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {pid} still runs")
    after = runner.run(gpu_check.Step("after", "runs all the same", 30, [[sys.executable, "-c", "pass"]]))
    assert after["status"] == "passed"
    on_disk = json.loads((tmp_path / "r" / "gpu-report.json").read_text())
    assert [(s["name"], s["status"]) for s in on_disk["steps"]] == [("hangs", "timeout"), ("after", "passed")]
    assert "## Steps" in (tmp_path / "r" / "gpu-report.md").read_text()


def test_bench_rows_speedup_and_share_of_copy(gpu_check, tmp_path):
    def case(group, impl, median, baseline=False, **info):
        return {"group": group, "name": impl, "stats": {"median": median, "rounds": 15},
                "extra_info": {"impl": impl, "baseline": baseline, **info}}  # fmt: skip

    path = tmp_path / "b.json"
    path.write_text(
        json.dumps(
            {
                "benchmarks": [
                    case("g", "ours", 0.001, bytes=3e9),
                    case("g", "base", 0.004, True, bytes=3e9),
                    case("device-to-device copy x", "copy", 0.001, True, bytes=6e9),
                    case("alone", "no baseline", 0.002, ops=4e9),
                ]
            }
        )
    )
    rows = gpu_check.bench_rows(path)
    gpu_check.add_copy_share(rows)
    by = {r["impl"]: r for r in rows}
    assert [r["impl"] for r in rows if r["group"] == "g"] == ["base", "ours"]  # baseline first
    assert by["ours"]["speedup"] == 4.0 and by["ours"]["baseline"] == "base"
    assert by["ours"]["gb_per_s"] == 3000.0 and by["ours"]["share_of_copy"] == 0.5
    assert by["no baseline"]["speedup"] is None and by["no baseline"]["gop_per_s"] == 2000.0


def test_wheel_plan_installs_only_what_is_missing_or_too_old(gpu_check, tmp_path):
    for name in ("pytest-999.0-py3-none-any.whl", "qnas_absent_here-1.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    plan = gpu_check.wheel_plan(tmp_path, ["pytest>=999", "qnas-absent-here", "pluggy", "qnas-nowhere>=1"])
    assert plan["install"] == ["pytest>=999", "qnas-absent-here"]
    assert plan["unavailable"] == ["qnas-nowhere>=1"] and plan["satisfied"][0].startswith("pluggy ")
    reqs = [gpu_check.requirement_name(r) for r in gpu_check.project_requirements()]
    assert "ninja" in reqs and "pytest-benchmark" in reqs and not {"torch", "triton", "ruff"} & set(reqs)


def test_qops_time_share_counts_qops_ops_against_all(gpu_check):
    x = torch.randn(64, 64, 32, 32, requires_grad=True)
    s, z = torch.tensor([0.05], requires_grad=True), torch.tensor([0.0], requires_grad=True)
    a = torch.randn(768, 768)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = qops.fake_quant(x, s, z, -1, -128, 127)
        y.sum().backward()
        for _ in range(4):
            a = a @ a / 768
    qops_us, all_us, per_op = gpu_check.qops_time_share(prof.events(), on_device=False)
    assert set(per_op) == {"qops::fake_quant", "qops::fake_quant_backward"}
    assert qops_us == pytest.approx(sum(per_op.values())) and 0 < qops_us < all_us
    assert all_us == pytest.approx(sum(e.self_cpu_time_total for e in prof.events()))


def test_demo_steps_run_and_spend_time_in_qops_on_cpu(gpu_check, tmp_path):
    out = tmp_path / "profile.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: one thread, immune to the other processes on a shared machine
    try:
        gpu_check.profile_steps(out, "cpu", warmup=0, timed=1, profiled=1, batch=1, patch=16)
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    assert set(result) == {"search", "train"}
    for name, r in result.items():
        assert "error" not in r, r
        assert r["seconds_per_step"] > 0 and 0 < r["qops_share"] < 1, (name, r)
    assert "qops::mixed_quant_conv" in result["search"]["qops_ms_per_step"]
    assert "qops::fake_quant" in result["train"]["qops_ms_per_step"]


def test_bench_cuda_runs_on_cpu():
    env = dict(os.environ, QNAS_BENCH_DEVICE="cpu", TRITON_INTERPRET="1")  # CPU tensors, also beside a GPU
    cases = "not search_step and not noise-triton and not rfdn"  # the slowest on the CPU; the rest cover their code
    if torch.torch_version.TorchVersion(torch.__version__) < "2.13":
        cases += (
            " and not triton"  # torch 2.11's wrap_triton rejects the interpreter's kernels; 2.13 runs them
        )
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/bench_cuda.py", "--benchmark-disable", "-q", "-p", "no:cacheprovider",
         "-k", cases],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "failed" not in r.stdout
