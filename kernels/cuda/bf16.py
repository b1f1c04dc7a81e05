"""BF16 on the GPU: each weight one little-endian bfloat16, the high half of a float32.

The two bytes shifted up by 16 are the float32's bits: the value is read by reinterpreting
them (exact, no table)."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import cuda

from .common import make_format

QTYPE = GGMLQuantizationType.BF16
BLOCK = 1
BYTES = 2


@cuda.jit(device=True, inline=True)
def deq(w, r, o, i):
    bits = np.uint32((np.uint32(w[r, o]) | (np.uint32(w[r, o + 1]) << 8)) << 16)
    return bits.view(np.float32)


matvec, matmul, dequantize_rows = make_format(deq, BLOCK, BYTES)
