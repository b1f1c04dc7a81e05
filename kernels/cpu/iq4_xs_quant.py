"""IQ4_XS quantizer: float32 rows -> ggml's block_iq4_xs bytes.

block_iq4_xs (136 bytes per 256 values): f16 d, u16 scales_h, scales_l[4], qs[128]. Each 32-value
sub-block j has a 6-bit signed scale ls[j] (stored + 32: low nibble in scales_l[j // 2] at bit
4 (j % 2), top two bits in scales_h at bit 2j) and 4-bit indices into the non-linear code book
V = ggml's kvalues_iq4nl:  y = d * ls[j] * V[q]. Value l (< 16) of sub-block j has its index in
the low nibble of qs[16 j + l], value 16 + l in the high nibble.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .quant_common import (IQ4_MIDS, IQ4_VALUES, iq4_codes, iq4_fit, kquant_iq4_scales, prepare,
                           put_f16)

QK = 256
TYPE_SIZE = 136


@njit(fastmath=True, cache=True)
def _block(x, w, out, values, mids, scales, ls, L):
    """Quantize one super-block: x, w [256] -> out [136]."""
    for j in range(8):
        s, _ = iq4_fit(x[32 * j:32 * j + 32], w[32 * j:32 * j + 32], values, mids, 7)
        scales[j] = s
    d = kquant_iq4_scales(x, w, 8, 32, values, mids, scales, ls)
    put_f16(out, 0, d)
    sh = 0
    for j in range(4):
        out[4 + j] = 0
    for j in range(8):
        sc = ls[j] + 32
        out[4 + j // 2] |= (sc & 0xF) << (4 * (j % 2))
        sh |= (sc >> 4) << (2 * j)
        iq4_codes(x[32 * j:32 * j + 32], d * ls[j], mids, L[32 * j:32 * j + 32])
        for l in range(16):
            out[8 + 16 * j + l] = L[32 * j + l] | (L[32 * j + 16 + l] << 4)
    out[2] = sh & 0xFF
    out[3] = sh >> 8


@njit(parallel=True, fastmath=True, cache=True)
def _quantize_rows(x, w, out, values, mids):
    rows, cols = x.shape
    nb = cols // QK
    for r in prange(rows):
        scales = np.empty(8, np.float64)
        ls = np.empty(16, np.int32)
        L = np.empty(QK, np.uint8)
        for b in range(nb):
            _block(x[r, b * QK:(b + 1) * QK], w[b * QK:(b + 1) * QK],
                   out[r, b * TYPE_SIZE:(b + 1) * TYPE_SIZE], values, mids, scales, ls, L)


def quantize(x, importance=None):
    """float32 [R, C] (C a multiple of 256) -> uint8 [R, C // 256 * 136] in IQ4_XS layout.

    importance: optional float32 [C], the weight of each column in the squared error minimised.
    """
    x, w = prepare(x, importance, QK, "IQ4_XS")
    out = np.empty((x.shape[0], x.shape[1] // QK * TYPE_SIZE), np.uint8)
    _quantize_rows(x, w, out, IQ4_VALUES, IQ4_MIDS)
    return out
