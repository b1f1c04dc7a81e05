"""Q4_1 on the GPU: f16 d, f16 m, 16 bytes of nibbles; weight = d * q + m."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import cuda, float32, float64

from .common import f16_at, make_format, u32_at  # noqa: F401

QTYPE = GGMLQuantizationType.Q4_1
BLOCK = 32
BYTES = 20


@cuda.jit(device=True, inline=True)
def deq(w, r, o, i):
    j = i & 15
    q = (np.int32(w[r, o + 4 + j]) >> (4 * (i >> 4))) & 15
    # d q + m rounded once (exact in float64), as the CPU's fused multiply-add gives it
    return float32(float64(f16_at(w, r, o)) * float64(q) + float64(f16_at(w, r, o + 2)))


@cuda.jit(device=True, inline=True)
def block_dot(w, r, o, x, xo):
    s = float32(0.0)
    sx = float32(0.0)
    for j in range(16):
        q = np.int32(w[r, o + 4 + j])
        x0 = x[xo + j]
        x1 = x[xo + 16 + j]
        s += float32(q & 15) * x0 + float32(q >> 4) * x1
        sx += x0 + x1
    return f16_at(w, r, o) * s + f16_at(w, r, o + 2) * sx


matvec, matmul, dequantize_rows = make_format(deq, BLOCK, BYTES, block_dot)
