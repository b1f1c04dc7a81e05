"""Q6_K on the GPU: ql[128] low nibbles, qh[64] high 2 bits, int8 scales[16], f16 d at 208.

Weight 128n + 32s + l: low = (ql[64n + 32(s&1) + l] >> 4(s>>1)) & 15, high = (qh[32n + l] >> 2s) & 3,
scale = scales[8n + 2s + l // 16]; weight = d * scale * ((low | high << 4) - 32)."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import cuda, float32

from .common import f16_at, make_format, u32_at  # noqa: F401

QTYPE = GGMLQuantizationType.Q6_K
BLOCK = 256
BYTES = 210


@cuda.jit(device=True, inline=True)
def deq(w, r, o, i):
    n = i >> 7
    s = (i >> 5) & 3
    l = i & 31
    lo = (np.int32(w[r, o + 64 * n + 32 * (s & 1) + l]) >> (4 * (s >> 1))) & 15
    hb = (np.int32(w[r, o + 128 + 32 * n + l]) >> (2 * s)) & 3
    sc = np.int32(w[r, o + 192 + 8 * n + 2 * s + (l >> 4)])
    if sc >= 128:
        sc -= 256
    return f16_at(w, r, o + 208) * float32(sc * ((lo | (hb << 4)) - 32))


matvec, matmul, dequantize_rows = make_format(deq, BLOCK, BYTES)
