"""Q6_K quantizer: float32 rows -> ggml's block_q6_K bytes.

block_q6_K (210 bytes per 256 values): ql[128] (low 4 bits), qh[64] (high 2 bits), int8
scales[16], f16 d. Value i of sub-block j (16 values):  y = d * scales[j] * (q[i] - 32).
In each 128-value chunk c, value l (< 64) has its low bits in the low nibble of ql[64c + l],
value 64 + l in the high nibble; value 32 s + l (s < 4, l < 32) its high bits in bits 2s of
qh[32c + l].
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .quant_common import kquant_sym_scales, new_work, prepare, put_f16, sym_codes, sym_fit

QK = 256
TYPE_SIZE = 210


@njit(fastmath=True, cache=True)
def _block(x, w, out, scales, ls, L, work):
    """Quantize one super-block: x, w [256] -> out [210]."""
    for j in range(16):
        s, _ = sym_fit(x[16 * j:16 * j + 16], w[16 * j:16 * j + 16], -32, 31, 4, 0.25, True, work)
        scales[j] = s
    d = kquant_sym_scales(x, w, 16, 16, -32, 31, -128, 127, scales, ls, work)
    for j in range(16):
        sym_codes(x[16 * j:16 * j + 16], d * ls[j], -32, 31, L[16 * j:16 * j + 16])  # L = q
        out[192 + j] = np.uint8(ls[j] & 0xFF)
    for c in range(2):
        for l in range(64):
            out[64 * c + l] = (L[128 * c + l] & 0xF) | ((L[128 * c + 64 + l] & 0xF) << 4)
        for l in range(32):
            b = 128 * c + l
            out[128 + 32 * c + l] = ((L[b] >> 4) | ((L[b + 32] >> 4) << 2) | ((L[b + 64] >> 4) << 4)
                                     | ((L[b + 96] >> 4) << 6))
    put_f16(out, 208, d)


@njit(parallel=True, fastmath=True, cache=True)
def _quantize_rows(x, w, out):
    rows, cols = x.shape
    nb = cols // QK
    for r in prange(rows):
        scales = np.empty(16, np.float64)
        ls = np.empty(32, np.int32)
        L = np.empty(QK, np.uint8)
        work = new_work()
        for b in range(nb):
            _block(x[r, b * QK:(b + 1) * QK], w[b * QK:(b + 1) * QK],
                   out[r, b * TYPE_SIZE:(b + 1) * TYPE_SIZE], scales, ls, L, work)


def quantize(x, importance=None):
    """float32 [R, C] (C a multiple of 256) -> uint8 [R, C // 256 * 210] in Q6_K layout.

    importance: optional float32 [C], the weight of each column in the squared error minimised.
    """
    x, w = prepare(x, importance, QK, "Q6_K")
    out = np.empty((x.shape[0], x.shape[1] // QK * TYPE_SIZE), np.uint8)
    _quantize_rows(x, w, out)
    return out
