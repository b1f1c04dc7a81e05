"""Q3_K on the GPU: hmask[32], qs[64], 12 bytes of 6-bit scales, f16 d at 108.

Weight 128n + 32j + l: q = (qs[32n + l] >> 2j) & 3, minus 4 where bit 4n + j of hmask[l] is clear;
scale k = 8n + 2j + l // 16: low 4 bits from byte k (k < 8) or the high nibble of byte k - 8,
high 2 bits from byte 8 + k % 4 shifted by 2 (k // 4); weight = d * (scale - 32) * q."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import cuda, float32

from .common import f16_at, make_format, u32_at  # noqa: F401

QTYPE = GGMLQuantizationType.Q3_K
BLOCK = 256
BYTES = 110


@cuda.jit(device=True, inline=True)
def deq(w, r, o, i):
    n = i >> 7
    j = (i >> 5) & 3
    l = i & 31
    q = (np.int32(w[r, o + 32 + 32 * n + l]) >> (2 * j)) & 3
    if (np.int32(w[r, o + l]) >> (4 * n + j)) & 1 == 0:
        q -= 4
    k = 8 * n + 2 * j + (l >> 4)
    if k < 8:
        lo = np.int32(w[r, o + 96 + k]) & 15
    else:
        lo = np.int32(w[r, o + 96 + k - 8]) >> 4
    hb = (np.int32(w[r, o + 104 + (k & 3)]) >> (2 * (k >> 2))) & 3
    return f16_at(w, r, o + 108) * float32(((lo | (hb << 4)) - 32) * q)


matvec, matmul, dequantize_rows = make_format(deq, BLOCK, BYTES)
