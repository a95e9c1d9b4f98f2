"""The integer code range of a b-bit quantizer: one definition for every qops module (``qops.quant_range``)."""

from __future__ import annotations


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """(qmin, qmax) of ``bits``-bit codes: two's complement ``[-2^(b-1), 2^(b-1) - 1]`` when ``signed``, else
    ``[0, 2^b - 1]``.

    One bit is no exception: signed 1-bit codes are {-1, 0}, unsigned ones {0, 1}. That is what the kernels
    compute for activations (packed_conv2d / quantized_conv2d with ``a_bits=1``, and every ``quant_min`` /
    ``quant_max`` a caller derives for fake_quant). Binary weights {-1, +1} (XNOR-Net, Rastegari et al., 2016)
    are a different code set, not a range: :func:`qops.packed.weight_code_range` names it, and pack_weight
    stores it for ``bits=1``. mixed_quant_conv quantizes with 2..8 bits (0 = full precision).
    """
    if bits < 1:
        raise ValueError(f"bits: expected a bit-width >= 1, got {bits}")
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1
