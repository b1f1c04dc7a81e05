"""Layer operations on the GPU, with the CPU ``ops`` module's names and shapes (device arrays):
RMSNorm, RoPE with the KV cache store, attention over a device KV cache, SwiGLU, residual add,
routing (softmax / sigmoid top-k).

Each computes the CPU op's float64 expressions and rounds each stored value once, so that both
devices store the same float32 numbers but at a rounding boundary (docs/architecture.md,
Numerics).

Shapes: T tokens, D hidden, H query heads, Hkv key/value heads, K / V head sizes, N cache slots.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32, float64, int32

from .common import SIM, block_reduce_d, last_to_finish, shfl_xor_d, sum_squares, warp_reduce_d
from .q8 import round_store

NT = 256  # threads per block of the reductions


NTN = 1024  # threads per token of rmsnorm


@cuda.jit(fastmath=True)
def _rmsnorm(x, w, eps, out):
    t = cuda.blockIdx.x
    sh = cuda.shared.array(NTN, float64)
    D = x.shape[1]
    ss = sum_squares(x, t, NTN)
    ss = block_reduce_d(ss, sh, 1)
    inv = 1.0 / math.sqrt(ss / D + float64(eps))
    for i in range(cuda.threadIdx.x, D, NTN):
        out[t, i] = float64(x[t, i]) * inv * float64(w[i])


def rmsnorm(x, w, eps, out, stream=0):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w.   x, out [T, D]; w [D]"""
    _rmsnorm[x.shape[0], NTN, stream](x, w, np.float32(eps), out)


@cuda.jit(device=True, inline=True)
def _rotate(x, t, h, i, p, inv_freq, attn_factor, neox):
    # rotate pair i of head h of token t (at position p) in place; returns the pair's indices
    half = inv_freq.shape[0]
    ang = float(p) * float(inv_freq[i])  # float64 angle, as on the CPU
    c = math.cos(ang) * attn_factor
    s = math.sin(ang) * attn_factor
    if neox:
        i0 = i
        i1 = i + half
    else:
        i0 = 2 * i
        i1 = 2 * i + 1
    a = float64(x[t, h, i0])
    b = float64(x[t, h, i1])
    x[t, h, i0] = a * c - b * s
    x[t, h, i1] = a * s + b * c
    return i0, i1


_ATT: dict = {}


