"""Layer operations on the GPU, with the CPU ``ops`` module's names and shapes (device arrays):
RMSNorm, RoPE, attention over a device KV cache, SwiGLU, residual add, softmax/top-k routing.

Shapes: T tokens, D hidden, H query heads, Hkv key/value heads, K / V head sizes, N cache slots.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

from .common import SIM, warp_shfl_sum

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
def _attention(q, kc, vc, pos, scale, scores, out):
    # one thread block per (token, head). Scores: a warp per key, its lanes over the head's dims
    # (coalesced reads of the key); softmax over the block; the weighted values: NT // V groups
    # of threads take every (NT // V)-th key, each thread one value dim, then the groups' sums
    # meet in shared memory.
    T, H, K = q.shape
    Hkv = kc.shape[1]
    V = vc.shape[2]
    t = cuda.blockIdx.x // H
    h = cuda.blockIdx.x % H
    g = h // (H // Hkv)
    n = pos[0] + t + 1
    sh = cuda.shared.array(NT, float32)
    tid = cuda.threadIdx.x
    if SIM:  # (the simulator has no warp shuffles: a thread per key)
        for j in range(tid, n, NT):
            s = float32(0.0)
            for i in range(K):
                s += q[t, h, i] * kc[j, g, i]
            scores[t, h, j] = s * scale
    else:
        lane = tid % 32
        for j in range(tid // 32, n, NT // 32):
            s = float32(0.0)
            for i in range(lane, K, 32):
                s += q[t, h, i] * kc[j, g, i]
            s = warp_shfl_sum(s)
            if lane == 0:
                scores[t, h, j] = s * scale
    cuda.syncthreads()
    m = float32(-math.inf)
    for j in range(tid, n, NT):
        m = max(m, scores[t, h, j])
    m = _block_max(m, sh)
    tot = float32(0.0)
    for j in range(tid, n, NT):
        e = math.exp(scores[t, h, j] - m)
        scores[t, h, j] = e
        tot += e
    tot = _block_sum(tot, sh)  # its syncthreads also publish the scores
    inv = float32(1.0) / tot
    if V <= NT:
        R = NT // V
        i = tid % V
        r = tid // V
        acc = float32(0.0)
        if r < R:
            for j in range(r, n, R):
                acc += scores[t, h, j] * vc[j, g, i]
        sh[tid] = acc
        cuda.syncthreads()
        if r == 0:
            for rr in range(1, R):
                acc += sh[i + V * rr]
            out[t, h, i] = acc * inv
    else:
        for i in range(tid, V, NT):
            acc = float32(0.0)
            for j in range(n):
                acc += scores[t, h, j] * vc[j, g, i]
            out[t, h, i] = acc * inv


_scratch: dict = {}


def attention(q, kc, vc, pos, scale, out, stream=0):
    """Causal GQA attention of T new queries over the device cache (new keys already in it).

    q [T, H, K]; kc [N, Hkv, K]; vc [N, Hkv, V]; out [T, H, V]; query t sits at pos[0] + t
    (pos: a device int array, so that a recorded decode step replays at any position).
    """
    T, H, _ = q.shape
    key = (T, H, kc.shape[0])
    sc = _scratch.get(key)
    if sc is None:
        sc = _scratch[key] = cuda.device_array((T, H, kc.shape[0]), np.float32)
    _attention[T * H, NT, stream](q, kc, vc, pos, np.float32(scale), sc, out)


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


def softmax_topk(logits, k, ids, weights, probs, stream=0):
    """Router: ids[t], weights[t] = the k largest of softmax(logits[t]) (descending).

    logits, probs [T, E] f32 (probs is scratch and is overwritten); ids [T, k] i32; weights [T, k].
    """
    T = logits.shape[0]
    route(logits, k, "softmax", None, False, 1.0, probs, ids.reshape(T * k), weights.reshape(T * k), stream)


@cuda.jit
def _store_kv(kc, vc, k, v, pos):
    pos0 = pos[0]
    T, Hkv, K = k.shape
    V = v.shape[2]
    idx = cuda.grid(1)
    if idx < T * Hkv * K:
        kc[pos0 + idx // (Hkv * K), (idx // K) % Hkv, idx % K] = k[idx // (Hkv * K), (idx // K) % Hkv, idx % K]
    if idx < T * Hkv * V:
        vc[pos0 + idx // (Hkv * V), (idx // V) % Hkv, idx % V] = v[idx // (Hkv * V), (idx // V) % Hkv, idx % V]


def store_kv(kc, vc, k, v, pos, stream=0):
    """kc[p : p + T] = k; vc[p : p + T] = v with p = pos[0] (device).   k [T, Hkv, K]; v [T, Hkv, V]"""
    n = k.shape[0] * k.shape[1] * max(k.shape[2], v.shape[2])
    _store_kv[(n + 255) // 256, 256, stream](kc, vc, k, v, pos)


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


GATING = {"softmax": 0, "sigmoid": 1, "softmax_weight": 2}


@cuda.jit
def _route(logits, k, gating, sel_bias, has_bias, norm_topk, scale, probs, ids, weights):
    # One thread per token, the CPU router's semantics (MoEMLP.route without expert groups):
    # probabilities (softmax / sigmoid / raw logits), the k best by probability (+ selection
    # bias), weights in descending order, optionally renormalized, times scale.
    t = cuda.grid(1)
    if t >= logits.shape[0]:
        return
    E = logits.shape[1]
    if gating == 0:
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
    elif gating == 1:
        for e in range(E):
            probs[t, e] = float32(1.0) / (float32(1.0) + math.exp(-logits[t, e]))
    else:
        for e in range(E):
            probs[t, e] = logits[t, e]
    for j in range(k):
        best = 0
        bv = float32(-math.inf)
        for e in range(E):
            taken = False
            for i in range(j):
                if ids[t * k + i] == e:
                    taken = True
            sc = probs[t, e]
            if has_bias:
                sc += sel_bias[e]
            if not taken and sc > bv:
                bv = sc
                best = e
        ids[t * k + j] = best
        weights[t * k + j] = probs[t, best]
    if gating == 2:  # softmax over the selected logits
        m = weights[t * k]
        for j in range(k):
            m = max(m, weights[t * k + j])
        tot = float32(0.0)
        for j in range(k):
            weights[t * k + j] = math.exp(weights[t * k + j] - m)
            tot += weights[t * k + j]
        for j in range(k):
            weights[t * k + j] /= tot
    # descending by weight (the selection order differs from it only with a selection bias)
    for j in range(k):
        for i in range(k - 1 - j):
            a = t * k + i
            if weights[a + 1] > weights[a]:
                wv = weights[a]
                weights[a] = weights[a + 1]
                weights[a + 1] = wv
                iv = ids[a]
                ids[a] = ids[a + 1]
                ids[a + 1] = iv
    tot = float32(0.0)
    for j in range(k):
        tot += weights[t * k + j]
    for j in range(k):
        wj = weights[t * k + j]
        if norm_topk:
            wj = wj / max(tot, float32(6.103515625e-5))
        weights[t * k + j] = wj * scale


def route(logits, k, gating, sel_bias, norm_topk, scale, probs, ids, weights, stream=0):
    """Router of T tokens: ids [T*k] i32 and weights [T*k] f32 from logits [T, E] (see MoEMLP.route).

    gating: "softmax" | "sigmoid" | "softmax_weight"; sel_bias [E] device or None; probs [T, E] scratch.
    """
    T = logits.shape[0]
    has = sel_bias is not None
    sb = sel_bias if has else probs[0]
    _route[(T + 31) // 32, 32, stream](logits, int(k), GATING[gating], sb, has, bool(norm_topk),
                                        np.float32(scale), probs, ids, weights)


@cuda.jit
def _moe_combine(x, y, weights, k):
    T, D = x.shape
    idx = cuda.grid(1)
    if idx < T * D:
        t = idx // D
        d = idx % D
        s = float32(0.0)
        for j in range(k):
            s += weights[t * k + j] * y[t * k + j, d]
        x[t, d] += s


def moe_combine(x, y, weights, k, stream=0):
    """x[t] += sum_j weights[t*k + j] * y[t*k + j].   x [T, D]; y [T*k, D]; weights [T*k]"""
    n = x.shape[0] * x.shape[1]
    _moe_combine[(n + 255) // 256, 256, stream](x, y, weights, int(k))


@cuda.jit(fastmath=True)
def _sigmoid_gate(y, h, g):
    t = cuda.blockIdx.x
    sh = cuda.shared.array(NT, float32)
    s = float32(0.0)
    for i in range(cuda.threadIdx.x, h.shape[1], NT):
        s += h[t, i] * g[i]
    s = _block_sum(s, sh)
    f = float32(1.0) / (float32(1.0) + math.exp(-s))
    for i in range(cuda.threadIdx.x, y.shape[1], NT):
        y[t, i] *= f


def sigmoid_gate(y, h, g, stream=0):
    """y[t] *= sigmoid(h[t] . g) (the shared expert's gate).   y [T, D]; h [T, D]; g [D]"""
    _sigmoid_gate[y.shape[0], NT, stream](y, h, g)
