"""Q6_K: 256 weights in 210 bytes (6.5625 bits per weight).

Block layout (ggml ``block_q6_K``):
    ql[128]      low 4 bits: weight 128n + 64h + l (n, h < 2, l < 64) is (ql[64n + l] >> 4h) & 15
    qh[64]       high 2 bits: weight 128n + 32s + l (s < 4, l < 32) is (qh[32n + l] >> 2s) & 3
    scales[16]   int8 scale per sub-block of 16 weights
    d     f16    (offset 208)
    weight = d * scales[i] * ((low | high << 4) - 32)
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from .kq_common import (F32, HAS_SIMD, NO_TABLE, QK, V16I16, V16I8, V32I8, dq32, half_at, q8_buffers,
                        quantize_q8, row_dot, sbyte_f32, vscale)

QTYPE = GGMLQuantizationType.Q6_K
BS = QK  # weights per block
TS = 210  # bytes per block

# ---------------------------------------------------------------------------------------------
# int8-activation kernels

def _dot_body(S, w, toks, tab):
    sc = S.sext(S.load(w, 192, V16I8), V16I16)
    d = S.f16(w, 208)
    q = []  # 8 x (32 quants + 32 in 0..63 = two sub-blocks, their scales over 8 + 8 lanes)
    for n in range(2):
        h = S.load(w, 128 + 32 * n, V32I8)
        for s in range(4):
            lo = S.load(w, 64 * n + 32 * (s % 2), V32I8)
            lo = S.and_(S.shr(lo, 4 * (s // 2)), 15)
            u = S.b.or_(lo, S.shl(S.and_(S.shr(h, 2 * s), 3), 4))
            k = 8 * n + 2 * s
            q.append((u, S.shuffle(sc, [k] * 8 + [k + 1] * 8)))
    outs = []
    for qp, sp, dp in toks:
        acc = None
        for i, (u, scv) in enumerate(q):
            acc = S.dpwssd(acc, S.maddubs(u, S.load(qp, 32 * i, V32I8)), scv)
        off = S.shl(S.madd(S.load(sp, 0, V16I16), sc), 5)  # the "- 32" of every quant
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
def _decode_block(w, r, o, dst, di, dj):
    """Block at byte ``o`` of row ``r`` -> dst[di, dj : dj + 256] (float32)."""
    d = half_at(w, r, o + 208)
    for n in range(2):
        for s in range(4):
            k = 8 * n + 2 * s
            d0 = d * sbyte_f32(w[r, o + 192 + k])
            d1 = d * sbyte_f32(w[r, o + 193 + k])
            # q = low4 + 16 * high2 - 32
            dq32(w, r, o + 64 * n + 32 * (s % 2), 4 * (s // 2), 15, o + 128 + 32 * n, 2 * s, 3, 16, d0, d1,
                 np.float32(-32.0) * d0, np.float32(-32.0) * d1, dst, di, dj + 128 * n + 32 * s)


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
