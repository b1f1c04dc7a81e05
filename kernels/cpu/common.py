"""Shared building blocks of the CPU kernels: half-precision decoding and 16-lane float vectors.

Why explicit vectors: written as plain Numba loops, a ggml block kernel (an outer loop over
blocks, a 16-step inner loop over nibbles) does not vectorize the way it should. LLVM fully
unrolls the short inner loop first and then vectorizes the *outer* loop across blocks, which
turns every weight load into a gather (measured: ~2.5 GB/s of weight bytes on 2 cores). The
intrinsics below let a kernel say what llama.cpp's C code says with SIMD intrinsics: load 16
bytes of a block, widen them to 16 float lanes, multiply-add them into a vector accumulator that
lives in a register across blocks, and reduce it horizontally once per row.

``F32x16`` is a Numba type whose LLVM representation is ``<16 x float>``; the operations emit
portable LLVM vector IR (no target-specific intrinsics), which LLVM lowers to one AVX-512
register, two AVX2 registers, or four SSE/NEON registers as the host allows. Half-precision
scales are decoded with LLVM's ``half`` type (``fpext``), a single ``vcvtph2ps`` on any x86 CPU
with F16C.

The second half of the file is the int8-activation path (x rounded to 8 bits per 32-block, block
dot products in integers with AVX-512 VNNI / AVX-VNNI), and the prefill GEMM tiles.

Numba's on-disk cache of a kernel is checked against the kernel's own source file only, not
against this one, whose intrinsics are compiled into it: ``_drop_stale_kernel_caches`` below
deletes the cached kernels of every module that imports this file when this file's content
changes (default cache location; with ``NUMBA_CACHE_DIR`` set, clear that directory by hand).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import types
from numba.core.extending import intrinsic, models, register_model

LANES = 16


def _drop_stale_kernel_caches() -> None:
    here = Path(__file__)
    cache = here.parent / "__pycache__"
    if os.environ.get("NUMBA_CACHE_DIR") or not cache.is_dir():
        return
    try:
        stamp = cache / f"common-src-{hashlib.sha1(here.read_bytes()).hexdigest()[:16]}.stamp"
        if stamp.exists():
            return
        for src in here.parent.glob("*.py"):
            if src != here and "from .common import" in src.read_text(encoding="utf-8", errors="replace"):
                for f in [*cache.glob(f"{src.stem}.*.nbi"), *cache.glob(f"{src.stem}.*.nbc")]:
                    f.unlink(missing_ok=True)
        for old in cache.glob("common-src-*.stamp"):
            old.unlink(missing_ok=True)
        stamp.touch()
    except OSError:  # a read-only installation: nothing cached there to go stale
        pass


_drop_stale_kernel_caches()

_F32 = ir.FloatType()
_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_VF32 = ir.VectorType(_F32, LANES)
_VI8 = ir.VectorType(_I8, LANES)
_VI32 = ir.VectorType(_I32, LANES)
_FAST = ("fast",)


class F32x16Type(types.Type):
    """16 float32 lanes held in one SIMD value (an LLVM ``<16 x float>``)."""

    def __init__(self) -> None:
        super().__init__(name="F32x16")


f32x16 = F32x16Type()


@register_model(F32x16Type)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VF32)


_VF64 = ir.VectorType(ir.DoubleType(), LANES)


class F64x16Type(types.Type):
    """16 float64 lanes (an LLVM ``<16 x double>``): the float products' accumulators. Float32
    products are exact in float64, so a sum there is correct to ~1e-16 whatever its order and
    rounds to the same float32 on any device that sums in float64 (docs/architecture.md,
    Numerics)."""

    def __init__(self) -> None:
        super().__init__(name="F64x16")


f64x16 = F64x16Type()


@register_model(F64x16Type)
class _F64x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VF64)


# ---------------------------------------------------------------------------------------------
# Addressing: every load takes a C-contiguous 1-D or 2-D array and element indices; no
# wraparound or bounds checks (callers index inside the array, as the kernels' loops guarantee).


def _elem_ptr(context, builder, aryty, ary, indices):
    arr = context.make_array(aryty)(context, builder, ary)
    if aryty.ndim == 1:
        offset = indices[0]
    else:  # 2-D C-contiguous: row * shape[1] + col, in elements
        ncols = builder.extract_value(arr.shape, 1)
        offset = builder.add(builder.mul(indices[0], ncols), indices[1])
    return builder.gep(arr.data, [offset])


def _check_array(ary, dtype, *idx):
    return (
        isinstance(ary, types.Array)
        and ary.dtype == dtype
        and ary.layout == "C"
        and ary.ndim == len(idx)
        and all(isinstance(i, types.Integer) for i in idx)
    )


def _cast_indices(context, builder, sig_args, args):
    return [context.cast(builder, a, t, types.intp) for a, t in zip(args, sig_args)]


def _load(builder, ptr, llty):
    ptr = builder.bitcast(ptr, llty.as_pointer())
    return builder.load(ptr, align=1)


# ---------------------------------------------------------------------------------------------
# Scalars


@intrinsic
def f16_to_f32(typingctx, bits):
    """The float32 value of IEEE half-precision ``bits`` (an integer holding 16 bits)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        if v.type.width > 16:
            v = builder.trunc(v, _I16)
        elif v.type.width < 16:
            v = builder.zext(v, _I16)
        return builder.fpext(builder.bitcast(v, ir.HalfType()), _F32)

    return types.float32(bits), codegen


def _load_f16_codegen(context, builder, sig, args):
    aryty = sig.args[0]
    idx = _cast_indices(context, builder, sig.args[1:], args[1:])
    h = _load(builder, _elem_ptr(context, builder, aryty, args[0], idx), ir.HalfType())
    return builder.fpext(h, _F32)


