"""Q5_1: blocks of 32 weights in 24 bytes: f16 d, f16 m, 4 bytes qh, 16 bytes of nibbles.

Byte j of the nibbles holds the low 4 bits of element j (low nibble) and of element 16 + j
(high nibble); bit i of the little-endian uint32 qh is the fifth bit of element i.
weight = q * d + m with q in 0..31.

Float path, one block against x[32b : 32b + 32] (x0 = first 16, x1 = last 16):
    d * (q[:16] . x0 + q[16:] . x1) + m * sum(x0 + x1)

Two decode paths: ``matvec_q8`` (the default where the CPU has VNNI) rounds x to int8 per
32-block and computes each block's dot product in integers, as llama.cpp does with its Q8_0/Q8_1
activations (1.4-2.5x the float path's throughput per core, see bench/kernels.py);
``matvec_f32`` stays in float32 throughout. ``matmul`` (prefill) is float: each group of 4 rows
is unpacked once into a float tile and multiplied with all tokens.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from .common import (HAS_VNNI, gemm_rows4, gemm_xt, idot_nib5, iscale_add, load_f16, load_u32, make_pair_dot, nib5_hi,
                     nib5_lo, prefetch, quantize_x, transpose_x, vadd, vfma, vfma_rn, vlane4, vload, vmul, vsplat,
                     vstore2, vsum, vsum4, vsum8_halves, vzero, vzero4, vzero8)

QTYPE = GGMLQuantizationType.Q5_1
BLOCK = 32  # weights per block
BYTES = 24  # bytes per block
CORR = 0  # int8 path: integer offset per unit of sum(xq) (none: the offset m is a float)
AHEAD = 16  # int8 path: prefetch the rows this far ahead
_pair = make_pair_dot(qs_off=8, qh_off=4, has_min=True)  # int8 path, two rows per block


@njit(fastmath=True, cache=True)
def _block(w, r, o, x0, x1, xs, acc, accm):
    # One block of row r at byte offset o: acc += d * (q . x), accm += m * (x0 + x1).
    qh = load_u32(w, r, o + 4)
    t = vfma(nib5_lo(qh, w, r, o + 8), x0, vmul(nib5_hi(qh, w, r, o + 8), x1))
    acc = vfma(vsplat(load_f16(w, r, o)), t, acc)
    accm = vfma(vsplat(load_f16(w, r, o + 2)), xs, accm)
    return acc, accm


@njit(fastmath=True, cache=True)
def _finish(acc, accm):
    return vsum(vadd(acc, accm))


@njit(parallel=True, fastmath=True, cache=True)
def matvec_f32(w, x, out):
    """out[r] = w[r] . x in float32.   w [R, RB] u8, x [C] f32, out [R] f32."""
    rows = w.shape[0]
    nb = w.shape[1] // BYTES
    # Groups of 4 rows share each load of x; a group is one parallel work item.
    for g in prange((rows + 3) // 4):
        r = 4 * g
        if r + 4 <= rows:
            a0 = vzero(); a1 = vzero(); a2 = vzero(); a3 = vzero()  # noqa: E702
            m0 = vzero(); m1 = vzero(); m2 = vzero(); m3 = vzero()  # noqa: E702
            for b in range(nb):
                o = b * BYTES
                x0 = vload(x, b * BLOCK)
                x1 = vload(x, b * BLOCK + 16)
                xs = vadd(x0, x1)
                a0, m0 = _block(w, r, o, x0, x1, xs, a0, m0)
                a1, m1 = _block(w, r + 1, o, x0, x1, xs, a1, m1)
                a2, m2 = _block(w, r + 2, o, x0, x1, xs, a2, m2)
                a3, m3 = _block(w, r + 3, o, x0, x1, xs, a3, m3)
            out[r] = _finish(a0, m0)
            out[r + 1] = _finish(a1, m1)
            out[r + 2] = _finish(a2, m2)
            out[r + 3] = _finish(a3, m3)
        else:
            for rr in range(r, rows):
                a0 = vzero()
                m0 = vzero()
                for b in range(nb):
                    x0 = vload(x, b * BLOCK)
                    x1 = vload(x, b * BLOCK + 16)
                    a0, m0 = _block(w, rr, b * BYTES, x0, x1, vadd(x0, x1), a0, m0)
                out[rr] = _finish(a0, m0)


# ---------------------------------------------------------------------------------------------
# int8 activations: x quantized per 32-block (see common.py), one integer dot product per block


@njit(fastmath=True, cache=True)
def _qblock(w, r, o, xq, xo, dx, sx, c, acc, accm):
    # acc += d * dx * (q . xq), accm += m * dx * sum(xq)
    qh = load_u32(w, r, o + 4)
    acc = iscale_add(idot_nib5(qh, w, r, o + 8, xq, xo, c), np.float64(load_f16(w, r, o)) * dx, acc)
    accm += np.float64(load_f16(w, r, o + 2)) * sx
    return acc, accm


@njit(fastmath=True, cache=True)
def group_q8(w, g, xq, xd, xs, out):
    """out[r] = w[r] . x for the rows r of group g (4 g .. 4 g + 3, fewer at the end), x rounded
    to 8 bits per 32-block (xq, xd, xs: quantize_x's).   w [R, RB] u8, out [R]."""
    rows = w.shape[0]
    nb = w.shape[1] // BYTES
    r = 4 * g
    if r + 4 <= rows:
        # rows (r, r + 1) and (r + 2, r + 3) in pairs: see make_pair_dot
        a01 = vzero8(); a23 = vzero8(); m01 = vzero4(); m23 = vzero4()  # noqa: E702
        ahead = min(r + AHEAD, rows - 4)  # the group whose rows to prefetch
        for b in range(nb):
            o = b * BYTES
            prefetch(w, ahead, o)
            prefetch(w, ahead + 1, o)
            prefetch(w, ahead + 2, o)
            prefetch(w, ahead + 3, o)
            xo = b * BLOCK
            dx = xd[b]
            sx = np.float64(dx) * xs[b]
            c = CORR * xs[b]
            a01, m01 = _pair(w, r, o, xq, xo, dx, sx, c, a01, m01)
            a23, m23 = _pair(w, r + 2, o, xq, xo, dx, sx, c, a23, m23)
        s0, s1 = vsum8_halves(a01)
        s2, s3 = vsum8_halves(a23)
        out[r] = s0 + vlane4(m01, 1)
        out[r + 1] = s1 + vlane4(m01, 3)
        out[r + 2] = s2 + vlane4(m23, 1)
        out[r + 3] = s3 + vlane4(m23, 3)
    else:
        for rr in range(r, rows):
            a0 = vzero4()
            m0 = np.float64(0.0)
            for b in range(nb):
                dx = xd[b]
                a0, m0 = _qblock(w, rr, b * BYTES, xq, b * BLOCK, dx, np.float64(dx) * xs[b], CORR * xs[b],
                                 a0, m0)
            out[rr] = vsum4(a0) + m0


@njit(parallel=True, fastmath=True, cache=True)
def matvec_q8(w, x, out):
    """out[r] = w[r] . x with x rounded to 8 bits per 32-block.   w [R, RB] u8, x [C], out [R]."""
    nb = w.shape[1] // BYTES
    xq = np.empty(x.shape[0], np.int8)
    xd = np.empty(nb, np.float32)
    xs = np.empty(nb, np.int32)
    quantize_x(x, xq, xd, xs)
    for g in prange((w.shape[0] + 3) // 4):
        group_q8(w, g, xq, xd, xs, out)


# ---------------------------------------------------------------------------------------------
# prefill and dequantization


@njit(fastmath=True, cache=True)
def _dequant_row(w, r, dst, i):
    # dst[i, :] = row r of w as floats.
    for b in range(w.shape[1] // BYTES):
        o = b * BYTES
        d = vsplat(load_f16(w, r, o))
        m = vsplat(load_f16(w, r, o + 2))
        qh = load_u32(w, r, o + 4)
        vstore2(vfma_rn(nib5_lo(qh, w, r, o + 8), d, m), dst, i, b * BLOCK)
        vstore2(vfma_rn(nib5_hi(qh, w, r, o + 8), d, m), dst, i, b * BLOCK + 16)


@njit(parallel=True, fastmath=True, cache=True)
def matmul_f32(w, x, out):
    """out[t, r] = w[r] . x[t].   w [R, RB] u8, x [T, C] f32, out [T, R] f32.

    Each group of 4 rows is unpacked once into a float tile, then multiplied with all T tokens.
    """
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


matvec = matvec_q8 if HAS_VNNI else matvec_f32
matmul = matmul_f32
