"""Q4_1 quantizer: float32 rows -> ggml's block_q4_1 bytes.

block_q4_1 (20 bytes per 32 values): f16 d, f16 m, qs[16] (value j in the low nibble of byte j,
value j + 16 in the high nibble);  y = d * q + m, q in [0, 15].
Scale and offset are searched with a weighted least-squares fit (ggml's make_qkx search).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .quant_common import affine_codes, affine_fit, affine_pick_f16, new_work, prepare, put_f16

QK = 32
TYPE_SIZE = 20


@njit(fastmath=True, cache=True)
def _block(x, w, out, L, work):
    s, m, _ = affine_fit(x, w, 15, -1.0, 0.25, 7, False, work)
    d, m = affine_pick_f16(x, w, s, m, 15, work)
    put_f16(out, 0, d)
    put_f16(out, 2, m)
    affine_codes(x, d, -m, 15, L)
    for j in range(16):
        out[4 + j] = L[j] | (L[j + 16] << 4)


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
    """float32 [R, C] (C a multiple of 32) -> uint8 [R, C // 32 * 20] in Q4_1 layout.

    importance: optional float32 [C], the weight of each column in the squared error minimised.
    """
    x, w = prepare(x, importance, QK, "Q4_1")
    out = np.empty((x.shape[0], x.shape[1] // QK * TYPE_SIZE), np.uint8)
    _quantize_rows(x, w, out)
    return out
