"""qnas: quantization-friendly super-resolution networks (QuantNAS search, DQSS strategy search,
FQSR fully quantized training) on top of the qops kernels."""

__version__ = "0.1.0"
