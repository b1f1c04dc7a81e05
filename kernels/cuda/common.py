"""Shared pieces of the CUDA kernels: half-float decoding and the kernel factory.

Every format module defines one device function ``deq(w, r, o, i)``: weight ``i`` of the block
that starts at byte ``o`` of row ``r`` of the raw tensor bytes ``w`` (uint8 ``[R, RB]``), and
hands it to ``make_format``, which builds the launchers with the CPU modules' names:

    matvec(w, x, out)          w [R, RB] u8, x [C] f32, out [R] f32      (device arrays)
    matmul(w, x, out)          x [T, C] f32, out [T, R] f32
    dequantize_rows(w, ids, out)

One warp computes one output (row, token): its 32 lanes walk the row's weights 32 apart, each
decoding its own weights from the block bytes, and the lanes are summed in shared memory (the
simulator has no warp shuffles).
Weights stay in their block format on the device; nothing is dequantized to memory.
"""
from __future__ import annotations

import math

import numpy as np
from numba import config, cuda, float32, float64, int32
from numba.cuda import libdevice

SIM = bool(config.ENABLE_CUDASIM)  # numba's CUDA simulator: no warp shuffles there
WARP = 32
WARPS_PER_BLOCK = 4  # rows per thread block
THREADS = WARP * WARPS_PER_BLOCK  # a compile-time constant for the shared arrays
WIDE = 256  # threads per output of the few-rows float product

# 2**(e - 25) for the 5-bit exponent e of a half: value = (1024 + mantissa) * 2**(e - 25),
# and subnormals (e == 0) are mantissa * 2**-24 = mantissa * _EXP2[1].
_EXP2 = np.array([2.0 ** (e - 25) for e in range(32)], dtype=np.float32)
_EXP2[31] = np.inf  # inf / nan: never in valid model files


@cuda.jit(device=True, inline=True)
def half_bits(h):
    """float32 value of the IEEE half with bits h (an integer in 0..65535)."""
    e = (h >> 10) & 31
    m = h & 1023
    tab = cuda.const.array_like(_EXP2)
    if e == 0:
        v = float32(m) * tab[1]
    else:
        v = float32(m + 1024) * tab[e]
    if h & 0x8000:
        v = -v
    return v


@cuda.jit(device=True, inline=True)
def f16_at(w, r, o):
    """The half stored little-endian at bytes o, o + 1 of row r."""
    return half_bits(np.int32(w[r, o]) | (np.int32(w[r, o + 1]) << 8))


@cuda.jit(device=True, inline=True)
def u32_at(w, r, o):
    return (np.uint32(w[r, o]) | (np.uint32(w[r, o + 1]) << 8) | (np.uint32(w[r, o + 2]) << 16)
            | (np.uint32(w[r, o + 3]) << 24))


@cuda.jit(device=True, inline=True)
def warp_sum(v, sh):
    """Sum of v over each warp of the thread block (in lane 0), through shared memory ``sh``.

    Every thread of the block must call it (it synchronizes the block).
    """
    tid = cuda.threadIdx.x
    lane = tid % WARP
    sh[tid] = v
    cuda.syncthreads()
    off = WARP // 2
    while off > 0:
        if lane < off:
            sh[tid] += sh[tid + off]
        cuda.syncthreads()
        off //= 2
    return sh[tid]


@cuda.jit(device=True, inline=True)
def warp_reduce(v, op, width=32):
    """Max (op 0) or sum (op 1) of v over each aligned group of ``width`` lanes (a power of two up
    to 32) of a warp, in every lane of it (warp shuffles: not in the simulator). For float32 and
    integer values; float64: warp_reduce_d."""
    off = width // 2
    while off > 0:
        o = cuda.shfl_xor_sync(0xFFFFFFFF, v, off)
        v = max(v, o) if op == 0 else v + o
        off //= 2
    return v


@cuda.jit(device=True, inline=True)
def shfl_xor_d(v, off):
    """``cuda.shfl_xor_sync`` of a float64 over the whole warp, as its two 32-bit halves: numba-cuda's
    own float64 shuffle was measured to give wrong values (an H200, numba-cuda 0.30)."""
    hi = cuda.shfl_xor_sync(0xFFFFFFFF, libdevice.double2hiint(v), off)
    lo = cuda.shfl_xor_sync(0xFFFFFFFF, libdevice.double2loint(v), off)
    return libdevice.hiloint2double(hi, lo)


@cuda.jit(device=True, inline=True)
def warp_reduce_d(v, op, width=32):
    """``warp_reduce`` for float64 values (through ``shfl_xor_d``)."""
    off = width // 2
    while off > 0:
        o = shfl_xor_d(v, off)
        v = max(v, o) if op == 0 else v + o
        off //= 2
    return v


