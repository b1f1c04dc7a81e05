"""Q4_K quantizer: float32 rows -> ggml's block_q4_K bytes.

block_q4_K (144 bytes per 256 values): f16 d, f16 dmin, scales[12] (eight 6-bit scales and eight
6-bit mins, packed), qs[128] (4-bit codes). Value i of sub-block j (32 values):
    y = d * sc[j] * q[i] - dmin * m[j]
Per sub-block: a search over scale candidates with a weighted least-squares fit of scale and
min; per super-block: the 6-bit codes of the scales and mins, chosen against the real error.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .quant_common import (affine_codes, affine_fit, kquant_affine_scales, new_work, prepare,
                           put_f16)

QK = 256
TYPE_SIZE = 144


@njit(fastmath=True, cache=True)
def _block(x, w, out, scales, mins, ls, lm, L, work):
    """Quantize one super-block: x, w [256] -> out [144]."""
    for j in range(8):
        s, m, _ = affine_fit(x[32 * j:32 * j + 32], w[32 * j:32 * j + 32], 15, -1.0, 0.25, 7, True,
                             work)
        scales[j] = s
        mins[j] = -m
    d, dmin = kquant_affine_scales(x, w, 8, 32, 15, 63, scales, mins, ls, lm, work)
    put_f16(out, 0, d)
    put_f16(out, 2, dmin)
    for j in range(12):
        out[4 + j] = 0
    for j in range(8):
        s = ls[j]
        m = lm[j]
        if j < 4:
            out[4 + j] = s
            out[4 + j + 4] = m
        else:
            out[4 + j + 4] = (s & 0xF) | ((m & 0xF) << 4)
            out[4 + j - 4] |= (s >> 4) << 6
            out[4 + j] |= (m >> 4) << 6
    for j in range(8):
        affine_codes(x[32 * j:32 * j + 32], d * ls[j], dmin * lm[j], 15, L[32 * j:32 * j + 32])
    for c in range(4):
        for l in range(32):
            out[16 + 32 * c + l] = L[64 * c + l] | (L[64 * c + 32 + l] << 4)


@njit(parallel=True, fastmath=True, cache=True)
def _quantize_rows(x, w, out):
    rows, cols = x.shape
    nb = cols // QK
    for r in prange(rows):
        scales = np.empty(8, np.float64)
        mins = np.empty(8, np.float64)
        ls = np.empty(16, np.int32)
        lm = np.empty(16, np.int32)
        work = new_work()
        L = np.empty(QK, np.uint8)
        for b in range(nb):
            _block(x[r, b * QK:(b + 1) * QK], w[b * QK:(b + 1) * QK],
                   out[r, b * TYPE_SIZE:(b + 1) * TYPE_SIZE], scales, mins, ls, lm, L, work)


def quantize(x, importance=None):
    """float32 [R, C] (C a multiple of 256) -> uint8 [R, C // 256 * 144] in Q4_K layout.

    importance: optional float32 [C], the weight of each column in the squared error minimised.
    """
    x, w = prepare(x, importance, QK, "Q4_K")
    out = np.empty((x.shape[0], x.shape[1] // QK * TYPE_SIZE), np.uint8)
    _quantize_rows(x, w, out)
    return out
