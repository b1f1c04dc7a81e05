"""Layer operations other than the weight products: RMSNorm, RoPE, attention, SwiGLU.

Shapes: T = tokens in the batch, D = hidden size, H = query heads, Hkv = key/value heads,
K = head size of q/k, V = head size of v, N = context slots in the KV cache.
Everything float32, in place where the caller owns the buffer.
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
        ss = np.float32(0.0)
        for i in range(D):
            ss += x[t, i] * x[t, i]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(D) + np.float32(eps))
        for i in range(D):
            out[t, i] = x[t, i] * inv * w[i]


@njit(fastmath=True, cache=True)
def rmsnorm_heads(x, w, eps):
    """Per-head RMSNorm in place (qwen3's q/k norm).   x [T, H, K]; w [K]"""
    T, H, K = x.shape
    for t in range(T):
        for h in range(H):
            ss = np.float32(0.0)
            for i in range(K):
                ss += x[t, h, i] * x[t, h, i]
            inv = np.float32(1.0) / np.sqrt(ss / np.float32(K) + np.float32(eps))
            for i in range(K):
                x[t, h, i] = x[t, h, i] * inv * w[i]


@njit(fastmath=False, cache=True)
def rope(x, positions, inv_freq, attn_factor, neox):
    """Rotate the first 2*len(inv_freq) dims of each head in place.   x [T, H, K]; positions [T]

    neox=False rotates adjacent pairs (x[2i], x[2i+1]); neox=True rotates (x[i], x[i + n/2]).
    The angle is computed in float64 from float32 frequencies, then applied in float32.
    """
    T, H, K = x.shape
    half = inv_freq.shape[0]
    for t in range(T):
        p = np.float64(positions[t])
        for i in range(half):
            ang = p * np.float64(inv_freq[i])
            c = np.float32(math.cos(ang) * attn_factor)
            s = np.float32(math.sin(ang) * attn_factor)
            if neox:
                i0 = i
                i1 = i + half
            else:
                i0 = 2 * i
                i1 = 2 * i + 1
            for h in range(H):
                a = x[t, h, i0]
                b = x[t, h, i1]
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
        scores = np.empty(n, dtype=np.float32)
        m = np.float32(-np.inf)
        for j in range(n):
            s = np.float32(0.0)
            for i in range(K):
                s += q[t, h, i] * kc[j, g, i]
            s *= scale
            scores[j] = s
            if s > m:
                m = s
        total = np.float32(0.0)
        for j in range(n):
            e = np.exp(scores[j] - m)
            scores[j] = e
            total += e
        inv = np.float32(1.0) / total
        for i in range(V):
            out[t, h, i] = 0.0
        for j in range(n):
            p = scores[j] * inv
            for i in range(V):
                out[t, h, i] += p * vc[j, g, i]


@njit(fastmath=True, cache=True)
def silu_mul(gate, up):
    """gate = silu(gate) * up, in place.   gate, up [T, F]"""
    T, F = gate.shape
    for t in range(T):
        for i in range(F):
            g = gate[t, i]
            gate[t, i] = g / (np.float32(1.0) + np.exp(-g)) * up[t, i]


_attention_parallel = njit(parallel=True, fastmath=True, cache=True)(_attention)
_attention_serial = njit(fastmath=True, cache=True)(_attention)


@njit(fastmath=True, cache=True)
def add_inplace(x, y):
    """x += y.   x, y [T, D]"""
    T, D = x.shape
    for t in range(T):
        for i in range(D):
            x[t, i] += y[t, i]
