"""IQ2_S: 256 weights in 82 bytes (2.5625 bits per weight), an 8-dimensional lattice codebook.

Block layout (ggml ``block_iq2_s``):
    d          f16
    qs[32]     low 8 bits of the grid index of each group of 8 weights
    signs[32]  sign bits, one byte per group (bit l = minus sign of weight l)
    qh[8]      high 2 bits of the grid indices: group k has (qh[k // 4] >> 2 (k % 4)) & 3
    scales[8]  4-bit scale s per 16 weights (groups 2i, 2i + 1): low nibble first
    weight = d * (0.5 + s) / 4 * grid value (1024 entries of 8 values out of {8, 25, 43}) * sign
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, quants
from numba import njit, prange

from .kq_common import (F32, HAS_SIMD, I16, I32, I8, QK, V16I16, V32I8, V4I16, V4I8, V8I8, gather_grid,
                        grid_u8, half_at, ksigns_table, q8_buffers, quantize_q8, row_dot, sign_vector, vscale)

QTYPE = GGMLQuantizationType.IQ2_S
TS = 82  # bytes per block
BS = QK
GRID = grid_u8(quants.IQ2_S)  # [1024, 8] grid values (derived from gguf's packed grid)
GRIDF = GRID.astype(np.float32)
TAB = GRID.reshape(-1)  # the grid as bytes, for the int8 kernels
KSIGNS = ksigns_table()

# ---------------------------------------------------------------------------------------------
# int8-activation kernels


def _scales16(S, w, o):
    """16 4-bit scales (low nibble first) at byte ``o`` -> 2s + 1 as <16 x i16>."""
    v = S.load(w, o, V8I8)
    v = S.shuffle(S.and_(v, 15), [i // 2 + 8 * (i % 2) for i in range(16)], S.shr(v, 4))
    return S.add(S.shl(S.zext(v, V16I16), 1), 1)


def _dot_body(S, w, toks, tab):
    d = S.f16(w, 0)
    sc = _scales16(S, w, 74)
    gv, sv, scv = [], [], []
    for v in range(8):  # 32 weights = groups 4v..4v+3 = sub-blocks 2v, 2v + 1
        lo = S.zext(S.load(w, 2 + 4 * v, V4I8), V4I16)
        hi = S.splat(S.zext(S.load(w, 66 + v, I8), I16), V4I16)
        idx = S.b.or_(lo, S.shl(S.and_(S.shr(hi, [0, 2, 4, 6]), 3), 8))
        gv.append(gather_grid(S, tab, [S.b.extract_element(idx, I32(i)) for i in range(4)], 8))
        sv.append(sign_vector(S, S.load(w, 34 + 4 * v, V4I8)))
        scv.append(S.shuffle(sc, [2 * v] * 8 + [2 * v + 1] * 8))
    outs = []
    for qp, sp, dp in toks:
        acc = None
        for v in range(8):
            acc = S.dpwssd(acc, S.maddubs(gv[v], S.psign(S.load(qp, 32 * v, V32I8), sv[v])), scv[v])
        outs.append(vscale(S, acc, S.load(dp, 0, F32), d, S.const(F32, 0.125)))
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
    for k in range(32):
        gi = np.int64(w[r, o + 2 + k]) | (((np.int64(w[r, o + 66 + k // 4]) >> (2 * (k % 4))) & 3) << 8)
        s = (np.int64(w[r, o + 74 + k // 4]) >> (4 * ((k // 2) % 2))) & 15
        db = d * (np.float32(0.5) + np.float32(s)) * np.float32(0.25)
        sg = w[r, o + 34 + k]
        for l in range(8):
            sign = np.float32(1.0) - np.float32(2.0) * np.float32((sg >> l) & 1)
            dst[di, dj + 8 * k + l] = db * grid[gi, l] * sign


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
