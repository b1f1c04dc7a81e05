"""Q8_0 quantizer: float32 rows -> ggml's block_q8_0 bytes.

block_q8_0 (34 bytes per 32 values): f16 d, int8 qs[32];  y = d * q.
The scale is searched around max|x| / 127 with a least-squares fit; codes stay in [-127, 127]
(as ggml's, so that no kernel meets -128).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .quant_common import new_work, prepare, put_f16, sym_codes, sym_fit, sym_pick_f16

QK = 32
TYPE_SIZE = 34


@njit(fastmath=True, cache=True)
def _block(x, w, out, L, work):
    s, _ = sym_fit(x, w, -127, 127, 4, 0.5, False, work)
    d = sym_pick_f16(x, w, s, -127, 127, work)
    put_f16(out, 0, d)
    sym_codes(x, d, -127, 127, L)  # L = q + 127
    for i in range(QK):
        out[2 + i] = np.uint8((np.int32(L[i]) - 127) & 0xFF)


@njit(parallel=True, fastmath=True, cache=True)
def _quantize_rows(x, w, out):
    rows, cols = x.shape
    nb = cols // QK
    for r in prange(rows):
        L = np.empty(QK, np.uint8)
        work = new_work()
        for b in range(nb):
            _block(x[r, b * QK:(b + 1) * QK], w[b * QK:(b + 1) * QK],
                   out[r, b * TYPE_SIZE:(b + 1) * TYPE_SIZE], L, work)


def quantize(x, importance=None):
    """float32 [R, C] (C a multiple of 32) -> uint8 [R, C // 32 * 34] in Q8_0 layout.

    importance: optional float32 [C], the weight of each column in the squared error minimised.
    """
    x, w = prepare(x, importance, QK, "Q8_0")
    out = np.empty((x.shape[0], x.shape[1] // QK * TYPE_SIZE), np.uint8)
    _quantize_rows(x, w, out)
    return out
