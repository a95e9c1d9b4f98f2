"""The extension loads, reports its build and dispatches to a CPU ISA the machine supports."""

import subprocess
import sys

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
    import re
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
