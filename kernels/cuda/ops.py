"""Layer operations on the GPU, with the CPU ``ops`` module's names and shapes (device arrays):
RMSNorm, RoPE, attention over a device KV cache, SwiGLU, residual add, softmax/top-k routing.

Shapes: T tokens, D hidden, H query heads, Hkv key/value heads, K / V head sizes, N cache slots.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

NT = 256  # threads per block of the reductions


@cuda.jit(device=True, inline=True)
def _block_sum(v, sh):
    tid = cuda.threadIdx.x
    sh[tid] = v
    cuda.syncthreads()
    s = NT // 2
    while s > 0:
        if tid < s:
            sh[tid] += sh[tid + s]
        cuda.syncthreads()
        s //= 2
    r = sh[0]
    cuda.syncthreads()
    return r


@cuda.jit(device=True, inline=True)
def _block_max(v, sh):
    tid = cuda.threadIdx.x
    sh[tid] = v
    cuda.syncthreads()
    s = NT // 2
    while s > 0:
        if tid < s:
            sh[tid] = max(sh[tid], sh[tid + s])
        cuda.syncthreads()
        s //= 2
    r = sh[0]
    cuda.syncthreads()
    return r


@cuda.jit(fastmath=True)
def _rmsnorm(x, w, eps, out):
    t = cuda.blockIdx.x
    sh = cuda.shared.array(NT, float32)
    D = x.shape[1]
    ss = float32(0.0)
    for i in range(cuda.threadIdx.x, D, NT):
        ss += x[t, i] * x[t, i]
    ss = _block_sum(ss, sh)
    inv = float32(1.0) / math.sqrt(ss / float32(D) + float32(eps))
    for i in range(cuda.threadIdx.x, D, NT):
        out[t, i] = x[t, i] * inv * w[i]


def rmsnorm(x, w, eps, out, stream=0):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w.   x, out [T, D]; w [D]"""
    _rmsnorm[x.shape[0], NT, stream](x, w, np.float32(eps), out)


