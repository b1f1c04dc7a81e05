"""The int8-activation product for Q4_K with its weights streamed through shared memory.

The plain kernel (``q8.make_kernel``) keeps each load in registers until its data arrives, so a
warp has only a step's blocks in flight and the registers those loads hold cap the warps per
SM. Here each lane hands its loads to the copy engine (``cp.async``: global memory to shared,
no register waits on it) ``STAGES`` steps ahead, and a warp walks its rows as one stream of
steps, so the pipeline stays full across rows too. A lane copies, and later reads, only its own
16 bytes of quants and its block's 16-byte header (d, dmin, scales): no lane reads what another
wrote, so waiting for its own copies (``cp.async.wait_group``) is all the synchronisation.

Warps are persistent: warp g of G computes rows g, g + G, g + 2G ... of the N x R outputs (for
the expert sum, each output's kk experts one after the other), and sums a row's lanes with
shuffles when its last step is done.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda, float32, int32, uint32

from .common import SIM, WARP
from .q8 import _dummy, _kq_sum, _q4k_scale_min, dp4a_us, ld4x

WARPS = 4  # warps per thread block
THREADS = WARPS * WARP
NPART = 8  # lanes per Q4_K block (a lane: 32 weights, a 16-byte quarter... eighth of the block)
STEP = WARP // NPART  # blocks per warp-step
WPB = 36  # words per Q4_K block
SLOT = 8  # words of shared memory per lane and stage: 4 header + 4 quants

if SIM:
    @cuda.jit(device=True)
    def cp16(sm, si, w, e, r, k):
        for i in range(4):
            sm[si + i] = w[e, r, k + i]

    @cuda.jit(device=True)
    def cp_commit():
        return 0

    def _wait(n):
        @cuda.jit(device=True)
        def f():
            return 0
        return f

    @cuda.jit(device=True)
    def lds4(sm, i):
        return sm[i], sm[i + 1], sm[i + 2], sm[i + 3]
else:
    from llvmlite import ir
    from numba import types
    from numba.cuda import cgutils
    from numba.cuda.extending import intrinsic

    def _shared_addr(context, builder, aryty, ary, idx):
        # the 32-bit shared-window address of ary[idx] (ary a shared array)
        a = context.make_array(aryty)(context, builder, ary)
        ptr = cgutils.get_item_pointer(context, builder, aryty, a, [idx], wraparound=False)
        sp = builder.addrspacecast(ptr, ir.PointerType(ptr.type.pointee, 3))
        return builder.ptrtoint(sp, ir.IntType(32))

    @intrinsic
    def cp16(typingctx, sm, si, w, e, r, k):
        """Copy w[e, r, k : k + 4] (16 bytes, 16-aligned) to sm[si : si + 4] in the background."""
        def codegen(context, builder, sig, args):
            i64 = ir.IntType(64)
            dst = _shared_addr(context, builder, sig.args[0], args[0],
                               context.cast(builder, args[1], sig.args[1], types.intp))
            waty = sig.args[2]
            wa = context.make_array(waty)(context, builder, args[2])
            inds = [context.cast(builder, args[3 + n], sig.args[3 + n], types.intp) for n in range(3)]
            src = cgutils.get_item_pointer(context, builder, waty, wa, inds, wraparound=False)
            asm = ir.InlineAsm(ir.FunctionType(ir.IntType(32), [ir.IntType(32), i64]),
                               "cp.async.cg.shared.global [$1], [$2], 16; mov.u32 $0, 0;", "=r,r,l,~{memory}",
                               side_effect=True)
            return builder.call(asm, [dst, builder.ptrtoint(src, i64)])
        return types.int32(sm, si, w, e, r, k), codegen

    @intrinsic
    def cp_commit(typingctx):
        def codegen(context, builder, sig, args):
            asm = ir.InlineAsm(ir.FunctionType(ir.IntType(32), []), "cp.async.commit_group; mov.u32 $0, 0;",
                               "=r,~{memory}", side_effect=True)
            return builder.call(asm, [])
        return types.int32(), codegen

    def _wait(n):
        @intrinsic
        def f(typingctx):
            def codegen(context, builder, sig, args):
                asm = ir.InlineAsm(ir.FunctionType(ir.IntType(32), []),
                                   f"cp.async.wait_group {n}; mov.u32 $0, 0;", "=r,~{{memory}}", side_effect=True)
                return builder.call(asm, [])
            return types.int32(), codegen
        return f

    @intrinsic
    def lds4(typingctx, sm, i):
        """sm[i : i + 4] (16-aligned) in one shared-memory load."""
        def codegen(context, builder, sig, args):
            addr = _shared_addr(context, builder, sig.args[0], args[0],
                                context.cast(builder, args[1], sig.args[1], types.intp))
            i32 = ir.IntType(32)
            sty = ir.LiteralStructType([i32] * 4)
            asm = ir.InlineAsm(ir.FunctionType(sty, [i32]), "ld.shared.v4.u32 {$0, $1, $2, $3}, [$4];",
                               "=r,=r,=r,=r,r,~{memory}", side_effect=True)
            res = builder.call(asm, [addr])
            return context.make_tuple(builder, sig.return_type, [builder.extract_value(res, n) for n in range(4)])
        return types.UniTuple(sm.dtype, 4)(sm, i), codegen


@cuda.jit(device=True, inline=True)
def _q4k_lane(hw, qs, c, h, b, xq, xd, xs, t):
    # the plain kernel's Q4_K part (q8._part_q45_k) on a header and quants already at hand
    sc0, m0 = _q4k_scale_min(hw[1], hw[2], hw[3], 2 * c)
    sc1, m1 = _q4k_scale_min(hw[1], hw[2], hw[3], 2 * c + 1)
    xo = b * 64 + 16 * c + 4 * h
    xa = ld4x(xq, t, xo)
    xb = ld4x(xq, t, xo + 8)
    i0 = int32(0)
    i1 = int32(0)
    for k in range(4):
        i0 = dp4a_us(qs[k] & 0x0F0F0F0F, xa[k], i0)
        i1 = dp4a_us((qs[k] >> 4) & 0x0F0F0F0F, xb[k], i1)
    return _kq_sum(hw[0], sc0, m0, sc1, m1, i0, i1, h, c, b, xd, xs, t)


@functools.lru_cache(maxsize=None)
def make_kernel(STAGES: int, COMBINE: bool = False):
    wait = _wait(STAGES - 1)
    WORDS = STAGES * THREADS * SLOT

    @cuda.jit(fastmath=True)
    def _k(w, ids, div, xq, xd, xs, out, wts, kk, accumulate, G):
        # G: warps in the grid (the stride of a warp's rows)
        tid = cuda.threadIdx.x
        lane = tid % WARP
        g = cuda.blockIdx.x * WARPS + tid // WARP
        N, R = out.shape
        nb = w.shape[2] // WPB
        ns = (nb + STEP - 1) // STEP  # steps per expert row
        KK = kk if COMBINE else 1
        NS = ns * KK  # steps per output row
        V = N * R
        mine = (V - g + G - 1) // G if g < V else 0  # rows of this warp
        total = mine * NS
        if SIM:  # every warp of a block runs its first warp's steps (its reductions meet them)
            g0 = cuda.blockIdx.x * WARPS
            loop = ((V - g0 + G - 1) // G if g0 < V else 0) * NS
        else:
            loop = total
        sm = cuda.shared.array(WORDS, uint32)
        p = lane % NPART
        c = p >> 1
        h = p & 1
        bl = lane // NPART  # the lane's block within a step
        base = tid * SLOT
        # (no divisions in the loop: both sides count their output row n, r, the expert m
        # within it and the step s within the expert's row)
        n0 = g // R
        r0 = g - n0 * R
        in_, ir, im, is_ = n0, r0, 0, 0  # the copy side
        cn, cr, cm, cs = n0, r0, 0, 0  # the compute side
        ct = n0 // div
        acc = float32(0.0)
        for j in range(STAGES - 1 + loop):
            if j < total:  # issue the copies of step j
                b = is_ * STEP + bl
                if b < nb:
                    e = ids[in_ * kk + im] if COMBINE else ids[in_]
                    o = base + (j % STAGES) * (THREADS * SLOT)
                    cp16(sm, o, w, e, ir, b * WPB)
                    cp16(sm, o + 4, w, e, ir, b * WPB + 4 + 8 * c + 4 * h)
                is_ += 1
                if is_ == ns:
                    is_ = 0
                    im += 1
                    if im == KK:
                        im = 0
                        ir += G
                        while ir >= R:
                            ir -= R
                            in_ += 1
            cp_commit()
            i = j - (STAGES - 1)
            if i >= 0:
                wait()
                if i < total:
                    b = cs * STEP + bl
                    if b < nb:
                        o = base + (i % STAGES) * (THREADS * SLOT)
                        t = cn * kk + cm if COMBINE else ct
                        v = _q4k_lane(lds4(sm, o), lds4(sm, o + 4), c, h, b, xq, xd, xs, t)
                        acc += wts[cn * kk + cm] * v if COMBINE else v
                cs += 1
                if cs == ns:
                    cs = 0
                    cm += 1
                if cm == KK:  # the row is done: its lanes' sum
                    cm = 0
                    if SIM:
                        red = cuda.shared.array(THREADS, float32)
                        cuda.syncthreads()
                        red[tid] = acc
                        cuda.syncthreads()
                        a = float32(0.0)
                        for q in range(WARP):
                            a += red[tid - lane + q]
                    else:
                        a = acc
                        a += cuda.shfl_xor_sync(0xFFFFFFFF, a, 16)
                        a += cuda.shfl_xor_sync(0xFFFFFFFF, a, 8)
                        a += cuda.shfl_xor_sync(0xFFFFFFFF, a, 4)
                        a += cuda.shfl_xor_sync(0xFFFFFFFF, a, 2)
                        a += cuda.shfl_xor_sync(0xFFFFFFFF, a, 1)
                    if lane == 0 and i < total:
                        if accumulate or COMBINE:
                            out[cn, cr] += a
                        else:
                            out[cn, cr] = a
                    acc = float32(0.0)
                    cr += G
                    while cr >= R:
                        cr -= R
                        cn += 1
                    ct = cn // div
    return _k


@functools.lru_cache(maxsize=None)
def _sm_count():
    return 2 if SIM else cuda.get_current_device().MULTIPROCESSOR_COUNT


def launcher(STAGES: int, BLOCKS_PER_SM: int = 8):
    """``launch(w, ids, div, act, out, stream=0, wts=None, kk=0, accumulate=False)``, as
    ``q8.launcher``'s, for Q4_K weights (uint32 words)."""
    plain = make_kernel(STAGES, False)

    def launch(w, ids, div, act, out, stream=0, wts=None, kk=0, accumulate=False):
        N, R = out.shape
        k = make_kernel(STAGES, True) if kk else plain
        V = N * R
        blocks = min((V + WARPS - 1) // WARPS, _sm_count() * BLOCKS_PER_SM)
        per = (V + blocks * WARPS - 1) // (blocks * WARPS)  # rows per warp: spread them evenly
        blocks = (V + per * WARPS - 1) // (per * WARPS)
        if wts is None:
            wts = _dummy()
        k[blocks, THREADS, stream](w, ids, div, act.q, act.d, act.s, out, wts, kk, accumulate, blocks * WARPS)

    launch.kernel = plain
    return launch
