"""ESP-DL's element-wise broadcasting: numpy broadcasting computed on merged axes (ARITHMETIC.md section 5).

The runtime left-pads both shapes to the output rank and folds neighbouring axes together while the fold
keeps the broadcast pattern (both inputs agree on both axes, or one input is 1 on both). The merged rank
must be at most 4, and the innermost merged length decides the kernel, so the checker and the simulator
both need this exact rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["merged_broadcast_shapes", "MAX_ELEMENTWISE_RANK"]

MAX_ELEMENTWISE_RANK = 4


def merged_broadcast_shapes(a: Sequence[int], b: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    """The merged shapes ``(a, b, out)`` the runtime iterates over; all three have the same rank.

    Raises:
        ValueError: the shapes do not broadcast (numpy's rule).
    """
    out = list(np.broadcast_shapes(tuple(a), tuple(b)))
    rank = len(out)
    if rank == 0:
        return [1], [1], [1]
    padded_a = [1] * (rank - len(a)) + [int(d) for d in a]
    padded_b = [1] * (rank - len(b)) + [int(d) for d in b]
    merged_a, merged_b, merged_out = [padded_a[0]], [padded_b[0]], [out[0]]
    for axis in range(1, rank):
        da, db = padded_a[axis], padded_b[axis]
        same = merged_a[-1] == merged_b[-1] and da == db
        a_scalar = merged_a[-1] == 1 and da == 1
        b_scalar = merged_b[-1] == 1 and db == 1
        if same or a_scalar or b_scalar:
            merged_a[-1] *= da
            merged_b[-1] *= db
            merged_out[-1] *= out[axis]
        else:
            merged_a.append(da)
            merged_b.append(db)
            merged_out.append(out[axis])
    return merged_a, merged_b, merged_out
