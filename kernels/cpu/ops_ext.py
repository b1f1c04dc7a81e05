"""Layer operations of the deepseek2 and gpt-oss architectures (the common ones live in ops.py):
causal attention with per-head sink logits and a sliding window, multi-head latent attention over
a cache of latents, and gpt-oss's clamped SwiGLU.

Shapes: T = tokens in the batch, H = query heads, Hkv = key/value heads, K/V = head sizes of
q-k/v, N = context slots in the KV cache, F = MLP width, C = latent size (kv_lora_rank),
R = rotary size of the shared key. float32, in place where the caller owns the buffer.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


def attention(q, kc, vc, pos0, scale, sinks, window, out):
    """Causal GQA attention with optional sinks and sliding window (see _attention); one
    thread when the work is small."""
    T, H, _ = q.shape
    n = pos0 + T if window <= 0 else min(pos0 + T, window)
    if T * H * n * q.shape[2] < 1 << 18:
        _attention_serial(q, kc, vc, pos0, scale, sinks, window, out)
    else:
        _attention_parallel(q, kc, vc, pos0, scale, sinks, window, out)


def _attention(q, kc, vc, pos0, scale, sinks, window, out):
    """T new queries over the cache; query t sits at position pos0 + t.

    q [T, H, K]; kc [N, Hkv, K]; vc [N, Hkv, V]; out [T, H, V]; sinks [H] or [0] (none).
    The query at position p attends to cache slots j with j <= p and, when window > 0,
    p - j < window (llama.cpp's standard sliding window: the window counts the query itself).
    With sinks, head h's softmax runs over its scores and one more logit sinks[h] (unscaled)
    whose probability mass is dropped: gpt-oss's attention sinks.
    """
    T, H, K = q.shape
    Hkv = kc.shape[1]
    V = vc.shape[2]
    group = H // Hkv
    has_sinks = sinks.shape[0] > 0
    for idx in prange(T * H):  # prange is a plain range in the serial compilation
        t = idx // H
        h = idx - t * H
        g = h // group
        p = pos0 + t
        j0 = 0
        if window > 0 and p - window + 1 > 0:
            j0 = p - window + 1
        n = p + 1 - j0
        scores = np.empty(n, dtype=np.float32)
        m = np.float32(-np.inf)
        if has_sinks:
            m = sinks[h]
        for jj in range(n):
            j = j0 + jj
            s = np.float32(0.0)
            for i in range(K):
                s += q[t, h, i] * kc[j, g, i]
            s *= scale
            scores[jj] = s
            if s > m:
                m = s
        total = np.float32(0.0)
        if has_sinks:
            total = np.exp(sinks[h] - m)
        for jj in range(n):
            e = np.exp(scores[jj] - m)
            scores[jj] = e
            total += e
        inv = np.float32(1.0) / total
        for i in range(V):
            out[t, h, i] = 0.0
        for jj in range(n):
            pj = scores[jj] * inv
            j = j0 + jj
            for i in range(V):
                out[t, h, i] += pj * vc[j, g, i]


_attention_parallel = njit(parallel=True, fastmath=True, cache=True)(_attention)
_attention_serial = njit(fastmath=True, cache=True)(_attention)


def mla_attention(q_lat, q_pe, lat, pe, pos0, scale, out):
    """Multi-head latent attention in its absorbed form (see _mla_attention)."""
    T, H, C = q_lat.shape
    if T * H * (pos0 + T) * (C + q_pe.shape[2]) < 1 << 18:
        _mla_serial(q_lat, q_pe, lat, pe, pos0, scale, out)
    else:
        _mla_parallel(q_lat, q_pe, lat, pe, pos0, scale, out)


def _mla_attention(q_lat, q_pe, lat, pe, pos0, scale, out):
    """Causal attention of T new queries whose keys and values are the cached latents.

    q_lat [T, H, C] (q_nope already multiplied by each head's k_b); q_pe [T, H, R] (rotated);
    lat [N, C] (normed compressed kv); pe [N, R] (rotated shared rope key); out [T, H, C].
    score(t, h, j) = scale * (q_lat[t, h] . lat[j] + q_pe[t, h] . pe[j]) for j <= pos0 + t;
    out[t, h] = sum_j softmax_j(score) lat[j]: the latent that each head's v_b then expands.
    """
    T, H, C = q_lat.shape
    R = q_pe.shape[2]
    for idx in prange(T * H):
        t = idx // H
        h = idx - t * H
        n = pos0 + t + 1
        scores = np.empty(n, dtype=np.float32)
        m = np.float32(-np.inf)
        for j in range(n):
            s = np.float32(0.0)
            for i in range(C):
                s += q_lat[t, h, i] * lat[j, i]
            for i in range(R):
                s += q_pe[t, h, i] * pe[j, i]
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
        for i in range(C):
            out[t, h, i] = 0.0
        for j in range(n):
            p = scores[j] * inv
            for i in range(C):
                out[t, h, i] += p * lat[j, i]


_mla_parallel = njit(parallel=True, fastmath=True, cache=True)(_mla_attention)
_mla_serial = njit(fastmath=True, cache=True)(_mla_attention)


@njit(fastmath=True, cache=True)
def swiglu_oai(gate, up, alpha, limit):
    """gpt-oss's clamped SwiGLU, in place into gate:
    g = min(gate, limit); u = clamp(up, -limit, limit); gate = g * sigmoid(alpha * g) * (u + 1).
    gate, up [T, F]"""
    T, F = gate.shape
    for t in range(T):
        for i in range(F):
            g = min(gate[t, i], limit)
            u = min(max(up[t, i], -limit), limit)
            gate[t, i] = g / (np.float32(1.0) + np.exp(-alpha * g)) * (u + np.float32(1.0))

