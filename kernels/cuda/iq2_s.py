"""IQ2_S on the GPU: f16 d, qs[32], signs[32], qh[8], scales[8] (256 weights, 82 bytes).

Group k of 8 weights is grid entry qs[k] | ((qh[k // 4] >> 2 (k % 4)) & 3) << 8 (8 values of 1024
entries), bit l of signs[k] the minus sign of its weight l; weights 16m..16m+15 have the 4-bit
scale s = nibble m of scales (low first). weight = d * (0.5 + s) / 4 * grid value * sign."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import cuda, float32

from flashmoe_gguf.kernels.cpu.iq2_s import TAB

from .common import f16_at, make_format

QTYPE = GGMLQuantizationType.IQ2_S
BLOCK = 256
BYTES = 82


@cuda.jit(device=True, inline=True)
def deq(w, r, o, i):
    grid = cuda.const.array_like(TAB)  # [1024 * 8] u8
    k = i >> 3
    gi = np.int32(w[r, o + 2 + k]) | (((np.int32(w[r, o + 66 + (k >> 2)]) >> (2 * (k & 3))) & 3) << 8)
    s = (np.int32(w[r, o + 74 + (i >> 5)]) >> (4 * ((i >> 4) & 1))) & 15
    db = f16_at(w, r, o) * (float32(0.5) + float32(s)) * float32(0.25)
    v = db * float32(grid[8 * gi + (i & 7)])
    if (np.int32(w[r, o + 34 + k]) >> (i & 7)) & 1:
        v = -v
    return v


matvec, matmul, dequantize_rows = make_format(deq, BLOCK, BYTES)
