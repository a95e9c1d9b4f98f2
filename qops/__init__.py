"""qops: the low-bit kernels of qnas as PyTorch custom ops (``torch.ops.qops.*``).

``import qops`` loads the compiled extension ``qops._C`` (which registers the op schemas and the
C++/CUDA kernels) and the Python registrations (fake tensors, autograd, Triton). The schemas are
in csrc/ops.cpp, the pure-torch reference (the contract) of every op in :mod:`qops.reference`;
docs/ARCHITECTURE.md explains the layout.
"""

from __future__ import annotations

import torch

try:
    from . import _C
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        f"qops._C (the compiled kernels) is not built or does not load: {e}. "
        "Build it against the torch in this environment with `pip install --no-build-isolation -e .` "
        "(or `make install` in the repository)."
    ) from e


# Python registrations (fake tensors, autograd) and the documented wrappers of each op.
from . import packed  # noqa: E402,F401  (pack_weight, packed_conv2d, quantized_conv2d)
from .fake_quant import fake_quant as fake_quant  # noqa: E402  (LSQ: torch.ops.qops.fake_quant)
from .mixed_quant_conv import mixed_quant_conv  # noqa: E402  (fake + autograd of the supernet op)
from .quant_noise import quant_noise  # noqa: E402  (fake + autograd of torch.ops.qops.quant_noise)
from .ranges import quant_range  # noqa: E402  (the integer code range of b bits)

__version__ = "0.1.0"


def cpu_isa() -> str:
    """The CPU instruction set the kernels dispatch to now (DEFAULT, AVX2 or AVX512)."""
    return _C.cpu_isa()


def set_cpu_isa(name: str) -> None:
    """Caps the CPU instruction set used by the kernels; ``QOPS_CPU_ISA`` does the same at start-up."""
    _C.set_cpu_isa(name)


def cpu_features() -> dict[str, bool]:
    """CPU features detected at run time."""
    return _C.cpu_features()


def built_with_cuda() -> bool:
    """Whether the CUDA kernels were compiled into qops._C."""
    return _C.built_with_cuda()


try:  # Triton twins (torch.ops.qops_triton.*, qops/triton/__init__.py): only where triton is installed
    import triton as _triton  # noqa: E402,F401
except ImportError:  # pragma: no cover - triton is optional
    pass
else:
    from . import triton  # noqa: E402,F401

__all__ = [
    "cpu_isa",
    "set_cpu_isa",
    "cpu_features",
    "built_with_cuda",
    "fake_quant",
    "quant_noise",
    "mixed_quant_conv",
    "quant_range",
    "torch",
]
