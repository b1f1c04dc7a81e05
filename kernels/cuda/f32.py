"""F32 on the GPU: the row bytes are viewed as float32 (no copy) and read directly."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import cuda

from .common import make_format

QTYPE = GGMLQuantizationType.F32
BLOCK = 1
BYTES = 4


@cuda.jit(device=True, inline=True)
def _deq(w, r, o, i):  # w is the float32 view: one weight per "block" of one element
    return w[r, o]


_matvec, _matmul, _dequant = make_format(_deq, 1, 1)


def _f32(w):
    return w if w.dtype == np.float32 else w.view(np.float32)


def matvec(w, x, out, stream=0):
    """out[r] = w[r] . x.   w [R, 4C] u8 (or [R, C] f32), x [C] f32, out [R] f32."""
    _matvec(_f32(w), x, out, stream)


def matmul(w, x, out, stream=0):
    _matmul(_f32(w), x, out, stream)


def dequantize_rows(w, ids, out, stream=0):
    _dequant(_f32(w), ids, out, stream)


def _matvec_ids(w, ids, div, x, out, stream=0):
    _matvec.ids(_f32(w), ids, div, x, out, stream)


matvec.ids = _matvec_ids
