"""Every Triton twin (torch.ops.qops_triton.<name>, qops/triton/__init__.py) checked the same way: its output
against qops.reference, its gradients (the qops op's autograd formula over the twin backward op) against the qops
op's, its schema and autograd registration (opcheck), and the errors of the qops op. On machines without a GPU
the kernels run under the Triton interpreter (TRITON_INTERPRET=1, tests/conftest.py), on small shapes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qops import reference as R
from qops.mixed_quant_conv import MixedQuantConvSpec, op_args

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _mixed_reference(x, weights, probs, w_bits, a_bits, w_scales, a_scales, a_signed, groups, dilations, stride,
                     bias=None, mode="quant", seed=0):  # fmt: skip
    """qops.reference.mixed_quant_conv on the op's flat arguments."""
    spec = MixedQuantConvSpec(w_bits, a_bits, groups, dilations, a_signed, stride, mode)
    return R.mixed_quant_conv(x, weights, probs, w_scales, a_scales, bias, spec, seed)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEVICE).requires_grad_()


def _fake_quant_case(axis, layout):
    g = torch.Generator().manual_seed(3 + axis)
    x = torch.randn(3, 5, 7, generator=g) * 3
    if layout == "transposed":
        x = x.transpose(0, 2).contiguous().transpose(0, 2)
    channels = 1 if axis == -1 else x.shape[axis]
    s = torch.rand(channels, generator=g) * 0.3 + 0.05
    z = torch.randn(channels, generator=g).round()
    return (_leaf(x), _leaf(s), _leaf(z), axis, -8, 7, 0.5), dict(rtol=0, atol=0), dict(rtol=1e-5, atol=1e-5)


def _quant_noise_case(axis, dtype, dist):
    x = (torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(5)) * 2).to(dtype)
    if dtype == torch.float32:
        x[0, 0, 0], x[2, 4, 6] = -3e38, 3e38  # a range wider than float32's largest value
    tol = dict(rtol=1e-15, atol=0) if dtype == torch.float64 else dict(rtol=0, atol=0)  # float64: not fused
    return (_leaf(x), 6, -42, axis, dist), tol, dict(rtol=0, atol=0)


