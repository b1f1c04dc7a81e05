"""Grouped expert products of the K-quants: a MoE layer's routed experts in one call.

``matvec_ids(w, ids, x, out)``: out[j] = W[ids[j]] . x[j] (x[0] for every j when x has one row),
w [E, R, RB] u8, ids [n], x [1 or n, C], out [n, R]. One parallel region over all the experts'
rows, x rounded to int8 once; each output row is the format's own row loop (``_row1``), so it
equals ``matvec`` for that expert bit for bit.

One kernel for the five formats, told apart by ``kind`` (a branch per row): Numba caches a
function whose row loop is a module-level global, not one built by a factory per format.
"""
from __future__ import annotations

import functools

from gguf import GGMLQuantizationType as QT
from numba import njit, prange

from .kq_common import HAS_SIMD, NO_TABLE, QK, q8_buffers, quantize_q8
from .q2_k import _row1 as _row_q2_k
from .q3_k import _row1 as _row_q3_k
from .q4_k import _row1 as _row_q4_k
from .q5_k import _row1 as _row_q5_k
from .q6_k import _row1 as _row_q6_k

_KINDS = {QT.Q2_K: 2, QT.Q3_K: 3, QT.Q4_K: 4, QT.Q5_K: 5, QT.Q6_K: 6}


@njit(parallel=True, fastmath=True, cache=True)
def _matvec_ids(kind, w, ids, x, out):
    n = ids.shape[0]
    R, RB = w.shape[1], w.shape[2]
    T, C = x.shape
    nb = C // QK
    xq, xd, xs = q8_buffers(T, C, QK)
    quantize_q8(x, QK, xq, xd, xs)
    RT = 8  # rows per work item
    nt = (R + RT - 1) // RT
    for i in prange(n * nt):
        j = i // nt
        tile = i - j * nt
        we = w[ids[j]]
        t = j if T > 1 else 0
        for r in range(tile * RT, min(R, tile * RT + RT)):
            o = r * RB
            if kind == 4:
                v = _row_q4_k(we, o, nb, xq, xd, xs, NO_TABLE, t, 0)
            elif kind == 2:
                v = _row_q2_k(we, o, nb, xq, xd, xs, NO_TABLE, t, 0)
            elif kind == 3:
                v = _row_q3_k(we, o, nb, xq, xd, xs, NO_TABLE, t, 0)
            elif kind == 5:
                v = _row_q5_k(we, o, nb, xq, xd, xs, NO_TABLE, t, 0)
            else:
                v = _row_q6_k(we, o, nb, xq, xd, xs, NO_TABLE, t, 0)
            out[j, r] = v


def matvec_ids(qtype):
    """The grouped product for ``qtype``, or None (formats without one, or no AVX2: the float
    path takes one product per expert)."""
    kind = _KINDS.get(qtype)
    if kind is None or not HAS_SIMD:
        return None
    return functools.partial(_matvec_ids, kind)
