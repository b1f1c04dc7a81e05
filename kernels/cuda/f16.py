"""F16 on the GPU: each weight one little-endian half."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import cuda, float32

from .common import f16_at, make_format, u32_at  # noqa: F401

QTYPE = GGMLQuantizationType.F16
BLOCK = 1
BYTES = 2


@cuda.jit(device=True, inline=True)
def deq(w, r, o, i):
    return f16_at(w, r, o)


matvec, matmul, dequantize_rows = make_format(deq, BLOCK, BYTES)
