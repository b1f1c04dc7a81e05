"""IQ4_XS on the GPU: f16 d, u16 scales_h, 4 bytes scales_l, 128 bytes of nibbles.

Sub-block j (32 weights) has the 6-bit scale (scales_l nibble j) | (scales_h bits 2j, 2j + 1) << 4
and bytes 8 + 16j .. 8 + 16j + 15 (low nibbles = weights 0..15, high = 16..31);
weight = d * (scale - 32) * kvalues[nibble] (the IQ4_NL levels)."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import cuda, float32

from flashmoe_gguf.kernels.cpu.iq4_xs import TABLE

from .common import f16_at, make_format

QTYPE = GGMLQuantizationType.IQ4_XS
BLOCK = 256
BYTES = 136


@cuda.jit(device=True, inline=True)
def deq(w, r, o, i):
    kv = cuda.const.array_like(TABLE)
    j = i >> 5
    l = i & 31
    q = (np.int32(w[r, o + 8 + 16 * j + (l & 15)]) >> (4 * (l >> 4))) & 15
    lo = (np.int32(w[r, o + 4 + (j >> 1)]) >> (4 * (j & 1))) & 15
    hi = (np.int32(w[r, o + 2 + (j >> 2)]) >> (2 * (j & 3))) & 3
    return f16_at(w, r, o) * float32((lo | (hi << 4)) - 32) * kv[q]


matvec, matmul, dequantize_rows = make_format(deq, BLOCK, BYTES)
