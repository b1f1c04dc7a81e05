"""Q4_K on the GPU: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins for 8 sub-blocks of 32, 128 bytes of nibbles.

Chunk c (64 weights) uses bytes 32c..32c+31: low nibbles are sub-block 2c, high nibbles 2c + 1.
weight = d * scale * q - dmin * min."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import cuda, float32

from .common import f16_at, make_format, u32_at  # noqa: F401

QTYPE = GGMLQuantizationType.Q4_K
BLOCK = 256
BYTES = 144


@cuda.jit(device=True, inline=True)
def deq(w, r, o, i):
    c = i >> 6
    hi = (i >> 5) & 1
    q = (np.int32(w[r, o + 16 + 32 * c + (i & 31)]) >> (4 * hi)) & 15
    s = 2 * c + hi
    if s < 4:
        sc = np.int32(w[r, o + 4 + s]) & 63
        mn = np.int32(w[r, o + 8 + s]) & 63
    else:
        sc = (np.int32(w[r, o + 8 + s]) & 15) | ((np.int32(w[r, o + s]) >> 6) << 4)
        mn = (np.int32(w[r, o + 8 + s]) >> 4) | ((np.int32(w[r, o + 4 + s]) >> 6) << 4)
    return f16_at(w, r, o) * float32(sc * q) - f16_at(w, r, o + 2) * float32(mn)


matvec, matmul, dequantize_rows = make_format(deq, BLOCK, BYTES)
