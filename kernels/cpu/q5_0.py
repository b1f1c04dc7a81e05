"""Q5_0: blocks of 32 weights in 22 bytes: f16 d, 4 bytes qh, 16 bytes of nibbles.

Byte j of the nibbles holds the low 4 bits of element j (low nibble) and of element 16 + j
(high nibble); bit i of the little-endian uint32 qh is the fifth bit of element i.
weight = (q - 16) * d with q in 0..31.

Dot product of one block with x[32b : 32b + 32] (x0 = first 16, x1 = last 16):
    d * (q[:16] . x0 + q[16:] . x1) - 16 * d * sum(x0 + x1)
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from .common import gemm_rows4, load_f16, load_u32, nib5_hi, nib5_lo, vadd, vfma, vload, vmul, vsplat, vstore2, vsum, vzero

QTYPE = GGMLQuantizationType.Q5_0
BLOCK = 32  # weights per block
BYTES = 22  # bytes per block


@njit(fastmath=True, cache=True)
def _block(w, r, o, x0, x1, xs, acc, accm):
    # One block of row r at byte offset o: acc += d * (q . x), accm += d * (x0 + x1).
    qh = load_u32(w, r, o + 2)
    t = vfma(nib5_lo(qh, w, r, o + 6), x0, vmul(nib5_hi(qh, w, r, o + 6), x1))
    d = vsplat(load_f16(w, r, o))
    acc = vfma(d, t, acc)
    accm = vfma(d, xs, accm)
    return acc, accm


@njit(fastmath=True, cache=True)
def _finish(acc, accm):
    return vsum(vfma(vsplat(np.float32(-16.0)), accm, acc))


@njit(parallel=True, fastmath=True, cache=True)
def matvec(w, x, out):
    """out[r] = w[r] . x.   w [R, RB] u8, x [C] f32, out [R] f32."""
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


@njit(fastmath=True, cache=True)
def _dequant_row(w, r, dst, i):
    # dst[i, :] = row r of w as floats.
    for b in range(w.shape[1] // BYTES):
        o = b * BYTES
        d = load_f16(w, r, o)
        m = vsplat(np.float32(-16.0) * d)  # (q - 16) * d == q * d - 16 * d exactly
        d = vsplat(d)
        qh = load_u32(w, r, o + 2)
        vstore2(vfma(nib5_lo(qh, w, r, o + 6), d, m), dst, i, b * BLOCK)
        vstore2(vfma(nib5_hi(qh, w, r, o + 6), d, m), dst, i, b * BLOCK + 16)


@njit(parallel=True, fastmath=True, cache=True)
def matmul(w, x, out):
    """out[t, r] = w[r] . x[t].   w [R, RB] u8, x [T, C] f32, out [T, R] f32.

    Each group of 4 rows is unpacked once into a float tile, then multiplied with all T tokens.
    """
    rows = w.shape[0]
    groups = (rows + 3) // 4
    chunks = min(groups, 64)  # parallel work items, each with its own tile
    for ch in prange(chunks):
        tile = np.zeros((4, x.shape[1]), np.float32)
        for g in range(ch * groups // chunks, (ch + 1) * groups // chunks):
            r = 4 * g
            nr = min(4, rows - r)
            for i in range(nr):
                _dequant_row(w, r + i, tile, i)
            gemm_rows4(tile, nr, x, out, r)


@njit(fastmath=True, cache=True)
def dequantize_rows(w, ids, out):
    """out[k] = row ids[k] of w as floats.   out [len(ids), C] f32."""
    for k in range(ids.shape[0]):
        _dequant_row(w, ids[k], out, k)
