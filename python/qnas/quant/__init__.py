"""Quantizers as interchangeable strategies (DQSS), the quantization-noise stand-in (QuantNAS), ADQ.

Every quantizer is uniform and symmetric around zero (zero point 0), so that whatever a strategy
learns or calibrates, the deployed layer is the same integer convolution (qops.packed_conv2d);
strategies differ in how they choose the step (scale) and clipping, and in their gradients.
"""

from qnas.quant.quantizers import (
    QUANTIZERS,
    DoReFaQuantizer,
    FQSRQuantizer,
    HWGQQuantizer,
    LSQQuantizer,
    MinMaxQuantizer,
    MSEQuantizer,
    PACTQuantizer,
    PercentileQuantizer,
    Quantizer,
    build_quantizer,
    mse_optimal_clip,
    quant_range,
)

__all__ = [
    "QUANTIZERS",
    "DoReFaQuantizer",
    "FQSRQuantizer",
    "HWGQQuantizer",
    "LSQQuantizer",
    "MSEQuantizer",
    "MinMaxQuantizer",
    "PACTQuantizer",
    "PercentileQuantizer",
    "Quantizer",
    "build_quantizer",
    "mse_optimal_clip",
    "quant_range",
]