def _mixed_case(mode, layout):
    g = torch.Generator().manual_seed(7)
    cands = [(1, 1, 1, 1), (3, 3, 3, 1), (3, 1, 1, 2)]  # (kh, kw, groups, dilation)
    x = torch.randn(2, 6, 7, 9, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weights = [_leaf(0.3 * torch.randn(6, 6 // grp, kh, kw, generator=g)) for kh, kw, grp, _ in cands]
    w_bits, a_bits = [0, 4], [3, 8, 0]
    probs = torch.rand(len(cands), len(w_bits), len(a_bits), generator=g)
    w_scales = 0.02 + 0.05 * torch.rand(len(cands), len(w_bits), generator=g)
    a_scales = 0.05 + 0.1 * torch.rand(len(a_bits), generator=g)
    spec = MixedQuantConvSpec(w_bits, a_bits, [c[2] for c in cands], [c[3] for c in cands], True, 2, mode)
    bias = torch.randn(6, generator=g)
    args = op_args(_leaf(x), weights, _leaf(probs), _leaf(w_scales), _leaf(a_scales), _leaf(bias), spec, 99)
    return args, dict(rtol=1e-4, atol=1e-5), dict(rtol=2e-3, atol=1e-5)


CASES = {
    "fake_quant per tensor": ("fake_quant", lambda: _fake_quant_case(-1, "contiguous"), R.fake_quant),
    "fake_quant per channel, transposed x": (
        "fake_quant",
        lambda: _fake_quant_case(1, "transposed"),
        R.fake_quant,
    ),
    "quant_noise float32": (
        "quant_noise",
        lambda: _quant_noise_case(-1, torch.float32, "gaussian"),
        R.quant_noise,
    ),
    "quant_noise per axis": (
        "quant_noise",
        lambda: _quant_noise_case(1, torch.float32, "uniform"),
        R.quant_noise,
    ),
    "quant_noise float64": (
        "quant_noise",
        lambda: _quant_noise_case(-2, torch.float64, "gaussian"),
        R.quant_noise,
    ),
    "quant_noise float16": (
        "quant_noise",
        lambda: _quant_noise_case(-1, torch.float16, "uniform"),
        R.quant_noise,
    ),
    "mixed_quant_conv": ("mixed_quant_conv", lambda: _mixed_case("quant", "nchw"), _mixed_reference),
    "mixed_quant_conv channels-last": (
        "mixed_quant_conv",
        lambda: _mixed_case("quant", "channels_last"),
        _mixed_reference,
    ),
    "mixed_quant_conv noise": ("mixed_quant_conv", lambda: _mixed_case("noise", "nchw"), _mixed_reference),
}


@pytest.mark.parametrize("case", list(CASES))
def test_twin_matches_reference(case):
    name, make, reference = CASES[case]
    args, fwd_tol, grad_tol = make()
    twin, op = getattr(torch.ops.qops_triton, name), getattr(torch.ops.qops, name)
    y = twin(*args)
    torch.testing.assert_close(y.cpu(), reference(*args).detach().cpu(), equal_nan=True, **fwd_tol)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    leaves += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    grads = torch.autograd.grad(y, leaves, gy)
    grads_op = torch.autograd.grad(op(*args), leaves, gy)
    for k, (a, b) in enumerate(zip(grads, grads_op, strict=True)):
        assert a.shape == b.shape and a.stride() == b.stride(), k
        torch.testing.assert_close(a, b, equal_nan=True, **grad_tol)
    # The schema and the autograd registration; tracing the kernels with fake tensors needs a GPU (the
    # interpreter would run them on fake data).
    utils = {} if torch.cuda.is_available() else {"test_utils": ("test_schema", "test_autograd_registration")}
    torch.library.opcheck(twin.default, args, **utils)


def _error_cases():
    x = torch.randn(4, 3)
    s, z = torch.tensor([0.1]), torch.tensor([0.0])
    mqc = list(_mixed_case("quant", "nchw")[0])
    bad_bits = mqc.copy()
    bad_bits[3] = [1, 8]
    bad_probs = mqc.copy()
    bad_probs[2] = torch.rand(2, 2)
    return {
        "fake_quant dtype": ("fake_quant", (x.double(), s, z, -1, 0, 255)),
        "fake_quant axis": ("fake_quant", (x, s, z, 2, 0, 255)),
        "fake_quant scale numel": ("fake_quant", (x, torch.ones(3), z, -1, 0, 255)),
        "fake_quant range": ("fake_quant", (x, s, z, -1, 5, 5)),
        "fake_quant_backward grad": ("fake_quant_backward", (x.t(), x, s, z, -1, 0, 255)),
        "quant_noise bits": ("quant_noise", (x, 17, 0)),
        "quant_noise dist": ("quant_noise", (x, 4, 0, -1, "normal")),
        "quant_noise axis": ("quant_noise", (x, 4, 0, 2)),
        "mixed_quant_conv bits": ("mixed_quant_conv", tuple(bad_bits)),
        "mixed_quant_conv probs": ("mixed_quant_conv", tuple(bad_probs)),
    }


@pytest.mark.parametrize("case", list(_error_cases()))
def test_twin_raises_the_errors_of_its_op(case):
    name, args = _error_cases()[case]
    with pytest.raises(RuntimeError) as expected:
        getattr(torch.ops.qops, name)(*args)
    message = str(expected.value).split("\n")[0].split(":")[0]  # the argument's name
    with pytest.raises(RuntimeError, match=f"^{message}:"):
        getattr(torch.ops.qops_triton, name)(*args)


@pytest.mark.parametrize("name", ["fake_quant", "mixed_quant_conv"])
def test_twin_backward_ops_refuse_double_backward(name):
    args = _fake_quant_case(-1, "contiguous")[0] if name == "fake_quant" else _mixed_case("quant", "nchw")[0]
    y = getattr(torch.ops.qops_triton, name)(*args)
    (g,) = torch.autograd.grad(y.square().sum(), [args[0]], create_graph=True)
    with pytest.raises(RuntimeError, match=f"{name}: does not support double backward"):
        torch.autograd.grad(g.sum(), [args[0]])


def test_twins_stand_in_for_missing_cuda_kernels():
    """Where torch has CUDA but qops._C was built without it, every twin is the CUDA kernel of its qops op (a
    fresh process: the registration is global; torch.version.cuda is faked before qops is imported)."""
    names = [
        "fake_quant",
        "fake_quant_backward",
        "quant_noise",
        "mixed_quant_conv",
        "mixed_quant_conv_backward",
    ]
    code = (
        "import torch; torch.version.cuda = torch.version.cuda or '12.0'; import qops; "
        "assert qops._C.built_with_cuda() or qops.triton.cuda_fallback_needed(); "
        f"names = {names!r}; "
        "bad = [n for n in names if 'CUDA: registered' not in torch._C._dispatch_dump('qops::' + n)]; "
        "assert not bad, bad; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
