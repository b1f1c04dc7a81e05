"""K-quant, i-quant and MXFP4 kernels against gguf.quants (numpy reference dequantizers).

Oracle: ``gguf.quants.dequantize`` of the same bytes, then a float64 product. Weights are random
blocks (random bytes with the f16 / e8m0 scale fields forced to finite values, so every quant and
sub-scale pattern occurs), plus edge cases: zero, negative and tiny scales, all-0x00 and all-0xFF
quants. The int8-activation kernels (``*_q8``) are checked against the same oracle applied to
``x`` rounded the way they round it (8 bits per 256- or 32-block, computed here in numpy), and
separately for their distance to the exact product.

Error measure: |out - ref| / (|W| @ |x|) (floored at 1e-30), the relative error of a dot product that cannot be
fooled by cancellation. Each test prints its worst value (`pytest -s`).
"""
from __future__ import annotations

import importlib
import importlib.util

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
from exact_ref import q8_round
from random_blocks import SCALE_FIELDS, random_weights

# the formats checked here (their scale fields: random_blocks.SCALE_FIELDS)
FORMATS = {n: SCALE_FIELDS[n] for n in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs", "iq3_xxs",
                                        "iq3_s", "iq2_xxs", "iq2_xs", "iq2_s", "mxfp4")}
TOL = 1e-5


def _module(name):
    mod = f"flashmoe_gguf.kernels.cpu.{name}"
    if importlib.util.find_spec(mod) is None:
        pytest.skip(f"no kernel module {name} yet")
    return importlib.import_module(mod)


def _sizes(name):
    return GGML_QUANT_SIZES[_module(name).QTYPE]


def dequant(name, w):
    return quants.dequantize(w, _module(name).QTYPE).astype(np.float64)


def rel_err(out, ref, W, X):
    den = np.abs(X) @ np.abs(W).T  # [T, R]
    den = np.maximum(den, 1e-30)  # products of float32-subnormal size carry absolute error only
    return float(np.max(np.abs(out.astype(np.float64) - ref) / den))


def activations(rng, T, C):
    x = rng.standard_normal((T, C)).astype(np.float32)
    if C >= 512:
        x[:, 256:512] = 0.0  # an all-zero activation block
    x[0, :7] *= 1000.0  # outliers
    return x


SHAPES = [(8, 256), (33, 512), (64, 1024)]
BLOCK32_SHAPES = [(8, 32), (5, 96), (33, 288), (16, 512)]


def _shapes(name):
    return BLOCK32_SHAPES if _sizes(name)[0] == 32 else SHAPES


def _qb(name, C):
    """Activation block of the int8 path: 256 for 256-weight formats, 32 for 32-weight ones."""
    return _sizes(name)[0]


_worst: dict[str, float] = {}


def _record(key, err):
    _worst[key] = max(_worst.get(key, 0.0), err)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if _worst:
        print("\nworst relative error per kernel:")
        for k in sorted(_worst):
            print(f"  {k:28s} {_worst[k]:.2e}")


@pytest.mark.parametrize("name", list(FORMATS))
def test_dequantize_rows(name):
    m = _module(name)
    rng = np.random.default_rng(1)
    for rows, cols in _shapes(name):
        w = random_weights(name, rows, cols, rng)
        W = dequant(name, w)
        ids = rng.choice(rows, min(rows, 5), replace=False).astype(np.int64)
        out = np.full((len(ids), cols), np.nan, np.float32)
        m.dequantize_rows(w, ids, out)
        err = float(np.max(np.abs(out - W[ids]) / np.maximum(np.abs(W[ids]), 1e-30)))
        _record(f"{name}.dequantize_rows", err)
        assert err <= 1e-6, (name, rows, cols, err)


def _check_products(name, kind):
    """kind: 'f32' (exact kernels) or 'q8' (int8 activations)."""
    m = _module(name)
    mv = getattr(m, f"matvec_{kind}")
    mm = getattr(m, f"matmul_{kind}")
    rng = np.random.default_rng(2)
    for rows, cols in _shapes(name):
        w = random_weights(name, rows, cols, rng)
        W = dequant(name, w)
        for T in (1, 3, 9):
            x = activations(rng, T, cols)
            X = x.astype(np.float64) if kind == "f32" else q8_round(x, _qb(name, cols))
            ref = X @ W.T
            out = np.full((T, rows), np.nan, np.float32)
            mm(w, x, out)
            err = rel_err(out, ref, W, X)
            _record(f"{name}.matmul_{kind}", err)
            assert err <= TOL, (name, "matmul", kind, rows, cols, T, err)
            if T == 1:
                ov = np.full(rows, np.nan, np.float32)
                mv(w, x[0], ov)
                err = rel_err(ov[None], ref, W, X)
                _record(f"{name}.matvec_{kind}", err)
                assert err <= TOL, (name, "matvec", kind, rows, cols, err)


