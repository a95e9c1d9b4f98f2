"""The GPU table: every qops kernel on CUDA against its baseline on the same device, in one run
(`make gpu-check` runs this file and reports it; without a GPU every case is skipped).

Groups (each times the baseline and ours on identical inputs):

- fake_quant fwd+bwd (LSQ, Esser et al., ICLR 2020), per tensor and per channel, 16x64x128x128 float32
  (64 MiB: past the L2 cache): torch._fake_quantize_learnable_* (baseline), the composite, qops CUDA and
  qops Triton; bytes are the minimal traffic, so GB/s compares with the device-to-device copy group;
- device-to-device copy of the same 64 MiB: the bandwidth ceiling that fake_quant and quant_noise are
  read against (bytes read + written);
- quant_noise, per tensor and per channel: the torch composite (baseline), qops CUDA, qops Triton;
- mixed_quant_conv fwd+bwd, the QuantNAS basic layer and the RFDN layer at batch 16 of 48x48
  (bench/bench_mixed_quant_conv.py): the naive per-candidate loop on cuDNN (baseline), the fused op, and its
  Triton variant (qops.triton.mixed_quant_conv); a noise-mode group for the QuantNAS layer;
- one QuantNAS search step (Shvetsov et al., arXiv:2208.14839), basic space x4, batch 16 of 48x48 LR
  (bench/bench_search_step.py), naive vs fused, quant and noise mode;
- 64->64 3x3 convolution at 1x64x256x256 and 16x64x96x96: cuDNN fp16 channels-last (baseline), int8
  through torch (an im2col matrix and torch._int_mm, cuBLASLt; torch exposes no int8 convolution on
  CUDA), the int8 GEMM alone, and ours: packed_conv2d (codes -> int32) and quantized_conv2d (float ->
  float) at w8a8, w4a4, w2a2, w1a1.

QNAS_BENCH_DEVICE=cpu runs the same cases on tiny shapes (Triton under its interpreter): a check that
the file runs, not a measurement.

    python -m pytest bench/bench_cuda.py --benchmark-only --benchmark-json=build/gpu.json -q
    python bench/report.py build/gpu.json
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from qops.mixed_quant_conv import mixed_quant_conv as fused_mqc
from qops.mixed_quant_conv import op_args
from qops.packed import pack_weight, packed_conv2d, quantized_conv2d
from qops.reference import mixed_quant_conv as naive_mqc

DEVICE = os.environ.get("QNAS_BENCH_DEVICE", "cuda")
ON_GPU = DEVICE == "cuda"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# Big shapes on the GPU; tiny ones for the CPU check.
ELEMENTWISE = (16, 64, 128, 128) if ON_GPU else (2, 4, 6, 6)
LAYER_BATCH, LAYER_SIZE = (16, 48) if ON_GPU else (2, 6)
STEP_BATCH, STEP_LR = (16, 48) if ON_GPU else (2, 6)
CONV_SIZES = [(1, 256), (16, 96)] if ON_GPU else [(1, 8)]
CONV_BITS = [(8, 8), (4, 4), (2, 2), (1, 1)]
CIN = COUT = 64
ROUNDS = 15
STEP_ROUNDS = 10


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


def _bench(bench, fn, **kw):
    fn()  # warm-up outside the timing: kernel loading, Triton compilation, cuDNN plans
    return bench(fn, sync=_sync, rounds=kw.pop("rounds", ROUNDS), **kw)


def _shape_name(shape) -> str:
    return "x".join(map(str, shape))


def _triton_or_skip():
    try:
        import qops.triton.fake_quant  # noqa: F401
        import qops.triton.mixed_quant_conv  # noqa: F401
        import qops.triton.quant_noise  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed")


# -- fake_quant and the copy it is read against ------------------------------------------------------


FAKE_QUANT = ["torch builtin", "composite LSQ", "qops", "qops triton"]


def _fake_quant_fn(impl: str):
    from bench_fake_quant import GRAD_FACTOR, IMPLS, QMAX, QMIN

    if impl != "qops triton":
        return IMPLS[impl]
    _triton_or_skip()
    return lambda x, s, z, axis: torch.ops.qops_triton.fake_quant(x, s, z, axis, QMIN, QMAX, GRAD_FACTOR)


@pytest.mark.parametrize("impl", FAKE_QUANT)
@pytest.mark.parametrize("axis", [-1, 1], ids=["per_tensor", "per_channel"])
def test_fake_quant_fwd_bwd(bench, impl, axis):
    from bench_fake_quant import _inputs

    fn = _fake_quant_fn(impl)
    x, grad, s, z = _inputs(axis != -1, ELEMENTWISE, DEVICE)
    leaves = [t.requires_grad_() for t in (x, s, z)]
    _bench(
        bench,
        lambda: torch.autograd.grad(fn(*leaves, axis), leaves, grad),
        group=f"fake_quant fwd+bwd {'per-tensor' if axis == -1 else 'per-channel'} {_shape_name(ELEMENTWISE)} f32",
        impl=impl,
        baseline=impl == "torch builtin",
        bytes=5 * x.numel() * x.element_size(),
    )


def test_device_copy(bench):
    src = torch.randn(ELEMENTWISE, device=DEVICE)
    dst = torch.empty_like(src)
    _bench(
        bench,
        lambda: dst.copy_(src),
        group=f"device-to-device copy {_shape_name(ELEMENTWISE)} f32",
        impl="torch copy_",
        baseline=True,
        bytes=2 * src.numel() * src.element_size(),
    )


# -- quant_noise -----------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch composite", "qops", "qops triton"])
@pytest.mark.parametrize("axis", [-1, 1], ids=["per_tensor", "per_channel"])
def test_quant_noise(bench, impl, axis):
    from bench_quant_noise import BITS, torch_quant_noise

    if impl == "qops triton":
        _triton_or_skip()
        fn = lambda x: torch.ops.qops_triton.quant_noise(x, BITS, 1234, axis, "gaussian")  # noqa: E731
    elif impl == "qops":
        fn = lambda x: torch.ops.qops.quant_noise(x, BITS, 1234, axis, "gaussian")  # noqa: E731
    else:
        fn = lambda x: torch_quant_noise(x, BITS, axis, "gaussian")  # noqa: E731
    x = torch.randn(ELEMENTWISE, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    _bench(
        bench,
        lambda: fn(x),
        group=f"quant_noise {_shape_name(ELEMENTWISE)} f32 {'per-tensor' if axis == -1 else 'per-channel'} gaussian",
        impl=impl,
        baseline=impl == "torch composite",
        bytes=2 * x.numel() * x.element_size(),
    )


# -- mixed_quant_conv ------------------------------------------------------------------------------


def _mqc_step(impl, args, leaves, terms, mode):
    from bench_mixed_quant_conv import _naive_noise_loop

    for t in leaves:
        t.grad = None
    if impl == "naive":
        y = _naive_noise_loop(*args, terms) if mode == "noise" else naive_mqc(*args, terms=terms)
    else:
        call = (*args[:6], dataclasses.replace(args[6], mode=mode))
        if impl == "triton":
            y = torch.ops.qops_triton.mixed_quant_conv(*op_args(*call))
        else:
            y = fused_mqc(*call)
    y.backward(torch.ones_like(y))


@pytest.mark.parametrize("impl", ["naive", "fused", "triton"])
@pytest.mark.parametrize("layer,mode", [("quantnas", "quant"), ("rfdn", "quant"), ("quantnas", "noise")])
def test_mixed_quant_conv_fwd_bwd(bench, layer, mode, impl):
    from bench_mixed_quant_conv import LAYERS, _layer

    if impl == "triton":
        _triton_or_skip()
    # The naive loop gets NCHW (what a plain PyTorch supernet hands over); the fused ops channels-last,
    # the layout they return, so a stack of them stays channels-last.
    args, leaves, terms, macs = _layer(layer, impl != "naive", DEVICE, LAYER_BATCH, LAYER_SIZE)
    _mqc_step(impl, args, leaves, terms, mode)
    peak = None
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _mqc_step(impl, args, leaves, terms, mode)
        peak = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    _bench(
        bench,
        lambda: _mqc_step(impl, args, leaves, terms, mode),
        group=f"mixed_quant_conv {layer} c={LAYERS[layer]['c']} {mode} mode fwd+bwd b{LAYER_BATCH} {LAYER_SIZE}x{LAYER_SIZE}",
        impl=impl,
        baseline=impl == "naive",
        ops=6 * macs,  # the naive terms' multiply-adds, forward + two backward convolutions
        peak_mb=peak,
    )


# -- a whole search step ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["naive", "fused"])
@pytest.mark.parametrize("mode", ["quant", "noise"])
def test_search_step(bench, mode, impl):
    from bench_search_step import SCALE, _setup

    step = _setup(mode, impl, DEVICE, STEP_BATCH, STEP_LR * SCALE)
    _bench(
        bench,
        step,
        group=f"search step basic x{SCALE} b{STEP_BATCH} LR {STEP_LR}x{STEP_LR}, mode {mode}",
        impl=impl,
        baseline=impl == "naive",
        rounds=STEP_ROUNDS,
    )


# -- low-bit convolution ---------------------------------------------------------------------------


def _conv_group(n: int, h: int) -> str:
    return f"conv3x3 64->64 {n}x64x{h}x{h}"


def _conv_ops(n: int, h: int) -> int:
    return 2 * n * COUT * CIN * 9 * h * h


def _codes(bits: int, gen: torch.Generator) -> torch.Tensor:
    from bench_packed_conv import _codes as codes

    return codes(bits, gen)


@pytest.mark.parametrize("n,h", CONV_SIZES, ids=[f"{n}x{h}" for n, h in CONV_SIZES])
def test_conv_cudnn_fp16(bench, n, h):
    gen = torch.Generator().manual_seed(h)
    x = torch.rand(n, CIN, h, h, generator=gen).to(DEVICE, torch.float16)
    w = (torch.randn(COUT, CIN, 3, 3, generator=gen) * 0.1).to(DEVICE, torch.float16)
    if not ON_GPU:  # CPU convolutions have no fp16 kernels everywhere: the CPU check runs float32
        x, w = x.float(), w.float()
    x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    _bench(
        bench,
        lambda: torch.nn.functional.conv2d(x, w, padding=1),
        group=_conv_group(n, h),
        impl="cuDNN fp16 conv, channels_last",
        baseline=True,
        ops=_conv_ops(n, h),
    )


def im2col_3x3(x_nhwc: torch.Tensor) -> torch.Tensor:
    """[N, H, W, C] -> [N*H*W, 9*C], rows (kh, kw, c) of the zero-padded 3x3 windows (any dtype)."""
    n, h, w, c = x_nhwc.shape
    xp = torch.nn.functional.pad(x_nhwc, (0, 0, 1, 1, 1, 1))
    cols = torch.stack([xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)], dim=3)
    return cols.reshape(n * h * w, 9 * c)


def int8_conv_operands(n: int, h: int, device: str):
    """int8 activations [N, H, W, C] and the weight as a [9*C, Cout] int8 matrix in a layout torch._int_mm
    accepts on `device`; checks once that im2col + torch._int_mm is the convolution (float64, exact)."""
    gen = torch.Generator().manual_seed(h)
    x = torch.randint(-128, 128, (n, h, h, CIN), generator=gen, dtype=torch.int16).to(torch.int8)
    w = torch.randint(-128, 128, (COUT, CIN, 3, 3), generator=gen, dtype=torch.int16).to(torch.int8)
    x, w = x.to(device), w.to(device)
    w_mat = w.permute(2, 3, 1, 0).reshape(9 * CIN, COUT)
    for layout in (w_mat.contiguous(), w_mat.t().contiguous().t()):  # row- or column-major
        try:
            got = torch._int_mm(im2col_3x3(x[:1]), layout)
        except RuntimeError:
            continue
        ref = torch.nn.functional.conv2d(x[:1].permute(0, 3, 1, 2).double(), w.double(), padding=1)
        assert torch.equal(got.double(), ref.permute(0, 2, 3, 1).reshape(-1, COUT)), "int8 baseline is wrong"
        return x, layout
    pytest.skip(f"torch._int_mm accepts no layout of a [{9 * CIN}, {COUT}] int8 matrix on {device}")


@pytest.mark.parametrize("gemm_only", [False, True], ids=["im2col+gemm", "gemm"])
@pytest.mark.parametrize("n,h", CONV_SIZES, ids=[f"{n}x{h}" for n, h in CONV_SIZES])
def test_conv_torch_int8(bench, n, h, gemm_only):
    x, w_mat = int8_conv_operands(n, h, DEVICE)
    if gemm_only:
        cols = im2col_3x3(x)
        fn, what = (lambda: torch._int_mm(cols, w_mat)), "int8 GEMM alone (torch._int_mm, im2col excluded)"
    else:
        fn, what = (lambda: torch._int_mm(im2col_3x3(x), w_mat)), "int8 im2col + torch._int_mm"
    _bench(bench, fn, group=_conv_group(n, h), impl=what, ops=_conv_ops(n, h))


@pytest.mark.parametrize("w_bits,a_bits", CONV_BITS, ids=[f"w{w}a{a}" for w, a in CONV_BITS])
@pytest.mark.parametrize("n,h", CONV_SIZES, ids=[f"{n}x{h}" for n, h in CONV_SIZES])
def test_conv_packed(bench, n, h, w_bits, a_bits):
    gen = torch.Generator().manual_seed(w_bits)
    w_packed = pack_weight(_codes(w_bits, gen), w_bits).to(DEVICE)
    x = torch.randint(0, 2**a_bits, (n, CIN, h, h), generator=gen, dtype=torch.int16).to(torch.uint8)
    x = x.to(DEVICE)
    _bench(
        bench,
        lambda: packed_conv2d(x, w_packed, (COUT, CIN, 3, 3), w_bits, a_bits, False, 1, 1),
        group=_conv_group(n, h),
        impl=f"ours packed_conv2d w{w_bits}a{a_bits}, codes -> int32",
        ops=_conv_ops(n, h),
    )


@pytest.mark.parametrize("w_bits,a_bits", CONV_BITS, ids=[f"w{w}a{a}" for w, a in CONV_BITS])
@pytest.mark.parametrize("n,h", CONV_SIZES, ids=[f"{n}x{h}" for n, h in CONV_SIZES])
def test_conv_quantized(bench, n, h, w_bits, a_bits):
    gen = torch.Generator().manual_seed(w_bits)
    w_packed = pack_weight(_codes(w_bits, gen), w_bits).to(DEVICE)
    x = (torch.rand(n, CIN, h, h, generator=gen) * 2).to(DEVICE)
    w_scale = torch.full((COUT,), 0.01, device=DEVICE)
    bias = torch.zeros(COUT, device=DEVICE)
    a_scale = 2 / (2**a_bits - 1)
    _bench(
        bench,
        lambda: quantized_conv2d(
            x, w_packed, (COUT, CIN, 3, 3), w_scale, a_scale, w_bits, a_bits, False, bias, 1, 1
        ),
        group=_conv_group(n, h),
        impl=f"ours quantized_conv2d w{w_bits}a{a_bits}, float -> float",
        ops=_conv_ops(n, h),
    )
