"""IQ2_XXS on the GPU: f16 d and 8 sub-blocks of 32 weights in 8 bytes each (256 weights, 66 bytes).

Sub-block g: bytes 2 + 8g .. 5 + 8g are the grid indices of its 4 groups of 8 weights (8 values
of 256 entries), the u32 at 6 + 8g has group m's 7 stored sign bits at bits 7m..7m+6 (the eighth
makes the count of minus signs even: KSIGNS) and the scale s in bits 28..31.
weight = d * (0.5 + s) / 4 * grid value * sign."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import cuda, float32

from flashmoe_gguf.kernels.cpu.iq2_xxs import KSIGNS, TAB

from .common import f16_at, make_format

QTYPE = GGMLQuantizationType.IQ2_XXS
BLOCK = 256
BYTES = 66


@cuda.jit(device=True, inline=True)
def deq(w, r, o, i):
    grid = cuda.const.array_like(TAB)  # [256 * 8] u8
    ks = cuda.const.array_like(KSIGNS)
    sb = o + 2 + 8 * (i >> 5)  # the sub-block's 8 bytes
    m = (i >> 3) & 3
    gi = np.int32(w[r, sb + m])
    p = 7 * m
    bits = (np.int32(w[r, sb + 4 + (p >> 3)]) | (np.int32(w[r, sb + 5 + (p >> 3)]) << 8)) >> (p & 7)
    db = f16_at(w, r, o) * (float32(0.5) + float32(np.int32(w[r, sb + 7]) >> 4)) * float32(0.25)
    v = db * float32(grid[8 * gi + (i & 7)])
    if (np.int32(ks[bits & 127]) >> (i & 7)) & 1:
        v = -v
    return v


matvec, matmul, dequantize_rows = make_format(deq, BLOCK, BYTES)
