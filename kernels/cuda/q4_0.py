"""Q4_0 on the GPU: f16 d, 16 bytes of nibbles (byte j: element j low, 16 + j high); weight = d * (q - 8)."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import cuda, float32

from .common import f16_at, make_format, u32_at  # noqa: F401

QTYPE = GGMLQuantizationType.Q4_0
BLOCK = 32
BYTES = 18


@cuda.jit(device=True, inline=True)
def deq(w, r, o, i):
    j = i & 15
    q = (np.int32(w[r, o + 2 + j]) >> (4 * (i >> 4))) & 15
    return f16_at(w, r, o) * float32(q - 8)


@cuda.jit(device=True, inline=True)
def block_dot(w, r, o, x, xo):
    s = float32(0.0)
    for j in range(16):
        q = np.int32(w[r, o + 2 + j])
        s += float32((q & 15) - 8) * x[xo + j] + float32((q >> 4) - 8) * x[xo + 16 + j]
    return f16_at(w, r, o) * s


matvec, matmul, dequantize_rows = make_format(deq, BLOCK, BYTES, block_dot)