@intrinsic
def load_f16(typingctx, w, r, o):
    """The half-precision number stored in bytes ``w[r, o], w[r, o + 1]`` (uint8), as f32."""
    if not _check_array(w, types.uint8, r, o):
        return None
    return types.float32(w, r, o), _load_f16_codegen


# ---------------------------------------------------------------------------------------------
# Vectors


@intrinsic
def vzero(typingctx):
    """16 lanes of 0.0."""

    def codegen(context, builder, sig, args):
        return ir.Constant(_VF32, None)

    return f32x16(), codegen


@intrinsic
def vsplat(typingctx, s):
    """16 lanes of the float32 scalar ``s``."""
    if not isinstance(s, types.Float):
        return None

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.float32)
        vec = builder.insert_element(ir.Constant(_VF32, ir.Undefined), v, _I32(0))
        return builder.shuffle_vector(vec, vec, ir.Constant(_VI32, [0] * LANES))

    return f32x16(s), codegen


def _vload_codegen(context, builder, sig, args):
    idx = _cast_indices(context, builder, sig.args[1:], args[1:])
    return _load(builder, _elem_ptr(context, builder, sig.args[0], args[0], idx), _VF32)


@intrinsic
def vload(typingctx, a, i):
    """``a[i : i + 16]`` of a 1-D float32 array, as a vector."""
    if not _check_array(a, types.float32, i):
        return None
    return f32x16(a, i), _vload_codegen


@intrinsic
def vload2(typingctx, a, t, i):
    """``a[t, i : i + 16]`` of a 2-D float32 array, as a vector."""
    if not _check_array(a, types.float32, t, i):
        return None
    return f32x16(a, t, i), _vload_codegen


