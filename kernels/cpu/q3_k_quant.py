"""Q3_K quantizer: float32 rows -> ggml's block_q3_K bytes.

block_q3_K (110 bytes per 256 values): hmask[32] (third bits), qs[64] (low 2 bits), scales[12]
(sixteen 6-bit signed scales, stored + 32), f16 d. Value i of sub-block j (16 values):
    y = d * (sc[j] - 32) * (q[i] - 4), q in [0, 7]
Low bits as Q2_K's (value 32 s + l of 128-value chunk c in bits 2s of qs[32c + l]); the third
bit of value 32 b + l in bit b of hmask[l]. Scale j: low nibble in byte j (j < 8) or the high
nibble of byte j - 8, top two bits in bits 2 (j // 4) of byte 8 + j % 4.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .quant_common import kquant_sym_scales, new_work, prepare, put_f16, sym_codes, sym_fit

QK = 256
TYPE_SIZE = 110


@njit(fastmath=True, cache=True)
def _block(x, w, out, scales, ls, L, work):
    """Quantize one super-block: x, w [256] -> out [110]."""
    for j in range(16):
        s, _ = sym_fit(x[16 * j:16 * j + 16], w[16 * j:16 * j + 16], -4, 3, 7, 0.125, True, work)
        scales[j] = s
    d = kquant_sym_scales(x, w, 16, 16, -4, 3, -32, 31, scales, ls, work)
    for j in range(110):
        out[j] = 0
    for j in range(16):
        sym_codes(x[16 * j:16 * j + 16], d * ls[j], -4, 3, L[16 * j:16 * j + 16])  # L = q
        sc = ls[j] + 32
        if j < 8:
            out[96 + j] = sc & 0xF
        else:
            out[96 + j - 8] |= (sc & 0xF) << 4
        out[104 + j % 4] |= (sc >> 4) << (2 * (j // 4))
    for i in range(QK):
        out[i % 32] |= (L[i] >> 2) << (i // 32)
    for c in range(2):
        for l in range(32):
            b = 128 * c + l
            out[32 + 32 * c + l] = ((L[b] & 3) | ((L[b + 32] & 3) << 2) | ((L[b + 64] & 3) << 4)
                                    | ((L[b + 96] & 3) << 6))
    put_f16(out, 108, d)


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
    """float32 [R, C] (C a multiple of 256) -> uint8 [R, C // 256 * 110] in Q3_K layout.

    importance: optional float32 [C], the weight of each column in the squared error minimised.
    """
    x, w = prepare(x, importance, QK, "Q3_K")
    out = np.empty((x.shape[0], x.shape[1] // QK * TYPE_SIZE), np.uint8)
    _quantize_rows(x, w, out)
    return out