# The float kernels are the fallback for CPUs without AVX2 (where they are the default and
# test_default_kernels_close_to_exact covers them); on AVX2 hosts only a few run by default, to
# keep Numba's compile time of the suite down.
FLOAT_BY_DEFAULT = {"q4_k", "q2_k", "iq4_xs", "mxfp4"}


@pytest.mark.parametrize("name", [n if n in FLOAT_BY_DEFAULT else pytest.param(n, marks=pytest.mark.slow)
                                  for n in FORMATS])
def test_float_kernels(name):
    _check_products(name, "f32")


@pytest.mark.parametrize("name", list(FORMATS))
def test_int8_kernels(name):
    from flashmoe_gguf.kernels.cpu.kq_common import HAS_SIMD

    if not HAS_SIMD:
        pytest.skip("int8 kernels need AVX2")
    _check_products(name, "q8")


@pytest.mark.parametrize("name", list(FORMATS))
def test_default_kernels_close_to_exact(name):
    """matvec/matmul (whichever path is the default) against the exact float64 product."""
    m = _module(name)
    rng = np.random.default_rng(3)
    rows, cols = _shapes(name)[-1]
    w = random_weights(name, rows, cols, rng, edge=False)
    W = dequant(name, w)
    x = rng.standard_normal((4, cols)).astype(np.float32)
    ref = x.astype(np.float64) @ W.T
    out = np.empty((4, rows), np.float32)
    m.matmul(w, x, out)
    ov = np.empty(rows, np.float32)
    m.matvec(w, x[0], ov)
    err = max(rel_err(out, ref, W, x), rel_err(ov[None], ref[:1], W, x[:1]))
    _record(f"{name}.default_vs_exact", err)
    # 8-bit activations: each product term is off by at most half a step of 1/127 of its block max
    assert err <= 1e-2, (name, err)


def test_registry_covers_formats():
    from flashmoe_gguf.kernels import get_format

    for name in FORMATS:
        if importlib.util.find_spec(f"flashmoe_gguf.kernels.cpu.{name}") is None:
            continue
        fmt = get_format(name.upper())
        assert fmt.module.__name__.endswith(f".{name}")
        assert fmt.qtype == GGMLQuantizationType[name.upper()]


def test_ksigns_match_gguf():
    """The sign patterns are generated (7 bits + even parity), not copied: compare with gguf's."""
    from flashmoe_gguf.kernels.cpu.kq_common import ksigns_table

    assert np.array_equal(ksigns_table(), np.frombuffer(quants.IQ2_XXS.ksigns, np.uint8))


@pytest.mark.parametrize("name", ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"])
def test_grouped_expert_products(name):
    # matvec_ids: several experts of a [E, R, RB] tensor in one call, one x for all or one each.
    # Oracle: gguf.quants' dequantization times the int8-rounded x (float64); and every row
    # equals the one-expert matvec's bit for bit (so a MoE's result does not depend on the path).
    from flashmoe_gguf.kernels.cpu.kq_common import HAS_SIMD

    if not HAS_SIMD:
        pytest.skip("int8 kernels need AVX2")
    from flashmoe_gguf.kernels import get_format
    m = _module(name)
    matvec_ids = get_format(m.QTYPE).matvec_ids
    rng = np.random.default_rng(5)
    E, rows, cols = 5, 40, 512
    w = np.ascontiguousarray(random_weights(name, E * rows, cols, rng).reshape(E, rows, -1))
    W = dequant(name, w.reshape(E * rows, -1)).reshape(E, rows, cols)
    ids = np.array([3, 0, 4, 1], np.int64)
    for T in (1, len(ids)):
        x = activations(rng, T, cols)
        X = q8_round(x, _qb(name, cols))
        out = np.full((len(ids), rows), np.nan, np.float32)
        matvec_ids(w, ids, x, out)
        for j, e in enumerate(ids):
            xj = X[j if T > 1 else 0]
            err = rel_err(out[j][None], (W[e] @ xj)[None], W[e], xj[None])
            assert err <= TOL, (name, T, j, err)
            one = np.full(rows, np.nan, np.float32)
            m.matvec(np.ascontiguousarray(w[e]), x[j if T > 1 else 0], one)
            assert np.array_equal(one, out[j]), (name, T, j)
