"""The kernels of the float weight formats (F32, F16, BF16), shared: rows of plain numbers, 4 or
2 bytes each, widened to float32 as read (``kind``: 0 F32, 1 F16, 2 BF16; each format module
binds its own).

Same drivers as the block formats, on chunks of 16 floats; a row length that is not a multiple
of 16 ends with a scalar tail. Products are summed in float64 and rounded once (float32
products are exact there: docs/architecture.md, Numerics). One set of kernels with a ``kind``
argument rather than one per format built by a factory: Numba's on-disk cache keeps module-level
kernels only.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .common import (LANES, bf16s, dfma, dzero, f16s, f32s, gemm_rows4, gemm_xt, load_bf16, load_f16, load_f32,
                     transpose_x, vload, vstore2, vsum)


@njit(fastmath=True, cache=True, inline="always")
def _w16(w, r, o, kind):
    # 16 weights from byte o of row r, as float32 lanes
    if kind == 0:
        return f32s(w, r, o)
    if kind == 1:
        return f16s(w, r, o)
    return bf16s(w, r, o)


@njit(fastmath=True, cache=True, inline="always")
def _w1(w, r, o, kind):
    if kind == 0:
        return load_f32(w, r, o)
    if kind == 1:
        return load_f16(w, r, o)
    return load_bf16(w, r, o)


@njit(fastmath=True, cache=True)
def _tail(w, r, x, c0, es, kind):
    s = np.float64(0.0)
    for c in range(c0, x.shape[0]):
        s += np.float64(_w1(w, r, c * es, kind)) * np.float64(x[c])
    return s


@njit(parallel=True, fastmath=True, cache=True)
def matvec(w, x, out, kind):
    """out[r] = w[r] . x.   w [R, C * element bytes] u8, x [C] f32, out [R] f32."""
    es = 4 if kind == 0 else 2
    rows = w.shape[0]
    cols = w.shape[1] // es
    c16 = cols - cols % LANES
    for g in prange((rows + 3) // 4):
        r = 4 * g
        if r + 4 <= rows:
            a0 = dzero(); a1 = dzero(); a2 = dzero(); a3 = dzero()  # noqa: E702
            for c in range(0, c16, LANES):
                x0 = vload(x, c)
                a0 = dfma(_w16(w, r, c * es, kind), x0, a0)
                a1 = dfma(_w16(w, r + 1, c * es, kind), x0, a1)
                a2 = dfma(_w16(w, r + 2, c * es, kind), x0, a2)
                a3 = dfma(_w16(w, r + 3, c * es, kind), x0, a3)
            out[r] = vsum(a0) + _tail(w, r, x, c16, es, kind)
            out[r + 1] = vsum(a1) + _tail(w, r + 1, x, c16, es, kind)
            out[r + 2] = vsum(a2) + _tail(w, r + 2, x, c16, es, kind)
            out[r + 3] = vsum(a3) + _tail(w, r + 3, x, c16, es, kind)
        else:
            for rr in range(r, rows):
                a0 = dzero()
                for c in range(0, c16, LANES):
                    a0 = dfma(_w16(w, rr, c * es, kind), vload(x, c), a0)
                out[rr] = vsum(a0) + _tail(w, rr, x, c16, es, kind)


@njit(fastmath=True, cache=True)
def _dequant_row(w, r, dst, i, kind):
    # dst[i, :] = row r of w as floats.
    es = 4 if kind == 0 else 2
    cols = w.shape[1] // es
    c16 = cols - cols % LANES
    for c in range(0, c16, LANES):
        vstore2(_w16(w, r, c * es, kind), dst, i, c)
    for c in range(c16, cols):
        dst[i, c] = _w1(w, r, c * es, kind)


@njit(parallel=True, fastmath=True, cache=True)
def matmul(w, x, out, kind):
    """out[t, r] = w[r] . x[t].   w [R, C * element bytes] u8, x [T, C] f32, out [T, R] f32."""
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
                _dequant_row(w, r + i, tile, i, kind)
            gemm_xt(tile, nr, xt, out, r)
            gemm_rows4(tile, nr, x, out, r, tt)


@njit(fastmath=True, cache=True)
def dequantize_rows(w, ids, out, kind):
    """out[k] = row ids[k] of w as floats.   out [len(ids), C] f32."""
    for k in range(ids.shape[0]):
        _dequant_row(w, ids[k], out, k, kind)


def bind(kind: int):
    """(matvec, matmul, dequantize_rows) of one float format, with the block formats' signatures."""

    def matvec_k(w, x, out):
        matvec(w, x, out, kind)

    def matmul_k(w, x, out):
        matmul(w, x, out, kind)

    def dequantize_rows_k(w, ids, out):
        dequantize_rows(w, ids, out, kind)

    return matvec_k, matmul_k, dequantize_rows_k
