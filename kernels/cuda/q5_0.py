"""Q5_0 on the GPU: f16 d, u32 of fifth bits, 16 bytes of nibbles; weight = d * (q - 16)."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import cuda, float32

from .common import f16_at, make_format, u32_at  # noqa: F401

QTYPE = GGMLQuantizationType.Q5_0
BLOCK = 32
BYTES = 22


@cuda.jit(device=True, inline=True)
def deq(w, r, o, i):
    j = i & 15
    q = (np.int32(w[r, o + 6 + j]) >> (4 * (i >> 4))) & 15
    q |= np.int32((u32_at(w, r, o + 2) >> i) & 1) << 4
    return f16_at(w, r, o) * float32(q - 16)


matvec, matmul, dequantize_rows = make_format(deq, BLOCK, BYTES)
