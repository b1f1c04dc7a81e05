"""MXFP4 on the GPU: u8 shared exponent e, 16 bytes of nibbles (low = weights 0..15, high =
16..31); a nibble is an E2M1 number, kept as ggml does with its levels doubled (0, 1, 2, 3, 4,
6, 8, 12 and negatives) and the scale halved: weight = 2**(e - 128) * kvalues[nibble]."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import cuda, float32

from flashmoe_gguf.kernels.cpu.mxfp4 import TABLE

from .common import make_format

QTYPE = GGMLQuantizationType.MXFP4
BLOCK = 32
BYTES = 17

# 2**(e - 128) for every exponent byte (e = 0 and 1 are float32 subnormals, exactly representable)
_SCALE = np.ldexp(np.float32(1.0), np.arange(256) - 128).astype(np.float32)


@cuda.jit(device=True, inline=True)
def deq(w, r, o, i):
    kv = cuda.const.array_like(TABLE)
    sc = cuda.const.array_like(_SCALE)
    q = (np.int32(w[r, o + 1 + (i & 15)]) >> (4 * (i >> 4))) & 15
    return sc[w[r, o]] * kv[q]


@cuda.jit(device=True, inline=True)
def block_dot(w, r, o, x, xo):
    kv = cuda.const.array_like(TABLE)
    sc = cuda.const.array_like(_SCALE)
    s = float32(0.0)
    for j in range(16):
        q = np.int32(w[r, o + 1 + j])
        s += kv[q & 15] * x[xo + j] + kv[q >> 4] * x[xo + 16 + j]
    return sc[w[r, o]] * s


matvec, matmul, dequantize_rows = make_format(deq, BLOCK, BYTES, block_dot)
