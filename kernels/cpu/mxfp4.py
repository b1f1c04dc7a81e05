"""MXFP4: 32 weights in 17 bytes (4.25 bits per weight), OCP microscaling FP4.

Block layout (ggml ``block_mxfp4``):
    e        u8    shared exponent (E8M0): scale 2**(e - 127)
    qs[16]         low nibbles = weights 0..15, high nibbles = weights 16..31; a nibble is an
                   E2M1 number (sign bit 3), ggml stores its levels doubled (0, 1, 2, 3, 4, 6, 8,
                   12, and negatives) and halves the scale instead: 2**(e - 128)
    weight = 2**(e - 128) * kvalues[nibble]

The int8 kernels quantize x per 32 (as llama.cpp pairs MXFP4 with Q8_0 activations) and take
eight blocks per step when the row length allows.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, quants
from numba import njit, prange

from .kq_common import (F32, FAST, HAS_SIMD, I8, NO_TABLE, V16I16, V16I8, V32I8, V8F32, V8F64, to_f64, e8m0_f32,
                        e8m0_half, lut16, q8_buffers, quantize_q8, row_dot, signed_maddubs)

QTYPE = GGMLQuantizationType.MXFP4
TS = 17  # bytes per block
BS = 32  # weights per block
QB = 32  # activation block of the int8 kernels
KVALUES = np.array(quants.MXFP4.kvalues, np.int8)  # the 16 E2M1 levels, doubled
TABLE = KVALUES.astype(np.float32)

# ---------------------------------------------------------------------------------------------
# int8-activation kernels


def _group_body(G):
    """IR for G consecutive blocks: per block, 32 signed levels against 32 int8 activations,
    the int sum scaled by (weight scale x activation scale) in float."""

    def body(S, w, toks, tab):
        q, aq, d = [], [], []
        for k in range(G):
            d.append(e8m0_half(S, S.load(w, k * TS, I8)))
            v = lut16(S, KVALUES, S.load(w, k * TS + 1, V16I8))
            q.append(v)
            aq.append(S.psign(v, v))
        ones = S.const(V16I16, 1)
        outs = []
        for qp, sp, dp in toks:
            acc = None
            for k in range(G):
                p = S.madd(signed_maddubs(S, q[k], aq[k], S.load(qp, 32 * k, V32I8)), ones)
                s = S.splat(S.fmul(to_f64(S, d[k]), to_f64(S, S.load(dp, 4 * k, F32))), V8F64)
                p = S.b.fmul(S.b.sitofp(p, V8F64), s, flags=FAST)
                acc = p if acc is None else S.b.fadd(acc, p, flags=FAST)
            outs.append(acc)
        return outs

    body.__name__ = f"{__name__.rsplit('.', 1)[-1]}_x{G}"
    return body


_row8 = row_dot(_group_body(8), 1, QB, 8, 8 * TS)  # 8 blocks (256 weights) per step
_row8x4 = row_dot(_group_body(8), 4, QB, 8, 8 * TS)
_row1 = row_dot(_group_body(1), 1, QB, 1, TS)  # what is left of a row


@njit(parallel=True, fastmath=True, cache=True)
def matmul_q8(w, x, out):
    """out[t, r] = W[r] . x[t], four tokens per pass over a row.   x [T, C], out [T, R]"""
    R, RB = w.shape
    T, C = x.shape
    nb = C // QB
    ng = nb // 8
    xq, xd, xs = q8_buffers(T, C, QB)
    quantize_q8(x, QB, xq, xd, xs)
    RT = 8  # rows per tile: the tile's weights stay in cache while all tokens pass over them
    T4 = T - T % 4
    for tile in prange((R + RT - 1) // RT):
        r1 = min(R, tile * RT + RT)
        for t in range(0, T4, 4):
            for r in range(tile * RT, r1):
                out[t, r], out[t + 1, r], out[t + 2, r], out[t + 3, r] = _row8x4(
                    w, r * RB, ng, xq, xd, xs, NO_TABLE, t, 0)
        for t in range(T4, T):
            for r in range(tile * RT, r1):
                out[t, r] = _row8(w, r * RB, ng, xq, xd, xs, NO_TABLE, t, 0)
        if nb > 8 * ng:
            for t in range(T):
                for r in range(tile * RT, r1):
                    out[t, r] += _row1(w, r * RB + 8 * ng * TS, nb - 8 * ng, xq, xd, xs, NO_TABLE, t, 8 * ng)


@njit(cache=True)
def matvec_q8(w, x, out):
    """out[r] = W[r] . x with x quantized to 8 bits per 32-block.   w [R, RB] u8, x [C], out [R]"""
    matmul_q8(w, x.reshape((1, x.shape[0])), out.reshape((1, out.shape[0])))


# ---------------------------------------------------------------------------------------------
# float kernels


@njit(inline="always")
def _decode_block(w, r, o, dst, di, dj, kv):
    """Block at byte ``o`` of row ``r`` -> dst[di, dj : dj + 32] (float32); kv: the 16 levels."""
    d = e8m0_f32(w[r, o])
    for l in range(16):
        q = w[r, o + 1 + l]
        dst[di, dj + l] = d * kv[q & 15]
        dst[di, dj + 16 + l] = d * kv[q >> 4]


@njit(parallel=True, fastmath=True, cache=True)
def _matmul_f32(w, x, out, tab):
    R = w.shape[0]
    T, C = x.shape
    nb = C // BS
    RT = 16
    for tile in prange((R + RT - 1) // RT):
        buf = np.empty((1, 8 * BS), np.float32)
        acc = np.empty(T, np.float32)
        for r in range(tile * RT, min(R, tile * RT + RT)):
            acc[:] = 0.0
            for b0 in range(0, nb, 8):  # 8 blocks (256 weights) decoded, then one dot per token
                nbk = min(8, nb - b0)
                for k in range(nbk):
                    _decode_block(w, r, (b0 + k) * TS, buf, 0, k * BS, tab)
                for t in range(T):
                    s = np.float32(0.0)
                    for l in range(nbk * BS):
                        s += buf[0, l] * x[t, b0 * BS + l]
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
