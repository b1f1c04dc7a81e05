"""Q2_K quantizer: float32 rows -> ggml's block_q2_K bytes.

block_q2_K (84 bytes per 256 values): scales[16] (low nibble: 4-bit scale, high nibble: 4-bit
min of each 16-value sub-block), qs[64] (2-bit codes), f16 d, f16 dmin. Value i of sub-block j:
    y = d * sc[j] * q[i] - dmin * m[j], q in [0, 3]
In each 128-value chunk c, value 32 s + l (s < 4, l < 32) sits in bits 2s of qs[32c + l].
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .quant_common import (affine_codes, affine_fit, kquant_affine_scales, new_work, prepare,
                           put_f16)

QK = 256
TYPE_SIZE = 84


@njit(fastmath=True, cache=True)
def _block(x, w, out, scales, mins, ls, lm, L, work):
    """Quantize one super-block: x, w [256] -> out [84]."""
    for j in range(16):
        s, m, _ = affine_fit(x[16 * j:16 * j + 16], w[16 * j:16 * j + 16], 3, -0.5, 0.1, 15, True,
                             work)
        scales[j] = s
        mins[j] = -m
    d, dmin = kquant_affine_scales(x, w, 16, 16, 3, 15, scales, mins, ls, lm, work)
    for j in range(16):
        out[j] = ls[j] | (lm[j] << 4)
        affine_codes(x[16 * j:16 * j + 16], d * ls[j], dmin * lm[j], 3, L[16 * j:16 * j + 16])
    for c in range(2):
        for l in range(32):
            b = 128 * c + l
            out[16 + 32 * c + l] = L[b] | (L[b + 32] << 2) | (L[b + 64] << 4) | (L[b + 96] << 6)
    put_f16(out, 80, d)
    put_f16(out, 82, dmin)


@njit(parallel=True, fastmath=True, cache=True)
def _quantize_rows(x, w, out):
    rows, cols = x.shape
    nb = cols // QK
    for r in prange(rows):
        scales = np.empty(16, np.float64)
        mins = np.empty(16, np.float64)
        ls = np.empty(32, np.int32)
        lm = np.empty(32, np.int32)
        L = np.empty(QK, np.uint8)
        work = new_work()
        for b in range(nb):
            _block(x[r, b * QK:(b + 1) * QK], w[b * QK:(b + 1) * QK],
                   out[r, b * TYPE_SIZE:(b + 1) * TYPE_SIZE], scales, mins, ls, lm, L, work)


def quantize(x, importance=None):
    """float32 [R, C] (C a multiple of 256) -> uint8 [R, C // 256 * 84] in Q2_K layout.

    importance: optional float32 [C], the weight of each column in the squared error minimised.
    """
    x, w = prepare(x, importance, QK, "Q2_K")
    out = np.empty((x.shape[0], x.shape[1] // QK * TYPE_SIZE), np.uint8)
    _quantize_rows(x, w, out)
    return out
