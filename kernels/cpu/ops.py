"""Layer operations other than the weight products: RMSNorm, RoPE, attention, SwiGLU.

Shapes: T = tokens in the batch, D = hidden size, H = query heads, Hkv = key/value heads,
K = head size of q/k, V = head size of v, N = context slots in the KV cache.
Inputs and outputs float32, in place where the caller owns the buffer. Each output value is
its float64 expression rounded once to float32 (docs/architecture.md, Numerics): the GPU's ops
compute the same expressions in float64, so both devices store the same float32 numbers but
at a rounding boundary (~1e-16 apart before the rounding).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


# Small element-wise operations run on one thread: a parallel region costs more than their work
# for a decode step (and much more when other processes compete for the cores).


@njit(fastmath=True, cache=True)
def rmsnorm(x, w, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w.   x, out [T, D]; w [D]"""
    T, D = x.shape
    for t in range(T):
        ss = np.float64(0.0)
        for i in range(D):
            v = np.float64(x[t, i])
            ss += v * v
        inv = 1.0 / np.sqrt(ss / D + np.float64(eps))
        for i in range(D):
            out[t, i] = np.float64(x[t, i]) * inv * np.float64(w[i])


@njit(fastmath=True, cache=True)
def rmsnorm_heads(x, w, eps):
    """Per-head RMSNorm in place (qwen3's q/k norm).   x [T, H, K]; w [K]"""
    T, H, K = x.shape
    for t in range(T):
        for h in range(H):
            ss = np.float64(0.0)
            for i in range(K):
                v = np.float64(x[t, h, i])
                ss += v * v
            inv = 1.0 / np.sqrt(ss / K + np.float64(eps))
            for i in range(K):
                x[t, h, i] = np.float64(x[t, h, i]) * inv * np.float64(w[i])


@njit(fastmath=False, cache=True)
def rope(x, positions, inv_freq, attn_factor, neox):
    """Rotate the first 2*len(inv_freq) dims of each head in place.   x [T, H, K]; positions [T]

    neox=False rotates adjacent pairs (x[2i], x[2i+1]); neox=True rotates (x[i], x[i + n/2]).
    The angle, its cosine and sine and the rotation in float64 from float32 frequencies; each
    output rounded once.
    """
    T, H, K = x.shape
    half = inv_freq.shape[0]
    for t in range(T):
        p = np.float64(positions[t])
        for i in range(half):
            ang = p * np.float64(inv_freq[i])
            c = math.cos(ang) * attn_factor
            s = math.sin(ang) * attn_factor
            if neox:
                i0 = i
                i1 = i + half
            else:
                i0 = 2 * i
                i1 = 2 * i + 1
            for h in range(H):
                a = np.float64(x[t, h, i0])
                b = np.float64(x[t, h, i1])
                x[t, h, i0] = a * c - b * s
                x[t, h, i1] = a * s + b * c


def attention(q, kc, vc, pos0, scale, out):
    """Causal GQA attention (see _attention); one thread when the work is small."""
    T, H, _ = q.shape
    if T * H * (pos0 + T) * q.shape[2] < 1 << 18:
        _attention_serial(q, kc, vc, pos0, scale, out)
    else:
        _attention_parallel(q, kc, vc, pos0, scale, out)


def _attention(q, kc, vc, pos0, scale, out):
    """Causal GQA attention of T new queries over the cache.

    q [T, H, K]; kc [N, Hkv, K]; vc [N, Hkv, V]; out [T, H, V]. Query t sits at position pos0 + t
    and attends to cache slots 0 .. pos0 + t (the new keys must already be in the cache).
    Scores, softmax and the weighted sum in float64; the output rounded once.
    """
    T, H, K = q.shape
    Hkv = kc.shape[1]
    V = vc.shape[2]
    group = H // Hkv
    for idx in prange(T * H):  # prange is a plain range in the serial compilation
        t = idx // H
        h = idx - t * H
        g = h // group
        n = pos0 + t + 1
        buf = np.empty(n + V, dtype=np.float64)  # (one allocation per query and head)
        scores = buf[:n]
        acc = buf[n:]
        acc[:] = 0.0
        m = -np.inf
        for j in range(n):
            s = np.float64(0.0)
            for i in range(K):
                s += np.float64(q[t, h, i]) * np.float64(kc[j, g, i])
            s *= np.float64(scale)
            scores[j] = s
            if s > m:
                m = s
        total = np.float64(0.0)
        for j in range(n):
            e = np.exp(scores[j] - m)
            scores[j] = e
            total += e
        for j in range(n):
            p = scores[j]
            for i in range(V):
                acc[i] += p * np.float64(vc[j, g, i])
        for i in range(V):
            out[t, h, i] = acc[i] / total


@njit(cache=True)
def expert_sum1(sel, w, ids, y, out):
    """One token's routed experts summed: out = float32(sum over j of w[a_j] * y[j]) in float64,
    j in the order of ids (ascending), a_j the slot of expert ids[j] in sel.
    sel, w [A]; ids [k]; y [k, D] f32; out [D] f32.

    No fastmath: each product and sum rounded in float64 as numpy rounds them (no fused
    multiply-add), the same roundings as arch/moe.py's sum over several tokens."""
    D = y.shape[1]
    acc = np.zeros(D, np.float64)
    for j in range(ids.shape[0]):
        a = 0
        while sel[a] != ids[j]:
            a += 1
        wj = np.float64(w[a])
        for i in range(D):
            acc[i] += wj * np.float64(y[j, i])
    for i in range(D):
        out[i] = acc[i]


@njit(fastmath=True, cache=True)
def _silu_mul_rows(gate, up, t0, t1):
    F = gate.shape[1]
    for t in range(t0, t1):
        for i in range(F):
            g = np.float64(gate[t, i])
            gate[t, i] = g / (1.0 + np.exp(-g)) * np.float64(up[t, i])


@njit(parallel=True, fastmath=True, cache=True)
def _silu_mul_par(gate, up):
    for t in prange(gate.shape[0]):
        _silu_mul_rows(gate, up, t, t + 1)


def silu_mul(gate, up):
    """gate = silu(gate) * up, in place.   gate, up [T, F]. Rows in parallel when there are
    several and enough values (a decode token's experts: 8 x 1536 took ~70 us on one thread);
    each value computed by the same row loop either way."""
    if gate.shape[0] > 1 and gate.size >= 8192:
        _silu_mul_par(gate, up)
    else:
        _silu_mul_rows(gate, up, 0, gate.shape[0])


_attention_parallel = njit(parallel=True, fastmath=True, cache=True)(_attention)
_attention_serial = njit(fastmath=True, cache=True)(_attention)


@njit(fastmath=True, cache=True)
def add_inplace(x, y):
    """x += y.   x, y [T, D]"""
    T, D = x.shape
    for t in range(T):
        for i in range(D):
            x[t, i] += y[t, i]
