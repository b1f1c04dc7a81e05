"""IQ3_XXS on the GPU: f16 d, 64 grid-index bytes, 8 u32 sign/scale words (256 weights, 98 bytes).

Sub-block g (32 weights): group k of 4 weights is grid entry qs[8g + k] (4 values of 256
entries); word g at byte 66 + 4g has the 7 stored sign bits of weights 8m..8m+7 at bits 7m..7m+6
(the eighth sign makes the count of minus signs even: KSIGNS) and the scale s in bits 28..31.
weight = d * (0.5 + s) / 2 * grid value * sign."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import cuda, float32

from flashmoe_gguf.kernels.cpu.iq3_xxs import KSIGNS, TAB

from .common import f16_at, make_format

QTYPE = GGMLQuantizationType.IQ3_XXS
BLOCK = 256
BYTES = 98


@cuda.jit(device=True, inline=True)
def deq(w, r, o, i):
    grid = cuda.const.array_like(TAB)  # [256 * 4] u8
    ks = cuda.const.array_like(KSIGNS)
    g = i >> 5
    so = o + 66 + 4 * g  # the sub-block's sign/scale word
    gi = np.int32(w[r, o + 2 + (i >> 2)])
    p = 7 * ((i >> 3) & 3)  # first sign bit of the 8-weight group
    bits = (np.int32(w[r, so + (p >> 3)]) | (np.int32(w[r, so + (p >> 3) + 1]) << 8)) >> (p & 7)
    db = f16_at(w, r, o) * (float32(0.5) + float32(np.int32(w[r, so + 3]) >> 4)) * float32(0.5)
    v = db * float32(grid[4 * gi + (i & 3)])
    if (np.int32(ks[bits & 127]) >> (i & 7)) & 1:
        v = -v
    return v


matvec, matmul, dequantize_rows = make_format(deq, BLOCK, BYTES)
