"""Shared machinery of the K-quant, i-quant and MXFP4 kernels (256- and 32-weight blocks).

Two ways to compute ``W @ x`` from ggml blocks live here:

* **int8 activations** (the default on x86 CPUs with AVX2): ``x`` is first quantized per
  256-block to 8 bits, llama.cpp's Q8_K idea (a float scale ``d``, 256 int8 ``q`` and the sums of
  each 16 ``q``), then each weight block is multiplied with integer instructions: ``pmaddubsw``
  (u8 x s8 -> pairs summed in s16), ``pmaddwd`` with the block's sub-scales (-> s32, which LLVM
  fuses into ``vpdpwssd`` on CPUs with VNNI), one horizontal sum per block. A block's weights
  never become floats: this does ~2-4x fewer instructions per weight than dequantize-and-FMA and
  is what keeps a 2-bit format at memory bandwidth (see ``kernels/README.md`` for the numbers).
  The price: ``x`` carries 8-bit rounding (~0.3% relative error per product, as in llama.cpp).
* **float** (the fallback everywhere else, and ``matvec_f32``/``matmul_f32`` in each module):
  plain Numba loops over decoded weights, accurate to float32 rounding.

The int8 kernels are written as Numba *intrinsics* that emit LLVM IR for one block at a time
(``Simd`` below is a thin layer over llvmlite's IRBuilder). Numba types every integer operation
as int64, which turns vectorized byte arithmetic into 8-lane int64 code; writing the block in IR
keeps 32 bytes per register and lets a kernel say what llama.cpp says with SIMD intrinsics.

Activation layout (``quantize_q8``), for x [T, C] and activation blocks of qb = 256 (or 32 for
the 32-weight formats, like llama.cpp's Q8_0):  xq int8 [T, C];  xd float32 [T, C // qb] (the
scale of each block);  xs int16 [T, C // 16] (the sum of each 16 ``xq``).

Numba's on-disk cache of a kernel is checked against the kernel's own file only, not against
this one, whose intrinsics are compiled into it: ``_drop_stale_caches`` deletes the cached
kernels of the modules that import this file whenever its content changes (default cache
location; with ``NUMBA_CACHE_DIR`` set, clear that directory by hand).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic

QK = 256  # weights per super-block (activation block of the int8 path)


def _drop_stale_caches() -> None:
    here = Path(__file__)
    cache = here.parent / "__pycache__"
    if os.environ.get("NUMBA_CACHE_DIR") or not cache.is_dir():
        return
    try:
        stamp = cache / f"kq_common-src-{hashlib.sha1(here.read_bytes()).hexdigest()[:16]}.stamp"
        if stamp.exists():
            return
        for src in here.parent.glob("*.py"):
            if src != here and "from .kq_common import" in src.read_text(encoding="utf-8", errors="replace"):
                for f in [*cache.glob(f"{src.stem}.*.nbi"), *cache.glob(f"{src.stem}.*.nbc")]:
                    f.unlink(missing_ok=True)
        for f in [*cache.glob("kq_common.*.nbi"), *cache.glob("kq_common.*.nbc"),
                  *cache.glob("kq_common-src-*.stamp")]:
            f.unlink(missing_ok=True)
        stamp.touch()
    except OSError:  # a read-only installation: nothing cached there to go stale
        pass


_drop_stale_caches()


def _host_has_simd() -> bool:
    # force the float kernels (tests, comparisons): FLASHMOE_FLOAT_KERNELS=1 takes them for every
    # format on every device; FLASHMOE_KQ_FLOAT=1 for the K-quants and i-quants only
    if os.environ.get("FLASHMOE_KQ_FLOAT") or os.environ.get("FLASHMOE_FLOAT_KERNELS") == "1":
        return False
    try:
        import llvmlite.binding as llvm

        feats = llvm.get_host_cpu_features()
    except Exception:  # pragma: no cover - not an x86 host, or no feature query
        return False
    return all(feats.get(f, False) for f in ("avx2", "fma", "f16c"))


def _host_has_vnni() -> bool:
    try:
        import llvmlite.binding as llvm

        feats = llvm.get_host_cpu_features()
    except Exception:  # pragma: no cover
        return False
    return bool(feats.get("avxvnni", False) or (feats.get("avx512vnni", False) and feats.get("avx512vl", False)))


# The int8 kernels use x86 AVX2 intrinsics (pmaddubsw, pmaddwd, pshufb, psignb), and vpdpwssd
# (pmaddwd + add in one instruction) where the CPU has VNNI.
HAS_SIMD = _host_has_simd()
HAS_VNNI = HAS_SIMD and _host_has_vnni()


# ---------------------------------------------------------------------------------------------
# Scalar helpers for the float kernels (plain Numba)


@intrinsic
def bits_f32(typingctx, q, shift, mask):
    """``float32((q >> shift) & mask)`` computed on the 8-bit value ``q`` (narrow vector lanes)."""
    if not all(isinstance(a, types.Integer) for a in (q, shift, mask)):
        return None

    def codegen(context, builder, sig, args):
        v, s, m = (_trunc(builder, a, 8) for a in args)
        return builder.uitofp(builder.and_(builder.lshr(v, s), m), _F32)

    return types.float32(q, shift, mask), codegen


@intrinsic
def sbyte_f32(typingctx, q):
    """``float32`` of the byte ``q`` read as int8."""
    if not isinstance(q, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.sitofp(_trunc(builder, args[0], 8), _F32)

    return types.float32(q), codegen


@intrinsic
def half_f32(typingctx, lo, hi):
    """The IEEE half-precision number with bytes ``lo``, ``hi`` (little-endian), as float32."""
    if not (isinstance(lo, types.Integer) and isinstance(hi, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        lo16 = builder.zext(_trunc(builder, args[0], 8), _I16)
        hi16 = builder.zext(_trunc(builder, args[1], 8), _I16)
        h = builder.or_(lo16, builder.shl(hi16, _I16(8)))
        return builder.fpext(builder.bitcast(h, ir.HalfType()), _F32)

    return types.float32(lo, hi), codegen


@intrinsic
def e8m0_f32(typingctx, e):
    """MXFP4's shared exponent byte ``e`` -> 2**(e - 128) as float32 (see ``e8m0_half``)."""
    if not isinstance(e, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return e8m0_half(Simd(builder), _trunc(builder, args[0], 8))

    return types.float32(e), codegen


@njit(inline="always")
def half_at(w, r, o):
    return half_f32(w[r, o], w[r, o + 1])


@njit(inline="always")
def u16_at(w, r, o):
    return np.int64(w[r, o]) | (np.int64(w[r, o + 1]) << 8)


@njit(inline="always")
def u32_at(w, r, o):
    return u16_at(w, r, o) | (u16_at(w, r, o + 2) << 16)


# ---------------------------------------------------------------------------------------------
# Activation quantization (8 bits per 256-block)


@intrinsic
def _quantize_block(typingctx, x, t, b, qb, xq, xd, xs):
    """Quantize x[t, b*qb : (b+1)*qb] (see ``quantize_q8``); qb a literal-free int (32 or 256).

    Written in IR, 32 floats per step: Numba's scalar ``max`` (NaN-aware) and int64 typing keep
    the same loop from vectorizing (measured 15 us for 4096 values, vs ~1 us here).
    """
    if not (isinstance(x, types.Array) and x.dtype == types.float32 and x.ndim == 2 and x.layout == "C"):
        return None  # (a non-contiguous x fails to type rather than being read wrongly)
    sig = types.none(x, t, b, qb, xq, xd, xs)

    def codegen(context, builder, sig, args):
        S = Simd(builder)
        t_v, b_v, qb_v = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (1, 2, 3))
        col = builder.mul(b_v, qb_v)
        xp = _row_ptr(context, builder, sig.args[0], args[0], t_v, builder.mul(col, _I64(4)))
        qp = _row_ptr(context, builder, sig.args[4], args[4], t_v, col)
        dp = _row_ptr(context, builder, sig.args[5], args[5], t_v, builder.mul(b_v, _I64(4)))
        sp = _row_ptr(context, builder, sig.args[6], args[6], t_v, builder.sdiv(col, _I64(8)))
        with builder.if_else(builder.icmp_signed("==", qb_v, _I64(QK))) as (big, small):
            with big:
                _quantize_ir(S, xp, qp, dp, sp, QK)
            with small:
                _quantize_ir(S, xp, qp, dp, sp, 32)
        return context.get_dummy_value()

    return sig, codegen


