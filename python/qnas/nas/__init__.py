"""QuantNAS (Shvetsov et al., "QuantNAS for super resolution: searching for efficient quantization-friendly
architectures against quantization noise", arXiv:2208.14839): joint search of operations and bit-widths.

- qnas.nas.graph: a search space (qnas.spaces) instantiated for a scale, and the module that runs it;
- qnas.nas.adq: the ADQ residual block;
- qnas.nas.supernet: searched layers (torch.ops.qops.mixed_quant_conv + composites) and the supernet;
- qnas.nas.regularizers: the entropy schedule and the BitOps penalty;
- qnas.nas.search: the search loop (`qnas search`);
- qnas.nas.derive: genotypes and derived networks (network kind "genotype" for `qnas train --arch`);
- qnas.nas.report: `qnas report` (report.json, Pareto plot, markdown table).
docs/quantnas.md describes the method as implemented, docs/search_spaces.md the space format.
"""
