"""Q5_K quantizer: float32 rows -> ggml's block_q5_K bytes.

block_q5_K (176 bytes per 256 values): f16 d, f16 dmin, scales[12] (eight 6-bit scales and eight
6-bit mins, packed as Q4_K's), qh[32] (the fifth bits), qs[128] (the low 4 bits). Value i of
sub-block j (32 values):  y = d * sc[j] * q[i] - dmin * m[j], q in [0, 31].
In each 64-value chunk c, value l (< 32) has its low bits in the low nibble of qs[32c + l] and
its fifth bit in bit 2c of qh[l]; value 32 + l the high nibble and bit 2c + 1.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .quant_common import (affine_codes, affine_fit, kquant_affine_scales, new_work, prepare,
                           put_f16)

QK = 256
TYPE_SIZE = 176


@njit(fastmath=True, cache=True)
def _block(x, w, out, scales, mins, ls, lm, L, work):
    """Quantize one super-block: x, w [256] -> out [176]."""
    for j in range(8):
        s, m, _ = affine_fit(x[32 * j:32 * j + 32], w[32 * j:32 * j + 32], 31, -1.0, 0.25, 7, True,
                             work)
        scales[j] = s
        mins[j] = -m
    d, dmin = kquant_affine_scales(x, w, 8, 32, 31, 63, scales, mins, ls, lm, work)
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
        affine_codes(x[32 * j:32 * j + 32], d * ls[j], dmin * lm[j], 31, L[32 * j:32 * j + 32])
    for l in range(32):
        out[16 + l] = 0
    for c in range(4):
        for l in range(32):
            lo = L[64 * c + l]
            hi = L[64 * c + 32 + l]
            out[48 + 32 * c + l] = (lo & 0xF) | ((hi & 0xF) << 4)
            out[16 + l] |= ((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1))


@njit(parallel=True, fastmath=True, cache=True)
def _quantize_rows(x, w, out):
    rows, cols = x.shape
    nb = cols // QK
    for r in prange(rows):
        scales = np.empty(8, np.float64)
        mins = np.empty(8, np.float64)
        ls = np.empty(16, np.int32)
        lm = np.empty(16, np.int32)
        L = np.empty(QK, np.uint8)
        work = new_work()
        for b in range(nb):
            _block(x[r, b * QK:(b + 1) * QK], w[b * QK:(b + 1) * QK],
                   out[r, b * TYPE_SIZE:(b + 1) * TYPE_SIZE], scales, mins, ls, lm, L, work)


def quantize(x, importance=None):
    """float32 [R, C] (C a multiple of 256) -> uint8 [R, C // 256 * 176] in Q5_K layout.

    importance: optional float32 [C], the weight of each column in the squared error minimised.
    """
    x, w = prepare(x, importance, QK, "Q5_K")
    out = np.empty((x.shape[0], x.shape[1] // QK * TYPE_SIZE), np.uint8)
    _quantize_rows(x, w, out)
    return out
