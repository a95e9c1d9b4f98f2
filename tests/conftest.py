"""Shared test set-up: devices, Triton interpreter on machines without a GPU, markers."""

import os

import torch

# Triton kernels run under the interpreter where there is no GPU; it must be set before any
# @triton.jit function is defined, i.e. before qops is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI must not flake: hypothesis replays the same examples every run unless QNAS_HYPOTHESIS_RANDOM=1
# (use it locally to explore; a failure it finds becomes a fixed regression test).
settings.register_profile("qnas", derandomize=os.environ.get("QNAS_HYPOTHESIS_RANDOM") != "1")
settings.load_profile("qnas")

import qops  # noqa: E402,F401  (registers torch.ops.qops)

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


HAS_TRITON = _has_triton()
# torch before 2.13 refuses interpreted Triton kernels in torch.library.wrap_triton (the Triton twins are
# triton_ops): under the interpreter their tests need 2.13; with a GPU they run natively on any supported torch.
_TORCH = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
TRITON_TWINS_RUN = HAS_CUDA or _TORCH >= (2, 13)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_triton = pytest.mark.skip(reason="triton is not installed")
    skip_old_interpreter = pytest.mark.skip(
        reason="interpreted Triton kernels need torch >= 2.13 (no GPU here)"
    )
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "triton" in item.keywords and not HAS_TRITON:
            item.add_marker(skip_triton)
        elif "triton" in item.keywords and not TRITON_TWINS_RUN:
            item.add_marker(skip_old_interpreter)


@pytest.fixture(params=DEVICES)
def device(request):
    """Every available device: cpu, and cuda where a GPU is present."""
    return request.param


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny shapes gain nothing from more, and on a shared machine a second
    thread waits for a core at every parallel region."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