@cuda.jit
def _rope(x, positions, inv_freq, attn_factor, neox):
    T, H, K = x.shape
    half = inv_freq.shape[0]
    idx = cuda.grid(1)
    if idx >= T * H * half:
        return
    i = idx % half
    h = (idx // half) % H
    t = idx // (half * H)
    ang = float(positions[t]) * float(inv_freq[i])  # float64 angle, as on the CPU
    c = float32(math.cos(ang) * attn_factor)
    s = float32(math.sin(ang) * attn_factor)
    if neox:
        i0 = i
        i1 = i + half
    else:
        i0 = 2 * i
        i1 = 2 * i + 1
    a = x[t, h, i0]
    b = x[t, h, i1]
    x[t, h, i0] = a * c - b * s
    x[t, h, i1] = a * s + b * c


def rope(x, positions, inv_freq, attn_factor, neox, stream=0):
    """Rotate the first 2*len(inv_freq) dims of each head in place.   x [T, H, K]; positions [T]"""
    n = x.shape[0] * x.shape[1] * inv_freq.shape[0]
    _rope[(n + 127) // 128, 128, stream](x, positions, inv_freq, float(attn_factor), bool(neox))


@cuda.jit(fastmath=True)
def _attention(q, kc, vc, pos0, scale, scores, out):
    T, H, K = q.shape
    Hkv = kc.shape[1]
    V = vc.shape[2]
    t = cuda.blockIdx.x // H
    h = cuda.blockIdx.x % H
    g = h // (H // Hkv)
    n = pos0 + t + 1
    sh = cuda.shared.array(NT, float32)
    tid = cuda.threadIdx.x
    m = float32(-math.inf)
    for j in range(tid, n, NT):
        s = float32(0.0)
        for i in range(K):
            s += q[t, h, i] * kc[j, g, i]
        s *= scale
        scores[t, h, j] = s
        m = max(m, s)
    m = _block_max(m, sh)
    tot = float32(0.0)
    for j in range(tid, n, NT):
        e = math.exp(scores[t, h, j] - m)
        scores[t, h, j] = e
        tot += e
    tot = _block_sum(tot, sh)  # its syncthreads also publish the scores
    inv = float32(1.0) / tot
    for i in range(tid, V, NT):
        acc = float32(0.0)
        for j in range(n):
            acc += scores[t, h, j] * vc[j, g, i]
        out[t, h, i] = acc * inv


_scratch: dict = {}


def attention(q, kc, vc, pos0, scale, out, stream=0):
    """Causal GQA attention of T new queries over the device cache (new keys already in it).

    q [T, H, K]; kc [N, Hkv, K]; vc [N, Hkv, V]; out [T, H, V]; query t sits at pos0 + t.
    """
    T, H, _ = q.shape
    key = (T, H, kc.shape[0])
    sc = _scratch.get(key)
    if sc is None:
        sc = _scratch[key] = cuda.device_array((T, H, kc.shape[0]), np.float32)
    _attention[T * H, NT, stream](q, kc, vc, int(pos0), np.float32(scale), sc, out)


@cuda.jit(fastmath=True)
def _silu_mul(gate, up):
    T, F = gate.shape
    idx = cuda.grid(1)
    if idx < T * F:
        t = idx // F
        i = idx % F
        g = gate[t, i]
        gate[t, i] = g / (float32(1.0) + math.exp(-g)) * up[t, i]


def silu_mul(gate, up, stream=0):
    """gate = silu(gate) * up, in place.   gate, up [T, F]"""
    n = gate.shape[0] * gate.shape[1]
    _silu_mul[(n + 255) // 256, 256, stream](gate, up)


@cuda.jit
def _add(x, y):
    T, D = x.shape
    idx = cuda.grid(1)
    if idx < T * D:
        x[idx // D, idx % D] += y[idx // D, idx % D]


def add_inplace(x, y, stream=0):
    """x += y.   x, y [T, D]"""
    n = x.shape[0] * x.shape[1]
    _add[(n + 255) // 256, 256, stream](x, y)


@cuda.jit
def _softmax_topk(logits, k, ids, weights, probs):
    # One thread per token: softmax over the E experts, then the k largest, in descending order.
    t = cuda.grid(1)
    if t >= logits.shape[0]:
        return
    E = logits.shape[1]
    m = float32(-math.inf)
    for e in range(E):
        m = max(m, logits[t, e])
    tot = float32(0.0)
    for e in range(E):
        p = math.exp(logits[t, e] - m)
        probs[t, e] = p
        tot += p
    for e in range(E):
        probs[t, e] /= tot
    for j in range(k):
        best = -1
        bv = float32(-1.0)
        for e in range(E):
            if probs[t, e] > bv:
                bv = probs[t, e]
                best = e
        ids[t, j] = best
        weights[t, j] = bv
        probs[t, best] = float32(-2.0)  # taken


def softmax_topk(logits, k, ids, weights, probs, stream=0):
    """Router: ids[t], weights[t] = the k largest of softmax(logits[t]) (descending).

    logits, probs [T, E] f32 (probs is scratch and is overwritten); ids [T, k] i32; weights [T, k].
    """
    T = logits.shape[0]
    _softmax_topk[(T + 63) // 64, 64, stream](logits, int(k), ids, weights, probs)


@cuda.jit
def _store_kv(kc, vc, k, v, pos0):
    T, Hkv, K = k.shape
    V = v.shape[2]
    idx = cuda.grid(1)
    if idx < T * Hkv * K:
        kc[pos0 + idx // (Hkv * K), (idx // K) % Hkv, idx % K] = k[idx // (Hkv * K), (idx // K) % Hkv, idx % K]
    if idx < T * Hkv * V:
        vc[pos0 + idx // (Hkv * V), (idx // V) % Hkv, idx % V] = v[idx // (Hkv * V), (idx // V) % Hkv, idx % V]


def store_kv(kc, vc, k, v, pos0, stream=0):
    """kc[pos0 : pos0 + T] = k; vc[pos0 : pos0 + T] = v.   k [T, Hkv, K]; v [T, Hkv, V]"""
    n = k.shape[0] * k.shape[1] * max(k.shape[2], v.shape[2])
    _store_kv[(n + 255) // 256, 256, stream](kc, vc, k, v, int(pos0))


@cuda.jit
def _add_bias(x, b):
    T, D = x.shape
    idx = cuda.grid(1)
    if idx < T * D:
        x[idx // D, idx % D] += b[idx % D]


def add_bias(x, b, stream=0):
    """x[t] += b.   x [T, D]; b [D]"""
    n = x.shape[0] * x.shape[1]
    _add_bias[(n + 255) // 256, 256, stream](x, b)
