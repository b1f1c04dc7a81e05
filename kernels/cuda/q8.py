"""The fast GPU path: int8 activations and ``dp4a`` (4 byte products summed in one instruction).

Like the CPU's default path (``kernels/cpu/kq_common.py``) and llama.cpp's, x is first rounded to
8 bits: per 256 values for the K-quants and IQ4_XS, per 32 for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, IQ4_NL
and MXFP4, with the CPU's
exact arithmetic (so both devices see the same integers): ``xq`` int8 [T, C] (read as int32
words [T, C/4]), ``xd`` float32 [T, C/qb] (the scale) and ``xs`` int32 [T, C/16] (the sum of
each 16 ``xq``, for the formats' minimum and offset terms). A weight block then meets x through
integer dot products: 4 weights per instruction instead of a decode, a conversion and a
multiply-add per weight. Measured on an H200 (Q4_K, 16384 x 16384): 1.1 TB/s, 4x the
float-activation kernel of the same layout; see ``kernels/README.md``.

One kernel shape serves every product: ``w`` is a tensor of E matrices [E, R, row_words] in its
raw block bytes (a 2-D tensor is E = 1), ``ids`` [N] says which matrix each of the N outputs
uses, and output n reads activation row ``n // div``::

    matvec            ids = [0],           div = 1   (x [1, C])
    matmul (T tokens) ids = [0] * T,       div = 1
    experts gate/up   ids = the K routed,  div = K   (every routed expert of a token reads its x)
    experts down      ids = the K routed,  div = 1   (each expert reads its own activation)

A warp computes one or a few neighbouring output rows; its lanes split each block into NPART
parts (a part is a few 32-bit words of quants), load the activations a part reads once for all
the rows, and their partial sums meet through warp shuffles (and, where a thread block's warps
split a row, in shared memory). The weights are read as 32-bit words (16-bit halves for the
formats whose blocks are not a multiple of 4 bytes; Q8_0 rows of an even number of blocks as
block pairs of 17 words), so a warp's loads cover whole contiguous blocks.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants
from numba import cuda, float32, float64, int32, uint32
from numba.cuda import libdevice

from .common import SIM, THREADS, WARP, block_reduce_d, group_reduce, half_bits, sum_squares, warp_reduce_d
from .common import WARPS_PER_BLOCK as ROWS  # warps (rows) per thread block

# ---------------------------------------------------------------------------------------------
# dp4a: sum of 4 byte products + c.  ``u`` variant: a's bytes unsigned, b's signed.

if SIM:
    def _sb(v, k):
        b = (int(v) >> (8 * k)) & 255
        return b - 256 if b > 127 else b

    @cuda.jit(device=True)
    def dp4a_us(a, b, c):
        s = int(c)
        for k in range(4):
            s += ((int(a) >> (8 * k)) & 255) * _sb(b, k)
        return np.int32(s)

    @cuda.jit(device=True)
    def dp4a_ss(a, b, c):
        s = int(c)
        for k in range(4):
            s += _sb(a, k) * _sb(b, k)
        return np.int32(s)

    @cuda.jit(device=True)
    def ld4(a, i, j, k):
        return a[i, j, k], a[i, j, k + 1], a[i, j, k + 2], a[i, j, k + 3]

    @cuda.jit(device=True)
    def ld4x(a, t, k):
        return a[t, k], a[t, k + 1], a[t, k + 2], a[t, k + 3]

    @cuda.jit(device=True)
    def prefetch_l2(a, e, r, k):
        return 0

    @cuda.jit(device=True)
    def prmt(a, b, c):
        v = int(a) | (int(b) << 32)
        out = 0
        for n in range(4):
            out |= ((v >> (8 * ((int(c) >> (4 * n)) & 7))) & 255) << (8 * n)
        return np.uint32(out)

    @cuda.jit(device=True)
    def f32_bits(u):
        return np.array([u], np.uint32).view(np.float32)[0]
else:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    def _dp4a(ptx):
        @intrinsic
        def f(typingctx, a, b, c):
            sig = types.int32(types.uint32, types.uint32, types.int32)

            def codegen(context, builder, sig, args):
                i32 = ir.IntType(32)
                asm = ir.InlineAsm(ir.FunctionType(i32, [i32, i32, i32]), ptx + " $0, $1, $2, $3;", "=r,r,r,r")
                return builder.call(asm, args)
            return sig, codegen
        return f

    dp4a_us = _dp4a("dp4a.u32.s32")
    dp4a_ss = _dp4a("dp4a.s32.s32")

    from numba.cuda import cgutils

    def _ld4_codegen(nidx):
        # 16 bytes (4 x u32) through the read-only path in one instruction: ld.global.nc.v4.u32.
        # The address must be 16-byte aligned (the callers' block layouts guarantee it).
        def codegen(context, builder, sig, args):
            aryty = sig.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            inds = [context.cast(builder, args[1 + n], sig.args[1 + n], types.intp) for n in range(nidx)]
            ptr = cgutils.get_item_pointer(context, builder, aryty, ary, inds, wraparound=False)
            i32, i64 = ir.IntType(32), ir.IntType(64)
            sty = ir.LiteralStructType([i32] * 4)
            asm = ir.InlineAsm(ir.FunctionType(sty, [i64]), "ld.global.nc.v4.u32 {$0, $1, $2, $3}, [$4];",
                               "=r,=r,=r,=r,l")
            res = builder.call(asm, [builder.ptrtoint(ptr, i64)])
            return context.make_tuple(builder, sig.return_type, [builder.extract_value(res, n) for n in range(4)])
        return codegen

    @intrinsic
    def ld4(typingctx, a, e, r, k):
        """w[e, r, k : k + 4] of a 3-D 32-bit array."""
        return types.UniTuple(a.dtype, 4)(a, e, r, k), _ld4_codegen(3)

    @intrinsic
    def ld4x(typingctx, a, t, k):
        """xq[t, k : k + 4] of a 2-D 32-bit array."""
        return types.UniTuple(a.dtype, 4)(a, t, k), _ld4_codegen(2)

    @intrinsic
    def prefetch_l2(typingctx, a, e, r, k):
        """Ask for the line holding a[e, r, k] in L2 (no register waits on it; never faults)."""
        def codegen(context, builder, sig, args):
            aryty = sig.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            inds = [context.cast(builder, args[1 + n], sig.args[1 + n], types.intp) for n in range(3)]
            ptr = cgutils.get_item_pointer(context, builder, aryty, ary, inds, wraparound=False)
            i64 = ir.IntType(64)
            asm = ir.InlineAsm(ir.FunctionType(ir.IntType(32), [i64]), "prefetch.global.L2 [$1]; mov.u32 $0, 0;",
                               "=r,l", side_effect=True)
            return builder.call(asm, [builder.ptrtoint(ptr, i64)])
        return types.int32(a, e, r, k), codegen

    @intrinsic
    def prmt(typingctx, a, b, c):
        """Bytes of {b, a} (a: bytes 0-3) picked by c's four 3-bit selectors (one instruction)."""
        sig = types.uint32(types.uint32, types.uint32, types.uint32)

        def codegen(context, builder, sig, args):
            i32 = ir.IntType(32)
            asm = ir.InlineAsm(ir.FunctionType(i32, [i32, i32, i32]), "prmt.b32 $0, $1, $2, $3;", "=r,r,r,r")
            return builder.call(asm, args)
        return sig, codegen

    @intrinsic
    def f32_bits(typingctx, u):
        """The float32 whose bits are u."""
        sig = types.float32(types.uint32)

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.FloatType())
        return sig, codegen

    @intrinsic
    def _cvt_f16(typingctx, h):
        sig = types.float32(types.uint32)

        def codegen(context, builder, sig, args):
            h16 = builder.trunc(args[0], ir.IntType(16))
            asm = ir.InlineAsm(ir.FunctionType(ir.FloatType(), [ir.IntType(16)]), "cvt.f32.f16 $0, $1;", "=f,h")
            return builder.call(asm, [h16])
        return sig, codegen



