"""IQ3_S: 256 weights in 110 bytes (3.4375 bits per weight), a 4-dimensional lattice codebook.

Block layout (ggml ``block_iq3_s``):
    d          f16
    qs[64]     low 8 bits of the grid index of each group of 4 weights
    qh[8]      ninth bit: group k has bit k % 8 of qh[k // 8]
    signs[32]  sign bits, one byte per 8 weights (bit l = minus sign of weight l)
    scales[4]  4-bit scale s per sub-block of 32 weights: low nibble first
    weight = d * (1 + 2s) * grid value (512 entries of 4 odd values 1..15) * sign
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, quants
from numba import njit, prange

from .kq_common import (F32, HAS_SIMD, I16, I32, I8, QK, V16I16, V32I8, V4I8, V8I16, V8I8, gather_grid,
                        grid_u8, half_at, ksigns_table, q8_buffers, quantize_q8, row_dot, sign_vector, vscale)

QTYPE = GGMLQuantizationType.IQ3_S
TS = 110  # bytes per block
BS = QK
GRID = grid_u8(quants.IQ3_S)  # [512, 4] grid values (derived from gguf's packed grid)
GRIDF = GRID.astype(np.float32)
TAB = GRID.reshape(-1)  # the grid as bytes, for the int8 kernels
KSIGNS = ksigns_table()

# ---------------------------------------------------------------------------------------------
# int8-activation kernels


def _dot_body(S, w, toks, tab):
    d = S.f16(w, 0)
    gv, sv, sc = [], [], []
    for g in range(8):  # sub-block g: grid indices 8g..8g+7
        lo = S.zext(S.load(w, 2 + 8 * g, V8I8), V8I16)
        hi = S.splat(S.zext(S.load(w, 66 + g, I8), I16), V8I16)
        idx = S.b.or_(lo, S.shl(S.and_(S.shr(hi, list(range(8))), 1), 8))
        gv.append(gather_grid(S, tab, [S.b.extract_element(idx, I32(i)) for i in range(8)], 4))
        sv.append(sign_vector(S, S.load(w, 74 + 4 * g, V4I8)))
        s = S.and_(S.shr(S.zext(S.load(w, 106 + g // 2, I8), I16), 4 * (g % 2)), 15)
        sc.append(S.splat(S.add(S.shl(s, 1), 1), V16I16))
    outs = []
    for qp, sp, dp in toks:
        acc = None
        for g in range(8):
            acc = S.dpwssd(acc, S.maddubs(gv[g], S.psign(S.load(qp, 32 * g, V32I8), sv[g])), sc[g])
        outs.append(vscale(S, acc, S.load(dp, 0, F32), d))
    return outs


_row1 = row_dot(_dot_body, 1, step_bytes=TS)
_row4 = row_dot(_dot_body, 4, step_bytes=TS)


@njit(parallel=True, fastmath=True, cache=True)
def matmul_q8(w, x, out):
    """out[t, r] = W[r] . x[t], four tokens per pass over a row.   x [T, C], out [T, R]"""
    R, RB = w.shape
    T, C = x.shape
    nb = C // QK
    xq, xd, xs = q8_buffers(T, C, QK)
    quantize_q8(x, QK, xq, xd, xs)
    RT = 8  # rows per tile: the tile's weights stay in cache while all tokens pass over them
    T4 = T - T % 4
    for tile in prange((R + RT - 1) // RT):
        r1 = min(R, tile * RT + RT)
        for t in range(0, T4, 4):
            for r in range(tile * RT, r1):
                out[t, r], out[t + 1, r], out[t + 2, r], out[t + 3, r] = _row4(
                    w, r * RB, nb, xq, xd, xs, TAB, t, 0)
        for t in range(T4, T):
            for r in range(tile * RT, r1):
                out[t, r] = _row1(w, r * RB, nb, xq, xd, xs, TAB, t, 0)


@njit(cache=True)
def matvec_q8(w, x, out):
    """out[r] = W[r] . x with x quantized to 8 bits per 256-block.   w [R, RB] u8, x [C], out [R]"""
    matmul_q8(w, x.reshape((1, x.shape[0])), out.reshape((1, out.shape[0])))


# ---------------------------------------------------------------------------------------------
# float kernels


@njit(inline="always")
def _decode_block(w, r, o, dst, di, dj, tab):
    """Block at byte ``o`` of row ``r`` -> dst[di, dj : dj + 256] (float32); tab = (grid f32, ksigns)."""
    grid, ks = tab
    d = half_at(w, r, o)
    for g in range(8):
        s = (np.int64(w[r, o + 106 + g // 2]) >> (4 * (g % 2))) & 15
        db = d * np.float32(1 + 2 * s)
        for k in range(8):
            gi = np.int64(w[r, o + 2 + 8 * g + k]) | (((np.int64(w[r, o + 66 + g]) >> k) & 1) << 8)
            sg = w[r, o + 74 + 4 * g + k // 2]
            for l in range(4):
                sign = np.float32(1.0) - np.float32(2.0) * np.float32((sg >> (4 * (k % 2) + l)) & 1)
                dst[di, dj + 32 * g + 4 * k + l] = db * grid[gi, l] * sign


@njit(parallel=True, fastmath=True, cache=True)
def _matmul_f32(w, x, out, tab):
    R = w.shape[0]
    T, C = x.shape
    nb = C // BS
    RT = 16
    for tile in prange((R + RT - 1) // RT):
        buf = np.empty((1, BS), np.float32)
        acc = np.empty(T, np.float32)
        for r in range(tile * RT, min(R, tile * RT + RT)):
            acc[:] = 0.0
            for b in range(nb):
                _decode_block(w, r, b * TS, buf, 0, 0, tab)
                for t in range(T):
                    s = np.float32(0.0)
                    for l in range(BS):
                        s += buf[0, l] * x[t, b * BS + l]
                    acc[t] += s
            for t in range(T):
                out[t, r] = acc[t]


@njit(parallel=True, fastmath=True, cache=True)
def _dequantize_rows(w, ids, out, tab):
    nb = out.shape[1] // BS
    for i in prange(ids.shape[0]):
        for b in range(nb):
            _decode_block(w, ids[i], b * TS, out, i, b * BS, tab)


@njit(cache=True)
def matmul_f32(w, x, out):
    """out[t, r] = W[r] . x[t] in float32, each block decoded once for all tokens."""
    _matmul_f32(w, x, out, (GRIDF, KSIGNS))


@njit(cache=True)
def matvec_f32(w, x, out):
    """out[r] = W[r] . x in float32.   w [R, RB] u8, x [C] f32, out [R] f32"""
    _matmul_f32(w, x.reshape((1, x.shape[0])), out.reshape((1, out.shape[0])), (GRIDF, KSIGNS))


@njit(cache=True)
def dequantize_rows(w, ids, out):
    """out[i] = row ids[i] of W as float32.   ids [N] int, out [N, C] f32"""
    _dequantize_rows(w, ids, out, (GRIDF, KSIGNS))


matvec = matvec_q8 if HAS_SIMD else matvec_f32
matmul = matmul_q8 if HAS_SIMD else matmul_f32
