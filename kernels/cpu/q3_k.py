"""Q3_K: 256 weights in 110 bytes (3.4375 bits per weight).

Block layout (ggml ``block_q3_K``):
    hmask[32]    high bit of each quant: weight 32k + l (k < 8, l < 32) has bit k of hmask[l]
    qs[64]       low 2 bits: weight 128n + 32s + l (n < 2, s < 4) is (qs[32n + l] >> 2s) & 3
    scales[12]   16 signed 6-bit sub-block scales (one per 16 weights), stored + 32:
                 low 4 bits: i < 8: scales[i] & 15, i >= 8: scales[i - 8] >> 4;
                 high 2 bits: (scales[8 + i % 4] >> 2 (i // 4)) & 3
    d     f16    (offset 108)
    weight = d * (scale_i - 32) * (low2 + 4 * high - 4)       (the high bit set means no offset)
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from .kq_common import (F32, HAS_SIMD, NO_TABLE, QK, V16I16, V32I8, V4I8, V8I8, dq32, half_at, q8_buffers,
                        quantize_q8, row_dot, vscale)

QTYPE = GGMLQuantizationType.Q3_K
BS = QK  # weights per block
TS = 110  # bytes per block

# ---------------------------------------------------------------------------------------------
# int8-activation kernels

def _scales(S, w):
    """The 16 signed sub-block scales as <16 x i16>."""
    lo = S.load(w, 96, V8I8)
    lo = S.concat(S.and_(lo, 15), S.shr(lo, 4))
    hi = S.shuffle(S.load(w, 104, V4I8), [i % 4 for i in range(16)])
    hi = S.shl(S.and_(S.shr(hi, [2 * (i // 4) for i in range(16)]), 3), 4)
    return S.sext(S.sub(S.b.or_(lo, hi), 32), V16I16)


def _dot_body(S, w, toks, tab):
    sc = _scales(S, w)
    d = S.f16(w, 108)
    hm = S.load(w, 0, V32I8)
    q = []  # 8 x (32 quants + 4 in 0..7 = two sub-blocks, their scales over 8 + 8 lanes)
    for n in range(2):
        v = S.load(w, 32 + 32 * n, V32I8)
        for s in range(4):
            k = 4 * n + s
            hbit = S.shl(S.and_(S.shr(hm, k), 1), 2)
            u = S.b.or_(S.and_(S.shr(v, 2 * s), 3), hbit)
            q.append((u, S.shuffle(sc, [2 * k] * 8 + [2 * k + 1] * 8)))
    outs = []
    for qp, sp, dp in toks:
        acc = None
        for i, (u, scv) in enumerate(q):
            acc = S.dpwssd(acc, S.maddubs(u, S.load(qp, 32 * i, V32I8)), scv)
        off = S.shl(S.madd(S.load(sp, 0, V16I16), sc), 2)  # the "- 4" of every quant
        outs.append(vscale(S, S.b.sub(acc, off), S.load(dp, 0, F32), d))
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
                    w, r * RB, nb, xq, xd, xs, NO_TABLE, t, 0)
        for t in range(T4, T):
            for r in range(tile * RT, r1):
                out[t, r] = _row1(w, r * RB, nb, xq, xd, xs, NO_TABLE, t, 0)


@njit(cache=True)
def matvec_q8(w, x, out):
    """out[r] = W[r] . x with x quantized to 8 bits per 256-block.   w [R, RB] u8, x [C], out [R]"""
    matmul_q8(w, x.reshape((1, x.shape[0])), out.reshape((1, out.shape[0])))


# ---------------------------------------------------------------------------------------------
# float kernels


@njit(inline="always")
def _scale(w, r, o, i):
    if i < 8:
        lo = np.int64(w[r, o + 96 + i]) & 15
    else:
        lo = np.int64(w[r, o + 88 + i]) >> 4
    hi = (np.int64(w[r, o + 104 + i % 4]) >> (2 * (i // 4))) & 3
    return np.float32((lo | (hi << 4)) - 32)


@njit(inline="always")
def _decode_block(w, r, o, dst, di, dj):
    """Block at byte ``o`` of row ``r`` -> dst[di, dj : dj + 256] (float32)."""
    d = half_at(w, r, o + 108)
    for n in range(2):
        for s in range(4):
            k = 8 * n + 2 * s
            d0 = d * _scale(w, r, o, k)
            d1 = d * _scale(w, r, o, k + 1)
            # q = low2 + 4 * high - 4
            dq32(w, r, o + 32 + 32 * n, 2 * s, 3, o, 4 * n + s, 1, 4, d0, d1, np.float32(-4.0) * d0,
                 np.float32(-4.0) * d1, dst, di, dj + 128 * n + 32 * s)


@njit(parallel=True, fastmath=True, cache=True)
def matmul_f32(w, x, out):
    """out[t, r] = W[r] . x[t] in float32, each block decoded once for all tokens."""
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
                _decode_block(w, r, b * TS, buf, 0, 0)
                for t in range(T):
                    s = np.float32(0.0)
                    for l in range(BS):
                        s += buf[0, l] * x[t, b * BS + l]
                    acc[t] += s
            for t in range(T):
                out[t, r] = acc[t]


@njit(cache=True)
def matvec_f32(w, x, out):
    """out[r] = W[r] . x in float32.   w [R, RB] u8, x [C] f32, out [R] f32"""
    matmul_f32(w, x.reshape((1, x.shape[0])), out.reshape((1, out.shape[0])))


@njit(parallel=True, fastmath=True, cache=True)
def dequantize_rows(w, ids, out):
    """out[i] = row ids[i] of W as float32.   ids [N] int, out [N, C] f32"""
    nb = out.shape[1] // BS
    for i in prange(ids.shape[0]):
        for b in range(nb):
            _decode_block(w, ids[i], b * TS, out, i, b * BS)


matvec = matvec_q8 if HAS_SIMD else matvec_f32
matmul = matmul_q8 if HAS_SIMD else matmul_f32
