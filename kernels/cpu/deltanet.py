"""Gated DeltaNet (the linear-attention layers of qwen35 / qwen35moe): the causal depthwise
convolution with its carried state, per-head L2 norm, the gated delta rule (a column-blocked
recurrence used for decode and prefill, and the chunked form of the same computation), and the
gated RMSNorm on its output.

Letters: T = tokens in the batch, C = conv channels (q, k and v side by side), W = conv width,
Hk/Hv = key/value heads, Dk/Dv = key/value head sizes, S = the recurrent state [Hv, Dk, Dv],
L = chunk length of the chunked form.

Value heads are in llama.cpp's GGUF order: value head h reads key/query head h % Hk (its
converter reorders Hugging Face's grouped heads so that a plain tiling broadcast applies).

The recurrence, per value head, with q already L2-normalized and scaled by 1/sqrt(Dk):
    S <- exp(g_t) * S
    S <- S + k_t (beta_t * (v_t - S^T k_t))^T
    o_t = S^T q_t
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .common import LANES, vadd, vfma, vload2, vmul, vsplat, vstore2, vsub, vzero


@njit(fastmath=True, cache=True)
def conv1d_silu(x, state, w_t, out):
    """Causal depthwise convolution, then SiLU; the state carries the last W-1 inputs.

    x [T, C] new inputs; state [W-1, C] inputs before them (updated in place);
    w_t [W, C] the kernel (tap j applies to the input j - (W-1) steps back); out [T, C].
    """
    T, C = x.shape
    W = w_t.shape[0]
    P = W - 1
    for t in range(T):
        for c in range(C):
            out[t, c] = 0.0
        for j in range(W):
            src = t + j  # index into concat(state, x)
            if src < P:
                for c in range(C):
                    out[t, c] += w_t[j, c] * state[src, c]
            else:
                for c in range(C):
                    out[t, c] += w_t[j, c] * x[src - P, c]
        for c in range(C):
            a = out[t, c]
            out[t, c] = a / (np.float32(1.0) + np.exp(-a))
    # the new state: the last P rows of concat(state, x)
    if T >= P:
        for r in range(P):
            for c in range(C):
                state[r, c] = x[T - P + r, c]
    else:
        for r in range(P - T):
            for c in range(C):
                state[r, c] = state[r + T, c]
        for r in range(T):
            for c in range(C):
                state[P - T + r, c] = x[r, c]


@njit(fastmath=True, cache=True)
def l2norm_heads(x, eps, scale):
    """x[t, h] <- x[t, h] / max(|x[t, h]|, eps) * scale, in place (ggml_l2_norm).   x [T, H, D]"""
    T, H, D = x.shape
    for t in range(T):
        for h in range(H):
            ss = np.float32(0.0)
            for i in range(D):
                ss += x[t, h, i] * x[t, h, i]
            inv = np.float32(scale) / max(np.sqrt(ss), np.float32(eps))
            for i in range(D):
                x[t, h, i] *= inv


@njit(fastmath=True, cache=True)
def gated_rmsnorm(x, z, w, eps):
    """x[t, h] <- rmsnorm(x[t, h]) * w * silu(z[t, h]), in place.   x, z [T, H, D]; w [D]"""
    T, H, D = x.shape
    for t in range(T):
        for h in range(H):
            ss = np.float32(0.0)
            for i in range(D):
                ss += x[t, h, i] * x[t, h, i]
            inv = np.float32(1.0) / np.sqrt(ss / np.float32(D) + np.float32(eps))
            for i in range(D):
                g = z[t, h, i]
                x[t, h, i] = x[t, h, i] * inv * w[i] * (g / (np.float32(1.0) + np.exp(-g)))


def _recurrent(q, k, v, g, beta, S, out):
    """The gated delta rule token by token (see the module docstring).

    q, k [T, Hk, Dk]; v [T, Hv, Dv]; g, beta [T, Hv]; S [Hv, Dk, Dv] (updated); out [T, Hv, Dv].
    Two passes over each head's state per token: decay + read S^T k, then write + read S^T q.
    """
    T, Hk, Dk = k.shape
    Hv, Dv = v.shape[1], v.shape[2]
    for h in prange(Hv):  # a plain range in the serial compilation
        hk = h % Hk
        s = S[h]
        kv = np.empty(Dv, dtype=np.float32)
        o = np.empty(Dv, dtype=np.float32)
        for t in range(T):
            decay = np.float32(math.exp(g[t, h]))
            b = beta[t, h]
            for j in range(Dv):
                kv[j] = 0.0
            for i in range(Dk):
                ki = k[t, hk, i]
                for j in range(Dv):
                    a = s[i, j] * decay
                    s[i, j] = a
                    kv[j] += a * ki
            for j in range(Dv):
                kv[j] = (v[t, h, j] - kv[j]) * b  # now the delta
                o[j] = 0.0
            for i in range(Dk):
                ki = k[t, hk, i]
                qi = q[t, hk, i]
                for j in range(Dv):
                    a = s[i, j] + ki * kv[j]
                    s[i, j] = a
                    o[j] += a * qi
            for j in range(Dv):
                out[t, h, j] = o[j]


_recurrent_parallel = njit(parallel=True, fastmath=True, cache=True)(_recurrent)
_recurrent_serial = njit(fastmath=True, cache=True)(_recurrent)


def _recurrent_lanes(q, k, v2, g, beta, S2, out2):
    """The same recurrence in blocks of 16 state columns held as vectors (Dv % 16 == 0).

    Columns of a head's state evolve independently (S[:, j] only meets v[j]), so each task owns
    a [Dk, 16] column block (8 KB for Dk = 128, in L1) and runs all T tokens over it: one pass
    per token that applies token t's write, reads o_t = S^T q_t, decays for token t + 1 and reads
    S^T k_{t+1} for its delta.

    q, k [T, Hk, Dk]; v2 [T, Hv*Dv]; g, beta [T, Hv]; S2 [Hv*Dk, Dv] (updated); out2 [T, Hv*Dv].
    """
    T, Hk, Dk = k.shape
    Hv = g.shape[1]
    Dv = S2.shape[1]
    nb = Dv // LANES
    for task in prange(Hv * nb):
        h = task // nb
        j0 = (task - h * nb) * LANES
        hk = h % Hk
        r0 = h * Dk
        c0 = h * Dv + j0
        dec = vsplat(np.float32(math.exp(g[0, h])))
        kv = vzero()
        for i in range(Dk):
            a = vmul(vload2(S2, r0 + i, j0), dec)
            vstore2(a, S2, r0 + i, j0)
            kv = vfma(a, vsplat(k[0, hk, i]), kv)
        d = vmul(vsub(vload2(v2, 0, c0), kv), vsplat(beta[0, h]))
        for t in range(T):
            tn = t + 1 if t + 1 < T else t
            dec = vsplat(np.float32(math.exp(g[tn, h])) if t + 1 < T else np.float32(1.0))
            # two accumulators each for o and S^T k: rows alternate, halving the add chains
            o = vzero()
            o1 = vzero()
            kv = vzero()
            kv1 = vzero()
            for i in range(0, Dk - 1, 2):
                a = vfma(vsplat(k[t, hk, i]), d, vload2(S2, r0 + i, j0))
                b = vfma(vsplat(k[t, hk, i + 1]), d, vload2(S2, r0 + i + 1, j0))
                o = vfma(a, vsplat(q[t, hk, i]), o)
                o1 = vfma(b, vsplat(q[t, hk, i + 1]), o1)
                a = vmul(a, dec)
                b = vmul(b, dec)
                vstore2(a, S2, r0 + i, j0)
                vstore2(b, S2, r0 + i + 1, j0)
                kv = vfma(a, vsplat(k[tn, hk, i]), kv)
                kv1 = vfma(b, vsplat(k[tn, hk, i + 1]), kv1)
            if Dk % 2:
                i = Dk - 1
                a = vfma(vsplat(k[t, hk, i]), d, vload2(S2, r0 + i, j0))
                o = vfma(a, vsplat(q[t, hk, i]), o)
                a = vmul(a, dec)
                vstore2(a, S2, r0 + i, j0)
                kv = vfma(a, vsplat(k[tn, hk, i]), kv)
            o = vadd(o, o1)
            kv = vadd(kv, kv1)
            vstore2(o, out2, t, c0)
            d = vmul(vsub(vload2(v2, tn, c0), kv), vsplat(beta[tn, h]))


_lanes_parallel = njit(parallel=True, fastmath=True, cache=True)(_recurrent_lanes)
_lanes_serial = njit(fastmath=True, cache=True)(_recurrent_lanes)


def delta_rule_recurrent(q, k, v, g, beta, S, out):
    """Token-by-token gated delta rule (decode; any T). Shapes as in _recurrent."""
    Hv, Dk, Dv = S.shape
    T = q.shape[0]
    small = Hv * Dk * Dv * T < 1 << 16
    if Dv % LANES == 0:
        args = (q, k, v.reshape(T, Hv * Dv), g, beta, S.reshape(Hv * Dk, Dv), out.reshape(T, Hv * Dv))
        (_lanes_serial if small else _lanes_parallel)(*args)
    else:
        (_recurrent_serial if small else _recurrent_parallel)(q, k, v, g, beta, S, out)


@njit(fastmath=True, cache=True)
def _unit_lower_solve(A, R):
    """R <- (I + A)^-1 R for strictly lower-triangular A, by forward substitution, in place.

    A [B, L, L] (only its strictly lower triangle is read); R [B, L, N].
    """
    B, L, N = R.shape
    for b in range(B):
        for i in range(1, L):
            for j in range(i):
                a = A[b, i, j]
                if a != 0.0:
                    for n in range(N):
                        R[b, i, n] -= a * R[b, j, n]


def delta_rule_chunked(q, k, v, g, beta, S, out, chunk: int = 64):
    """The same recurrence over chunks of ``chunk`` tokens with matrix products (prefill).

    Inside a chunk the delta-rule updates compose to a unit lower-triangular system (the "UT
    transform" of DeltaNet): with decays relative to the chunk start, G_i = sum_{t<=i} g_t,
        u  = (I + A)^-1 (beta v),      w = (I + A)^-1 (beta exp(G) k),
        A_ij = beta_i k_i.k_j exp(G_i - G_j)  for j < i,
    the chunk's new values are u - w S, its outputs exp(G) q S + tril(q k^T exp(G_i - G_j)) (u - w S)
    and the state leaves as exp(G_L) S + (exp(G_L - G) k)^T (u - w S). Only differences of G
    within a chunk are exponentiated where they could grow, so nothing overflows.

    Shapes as in _recurrent; float32 throughout.
    """
    T, Hk, Dk = k.shape
    Hv, Dv = v.shape[1], v.shape[2]
    rep = Hv // Hk
    L = chunk
    n = -(-T // L)
    pad = n * L - T
    # [Hv, T, D]: value head h takes key head h % Hk, i.e. the key heads tiled rep times
    qh = np.tile(q.transpose(1, 0, 2), (rep, 1, 1))
    kh = np.tile(k.transpose(1, 0, 2), (rep, 1, 1))
    vh = v.transpose(1, 0, 2)
    gh = np.ascontiguousarray(g.T, dtype=np.float32)  # [Hv, T]
    bh = np.ascontiguousarray(beta.T, dtype=np.float32)
    if pad:  # zero padding: g = 0 keeps the state, beta = 0 writes nothing
        qh = np.pad(qh, ((0, 0), (0, pad), (0, 0)))
        kh = np.pad(kh, ((0, 0), (0, pad), (0, 0)))
        vh = np.pad(vh, ((0, 0), (0, pad), (0, 0)))
        gh = np.pad(gh, ((0, 0), (0, pad)))
        bh = np.pad(bh, ((0, 0), (0, pad)))
    qc = qh.reshape(Hv, n, L, Dk)
    kc = kh.reshape(Hv, n, L, Dk)
    vc = vh.reshape(Hv, n, L, Dv)
    G = np.cumsum(gh.reshape(Hv, n, L), axis=2, dtype=np.float32)  # [Hv, n, L]
    bc = bh.reshape(Hv, n, L, 1)
    diff = G[..., :, None] - G[..., None, :]  # [Hv, n, L, L]: G_i - G_j
    lower = np.tril(np.ones((L, L), dtype=bool))
    decay = np.exp(np.where(lower, diff, -np.inf)).astype(np.float32)  # 0 above the diagonal
    kk = kc @ kc.swapaxes(-1, -2)  # [Hv, n, L, L]
    A = (bc * kk * decay).reshape(Hv * n, L, L)
    eG = np.exp(G)[..., None]  # [Hv, n, L, 1]
    R = np.concatenate([bc * vc, bc * eG * kc], axis=-1).reshape(Hv * n, L, Dv + Dk)
    R = np.ascontiguousarray(R, dtype=np.float32)
    _unit_lower_solve(np.ascontiguousarray(A, dtype=np.float32), R)
    R = R.reshape(Hv, n, L, Dv + Dk)
    u, w = R[..., :Dv], R[..., Dv:]
    qk = (qc @ kc.swapaxes(-1, -2)) * decay  # [Hv, n, L, L], lower triangle incl. diagonal
    qg = qc * eG  # [Hv, n, L, Dk]
    kg = kc * np.exp(G[..., -1:] - G)[..., None]  # [Hv, n, L, Dk]
    eGL = np.exp(G[..., -1])  # [Hv, n]
    o = np.empty((Hv, n, L, Dv), dtype=np.float32)
    s = S  # [Hv, Dk, Dv]
    for c in range(n):
        vnew = u[:, c] - w[:, c] @ s  # [Hv, L, Dv]
        o[:, c] = qg[:, c] @ s + qk[:, c] @ vnew
        s = s * eGL[:, c, None, None] + kg[:, c].swapaxes(-1, -2) @ vnew
    S[...] = s
    out[...] = o.reshape(Hv, n * L, Dv)[:, :T].transpose(1, 0, 2)


def delta_rule(q, k, v, g, beta, S, out) -> None:
    """The gated delta rule over a batch of T tokens (decode and prefill alike).

    The column-blocked recurrence, not the chunked form: on this CPU (2 cores, one thread each,
    Hv = 64, Dk = Dv = 128, T = 256) it takes 70 ms of CPU time against 92 ms for
    delta_rule_chunked with single-threaded OpenBLAS, and numpy's default multi-threaded BLAS
    makes the chunked form far slower still on a busy machine. The chunked form does ~25% more
    arithmetic; it pays where matrix units make products much cheaper than the scan (GPUs).
    """
    delta_rule_recurrent(q, k, v, g, beta, S, out)
