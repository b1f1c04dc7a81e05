"""Q5_1 on the GPU: f16 d, f16 m, u32 of fifth bits, 16 bytes of nibbles; weight = d * q + m."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import cuda, float32, float64

from .common import f16_at, make_format, u32_at  # noqa: F401

QTYPE = GGMLQuantizationType.Q5_1
BLOCK = 32
BYTES = 24


@cuda.jit(device=True, inline=True)
def deq(w, r, o, i):
    j = i & 15
    q = (np.int32(w[r, o + 8 + j]) >> (4 * (i >> 4))) & 15
    q |= np.int32((u32_at(w, r, o + 4) >> i) & 1) << 4
    # d q + m rounded once (exact in float64), as the CPU's fused multiply-add gives it
    return float32(float64(f16_at(w, r, o)) * float64(q) + float64(f16_at(w, r, o + 2)))


matvec, matmul, dequantize_rows = make_format(deq, BLOCK, BYTES)
