"""IQ4_XS: 256 weights in 136 bytes (4.25 bits per weight), non-linear 4-bit values.

Block layout (ggml ``block_iq4_xs``):
    d          f16   super-block scale
    scales_h   u16   high 2 bits of the 8 sub-block scales: bits 2j, 2j + 1 for sub-block j
    scales_l[4]      low 4 bits: (scales_l[j // 2] >> 4 (j % 2)) & 15
    qs[128]          sub-block j (32 weights): bytes 16j..16j+15, low nibbles = weights 0..15,
                     high nibbles = weights 16..31; a nibble indexes the IQ4_NL value table
    weight = d * (scale_j - 32) * kvalues[nibble]
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, quants
from numba import njit, prange

from .kq_common import (F32, HAS_SIMD, I16, NO_TABLE, QK, V16I8, V32I8, V4I8, V8I16, half_at, lut16,
                        q8_buffers, quantize_q8, row_dot, signed_maddubs, vscale)

QTYPE = GGMLQuantizationType.IQ4_XS
TS = 136  # bytes per block
BS = QK
KVALUES = np.array(quants.IQ4_NL.kvalues, np.int8)  # the 16 non-linear levels
TABLE = KVALUES.astype(np.float32)

# ---------------------------------------------------------------------------------------------
# int8-activation kernels


def _scales(S, w):
    """The 8 signed sub-block scales as <8 x i16>."""
    lo = S.shuffle(S.load(w, 4, V4I8), [j // 2 for j in range(8)])
    lo = S.zext(S.and_(S.shr(lo, [4 * (j % 2) for j in range(8)]), 15), V8I16)
    hi = S.splat(S.load(w, 2, I16), V8I16)
    hi = S.shl(S.and_(S.shr(hi, [2 * j for j in range(8)]), 3), 4)
    return S.sub(S.b.or_(lo, hi), 32)


def _dot_body(S, w, toks, tab):
    d = S.f16(w, 0)
    sc = _scales(S, w)
    q = [lut16(S, KVALUES, S.load(w, 8 + 16 * j, V16I8)) for j in range(8)]
    aq = [S.psign(v, v) for v in q]  # |q|
    scv = [S.shuffle(sc, [j] * 16) for j in range(8)]
    outs = []
    for qp, sp, dp in toks:
        acc = None
        for j in range(8):
            acc = S.dpwssd(acc, signed_maddubs(S, q[j], aq[j], S.load(qp, 32 * j, V32I8)), scv[j])
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
def _decode_block(w, r, o, dst, di, dj, kv):
    """Block at byte ``o`` of row ``r`` -> dst[di, dj : dj + 256] (float32); kv: the 16 levels."""
    d = half_at(w, r, o)
    sh = np.int64(w[r, o + 2]) | (np.int64(w[r, o + 3]) << 8)
    for j in range(8):
        lo = (np.int64(w[r, o + 4 + j // 2]) >> (4 * (j % 2))) & 15
        dl = d * np.float32((lo | (((sh >> (2 * j)) & 3) << 4)) - 32)
        for l in range(16):
            q = w[r, o + 8 + 16 * j + l]
            dst[di, dj + 32 * j + l] = dl * kv[q & 15]
            dst[di, dj + 32 * j + 16 + l] = dl * kv[q >> 4]


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
    _matmul_f32(w, x, out, TABLE)


@njit(cache=True)
def matvec_f32(w, x, out):
    """out[r] = W[r] . x in float32.   w [R, RB] u8, x [C] f32, out [R] f32"""
    _matmul_f32(w, x.reshape((1, x.shape[0])), out.reshape((1, out.shape[0])), TABLE)


@njit(cache=True)
def dequantize_rows(w, ids, out):
    """out[i] = row ids[i] of W as float32.   ids [N] int, out [N, C] f32"""
    _dequantize_rows(w, ids, out, TABLE)


matvec = matvec_q8 if HAS_SIMD else matvec_f32
matmul = matmul_q8 if HAS_SIMD else matmul_f32
