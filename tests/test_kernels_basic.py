"""F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 CPU kernels against gguf.quants.

Oracle: ``gguf.quants.dequantize`` of the same bytes, then a float64 product.
Weights: random blocks (random bytes, so every quant and fifth-bit pattern occurs, with the f16
scale fields forced to finite values) plus edge cases: zero, negative, subnormal and large scales,
all-0x00 and all-0xFF quants, weights produced by ``gguf.quants.quantize``; float formats with
zeros, negative zeros and subnormals.

Block formats have two decode paths: ``matvec_f32`` (float32 throughout) and ``matvec_q8`` (x
rounded to int8 per 32-block, integer block dot products, as llama.cpp's Q8_0/Q8_1 activations).
The int8 path is checked against the same oracle applied to x rounded the way it rounds x
(computed here in numpy: d = max|x| / 127, q = round-half-even(x * (1 / d)), in float32), and
separately for its distance to the exact product.

Error measure, per output: |out - ref| / sum_j(M_ij |x_j|), where M_ij is the largest magnitude
block (i, j) can hold: |d| * max|q| + |m| for block formats (the kernels' rounding scales with it,
e.g. Q4_0 computes d * (q . x) - 8 * d * sum(x)), |w_ij| for float formats. It is the relative
error of a dot product, not fooled by cancellation; an indexing or layout mistake gives ~1.
Each test prints its worst value (``pytest -s``).
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, quants

from flashmoe_gguf.kernels import get_format, supported_types
from flashmoe_gguf.kernels.cpu.common import HAS_VNNI

TOL = 1e-5

BLOCK_FORMATS = {
    # qtype: (byte offsets of the f16 fields d[, m], max |q| a weight can have in units of d)
    Q.Q8_0: ((0,), 128),
    Q.Q4_0: ((0,), 8),
    Q.Q4_1: ((0, 2), 15),
    Q.Q5_0: ((0,), 16),
    Q.Q5_1: ((0, 2), 31),
}
FLOAT_FORMATS = (Q.F32, Q.F16, Q.BF16)
ALL = (*FLOAT_FORMATS, *BLOCK_FORMATS)
IDS = [t.name for t in ALL]


# ---------------------------------------------------------------------------------------------
# Weights


def _to_bytes(qtype, values):
    """float32 [R, C] -> the tensor bytes [R, RB] in ``qtype`` (via gguf.quants)."""
    return np.ascontiguousarray(quants.quantize(values, qtype)).view(np.uint8)


def float_weights(qtype, rows, cols, rng):
    v = rng.standard_normal((rows, cols)).astype(np.float32)
    flat = v.reshape(-1)
    k = rng.choice(flat.size, min(flat.size, 6), replace=False)
    specials = np.array([0.0, -0.0, 1e-7, -3e-6, 1e-39, 250.0], np.float32)  # subnormals, big
    flat[k] = specials[: k.size]
    return _to_bytes(qtype, v)


def block_weights(qtype, rows, cols, rng):
    """Random bytes with finite f16 scale fields, edge-case blocks mixed in."""
    bs, ts = GGML_QUANT_SIZES[qtype]
    fields, _ = BLOCK_FORMATS[qtype]
    nb = cols // bs
    w = rng.integers(0, 256, (rows, nb, ts), dtype=np.uint8)
    scales = rng.normal(0.0, 0.02, (rows, nb, len(fields))).astype(np.float16)
    flat = scales.reshape(-1)
    special = np.array([0.0, -0.0, -0.5, 6e-8, 2e-5, 1000.0], np.float16)  # zero, negative, subnormal, large
    k = rng.choice(flat.size, min(flat.size, special.size), replace=False)
    flat[k] = special[: k.size]
    for i, off in enumerate(fields):
        w[:, :, off:off + 2] = scales[:, :, i:i + 1].view(np.uint8)
    q0 = 2 * len(fields)  # quants (and Q5's qh) follow the scales
    w[0, :, q0:] = 0x00  # extreme quants: all lowest ...
    if rows > 1:
        w[1, :, q0:] = 0xFF  # ... all highest
    if rows > 2 and qtype == Q.Q4_0:
        w[2, :, q0:] = 0x88  # all zero weights with a nonzero scale
    return w.reshape(rows, nb * ts)


def weights(qtype, rows, cols, rng, quantized=False):
    if qtype in FLOAT_FORMATS:
        return float_weights(qtype, rows, cols, rng)
    if quantized:  # what a converter writes: gguf's own quantizer
        return _to_bytes(qtype, rng.standard_normal((rows, cols)).astype(np.float32))
    return block_weights(qtype, rows, cols, rng)


def dequant64(qtype, w, cols):
    return quants.dequantize(w, qtype).astype(np.float64).reshape(w.shape[0], cols)


def magnitude(qtype, w, cols):
    """M [R, C]: per weight, the largest magnitude its block can hold (see module docstring)."""
    if qtype in FLOAT_FORMATS:
        return np.abs(dequant64(qtype, w, cols))
    bs, ts = GGML_QUANT_SIZES[qtype]
    fields, qmax = BLOCK_FORMATS[qtype]
    blocks = w.reshape(w.shape[0], -1, ts)
    d = np.abs(blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float64))
    m = np.abs(blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float64)) if len(fields) == 2 else 0.0
    return np.repeat(d * qmax + m, bs, axis=1)


def quantize_x_like_kernels(x):
    """x [..., C] f32 -> the int8-per-32 rounding of the q8 kernels, dequantized (float64)."""
    xb = x.astype(np.float32).reshape(*x.shape[:-1], -1, 32)
    d = np.abs(xb).max(axis=-1) / np.float32(127.0)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
    q = np.rint(xb * inv[..., None])
    assert np.abs(q).max() <= 127
    return (q.astype(np.float64) * d[..., None].astype(np.float64)).reshape(x.shape)


def rel_error(out, ref, denom):
    return float(np.max(np.abs(out.astype(np.float64) - ref) / np.maximum(denom, 1e-30)))


def cols_for(qtype, nblocks):
    return nblocks * GGML_QUANT_SIZES[qtype][0]


# ---------------------------------------------------------------------------------------------
# Tests


def test_registry_has_these_formats():
    have = set(supported_types())
    for qt in ALL:
        assert qt in have
        fmt = get_format(qt)
        assert fmt.module.QTYPE == qt
        assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[qt]


# rows: 1, fewer than a 4-row group, a multiple of 4, a remainder; columns: one block (or odd
# float lengths), many blocks
SHAPES = [(1, 1), (3, 1), (4, 2), (13, 37), (37, 8)]
FLOAT_COLS = [1, 15, 16, 33, 1000]


def _shapes(qtype):
    if qtype in FLOAT_FORMATS:
        return [(r, c) for r, c in zip([1, 3, 4, 13, 37], FLOAT_COLS)]
    return [(r, cols_for(qtype, nb)) for r, nb in SHAPES]


def _matvec_cases(qtype, rng):
    """(rows, cols, w, x) for the decode tests."""
    cases = [(r, c, False) for r, c in _shapes(qtype)]
    cases.append((21, cols_for(qtype, 6) if qtype not in FLOAT_FORMATS else 96, True))
    for rows, cols, quantized in cases:
        w = weights(qtype, rows, cols, rng, quantized)
        x = (rng.standard_normal(cols) * 2).astype(np.float32)
        if cols >= 64:
            x[32:64] = 0.0  # an all-zero activation block (int8 scale 0)
        yield rows, cols, w, x


@pytest.mark.parametrize("qtype", ALL, ids=IDS)
def test_matvec_f32(qtype):
    fmt = get_format(qtype)
    rng = np.random.default_rng(1)
    worst = 0.0
    for rows, cols, w, x in _matvec_cases(qtype, rng):
        assert w.shape == (rows, fmt.row_bytes(cols)) and w.dtype == np.uint8
        out = np.full(rows, np.nan, np.float32)
        fmt.module.matvec_f32(w, x, out)
        ref = dequant64(qtype, w, cols) @ x.astype(np.float64)
        err = rel_error(out, ref, magnitude(qtype, w, cols) @ np.abs(x.astype(np.float64)))
        assert err <= TOL, f"{qtype.name} {rows}x{cols}: rel error {err:.2e}"
        worst = max(worst, err)
    print(f"\n{qtype.name} matvec_f32 worst rel error {worst:.2e}")


@pytest.mark.skipif(not HAS_VNNI, reason="the int8 kernels need VNNI")
@pytest.mark.parametrize("qtype", list(BLOCK_FORMATS), ids=[t.name for t in BLOCK_FORMATS])
def test_matvec_q8(qtype):
    fmt = get_format(qtype)
    rng = np.random.default_rng(5)
    worst = worst_exact = 0.0
    for rows, cols, w, x in _matvec_cases(qtype, rng):
        out = np.full(rows, np.nan, np.float32)
        fmt.module.matvec_q8(w, x, out)
        deq, mag = dequant64(qtype, w, cols), magnitude(qtype, w, cols)
        xq = quantize_x_like_kernels(x)
        err = rel_error(out, deq @ xq, mag @ np.abs(xq))
        assert err <= TOL, f"{qtype.name} {rows}x{cols}: rel error {err:.2e} against the int8-x oracle"
        worst = max(worst, err)
        # and the rounding of x costs what 8 bits cost: under 1/127 of the product's magnitude
        exact = rel_error(out, deq @ x.astype(np.float64), mag @ np.abs(x.astype(np.float64)))
        assert exact < 1 / 127
        worst_exact = max(worst_exact, exact)
    print(f"\n{qtype.name} matvec_q8 worst rel error {worst:.2e} (vs exact x: {worst_exact:.2e})")


@pytest.mark.parametrize("qtype", ALL, ids=IDS)
def test_default_paths(qtype):
    mod = get_format(qtype).module
    if qtype in FLOAT_FORMATS or not HAS_VNNI:
        assert mod.matvec is mod.matvec_f32
    else:
        assert mod.matvec is mod.matvec_q8
    assert mod.matmul is mod.matmul_f32


@pytest.mark.parametrize("qtype", ALL, ids=IDS)
def test_matmul(qtype):
    fmt = get_format(qtype)
    rng = np.random.default_rng(2)
    worst = 0.0
    shapes = _shapes(qtype)
    for (rows, cols), T in zip(shapes, [1, 7, 33, 64, 9]):  # blocks of 32 tokens and the rest
        w = weights(qtype, rows, cols, rng)
        x = rng.standard_normal((T, cols)).astype(np.float32)
        out = np.full((T, rows), np.nan, np.float32)
        fmt.matmul(w, x, out)
        x64 = x.astype(np.float64)
        ref = x64 @ dequant64(qtype, w, cols).T
        err = rel_error(out, ref, np.abs(x64) @ magnitude(qtype, w, cols).T)
        assert err <= TOL, f"{qtype.name} {rows}x{cols} T={T}: rel error {err:.2e}"
        worst = max(worst, err)
        # prefill agrees with decode, token by token
        one = np.empty(rows, np.float32)
        for t in (0, T - 1):
            fmt.module.matvec_f32(w, x[t], one)
            assert rel_error(one, out[t].astype(np.float64), np.abs(x64[t]) @ magnitude(qtype, w, cols).T) <= 2 * TOL
    print(f"\n{qtype.name} matmul worst rel error {worst:.2e}")


@pytest.mark.parametrize("qtype", ALL, ids=IDS)
def test_views_of_a_larger_buffer(qtype):
    """Weights are zero-copy read-only views into the mapped file, at an arbitrary byte offset."""
    fmt = get_format(qtype)
    rng = np.random.default_rng(3)
    cols = cols_for(qtype, 3) if qtype not in FLOAT_FORMATS else 48
    big = weights(qtype, 11, cols, rng)
    raw = np.zeros(big.size + 7, np.uint8)
    raw[7:] = big.reshape(-1)
    w = raw[7:].reshape(big.shape)[2:9]  # odd start address, 7 rows
    w.flags.writeable = False  # as a view of a file mapped read-only
    xs = rng.standard_normal((3, cols)).astype(np.float32)
    x = xs[1]  # a row of a larger activation array
    ref = dequant64(qtype, big, cols)[2:9] @ x.astype(np.float64)
    denom = magnitude(qtype, big, cols)[2:9] @ np.abs(x.astype(np.float64))
    out = np.empty(7, np.float32)
    fmt.module.matvec_f32(w, x, out)
    assert rel_error(out, ref, denom) <= TOL
    fmt.matvec(w, x, out)  # the default path (int8 x where the CPU has VNNI)
    assert rel_error(out, ref, denom) < 1 / 127
    out = np.empty((2, 7), np.float32)
    fmt.matmul(w, xs[1:], out)
    assert rel_error(out[0], ref, denom) <= TOL


@pytest.mark.parametrize("qtype", ALL, ids=IDS)
def test_dequantize_rows(qtype):
    fmt = get_format(qtype)
    rng = np.random.default_rng(4)
    rows, cols = 9, (cols_for(qtype, 5) if qtype not in FLOAT_FORMATS else 37)
    w = weights(qtype, rows, cols, rng)
    ref = dequant64(qtype, w, cols)
    for ids in (np.array([8, 0, 3, 3], np.int64), np.array([5], np.int32)):
        out = np.full((ids.size, cols), np.nan, np.float32)
        fmt.dequantize_rows(w, ids, out)
        # the kernels may fuse q * d + m into one rounding: within one float32 ulp of gguf's value
        tol = 1.2e-7 * magnitude(qtype, w, cols)[ids]
        bad = np.abs(out - ref[ids]) > tol
        assert not bad.any(), f"{qtype.name}: {bad.sum()} values differ, first at {np.argwhere(bad)[0]}"


def test_float_kernels_env_reaches_every_format():
    # FLASHMOE_FLOAT_KERNELS=1 takes the float kernels for every format: the 32-weight formats,
    # the K-quants and the i-quants alike (the K-quants once ignored it)
    from flashmoe_gguf.kernels.cpu.kq_common import HAS_SIMD
    if not HAS_SIMD:
        pytest.skip("no int8 kernels on this CPU: every format is float already")
    code = ("from gguf import GGMLQuantizationType as Q\n"
            "from flashmoe_gguf.kernels import get_format\n"
            "names = ['Q4_0', 'Q8_0', 'Q4_K', 'Q6_K', 'Q2_K', 'IQ4_XS', 'IQ4_NL', 'MXFP4', 'IQ2_XXS']\n"
            "mods = [get_format(Q[n]).module for n in names]\n"
            "print(sorted(n for n, m in zip(names, mods) if m.matvec is not m.matvec_f32))\n")
    import os
    import subprocess
    import sys
    outs = {}
    for tag, extra in (("float", {"FLASHMOE_FLOAT_KERNELS": "1"}), ("default", {})):
        env = {k: v for k, v in os.environ.items() if k not in ("FLASHMOE_FLOAT_KERNELS", "FLASHMOE_KQ_FLOAT")}
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, **extra},
                           timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        outs[tag] = p.stdout.strip().splitlines()[-1]
    assert outs["float"] == "[]"
    assert "Q4_K" in outs["default"]  # (without the switch the K-quants take their int8 kernels here)