@intrinsic
def vstore(typingctx, v, a, i):
    """Store vector ``v`` into ``a[i : i + 16]`` of a 1-D float32 array."""
    if v != f32x16 or not _check_array(a, types.float32, i):
        return None

    def codegen(context, builder, sig, args):
        idx = _cast_indices(context, builder, sig.args[2:], args[2:])
        ptr = _elem_ptr(context, builder, sig.args[1], args[1], idx)
        builder.store(args[0], builder.bitcast(ptr, _VF32.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.none(v, a, i), codegen


@intrinsic
def vstore2(typingctx, v, a, t, i):
    """Store vector ``v`` into ``a[t, i : i + 16]`` of a 2-D float32 array."""
    if v != f32x16 or not _check_array(a, types.float32, t, i):
        return None

    def codegen(context, builder, sig, args):
        idx = _cast_indices(context, builder, sig.args[2:], args[2:])
        ptr = _elem_ptr(context, builder, sig.args[1], args[1], idx)
        builder.store(args[0], builder.bitcast(ptr, _VF32.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.none(v, a, t, i), codegen


def _binop(name):
    def impl(typingctx, a, b):
        if a != f32x16 or b != f32x16:
            return None

        def codegen(context, builder, sig, args):
            return getattr(builder, name)(args[0], args[1], flags=_FAST)

        return f32x16(a, b), codegen

    return intrinsic(impl)


vadd = _binop("fadd")
vsub = _binop("fsub")
vmul = _binop("fmul")


@intrinsic
def vfma(typingctx, a, b, c):
    """``a * b + c`` lane by lane (fused where the CPU can)."""
    if a != f32x16 or b != f32x16 or c != f32x16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(builder.fmul(args[0], args[1], flags=_FAST), args[2], flags=_FAST)

    return f32x16(a, b, c), codegen


def _tree_sum(builder, vec, n):
    """The sum of the n lanes of a float vector: halves, quarters, ... (what a reassociating
    reduce lowers to anyway)."""
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
        hi = builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(_I32, n), list(range(n, 2 * n))))
        vec = builder.fadd(lo, hi, flags=_FAST)
    return builder.extract_element(vec, _I32(0))


def _lane_type(v):
    """float32 for an F32x16, float64 for an F64x16, else None."""
    return types.float32 if v == f32x16 else (types.float64 if v == f64x16 else None)


@intrinsic
def vsum(typingctx, v):
    """The sum of the 16 lanes (a float32 scalar; float64 for an F64x16)."""
    ty = _lane_type(v)
    if ty is None:
        return None

    def codegen(context, builder, sig, args):
        return _tree_sum(builder, args[0], LANES)

    return ty(v), codegen


@intrinsic
def dzero(typingctx):
    """16 float64 lanes of 0.0."""

    def codegen(context, builder, sig, args):
        return ir.Constant(_VF64, None)

    return f64x16(), codegen


@intrinsic
def dfma(typingctx, a, b, c):
    """``a * b + c`` lane by lane with a, b float32 (F32x16) and c float64 (F64x16): the product is
    exact in float64."""
    if a != f32x16 or b != f32x16 or c != f64x16:
        return None

    def codegen(context, builder, sig, args):
        p = builder.fmul(builder.fpext(args[0], _VF64), builder.fpext(args[1], _VF64), flags=_FAST)
        return builder.fadd(p, args[2], flags=_FAST)

    return f64x16(a, b, c), codegen


@intrinsic
def vfma_rn(typingctx, a, b, c):
    """``a * b + c`` lane by lane, fused (one rounding: llvm.fma), as the GPU's ``fma``: the
    weights a float product reads (q * d + m) are the same float32 numbers on both devices."""
    if a != f32x16 or b != f32x16 or c != f32x16:
        return None

    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.fma.v16f32", _VF32, list(args))

    return f32x16(a, b, c), codegen


@intrinsic
def vget(typingctx, v, k):
    """Lane ``k`` of the vector (float32; float64 for an F64x16)."""
    ty = _lane_type(v)
    if ty is None or not isinstance(k, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        k = builder.trunc(context.cast(builder, args[1], sig.args[1], types.int64), _I32)
        return builder.extract_element(args[0], k)

    return ty(v, k), codegen


# ---------------------------------------------------------------------------------------------
# Block unpacking: 16 bytes of quants -> 16 float lanes


def _load_bytes(context, builder, sig, args):
    idx = _cast_indices(context, builder, sig.args[1:], args[1:])
    return _load(builder, _elem_ptr(context, builder, sig.args[0], args[0], idx), _VI8)


@intrinsic
def nib_lo(typingctx, w, r, o):
    """Low nibbles of bytes ``w[idx : idx + 16]`` (uint8 array) as 16 floats in 0..15."""
    if not _check_array(w, types.uint8, r, o):
        return None

    def codegen(context, builder, sig, args):
        q = builder.and_(_load_bytes(context, builder, sig, args), ir.Constant(_VI8, [15] * LANES))
        return builder.uitofp(q, _VF32)

    return f32x16(w, r, o), codegen


@intrinsic
def nib_hi(typingctx, w, r, o):
    """High nibbles of bytes ``w[idx : idx + 16]`` (uint8 array) as 16 floats in 0..15."""
    if not _check_array(w, types.uint8, r, o):
        return None

    def codegen(context, builder, sig, args):
        q = builder.lshr(_load_bytes(context, builder, sig, args), ir.Constant(_VI8, [4] * LANES))
        return builder.uitofp(q, _VF32)

    return f32x16(w, r, o), codegen


@intrinsic
def int8s(typingctx, w, r, o):
    """Bytes ``w[idx : idx + 16]`` (uint8 array) read as signed int8, as 16 floats."""
    if not _check_array(w, types.uint8, r, o):
        return None

    def codegen(context, builder, sig, args):
        return builder.sitofp(_load_bytes(context, builder, sig, args), _VF32)

    return f32x16(w, r, o), codegen


def _nib5_codegen(high: bool):
    def codegen(context, builder, sig, args):
        # args: qh (integer holding the 32 fifth bits), w, r, o
        inner_sig = sig.return_type(*sig.args[1:])
        q = _load_bytes(context, builder, inner_sig, args[1:])
        if high:
            q = builder.lshr(q, ir.Constant(_VI8, [4] * LANES))
        else:
            q = builder.and_(q, ir.Constant(_VI8, [15] * LANES))
        qh = context.cast(builder, args[0], sig.args[0], types.uint32)
        if high:
            qh = builder.lshr(qh, _I32(16))
        # Bit j of the 16 bits selects lane j: on AVX-512 a mask register and one masked OR.
        mask = builder.bitcast(builder.trunc(qh, _I16), ir.VectorType(ir.IntType(1), LANES))
        q = builder.select(mask, builder.or_(q, ir.Constant(_VI8, [16] * LANES)), q)
        return builder.uitofp(q, _VF32)

    return codegen


@intrinsic
def nib5_lo(typingctx, qh, w, r, o):
    """Elements 0..15 of a 5-bit block: low nibbles of ``w[idx : idx + 16]`` plus bit j of
    ``qh`` as the fifth bit, as 16 floats in 0..31."""
    if not isinstance(qh, types.Integer) or not _check_array(w, types.uint8, r, o):
        return None
    return f32x16(qh, w, r, o), _nib5_codegen(False)


@intrinsic
def nib5_hi(typingctx, qh, w, r, o):
    """Elements 16..31 of a 5-bit block: high nibbles plus bit 16 + j of ``qh``."""
    if not isinstance(qh, types.Integer) or not _check_array(w, types.uint8, r, o):
        return None
    return f32x16(qh, w, r, o), _nib5_codegen(True)


@intrinsic
def f32s(typingctx, w, r, o):
    """16 float32 stored in bytes ``w[r, o : o + 64]``."""
    if not _check_array(w, types.uint8, r, o):
        return None

    def codegen(context, builder, sig, args):
        idx = _cast_indices(context, builder, sig.args[1:], args[1:])
        return _load(builder, _elem_ptr(context, builder, sig.args[0], args[0], idx), _VF32)

    return f32x16(w, r, o), codegen


@intrinsic
def f16s(typingctx, w, r, o):
    """16 half-precision numbers stored in bytes ``w[r, o : o + 32]``, as floats."""
    if not _check_array(w, types.uint8, r, o):
        return None

    def codegen(context, builder, sig, args):
        idx = _cast_indices(context, builder, sig.args[1:], args[1:])
        ptr = _elem_ptr(context, builder, sig.args[0], args[0], idx)
        return builder.fpext(_load(builder, ptr, ir.VectorType(ir.HalfType(), LANES)), _VF32)

    return f32x16(w, r, o), codegen


@intrinsic
def bf16s(typingctx, w, r, o):
    """16 bfloat16 numbers stored in bytes ``w[r, o : o + 32]``, as floats (exact)."""
    if not _check_array(w, types.uint8, r, o):
        return None

    def codegen(context, builder, sig, args):
        idx = _cast_indices(context, builder, sig.args[1:], args[1:])
        ptr = _elem_ptr(context, builder, sig.args[0], args[0], idx)
        v = builder.zext(_load(builder, ptr, ir.VectorType(_I16, LANES)), _VI32)
        return builder.bitcast(builder.shl(v, ir.Constant(_VI32, [16] * LANES)), _VF32)

    return f32x16(w, r, o), codegen


@intrinsic
def load_f32(typingctx, w, r, o):
    """The float32 stored in bytes ``w[r, o : o + 4]``."""
    if not _check_array(w, types.uint8, r, o):
        return None

    def codegen(context, builder, sig, args):
        idx = _cast_indices(context, builder, sig.args[1:], args[1:])
        return _load(builder, _elem_ptr(context, builder, sig.args[0], args[0], idx), _F32)

    return types.float32(w, r, o), codegen


@intrinsic
def load_bf16(typingctx, w, r, o):
    """The bfloat16 stored in bytes ``w[r, o : o + 2]``, as float32."""
    if not _check_array(w, types.uint8, r, o):
        return None

    def codegen(context, builder, sig, args):
        idx = _cast_indices(context, builder, sig.args[1:], args[1:])
        v = builder.zext(_load(builder, _elem_ptr(context, builder, sig.args[0], args[0], idx), _I16), _I32)
        return builder.bitcast(builder.shl(v, _I32(16)), _F32)

    return types.float32(w, r, o), codegen


@intrinsic
def prefetch(typingctx, w, r, o):
    """Hint the CPU to fetch the cache line holding w[r, o] (never faults, even out of bounds).

    The int8 kernels run faster than one core's share of memory bandwidth; fetching the rows a
    few groups ahead keeps more reads in flight than the hardware prefetcher does on its own
    (measured +30-40% per core on matrices larger than the last-level cache).
    """
    if not _check_array(w, types.uint8, r, o):
        return None

    def codegen(context, builder, sig, args):
        idx = _cast_indices(context, builder, sig.args[1:], args[1:])
        ptr = builder.bitcast(_elem_ptr(context, builder, sig.args[0], args[0], idx), _I8.as_pointer())
        # llvm.prefetch(ptr, rw=0 read, locality=2, cache=1 data)
        _call(builder, "llvm.prefetch.p0", ir.VoidType(), [ptr, _I32(0), _I32(2), _I32(1)])
        return context.get_dummy_value()

    return types.none(w, r, o), codegen


@intrinsic
def load_u32(typingctx, w, r, o):
    """The little-endian uint32 stored in bytes ``w[idx : idx + 4]`` (uint8 array)."""
    if not _check_array(w, types.uint8, r, o):
        return None

    def codegen(context, builder, sig, args):
        idx = _cast_indices(context, builder, sig.args[1:], args[1:])
        return _load(builder, _elem_ptr(context, builder, sig.args[0], args[0], idx), _I32)

    return types.uint32(w, r, o), codegen


# ---------------------------------------------------------------------------------------------
# Prefill: out[t, r0 + i] = a[i] . x[t] for a tile of 4 dequantized rows (a small float GEMM)


@njit(fastmath=True, cache=True)
def _tail_dot(a, i, x, t, c0):
    # Columns past the last multiple of 16 (only float formats have such rows), in float64.
    s = np.float64(0.0)
    for c in range(c0, x.shape[1]):
        s += np.float64(a[i, c]) * np.float64(x[t, c])
    return s


@njit(fastmath=True, cache=True)
def gemm_rows4(a, nr, x, out, r0, t0):
    """``out[t, r0 + i] = a[i] . x[t]`` for i < nr (<= 4) and tokens t >= t0.

    a [4, C] f32 (rows nr..3 are ignored), x [T, C] f32, out [T, R] f32. The products are summed
    in float64 (exact products; the float32 result is the rounding of a sum correct to ~1e-16,
    whatever its order) and rounded once at the store. Register tile of 4 rows x 2 tokens:
    8 float64 vector accumulators, one horizontal sum per output: the kernel for a few tokens
    (``gemm_xt`` takes blocks of 32).
    """
    T = x.shape[0]
    C = x.shape[1]
    c16 = C - C % LANES
    t = t0
    while t + 2 <= T:
        c00 = dzero(); c01 = dzero(); c10 = dzero(); c11 = dzero()  # noqa: E702 (row, token)
        c20 = dzero(); c21 = dzero(); c30 = dzero(); c31 = dzero()  # noqa: E702
        for c in range(0, c16, LANES):
            a0 = vload2(a, 0, c); a1 = vload2(a, 1, c); a2 = vload2(a, 2, c); a3 = vload2(a, 3, c)  # noqa: E702
            xv = vload2(x, t, c)
            c00 = dfma(a0, xv, c00); c10 = dfma(a1, xv, c10)  # noqa: E702
            c20 = dfma(a2, xv, c20); c30 = dfma(a3, xv, c30)  # noqa: E702
            xv = vload2(x, t + 1, c)
            c01 = dfma(a0, xv, c01); c11 = dfma(a1, xv, c11)  # noqa: E702
            c21 = dfma(a2, xv, c21); c31 = dfma(a3, xv, c31)  # noqa: E702
        _store4(out, t, r0, nr, vsum(c00), vsum(c10), vsum(c20), vsum(c30), a, x, c16)
        _store4(out, t + 1, r0, nr, vsum(c01), vsum(c11), vsum(c21), vsum(c31), a, x, c16)
        t += 2
    while t < T:
        c00 = dzero(); c10 = dzero(); c20 = dzero(); c30 = dzero()  # noqa: E702
        for c in range(0, c16, LANES):
            xv = vload2(x, t, c)
            c00 = dfma(vload2(a, 0, c), xv, c00)
            c10 = dfma(vload2(a, 1, c), xv, c10)
            c20 = dfma(vload2(a, 2, c), xv, c20)
            c30 = dfma(vload2(a, 3, c), xv, c30)
        _store4(out, t, r0, nr, vsum(c00), vsum(c10), vsum(c20), vsum(c30), a, x, c16)
        t += 1


TOKENS = 32  # tokens per block of gemm_xt


@njit(fastmath=True, cache=True)
def transpose_x(x):
    """x [T, C] -> xt [C, T'] holding the first T' = T - T % 32 tokens, token-contiguous."""
    T, C = x.shape
    tt = T - T % TOKENS
    xt = np.empty((C, tt), np.float32)
    for c in range(C):
        for t in range(tt):
            xt[c, t] = x[t, c]
    return xt


@njit(fastmath=True, cache=True)
def gemm_xt(a, nr, xt, out, r0):
    """``out[t, r0 + i] = a[i] . x[t]`` for i < nr (<= 4), t < xt.shape[1] (a multiple of 32).

    a [4, C] f32, xt [C, T'] f32 (x transposed, see ``transpose_x``), out [T, R] f32.
    Vectors run over 16 tokens, so no horizontal sums: per column c, two loads of xt[c] serve
    four rows, whose weights a[i, c] are broadcast (4 rows x 32 tokens = 8 float64
    accumulators; see ``gemm_rows4`` for why float64).
    """
    C = xt.shape[0]
    for t in range(0, xt.shape[1], TOKENS):
        c00 = dzero(); c01 = dzero(); c10 = dzero(); c11 = dzero()  # noqa: E702 (row, token half)
        c20 = dzero(); c21 = dzero(); c30 = dzero(); c31 = dzero()  # noqa: E702
        for c in range(C):
            x0 = vload2(xt, c, t)
            x1 = vload2(xt, c, t + 16)
            s = vsplat(a[0, c])
            c00 = dfma(s, x0, c00); c01 = dfma(s, x1, c01)  # noqa: E702
            s = vsplat(a[1, c])
            c10 = dfma(s, x0, c10); c11 = dfma(s, x1, c11)  # noqa: E702
            s = vsplat(a[2, c])
            c20 = dfma(s, x0, c20); c21 = dfma(s, x1, c21)  # noqa: E702
            s = vsplat(a[3, c])
            c30 = dfma(s, x0, c30); c31 = dfma(s, x1, c31)  # noqa: E702
        _store_col(out, t, r0, c00, c01)
        if nr > 1:
            _store_col(out, t, r0 + 1, c10, c11)
        if nr > 2:
            _store_col(out, t, r0 + 2, c20, c21)
        if nr > 3:
            _store_col(out, t, r0 + 3, c30, c31)


@njit(fastmath=True, cache=True, inline="always")
def _store_col(out, t, r, v0, v1):
    for k in range(LANES):
        out[t + k, r] = vget(v0, k)
        out[t + 16 + k, r] = vget(v1, k)


@njit(fastmath=True, cache=True, inline="always")
def _store4(out, t, r0, nr, s0, s1, s2, s3, a, x, c16):
    # s0..s3: float64 sums, rounded to float32 by the stores
    tail = c16 < x.shape[1]
    if tail:
        s0 += _tail_dot(a, 0, x, t, c16)
        s1 += _tail_dot(a, 1, x, t, c16)
        s2 += _tail_dot(a, 2, x, t, c16)
        s3 += _tail_dot(a, 3, x, t, c16)
    out[t, r0] = s0
    if nr > 1:
        out[t, r0 + 1] = s1
    if nr > 2:
        out[t, r0 + 2] = s2
    if nr > 3:
        out[t, r0 + 3] = s3


# ---------------------------------------------------------------------------------------------
# int8 activations (llama.cpp's Q8_0 / Q8_1 idea) and integer block dot products
#
# x is quantized per 32-block: xd = max|x| / 127, xq = round-half-even(x * (1 / xd)) (int8),
# xsum = sum(xq) (exact, int32). A weight block's integer dot product with xq is exact; it is
# scaled once by (weight scale * xd). Offsets are exact integer corrections (Q4_0: -8 * xsum,
# Q5_0: -16 * xsum, Q8_0: -128 * xsum for its +128 shift) or, for a float offset m, m * xd * xsum.
# One AVX-512 VNNI instruction (vpdpbusd, u8 x s8 -> int32) does 64 multiply-adds.


def _host_features() -> dict:
    try:
        import llvmlite.binding as llvm

        return dict(llvm.get_host_cpu_features())
    except Exception:  # pragma: no cover - no feature query on this host
        return {}


_FEATS = _host_features()
#: The int8 kernels need VNNI on 128-bit vectors (AVX-512 VNNI + VL, or AVX-VNNI).
HAS_VNNI = bool(
    (_FEATS.get("avx512vnni") and _FEATS.get("avx512vl")) or _FEATS.get("avxvnni")
) and not os.environ.get("FLASHMOE_FLOAT_KERNELS")

_F64 = ir.DoubleType()
_V4F32 = ir.VectorType(_F32, 4)
_V4F64 = ir.VectorType(_F64, 4)
_V4I32 = ir.VectorType(_I32, 4)
_V32F32 = ir.VectorType(_F32, 32)
_V32I8 = ir.VectorType(_I8, 32)


class F64x4Type(types.Type):
    """4 float64 lanes (an LLVM ``<4 x double>``): the int8 kernels' per-row accumulator. Float64
    so that a row's sum is exact but for ~1e-16 of rounding, whatever its order (see
    ``docs/architecture.md``, Numerics): block terms d * dx * isum are exact in float64."""

    def __init__(self) -> None:
        super().__init__(name="F64x4")


class I32x4Type(types.Type):
    """4 int32 lanes (an LLVM ``<4 x i32>``): partial integer dot products of one block."""

    def __init__(self) -> None:
        super().__init__(name="I32x4")


f64x4 = F64x4Type()
i32x4 = I32x4Type()


@register_model(F64x4Type)
class _F64x4Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V4F64)


@register_model(I32x4Type)
class _I32x4Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V4I32)


def _call(builder, name, ret, args):
    fn = builder.module.globals.get(name)
    if fn is None:
        fn = ir.Function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name=name)
    return builder.call(fn, args)


