"""Shared pieces of the block quantizers (``*_quant.py``): half-precision encoding, the scale
searches, and the checks on the caller's arrays.

The searches follow ggml's reference quantizers (ggml-quants.c): for each block, try a grid of
inverse scales around "the extreme value maps to the end of the integer range" (from either end),
round every value at each candidate, fit the scale (and offset) by weighted least squares, keep
the candidate with the smallest weighted squared error, then polish it by re-rounding at the
fitted scale until the error stops falling. K-quant super-blocks then quantize the sub-block
scales: each sub-block picks the best of the neighbouring integer scale codes against its real
error, and the super-block scale is refitted by least squares. Unlike the reference (which
weights by |x| or x^2 when no importance matrix is given), the default weight is 1, so the search
minimises the plain squared error, the RMSE that the tests compare against llama.cpp. With an
importance vector (imatrix-style, one value per column) the weight of each value is the
importance of its column.

Caveat: Numba's cache keys a compiled function on the file that defines it, so after editing this
module clear the ``__pycache__`` of the ``*_quant.py`` modules (their cached code inlines these).

n = values in a block, w = per-value weights, L = integer codes.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

# Below this magnitude a block is taken as all zeros (ggml's GROUP_MAX_EPS).
GROUP_MAX_EPS = 1e-15

# IQ4_NL / IQ4_XS code book (ggml's kvalues_iq4nl) and the midpoints between neighbours.
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                      dtype=np.float32)
IQ4_MIDS = ((IQ4_VALUES[1:] + IQ4_VALUES[:-1]) * 0.5).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Half precision. Numba's CPU target has no float16 type, so scales are encoded by hand.
# ---------------------------------------------------------------------------------------------

@njit(cache=True)
def f16_bits(v):
    """IEEE half-precision bits of ``v``: round to nearest even, saturate at +-65504."""
    a = float(v)
    sign = 0
    if a < 0.0:
        sign = 0x8000
        a = -a
    if a < 6.103515625e-05:  # below the smallest normal: multiples of 2^-24
        bits = int(np.rint(a * 16777216.0))
    else:
        m, e = math.frexp(a)  # a = m * 2^e, 0.5 <= m < 1; a carry out of the mantissa bumps e
        bits = ((e + 14) << 10) + int(np.rint(m * 2048.0)) - 1024
        if bits > 0x7BFF:
            bits = 0x7BFF
    return sign | bits


@njit(cache=True)
def f16_value(h):
    """The float64 value of half-precision bits ``h`` (finite inputs only)."""
    e = (h >> 10) & 31
    m = h & 1023
    if e == 0:
        v = m * 5.9604644775390625e-08
    else:
        v = math.ldexp(float(1024 + m), e - 25)
    if h & 0x8000:
        return -v
    return v


@njit(cache=True)
def f16_round(v):
    """``v`` rounded to the nearest half-precision value."""
    return f16_value(f16_bits(v))


@njit(cache=True)
def put_f16(out, pos, v):
    """Store ``v`` as half precision at out[pos:pos+2] (little endian); returns the stored value."""
    h = f16_bits(v)
    out[pos] = h & 0xFF
    out[pos + 1] = h >> 8
    return f16_value(h)


@njit(cache=True)
def f16_step(v, k):
    """The half-precision value k steps (k = -1, 0, 1) away from f16(v) in magnitude, same sign."""
    h = f16_bits(v)
    m = (h & 0x7FFF) + k
    if m < 0:
        m = 0
    if m > 0x7BFF:
        m = 0x7BFF
    return f16_value((h & 0x8000) | m)


# ---------------------------------------------------------------------------------------------
# Candidate kernels. A block is scored at K candidates at once, the candidate index innermost, so
# the loop over candidates vectorizes without horizontal sums (about 3x faster than scoring one
# candidate at a time over a 16- or 32-value block). Candidate k codes value x as
#     l = clamp(floor(x * A[k] + C[k]), lo, hi)
# which covers affine blocks (A = 1/scale, C = 0.5 - offset/scale) and symmetric ones (C = 0.5).
# ---------------------------------------------------------------------------------------------

# Rows of the per-thread work array (float32 [WORK_ROWS, WORK_LANES]) used by the searches.
WORK_ROWS = 8
WORK_LANES = 64
_A, _C, _S, _B, _SL, _SL2, _SXL, _ERR = 0, 1, 2, 3, 4, 5, 6, 7


@njit(cache=True)
def new_work():
    """A work array for the searches (allocate one per thread, outside the block loop)."""
    return np.empty((WORK_ROWS, WORK_LANES), np.float32)


@njit(fastmath=True, cache=True)
def multi_sums(x, w, A, C, lo, hi, K, sl, sl2, sxl):
    """For each candidate k < K: sl = sum w l, sl2 = sum w l^2, sxl = sum w x l."""
    for k in range(K):
        sl[k] = 0.0
        sl2[k] = 0.0
        sxl[k] = 0.0
    for i in range(x.shape[0]):
        xi = x[i]
        wi = w[i]
        for k in range(K):
            l = np.floor(xi * A[k] + C[k])
            l = min(max(l, lo), hi)
            wl = wi * l
            sl[k] += wl
            sl2[k] += wl * l
            sxl[k] += wl * xi


@njit(fastmath=True, cache=True)
def multi_err(x, w, A, C, lo, hi, S, B, K, err):
    """For each candidate k < K: err = sum w (S l + B - x)^2."""
    for k in range(K):
        err[k] = 0.0
    for i in range(x.shape[0]):
        xi = x[i]
        wi = w[i]
        for k in range(K):
            l = np.floor(xi * A[k] + C[k])
            l = min(max(l, lo), hi)
            d = S[k] * l + B[k] - xi
            err[k] += wi * d * d


# ---------------------------------------------------------------------------------------------
# Affine blocks: y = s * L + m, L in [0, nmax] (Q4_1, and the sub-blocks of Q2_K, Q4_K, Q5_K)
# ---------------------------------------------------------------------------------------------

@njit(fastmath=True, cache=True)
def _affine_sums(x, w, xmin, iscale, nmax):
    sl = np.float32(0.0)
    sl2 = np.float32(0.0)
    sxl = np.float32(0.0)
    c = np.float32(0.5) - xmin * iscale
    for i in range(x.shape[0]):
        l = np.floor(x[i] * iscale + c)
        l = min(max(l, np.float32(0.0)), np.float32(nmax))
        wl = w[i] * l
        sl += wl
        sl2 += wl * l
        sxl += wl * x[i]
    return float(sl), float(sl2), float(sxl)


# fastmath lets LLVM assume there are no infinities: "no candidate" errors use this instead.
BIG = 1e30


@njit(fastmath=True, cache=True)
def _affine_solve(sw, sx, sx2, sl, sl2, sxl, nonpos_min):
    """Weighted least-squares (scale, offset, error) for fixed codes; error BIG if none."""
    D = sw * sl2 - sl * sl
    if D <= 0.0:
        return 0.0, 0.0, BIG
    s = (sw * sxl - sx * sl) / D
    m = (sl2 * sx - sl * sxl) / D
    if nonpos_min and m > 0.0:
        m = 0.0
        s = sxl / sl2
    if s <= 0.0:
        return 0.0, 0.0, BIG
    err = sx2 + s * s * sl2 + m * m * sw - 2.0 * s * sxl - 2.0 * m * sx + 2.0 * s * m * sl
    return s, m, err


@njit(fastmath=True, cache=True)
def _affine_solve_lanes(sw, sx, sx2, sl, sl2, sxl, nonpos_min, K, S, B, E):
    """_affine_solve for candidates k < K, branch-free so that it vectorizes: S, B, E = scale,
    offset, error (E = BIG where there is no valid fit)."""
    for k in range(K):
        a = float(sl[k])
        b = float(sl2[k])
        c = float(sxl[k])
        D = sw * b - a * a
        iD = 1.0 / D if D > 0.0 else 0.0
        s = (sw * c - sx * a) * iD
        m = (b * sx - a * c) * iD
        if nonpos_min and m > 0.0:
            m = 0.0
            s = c / b if b > 0.0 else 0.0
        err = sx2 + s * s * b + m * m * sw - 2.0 * s * c - 2.0 * m * sx + 2.0 * s * m * a
        S[k] = s
        B[k] = m
        E[k] = err if (D > 0.0 and s > 0.0) else BIG


@njit(fastmath=True, cache=True)
def affine_fit(x, w, nmax, rmin, rdelta, nstep, nonpos_min, work):
    """Best (scale, offset, weighted squared error) for y = scale * L + offset, L in [0, nmax].

    Candidates: inverse scales (nmax + rmin + rdelta * k) / (max - min), k = 0..nstep, with the
    grid anchored at the block's minimum (as ggml's make_qkx2_quants) and, again, at its maximum
    (which wins on blocks with one large outlier); each is followed by a weighted least-squares
    fit of scale and offset, the best one by a few rounds of re-rounding and refitting. With
    ``nonpos_min`` the offset is kept <= 0 (K-quants store it as an unsigned "min" that is
    subtracted). 2 * (nstep + 1) must not exceed WORK_LANES.
    """
    n = x.shape[0]
    xmin = x[0]
    xmax = x[0]
    sw = np.float32(0.0)
    sx = np.float32(0.0)
    sx2 = np.float32(0.0)
    for i in range(n):
        v = x[i]
        xmin = min(xmin, v)
        xmax = max(xmax, v)
        sw += w[i]
        sx += w[i] * v
        sx2 += w[i] * v * v
    if nonpos_min and xmin > 0:
        xmin = np.float32(0.0)
    if xmax - xmin <= GROUP_MAX_EPS or sw <= 0.0:
        return 0.0, float(xmin), 0.0
    sw = float(sw)
    sx = float(sx)
    sx2 = float(sx2)
    span = float(xmax) - float(xmin)
    A = work[_A]
    C = work[_C]
    n1 = nstep + 1
    for k in range(n1):
        a = (nmax + rmin + rdelta * k) / span
        A[k] = a
        C[k] = 0.5 - xmin * a
        A[n1 + k] = a
        C[n1 + k] = nmax + 0.5 - xmax * a
    K = 2 * n1
    sl = work[_SL]
    sl2 = work[_SL2]
    sxl = work[_SXL]
    multi_sums(x, w, A, C, np.float32(0.0), np.float32(nmax), K, sl, sl2, sxl)
    S = work[_S]
    B = work[_B]
    E = work[_ERR]
    _affine_solve_lanes(sw, sx, sx2, sl, sl2, sxl, nonpos_min, K, S, B, E)
    bk = 0
    for k in range(1, K):
        if E[k] < E[bk]:
            bk = k
    best_err = float(E[bk])
    best_s = float(S[bk])
    best_m = float(B[bk])
    if best_err >= BIG:
        return span / nmax, float(xmin), sx2
    # Polish: re-round at the fitted scale and offset, refit, while the error falls.
    for _ in range(3):
        a, b, c = _affine_sums(x, w, np.float32(best_m), np.float32(1.0 / best_s), nmax)
        s, m, err = _affine_solve(sw, sx, sx2, a, b, c, nonpos_min)
        if err < best_err * (1.0 - 1e-6):
            best_err = err
            best_s = s
            best_m = m
        else:
            break
    return best_s, best_m, max(best_err, 0.0)


@njit(fastmath=True, cache=True)
def affine_codes(x, a, b, nmax, L):
    """L = clamp(round((x + b) / a), 0, nmax): the best codes for y = a * L - b."""
    if a <= 0.0:
        for i in range(x.shape[0]):
            L[i] = 0
        return
    ia = np.float32(1.0 / a)
    c = np.float32(b / a + 0.5)
    for i in range(x.shape[0]):
        l = np.floor(x[i] * ia + c)
        L[i] = np.uint8(min(max(l, np.float32(0.0)), np.float32(nmax)))


@njit(fastmath=True, cache=True)
def _affine_lane(A, C, S, B, k, a, b):
    """Candidate k of multi_err for y = a * L - b."""
    S[k] = a
    B[k] = -b
    if a > 0.0:
        A[k] = 1.0 / a
        C[k] = b / a + 0.5
    else:
        A[k] = 0.0
        C[k] = 0.0


@njit(fastmath=True, cache=True)
def kquant_affine_scales(x, w, nsub, sub, nmax, smax, scales, mins, ls, lm, work):
    """Quantize the sub-block scales and mins of an affine K-quant super-block.

    x, w [nsub * sub]; scales, mins [nsub] the fitted float scale and min (= -offset >= 0) of each
    sub-block. Chooses the half-precision super-block scales d and dmin and the integer codes
    ls, lm in [0, smax] (y = d * ls * L - dmin * lm) to minimise the block's weighted error:
    d = max scale / smax, then for each sub-block the best of the 3x3 integer neighbours of the
    rounded codes, then a least-squares refit of (d, dmin) given all codes, then the neighbours
    again. ls, lm: int32 [2 * nsub] (the second half is scratch). Returns (d, dmin) as stored.
    """
    max_s = 0.0
    max_m = 0.0
    for j in range(nsub):
        max_s = max(max_s, scales[j])
        max_m = max(max_m, mins[j])
    d = f16_round(max_s / smax)
    dmin = f16_round(max_m / smax)
    A = work[_A]
    C = work[_C]
    S = work[_S]
    B = work[_B]
    E = work[_ERR]
    lo = np.float32(0.0)
    hi = np.float32(nmax)
    best_total = BIG
    best_d = d
    best_dmin = dmin
    for it in range(2):
        total = 0.0
        for j in range(nsub):
            xs = x[j * sub:(j + 1) * sub]
            ws = w[j * sub:(j + 1) * sub]
            r_s = int(np.rint(scales[j] / d)) if d > 0.0 else 0
            r_m = int(np.rint(mins[j] / dmin)) if dmin > 0.0 else 0
            K = 0
            for cs in range(r_s - 1, r_s + 2):
                cs = min(max(cs, 0), smax)
                for cm in range(r_m - 1, r_m + 2):
                    cm = min(max(cm, 0), smax)
                    _affine_lane(A, C, S, B, K, d * cs, dmin * cm)
                    K += 1
            multi_err(xs, ws, A, C, lo, hi, S, B, K, E)
            be = BIG
            bk = 0
            for k in range(K):
                if E[k] < be:
                    be = E[k]
                    bk = k
            cs = min(max(r_s - 1 + bk // 3, 0), smax)
            cm = min(max(r_m - 1 + bk % 3, 0), smax)
            ls[nsub + j] = cs
            lm[nsub + j] = cm
            total += be
        if total < best_total:
            best_total = total
            best_d = d
            best_dmin = dmin
            for j in range(nsub):
                ls[j] = ls[nsub + j]
                lm[j] = lm[nsub + j]
        if it == 1:
            break
        # least-squares refit of (d, dmin): y = d * (ls * L) + dmin * (-lm)
        P = 0.0
        Q = 0.0
        R = 0.0
        bu = 0.0
        bv = 0.0
        for j in range(nsub):
            xs = x[j * sub:(j + 1) * sub]
            ws = w[j * sub:(j + 1) * sub]
            a = np.float32(best_d * ls[j])
            ia = np.float32(1.0 / a) if a > 0 else np.float32(0.0)
            c = np.float32(best_dmin * lm[j]) * ia + np.float32(0.5)
            su = np.float32(0.0)
            su2 = np.float32(0.0)
            sxu = np.float32(0.0)
            swj = np.float32(0.0)
            sxj = np.float32(0.0)
            for i in range(sub):
                l = np.floor(xs[i] * ia + c)
                l = min(max(l, lo), hi)
                wl = ws[i] * l
                su += wl
                su2 += wl * l
                sxu += wl * xs[i]
                swj += ws[i]
                sxj += ws[i] * xs[i]
            fs = float(ls[j])
            fm = float(lm[j])
            P += fs * fs * su2
            Q -= fs * fm * su
            R += fm * fm * swj
            bu += fs * sxu
            bv -= fm * sxj
        det = P * R - Q * Q
        if det > 0.0:
            nd = (bu * R - bv * Q) / det
            ndmin = (P * bv - Q * bu) / det
        elif R == 0.0 and P > 0.0:  # no mins in use: refit d alone
            nd = bu / P
            ndmin = best_dmin
        else:
            break
        if nd < 0.0 or ndmin < 0.0:
            break
        d = f16_round(nd)
        dmin = f16_round(ndmin)
    return best_d, best_dmin


# ---------------------------------------------------------------------------------------------
# Symmetric blocks: y = s * L, L in [qlo, qhi] (Q8_0, Q4_0, sub-blocks of Q3_K and Q6_K)
# ---------------------------------------------------------------------------------------------

@njit(fastmath=True, cache=True)
def _sym_sums(x, w, iscale, qlo, qhi):
    sl2 = np.float32(0.0)
    sxl = np.float32(0.0)
    for i in range(x.shape[0]):
        l = np.floor(x[i] * iscale + np.float32(0.5))
        l = min(max(l, np.float32(qlo)), np.float32(qhi))
        wl = w[i] * l
        sl2 += wl * l
        sxl += wl * x[i]
    return float(sl2), float(sxl)


@njit(fastmath=True, cache=True)
def sym_fit(x, w, qlo, qhi, nstep, step, both_ends, work):
    """Best (scale, weighted squared error) for y = scale * L, L in [qlo, qhi] (qlo < 0 < qhi).

    Candidates map the value of largest magnitude to qlo + step * k (k = -nstep..nstep) and, with
    ``both_ends``, to qhi - step * k; each is followed by a least-squares fit of the scale and
    the best by a few rounds of re-rounding and refitting. The candidate count,
    (2 * nstep + 1) * (2 if both_ends else 1), must not exceed WORK_LANES.
    """
    n = x.shape[0]
    amax = np.float32(0.0)
    vmax = np.float32(0.0)
    sx2 = np.float32(0.0)
    for i in range(n):
        a = abs(x[i])
        if a > amax:
            amax = a
            vmax = x[i]
        sx2 += w[i] * x[i] * x[i]
    sx2 = float(sx2)
    if amax < GROUP_MAX_EPS:
        return 0.0, sx2
    A = work[_A]
    C = work[_C]
    nc = 2 * nstep + 1
    for k in range(nc):
        A[k] = (qlo + step * (k - nstep)) / vmax
        C[k] = 0.5
        if both_ends:
            A[nc + k] = (qhi - step * (k - nstep)) / vmax
            C[nc + k] = 0.5
    K = 2 * nc if both_ends else nc
    sl = work[_SL]
    sl2 = work[_SL2]
    sxl = work[_SXL]
    multi_sums(x, w, A, C, np.float32(qlo), np.float32(qhi), K, sl, sl2, sxl)
    best_score = 0.0  # sxl^2 / sl2; the error is sx2 - score
    best_s = float(vmax) / qlo
    # Candidates run from the smallest scale up; a later one must be better by more than
    # rounding noise, so that exact ties (e.g. blocks of zeros and one repeated value) resolve
    # to the smallest scale, the one that keeps the super-block scale finest.
    for k in range(K):
        b = float(sl2[k])
        c = float(sxl[k])
        if b > 0.0 and c * c > best_score * b * (1.0 + 1e-6):
            best_score = c * c / b
            best_s = c / b
    for _ in range(3):
        b, c = _sym_sums(x, w, np.float32(1.0 / best_s), qlo, qhi)
        if b > 0.0 and c * c > best_score * b * (1.0 + 1e-6):
            best_score = c * c / b
            best_s = c / b
        else:
            break
    return best_s, max(sx2 - best_score, 0.0)


@njit(fastmath=True, cache=True)
def sym_codes(x, a, qlo, qhi, L):
    """L = clamp(round(x / a), qlo, qhi) - qlo: the best (offset) codes for y = a * L."""
    if a == 0.0:
        for i in range(x.shape[0]):
            L[i] = -qlo
        return
    ia = np.float32(1.0 / a)
    for i in range(x.shape[0]):
        l = np.floor(x[i] * ia + np.float32(0.5))
        l = min(max(l, np.float32(qlo)), np.float32(qhi))
        L[i] = np.uint8(l - np.float32(qlo))


@njit(fastmath=True, cache=True)
def _sym_lane(A, C, S, B, k, a):
    """Candidate k of multi_err for y = a * L."""
    S[k] = a
    B[k] = 0.0
    C[k] = 0.5
    A[k] = 1.0 / a if a != 0.0 else 0.0


@njit(fastmath=True, cache=True)
def kquant_sym_scales(x, w, nsub, sub, qlo, qhi, slo, shi, scales, ls, work):
    """Quantize the signed sub-block scales of a symmetric K-quant super-block (Q3_K, Q6_K).

    y = d * ls * L with ls in [slo, shi]; d (half precision) maps the scale of largest magnitude
    to slo, each sub-block then takes the best of the 3 integer neighbours of its rounded code,
    followed by a least-squares refit of d and the neighbours again. ls: int32 [2 * nsub] (the
    second half is scratch). Returns d as stored.
    """
    amax = 0.0
    vmax = 0.0
    for j in range(nsub):
        if abs(scales[j]) > amax:
            amax = abs(scales[j])
            vmax = scales[j]
    d = f16_round(vmax / slo)
    A = work[_A]
    C = work[_C]
    S = work[_S]
    B = work[_B]
    E = work[_ERR]
    lo = np.float32(qlo)
    hi = np.float32(qhi)
    best_total = BIG
    best_d = d
    for it in range(2):
        total = 0.0
        for j in range(nsub):
            xs = x[j * sub:(j + 1) * sub]
            ws = w[j * sub:(j + 1) * sub]
            r = int(np.rint(scales[j] / d)) if d != 0.0 else 0
            for k in range(3):
                c = min(max(r - 1 + k, slo), shi)
                _sym_lane(A, C, S, B, k, d * c)
            multi_err(xs, ws, A, C, lo, hi, S, B, 3, E)
            bk = 0
            for k in range(1, 3):
                if E[k] < E[bk]:
                    bk = k
            ls[nsub + j] = min(max(r - 1 + bk, slo), shi)
            total += E[bk]
        if total < best_total:
            best_total = total
            best_d = d
            for j in range(nsub):
                ls[j] = ls[nsub + j]
        if it == 1:
            break
        num = 0.0
        den = 0.0
        for j in range(nsub):
            xs = x[j * sub:(j + 1) * sub]
            ws = w[j * sub:(j + 1) * sub]
            a = np.float32(best_d * ls[j])
            ia = np.float32(1.0 / a) if a != 0 else np.float32(0.0)
            sl2 = np.float32(0.0)
            sxl = np.float32(0.0)
            for i in range(sub):
                l = np.floor(xs[i] * ia + np.float32(0.5))
                l = min(max(l, lo), hi)
                wl = ws[i] * l
                sl2 += wl * l
                sxl += wl * xs[i]
            fs = float(ls[j])
            num += fs * sxl
            den += fs * fs * sl2
        if den <= 0.0:
            break
        d = f16_round(num / den)
    return best_d


# ---------------------------------------------------------------------------------------------
# Non-linear blocks: y = s * V[L] with the IQ4_NL code book V (IQ4_XS)
# ---------------------------------------------------------------------------------------------

@njit(fastmath=True, cache=True)
def _iq4_nearest(v, values, mids):
    """The code book value nearest to v (values sorted, mids the midpoints)."""
    q = values[0]
    for k in range(15):
        if v > mids[k]:
            q = values[k + 1]
    return q


@njit(fastmath=True, cache=True)
def _iq4_sums(x, w, iscale, values, mids):
    sq2 = 0.0
    sxq = 0.0
    for i in range(x.shape[0]):
        q = _iq4_nearest(x[i] * iscale, values, mids)
        wq = w[i] * q
        sq2 += wq * q
        sxq += wq * x[i]
    return sq2, sxq


@njit(fastmath=True, cache=True)
def iq4_fit(x, w, values, mids, nstep):
    """Best (scale, weighted squared error) for y = scale * values[L].

    Candidates map the value of largest magnitude to values[0] + k and values[-1] - k
    (k = -nstep..nstep), each followed by a least-squares fit of the scale.
    """
    n = x.shape[0]
    amax = np.float32(0.0)
    vmax = np.float32(0.0)
    sx2 = 0.0
    for i in range(n):
        a = abs(x[i])
        if a > amax:
            amax = a
            vmax = x[i]
        sx2 += w[i] * x[i] * x[i]
    if amax < GROUP_MAX_EPS:
        return 0.0, sx2
    best_score = 0.0
    best_s = float(vmax) / float(values[0])
    for end in range(2):
        for k in range(-nstep, nstep + 1):
            if end == 0:
                t = values[0] + k
            else:
                t = values[15] - k
            iscale = np.float32(t / vmax)
            sq2, sxq = _iq4_sums(x, w, iscale, values, mids)
            if sq2 > 0.0 and sxq * sxq > best_score * sq2:
                best_score = sxq * sxq / sq2
                best_s = sxq / sq2
    for _ in range(3):
        if best_s == 0.0:
            break
        sq2, sxq = _iq4_sums(x, w, np.float32(1.0 / best_s), values, mids)
        if sq2 > 0.0 and sxq * sxq > best_score * sq2 * (1.0 + 1e-7):
            best_score = sxq * sxq / sq2
            best_s = sxq / sq2
        else:
            break
    return best_s, sx2 - best_score


@njit(fastmath=True, cache=True)
def iq4_err(x, w, a, values, mids):
    """Weighted squared error of y = a * values[L] with the nearest code for each value."""
    err = 0.0
    if a == 0.0:
        for i in range(x.shape[0]):
            err += w[i] * x[i] * x[i]
        return err
    ia = np.float32(1.0 / a)
    af = np.float32(a)
    for i in range(x.shape[0]):
        q = _iq4_nearest(x[i] * ia, values, mids)
        d = af * q - x[i]
        err += w[i] * d * d
    return err


@njit(fastmath=True, cache=True)
def iq4_codes(x, a, mids, L):
    """Index of the nearest code book value to x / a for each value."""
    if a == 0.0:
        for i in range(x.shape[0]):
            L[i] = 8  # values[8] = 1, the nearest to zero
        return
    ia = np.float32(1.0 / a)
    for i in range(x.shape[0]):
        v = x[i] * ia
        idx = 0
        for k in range(15):
            if v > mids[k]:
                idx += 1
        L[i] = idx


# ---------------------------------------------------------------------------------------------
# Argument checks shared by every ``quantize(x, importance=None)``
# ---------------------------------------------------------------------------------------------

def prepare(x, importance, block_size: int, name: str):
    """Validate the inputs of a quantizer; returns (x float32 C-contiguous, weights float32 [C]).

    Weights are the importance vector scaled to mean 1 (floored at 1e-6 so that no value is
    ignored outright), or ones.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D float32 array [rows, cols], got shape {x.shape}")
    cols = x.shape[1]
    if cols % block_size != 0:
        raise ValueError(
            f"{name}: row length {cols} is not a multiple of the block size {block_size}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: input holds NaN or infinite values")
    if importance is None:
        return x, np.ones(cols, np.float32)
    imp = np.asarray(importance, dtype=np.float64).reshape(-1)
    if imp.shape[0] != cols:
        raise ValueError(f"{name}: importance has {imp.shape[0]} values, rows have {cols} columns")
    if not np.isfinite(imp).all() or (imp < 0).any():
        raise ValueError(f"{name}: importance must be finite and non-negative")
    mean = imp.mean()
    if mean <= 0:
        return x, np.ones(cols, np.float32)
    return x, np.maximum(imp / mean, 1e-6).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Half-precision scales of single blocks (Q8_0, Q4_0, Q4_1): the fitted scale rounded to half
