"""IQ3_S on the GPU: f16 d, qs[64], qh[8], signs[32], scales[4] (256 weights, 110 bytes).

Group k of 4 weights is grid entry qs[k] | (bit k % 8 of qh[k // 8]) << 8 (4 odd values 1..15 of
512 entries); signs: bit l of byte m is the minus sign of weight 8m + l; sub-block g of 32 weights
has the 4-bit scale s (nibble g of scales, low first). weight = d * (1 + 2s) * grid value * sign."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import cuda, float32

from flashmoe_gguf.kernels.cpu.iq3_s import TAB

from .common import f16_at, make_format

QTYPE = GGMLQuantizationType.IQ3_S
BLOCK = 256
BYTES = 110


@cuda.jit(device=True, inline=True)
def deq(w, r, o, i):
    grid = cuda.const.array_like(TAB)  # [512 * 4] u8
    k = i >> 2
    g = i >> 5
    gi = np.int32(w[r, o + 2 + k]) | (((np.int32(w[r, o + 66 + g]) >> (k & 7)) & 1) << 8)
    s = (np.int32(w[r, o + 106 + (g >> 1)]) >> (4 * (g & 1))) & 15
    v = f16_at(w, r, o) * float32(1 + 2 * s) * float32(grid[4 * gi + (i & 3)])
    if (np.int32(w[r, o + 74 + (i >> 3)]) >> (i & 7)) & 1:
        v = -v
    return v


matvec, matmul, dequantize_rows = make_format(deq, BLOCK, BYTES)