def _vnni(builder, acc, u8, s8):
    """acc[i] += sum_{k<4} u8[4i + k] * s8[4i + k]   (vpdpbusd on 16 bytes)."""
    return _call(builder, "llvm.x86.avx512.vpdpbusd.128", _V4I32, [acc, u8, s8])


@intrinsic
def quantize_x32(typingctx, x, xo, xq):
    """Quantize x[xo : xo + 32] into xq[xo : xo + 32] (int8); return (xd, sum of the 32 q)."""
    if not (_check_array(x, types.float32, xo) and _check_array(xq, types.int8, xo)):
        return None
    ret = types.Tuple((types.float32, types.int32))

    def codegen(context, builder, sig, args):
        (i,) = _cast_indices(context, builder, [sig.args[1]], [args[1]])
        v = _load(builder, _elem_ptr(context, builder, sig.args[0], args[0], [i]), _V32F32)
        a = _call(builder, "llvm.fabs.v32f32", _V32F32, [v])
        amax = _call(builder, "llvm.vector.reduce.fmax.v32f32", _F32, [a])
        # d = amax / 127 and q = rint(x * (127 / amax)), each division correctly rounded to float32
        # (as kq_common.quantize_q8 and the GPU compute them). Divided in float64 and rounded once:
        # inlined into a fast-math caller, a float32 division by a constant was compiled as a
        # product with its reciprocal (d one unit in the last place off in ~5% of blocks); in
        # float64 such a rewrite is ~1e-16 off, far below a float32 quotient's distance from a
        # rounding boundary, so the rounded result is the correctly rounded one either way.
        a64 = builder.fpext(amax, _F64)
        d = builder.fptrunc(builder.fdiv(a64, ir.Constant(_F64, 127.0)), _F32)
        nonzero = builder.fcmp_ordered(">", amax, _F32(0.0))
        inv = builder.select(nonzero, builder.fptrunc(builder.fdiv(ir.Constant(_F64, 127.0), a64), _F32), _F32(0.0))
        iv = builder.insert_element(ir.Constant(_V32F32, ir.Undefined), inv, _I32(0))
        iv = builder.shuffle_vector(iv, iv, ir.Constant(ir.VectorType(_I32, 32), [0] * 32))
        q = _call(builder, "llvm.rint.v32f32", _V32F32, [builder.fmul(v, iv)])
        q = builder.fptosi(q, ir.VectorType(_I32, 32))
        s = _call(builder, "llvm.vector.reduce.add.v32i32", _I32, [q])
        dst = _elem_ptr(context, builder, sig.args[2], args[2], [i])
        builder.store(builder.trunc(q, _V32I8), builder.bitcast(dst, _V32I8.as_pointer()), align=1)
        return context.make_tuple(builder, ret, [d, s])

    return ret(x, xo, xq), codegen


