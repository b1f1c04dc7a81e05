"""BF16 weights: rows of bfloat16 (2 bytes each: the high half of a float32), widened exactly.

Same drivers as the block formats, on chunks of 16 floats; a row length that is not a multiple
of 16 ends with a scalar tail.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from .common import (LANES, dfma, dsum, dzero, bf16s, gemm_rows4, gemm_xt, load_bf16, transpose_x, vfma, vload,
                     vstore2, vsum, vzero)

QTYPE = GGMLQuantizationType.BF16
ES = 2  # bytes per element


@njit(fastmath=True, cache=True)
def _tail(w, r, x, c0):
    s = np.float64(0.0)
    for c in range(c0, x.shape[0]):
        s += np.float64(load_bf16(w, r, c * ES)) * np.float64(x[c])
    return s


@njit(parallel=True, fastmath=True, cache=True)
def matvec(w, x, out):
    """out[r] = w[r] . x.   w [R, C*2] u8, x [C] f32, out [R] f32."""
    rows = w.shape[0]
    cols = w.shape[1] // ES
    c16 = cols - cols % LANES
    for g in prange((rows + 3) // 4):
        r = 4 * g
        if r + 4 <= rows:
            a0 = dzero(); a1 = dzero(); a2 = dzero(); a3 = dzero()  # noqa: E702
            for c in range(0, c16, LANES):
                x0 = vload(x, c)
                a0 = dfma(bf16s(w, r, c * ES), x0, a0)
                a1 = dfma(bf16s(w, r + 1, c * ES), x0, a1)
                a2 = dfma(bf16s(w, r + 2, c * ES), x0, a2)
                a3 = dfma(bf16s(w, r + 3, c * ES), x0, a3)
            out[r] = dsum(a0) + _tail(w, r, x, c16)
            out[r + 1] = dsum(a1) + _tail(w, r + 1, x, c16)
            out[r + 2] = dsum(a2) + _tail(w, r + 2, x, c16)
            out[r + 3] = dsum(a3) + _tail(w, r + 3, x, c16)
        else:
            for rr in range(r, rows):
                a0 = dzero()
                for c in range(0, c16, LANES):
                    a0 = dfma(bf16s(w, rr, c * ES), vload(x, c), a0)
                out[rr] = dsum(a0) + _tail(w, rr, x, c16)


@njit(fastmath=True, cache=True)
def _dequant_row(w, r, dst, i):
    # dst[i, :] = row r of w as floats.
    cols = w.shape[1] // ES
    c16 = cols - cols % LANES
    for c in range(0, c16, LANES):
        vstore2(bf16s(w, r, c * ES), dst, i, c)
    for c in range(c16, cols):
        dst[i, c] = load_bf16(w, r, c * ES)


@njit(parallel=True, fastmath=True, cache=True)
def matmul(w, x, out):
    """out[t, r] = w[r] . x[t].   w [R, C*2] u8, x [T, C] f32, out [T, R] f32."""
    rows = w.shape[0]
    xt = transpose_x(x)  # tokens in blocks of 32, token-contiguous; the rest by gemm_rows4
    tt = xt.shape[1]
    groups = (rows + 3) // 4
    chunks = min(groups, 64)  # parallel work items, each with its own tile
    for ch in prange(chunks):
        tile = np.zeros((4, x.shape[1]), np.float32)
        for g in range(ch * groups // chunks, (ch + 1) * groups // chunks):
            r = 4 * g
            nr = min(4, rows - r)
            for i in range(nr):
                _dequant_row(w, r + i, tile, i)
            gemm_xt(tile, nr, xt, out, r)
            gemm_rows4(tile, nr, x, out, r, tt)


@njit(fastmath=True, cache=True)
def dequantize_rows(w, ids, out):
    """out[k] = row ids[k] of w as floats.   out [len(ids), C] f32."""
    for k in range(ids.shape[0]):
        _dequant_row(w, ids[k], out, k)


# Float weights have only the float path; the names every format module offers:
matvec_f32 = matvec
matmul_f32 = matmul