def _quantize_ir(S, xp, qp, dp, sp, n):
    b = S.b
    v32f = ir.VectorType(_F32, 32)
    xs = [S.load(xp, 128 * c, v32f) for c in range(n // 32)]
    fabs = _intr(S, "llvm.fabs.v32f32", v32f, [v32f])
    m = b.call(fabs, [xs[0]])
    for v in xs[1:]:
        m = b.call(_intr(S, "llvm.maxnum.v32f32", v32f, [v32f, v32f]), [m, b.call(fabs, [v])])
    amax = b.call(_intr(S, "llvm.vector.reduce.fmax.v32f32", _F32, [v32f]), [m])
    pos = b.fcmp_ordered(">", amax, ir.Constant(_F32, 0.0))
    iscale = b.select(pos, b.fdiv(ir.Constant(_F32, 127.0), amax), ir.Constant(_F32, 0.0))
    b.store(b.fdiv(amax, ir.Constant(_F32, 127.0)), b.bitcast(dp, _F32.as_pointer()))
    rint = _intr(S, "llvm.rint.v32f32", v32f, [v32f])
    scale = S.splat(iscale, v32f)
    for c, v in enumerate(xs):
        q = b.call(rint, [b.fmul(v, scale)])
        b.store(b.fptosi(q, V32I8), b.bitcast(S.at(qp, 32 * c), V32I8.as_pointer()), align=1)
        for h in range(2):  # sums of 16 (exact: small integers)
            u = S.shuffle(q, list(range(16 * h, 16 * h + 16)))
            for k in (8, 4, 2, 1):
                u = b.fadd(S.shuffle(u, list(range(k))), S.shuffle(u, list(range(k, 2 * k))))
            s16 = b.fptosi(b.extract_element(u, _I32(0)), _I16)
            b.store(s16, b.bitcast(S.at(sp, 4 * c + 2 * h), _I16.as_pointer()), align=1)


def _intr(S, name, ret, argtys):
    m = S.b.module
    return m.globals.get(name) or ir.Function(m, ir.FunctionType(ret, argtys), name=name)


@njit(parallel=True, fastmath=False, cache=True)
def quantize_q8(x, qb, xq, xd, xs):
    """x [T, C] f32 -> xq [T, C] i8, xd [T, C/qb] f32, xs [T, C/16] i16 (in place).

    Per qb-block: d = max|x| / 127, q = round-half-even(x * (127 / max|x|)), so x ~= d * q;
    xs holds the sum of each 16 q (the K-quants' min and offset terms need them).
    """
    T, C = x.shape
    nb = C // qb
    if T * nb * qb < 16384:  # a parallel region costs more than the work
        for i in range(T * nb):
            _quantize_block(x, i // nb, i % nb, qb, xq, xd, xs)
    else:
        for i in prange(T * nb):
            _quantize_block(x, i // nb, i % nb, qb, xq, xd, xs)


@njit(cache=True)
def q8_buffers(T, C, qb):
    return (np.empty((T, C), np.int8), np.empty((T, C // qb), np.float32),
            np.empty((T, C // 16), np.int16))


# ---------------------------------------------------------------------------------------------
# IR building blocks for the int8 kernels

_F32 = ir.FloatType()
_I1 = ir.IntType(1)
_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
I32 = _I32
I16 = _I16
F32 = _F32
V32I8 = ir.VectorType(_I8, 32)
V16I8 = ir.VectorType(_I8, 16)
V8I8 = ir.VectorType(_I8, 8)
V4I8 = ir.VectorType(_I8, 4)
V16I16 = ir.VectorType(_I16, 16)
V8I16 = ir.VectorType(_I16, 8)
V4I16 = ir.VectorType(_I16, 4)
V8I32 = ir.VectorType(_I32, 8)
V8F32 = ir.VectorType(_F32, 8)
_F64 = ir.DoubleType()
F64 = _F64
V8F64 = ir.VectorType(_F64, 8)
_FAST = ("fast",)
FAST = _FAST
I8 = _I8


def _trunc(builder, v, bits):
    if v.type.width > bits:
        return builder.trunc(v, ir.IntType(bits))
    if v.type.width < bits:
        return builder.zext(v, ir.IntType(bits))
    return v


class Simd:
    """A few SIMD operations over an IRBuilder, named after what they do on x86."""

    def __init__(self, builder: ir.IRBuilder):
        self.b = builder

    # -- constants and addressing
    @staticmethod
    def const(ty, value):
        if isinstance(ty, ir.VectorType):
            if isinstance(value, (list, tuple)):
                return ir.Constant(ty, list(value))
            return ir.Constant(ty, [value] * ty.count)
        return ir.Constant(ty, value)

    def _c(self, like, value):
        return value if isinstance(value, ir.Value) else self.const(like.type, value)

    def at(self, ptr, offset):
        """i8* pointer ``ptr + offset`` bytes (offset an int or an i64 value)."""
        off = offset if isinstance(offset, ir.Value) else _I64(offset)
        return self.b.gep(ptr, [off])

    def load(self, ptr, offset, ty):
        p = self.b.bitcast(self.at(ptr, offset), ty.as_pointer())
        return self.b.load(p, align=1)

    def f16(self, ptr, offset):
        return self.b.fpext(self.load(ptr, offset, ir.HalfType()), _F32)

    # -- integer arithmetic (python ints become splatted constants)
    def and_(self, a, m):
        return self.b.and_(a, self._c(a, m))

    def or_(self, a, m):
        return self.b.or_(a, self._c(a, m))

    def xor(self, a, m):
        return self.b.xor(a, self._c(a, m))

    def shr(self, a, n):
        return self.b.lshr(a, self._c(a, n))

    def shl(self, a, n):
        return self.b.shl(a, self._c(a, n))

    def add(self, a, c):
        return self.b.add(a, self._c(a, c))

    def sub(self, a, c):
        return self.b.sub(a, self._c(a, c))

    def zext(self, a, ty):
        return self.b.zext(a, ty)

    def sext(self, a, ty):
        return self.b.sext(a, ty)

    def bitcast(self, a, ty):
        return self.b.bitcast(a, ty)

    def shuffle(self, a, idx, b=None):
        b = a if b is None else b
        return self.b.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, len(idx)), list(idx)))

    def splat(self, scalar, ty):
        v = self.b.insert_element(ir.Constant(ty, ir.Undefined), scalar, _I32(0))
        return self.shuffle(v, [0] * ty.count)

    def select(self, cond, a, b):
        return self.b.select(cond, a, b)

    def icmp(self, op, a, c):
        return self.b.icmp_unsigned(op, a, self._c(a, c))

    def concat(self, a, b):
        n = a.type.count
        return self.shuffle(a, list(range(2 * n)), b)

    # -- x86 instructions
    def _x86(self, name, ret, *args):
        m = self.b.module
        fn = m.globals.get(name)
        if fn is None:
            fn = ir.Function(m, ir.FunctionType(ret, [a.type for a in args]), name=name)
        return self.b.call(fn, args)

    def maddubs(self, u8, s8):
        """32 x (u8 * s8) -> 16 x i16, adjacent pairs summed (saturating)."""
        return self._x86("llvm.x86.avx2.pmadd.ub.sw", V16I16, u8, s8)

    def madd(self, a16, b16):
        """16 x (i16 * i16) -> 8 x i32, adjacent pairs summed."""
        return self._x86("llvm.x86.avx2.pmadd.wd", V8I32, a16, b16)

    def dpwssd(self, acc, a16, b16):
        """acc + madd(a16, b16); ``acc`` None starts a sum. One vpdpwssd with VNNI."""
        if acc is None:
            return self.madd(a16, b16)
        if not HAS_VNNI:
            return self.b.add(acc, self.madd(a16, b16))
        a, b = (self.b.bitcast(v, V8I32) for v in (a16, b16))  # the intrinsic's classic typing
        return self._x86("llvm.x86.avx512.vpdpwssd.256", V8I32, acc, a, b)

    def pshufb(self, table, idx):
        """Byte lookup within each 16-byte lane: out[i] = table[lane + idx[i] & 15]."""
        return self._x86("llvm.x86.avx2.pshuf.b", V32I8, table, idx)

    def psign(self, a, s):
        """a[i] * sign(s[i]) (0 where s[i] == 0), bytes."""
        return self._x86("llvm.x86.avx2.psign.b", V32I8, a, s)

    def hsum(self, v):
        """Sum of the lanes of an integer vector (i32)."""
        name = f"llvm.vector.reduce.add.v{v.type.count}i32"
        m = self.b.module
        fn = m.globals.get(name)
        if fn is None:
            fn = ir.Function(m, ir.FunctionType(_I32, [v.type]), name=name)
        return self.b.call(fn, [v])

    # -- float scalars
    def i2f(self, v):
        return self.b.sitofp(v, _F32)

    def fmul(self, a, c):
        return self.b.fmul(a, c, flags=_FAST)

    def fadd(self, a, c):
        return self.b.fadd(a, c, flags=_FAST)

    def fsub(self, a, c):
        return self.b.fsub(a, c, flags=_FAST)


def _data_ptr(context, builder, aryty, ary):
    return builder.bitcast(context.make_array(aryty)(context, builder, ary).data, _I8.as_pointer())


def _row_ptr(context, builder, aryty, ary, row, col_bytes):
    """i8* to ``ary[row, 0] + col_bytes`` of a C-contiguous 2-D array."""
    arr = context.make_array(aryty)(context, builder, ary)
    stride = builder.extract_value(arr.strides, 0)
    base = builder.bitcast(arr.data, _I8.as_pointer())
    return builder.gep(base, [builder.add(builder.mul(row, stride), col_bytes)])


def row_dot(body, nt: int, qb: int = QK, ab_step: int | None = None, step_bytes: int = 0):
    """A Numba intrinsic ``dot(w, woff, nsteps, xq, xd, xs, tab, t, b0)``: ``nsteps`` weight
    blocks (or groups of blocks) from byte ``woff`` of ``w`` (consecutive, ``step_bytes`` each)
    against tokens ``t .. t + nt - 1`` of the int8 activations, from activation block ``b0`` (of
    ``qb`` values, ``ab_step`` of them per step; default one step = 256 values). ``tab``: a
    uint8 lookup table (or a dummy). Returns a float64 (nt == 1) or a tuple of nt float64: the
    row's sum of block terms, each exact or nearly so in float64, summed in float64 so that its
    rounding to float32 (by the caller's store) does not depend on the summation order.

    ``body(S, wp, toks, tab)`` emits the IR of one step: ``wp`` is an i8* to its weights,
    ``toks`` one ``(qp, sp, dp)`` per token: i8* to its ``xq``, to its int16 16-sums ``xs``, to
    its float32 scales ``xd``; ``tab`` an i8* to the table. It returns one <8 x double> per token;
    the loop sums them lane-wise and reduces the lanes once, after the last step.
    """
    ab_step = (QK // qb) if ab_step is None else ab_step

    def typer(typingctx, w, woff, nsteps, xq, xd, xs, tab, t, b0):
        arrays = ((w, types.uint8, 2), (xq, types.int8, 2), (xd, types.float32, 2), (xs, types.int16, 2))
        for a, dt, nd in arrays:
            if not (isinstance(a, types.Array) and a.dtype == dt and a.ndim == nd and a.layout == "C"):
                return None
        if not (isinstance(tab, types.Array) and tab.dtype == types.uint8 and tab.layout == "C"):
            return None
        if not all(isinstance(i, types.Integer) for i in (woff, nsteps, t, b0)):
            return None
        ret = types.float64 if nt == 1 else types.UniTuple(types.float64, nt)
        sig = ret(w, woff, nsteps, xq, xd, xs, tab, t, b0)

        def codegen(context, builder, sig, args):
            S = Simd(builder)
            woff_v, n_v, t_v, b_v = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (1, 2, 7, 8))
            w0 = builder.gep(_data_ptr(context, builder, sig.args[0], args[0]), [woff_v])
            tabp = _data_ptr(context, builder, sig.args[6], args[6])
            starts = []
            for k in range(nt):
                tk = builder.add(t_v, _I64(k))
                starts.append((
                    _row_ptr(context, builder, sig.args[3], args[3], tk, builder.mul(b_v, _I64(qb))),
                    _row_ptr(context, builder, sig.args[5], args[5], tk, builder.mul(b_v, _I64(qb // 8))),
                    _row_ptr(context, builder, sig.args[4], args[4], tk, builder.mul(b_v, _I64(4))),
                ))
            zero = ir.Constant(V8F64, None)
            entry = builder.block
            loop = builder.append_basic_block("kq.loop")
            done = builder.append_basic_block("kq.done")
            builder.cbranch(builder.icmp_signed(">", n_v, _I64(0)), loop, done)

            builder.position_at_end(loop)
            i = builder.phi(_I64)
            accs = [builder.phi(V8F64) for _ in range(nt)]
            wp = builder.gep(w0, [builder.mul(i, _I64(step_bytes))])
            toks = [tuple(builder.gep(p, [builder.mul(i, _I64(stride))])
                          for p, stride in zip(st, (ab_step * qb, ab_step * qb // 8, ab_step * 4)))
                    for st in starts]
            vals = body(S, wp, toks, tabp)
            new = [builder.fadd(a, v, flags=_FAST) for a, v in zip(accs, vals)]
            i_next = builder.add(i, _I64(1))
            end = builder.block
            builder.cbranch(builder.icmp_signed("<", i_next, n_v), loop, done)
            i.add_incoming(_I64(0), entry)
            i.add_incoming(i_next, end)
            for a, v in zip(accs, new):
                a.add_incoming(zero, entry)
                a.add_incoming(v, end)

            builder.position_at_end(done)
            sums = []
            for v in new:  # all phis first, then the reductions
                phi = builder.phi(V8F64)
                phi.add_incoming(zero, entry)
                phi.add_incoming(v, end)
                sums.append(phi)
            outs = [fsum8(S, v) for v in sums]
            if nt == 1:
                return outs[0]
            return context.make_tuple(builder, sig.return_type, outs)

        return sig, codegen

    typer.__name__ = f"{body.__name__}_x{nt}"
    return intrinsic(typer)


def to_f64(S, v):
    return v if v.type == _F64 else S.b.fpext(v, _F64)


def vscale(S, ivec, *scalars):
    """<8 x i32> -> <8 x double> times the product of the float ``scalars``, in float64 (an f16
    scale times a float32 one is exact there)."""
    s = to_f64(S, scalars[0])
    for c in scalars[1:]:
        s = S.fmul(s, to_f64(S, c))
    return S.b.fmul(S.b.sitofp(ivec, V8F64), S.splat(s, V8F64), flags=_FAST)


NO_TABLE = np.zeros(1, np.uint8)


def lut16(S, table, v16):
    """16 bytes of 4-bit indices (low nibbles = lanes 0..15, high = 16..31) -> the 32 signed
    bytes ``table[index]`` (``table``: 16 int8 values)."""
    idx = S.concat(S.and_(v16, 15), S.shr(v16, 4))
    return S.pshufb(S.const(V32I8, [int(t) & 0xFF for t in table] * 2), idx)


def signed_maddubs(S, q, absq, x):
    """maddubs for signed weights ``q`` (``absq`` = |q|): sum pairs of q * x as i16."""
    return S.maddubs(absq, S.psign(x, q))


def fsum8(S, v):
    """Sum of the lanes of a vector of 8 (tree of shuffles)."""
    n = v.type.count
    while n > 1:
        n //= 2
        v = S.b.fadd(S.shuffle(v, list(range(n))), S.shuffle(v, list(range(n, 2 * n))), flags=_FAST)
    return S.b.extract_element(v, _I32(0))


def e8m0_half(S, e):
    """MXFP4's shared exponent byte ``e`` -> 2**(e - 128) as float32 (ggml's "half" convention:
    the e2m1 values are stored doubled)."""
    e32 = S.zext(e, _I32)
    small = S.shl(S.const(_I32, 0x00200000), e32)  # e < 2: a subnormal float
    big = S.shl(S.sub(e32, 1), 23)
    bits = S.select(S.icmp("<", e32, 2), small, big)
    return S.bitcast(bits, _F32)


# -- the i-quants' grids and signs

def ksigns_table() -> np.ndarray:
    """The i-quants' 128 sign patterns: 7 stored sign bits plus an eighth that makes the number
    of minus signs even (ggml's ``ksigns_iq2xs``), as uint8 [128]."""
    i = np.arange(128, dtype=np.uint8)
    parity = np.unpackbits(i[:, None], axis=1).sum(axis=1) & 1
    return (i | (parity.astype(np.uint8) << 7)).astype(np.uint8)


def grid_u8(qclass) -> np.ndarray:
    """A gguf.quants i-quant class's lookup grid as uint8 [entries, values per entry]."""
    qclass.init_grid()
    g = np.asarray(qclass.grid).reshape(qclass.grid_shape)
    return np.ascontiguousarray(g.astype(np.uint8))


def gather_grid(S, tab, idxs, entry_bytes):
    """Concatenate grid entries ``tab[idx]`` (``entry_bytes`` = 4 or 8 bytes each) for the
    scalar indices ``idxs`` into one byte vector."""
    ety = ir.IntType(8 * entry_bytes)
    vt = ir.VectorType(ety, len(idxs))
    v = ir.Constant(vt, ir.Undefined)
    for n, idx in enumerate(idxs):
        off = S.b.mul(S.b.zext(idx, _I64) if idx.type.width < 64 else idx, _I64(entry_bytes))
        v = S.b.insert_element(v, S.load(tab, off, ety), _I32(n))
    return S.bitcast(v, ir.VectorType(_I8, len(idxs) * entry_bytes))


def parity_signs(S, idx7):
    """7-bit sign indices (<n x i8>) -> sign bytes with the parity bit (see ``ksigns_table``)."""
    odd = S.and_(S.b.call(_ctpop(S, idx7.type), [idx7]), 1)
    return S.b.or_(idx7, S.shl(odd, 7))


def _ctpop(S, ty):
    name = f"llvm.ctpop.v{ty.count}i8"
    m = S.b.module
    return m.globals.get(name) or ir.Function(m, ir.FunctionType(ty, [ty]), name=name)


def sign_vector(S, sbytes):
    """4 sign bytes (<4 x i8>; bit l of byte i = minus sign of value 8i + l) -> <32 x i8> of +-1."""
    v = S.shuffle(sbytes, [j // 8 for j in range(32)])
    bit = S.and_(v, [1 << (j % 8) for j in range(32)])
    return S.select(S.icmp("!=", bit, 0), S.const(V32I8, -1), S.const(V32I8, 1))


def u32_fields(S, word, shifts, mask, ty=V4I8):
    """(word >> shift) & mask for each shift, as a vector of ``ty`` (word: i32)."""
    n = len(shifts)
    v = S.splat(word, ir.VectorType(_I32, n))
    v = S.and_(S.shr(v, list(shifts)), mask)
    return S.b.trunc(v, ty)


def scale_bytes(S, lo32, hi32):
    """Eight unsigned bytes held in two i32 words -> <8 x i16>."""
    v = S.b.insert_element(ir.Constant(ir.VectorType(_I32, 2), ir.Undefined), lo32, _I32(0))
    v = S.b.insert_element(v, hi32, _I32(1))
    return S.zext(S.bitcast(v, ir.VectorType(_I8, 8)), V8I16)


# ---------------------------------------------------------------------------------------------
# Float decoding primitives (portable vector IR, no target intrinsics): 32 weights per call.
# Written as intrinsics for the reason above; plain Numba loops here vectorize across blocks
# instead of across the 32 lanes (every byte load becomes a gather).


def _int_args(context, builder, sig, args, idx):
    return [context.cast(builder, args[i], sig.args[i], types.int64) for i in idx]


def _f32_args(context, builder, sig, args, idx):
    return [context.cast(builder, args[i], sig.args[i], types.float32) for i in idx]


def _two_lanes(S, a, b):
    """<32 x float>: ``a`` in lanes 0..15, ``b`` in lanes 16..31."""
    v16 = ir.VectorType(_F32, 16)
    return S.concat(S.splat(a, v16), S.splat(b, v16))


def _store32(builder, dst_ptr, v):
    builder.store(v, builder.bitcast(dst_ptr, v.type.as_pointer()), align=4)


@intrinsic
def dq32(typingctx, w, r, o1, sh1, m1, o2, sh2, m2, k2, s0, s1, b0, b1, dst, di, dj):
    """dst[di, dj + i] = s * q_i + b for i < 32, where
    q_i = ((w[r, o1 + i] >> sh1) & m1) + k2 * ((w[r, o2 + i] >> sh2) & m2)
    and (s, b) = (s0, b0) for i < 16, (s1, b1) for i >= 16.  (k2 = 0: one source.)"""
    if not (isinstance(w, types.Array) and w.layout == "C" and isinstance(dst, types.Array)
            and dst.dtype == types.float32 and dst.ndim == 2 and dst.layout == "C"):
        return None
    sig = types.none(w, r, o1, sh1, m1, o2, sh2, m2, k2, s0, s1, b0, b1, dst, di, dj)

    def codegen(context, builder, sig, args):
        S = Simd(builder)
        r_, o1_, sh1_, m1_, o2_, sh2_, m2_, k2_, di_, dj_ = _int_args(
            context, builder, sig, args, (1, 2, 3, 4, 5, 6, 7, 8, 14, 15))
        s0_, s1_, b0_, b1_ = _f32_args(context, builder, sig, args, (9, 10, 11, 12))
        v32f = ir.VectorType(_F32, 32)

        def part(o, sh, m):
            v = S.load(_row_ptr(context, builder, sig.args[0], args[0], r_, o), 0, V32I8)
            v = builder.lshr(v, S.splat(builder.trunc(sh, _I8), V32I8))
            v = builder.and_(v, S.splat(builder.trunc(m, _I8), V32I8))
            return builder.uitofp(v, v32f)

        q = part(o1_, sh1_, m1_)
        k = builder.sitofp(k2_, _F32)
        q = builder.fadd(q, builder.fmul(S.splat(k, v32f), part(o2_, sh2_, m2_), flags=_FAST), flags=_FAST)
        v = builder.fadd(builder.fmul(q, _two_lanes(S, s0_, s1_), flags=_FAST), _two_lanes(S, b0_, b1_), flags=_FAST)
        _store32(builder, _row_ptr(context, builder, sig.args[13], args[13], di_, builder.mul(dj_, _I64(4))), v)
        return context.get_dummy_value()

    return sig, codegen