@intrinsic
def vzero4(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_V4F64, None)

    return f64x4(), codegen


@intrinsic
def vsum4(typingctx, v):
    """The sum of the 4 lanes (float64)."""
    if v != f64x4:
        return None

    def codegen(context, builder, sig, args):
        return _tree_sum(builder, args[0], 4)

    return types.float64(v), codegen


@intrinsic
def iscale_add(typingctx, p, s, acc):
    """acc + float(p) * s: a block's integer partial sums p (I32x4) scaled by s (float64: pass
    d * dx computed in float64, where it is exact)."""
    if p != i32x4 or acc != f64x4 or not isinstance(s, types.Float):
        return None

    def codegen(context, builder, sig, args):
        s = context.cast(builder, args[1], sig.args[1], types.float64)
        sv = builder.insert_element(ir.Constant(_V4F64, ir.Undefined), s, _I32(0))
        sv = builder.shuffle_vector(sv, sv, ir.Constant(_V4I32, [0] * 4))
        f = builder.sitofp(args[0], _V4F64)
        return builder.fadd(builder.fmul(f, sv, flags=_FAST), args[2], flags=_FAST)

    return f64x4(p, s, acc), codegen


def _idot_args(context, builder, sig, args, wpos):
    """(16 weight bytes at w[r, o], x0 = xq[xo : xo + 16], x1 = xq[xo + 16 : xo + 32], init)."""
    w, r, o, xq, xo, init = args[wpos:wpos + 6]
    wt, rt, ot, xqt, xot, initt = sig.args[wpos:wpos + 6]
    ri, oi = _cast_indices(context, builder, [rt, ot], [r, o])
    q = _load(builder, _elem_ptr(context, builder, wt, w, [ri, oi]), _VI8)
    (xi,) = _cast_indices(context, builder, [xot], [xo])
    xp = _elem_ptr(context, builder, xqt, xq, [xi])
    x0 = _load(builder, xp, _VI8)
    x1 = _load(builder, builder.gep(xp, [ir.IntType(64)(16)]), _VI8)
    c = context.cast(builder, init, initt, types.int32)
    acc = builder.insert_element(ir.Constant(_V4I32, None), c, _I32(0))
    return q, x0, x1, acc