if SIM:
    @cuda.jit(device=True, inline=True)
    def half(h):
        """float32 of the IEEE half in the low 16 bits of h."""
        return half_bits(h & 0xFFFF)
else:
    @cuda.jit(device=True, inline=True)
    def half(h):
        """float32 of the IEEE half in the low 16 bits of h (one cvt instruction)."""
        return _cvt_f16(uint32(h))


# ---------------------------------------------------------------------------------------------
# activations

@cuda.jit(device=True, inline=True)
def _rint(v):
    # round half to even (the CPU's rint), for |v| <= 127.5
    f = math.floor(v)
    r = v - f
    if r > 0.5 or (r == 0.5 and (int32(f) & 1) == 1):
        f += 1.0
    return f


if SIM:  # (numpy's float32 arithmetic: round-to-nearest already)
    @cuda.jit(device=True, inline=True)
    def _div_rn(a, b):
        return a / b

    @cuda.jit(device=True, inline=True)
    def _mul_rn(a, b):
        return a * b
else:
    @cuda.jit(device=True, inline=True)
    def _div_rn(a, b):
        return libdevice.fdiv_rn(a, b)

    @cuda.jit(device=True, inline=True)
    def _mul_rn(a, b):
        return libdevice.fmul_rn(a, b)


@cuda.jit(device=True, inline=True)
def _round8(v, amax):
    """v as int8 in a block whose largest |value| is amax, and the block's scale d: the CPU's
    arithmetic, exactly: d = amax / 127, q = rint(v * (127 / amax)) (both CPU quantizers give
    this; see ``kernels/cpu/common.py``'s ``quantize_x32``). The divisions and the product are
    IEEE round-to-nearest even inside a fast-math kernel (attention rounds its output here)."""
    d = _div_rn(amax, float32(127.0))
    q = int32(0)
    if amax > 0:
        q = int32(_rint(_mul_rn(v, _div_rn(float32(127.0), amax))))
    return q, d


