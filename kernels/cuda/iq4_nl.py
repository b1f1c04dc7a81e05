"""IQ4_NL on the GPU: f16 d, 16 bytes of nibbles (low = weights 0..15, high = 16..31);
weight = d * kvalues[nibble], the 16 non-linear levels -127..113."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import cuda, float32

from flashmoe_gguf.kernels.cpu.iq4_nl import TABLE

from .common import f16_at, make_format

QTYPE = GGMLQuantizationType.IQ4_NL
BLOCK = 32
BYTES = 18


@cuda.jit(device=True, inline=True)
def deq(w, r, o, i):
    kv = cuda.const.array_like(TABLE)
    q = (np.int32(w[r, o + 2 + (i & 15)]) >> (4 * (i >> 4))) & 15
    return f16_at(w, r, o) * kv[q]


@cuda.jit(device=True, inline=True)
def block_dot(w, r, o, x, xo):
    kv = cuda.const.array_like(TABLE)
    s = float32(0.0)
    for j in range(16):
        q = np.int32(w[r, o + 2 + j])
        s += kv[q & 15] * x[xo + j] + kv[q >> 4] * x[xo + 16 + j]
    return f16_at(w, r, o) * s


matvec, matmul, dequantize_rows = make_format(deq, BLOCK, BYTES, block_dot)