def _idot_typer(w, r, o, xq, xo, init):
    return (_check_array(w, types.uint8, r, o) and _check_array(xq, types.int8, xo)
            and isinstance(init, types.Integer))


@intrinsic
def idot_nib(typingctx, w, r, o, xq, xo, init):
    """Integer dot product of the 32 nibbles at w[r, o : o + 16] (low nibbles = elements 0..15,
    high = 16..31) with xq[xo : xo + 32], plus ``init``; as 4 partial sums (I32x4)."""
    if not _idot_typer(w, r, o, xq, xo, init):
        return None

    def codegen(context, builder, sig, args):
        q, x0, x1, acc = _idot_args(context, builder, sig, args, 0)
        lo = builder.and_(q, ir.Constant(_VI8, [15] * LANES))
        hi = builder.lshr(q, ir.Constant(_VI8, [4] * LANES))
        return _vnni(builder, _vnni(builder, acc, lo, x0), hi, x1)

    return i32x4(w, r, o, xq, xo, init), codegen


@intrinsic
def idot_nib5(typingctx, qh, w, r, o, xq, xo, init):
    """As ``idot_nib`` for 5-bit quants: bit j of ``qh`` is the fifth bit of element j."""
    if not (isinstance(qh, types.Integer) and _idot_typer(w, r, o, xq, xo, init)):
        return None

    def codegen(context, builder, sig, args):
        q, x0, x1, acc = _idot_args(context, builder, sig, args, 1)
        qh = context.cast(builder, args[0], sig.args[0], types.uint32)
        mask_t = ir.VectorType(ir.IntType(1), LANES)
        m0 = builder.bitcast(builder.trunc(qh, _I16), mask_t)
        m1 = builder.bitcast(builder.trunc(builder.lshr(qh, _I32(16)), _I16), mask_t)
        sixteen = ir.Constant(_VI8, [16] * LANES)
        lo = builder.and_(q, ir.Constant(_VI8, [15] * LANES))
        hi = builder.lshr(q, ir.Constant(_VI8, [4] * LANES))
        lo = builder.select(m0, builder.or_(lo, sixteen), lo)
        hi = builder.select(m1, builder.or_(hi, sixteen), hi)
        return _vnni(builder, _vnni(builder, acc, lo, x0), hi, x1)

    return i32x4(qh, w, r, o, xq, xo, init), codegen