# precision is not always the best half-precision scale (the rounding error matters where the
# scale is tiny, in the subnormal range), so the neighbours are scored too.
# ---------------------------------------------------------------------------------------------

@njit(fastmath=True, cache=True)
def sym_pick_f16(x, w, s, qlo, qhi, work):
    """The best half-precision scale among f16(s) and its two neighbours, for y = d * L."""
    A = work[_A]
    C = work[_C]
    S = work[_S]
    B = work[_B]
    E = work[_ERR]
    for k in range(3):
        _sym_lane(A, C, S, B, k, f16_step(s, k - 1))
    multi_err(x, w, A, C, np.float32(qlo), np.float32(qhi), S, B, 3, E)
    bk = 1
    for k in range(3):
        if E[k] < E[bk]:
            bk = k
    return f16_step(s, bk - 1)


@njit(fastmath=True, cache=True)
def affine_pick_f16(x, w, s, m, nmax, work):
    """The best half-precision (scale, offset) among the 3x3 neighbours of (f16(s), f16(m)),
    for y = d * L + m."""
    A = work[_A]
    C = work[_C]
    S = work[_S]
    B = work[_B]
    E = work[_ERR]
    for i in range(3):
        for j in range(3):
            _affine_lane(A, C, S, B, 3 * i + j, f16_step(s, i - 1), -f16_step(m, j - 1))
    multi_err(x, w, A, C, np.float32(0.0), np.float32(nmax), S, B, 9, E)
    bk = 4
    for k in range(9):
        if E[k] < E[bk]:
            bk = k
    return f16_step(s, bk // 3 - 1), f16_step(m, bk % 3 - 1)


@njit(fastmath=True, cache=True)
def kquant_iq4_scales(x, w, nsub, sub, values, mids, scales, ls):
    """Quantize the signed 6-bit sub-block scales of an IQ4_XS super-block, as kquant_sym_scales
    does for the linear types: y = d * ls * values[L], ls in [-32, 31]. Returns d as stored."""
    amax = 0.0
    vmax = 0.0
    for j in range(nsub):
        if abs(scales[j]) > amax:
            amax = abs(scales[j])
            vmax = scales[j]
    d = f16_round(vmax / -32.0)
    best_total = BIG
    best_d = d
    for it in range(2):
        total = 0.0
        for j in range(nsub):
            xs = x[j * sub:(j + 1) * sub]
            ws = w[j * sub:(j + 1) * sub]
            r = int(np.rint(scales[j] / d)) if d != 0.0 else 0
            be = BIG
            bc = 0
            for k in range(3):
                c = min(max(r - 1 + k, -32), 31)
                e = iq4_err(xs, ws, d * c, values, mids)
                if e < be:
                    be = e
                    bc = c
            ls[nsub + j] = bc
            total += be
        if total < best_total:
            best_total = total
            best_d = d
            for j in range(nsub):
                ls[j] = ls[nsub + j]
        if it == 1:
            break
        num = 0.0
        den = 0.0
        for j in range(nsub):
            xs = x[j * sub:(j + 1) * sub]
            ws = w[j * sub:(j + 1) * sub]
            a = best_d * ls[j]
            ia = np.float32(1.0 / a) if a != 0.0 else np.float32(0.0)
            fs = float(ls[j])
            for i in range(sub):
                q = _iq4_nearest(xs[i] * ia, values, mids) * fs
                num += ws[i] * q * xs[i]
                den += ws[i] * q * q
        if den <= 0.0:
            break
        d = f16_round(num / den)
    return best_d


@njit(fastmath=True, cache=True)
def iq4_pick_f16(x, w, s, values, mids):
    """The best half-precision scale among f16(s) and its two neighbours, for y = d * V[L]."""
    bk = 0
    be = BIG
    for k in range(-1, 2):
        e = iq4_err(x, w, f16_step(s, k), values, mids)
        if e < be or (k == 0 and e <= be):
            be = e
            bk = k
    return f16_step(s, bk)
