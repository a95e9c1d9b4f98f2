"""Triton twins of the qops ops: ``torch.ops.qops_triton.<name>`` for every op that has a Triton kernel
(fake_quant and fake_quant_backward, quant_noise, mixed_quant_conv and mixed_quant_conv_backward).

One policy for all of them, applied by :func:`register_twins`:

* a twin has the qops op's name, signature and semantics in the namespace ``qops_triton``; it is a
  ``torch.library.triton_op``, whose schema comes from the Python signature (kept identical to csrc/ops.cpp's:
  the one place outside csrc/ops.cpp where a schema is written);
* it has the qops op's autograd formula (``register_autograd(namespace)`` of the op's module in qops), whose
  backward calls the twin backward op, and whose backward ops refuse double backward alike;
* where torch has CUDA but qops._C was built without it, the twin's implementation is also registered as the CUDA
  kernel of the qops op, so that CUDA tensors work without compiling csrc/cuda;
* argument checks are the qops op's Python checks (the fake kernels'); scale values are not read (that would
  need a device-to-host sync), so an unusable scale gives NaN outputs where the CPU kernels raise;
* tests/test_triton_twins.py checks every twin the same way: values and gradients against qops.reference, and
  the errors of the qops op.

``import qops`` imports this package where triton is installed, which registers every twin.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.library import triton_op

from qops import _C

NAMESPACE = "qops_triton"


def register_twins(register_autograd: Callable[[str], None], impls: dict[str, Callable]) -> dict[str, object]:
    """Registers each ``impls[name]`` (same signature as ``torch.ops.qops.<name>``) as
    ``torch.ops.qops_triton.<name>``, then the qops op's autograd formula for them (``register_autograd`` of the
    op's module, called with this namespace), and, where torch has CUDA but qops._C has no CUDA kernels, each
    implementation as the CUDA kernel of ``qops::<name>``. Returns the registered ops by name."""
    ops = {name: triton_op(f"{NAMESPACE}::{name}", mutates_args=())(impl) for name, impl in impls.items()}
    register_autograd(NAMESPACE)
    if cuda_fallback_needed():
        for name, impl in impls.items():
            torch.library.register_kernel(f"qops::{name}", "cuda", impl)
    return ops


def cuda_fallback_needed() -> bool:
    """Whether the Triton kernels stand in for the CUDA kernels of the qops ops (torch has CUDA, qops._C not)."""
    return torch.version.cuda is not None and not _C.built_with_cuda()


from . import fake_quant, mixed_quant_conv, quant_noise  # noqa: E402,F401  (registers the twins)