@cuda.jit(device=True, inline=True)
def block_reduce_d(v, sh, op):
    """Max (op 0) or sum (op 1) of the float64 v over the thread block (at most 1024 threads), in
    every thread; sh: a shared float64 array of blockDim.x values. Every thread must call it."""
    tid = cuda.threadIdx.x
    cuda.syncthreads()  # (sh may still be read by an earlier call)
    if SIM:  # no warp shuffles in the simulator
        sh[tid] = v
        cuda.syncthreads()
        if tid == 0:
            r = sh[0]
            for i in range(1, cuda.blockDim.x):
                r = max(r, sh[i]) if op == 0 else r + sh[i]
            sh[0] = r
        cuda.syncthreads()
        return sh[0]
    v = warp_reduce_d(v, op)
    if tid % 32 == 0:
        sh[tid // 32] = v
    cuda.syncthreads()
    nw = (cuda.blockDim.x + 31) // 32
    return warp_reduce_d(sh[tid % 32] if tid % 32 < nw else (-math.inf if op == 0 else 0.0), op)


@cuda.jit(device=True, inline=True)
def last_to_finish(count, i, n, flag):
    """Whether this thread block is the last to finish of the n that count[i] counts, in every
    thread of it. Every thread calls it after thread 0 has written the block's results (flag: a
    shared int32 array of one). The last block sees every block's results, and resets the count
    for the next launch (a recorded graph replays the launch)."""
    if cuda.threadIdx.x == 0:
        cuda.threadfence()  # the block's results visible before the count says so
        last = cuda.atomic.add(count, i, 1) == n - 1
        if last:
            count[i] = 0
        flag[0] = int32(last)
    cuda.syncthreads()
    if flag[0] == 0:
        return False
    cuda.threadfence()
    return True


@cuda.jit(device=True, inline=True)
def sum_squares(x, t, n):
    """This thread's share of the sum of squares of row t of x, for a block of n threads
    (strided by n; four loads in flight), in float64. Sum it over the block with block_reduce_d
    (a float64 shared array)."""
    D = x.shape[1]
    ss = float64(0.0)
    i = cuda.threadIdx.x
    while i + 3 * n < D:
        a0 = float64(x[t, i])
        a1 = float64(x[t, i + n])
        a2 = float64(x[t, i + 2 * n])
        a3 = float64(x[t, i + 3 * n])
        ss += (a0 * a0 + a1 * a1) + (a2 * a2 + a3 * a3)
        i += 4 * n
    while i < D:
        v = float64(x[t, i])
        ss += v * v
        i += n
    return ss


@cuda.jit(device=True, inline=True)
def group_reduce(v, sh, op, G):
    """Max (op 0) or sum (op 1) of v over each aligned group of G threads (a power of two, 2 to
    1024; G <= 32: within a warp), in every thread of the group; sh: a shared float32 array of
    blockDim.x values. Every thread of the block must call it."""
    tid = cuda.threadIdx.x
    if SIM:  # no warp shuffles in the simulator
        cuda.syncthreads()
        sh[tid] = v
        cuda.syncthreads()
        g0 = tid - tid % G
        r = sh[g0]
        for i in range(g0 + 1, g0 + G):
            r = max(r, sh[i]) if op == 0 else r + sh[i]
        return r
    v = warp_reduce(v, op, min(G, 32))
    if G > 32:  # the group's warps meet in shared memory
        cuda.syncthreads()  # (sh may still be read by an earlier call)
        if tid % 32 == 0:
            sh[tid // 32] = v
        cuda.syncthreads()
        w0 = (tid - tid % G) // 32
        v = sh[w0]
        for i in range(w0 + 1, w0 + G // 32):
            v = max(v, sh[i]) if op == 0 else v + sh[i]
    return v


def make_format(deq, block: int, nbytes: int, block_dot=None):
    """matvec / matmul / dequantize_rows launchers for blocks of ``block`` weights in ``nbytes``.

    With ``block_dot(w, r, o, x, xo)`` (the dot product of one whole block with x[xo : xo + block])
    matvec gives each lane whole blocks instead: the scales are decoded once per block and a warp's
    loads cover 32 neighbouring blocks.

    Products are summed in float64 (exact products of float32 weights and activations) and rounded
    once at the store, as the CPU's float products: both devices give the same float32 but at a
    rounding boundary (docs/architecture.md, Numerics).
    """

    @cuda.jit(fastmath=True)
    def _matvec(w, x, out):
        warp = cuda.threadIdx.x // WARP
        lane = cuda.threadIdx.x % WARP
        r = cuda.blockIdx.x * WARPS_PER_BLOCK + warp
        sh = cuda.shared.array(THREADS, float64)
        acc = float64(0.0)
        if r < out.shape[0]:
            for i in range(lane, x.shape[0], WARP):
                b = i // block
                acc += float64(deq(w, r, b * nbytes, i - b * block)) * float64(x[i])
        acc = warp_sum(acc, sh)
        if lane == 0 and r < out.shape[0]:
            out[r] = acc

    @cuda.jit(fastmath=True)
    def _matvec_blocks(w, x, out):
        warp = cuda.threadIdx.x // WARP
        lane = cuda.threadIdx.x % WARP
        r = cuda.blockIdx.x * WARPS_PER_BLOCK + warp
        sh = cuda.shared.array(THREADS, float64)
        acc = float64(0.0)
        if r < out.shape[0]:
            for b in range(lane, x.shape[0] // block, WARP):
                acc += block_dot(w, r, b * nbytes, x, b * block)
        acc = warp_sum(acc, sh)
        if lane == 0 and r < out.shape[0]:
            out[r] = acc

    @cuda.jit
    def _dequant(w, ids, out):
        k = cuda.blockIdx.y
        r = ids[k]
        for i in range(cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x, out.shape[1],
                       cuda.gridDim.x * cuda.blockDim.x):
            b = i // block
            out[k, i] = deq(w, r, b * nbytes, i - b * block)

    @cuda.jit(fastmath=True)
    def _matvec_ids(w, ids, div, x, out):
        warp = cuda.threadIdx.x // WARP
        lane = cuda.threadIdx.x % WARP
        r = cuda.blockIdx.x * WARPS_PER_BLOCK + warp
        n = cuda.blockIdx.y
        sh = cuda.shared.array(THREADS, float64)
        acc = float64(0.0)
        if r < out.shape[1]:
            we = w[ids[n]]
            t = n // div
            for i in range(lane, x.shape[1], WARP):
                b = i // block
                acc += float64(deq(we, r, b * nbytes, i - b * block)) * float64(x[t, i])
        acc = warp_sum(acc, sh)
        if lane == 0 and r < out.shape[1]:
            out[n, r] = acc

    @cuda.jit(fastmath=True)
    def _matvec_ids_wide(w, ids, div, x, out):
        # a thread block per output: for few rows (a router), where a warp per row would leave
        # the GPU idle and each warp walk a long row alone
        r = cuda.blockIdx.x
        n = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        sh = cuda.shared.array(WIDE, float64)
        we = w[ids[n]]
        t = n // div
        C = x.shape[1]
        acc = float64(0.0)
        i = tid
        while i + 3 * WIDE < C:  # four weights per step: their loads in flight together
            for u in range(4):
                j = i + u * WIDE
                b = j // block
                acc += float64(deq(we, r, b * nbytes, j - b * block)) * float64(x[t, j])
            i += 4 * WIDE
        while i < C:
            b = i // block
            acc += float64(deq(we, r, b * nbytes, i - b * block)) * float64(x[t, i])
            i += WIDE
        acc = block_reduce_d(acc, sh, 1)
        if tid == 0:
            out[n, r] = acc

    def matvec_ids(w, ids, div, x, out, stream=0):
        """out[n] = w[ids[n]] @ x[n // div].   w [E, R, RB] u8; ids [N] i32; x [T, C]; out [N, R]."""
        n = (out.shape[1] + WARPS_PER_BLOCK - 1) // WARPS_PER_BLOCK
        if n * out.shape[0] < 256 and x.shape[1] >= 4 * WIDE:
            _matvec_ids_wide[(out.shape[1], out.shape[0]), WIDE, stream](w, ids, div, x, out)
        else:
            _matvec_ids[(n, out.shape[0]), THREADS, stream](w, ids, div, x, out)

    def matvec(w, x, out, stream=0):
        """out[r] = w[r] . x.   w [R, RB] u8, x [C] f32, out [R] f32 (device arrays)."""
        n = (out.shape[0] + WARPS_PER_BLOCK - 1) // WARPS_PER_BLOCK
        (_matvec if block_dot is None else _matvec_blocks)[n, THREADS, stream](w, x, out)

    zeros: dict = {}  # T -> device int32 zeros: every token reads matrix 0

    def matmul(w, x, out, stream=0):
        """out[t, r] = w[r] . x[t].   x [T, C] f32, out [T, R] f32."""
        T = out.shape[0]
        ids = zeros.get(T)
        if ids is None:
            ids = zeros[T] = cuda.to_device(np.zeros(T, np.int32))
        matvec_ids(w.reshape(1, *w.shape), ids, 1, x, out, stream)

    def dequantize_rows(w, ids, out, stream=0):
        """out[k] = row ids[k] of w as floats.   ids [K] int, out [K, C] f32."""
        n = min(max(1, (out.shape[1] + 255) // 256), 64)
        _dequant[(n, out.shape[0]), 256, stream](w, ids, out)

    matvec.ids = matvec_ids  # the exact (float activation) expert-indexed product
    return matvec, matmul, dequantize_rows