@intrinsic
def idot_s8(typingctx, w, r, o, xq, xo, init):
    """Integer dot product of the 32 int8 at w[r, o : o + 32] with xq[xo : xo + 32], computed as
    (w + 128) . xq (VNNI multiplies unsigned by signed bytes): pass init = -128 * sum(xq)."""
    if not _idot_typer(w, r, o, xq, xo, init):
        return None

    def codegen(context, builder, sig, args):
        q0, x0, x1, acc = _idot_args(context, builder, sig, args, 0)
        ri, oi = _cast_indices(context, builder, sig.args[1:3], args[1:3])
        oi = builder.add(oi, ir.IntType(64)(16))
        q1 = _load(builder, _elem_ptr(context, builder, sig.args[0], args[0], [ri, oi]), _VI8)
        flip = ir.Constant(_VI8, [0x80] * LANES)
        acc = _vnni(builder, acc, builder.xor(q0, flip), x0)
        return _vnni(builder, acc, builder.xor(q1, flip), x1)

    return i32x4(w, r, o, xq, xo, init), codegen


@njit(fastmath=True, cache=True)
def quantize_x(x, xq, xd, xsum):
    """x [C] f32 -> xq [C] i8, xd [C/32] f32, xsum [C/32] i32 (see the section comment)."""
    for b in range(x.shape[0] // 32):
        d, s = quantize_x32(x, b * 32, xq)
        xd[b] = d
        xsum[b] = s


# ---------------------------------------------------------------------------------------------
# int8 activations, two rows at a time: the 4- and 5-bit formats
#
# One block of rows r and r + 1 shares the same 32 activations: the two rows' 16 quant bytes go
# into one 256-bit register (x repeated in both halves), so the nibble unpacking, two vpdpbusd,
# the int->float conversion and the scale multiply-add each serve two rows; both rows' f16 scales
# (and minima) are converted by one instruction. ~6 vector operations per row and block instead
# of ~11 for one row at a time.

_V8F64 = ir.VectorType(_F64, 8)
_V8I32 = ir.VectorType(_I32, 8)


class F64x8Type(types.Type):
    """8 float64 lanes (``<8 x double>``): lanes 0..3 belong to one row, 4..7 to the next."""

    def __init__(self) -> None:
        super().__init__(name="F64x8")


f64x8 = F64x8Type()


@register_model(F64x8Type)
class _F64x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V8F64)


@intrinsic
def vzero8(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_V8F64, None)

    return f64x8(), codegen


@intrinsic
def vsum8_halves(typingctx, v):
    """(sum of lanes 0..3, sum of lanes 4..7)."""
    if v != f64x8:
        return None
    ret = types.UniTuple(types.float64, 2)

    def codegen(context, builder, sig, args):
        v = args[0]
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 4), [0, 1, 4, 5]))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 4), [2, 3, 6, 7]))
        p = builder.fadd(lo, hi, flags=_FAST)  # [r0 a, r0 b, r1 a, r1 b]
        q = builder.fadd(builder.shuffle_vector(p, p, ir.Constant(ir.VectorType(_I32, 2), [0, 2])),
                         builder.shuffle_vector(p, p, ir.Constant(ir.VectorType(_I32, 2), [1, 3])), flags=_FAST)
        return context.make_tuple(builder, ret, [builder.extract_element(q, _I32(0)),
                                                 builder.extract_element(q, _I32(1))])

    return ret(v), codegen