@cuda.jit(device=True, inline=True)
def round_store(v, t, i, ok, qb, sh, xq, xd, xs):
    """Value i of row t of an activation (v; ok: whether this thread holds one) into its int8
    form xq, xd, xs, where every aligned group of qb threads holds one qb-block. Every thread of
    the thread block must call it (sh: a shared float32 array of blockDim.x values)."""
    q, d = _round8(v, group_reduce(abs(v), sh, 0, qb))
    s16 = group_reduce(float32(q), sh, 1, 16)  # (exact: |sum| <= 16 * 127)
    if ok:
        xq[t, i] = q
        if i % qb == 0:
            xd[t, i // qb] = d
        if i % 16 == 0:
            xs[t, i // 16] = int32(s16)


@cuda.jit
def _quantize(x, qb, xq, xd, xs):
    # xq int8 [T, C], xd [T, C/qb], xs int32 [T, C/16]; a thread block per qb-block of a token
    t = cuda.blockIdx.y
    i = cuda.blockIdx.x * qb + cuda.threadIdx.x
    sh = cuda.shared.array(256, float32)
    round_store(x[t, i], t, i, True, qb, sh, xq, xd, xs)


@cuda.jit
def _quantize_silu(g, u, qb, xq, xd, xs):
    # g = silu(g) * u (the CPU's formula), then as _quantize
    t = cuda.blockIdx.y
    i = cuda.blockIdx.x * qb + cuda.threadIdx.x
    a = float64(g[t, i])
    v = float32(a / (1.0 + math.exp(-a)) * float64(u[t, i]))  # (float64, rounded once: the CPU's)
    g[t, i] = v
    sh = cuda.shared.array(256, float32)
    round_store(v, t, i, True, qb, sh, xq, xd, xs)


NR = 256  # values per thread block of the normalization with its rounding


def rmsnorm_rounds(C: int) -> tuple:
    """The int8 block sizes an RMSNorm of rows of C values can round its output to in its own
    launch (``Act.rmsnorm``)."""
    return (32, 256) if C % NR == 0 else ()


@cuda.jit(fastmath=True)
def _rmsnorm_round(x, w, eps, h, qb, xq, xd, xs):
    # thread block (b, t): values b NR .. b NR + NR - 1 of token t, normalized into h and rounded
    # to int8; each block sums the squares of the whole row itself (a few KB, read from L2), so
    # that no launch waits for another
    t = cuda.blockIdx.y
    D = x.shape[1]
    tid = cuda.threadIdx.x
    sh = cuda.shared.array(NR, float32)
    sh64 = cuda.shared.array(NR, float64)
    ss = sum_squares(x, t, NR)
    ss = block_reduce_d(ss, sh64, 1)
    inv = 1.0 / math.sqrt(ss / D + float64(eps))  # (float64, the output rounded once: the CPU's)
    i = cuda.blockIdx.x * NR + tid
    v = float32(float64(x[t, i]) * inv * float64(w[i]))
    h[t, i] = v
    round_store(v, t, i, True, qb, sh, xq, xd, xs)


class Act:
    """Device buffers of the int8 activations of up to T rows of C values."""

    def __init__(self, T: int, C: int, qb: int):
        self.T, self.C, self.qb = T, C, qb
        self.q8 = cuda.device_array((T, C), np.int8)
        self.q = self.q8.view(np.int32)  # [T, C/4]
        self.d = cuda.device_array((T, C // qb), np.float32)
        self.s = cuda.device_array((T, C // 16), np.int32)

    def quantize(self, x, stream=0):
        """x [n, C] f32 (n <= T), device."""
        n = x.shape[0]
        _quantize[(self.C // self.qb, n), self.qb, stream](x, self.qb, self.q8, self.d, self.s)

    def rmsnorm(self, x, w, eps, h, stream=0):
        """h = rmsnorm(x) * w (as ops.rmsnorm), and quantized here (one launch; qb one of
        ``rmsnorm_rounds(C)``).   x, h [n, C] f32 (n <= T); w [C]."""
        if self.qb not in rmsnorm_rounds(self.C):
            raise ValueError(f"rmsnorm: no int8 output in blocks of {self.qb} for rows of {self.C}")
        n = x.shape[0]
        _rmsnorm_round[(self.C // NR, n), NR, stream](x, w, np.float32(eps), h, self.qb, self.q8, self.d, self.s)

    def quantize_silu(self, g, u, stream=0):
        """g = silu(g) * u in place, and quantized here (one launch).   g, u [n, C] f32 (n <= T)."""
        n = g.shape[0]
        _quantize_silu[(self.C // self.qb, n), self.qb, stream](g, u, self.qb, self.q8, self.d, self.s)


# ---------------------------------------------------------------------------------------------
# the kernel factory

def make_kernel(xload, part, NPART: int, WPB: int, RPW: int = 1, UNROLL: int = 1, MAXREG: int = 0,
                COMBINE: bool = False, PF: int = 0, KS: int = 1):
    """Launcher for a format whose block is WPB words, split into NPART parts: part ``p`` of the
    block b (at word ``o``) contributes ``part(w, e, r, o, p, X)`` to row r's dot, where
    ``X = xload(xq, xd, xs, t, b, p)`` holds the activation values that part reads.

    A warp computes RPW neighbouring rows: it loads X once per block and uses it for every row
    (the activations are about as many bytes as the weights, so this divides the loads through
    the L1 cache by up to 2). UNROLL blocks per lane per step (more loads in flight); MAXREG caps
    the registers per thread (0: the compiler's choice). KS warps of a thread block split each
    row's blocks between them (more warps when a launch has few rows); their sums meet in shared
    memory, in a fixed order. COMBINE: the kernel for ``kk`` > 0 (the expert loop is compiled only
    into it, so the plain products keep their registers). PF > 0: each lane asks L2 for its part
    of the blocks PF steps ahead (memory in flight without the registers that loads would hold).
    """
    PFW = WPB // NPART  # words between the lanes' prefetches within a block
    STEP = WARP // NPART  # blocks per warp-step
    KSTEP = KS * STEP  # blocks between a warp's steps
    GROUPS = ROWS // KS  # row groups per thread block
    opts = dict(fastmath=True)
    if MAXREG:
        opts["max_registers"] = MAXREG

    @cuda.jit(**opts)
    def _k(w, ids, div, xq, xd, xs, out, wts, kk, accumulate):
        # Sums in float64: a part's terms are exact there (f16 scale x f32 scale x integer), so a
        # row's sum is correct to ~1e-16 whatever the order of the lanes and warps, and rounds to
        # the float32 the CPU's kernels give (docs/architecture.md, Numerics). COMBINE: each
        # expert's row rounded to float32, then the weighted sum in float64 and rounded once, as
        # the CPU's MoE computes it.
        lane = cuda.threadIdx.x % WARP
        warp = cuda.threadIdx.x // WARP
        ks = warp % KS
        r0 = (cuda.blockIdx.x * GROUPS + warp // KS) * RPW
        n = cuda.blockIdx.y
        R = out.shape[1]
        nb = w.shape[2] // WPB
        acc = cuda.local.array(RPW, float64)
        tot = cuda.local.array(RPW, float64)
        sh = cuda.shared.array(THREADS, float64)  # (the simulator's warp sums)
        shk = cuda.shared.array((ROWS, RPW), float64)  # (the row group's warps' sums, KS > 1)
        for j in range(RPW):
            tot[j] = float64(0.0)
        p = lane % NPART
        for m in range(kk if COMBINE else 1):
            for j in range(RPW):
                acc[j] = float64(0.0)
            if COMBINE:  # output n: the weighted sum of its kk experts, each on its own x row
                t = n * kk + m
                e = ids[t]
            else:
                e = ids[n]
                t = n // div
            if r0 < R:
                b = ks * STEP + lane // NPART
                while b + (UNROLL - 1) * KSTEP < nb:
                    if PF:
                        bp = min(b + PF * KSTEP, nb - 1)
                        for j in range(RPW):
                            prefetch_l2(w, e, min(r0 + j, R - 1), bp * WPB + p * PFW)
                    for u in range(UNROLL):
                        bu = b + u * KSTEP
                        X = xload(xq, xd, xs, t, bu, p)
                        for j in range(RPW):
                            acc[j] += part(w, e, min(r0 + j, R - 1), bu * WPB, p, X)
                    b += UNROLL * KSTEP
                while b < nb:
                    X = xload(xq, xd, xs, t, b, p)
                    for j in range(RPW):
                        acc[j] += part(w, e, min(r0 + j, R - 1), b * WPB, p, X)
                    b += KSTEP
            for j in range(RPW):  # the warp's sums (in lane 0)
                a = acc[j]
                if SIM:
                    cuda.syncthreads()
                    sh[cuda.threadIdx.x] = a
                    cuda.syncthreads()
                    if lane == 0:
                        s = float64(0.0)
                        for i in range(WARP):
                            s += sh[cuda.threadIdx.x + i]
                        a = s
                else:
                    a = warp_reduce_d(a, 1)
                acc[j] = a
            if KS > 1:  # the row group's warps' sums, in warp order
                cuda.syncthreads()  # (the previous expert's sums read)
                if lane == 0:
                    for j in range(RPW):
                        shk[warp, j] = acc[j]
                cuda.syncthreads()
                if lane == 0 and ks == 0:
                    for j in range(RPW):
                        a = float64(0.0)
                        for i in range(KS):
                            a += shk[warp + i, j]
                        acc[j] = a
            if COMBINE:
                for j in range(RPW):
                    tot[j] += float64(wts[t]) * float64(float32(acc[j]))
        if lane == 0 and ks == 0:
            for j in range(RPW):
                if r0 + j < R:
                    v = float32(tot[j]) if COMBINE else float32(acc[j])
                    if accumulate or COMBINE:
                        out[n, r0 + j] += v
                    else:
                        out[n, r0 + j] = v

    def launch(w, ids, div, act, out, stream=0, wts=None, kk=0, accumulate=False):
        """out[n] = w[ids[n]] @ x[n // div] (x as quantized in ``act``).   w [E, R, words]; out [N, R].

        With ``kk`` > 0: out[n] = sum over m < kk of wts[n kk + m] * w[ids[n kk + m]] @ x[n kk + m]
        (a token's routed experts and their sum in one launch). ``accumulate``: out += instead of =.
        """
        N, R = out.shape
        per = GROUPS * RPW
        if kk and not COMBINE:
            return combine(w, ids, div, act, out, stream, wts, kk, accumulate)
        if wts is None:
            wts = _dummy()
        _k[((R + per - 1) // per, N), THREADS, stream](w, ids, div, act.q, act.d, act.s, out, wts, kk, accumulate)

    combine = None if COMBINE else make_kernel(xload, part, NPART, WPB, RPW, UNROLL, MAXREG, True, PF, KS)
    launch.kernel = _k
    launch.rows_per_block = GROUPS * RPW
    return launch


@functools.lru_cache(maxsize=None)
def _dummy():
    return cuda.to_device(np.zeros(1, np.float32))  # the weights argument of the plain products


# ---------------------------------------------------------------------------------------------
# the formats.  w is uint32 words (or uint16 halves where noted); b the block index in the row;
# x words: xq[t, k] holds x values 4k..4k+3. Each format has, per part count, an ``xload``
# (the activation values its part p of block b reads: the int8 words, the 16-sums its minimum
# or offset term needs, the scale xd[t, b]) and a ``part`` that reads the weights of one row.

_Z4 = (int32(0), int32(0), int32(0), int32(0))


@cuda.jit(device=True, inline=True)
def _u32(w, e, r, i):  # a 32-bit word from two 16-bit halves (i: index of the low half)
    return uint32(w[e, r, i]) | (uint32(w[e, r, i + 1]) << 16)


@cuda.jit(device=True, inline=True)
def _q4k_scale_min(s0w, s1w, s2w, s):
    # 6-bit scale and min of sub-block s from the 12 scale bytes (words s0w, s1w, s2w)
    if s < 4:
        sc = (s0w >> (8 * s)) & 63
        mn = (s1w >> (8 * s)) & 63
    else:
        a = 8 * (s - 4)
        sc = ((s2w >> a) & 15) | (((s0w >> (a + 6)) & 3) << 4)
        mn = ((s2w >> (a + 4)) & 15) | (((s1w >> (a + 6)) & 3) << 4)
    return int32(sc), int32(mn)


@cuda.jit(device=True, inline=True)
def _kq_scales(w, e, r, o, c):
    # Q4_K / Q5_K: the d|dmin word and the scales and minima of sub-blocks 2c and 2c + 1
    # (the block's first 16 bytes in one load)
    w0, sw0, sw1, sw2 = ld4(w, e, r, o)
    sc0, m0 = _q4k_scale_min(sw0, sw1, sw2, 2 * c)
    sc1, m1 = _q4k_scale_min(sw0, sw1, sw2, 2 * c + 1)
    return w0, sc0, m0, sc1, m1


@cuda.jit(device=True, inline=True)
def _kq_xhalf(xq, t, b, c, hg):
    # the x words of half hg of chunk c: weights 64c+16hg+(0..15) and 64c+32+16hg+(0..15)
    xo = b * 64 + 16 * c + 4 * hg
    return ld4x(xq, t, xo), ld4x(xq, t, xo + 8)


@cuda.jit(device=True, inline=True)
def _kq_xmin(xd, xs, t, b, c, h):
    # the 16-sums of sub-blocks 2c and 2c + 1 (read by the part with h == 0, which adds the
    # minimum term) and the activation scale
    s = ld4x(xs, t, b * 16 + 4 * c) if h == 0 else _Z4
    return s, xd[t, b]


@cuda.jit(device=True, inline=True)
def _kq_halves(w, e, r, o, c, h, xh, sx, five):
    # Q4_K: 144 bytes = 36 words: d|dmin, 3 words of scales, 32 words of nibbles. Q5_K (five):
    # 176 bytes = 44 words, 8 words of high bits between the scales and the nibbles.
    # Chunk c (64 weights) has two halves; half h's 4 quant words hold weights 64c+16h+(0..15)
    # (low nibbles, sub-block 2c) and 64c+32+16h+(0..15) (high nibbles, 2c+1). This sums the
    # halves h..h+len(xh)-1 of chunk c (xh: their x words), its scales extracted once:
    # d (sc0 i0 + sc1 i1) - dmin (m0 S0 + m1 S1), S the sub-blocks' activation sums (added once,
    # by the part with h == 0), times the activation scale.
    w0, sc0, m0, sc1, m1 = _kq_scales(w, e, r, o, c)
    i0 = int32(0)
    i1 = int32(0)
    for g in range(len(xh)):
        hg = h + g
        qs = ld4(w, e, r, o + (12 if five else 4) + 8 * c + 4 * hg)
        hs = ld4(w, e, r, o + 4 + 4 * hg) if five else qs
        xa, xb = xh[g]
        for k in range(4):
            lo = qs[k] & 0x0F0F0F0F
            hi = (qs[k] >> 4) & 0x0F0F0F0F
            if five:
                lo |= ((hs[k] >> (2 * c)) & 0x01010101) << 4
                hi |= ((hs[k] >> (2 * c + 1)) & 0x01010101) << 4
            i0 = dp4a_us(lo, xa[k], i0)
            i1 = dp4a_us(hi, xb[k], i1)
    v = half(w0) * float64(sc0 * i0 + sc1 * i1)
    s, d = sx
    if h == 0:
        v -= half(w0 >> 16) * float64(m0 * (s[0] + s[1]) + m1 * (s[2] + s[3]))
    return v * d


@cuda.jit(device=True, inline=True)
def _x_kq8(xq, xd, xs, t, b, p):  # Q4_K / Q5_K, 8 parts: a part is a half-chunk
    return (_kq_xhalf(xq, t, b, p >> 1, p & 1),), _kq_xmin(xd, xs, t, b, p >> 1, p & 1)


@cuda.jit(device=True, inline=True)
def _x_kq4(xq, xd, xs, t, b, p):  # 4 parts: a part is a chunk
    return (_kq_xhalf(xq, t, b, p, 0), _kq_xhalf(xq, t, b, p, 1)), _kq_xmin(xd, xs, t, b, p, 0)


@cuda.jit(device=True, inline=True)
def _x_kq2(xq, xd, xs, t, b, p):  # 2 parts: a part is two chunks
    return _x_kq4(xq, xd, xs, t, b, 2 * p), _x_kq4(xq, xd, xs, t, b, 2 * p + 1)


@cuda.jit(device=True, inline=True)
def _part_q4_k(w, e, r, o, p, X):
    return _kq_halves(w, e, r, o, p >> 1, p & 1, X[0], X[1], False)


@cuda.jit(device=True, inline=True)
def _part_q4_k4(w, e, r, o, p, X):
    return _kq_halves(w, e, r, o, p, 0, X[0], X[1], False)


@cuda.jit(device=True, inline=True)
def _part_q4_k2(w, e, r, o, p, X):
    return (_kq_halves(w, e, r, o, 2 * p, 0, X[0][0], X[0][1], False)
            + _kq_halves(w, e, r, o, 2 * p + 1, 0, X[1][0], X[1][1], False))


@cuda.jit(device=True, inline=True)
def _part_q5_k4(w, e, r, o, p, X):
    return _kq_halves(w, e, r, o, p, 0, X[0], X[1], True)


@cuda.jit(device=True, inline=True)
def _part_q5_k(w, e, r, o, p, X):
    return _kq_halves(w, e, r, o, p >> 1, p & 1, X[0], X[1], True)


@cuda.jit(device=True, inline=True)
def _x_k16(xq, xd, xs, t, b, p):
    # Q2_K / Q3_K / Q6_K with 16 parts: part p = (h, l0) = (p // 8, 4 (p % 8)) takes weights
    # 128h + 32j + l0..l0+3 of each j < 4: x words b*64 + 32h + 8j + l0/4; the 16-sums of its
    # sub-blocks 8h + 2j + l0/16 (read by the parts with l0 % 16 == 0, which add the offsets)
    h = p >> 3
    l0 = 4 * (p & 7)
    xi = b * 64 + 32 * h + (l0 >> 2)
    si = b * 16 + 8 * h + (l0 >> 4)
    s = (xs[t, si], xs[t, si + 2], xs[t, si + 4], xs[t, si + 6]) if (l0 & 15) == 0 else _Z4
    return (xq[t, xi], xq[t, xi + 8], xq[t, xi + 16], xq[t, xi + 24]), s, xd[t, b]


@cuda.jit(device=True, inline=True)
def _x_k4(xq, xd, xs, t, b, p):
    # Q2_K / Q3_K / Q6_K with 4 parts: lane p takes half h = p // 2, weights l = 16 (p % 2)..+15
    # of each of its four 32-weight rows j: x words b*64 + 32h + 8j + 4(p % 2) + (0..3), and the
    # 16-sums of sub-blocks 8h + 2j + p % 2
    h = p >> 1
    hh = p & 1
    xi = b * 64 + 32 * h + 4 * hh
    si = b * 16 + 8 * h + hh
    return ((ld4x(xq, t, xi), ld4x(xq, t, xi + 8), ld4x(xq, t, xi + 16), ld4x(xq, t, xi + 24)),
            (xs[t, si], xs[t, si + 2], xs[t, si + 4], xs[t, si + 6]), xd[t, b])


@cuda.jit(device=True, inline=True)
def _part_q2_k(w, e, r, o, p, X):
    # 84 bytes = 21 words: 4 words of scales (low nibble scale, high nibble min, per 16 weights),
    # 16 words of 2-bit quants, d|dmin. Weight 128h + 32j + l = (qs[32h + l] >> 2j) & 3.
    # Part p: h = p//8, l0 = 4(p%8): the quant word 4+8h+p%8, four j's.
    h = p >> 3
    l0 = 4 * (p & 7)
    q = w[e, r, o + 4 + 8 * h + (p & 7)]
    dd = w[e, r, o + 20]
    xw, xsum, d = X
    isum = int32(0)
    msum = int32(0)
    for j in range(4):
        s = 8 * h + 2 * j + (l0 >> 4)
        sb = int32((w[e, r, o + (s >> 2)] >> (8 * (s & 3))) & 255)
        isum += (sb & 15) * dp4a_us((q >> (2 * j)) & 0x03030303, xw[j], int32(0))
        msum += (sb >> 4) * xsum[j]  # (zero but in the parts that add the minimum)
    return (half(dd) * float64(isum) - half(dd >> 16) * float64(msum)) * d


@cuda.jit(device=True, inline=True)
def _part_q2_k4(w, e, r, o, p, X):
    # Q2_K with 4 lanes per block: lane p takes half h = p//2, weights l = 16(p%2)..+15 of each of
    # its four 32-weight rows j (4 quant words, each j one 16-weight sub-block with one scale)
    h = p >> 1
    hh = p & 1
    q0 = w[e, r, o + 4 + 8 * h + 4 * hh]
    q1 = w[e, r, o + 5 + 8 * h + 4 * hh]
    q2 = w[e, r, o + 6 + 8 * h + 4 * hh]
    q3 = w[e, r, o + 7 + 8 * h + 4 * hh]
    sw0 = w[e, r, o + 2 * h]  # scale bytes 8h..8h+3
    sw1 = w[e, r, o + 2 * h + 1]  # 8h+4..8h+7
    dd = w[e, r, o + 20]
    xw, xsum, d = X
    isum = int32(0)
    msum = int32(0)
    for j in range(4):
        sb = int32(((sw0 if j < 2 else sw1) >> (8 * ((2 * j + hh) & 3))) & 255)
        xa = xw[j]
        v = dp4a_us((q0 >> (2 * j)) & 0x03030303, xa[0], int32(0))
        v = dp4a_us((q1 >> (2 * j)) & 0x03030303, xa[1], v)
        v = dp4a_us((q2 >> (2 * j)) & 0x03030303, xa[2], v)
        v = dp4a_us((q3 >> (2 * j)) & 0x03030303, xa[3], v)
        isum += (sb & 15) * v
        msum += (sb >> 4) * xsum[j]
    return (half(dd) * float64(isum) - half(dd >> 16) * float64(msum)) * d


@cuda.jit(device=True, inline=True)
def _part_q3_k(w, e, r, o, p, X):
    # 110 bytes = 55 halves: hmask[32], qs[64], scales[12], d. Weight 128h + 32j + l:
    # ((qs[32h + l] >> 2j) & 3) - (4 unless bit 4h+j of hmask[l]); 6-bit scale - 32 per 16.
    h = p >> 3
    l0 = 4 * (p & 7)
    hm = _u32(w, e, r, o + (l0 >> 1))
    q = _u32(w, e, r, o + 16 + 16 * h + (l0 >> 1))
    s01 = _u32(w, e, r, o + 48)  # scale bytes 0..3
    s23 = _u32(w, e, r, o + 50)  # 4..7
    s45 = _u32(w, e, r, o + 52)  # 8..11
    xw, xsum, d = X
    isum = int32(0)
    for j in range(4):
        s = 8 * h + 2 * j + (l0 >> 4)
        lw = s01 if (s & 7) < 4 else s23
        lo = (lw >> (8 * (s & 3) + 4 * (s >> 3))) & 15
        hi = (s45 >> (8 * (s & 3) + 2 * (s >> 2))) & 3
        sc = int32(lo | (hi << 4)) - 32
        qq = ((q >> (2 * j)) & 0x03030303) | (((hm >> (4 * h + j)) & 0x01010101) << 2)
        v = dp4a_us(qq, xw[j], int32(0)) - 4 * xsum[j]
        isum += sc * v
    return half(w[e, r, o + 54]) * float64(isum) * d


@cuda.jit(device=True, inline=True)
def _q3k_row(q, hm, j, h, hh, s01, s23, s45, xa, xsum):
    # _part_q3_k4's row j: its scaled sub-block (one call per j, so that j is a constant)
    s = 8 * h + 2 * j + hh
    lw = s01 if (s & 7) < 4 else s23
    lo = (lw >> (8 * (s & 3) + 4 * (s >> 3))) & 15
    hi = (s45 >> (8 * (s & 3) + 2 * (s >> 2))) & 3
    v = -4 * xsum
    for k in range(4):
        qq = ((q[k] >> (2 * j)) & 0x03030303) | (((hm[k] >> (4 * h + j)) & 0x01010101) << 2)
        v = dp4a_us(qq, xa[k], v)
    return (int32(lo | (hi << 4)) - 32) * v


@cuda.jit(device=True, inline=True)
def _part_q3_k4(w, e, r, o, p, X):
    # Q3_K with 4 lanes per block: lane p takes half h = p//2, weights l = 16(p%2)..+15 of each
    # of its four 32-weight rows j (4 quant words, 4 hmask words; each j one scaled sub-block)
    h = p >> 1
    hh = p & 1
    s01 = _u32(w, e, r, o + 48)  # scale bytes 0..3
    s23 = _u32(w, e, r, o + 50)  # 4..7
    s45 = _u32(w, e, r, o + 52)  # 8..11
    hm = (_u32(w, e, r, o + 8 * hh), _u32(w, e, r, o + 8 * hh + 2), _u32(w, e, r, o + 8 * hh + 4),
          _u32(w, e, r, o + 8 * hh + 6))
    qo = o + 16 + 16 * h + 8 * hh
    q = (_u32(w, e, r, qo), _u32(w, e, r, qo + 2), _u32(w, e, r, qo + 4), _u32(w, e, r, qo + 6))
    xw, xsum, d = X
    isum = (_q3k_row(q, hm, 0, h, hh, s01, s23, s45, xw[0], xsum[0])
            + _q3k_row(q, hm, 1, h, hh, s01, s23, s45, xw[1], xsum[1])
            + _q3k_row(q, hm, 2, h, hh, s01, s23, s45, xw[2], xsum[2])
            + _q3k_row(q, hm, 3, h, hh, s01, s23, s45, xw[3], xsum[3]))
    return half(w[e, r, o + 54]) * float64(isum) * d


@cuda.jit(device=True, inline=True)
def _q6k_row(ql, qh, sw, j, hh, xa, xsum):
    # _part_q6_k4's row j (ql: its low-bit words, sw: the half holding its scale byte)
    sc = int32((sw >> (8 * hh)) & 255)
    if sc > 127:
        sc -= 256
    v = -32 * xsum
    for k in range(4):
        qq = ((ql[k] >> (4 * (j >> 1))) & 0x0F0F0F0F) | (((qh[k] >> (2 * j)) & 0x03030303) << 4)
        v = dp4a_us(qq, xa[k], v)
    return sc * v


@cuda.jit(device=True, inline=True)
def _part_q6_k4(w, e, r, o, p, X):
    # Q6_K with 4 lanes per block: lane p takes half h = p//2, weights l = 16(p%2)..+15 of each
    # of its four 32-weight rows j (one scale each)
    h = p >> 1
    hh = p & 1
    ao = o + 32 * h + 8 * hh
    qa = (_u32(w, e, r, ao), _u32(w, e, r, ao + 2), _u32(w, e, r, ao + 4), _u32(w, e, r, ao + 6))
    qb_ = (_u32(w, e, r, ao + 16), _u32(w, e, r, ao + 18), _u32(w, e, r, ao + 20), _u32(w, e, r, ao + 22))
    ho = o + 64 + 16 * h + 8 * hh
    qh = (_u32(w, e, r, ho), _u32(w, e, r, ho + 2), _u32(w, e, r, ho + 4), _u32(w, e, r, ho + 6))
    so = o + 96 + 4 * h
    xw, xsum, d = X
    isum = (_q6k_row(qa, qh, w[e, r, so], 0, hh, xw[0], xsum[0])
            + _q6k_row(qb_, qh, w[e, r, so + 1], 1, hh, xw[1], xsum[1])
            + _q6k_row(qa, qh, w[e, r, so + 2], 2, hh, xw[2], xsum[2])
            + _q6k_row(qb_, qh, w[e, r, so + 3], 3, hh, xw[3], xsum[3]))
    return half(w[e, r, o + 104]) * float64(isum) * d


@cuda.jit(device=True, inline=True)
def _part_q6_k(w, e, r, o, p, X):
    # 210 bytes = 105 halves: ql[128], qh[64], scales int8[16], d. Weight 128h + 32j + l (j<4):
    # low 4 bits from ql[64h + l + 32(j&1)] (>> 4 for j >= 2), high 2 from qh[32h + l] >> 2j; -32.
    h = p >> 3
    l0 = 4 * (p & 7)
    qa = _u32(w, e, r, o + 32 * h + (l0 >> 1))
    qb_ = _u32(w, e, r, o + 32 * h + 16 + (l0 >> 1))
    qh = _u32(w, e, r, o + 64 + 16 * h + (l0 >> 1))
    xw, xsum, d = X
    isum = int32(0)
    for j in range(4):
        src = qa if (j & 1) == 0 else qb_
        lo = (src >> (4 * (j >> 1))) & 0x0F0F0F0F
        qq = lo | (((qh >> (2 * j)) & 0x03030303) << 4)
        s = 8 * h + 2 * j + (l0 >> 4)
        sw = w[e, r, o + 96 + (s >> 1)]
        sc = int32((sw >> (8 * (s & 1))) & 255)
        if sc > 127:
            sc -= 256
        v = dp4a_us(qq, xw[j], int32(0)) - 32 * xsum[j]
        isum += sc * v
    return half(w[e, r, o + 104]) * float64(isum) * d


@cuda.jit(device=True, inline=True)
def _x_q8_0(xq, xd, xs, t, b, p):  # Q8_0 part p: x values 32b + 16p..+15
    return ld4x(xq, t, 8 * b + 4 * p), xd[t, b]


@cuda.jit(device=True, inline=True)
def _part_q8_0(w, e, r, o, p, X):
    # 34 bytes = 17 halves: d, 32 int8. Part p (0..1): bytes 16p..16p+15.
    xa, d = X
    i = int32(0)
    for k in range(4):
        i = dp4a_ss(_u32(w, e, r, o + 1 + 8 * p + 2 * k), xa[k], i)
    return half(w[e, r, o]) * float64(i) * d


@cuda.jit(device=True, inline=True)
def _x_q8_0p(xq, xd, xs, t, b, p):  # Q8_0 as pairs, part p: x values 64b + 16p..+15
    return ld4x(xq, t, 16 * b + 4 * p), xd[t, 2 * b + (p >> 1)]


@cuda.jit(device=True, inline=True)
def _part_q8_0p(w, e, r, o, p, X):
    # Q8_0 rows of an even number of blocks, read as pairs of blocks in 32-bit words (68 bytes =
    # 17 words: 0: d0 | q0[0:2] << 16; 1..7: q0[2:30]; 8: q0[30:32] | d1 << 16; 9..16: q1).
    # Part p: bytes 16(p % 2)..+15 of block p // 2. Block 0's quants sit 2 bytes off its words
    # (each word of them taken from two: prmt), block 1's on them: 5 or 4 word loads for 16
    # weights, instead of 8 half-word loads.
    second = p >> 1
    k = o + 4 * p + second  # the part's first word: 0, 4, 9, 13
    w0 = w[e, r, k]
    w1 = w[e, r, k + 1]
    w2 = w[e, r, k + 2]
    w3 = w[e, r, k + 3]
    w4 = w[e, r, k + 4] if second == 0 else uint32(0)
    sel = uint32(0x3210) if second else uint32(0x5432)  # the word itself, or bytes 2..5 of two
    xa, d = X
    i = dp4a_ss(prmt(w0, w1, sel), xa[0], int32(0))
    i = dp4a_ss(prmt(w1, w2, sel), xa[1], i)
    i = dp4a_ss(prmt(w2, w3, sel), xa[2], i)
    i = dp4a_ss(prmt(w3, w4, sel), xa[3], i)
    return half(w[e, r, o + 8 * second] >> (16 * second)) * float64(i) * d


@cuda.jit(device=True, inline=True)
def _x_32(xq, xd, xs, t, b, p):
    # the 4-part 32-weight formats: part p holds weights 4p..4p+3 and 16+4p..16+4p+3 of block b;
    # part 0 also the block's activation sum (for the offset or minimum term)
    s = xs[t, 2 * b] + xs[t, 2 * b + 1] if p == 0 else int32(0)
    return xq[t, 8 * b + p], xq[t, 8 * b + 4 + p], s, xd[t, b]


@cuda.jit(device=True, inline=True)
def _dot32(lo, hi, X):
    # lo: weights 4p..4p+3 of the block, hi: 16+4p..16+4p+3
    return dp4a_us(hi, X[1], dp4a_us(lo, X[0], int32(0)))


@cuda.jit(device=True, inline=True)
def _sym32(i, off, dh, X):
    # weight = d (q - off): part 0 subtracts off times the block's activation sum (X[2], zero in
    # the other parts)
    return half(dh) * float64(i - off * X[2]) * X[3]


@cuda.jit(device=True, inline=True)
def _affine32(i, w0, X):
    # weight = d q + m (w0: d | m << 16): part 0 adds m times the block's activation sum
    return (half(w0) * float64(i) + half(w0 >> 16) * float64(X[2])) * X[3]


@cuda.jit(device=True, inline=True)
def _spread4(h):
    # 4 bits -> bit 4 of each of 4 bytes
    return ((h & 1) << 4) | ((h & 2) << 11) | ((h & 4) << 18) | ((h & 8) << 25)


@cuda.jit(device=True, inline=True)
def _fifth(q, qh, p):
    # Q5_0 / Q5_1: part p's nibbles with their fifth bits from the block's 32 high bits qh
    return ((q & 0x0F0F0F0F) | _spread4((qh >> (4 * p)) & 15),
            ((q >> 4) & 0x0F0F0F0F) | _spread4((qh >> (16 + 4 * p)) & 15))


@cuda.jit(device=True, inline=True)
def _part_q4_0(w, e, r, o, p, X):
    # 18 bytes = 9 halves: d, 16 bytes of nibbles (low: weights 0..15, high: 16..31); q - 8.
    q = _u32(w, e, r, o + 1 + 2 * p)
    return _sym32(_dot32(q & 0x0F0F0F0F, (q >> 4) & 0x0F0F0F0F, X), 8, w[e, r, o], X)


@cuda.jit(device=True, inline=True)
def _part_q4_1(w, e, r, o, p, X):
    # 20 bytes = 5 words: d|m, 16 bytes of nibbles.
    q = w[e, r, o + 1 + p]
    return _affine32(_dot32(q & 0x0F0F0F0F, (q >> 4) & 0x0F0F0F0F, X), w[e, r, o], X)


@cuda.jit(device=True, inline=True)
def _part_q5_0(w, e, r, o, p, X):
    # 22 bytes = 11 halves: d, qh (32 high bits), 16 bytes of nibbles; q - 16.
    lo, hi = _fifth(_u32(w, e, r, o + 3 + 2 * p), _u32(w, e, r, o + 1), p)
    return _sym32(_dot32(lo, hi, X), 16, w[e, r, o], X)


@cuda.jit(device=True, inline=True)
def _part_q5_1(w, e, r, o, p, X):
    # 24 bytes = 6 words: d|m, qh, 16 bytes of nibbles.
    lo, hi = _fifth(w[e, r, o + 2 + p], w[e, r, o + 1], p)
    return _affine32(_dot32(lo, hi, X), w[e, r, o], X)


def _table_words(levels) -> tuple[int, int, int, int]:
    """16 int8 levels as four little-endian 32-bit words (levels 4i..4i+3 in word i)."""
    b = np.asarray(levels, np.int8).view(np.uint8).astype(np.uint64)
    return tuple(int(b[4 * i] | (b[4 * i + 1] << 8) | (b[4 * i + 2] << 16) | (b[4 * i + 3] << 24)) for i in range(4))


_NL0, _NL1, _NL2, _NL3 = _table_words(quants.IQ4_NL.kvalues)  # IQ4_NL / IQ4_XS levels
_FP0, _FP1, _FP2, _FP3 = _table_words(quants.MXFP4.kvalues)  # MXFP4's E2M1 levels (doubled)


@cuda.jit(device=True, inline=True)
def _lut(v, t0, t1, t2, t3):
    # 4 nibbles (one per byte of v, each 0..15) -> their 4 int8 levels: levels 0..7 and 8..15
    # looked up with one prmt each (3-bit selectors), then each byte taken by its nibble's bit 3
    x = v & 0x07070707
    y = x | (x >> 4)
    sel = (y & 0xFF) | ((y >> 8) & 0xFF00)
    lo = prmt(uint32(t0), uint32(t1), uint32(sel))
    hi = prmt(uint32(t2), uint32(t3), uint32(sel))
    m = ((v >> 3) & 0x01010101) * 0xFF
    return (lo & ~m) | (hi & m)


@cuda.jit(device=True, inline=True)
def _dot_nl(q, xa, xb, i):
    # 8 weights per word of q (low nibbles against xa, high against xb) at the IQ4_NL levels
    i = dp4a_ss(_lut(q & 0x0F0F0F0F, _NL0, _NL1, _NL2, _NL3), xa, i)
    return dp4a_ss(_lut((q >> 4) & 0x0F0F0F0F, _NL0, _NL1, _NL2, _NL3), xb, i)


@cuda.jit(device=True, inline=True)
def _part_iq4_nl(w, e, r, o, p, X):
    # 18 bytes = 9 halves: d, 16 bytes of nibbles (low: weights 0..15, high: 16..31), each an
    # index into the 16 levels. Part p (0..3): quant bytes 4p..4p+3.
    i = _dot_nl(_u32(w, e, r, o + 1 + 2 * p), X[0], X[1], int32(0))
    return half(w[e, r, o]) * float64(i) * X[3]


@cuda.jit(device=True, inline=True)
def _x_iq4_xs(xq, xd, xs, t, b, p):  # IQ4_XS part p: sub-block p, x values 256b + 32p..+31
    return ld4x(xq, t, b * 64 + 8 * p), ld4x(xq, t, b * 64 + 8 * p + 4), xd[t, b]


@cuda.jit(device=True, inline=True)
def _part_iq4_xs(w, e, r, o, p, X):
    # 136 bytes = 34 words: d | scales_h << 16, scales_l (4 bytes), 32 words of nibbles. Part p
    # is sub-block p (32 weights, quant words 2+4p..5+4p), scale (6 bits) - 32.
    w0 = w[e, r, o]
    ls = ((w[e, r, o + 1] >> (4 * p)) & 15) | (((w0 >> (16 + 2 * p)) & 3) << 4)
    xa, xb, d = X
    i = int32(0)
    for k in range(4):
        i = _dot_nl(w[e, r, o + 2 + 4 * p + k], xa[k], xb[k], i)
    return half(w0) * float64((int32(ls) - 32) * i) * d


@cuda.jit(device=True, inline=True)
def _part_mxfp4(w, e, r, o, p, X):
    # 17 bytes: the exponent e8 (scale 2**(e8 - 128): the levels are stored doubled), 16 bytes of
    # nibbles as IQ4_NL's. Part p (0..3): quant bytes 4p..4p+3.
    k = o + 1 + 4 * p
    q = uint32(w[e, r, k]) | (uint32(w[e, r, k + 1]) << 8) | (uint32(w[e, r, k + 2]) << 16) \
        | (uint32(w[e, r, k + 3]) << 24)
    i = dp4a_ss(_lut(q & 0x0F0F0F0F, _FP0, _FP1, _FP2, _FP3), X[0], int32(0))
    i = dp4a_ss(_lut((q >> 4) & 0x0F0F0F0F, _FP0, _FP1, _FP2, _FP3), X[1], i)
    e8 = uint32(w[e, r, o])
    bits = (e8 - 1) << 23 if e8 >= 2 else uint32(0x00200000) << e8  # 2**(e8 - 128), exactly
    return f32_bits(uint32(bits)) * float64(i) * X[3]


# qtype -> ({parts per block: (xload, part)} (the first is the default), words per block, word
# dtype, activation block)
_SPECS = {
    QT.Q4_K: ({8: (_x_kq8, _part_q4_k), 4: (_x_kq4, _part_q4_k4), 2: (_x_kq2, _part_q4_k2)}, 36, np.uint32, 256),
    QT.Q5_K: ({8: (_x_kq8, _part_q5_k), 4: (_x_kq4, _part_q5_k4)}, 44, np.uint32, 256),
    QT.Q2_K: ({16: (_x_k16, _part_q2_k), 4: (_x_k4, _part_q2_k4)}, 21, np.uint32, 256),
    QT.Q3_K: ({16: (_x_k16, _part_q3_k), 4: (_x_k4, _part_q3_k4)}, 55, np.uint16, 256),
    QT.Q6_K: ({16: (_x_k16, _part_q6_k), 4: (_x_k4, _part_q6_k4)}, 105, np.uint16, 256),
    QT.Q8_0: ({2: (_x_q8_0, _part_q8_0)}, 17, np.uint16, 32),
    QT.Q4_0: ({4: (_x_32, _part_q4_0)}, 9, np.uint16, 32),
    QT.Q4_1: ({4: (_x_32, _part_q4_1)}, 5, np.uint32, 32),
    QT.Q5_0: ({4: (_x_32, _part_q5_0)}, 11, np.uint16, 32),
    QT.Q5_1: ({4: (_x_32, _part_q5_1)}, 6, np.uint32, 32),
    QT.IQ4_NL: ({4: (_x_32, _part_iq4_nl)}, 9, np.uint16, 32),
    QT.IQ4_XS: ({8: (_x_iq4_xs, _part_iq4_xs)}, 34, np.uint32, 256),
    QT.MXFP4: ({4: (_x_32, _part_mxfp4)}, 17, np.uint8, 32),
}
# formats whose rows of an even number of blocks are read as pairs of blocks in 32-bit words
# (their blocks alone are not a multiple of 4 bytes): ({parts: (xload, part)}, words per pair)
_PAIRED = {
    QT.Q8_0: ({4: (_x_q8_0p, _part_q8_0p)}, 17),
}
_LAUNCHERS: dict = {}


def supported(qtype) -> bool:
    return QT(int(qtype)) in _SPECS


def spec(qtype):
    """(word dtype, activation block) of a format with an int8 kernel."""
    _, _, dt, qb = _SPECS[QT(int(qtype))]
    return dt, qb


def view(qtype, w):
    """What the kernel reads of raw block bytes w [..., row_bytes]: the format's words, or 32-bit
    words of block pairs where the format has a paired kernel and the rows allow it."""
    qt = QT(int(qtype))
    if qt in _PAIRED and tuple(w.shape)[-1] % (4 * _PAIRED[qt][1]) == 0:
        return w.view(np.uint32)
    return w.view(_SPECS[qt][2])


# rows per warp, blocks per lane-step, register cap, prefetch distance, lanes per block (0: the
# format's first part function) and warps per row of each format's kernel (measured on an H200
# with bench/gpu.py --tune); formats not listed: 1, 1, 0, 0, 0, 1
TUNE: dict = {
    QT.Q4_K: (2, 1, 0, 0, 4), QT.Q8_0: (2, 1, 0, 0), QT.Q5_K: (4, 1, 0, 0, 4), QT.Q6_K: (4, 1, 0, 0, 4),
    QT.Q2_K: (4, 1, 0, 0, 4), QT.Q3_K: (4, 1, 0, 0, 4), QT.Q4_0: (4, 1, 0, 0), QT.Q4_1: (2, 1, 0, 0),
    QT.Q5_0: (2, 2, 0, 0), QT.Q5_1: (4, 1, 0, 0), QT.IQ4_NL: (4, 1, 0, 0), QT.IQ4_XS: (4, 1, 0, 0),
    QT.MXFP4: (4, 1, 0, 0),
}
# FLASHMOE_Q8_TUNE="Q4_K=1,2,0,2;Q8_0=2,1,0,0" overrides entries (for measuring another GPU)
for _item in filter(None, os.environ.get("FLASHMOE_Q8_TUNE", "").split(";")):
    _name, _, _vals = _item.partition("=")
    TUNE[QT[_name.strip().upper()]] = tuple(int(v) for v in _vals.split(","))
# a launch of fewer thread blocks than _SMALL (a token's few experts, a small matrix) takes
# _SMALL_TUNE's rows per warp (0: the format's) and warps per row instead, so that enough warps
# fill the GPU; FLASHMOE_Q8_SMALL="1,1" overrides it
_SMALL = 512
_SMALL_TUNE = tuple(int(v) for v in os.environ.get("FLASHMOE_Q8_SMALL", "0,4").split(","))


@contextlib.contextmanager
def variants_alone():
    """Within it, each launcher runs its own kernel whatever the launch's size (no small-launch
    choice): for checking or measuring a variant itself."""
    global _SMALL
    small, _SMALL = _SMALL, 0
    try:
        yield
    finally:
        _SMALL = small


def launcher(qtype, rpw: int | None = None, unroll: int | None = None, maxreg: int | None = None,
             pf: int | None = None, npart: int | None = None, ks: int | None = None, paired: bool | None = None):
    """``launch(w, ids, div, act, out, stream=0, wts=None, kk=0, accumulate=False)`` of a
    format (see the module doc and ``make_kernel``); npart: the lanes per block (one of the
    format's part functions); ks: the warps per row. ``paired``: the kernel of block pairs
    (True) or of blocks (False); by default, each launch takes the one that fits ``w`` (see
    ``view``)."""
    qt = QT(int(qtype))
    if qt in _PAIRED and paired is None:  # by what ``view`` gave: pairs (32-bit words) or blocks
        key = (qt, rpw, unroll, maxreg, pf, npart, ks)
        f = _LAUNCHERS.get(key)
        if f is None:
            fp = launcher(qt, rpw, unroll, maxreg, pf, npart, ks, True)
            fb = launcher(qt, rpw, unroll, maxreg, pf, npart, ks, False)

            def f(w, *a, **k):
                (fp if w.dtype == np.uint32 else fb)(w, *a, **k)
            f.kernel = fp.kernel
            f.rows_per_block = fp.rows_per_block
            _LAUNCHERS[key] = f
        return f
    d = tuple(TUNE.get(qt, ())) + (1, 1, 0, 0, 0, 1)[len(TUNE.get(qt, ())):]
    rpw = d[0] if rpw is None else rpw
    unroll = d[1] if unroll is None else unroll
    maxreg = d[2] if maxreg is None else maxreg
    pf = d[3] if pf is None else pf
    parts, wpb = _PAIRED[qt] if paired else _SPECS[qt][:2]
    npart = d[4] if npart is None else npart
    if npart not in parts:  # (the default; or a part count of the pairs asked of blocks)
        npart = next(iter(parts))
    ks = d[5] if ks is None else ks
    if ROWS % ks:
        raise ValueError(f"{ks} warps per row: not a divisor of the {ROWS} warps of a thread block")
    key = (qt, rpw, unroll, maxreg, pf, npart, ks, paired)
    f = _LAUNCHERS.get(key)
    if f is None:
        big = make_kernel(*parts[npart], npart, wpb, rpw, unroll, maxreg, False, pf, ks)
        srpw, sks = _SMALL_TUNE[0] or rpw, _SMALL_TUNE[1]
        if srpw * ks >= rpw * sks:  # (the small grids' kernel has no fewer rows per thread block)
            f = big
        else:
            small = launcher(qt, srpw, unroll, 0, pf, npart, sks, paired)

            def f(w, ids, div, act, out, stream=0, wts=None, kk=0, accumulate=False):
                N, R = out.shape
                k = big if (R // big.rows_per_block) * N >= _SMALL else small
                k(w, ids, div, act, out, stream, wts, kk, accumulate)
            f.kernel = big.kernel
            f.rows_per_block = big.rows_per_block
        _LAUNCHERS[key] = f
    return f
