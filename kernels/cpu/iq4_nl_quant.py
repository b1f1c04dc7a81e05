"""IQ4_NL quantizer: float32 rows -> ggml's block_iq4_nl bytes.

block_iq4_nl (18 bytes per 32 values): f16 d, qs[16] (4-bit indices into the non-linear code
book V = ggml's kvalues_iq4nl; value j in the low nibble of byte j, value j + 16 in the high
nibble);  y = d * V[q].
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .quant_common import IQ4_MIDS, IQ4_VALUES, iq4_codes, iq4_fit, iq4_pick_f16, prepare, put_f16

QK = 32
TYPE_SIZE = 18


@njit(fastmath=True, cache=True)
def _block(x, w, out, values, mids, L):
    s, _ = iq4_fit(x, w, values, mids, 7)
    d = iq4_pick_f16(x, w, s, values, mids)
    put_f16(out, 0, d)
    iq4_codes(x, d, mids, L)
    for j in range(16):
        out[2 + j] = L[j] | (L[j + 16] << 4)


@njit(parallel=True, fastmath=True, cache=True)
def _quantize_rows(x, w, out, values, mids):
    rows, cols = x.shape
    nb = cols // QK
    for r in prange(rows):
        L = np.empty(QK, np.uint8)
        for b in range(nb):
            _block(x[r, b * QK:(b + 1) * QK], w[b * QK:(b + 1) * QK],
                   out[r, b * TYPE_SIZE:(b + 1) * TYPE_SIZE], values, mids, L)


def quantize(x, importance=None):
    """float32 [R, C] (C a multiple of 32) -> uint8 [R, C // 32 * 18] in IQ4_NL layout.

    importance: optional float32 [C], the weight of each column in the squared error minimised.
    """
    x, w = prepare(x, importance, QK, "IQ4_NL")
    out = np.empty((x.shape[0], x.shape[1] // QK * TYPE_SIZE), np.uint8)
    _quantize_rows(x, w, out, IQ4_VALUES, IQ4_MIDS)
    return out