@intrinsic
def vlane4(typingctx, v, k):
    """Lane ``k`` (a constant or variable index) of an F64x4."""
    if v != f64x4 or not isinstance(k, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        k = builder.trunc(context.cast(builder, args[1], sig.args[1], types.int64), _I32)
        return builder.extract_element(args[0], k)

    return types.float64(v, k), codegen


def _vnni256(builder, acc, u8, s8):
    return _call(builder, "llvm.x86.avx512.vpdpbusd.256", _V8I32, [acc, u8, s8])


def make_pair_dot(qs_off: int, qh_off: int | None, has_min: bool):
    """An intrinsic ``dot(w, r, o, xq, xo, dx, sx, c, acc, accm) -> (acc, accm)`` for one block
    (at byte ``o``) of rows r and r + 1 of a 4- or 5-bit format against xq[xo : xo + 32]:

        acc  [F64x8] += (d_row * dx) * (q_row . xq + c)   (lanes 0..3: row r, 4..7: row r + 1)
        accm [F64x4] += (d_row * dx, m_row * sx)          (lanes 1 and 3: the minimum terms)

    In float64, where every term is exact (an f16 times a float32 times an integer below 2^16):
    pass sx = float64(dx) * sum(xq) (exact), not a float32 product.

    Block layout: f16 d at byte 0, f16 m at byte 2 if ``has_min``, the uint32 of fifth bits at
    ``qh_off`` (5-bit formats), 16 bytes of nibbles at ``qs_off``. c: an integer offset added
    to each row's integer dot product (e.g. -8 * sum(xq) for Q4_0's q - 8).
    """

    def typer(typingctx, w, r, o, xq, xo, dx, sx, c, acc, accm):
        if not (_check_array(w, types.uint8, r, o) and _check_array(xq, types.int8, xo)
                and isinstance(dx, types.Float) and isinstance(sx, types.Float)
                and isinstance(c, types.Integer) and acc == f64x8 and accm == f64x4):
            return None
        ret = types.Tuple((f64x8, f64x4))

        def codegen(context, builder, sig, args):
            w, r, o, xq, xo, dx, sx, c, acc, accm = args
            wt = sig.args[0]
            r0, o0 = _cast_indices(context, builder, sig.args[1:3], [r, o])
            r1 = builder.add(r0, ir.IntType(64)(1))
            i64 = ir.IntType(64)

            def wload(row, off, ty):
                return _load(builder, _elem_ptr(context, builder, wt, w, [row, builder.add(o0, i64(off))]), ty)

            q = builder.shuffle_vector(wload(r0, qs_off, _VI8), wload(r1, qs_off, _VI8),
                                       ir.Constant(ir.VectorType(_I32, 32), list(range(32))))
            lo = builder.and_(q, ir.Constant(_V32I8, [15] * 32))
            hi = builder.lshr(q, ir.Constant(_V32I8, [4] * 32))
            if qh_off is not None:
                h0 = wload(r0, qh_off, _I32)
                h1 = wload(r1, qh_off, _I32)
                mask_t = ir.VectorType(ir.IntType(1), 32)
                low16 = _I32(0xFFFF)
                mlo = builder.or_(builder.and_(h0, low16), builder.shl(h1, _I32(16)))
                mhi = builder.or_(builder.lshr(h0, _I32(16)), builder.and_(h1, _I32(0xFFFF0000)))
                sixteen = ir.Constant(_V32I8, [16] * 32)
                lo = builder.select(builder.bitcast(mlo, mask_t), builder.or_(lo, sixteen), lo)
                hi = builder.select(builder.bitcast(mhi, mask_t), builder.or_(hi, sixteen), hi)
            (xi,) = _cast_indices(context, builder, [sig.args[4]], [xo])
            xp = _elem_ptr(context, builder, sig.args[3], xq, [xi])
            twice = ir.Constant(ir.VectorType(_I32, 32), list(range(16)) * 2)
            x0 = _load(builder, xp, _VI8)
            x1 = _load(builder, builder.gep(xp, [i64(16)]), _VI8)
            x0 = builder.shuffle_vector(x0, x0, twice)
            x1 = builder.shuffle_vector(x1, x1, twice)
            ci = context.cast(builder, c, sig.args[7], types.int32)
            init = builder.insert_element(ir.Constant(_V8I32, None), ci, _I32(0))
            init = builder.insert_element(init, ci, _I32(4))
            p = _vnni256(builder, _vnni256(builder, init, lo, x0), hi, x1)
            f = builder.sitofp(p, _V8F64)
            # scales: [d0, m0, d1, m1] as floats, times [dx, sx, dx, sx]
            # (Without minima, lanes 1 and 3 hold the block's next two bytes as a half: unused.)
            pair = builder.insert_element(ir.Constant(ir.VectorType(_I32, 2), None), wload(r0, 0, _I32), _I32(0))
            pair = builder.insert_element(pair, wload(r1, 0, _I32), _I32(1))
            sc = builder.fpext(builder.bitcast(pair, ir.VectorType(ir.HalfType(), 4)), _V4F64)
            dxf = context.cast(builder, dx, sig.args[5], types.float64)
            sxf = context.cast(builder, sx, sig.args[6], types.float64)
            mul = ir.Constant(_V4F64, None)
            for k, v in enumerate((dxf, sxf, dxf, sxf)):
                mul = builder.insert_element(mul, v, _I32(k))
            sc = builder.fmul(sc, mul, flags=_FAST)
            if has_min:
                accm = builder.fadd(accm, sc, flags=_FAST)
            s8 = builder.shuffle_vector(sc, sc, ir.Constant(_V8I32, [0, 0, 0, 0, 2, 2, 2, 2]))
            acc = builder.fadd(builder.fmul(f, s8, flags=_FAST), acc, flags=_FAST)
            return context.make_tuple(builder, ret, [acc, accm])

        return ret(w, r, o, xq, xo, dx, sx, c, acc, accm), codegen

    return intrinsic(typer)
