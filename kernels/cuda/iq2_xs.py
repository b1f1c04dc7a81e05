"""IQ2_XS on the GPU: f16 d, qs[32] u16, scales[8] (256 weights, 74 bytes).

Group k of 8 weights: qs[k] bits 0..8 index the grid (8 values of 512 entries), bits 9..15 are
7 sign bits (the eighth makes the count of minus signs even: KSIGNS); weights 16m..16m+15 have
the 4-bit scale s = nibble m of scales (low first). weight = d * (0.5 + s) / 4 * grid value * sign."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import cuda, float32

from flashmoe_gguf.kernels.cpu.iq2_xs import KSIGNS, TAB

from .common import f16_at, make_format

QTYPE = GGMLQuantizationType.IQ2_XS
BLOCK = 256
BYTES = 74


@cuda.jit(device=True, inline=True)
def deq(w, r, o, i):
    grid = cuda.const.array_like(TAB)  # [512 * 8] u8
    ks = cuda.const.array_like(KSIGNS)
    qo = o + 2 + 2 * (i >> 3)
    q = np.int32(w[r, qo]) | (np.int32(w[r, qo + 1]) << 8)
    s = (np.int32(w[r, o + 66 + (i >> 5)]) >> (4 * ((i >> 4) & 1))) & 15
    db = f16_at(w, r, o) * (float32(0.5) + float32(s)) * float32(0.25)
    v = db * float32(grid[8 * (q & 511) + (i & 7)])
    if (np.int32(ks[q >> 9]) >> (i & 7)) & 1:
        v = -v
    return v


matvec, matmul, dequantize_rows = make_format(deq, BLOCK, BYTES)
