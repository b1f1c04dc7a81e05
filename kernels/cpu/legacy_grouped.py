"""Grouped expert products of the 32-weight formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): a MoE
layer's routed experts in one call, as ``kq_grouped`` does for the K-quants.

``matvec_ids(w, ids, x, out)``: out[j] = W[ids[j]] . x[j] (x[0] for every j when x has one row),
w [E, R, RB] u8, ids [n], x [1 or n, C], out [n, R]. One parallel region over all the experts'
groups of 4 rows, x rounded to int8 once per row; each group is the format's own ``group_q8``
(the body of its ``matvec_q8``), so every row equals ``matvec`` for that expert bit for bit.
One kernel told apart by ``kind``, as in ``kq_grouped`` (Numba caches it).
"""
from __future__ import annotations

import functools

import numpy as np
from gguf import GGMLQuantizationType as QT
from numba import njit, prange

from .common import HAS_VNNI, quantize_x
from .q4_0 import group_q8 as _group_q4_0
from .q4_1 import group_q8 as _group_q4_1
from .q5_0 import group_q8 as _group_q5_0
from .q5_1 import group_q8 as _group_q5_1
from .q8_0 import group_q8 as _group_q8_0

_KINDS = {QT.Q4_0: 0, QT.Q4_1: 1, QT.Q5_0: 2, QT.Q5_1: 3, QT.Q8_0: 4}


@njit(parallel=True, fastmath=True, cache=True)
def _matvec_ids(kind, w, ids, x, out):
    n = ids.shape[0]
    R = w.shape[1]
    T, C = x.shape
    nb = C // 32
    xq = np.empty((T, C), np.int8)
    xd = np.empty((T, nb), np.float32)
    xs = np.empty((T, nb), np.int32)
    for t in range(T):
        quantize_x(x[t], xq[t], xd[t], xs[t])
    ng = (R + 3) // 4
    for i in prange(n * ng):
        j = i // ng
        g = i - j * ng
        t = j if T > 1 else 0
        we = w[ids[j]]
        if kind == 0:
            _group_q4_0(we, g, xq[t], xd[t], xs[t], out[j])
        elif kind == 1:
            _group_q4_1(we, g, xq[t], xd[t], xs[t], out[j])
        elif kind == 2:
            _group_q5_0(we, g, xq[t], xd[t], xs[t], out[j])
        elif kind == 3:
            _group_q5_1(we, g, xq[t], xd[t], xs[t], out[j])
        else:
            _group_q8_0(we, g, xq[t], xd[t], xs[t], out[j])


def matvec_ids(qtype):
    """The grouped product for ``qtype``, or None (another format, or no VNNI: the float
    kernels take one product per expert)."""
    kind = _KINDS.get(qtype)
    if kind is None or not HAS_VNNI:
        return None
    return functools.partial(_matvec_ids, kind)
