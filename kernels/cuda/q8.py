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

A warp computes one output row; its lanes split each block into NPART parts (a part is a few
32-bit words of quants), and the lanes' partial sums meet through warp shuffles. The weights
are read as 32-bit words (16-bit halves for the formats whose blocks are not a multiple of 4
bytes), so a warp's loads cover whole contiguous blocks.
"""
from __future__ import annotations

import functools
import math
import os

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants
from numba import cuda, float32, int32, uint32

from .common import SIM, THREADS, WARP, block_reduce, half_bits, warp_shfl_sum
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


@cuda.jit(device=True, inline=True)
def _quantize_one(v, t, qb, xq, xd, xs):
    # thread block = one qb-block of one token; v: this thread's value of it
    b = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    sh = cuda.shared.array(256, float32)
    shi = cuda.shared.array(256, int32)
    amax = block_reduce(abs(v), sh, 0)  # (the thread block is the qb-block)
    # the CPU's arithmetic, exactly: qb = 256: q = rint(x * (127 / amax)); qb = 32: q = rint(x * (1 / d))
    d = amax / float32(127.0)
    if amax > 0:
        if qb == 256:
            q = int32(_rint(v * (float32(127.0) / amax)))
        else:
            q = int32(_rint(v * (float32(1.0) / d)))
    else:
        q = int32(0)
    xq[t, b * qb + tid] = q
    if tid == 0:
        xd[t, b] = d
    shi[tid] = q
    cuda.syncthreads()
    s = 8  # the 16-sums
    while s > 0:
        if (tid & 15) < s:
            shi[tid] += shi[tid + s]
        cuda.syncthreads()
        s //= 2
    if (tid & 15) == 0:
        xs[t, (b * qb + tid) >> 4] = shi[tid]


@cuda.jit
def _quantize(x, qb, xq, xd, xs):
    # xq int8 [T, C], xd [T, C/qb], xs int32 [T, C/16]
    t = cuda.blockIdx.y
    _quantize_one(x[t, cuda.blockIdx.x * qb + cuda.threadIdx.x], t, qb, xq, xd, xs)


@cuda.jit
def _quantize_silu(g, u, qb, xq, xd, xs):
    # g = silu(g) * u (the CPU's formula), then as _quantize
    t = cuda.blockIdx.y
    i = cuda.blockIdx.x * qb + cuda.threadIdx.x
    a = g[t, i]
    v = a / (float32(1.0) + math.exp(-a)) * u[t, i]
    g[t, i] = v
    _quantize_one(v, t, qb, xq, xd, xs)


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

    def quantize_silu(self, g, u, stream=0):
        """g = silu(g) * u in place, and quantized here (one launch).   g, u [n, C] f32 (n <= T)."""
        n = g.shape[0]
        _quantize_silu[(self.C // self.qb, n), self.qb, stream](g, u, self.qb, self.q8, self.d, self.s)


# ---------------------------------------------------------------------------------------------
# the kernel factory

def make_kernel(part, NPART: int, WPB: int, RPW: int = 1, UNROLL: int = 1, MAXREG: int = 0, COMBINE: bool = False,
                PF: int = 0):
    """Launcher for a format whose block is WPB words and whose part ``p`` (0..NPART-1) of the
    block at word ``o`` contributes ``part(w, e, r, o, p, b, xq, xd, xs, t)`` to row r's dot.

    A warp computes RPW neighbouring rows (the activation loads, the same for every row, are
    shared) and UNROLL blocks per lane per step (more loads in flight); MAXREG caps the
    registers per thread (0: the compiler's choice). COMBINE: the kernel for ``kk`` > 0 (the
    expert loop is compiled only into it, so the plain products keep their registers). PF > 0:
    each lane asks L2 for its part of the blocks PF steps ahead (memory in flight without the
    registers that loads would hold).
    """
    PFW = WPB // NPART  # words between the lanes' prefetches within a block
    STEP = WARP // NPART
    opts = dict(fastmath=True)
    if MAXREG:
        opts["max_registers"] = MAXREG

    @cuda.jit(**opts)
    def _k(w, ids, div, xq, xd, xs, out, wts, kk, accumulate):
        lane = cuda.threadIdx.x % WARP
        r0 = (cuda.blockIdx.x * ROWS + cuda.threadIdx.x // WARP) * RPW
        n = cuda.blockIdx.y
        R = out.shape[1]
        nb = w.shape[2] // WPB
        acc = cuda.local.array(RPW, float32)
        for j in range(RPW):
            acc[j] = float32(0.0)
        if r0 < R:
            p = lane % NPART
            for m in range(kk if COMBINE else 1):
                if COMBINE:  # output n: the weighted sum of its kk experts, each on its own x row
                    t = n * kk + m
                    e = ids[t]
                    wt = wts[t]
                else:
                    e = ids[n]
                    t = n // div
                    wt = float32(1.0)
                b = lane // NPART
                while b + (UNROLL - 1) * STEP < nb:
                    if PF:
                        bp = min(b + PF * STEP, nb - 1)
                        for j in range(RPW):
                            prefetch_l2(w, e, min(r0 + j, R - 1), bp * WPB + p * PFW)
                    for u in range(UNROLL):
                        bu = b + u * STEP
                        for j in range(RPW):
                            v = part(w, e, min(r0 + j, R - 1), bu * WPB, p, bu, xq, xd, xs, t)
                            acc[j] += wt * v if COMBINE else v
                    b += UNROLL * STEP
                while b < nb:
                    for j in range(RPW):
                        v = part(w, e, min(r0 + j, R - 1), b * WPB, p, b, xq, xd, xs, t)
                        acc[j] += wt * v if COMBINE else v
                    b += STEP
        for j in range(RPW):
            a = acc[j]
            if SIM:
                sh = cuda.shared.array(THREADS, float32)
                cuda.syncthreads()
                sh[cuda.threadIdx.x] = a
                cuda.syncthreads()
                if lane == 0:
                    s = float32(0.0)
                    for i in range(WARP):
                        s += sh[cuda.threadIdx.x + i]
                    a = s
            else:
                a = warp_shfl_sum(a)
            if lane == 0 and r0 + j < R:
                if accumulate or COMBINE:
                    out[n, r0 + j] += a
                else:
                    out[n, r0 + j] = a

    def launch(w, ids, div, act, out, stream=0, wts=None, kk=0, accumulate=False):
        """out[n] = w[ids[n]] @ x[n // div] (x as quantized in ``act``).   w [E, R, words]; out [N, R].

        With ``kk`` > 0: out[n] = sum over m < kk of wts[n kk + m] * w[ids[n kk + m]] @ x[n kk + m]
        (a token's routed experts and their sum in one launch). ``accumulate``: out += instead of =.
        """
        N, R = out.shape
        per = ROWS * RPW
        if kk and not COMBINE:
            return combine(w, ids, div, act, out, stream, wts, kk, accumulate)
        if wts is None:
            wts = _dummy()
        _k[((R + per - 1) // per, N), THREADS, stream](w, ids, div, act.q, act.d, act.s, out, wts, kk, accumulate)

    combine = None if COMBINE else make_kernel(part, NPART, WPB, RPW, UNROLL, MAXREG, True, PF)
    launch.kernel = _k
    return launch


@functools.lru_cache(maxsize=None)
def _dummy():
    return cuda.to_device(np.zeros(1, np.float32))  # the weights argument of the plain products


# ---------------------------------------------------------------------------------------------
# the formats.  w is uint32 words (or uint16 halves where noted); b the block index in the row;
# x words: xq[t, k] holds x values 4k..4k+3.

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
def _kq_sum(w0, sc0, m0, sc1, m1, i0, i1, h, c, b, xd, xs, t):
    # d (sc0 i0 + sc1 i1) - dmin (m0 S0 + m1 S1), S the sub-blocks' activation sums (added once,
    # by the part with h == 0), times the activation scale
    v = half(w0) * float32(sc0 * i0 + sc1 * i1)
    if h == 0:
        s0, s1, s2, s3 = ld4x(xs, t, b * 16 + 4 * c)  # 16-sums of sub-blocks 2c and 2c + 1
        v -= half(w0 >> 16) * float32(m0 * (s0 + s1) + m1 * (s2 + s3))
    return v * xd[t, b]


@cuda.jit(device=True, inline=True)
def _kq_halves(w, e, r, o, c, h, nh, b, xq, xd, xs, t, five):
    # Q4_K: 144 bytes = 36 words: d|dmin, 3 words of scales, 32 words of nibbles. Q5_K (five):
    # 176 bytes = 44 words, 8 words of high bits between the scales and the nibbles.
    # Chunk c (64 weights) has two halves; half h's 4 quant words hold weights 64c+16h+(0..15)
    # (low nibbles, sub-block 2c) and 64c+32+16h+(0..15) (high nibbles, 2c+1). This sums the nh
    # halves h..h+nh-1 of chunk c, its scales extracted once.
    w0, sc0, m0, sc1, m1 = _kq_scales(w, e, r, o, c)
    i0 = int32(0)
    i1 = int32(0)
    for g in range(nh):
        hg = h + g
        xo = b * 64 + 16 * c + 4 * hg
        qs = ld4(w, e, r, o + (12 if five else 4) + 8 * c + 4 * hg)
        hs = ld4(w, e, r, o + 4 + 4 * hg) if five else qs
        xa = ld4x(xq, t, xo)
        xb = ld4x(xq, t, xo + 8)
        for k in range(4):
            lo = qs[k] & 0x0F0F0F0F
            hi = (qs[k] >> 4) & 0x0F0F0F0F
            if five:
                lo |= ((hs[k] >> (2 * c)) & 0x01010101) << 4
                hi |= ((hs[k] >> (2 * c + 1)) & 0x01010101) << 4
            i0 = dp4a_us(lo, xa[k], i0)
            i1 = dp4a_us(hi, xb[k], i1)
    return _kq_sum(w0, sc0, m0, sc1, m1, i0, i1, h, c, b, xd, xs, t)


@cuda.jit(device=True, inline=True)
def _part_q4_k(w, e, r, o, p, b, xq, xd, xs, t):
    return _kq_halves(w, e, r, o, p >> 1, p & 1, 1, b, xq, xd, xs, t, False)  # 8 parts: a half-chunk


@cuda.jit(device=True, inline=True)
def _part_q4_k4(w, e, r, o, p, b, xq, xd, xs, t):  # 4 parts: a part is a chunk
    return _kq_halves(w, e, r, o, p, 0, 2, b, xq, xd, xs, t, False)


@cuda.jit(device=True, inline=True)
def _part_q4_k2(w, e, r, o, p, b, xq, xd, xs, t):  # 2 parts: a part is two chunks
    return (_kq_halves(w, e, r, o, 2 * p, 0, 2, b, xq, xd, xs, t, False)
            + _kq_halves(w, e, r, o, 2 * p + 1, 0, 2, b, xq, xd, xs, t, False))


@cuda.jit(device=True, inline=True)
def _part_q5_k4(w, e, r, o, p, b, xq, xd, xs, t):
    return _kq_halves(w, e, r, o, p, 0, 2, b, xq, xd, xs, t, True)


@cuda.jit(device=True, inline=True)
def _part_q5_k(w, e, r, o, p, b, xq, xd, xs, t):
    return _kq_halves(w, e, r, o, p >> 1, p & 1, 1, b, xq, xd, xs, t, True)


@cuda.jit(device=True, inline=True)
def _part_q2_k(w, e, r, o, p, b, xq, xd, xs, t):
    # 84 bytes = 21 words: 4 words of scales (low nibble scale, high nibble min, per 16 weights),
    # 16 words of 2-bit quants, d|dmin. Weight 128h + 32j + l = (qs[32h + l] >> 2j) & 3.
    # Part p: h = p//8, l0 = 4(p%8): the quant word 4+8h+p%8, four j's.
    h = p >> 3
    l0 = 4 * (p & 7)
    q = w[e, r, o + 4 + 8 * h + (p & 7)]
    dd = w[e, r, o + 20]
    isum = int32(0)
    msum = int32(0)
    for j in range(4):
        s = 8 * h + 2 * j + (l0 >> 4)
        sb = int32((w[e, r, o + (s >> 2)] >> (8 * (s & 3))) & 255)
        xi = b * 64 + 32 * h + 8 * j + (l0 >> 2)
        isum += (sb & 15) * dp4a_us((q >> (2 * j)) & 0x03030303, xq[t, xi], int32(0))
        if (l0 & 15) == 0:
            msum += (sb >> 4) * xs[t, b * 16 + s]
    return (half(dd) * float32(isum) - half(dd >> 16) * float32(msum)) * xd[t, b]


@cuda.jit(device=True, inline=True)
def _part_q2_k4(w, e, r, o, p, b, xq, xd, xs, t):
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
    isum = int32(0)
    msum = int32(0)
    for j in range(4):
        sb = int32(((sw0 if j < 2 else sw1) >> (8 * ((2 * j + hh) & 3))) & 255)
        xa = ld4x(xq, t, b * 64 + 32 * h + 8 * j + 4 * hh)
        v = dp4a_us((q0 >> (2 * j)) & 0x03030303, xa[0], int32(0))
        v = dp4a_us((q1 >> (2 * j)) & 0x03030303, xa[1], v)
        v = dp4a_us((q2 >> (2 * j)) & 0x03030303, xa[2], v)
        v = dp4a_us((q3 >> (2 * j)) & 0x03030303, xa[3], v)
        isum += (sb & 15) * v
        msum += (sb >> 4) * xs[t, b * 16 + 8 * h + 2 * j + hh]
    return (half(dd) * float32(isum) - half(dd >> 16) * float32(msum)) * xd[t, b]


@cuda.jit(device=True, inline=True)
def _part_q3_k(w, e, r, o, p, b, xq, xd, xs, t):
    # 110 bytes = 55 halves: hmask[32], qs[64], scales[12], d. Weight 128h + 32j + l:
    # ((qs[32h + l] >> 2j) & 3) - (4 unless bit 4h+j of hmask[l]); 6-bit scale - 32 per 16.
    h = p >> 3
    l0 = 4 * (p & 7)
    hm = _u32(w, e, r, o + (l0 >> 1))
    q = _u32(w, e, r, o + 16 + 16 * h + (l0 >> 1))
    s01 = _u32(w, e, r, o + 48)  # scale bytes 0..3
    s23 = _u32(w, e, r, o + 50)  # 4..7
    s45 = _u32(w, e, r, o + 52)  # 8..11
    isum = int32(0)
    for j in range(4):
        s = 8 * h + 2 * j + (l0 >> 4)
        lw = s01 if (s & 7) < 4 else s23
        lo = (lw >> (8 * (s & 3) + 4 * (s >> 3))) & 15
        hi = (s45 >> (8 * (s & 3) + 2 * (s >> 2))) & 3
        sc = int32(lo | (hi << 4)) - 32
        qq = ((q >> (2 * j)) & 0x03030303) | (((hm >> (4 * h + j)) & 0x01010101) << 2)
        xi = b * 64 + 32 * h + 8 * j + (l0 >> 2)
        v = dp4a_us(qq, xq[t, xi], int32(0))
        if (l0 & 15) == 0:
            v -= 4 * xs[t, b * 16 + s]
        isum += sc * v
    return half(w[e, r, o + 54]) * float32(isum) * xd[t, b]


@cuda.jit(device=True, inline=True)
def _q3k_row(q, hm, j, h, hh, s01, s23, s45, b, xq, xs, t):
    # _part_q3_k4's row j: its scaled sub-block (one call per j, so that j is a constant)
    s = 8 * h + 2 * j + hh
    lw = s01 if (s & 7) < 4 else s23
    lo = (lw >> (8 * (s & 3) + 4 * (s >> 3))) & 15
    hi = (s45 >> (8 * (s & 3) + 2 * (s >> 2))) & 3
    xa = ld4x(xq, t, b * 64 + 32 * h + 8 * j + 4 * hh)
    v = -4 * xs[t, b * 16 + s]
    for k in range(4):
        qq = ((q[k] >> (2 * j)) & 0x03030303) | (((hm[k] >> (4 * h + j)) & 0x01010101) << 2)
        v = dp4a_us(qq, xa[k], v)
    return (int32(lo | (hi << 4)) - 32) * v


@cuda.jit(device=True, inline=True)
def _part_q3_k4(w, e, r, o, p, b, xq, xd, xs, t):
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
    isum = (_q3k_row(q, hm, 0, h, hh, s01, s23, s45, b, xq, xs, t)
            + _q3k_row(q, hm, 1, h, hh, s01, s23, s45, b, xq, xs, t)
            + _q3k_row(q, hm, 2, h, hh, s01, s23, s45, b, xq, xs, t)
            + _q3k_row(q, hm, 3, h, hh, s01, s23, s45, b, xq, xs, t))
    return half(w[e, r, o + 54]) * float32(isum) * xd[t, b]


@cuda.jit(device=True, inline=True)
def _q6k_row(ql, qh, sw, j, h, hh, b, xq, xs, t):
    # _part_q6_k4's row j (ql: its low-bit words, sw: the half holding its scale byte)
    sc = int32((sw >> (8 * hh)) & 255)
    if sc > 127:
        sc -= 256
    xa = ld4x(xq, t, b * 64 + 32 * h + 8 * j + 4 * hh)
    v = -32 * xs[t, b * 16 + 8 * h + 2 * j + hh]
    for k in range(4):
        qq = ((ql[k] >> (4 * (j >> 1))) & 0x0F0F0F0F) | (((qh[k] >> (2 * j)) & 0x03030303) << 4)
        v = dp4a_us(qq, xa[k], v)
    return sc * v


@cuda.jit(device=True, inline=True)
def _part_q6_k4(w, e, r, o, p, b, xq, xd, xs, t):
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
    isum = (_q6k_row(qa, qh, w[e, r, so], 0, h, hh, b, xq, xs, t)
            + _q6k_row(qb_, qh, w[e, r, so + 1], 1, h, hh, b, xq, xs, t)
            + _q6k_row(qa, qh, w[e, r, so + 2], 2, h, hh, b, xq, xs, t)
            + _q6k_row(qb_, qh, w[e, r, so + 3], 3, h, hh, b, xq, xs, t))
    return half(w[e, r, o + 104]) * float32(isum) * xd[t, b]


@cuda.jit(device=True, inline=True)
def _part_q6_k(w, e, r, o, p, b, xq, xd, xs, t):
    # 210 bytes = 105 halves: ql[128], qh[64], scales int8[16], d. Weight 128h + 32j + l (j<4):
    # low 4 bits from ql[64h + l + 32(j&1)] (>> 4 for j >= 2), high 2 from qh[32h + l] >> 2j; -32.
    h = p >> 3
    l0 = 4 * (p & 7)
    qa = _u32(w, e, r, o + 32 * h + (l0 >> 1))
    qb_ = _u32(w, e, r, o + 32 * h + 16 + (l0 >> 1))
    qh = _u32(w, e, r, o + 64 + 16 * h + (l0 >> 1))
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
        xi = b * 64 + 32 * h + 8 * j + (l0 >> 2)
        v = dp4a_us(qq, xq[t, xi], int32(0))
        if (l0 & 15) == 0:
            v -= 32 * xs[t, b * 16 + s]
        isum += sc * v
    return half(w[e, r, o + 104]) * float32(isum) * xd[t, b]


@cuda.jit(device=True, inline=True)
def _part_q8_0(w, e, r, o, p, b, xq, xd, xs, t):
    # 34 bytes = 17 halves: d, 32 int8. Part p (0..1): bytes 16p..16p+15.
    xa = ld4x(xq, t, 8 * b + 4 * p)
    i = int32(0)
    for k in range(4):
        i = dp4a_ss(_u32(w, e, r, o + 1 + 8 * p + 2 * k), xa[k], i)
    return half(w[e, r, o]) * float32(i) * xd[t, b]


@cuda.jit(device=True, inline=True)
def _dot32(lo, hi, p, b, xq, t):
    # the 32-weight formats' part p: lo holds weights 4p..4p+3 of block b, hi weights 16+4p..
    return dp4a_us(hi, xq[t, 8 * b + 4 + p], dp4a_us(lo, xq[t, 8 * b + p], int32(0)))


@cuda.jit(device=True, inline=True)
def _sym32(i, off, dh, p, b, xd, xs, t):
    # weight = d (q - off): part 0 subtracts off times the block's activation sum
    if p == 0:
        i -= off * (xs[t, 2 * b] + xs[t, 2 * b + 1])
    return half(dh) * float32(i) * xd[t, b]


@cuda.jit(device=True, inline=True)
def _affine32(i, w0, p, b, xd, xs, t):
    # weight = d q + m (w0: d | m << 16): part 0 adds m times the block's activation sum
    v = half(w0) * float32(i)
    if p == 0:
        v += half(w0 >> 16) * float32(xs[t, 2 * b] + xs[t, 2 * b + 1])
    return v * xd[t, b]


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
def _part_q4_0(w, e, r, o, p, b, xq, xd, xs, t):
    # 18 bytes = 9 halves: d, 16 bytes of nibbles (low: weights 0..15, high: 16..31); q - 8.
    q = _u32(w, e, r, o + 1 + 2 * p)
    return _sym32(_dot32(q & 0x0F0F0F0F, (q >> 4) & 0x0F0F0F0F, p, b, xq, t), 8, w[e, r, o], p, b, xd, xs, t)


@cuda.jit(device=True, inline=True)
def _part_q4_1(w, e, r, o, p, b, xq, xd, xs, t):
    # 20 bytes = 5 words: d|m, 16 bytes of nibbles.
    q = w[e, r, o + 1 + p]
    return _affine32(_dot32(q & 0x0F0F0F0F, (q >> 4) & 0x0F0F0F0F, p, b, xq, t), w[e, r, o], p, b, xd, xs, t)


@cuda.jit(device=True, inline=True)
def _part_q5_0(w, e, r, o, p, b, xq, xd, xs, t):
    # 22 bytes = 11 halves: d, qh (32 high bits), 16 bytes of nibbles; q - 16.
    lo, hi = _fifth(_u32(w, e, r, o + 3 + 2 * p), _u32(w, e, r, o + 1), p)
    return _sym32(_dot32(lo, hi, p, b, xq, t), 16, w[e, r, o], p, b, xd, xs, t)


@cuda.jit(device=True, inline=True)
def _part_q5_1(w, e, r, o, p, b, xq, xd, xs, t):
    # 24 bytes = 6 words: d|m, qh, 16 bytes of nibbles.
    lo, hi = _fifth(w[e, r, o + 2 + p], w[e, r, o + 1], p)
    return _affine32(_dot32(lo, hi, p, b, xq, t), w[e, r, o], p, b, xd, xs, t)


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
def _part_iq4_nl(w, e, r, o, p, b, xq, xd, xs, t):
    # 18 bytes = 9 halves: d, 16 bytes of nibbles (low: weights 0..15, high: 16..31), each an
    # index into the 16 levels. Part p (0..3): quant bytes 4p..4p+3.
    i = _dot_nl(_u32(w, e, r, o + 1 + 2 * p), xq[t, 8 * b + p], xq[t, 8 * b + 4 + p], int32(0))
    return half(w[e, r, o]) * float32(i) * xd[t, b]


@cuda.jit(device=True, inline=True)
def _part_iq4_xs(w, e, r, o, p, b, xq, xd, xs, t):
    # 136 bytes = 34 words: d | scales_h << 16, scales_l (4 bytes), 32 words of nibbles. Part p
    # is sub-block p (32 weights, quant words 2+4p..5+4p), scale (6 bits) - 32.
    w0 = w[e, r, o]
    ls = ((w[e, r, o + 1] >> (4 * p)) & 15) | (((w0 >> (16 + 2 * p)) & 3) << 4)
    xa = ld4x(xq, t, b * 64 + 8 * p)
    xb = ld4x(xq, t, b * 64 + 8 * p + 4)
    i = int32(0)
    for k in range(4):
        i = _dot_nl(w[e, r, o + 2 + 4 * p + k], xa[k], xb[k], i)
    return half(w0) * float32((int32(ls) - 32) * i) * xd[t, b]


@cuda.jit(device=True, inline=True)
def _part_mxfp4(w, e, r, o, p, b, xq, xd, xs, t):
    # 17 bytes: the exponent e8 (scale 2**(e8 - 128): the levels are stored doubled), 16 bytes of
    # nibbles as IQ4_NL's. Part p (0..3): quant bytes 4p..4p+3.
    k = o + 1 + 4 * p
    q = uint32(w[e, r, k]) | (uint32(w[e, r, k + 1]) << 8) | (uint32(w[e, r, k + 2]) << 16) \
        | (uint32(w[e, r, k + 3]) << 24)
    i = dp4a_ss(_lut(q & 0x0F0F0F0F, _FP0, _FP1, _FP2, _FP3), xq[t, 8 * b + p], int32(0))
    i = dp4a_ss(_lut((q >> 4) & 0x0F0F0F0F, _FP0, _FP1, _FP2, _FP3), xq[t, 8 * b + 4 + p], i)
    e8 = uint32(w[e, r, o])
    bits = (e8 - 1) << 23 if e8 >= 2 else uint32(0x00200000) << e8  # 2**(e8 - 128), exactly
    return f32_bits(uint32(bits)) * float32(i) * xd[t, b]


# qtype -> ({parts per block: part function} (the first is the default), words per block, word
# dtype, activation block)
_SPECS = {
    QT.Q4_K: ({8: _part_q4_k, 4: _part_q4_k4, 2: _part_q4_k2}, 36, np.uint32, 256),
    QT.Q5_K: ({8: _part_q5_k, 4: _part_q5_k4}, 44, np.uint32, 256),
    QT.Q2_K: ({16: _part_q2_k, 4: _part_q2_k4}, 21, np.uint32, 256),
    QT.Q3_K: ({16: _part_q3_k, 4: _part_q3_k4}, 55, np.uint16, 256),
    QT.Q6_K: ({16: _part_q6_k, 4: _part_q6_k4}, 105, np.uint16, 256),
    QT.Q8_0: ({2: _part_q8_0}, 17, np.uint16, 32),
    QT.Q4_0: ({4: _part_q4_0}, 9, np.uint16, 32),
    QT.Q4_1: ({4: _part_q4_1}, 5, np.uint32, 32),
    QT.Q5_0: ({4: _part_q5_0}, 11, np.uint16, 32),
    QT.Q5_1: ({4: _part_q5_1}, 6, np.uint32, 32),
    QT.IQ4_NL: ({4: _part_iq4_nl}, 9, np.uint16, 32),
    QT.IQ4_XS: ({8: _part_iq4_xs}, 34, np.uint32, 256),
    QT.MXFP4: ({4: _part_mxfp4}, 17, np.uint8, 32),
}
_LAUNCHERS: dict = {}


def supported(qtype) -> bool:
    return QT(int(qtype)) in _SPECS


def spec(qtype):
    """(word dtype, activation block) of a format with an int8 kernel."""
    _, _, dt, qb = _SPECS[QT(int(qtype))]
    return dt, qb


# rows per warp, blocks per lane-step, register cap, prefetch distance and lanes per block (0: the
# format's first part function) of each format's kernel (measured on an H200 with
# bench/gpu.py --tune); formats not listed: 1, 1, 0, 0, 0
TUNE: dict = {
    QT.Q4_K: (4, 1, 0, 0, 4), QT.Q8_0: (2, 2, 0, 0), QT.Q5_K: (4, 1, 0, 0), QT.Q6_K: (4, 1, 0, 0),
    QT.Q2_K: (4, 1, 0, 0), QT.Q3_K: (4, 1, 0, 0), QT.Q4_0: (2, 2, 0, 0), QT.Q4_1: (4, 1, 0, 0),
    QT.Q5_0: (2, 2, 0, 0), QT.Q5_1: (4, 1, 0, 0), QT.IQ4_NL: (4, 1, 0, 0), QT.IQ4_XS: (2, 2, 0, 0),
    QT.MXFP4: (2, 2, 0, 0),
}
# FLASHMOE_Q8_TUNE="Q4_K=1,2,0,2;Q8_0=2,1,0,0" overrides entries (for measuring another GPU)
for _item in filter(None, os.environ.get("FLASHMOE_Q8_TUNE", "").split(";")):
    _name, _, _vals = _item.partition("=")
    TUNE[QT[_name.strip().upper()]] = tuple(int(v) for v in _vals.split(","))
_SMALL = 512  # fewer thread blocks than this: one row per warp (enough warps to fill the GPU)


def launcher(qtype, rpw: int | None = None, unroll: int | None = None, maxreg: int | None = None,
             pf: int | None = None, npart: int | None = None):
    """``launch(w, ids, div, act, out, stream=0, wts=None, kk=0, accumulate=False)`` of a
    format (see the module doc and ``make_kernel``); npart: the lanes per block (one of the
    format's part functions)."""
    qt = QT(int(qtype))
    d = tuple(TUNE.get(qt, ())) + (1, 1, 0, 0, 0)[len(TUNE.get(qt, ())):]
    rpw = d[0] if rpw is None else rpw
    unroll = d[1] if unroll is None else unroll
    maxreg = d[2] if maxreg is None else maxreg
    pf = d[3] if pf is None else pf
    parts, wpb, _, _ = _SPECS[qt]
    npart = (d[4] or next(iter(parts))) if npart is None else npart
    key = (qt, rpw, unroll, maxreg, pf, npart)
    f = _LAUNCHERS.get(key)
    if f is None:
        big = make_kernel(parts[npart], npart, wpb, rpw, unroll, maxreg, False, pf)
        if rpw == 1:
            f = big
        else:
            small = launcher(qt, 1, unroll, 0, pf, npart)

            def f(w, ids, div, act, out, stream=0, wts=None, kk=0, accumulate=False):
                N, R = out.shape
                k = big if (R // (ROWS * rpw)) * N >= _SMALL else small
                k(w, ids, div, act, out, stream, wts, kk, accumulate)
            f.kernel = big.kernel
        _LAUNCHERS[key] = f
    return f