def _attention_kernel(KU: int, VU: int):
    """The attention kernel for heads of at most 32 KU key dims and 32 VU value dims (each lane
    keeps its share of the query and of the value sums in registers, and issues its loads of a
    key or a value row together)."""
    k = _ATT.get((KU, VU))
    if k is not None:
        return k
    VW = 32 * VU
    KU8 = 4 * KU  # key dims per lane in the 8-lane groups
    # warps per block: many (a decode step has few heads, so few blocks: the warps' loads in
    # flight hide the memory latency), their value sums (float64) at most 32 KB of shared memory;
    # the registers per thread capped so that the block fits on a multiprocessor
    NW = 4 if SIM else max(1, min(16, 4096 // VW))
    NT = 32 * NW
    opts = dict(fastmath=True) if SIM else dict(fastmath=True, max_registers=65536 // NT)

    @cuda.jit(**opts)
    def _attention(q, kc, vc, pos, scale, scores, out, qb, xq, xd, xs):
        # one thread block per (token, head). Scores: 8 lanes per key, over the head's dims;
        # softmax over the block; the weighted values: warp w takes keys w, w + NW, ...,
        # its lanes over the value dims; the warps' sums meet in shared memory. qb > 0: the
        # output also rounded to int8 here (xq, xd, xs of [T, H * V]; qb-blocks within a head).
        # Scores, softmax and the weighted sum in float64, the output rounded once (the CPU's).
        T, H, K = q.shape
        Hkv = kc.shape[1]
        V = vc.shape[2]
        t = cuda.blockIdx.x // H
        h = cuda.blockIdx.x % H
        g = h // (H // Hkv)
        n = pos[0] + t + 1
        sh = cuda.shared.array(NT, float32)
        sh64 = cuda.shared.array(NT, float64)
        part = cuda.shared.array((NW, VW), float64)
        tid = cuda.threadIdx.x
        lane = tid % 32
        warp = tid // 32
        if SIM:  # (the simulator has no warp shuffles: a thread per key)
            for j in range(tid, n, NT):
                s = float64(0.0)
                for i in range(K):
                    s += float64(q[t, h, i]) * float64(kc[j, g, i])
                scores[t, h, j] = s * float64(scale)
        else:  # groups of 8 lanes per key (4 keys per warp), each lane 1/8 of the dims
            sub = lane % 8
            qr = cuda.local.array(KU8, float32)
            for u in range(KU8):
                i = sub + 8 * u
                qr[u] = q[t, h, i] if i < K else float32(0.0)
            kr = cuda.local.array(KU8, float32)
            for j0 in range(4 * warp, n, 4 * NW):
                j = j0 + lane // 8
                jj = min(j, n - 1)
                for u in range(KU8):
                    i = sub + 8 * u
                    kr[u] = kc[jj, g, i] if i < K else float32(0.0)
                s = float64(0.0)
                for u in range(KU8):
                    s += float64(qr[u]) * float64(kr[u])
                s += shfl_xor_d(s, 4)
                s += shfl_xor_d(s, 2)
                s += shfl_xor_d(s, 1)
                if sub == 0 and j < n:
                    scores[t, h, j] = s * float64(scale)
        cuda.syncthreads()
        m = float64(-math.inf)
        for j in range(tid, n, NT):
            m = max(m, scores[t, h, j])
        m = block_reduce_d(m, sh64, 0)
        tot = float64(0.0)
        for j in range(tid, n, NT):
            e = math.exp(scores[t, h, j] - m)
            scores[t, h, j] = e
            tot += e
        tot = block_reduce_d(tot, sh64, 1)  # its syncthreads also publish the scores
        acc = cuda.local.array(VU, float64)
        for u in range(VU):
            acc[u] = float64(0.0)
        for j in range(warp, n, NW):
            p = scores[t, h, j]
            for u in range(VU):
                i = lane + 32 * u
                if i < V:
                    acc[u] += p * float64(vc[j, g, i])
        for u in range(VU):
            part[warp, lane + 32 * u] = acc[u]
        cuda.syncthreads()
        for base in range(0, V, NT):
            i = base + tid
            a = float32(0.0)
            if i < V:
                a64 = float64(0.0)
                for w in range(NW):
                    a64 += part[w, i]
                a = float32(a64 / tot)
                out[t, h, i] = a
            if qb > 0:
                round_store(a, t, h * V + i, i < V, qb, sh, xq, xd, xs)

    _ATT[(KU, VU)] = _attention, NT
    return _attention, NT


_scratch: dict = {}


def attention_rounds(V: int) -> tuple:
    """The int8 block sizes attention can round its output to in its own launch (heads of V
    values): 32-value blocks, within a head."""
    return (32,) if V % 32 == 0 else ()


def attention(q, kc, vc, pos, scale, out, stream=0, act=None):
    """Causal GQA attention of T new queries over the device cache (new keys already in it).

    q [T, H, K]; kc [N, Hkv, K]; vc [N, Hkv, V]; out [T, H, V]; query t sits at pos[0] + t
    (pos: a device int array, so that a recorded decode step replays at any position).
    ``act``: a ``q8.Act`` of [T, H * V] with a block size of ``attention_rounds(V)``: out's int8
    form, made in the same launch.
    """
    T, H, K = q.shape
    key = (T, H, kc.shape[0])
    sc = _scratch.get(key)
    if sc is None:
        sc = _scratch[key] = cuda.device_array((T, H, kc.shape[0]), np.float64)
    k, nt = _attention_kernel((K + 31) // 32, (vc.shape[2] + 31) // 32)
    if act is not None:
        if act.qb not in attention_rounds(vc.shape[2]):
            raise ValueError(f"attention: no int8 output in blocks of {act.qb} for heads of {vc.shape[2]}")
        a = (act.qb, act.q8, act.d, act.s)
    else:
        a = (0, *_no_act())
    k[T * H, nt, stream](q, kc, vc, pos, np.float32(scale), sc, out, *a)


@functools.lru_cache(maxsize=None)
def _no_act():
    return (cuda.device_array((1, 1), np.int8), cuda.device_array((1, 1), np.float32),
            cuda.device_array((1, 1), np.int32))


@cuda.jit
def _rope_store(q, k, v, kc, vc, positions, pos, inv_freq, attn_factor, neox):
    # one launch for: rope on q, rope on k, k and v into the cache at pos[0] + t
    T, H, K = q.shape
    Hkv = k.shape[1]
    V = v.shape[2]
    half = inv_freq.shape[0]
    nq = T * H * half
    nk = T * Hkv * half
    tail = K - 2 * half  # key dims rope leaves alone
    idx = cuda.grid(1)
    p0 = pos[0]
    if idx < nq:
        t = idx // (half * H)
        _rotate(q, t, (idx // half) % H, idx % half, positions[t], inv_freq, attn_factor, neox)
        return
    if idx < nq + nk:  # k: rotated, then into the cache
        j = idx - nq
        t = j // (half * Hkv)
        h = (j // half) % Hkv
        i0, i1 = _rotate(k, t, h, j % half, positions[t], inv_freq, attn_factor, neox)
        kc[p0 + t, h, i0] = k[t, h, i0]
        kc[p0 + t, h, i1] = k[t, h, i1]
        return
    j = idx - nq - nk
    if j < T * Hkv * tail:
        d = 2 * half + j % tail
        h = (j // tail) % Hkv
        t = j // (tail * Hkv)
        kc[p0 + t, h, d] = k[t, h, d]
        return
    j -= T * Hkv * tail
    if j < T * Hkv * V:
        d = j % V
        h = (j // V) % Hkv
        t = j // (V * Hkv)
        vc[p0 + t, h, d] = v[t, h, d]


def rope_store(q, k, v, kc, vc, positions, pos, inv_freq, attn_factor, neox, stream=0):
    """RoPE on q and k in place (the CPU ops.rope's rotation: the first 2 len(inv_freq) dims of
    each head, float64 angles positions[t] * inv_freq, neox halves or interleaved pairs), then
    kc[p + t] = k[t], vc[p + t] = v[t] with p = pos[0] (device), in one launch.
    q [T, H, K]; k [T, Hkv, K]; v [T, Hkv, V]; kc [N, Hkv, K]; vc [N, Hkv, V]."""
    T, H, K = q.shape
    Hkv = k.shape[1]
    half = inv_freq.shape[0]
    n = T * (H + Hkv) * half + T * Hkv * (K - 2 * half) + T * Hkv * v.shape[2]
    _rope_store[(n + 127) // 128, 128, stream](q, k, v, kc, vc, positions, pos, inv_freq, float(attn_factor),
                                               bool(neox))


@cuda.jit(fastmath=True)
def _silu_mul(gate, up):
    T, F = gate.shape
    idx = cuda.grid(1)
    if idx < T * F:
        t = idx // F
        i = idx % F
        g = float64(gate[t, i])
        gate[t, i] = g / (1.0 + math.exp(-g)) * float64(up[t, i])


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


RT = 32  # threads per token of the router (one warp)
KMAX = 64  # most experts per token
EMAX = 1024  # most experts


@cuda.jit(device=True, inline=True)
def _route_warp(lg, t, k, gating, sel_bias, has_bias, norm_topk, scale, ids, weights, probs, score, taken,
                sel, wsel):
    # Token t's routing from its logits lg [E], the CPU router's semantics (MoEMLP.route
    # without expert groups): probabilities (softmax / sigmoid / raw logits), the k best by
    # probability (+ selection bias; ties to the lower expert id), weights in descending order,
    # optionally renormalized, times scale. Run by the 32 lanes of warp 0 (in the simulator, by
    # thread 0 alone): the lanes split the experts, the k-best picks are warp-wide argmaxes.
    # probs, score, taken [E], sel, wsel [KMAX] (the picks and their weights): shared memory (lg
    # may be probs itself). In float64 from the float32 logits, the weights rounded once (as
    # MoEMLP.select computes them).
    lane = cuda.threadIdx.x
    E = lg.shape[0]
    step = 1 if SIM else RT
    m = float64(-math.inf)
    for e in range(lane, E, step):
        m = max(m, float64(lg[e]))
    if not SIM:
        m = warp_reduce_d(m, 0)
    tot = float64(0.0)
    for e in range(lane, E, step):
        v = float64(lg[e])
        if gating == 0:
            v = math.exp(v - m)
            tot += v
        elif gating == 1:
            v = 1.0 / (1.0 + math.exp(-v))
        probs[e] = v
        taken[e] = 0
    if gating == 0 and not SIM:
        tot = warp_reduce_d(tot, 1)
    for e in range(lane, E, step):  # (each lane its own experts: no sync needed)
        if gating == 0:
            probs[e] /= tot
        score[e] = probs[e] + sel_bias[e] if has_bias else probs[e]
    if not SIM:
        cuda.syncwarp(0xFFFFFFFF)
    for j in range(k):
        best = E
        bv = float64(-math.inf)
        for e in range(lane, E, step):
            sc = score[e]
            if taken[e] == 0 and (sc > bv or best == E):
                bv = sc
                best = e
        if not SIM:  # the lanes' picks merged through warp shuffles (every lane ends with it)
            off = 16
            while off > 0:
                ov = shfl_xor_d(bv, off)
                oi = cuda.shfl_xor_sync(0xFFFFFFFF, best, off)
                if oi < E and (best == E or ov > bv or (ov == bv and oi < best)):
                    bv = ov
                    best = oi
                off //= 2
        if lane == 0:
            sel[j] = best
            wsel[j] = probs[best]
        taken[best] = 1  # (every lane writes the same)
        if not SIM:
            cuda.syncwarp(0xFFFFFFFF)
    if gating == 2:  # softmax over the selected logits (each lane over all k; then its own picks)
        m = wsel[0]
        for j in range(k):
            m = max(m, wsel[j])
        tot = float64(0.0)
        for j in range(k):
            tot += math.exp(wsel[j] - m)
        if not SIM:
            cuda.syncwarp(0xFFFFFFFF)
        for j in range(lane, k, step):
            wsel[j] = math.exp(wsel[j] - m) / tot
        if not SIM:
            cuda.syncwarp(0xFFFFFFFF)
    tot = float64(0.0)
    for j in range(k):
        tot += wsel[j]
    # pick j (lane j) goes to its rank among the weights in descending order (ties in pick order)
    for j in range(lane, k, step):
        wj = wsel[j]
        rank = 0
        for i in range(k):
            if wsel[i] > wj or (wsel[i] == wj and i < j):
                rank += 1
        if norm_topk:
            wj = wj / max(tot, 6.103515625e-5)
        weights[t * k + rank] = float32(wj * scale)
        ids[t * k + rank] = sel[j]


@cuda.jit
def _route(logits, k, gating, sel_bias, has_bias, norm_topk, scale, ids, weights):
    # a warp per token
    t = cuda.blockIdx.x
    probs = cuda.shared.array(EMAX, float64)
    score = cuda.shared.array(EMAX, float64)
    taken = cuda.shared.array(EMAX, int32)
    sel = cuda.shared.array(KMAX, int32)
    wsel = cuda.shared.array(KMAX, float64)
    if cuda.threadIdx.x < (1 if SIM else RT):
        _route_warp(logits[t], t, k, gating, sel_bias, has_bias, norm_topk, scale, ids, weights, probs, score,
                    taken, sel, wsel)


def _route_args(E, k, gating, sel_bias, norm_topk, scale, dummy):
    if not 0 < k <= min(KMAX, E):
        raise ValueError(f"route: {k} experts per token (at most {min(KMAX, E)})")
    if E > EMAX:
        raise ValueError(f"route: {E} experts (at most {EMAX} on the GPU)")
    has = sel_bias is not None
    return int(k), GATING[gating], sel_bias if has else dummy, has, bool(norm_topk), float(scale)


def route(logits, k, gating, sel_bias, norm_topk, scale, ids, weights, stream=0):
    """Router of T tokens: ids [T*k] i32 and weights [T*k] f32 from logits [T, E] (see MoEMLP.route).

    gating: "softmax" | "sigmoid" | "softmax_weight"; sel_bias [E] device or None.
    """
    T, E = logits.shape
    _route[T, RT, stream](logits, *_route_args(E, k, gating, sel_bias, norm_topk, scale, logits[0]), ids, weights)


RC = 32 if SIM else 128  # threads per thread block of the fused router (fewer in the simulator: speed)
RU = 8  # the router's columns per thread: a block's chunk is RC * RU columns


@cuda.jit
def _router_route(w, x, part, count, k, gating, sel_bias, has_bias, norm_topk, scale, ids, weights):
    # thread block (c, r, t): chunk c of router row r's product with x[t], into part[t, r, c];
    # the last block of token t to finish (last_to_finish) sums each row's chunks
    # in chunk order and routes the token (as _route). w [E, C] f32; part [T, E, S].
    c = cuda.blockIdx.x
    r = cuda.blockIdx.y
    t = cuda.blockIdx.z
    E, C = w.shape
    S = part.shape[2]
    tid = cuda.threadIdx.x
    sh = cuda.shared.array(RC, float64)
    flag = cuda.shared.array(1, int32)
    acc = float64(0.0)
    for u in range(RU):  # (the loads all in flight together)
        j = (c * RU + u) * RC + tid
        if j < C:
            acc += float64(w[r, j]) * float64(x[t, j])
    acc = block_reduce_d(acc, sh, 1)
    if tid == 0:
        part[t, r, c] = acc
    if not last_to_finish(count, t, E * S, flag):
        return
    probs = cuda.shared.array(EMAX, float64)
    score = cuda.shared.array(EMAX, float64)
    taken = cuda.shared.array(EMAX, int32)
    sel = cuda.shared.array(KMAX, int32)
    wsel = cuda.shared.array(KMAX, float64)
    if tid < (1 if SIM else RT):
        for e in range(tid, E, 1 if SIM else RT):
            v = float64(0.0)
            for i in range(S):
                v += part[t, e, i]
            probs[e] = float32(v)  # the logit rounded to float32, as the CPU's router product gives it
        if not SIM:
            cuda.syncwarp(0xFFFFFFFF)
        _route_warp(probs[:E], t, k, gating, sel_bias, has_bias, norm_topk, scale, ids, weights, probs, score,
                    taken, sel, wsel)


class RouterRoute:
    """The router product (float32 weights) and the routing of its tokens in one launch: device
    buffers for up to T tokens (the logits are never stored whole: the launch keeps partial sums)."""

    def __init__(self, w, T: int):
        self.w = w  # [E, C] f32, device
        E, C = w.shape
        self.S = (C + RC * RU - 1) // (RC * RU)
        self.part = cuda.device_array((T, E, self.S), np.float64)
        self.count = cuda.to_device(np.zeros(T, np.int32))

    def __call__(self, x, k, gating, sel_bias, norm_topk, scale, ids, weights, stream=0):
        """ids [T*k], weights [T*k] of x [T, C] (see route)."""
        T = x.shape[0]
        E = self.w.shape[0]
        _router_route[(self.S, E, T), RC, stream](
            self.w, x, self.part, self.count, *_route_args(E, k, gating, sel_bias, norm_topk, scale, self.w[0]),
            ids, weights)


@cuda.jit
def _moe_combine(x, y, weights, k):
    T, D = x.shape
    idx = cuda.grid(1)
    if idx < T * D:
        t = idx // D
        d = idx % D
        s = float64(0.0)
        for j in range(k):
            s += float64(weights[t * k + j]) * float64(y[t * k + j, d])
        x[t, d] += float32(s)


def moe_combine(x, y, weights, k, stream=0):
    """x[t] += sum_j weights[t*k + j] * y[t*k + j].   x [T, D]; y [T*k, D]; weights [T*k]"""
    n = x.shape[0] * x.shape[1]
    _moe_combine[(n + 255) // 256, 256, stream](x, y, weights, int(k))


@cuda.jit(fastmath=True)
def _sigmoid_gate(y, h, g):
    t = cuda.blockIdx.x
    sh = cuda.shared.array(NT, float64)
    s = float64(0.0)
    for i in range(cuda.threadIdx.x, h.shape[1], NT):
        s += float64(h[t, i]) * float64(g[i])
    s = block_reduce_d(s, sh, 1)
    f = 1.0 / (1.0 + math.exp(-s))
    for i in range(cuda.threadIdx.x, y.shape[1], NT):
        y[t, i] = float64(y[t, i]) * f


def sigmoid_gate(y, h, g, stream=0):
    """y[t] *= sigmoid(h[t] . g) (the shared expert's gate).   y [T, D]; h [T, D]; g [D]"""
    _sigmoid_gate[y.shape[0], NT, stream](y, h, g)


AT = 32 if SIM else 256  # threads per thread block of the greedy pick (fewer in the simulator: speed)
AU = 4  # logits per thread


@cuda.jit(device=True, inline=True)
def _ahead(v, i, v2, i2):
    """(v, i) before (v2, i2) in numpy's argmax order: NaN above every number (the first NaN
    wins), then the larger value, then the lower index."""
    n1 = v != v
    n2 = v2 != v2
    if n1 or n2:
        return n1 and (not n2 or i < i2)
    return v > v2 or (v == v2 and i < i2)


@cuda.jit(device=True, inline=True)
def _block_best(v, i, sv, si):
    # the block's best (v, i) in every thread: a tree over shared memory (fixed pairs)
    tid = cuda.threadIdx.x
    cuda.syncthreads()
    sv[tid] = v
    si[tid] = i
    cuda.syncthreads()
    s = AT // 2
    while s > 0:
        if tid < s and _ahead(sv[tid + s], si[tid + s], sv[tid], si[tid]):
            sv[tid] = sv[tid + s]
            si[tid] = si[tid + s]
        cuda.syncthreads()
        s //= 2
    return sv[0], si[0]


@cuda.jit
def _argmax_step(logits, part_v, part_i, count, step):
    # thread block b: the best of logits[0, b AT AU ..]; the last block to finish
    # (last_to_finish) takes the best of the blocks' and makes it the next step's token:
    # step[0] = that index, step[1] += 1 (the position)
    V = logits.shape[1]
    nb = cuda.gridDim.x
    tid = cuda.threadIdx.x
    sv = cuda.shared.array(AT, float32)
    si = cuda.shared.array(AT, int32)
    flag = cuda.shared.array(1, int32)
    bv = float32(-math.inf)
    bi = int32(V)
    for u in range(AU):
        j = (cuda.blockIdx.x * AU + u) * AT + tid
        if j < V:
            v = logits[0, j]
            if _ahead(v, j, bv, bi):
                bv = v
                bi = j
    bv, bi = _block_best(bv, bi, sv, si)
    if tid == 0:
        part_v[cuda.blockIdx.x] = bv
        part_i[cuda.blockIdx.x] = bi
    if not last_to_finish(count, 0, nb, flag):
        return
    bv = float32(-math.inf)
    bi = int32(V)
    for j in range(tid, nb, AT):
        if _ahead(part_v[j], part_i[j], bv, bi):
            bv = part_v[j]
            bi = part_i[j]
    bv, bi = _block_best(bv, bi, sv, si)
    if tid == 0:
        step[0] = bi
        step[1] += 1


class GreedyStep:
    """The greedy pick on the device: ``(logits, step)`` makes the index of the largest of
    logits [1, V] (numpy's argmax: the first of equals, NaN first) the next decode step's token,
    step[0], and advances its position, step[1]; so that steps follow one another on the GPU
    without the host in between."""

    def __init__(self, V: int):
        self.nb = (V + AT * AU - 1) // (AT * AU)
        self.part_v = cuda.device_array(self.nb, np.float32)
        self.part_i = cuda.device_array(self.nb, np.int32)
        self.count = cuda.to_device(np.zeros(1, np.int32))

    def __call__(self, logits, step, stream=0):
        if (logits.shape[1] + AT * AU - 1) // (AT * AU) != self.nb:
            raise ValueError(f"greedy pick: {logits.shape[1]} logits, made for {self.nb} blocks")
        _argmax_step[self.nb, AT, stream](logits, self.part_v, self.part_i, self.count, step)
