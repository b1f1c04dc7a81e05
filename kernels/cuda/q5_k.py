"""Q5_K on the GPU: as Q4_K plus 32 bytes of fifth bits (bit 2c + hi of qh[l] for chunk c).

Layout: d, dmin, scales[12], qh[32], qs[128]."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import cuda, float32

from .common import f16_at, make_format, u32_at  # noqa: F401

QTYPE = GGMLQuantizationType.Q5_K
BLOCK = 256
BYTES = 176


@cuda.jit(device=True, inline=True)
def deq(w, r, o, i):
    c = i >> 6
    hi = (i >> 5) & 1
    l = i & 31
    q = (np.int32(w[r, o + 48 + 32 * c + l]) >> (4 * hi)) & 15
    s = 2 * c + hi
    q |= ((np.int32(w[r, o + 16 + l]) >> s) & 1) << 4
    if s < 4:
        sc = np.int32(w[r, o + 4 + s]) & 63
        mn = np.int32(w[r, o + 8 + s]) & 63
    else:
        sc = (np.int32(w[r, o + 8 + s]) & 15) | ((np.int32(w[r, o + s]) >> 6) << 4)
        mn = (np.int32(w[r, o + 8 + s]) >> 4) | ((np.int32(w[r, o + 4 + s]) >> 6) << 4)
    return f16_at(w, r, o) * float32(sc * q) - f16_at(w, r, o + 2) * float32(mn)


matvec, matmul, dequantize_rows = make_format(deq, BLOCK, BYTES)
