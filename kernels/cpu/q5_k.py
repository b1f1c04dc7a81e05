"""Q5_K: 256 weights in 176 bytes (5.5 bits per weight).

Block layout (ggml ``block_q5_K``):
    d     f16        super-block scale of the sub-block scales
    dmin  f16        super-block scale of the sub-block mins
    scales[12]       8 sub-blocks of 32: 6-bit scale and min, packed as in Q4_K
    qh[32]           fifth bit: weight 32j + l (sub-block j, l < 32) has bit j of qh[l]
    qs[128]          low 4 bits, as Q4_K: bytes 32i..32i+31 hold sub-blocks 2i (low nibbles)
                     and 2i + 1 (high nibbles)
    weight = d * sc[j] * (q + 16 * bit) - dmin * m[j]
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from .kq_common import (F32, FAST, HAS_SIMD, I32, NO_TABLE, QK, V16I16, V32I8, dq32, half_at, q8_buffers,
                        quantize_q8, row_dot, scale_bytes, vscale)

QTYPE = GGMLQuantizationType.Q5_K
BS = QK  # weights per block
TS = 176  # bytes per block

# ---------------------------------------------------------------------------------------------
# int8-activation kernels

def _dot_body(S, w, toks, tab):
    d, dmin = S.f16(w, 0), S.f16(w, 2)
    a, b, c = (S.load(w, o, I32) for o in (4, 8, 12))  # scales packed as in Q4_K (see q4_k.py)
    sc = scale_bytes(S, S.and_(a, 0x3F3F3F3F), S.or_(S.and_(c, 0x0F0F0F0F), S.and_(S.shr(a, 2), 0x30303030)))
    mn = scale_bytes(S, S.and_(b, 0x3F3F3F3F),
                     S.or_(S.and_(S.shr(c, 4), 0x0F0F0F0F), S.and_(S.shr(b, 2), 0x30303030)))
    hv = S.load(w, 16, V32I8)
    q = []
    for i in range(4):
        v = S.load(w, 48 + 32 * i, V32I8)
        for j, nib in ((2 * i, S.and_(v, 15)), (2 * i + 1, S.and_(S.shr(v, 4), 15))):
            q.append(S.b.or_(nib, S.shl(S.and_(S.shr(hv, j), 1), 4)))
    scv = [S.shuffle(sc, [j] * 16) for j in range(8)]
    m16 = S.shuffle(mn, [j // 2 for j in range(16)])
    outs = []
    for qp, sp, dp in toks:
        acc = None
        for j in range(8):
            acc = S.dpwssd(acc, S.maddubs(q[j], S.load(qp, 32 * j, V32I8)), scv[j])
        msum = S.madd(S.load(sp, 0, V16I16), m16)
        xd = S.load(dp, 0, F32)
        outs.append(S.b.fsub(vscale(S, acc, xd, d), vscale(S, msum, xd, dmin), flags=FAST))
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
def _scale_min(w, r, o, j):
    if j < 4:
        sc = w[r, o + 4 + j] & 63
        m = w[r, o + 8 + j] & 63
    else:
        sc = (w[r, o + 8 + j] & 15) | ((w[r, o + j] >> 6) << 4)
        m = (w[r, o + 8 + j] >> 4) | ((w[r, o + 4 + j] >> 6) << 4)
    return np.float32(sc), np.float32(m)


@njit(inline="always")
def _decode_block(w, r, o, dst, di, dj):
    """Block at byte ``o`` of row ``r`` -> dst[di, dj : dj + 256] (float32)."""
    d = half_at(w, r, o)
    dmin = half_at(w, r, o + 2)
    for i in range(4):
        s0, m0 = _scale_min(w, r, o, 2 * i)
        s1, m1 = _scale_min(w, r, o, 2 * i + 1)
        qo = o + 48 + 32 * i
        dq32(w, r, qo, 0, 15, o + 16, 2 * i, 1, 16, d * s0, d * s0, -dmin * m0, -dmin * m0, dst, di, dj + 64 * i)
        dq32(w, r, qo, 4, 15, o + 16, 2 * i + 1, 1, 16, d * s1, d * s1, -dmin * m1, -dmin * m1, dst, di,
             dj + 64 * i + 32)


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
