"""Q2_K on the GPU: scales[16] (low nibble scale, high nibble min), qs[64], f16 d, f16 dmin.

Weight 128n + 32j + l: q = (qs[32n + l] >> 2j) & 3 with byte 8n + 2j + l // 16 of scales;
weight = d * scale * q - dmin * min."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import cuda, float32

from .common import f16_at, make_format, u32_at  # noqa: F401

QTYPE = GGMLQuantizationType.Q2_K
BLOCK = 256
BYTES = 84


@cuda.jit(device=True, inline=True)
def deq(w, r, o, i):
    n = i >> 7
    j = (i >> 5) & 3
    l = i & 31
    q = (np.int32(w[r, o + 16 + 32 * n + l]) >> (2 * j)) & 3
    s = np.int32(w[r, o + 8 * n + 2 * j + (l >> 4)])
    return f16_at(w, r, o + 80) * float32((s & 15) * q) - f16_at(w, r, o + 82) * float32(s >> 4)


matvec, matmul, dequantize_rows = make_format(deq, BLOCK, BYTES)
