"""The Python API: what the `qnas` commands run, callable from Python.

Importing it registers every network kind qnas defines ("sr": qnas.quant.apply, "genotype":
qnas.nas.derive), so load_network and build_network rebuild any run.
"""

from __future__ import annotations

import qnas.nas.derive  # noqa: F401  (registers "genotype"; it imports qnas.quant.apply, which registers "sr")
from qnas.runs.network import build_network, load_network, network_scale, network_upscaler

__all__ = ["build_network", "load_network", "network_scale", "network_upscaler"]
