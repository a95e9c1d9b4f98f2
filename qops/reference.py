"""Pure-torch references of every torch.ops.qops op: the specification the tests compare against.

Each function has the op's signature and semantics (shared/DESIGN.md, "Op contracts") and is written
for clarity, not speed. Where torch has a built-in with the same meaning (LSQ fake quantization), the
reference is that built-in.
"""

from __future__ import annotations
