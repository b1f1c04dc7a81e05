"""Q4_0 quantizer: float32 rows -> ggml's block_q4_0 bytes.

block_q4_0 (18 bytes per 32 values): f16 d, qs[16] (value j in the low nibble of byte j, value
j + 16 in the high nibble);  y = d * (q - 8), q in [0, 15].
The scale is searched (both ends of the asymmetric range [-8, 7]) with a least-squares fit.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .quant_common import new_work, prepare, put_f16, sym_codes, sym_fit, sym_pick_f16

QK = 32
TYPE_SIZE = 18


@njit(fastmath=True, cache=True)
def _block(x, w, out, L, work):
    s, _ = sym_fit(x, w, -8, 7, 6, 0.1, True, work)
    d = sym_pick_f16(x, w, s, -8, 7, work)
    put_f16(out, 0, d)
    sym_codes(x, d, -8, 7, L)  # L = q + 8
    for j in range(16):
        out[2 + j] = L[j] | (L[j + 16] << 4)


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
    """float32 [R, C] (C a multiple of 32) -> uint8 [R, C // 32 * 18] in Q4_0 layout.

    importance: optional float32 [C], the weight of each column in the squared error minimised.
    """
    x, w = prepare(x, importance, QK, "Q4_0")
    out = np.empty((x.shape[0], x.shape[1] // QK * TYPE_SIZE), np.uint8)
    _quantize_rows(x, w, out)
    return out
