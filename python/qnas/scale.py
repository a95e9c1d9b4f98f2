"""The upscaling factors qnas supports, and the one check of a factor given by a user or a file."""

from __future__ import annotations

from qnas.errors import QnasError

SCALES = (2, 3, 4)


def check_scale(scale: object) -> int:
    """Returns `scale` as an int (numpy integers too), or raises QnasError naming it when it is not
    one of SCALES (2, 3, 4): the one check of an upscaling factor, for models, data and commands."""
    if isinstance(scale, bool) or not hasattr(scale, "__index__") or int(scale) not in SCALES:
        raise QnasError(
            f"scale {scale!r} is not supported: expected {', '.join(map(str, SCALES[:-1]))} or {SCALES[-1]}"
        )
    return int(scale)
