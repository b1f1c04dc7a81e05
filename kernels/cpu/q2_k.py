"""Q2_K: 256 weights in 84 bytes (2.625 bits per weight).

Block layout (ggml ``block_q2_K``):
    scales[16]   one byte per sub-block of 16 weights: low nibble = scale, high nibble = min
    qs[64]       2-bit quants: weight 128n + 32s + l (n < 2, s < 4, l < 32) is
                 (qs[32n + l] >> 2s) & 3, so sub-block k = 8n + 2s + l // 16
    d     f16    scale of the sub-block scales (offset 80)
    dmin  f16    scale of the sub-block mins (offset 82)
    weight = d * (scales[k] & 15) * q - dmin * (scales[k] >> 4)
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from .kq_common import (F32, FAST, HAS_SIMD, NO_TABLE, QK, V16I16, V16I8, V32I8, bits_f32, dq32, half_at,
                        q8_buffers, quantize_q8, row_dot, vscale)

QTYPE = GGMLQuantizationType.Q2_K
BS = QK  # weights per block
TS = 84  # bytes per block

# ---------------------------------------------------------------------------------------------
# int8-activation kernels


def _dot_body(S, w, toks, tab):
    sc8 = S.load(w, 0, V16I8)
    sc = S.and_(sc8, 15)
    sc = S.concat(sc, sc)  # the 16 scale bytes in both 128-bit lanes, for pshufb
    mn = S.zext(S.shr(sc8, 4), V16I16)
    d, dmin = S.f16(w, 80), S.f16(w, 82)
    q = []  # 8 x (32 crumbs = two sub-blocks, their two scales spread over 8 + 8 lanes)
    for n in range(2):
        v = S.load(w, 16 + 32 * n, V32I8)
        for s in range(4):
            k = 8 * n + 2 * s
            # i16 lanes 0..7 <- scale k, lanes 8..15 <- scale k + 1 (one pshufb; -128 -> 0)
            scv = S.pshufb(sc, S.const(V32I8, [k, -128] * 8 + [k + 1, -128] * 8))
            q.append((S.and_(S.shr(v, 2 * s), 3), S.bitcast(scv, V16I16)))
    outs = []
    for qp, sp, dp in toks:
        acc = None
        for i, (c, scv) in enumerate(q):
            acc = S.dpwssd(acc, S.maddubs(c, S.load(qp, 32 * i, V32I8)), scv)
        msum = S.madd(S.load(sp, 0, V16I16), mn)
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
def _decode_block(w, r, o, dst, di, dj):
    """Block at byte ``o`` of row ``r`` -> dst[di, dj : dj + 256] (float32)."""
    d = half_at(w, r, o + 80)
    dmin = half_at(w, r, o + 82)
    for n in range(2):
        for s in range(4):
            k = 8 * n + 2 * s
            a = w[r, o + k]
            b = w[r, o + k + 1]
            dq32(w, r, o + 16 + 32 * n, 2 * s, 3, o, 0, 0, 0, d * bits_f32(a, 0, 15), d * bits_f32(b, 0, 15),
                 -dmin * bits_f32(a, 4, 15), -dmin * bits_f32(b, 4, 15), dst, di, dj + 128 * n + 32 * s)


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
