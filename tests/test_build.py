"""The extension loads, reports its build and dispatches to a CPU ISA the machine supports."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qops


def test_ops_registered():
    for name in (
        "fake_quant",
        "fake_quant_backward",
        "quant_noise",
        "pack_weight",
        "packed_conv2d",
        "quantized_conv2d",
        "requantized_conv2d",
        "requantize",
        "quantized_add",
        "mixed_quant_conv",
        "mixed_quant_conv_backward",
    ):
        assert hasattr(torch.ops.qops, name), name


def test_cpu_isa_is_supported_by_this_cpu():
    feats = qops.cpu_features()
    isa = qops.cpu_isa()
    assert isa in ("DEFAULT", "AVX2", "AVX512")
    if isa == "AVX2":
        assert feats["avx2"] and feats["fma"]
    if isa == "AVX512":
        assert feats["avx512f"] and feats["avx512bw"]


def test_set_cpu_isa_round_trip():
    best = qops._C.max_cpu_isa()
    try:
        qops.set_cpu_isa("DEFAULT")
        assert qops.cpu_isa() == "DEFAULT"
    finally:
        qops.set_cpu_isa(best)
    assert qops.cpu_isa() == best


def test_set_cpu_isa_rejects_unknown_name():
    with pytest.raises(ValueError, match="isa: unknown CPU ISA"):
        qops.set_cpu_isa("SSE9")


def test_env_caps_isa_in_a_fresh_process():
    out = subprocess.run(
        [sys.executable, "-c", "import qops; print(qops.cpu_isa())"],
        env={**__import__("os").environ, "QOPS_CPU_ISA": "DEFAULT"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "DEFAULT"


def test_no_wide_vector_code_outside_isa_namespaces():
    """Inline functions shared by the per-ISA copies of csrc/cpu/kernels must keep their baseline copy
    (link order, setup.py): AVX2/AVX-512 instructions may only appear in functions of the AVX2/AVX512
    namespaces, or a CPU without them would crash in shared code."""
    import shutil

    if shutil.which("objdump") is None:
        pytest.skip("objdump not found")
    so = qops._C.__file__
    dis = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", so], capture_output=True, text=True
    ).stdout
    bad = set()
    func = None
    for line in dis.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            func = m.group(1)
            continue
        if func and ("%ymm" in line or "%zmm" in line):
            if "AVX2::" not in func and "AVX512::" not in func:
                bad.add(func)
    assert not bad, f"wide vector code outside the ISA namespaces: {sorted(bad)[:10]}"


def _parallel_for_calls(text: str):
    """(begin, end, grain) source text of every at::parallel_for call in `text`."""
    calls = []
    for m in re.finditer(r"at::parallel_for\(", text):
        depth, args, start = 1, [], m.end()
        for i in range(m.end(), len(text)):
            c = text[i]
            if c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
            elif c == "," and depth == 1:
                args.append(text[start:i].strip())
                start = i + 1
                if len(args) == 3:
                    break
        calls.append(tuple(args))
    return calls


def test_every_parallel_for_has_a_grain_size():
    """A parallel_for without a grain size splits tiny problems over every thread: with 2 threads on a shared
    machine a parked second thread costs a scheduler quantum, tens of times a small convolution. Every
    at::parallel_for in csrc/ passes a grain computed from the work (parallel_grain, in
    csrc/include/qops/parallel_grain.h, or fake_quant's task plan), never a constant, except a loop over workers
    that claim grain-sized chunks themselves (its range is the thread count)."""
    root = Path(__file__).resolve().parents[1] / "csrc"
    calls = []
    for path in sorted(root.rglob("*.cpp")):
        calls += [(path.name, *c) for c in _parallel_for_calls(path.read_text())]
    assert len(calls) >= 10
    bad = [c for c in calls if re.fullmatch(r"[0-9]+", c[3]) and "get_num_threads()" not in c[2]]
    assert not bad, f"at::parallel_for with a constant grain: {bad}"


def test_cmake_builds_with_the_standard_of_setup_py():
    """`make cuda-check` (CMakeLists.txt) must compile the sources as setup.py does, or code that only one
    standard accepts slips through."""
    root = Path(__file__).resolve().parents[1]
    setup_std = set(re.findall(r"-std=c\+\+(\d+)", (root / "setup.py").read_text()))
    cmake = (root / "CMakeLists.txt").read_text()
    assert "set(CMAKE_CXX_STANDARD" not in cmake and "set(CMAKE_CUDA_STANDARD" not in cmake  # per target
    cmake_std = set(re.findall(r"QOPS_CXX_STANDARD (\d+)", cmake))
    assert len(setup_std) == 1 and cmake_std == setup_std, (setup_std, cmake_std)
    for use in ("-std=c++${QOPS_CXX_STANDARD}", "CXX_STANDARD ${QOPS_CXX_STANDARD}"):
        assert use in cmake
