"""Q8_0 on the GPU: f16 d, 32 int8 quants; weight = d * q."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import cuda, float32

from .common import f16_at, make_format, u32_at  # noqa: F401

QTYPE = GGMLQuantizationType.Q8_0
BLOCK = 32
BYTES = 34


@cuda.jit(device=True, inline=True)
def deq(w, r, o, i):
    q = np.int32(w[r, o + 2 + i])
    if q >= 128:
        q -= 256
    return f16_at(w, r, o) * float32(q)


@cuda.jit(device=True, inline=True)
def block_dot(w, r, o, x, xo):
    s = float32(0.0)
    for j in range(32):
        q = np.int32(w[r, o + 2 + j])
        if q >= 128:
            q -= 256
        s += float32(q) * x[xo + j]
    return f16_at(w, r, o) * s


matvec, matmul, dequantize_rows = make_format(deq, BLOCK, BYTES, block_dot)
