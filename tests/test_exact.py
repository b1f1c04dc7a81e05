"""The CPU products give the exact results bit for bit (docs/architecture.md, Numerics).

Every product's output is its float64 value rounded once to float32: with int8 activations,
sum over blocks of (weight scales x activation scale x integer dot); with float activations, the
sum of float32 products. The GPU computes the same numbers (tests/cuda_checks.py counts the
outputs that differ), so the two devices agree bit for bit, which greedy decoding with int8
activations needs: there a float32-rounding-sized difference can change a later token.

Oracle (tests/exact_ref.py): gguf.quants' dequantizers evaluated in float64 (the exact weights),
times x as the int8 path rounds it (numpy), in a float64 numpy product, rounded to float32. Numpy's
float64 sum is ~1e-16 off the exact sum: it rounds to the same float32 except at a rounding
boundary, about one value in 10^8, so none of the few thousand values here may differ.
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest
from exact_ref import exact_dequantize, q8_round
from gguf import GGMLQuantizationType
from random_blocks import SCALE_FIELDS, random_weights

SMALL = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl", "mxfp4")  # 32-weight blocks


@pytest.mark.parametrize("name", list(SCALE_FIELDS))
def test_int8_products_exact(name):
    mod = importlib.import_module(f"flashmoe_gguf.kernels.cpu.{name}")
    from flashmoe_gguf.kernels.cpu.common import HAS_VNNI
    from flashmoe_gguf.kernels.cpu.kq_common import HAS_SIMD
    if not hasattr(mod, "matvec_q8") or not (HAS_VNNI if name in SMALL[:5] else HAS_SIMD):
        pytest.skip(f"{name}: no int8 kernel on this CPU")
    rng = np.random.default_rng(7)
    rows, cols = 67, 512
    qt = GGMLQuantizationType[name.upper()]
    w = random_weights(name, rows, cols, rng)
    W = exact_dequantize(w, qt).reshape(rows, cols)
    qb = 32 if name in SMALL else 256
    for T in (1, 5):
        x = (rng.standard_normal((T, cols)) * rng.uniform(0.1, 10)).astype(np.float32)
        out = np.empty((T, rows), np.float32)
        if T == 1:
            mod.matvec_q8(w, x[0], out[0])
        elif hasattr(mod, "matmul_q8"):
            mod.matmul_q8(w, x, out)
        else:
            continue
        want = (q8_round(x, qb) @ W.T).astype(np.float32)
        assert np.array_equal(out, want), f"{name} T={T}: {int(np.sum(out != want))} of {out.size} differ"


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "f32", "f16", "bf16"])
def test_float_products_exact(name):
    # the float kernels (prompts of the 32-weight formats; float32 / f16 routers): the sum of the
    # float32 products of x and the weights as float32 (q d + m rounded once), rounded once
    mod = importlib.import_module(f"flashmoe_gguf.kernels.cpu.{name}")
    rng = np.random.default_rng(8)
    rows, cols = 37, 576  # (not a multiple of the kernels' 16 columns for the float formats: + 8)
    if name in ("f32", "f16", "bf16"):
        cols += 8
        W32 = rng.standard_normal((rows, cols)).astype(np.float32)
        if name == "f16":
            W32 = W32.astype(np.float16).astype(np.float32)
            w = W32.astype(np.float16).view(np.uint8)
        elif name == "bf16":
            W32 = (W32.view(np.uint32) & 0xFFFF0000).view(np.float32)
            w = (W32.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        else:
            w = W32.view(np.uint8)
    else:
        w = random_weights(name, rows, cols, rng)
        W32 = exact_dequantize(w, GGMLQuantizationType[name.upper()]).reshape(rows, cols).astype(np.float32)
    w = np.ascontiguousarray(w).reshape(rows, -1)
    for T in (1, 3, 37):  # a decode step (float formats), a few tokens, a block of 32 and more
        x = (rng.standard_normal((T, cols)) * 3).astype(np.float32)
        out = np.empty((T, rows), np.float32)
        if T == 1:
            if name not in ("f32", "f16", "bf16"):  # (the 32-weight formats decode with int8: their
                continue  # float decode kernel is the float32 fallback)
            mod.matvec(w, x[0], out[0])
        else:
            (getattr(mod, "matmul_f32", None) or mod.matmul)(w, x, out)
        want = (x.astype(np.float64) @ W32.astype(np.float64).T).astype(np.float32)
        assert np.array_equal(out, want), f"{name} T={T}: {int(np.sum(out != want))} of {out.size} differ"


GROUPED = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")


@pytest.mark.parametrize("name", GROUPED)
def test_grouped_expert_products_exact(name):
    # matvec_ids (a decode token's routed experts in one call; x shared or one row per expert):
    # every row the exact product rounded once, as one expert at a time gives it
    from flashmoe_gguf.kernels import get_format
    qt = GGMLQuantizationType[name.upper()]
    matvec_ids = get_format(qt).matvec_ids
    if matvec_ids is None:
        pytest.skip(f"{name}: no grouped kernel on this CPU")
    rng = np.random.default_rng(11)
    E, rows, cols = 5, 43, 512  # (rows: not a multiple of the kernels' row groups)
    w = random_weights(name, E * rows, cols, rng)
    W = exact_dequantize(w, qt).reshape(E, rows, cols)
    w = np.ascontiguousarray(w.reshape(E, rows, -1))
    ids = np.array([3, 0, 4, 1], np.int64)
    qb = 32 if name in SMALL else 256
    for T in (1, len(ids)):
        x = (rng.standard_normal((T, cols)) * rng.uniform(0.1, 10)).astype(np.float32)
        X = q8_round(x, qb)
        out = np.full((len(ids), rows), np.nan, np.float32)
        matvec_ids(w, ids, x, out)
        want = np.stack([(W[e] @ X[j if T > 1 else 0]).astype(np.float32) for j, e in enumerate(ids)])
        assert np.array_equal(out, want), f"{name} T={T}: {int(np.sum(out != want))} of {out.size} differ"


def test_expert_sum_one_token():
    # a decode token's experts summed (ops.expert_sum1): float64 products and sums in ascending
    # expert order, rounded once, numpy's float64 arithmetic bit for bit (no fused multiply-add)
    from flashmoe_gguf.kernels.cpu import ops
    rng = np.random.default_rng(3)
    for _ in range(200):
        sel = rng.permutation(64)[:8]
        w = (rng.random(8) * rng.uniform(0.01, 10)).astype(np.float32)
        ids = np.unique(sel)
        y = (rng.standard_normal((8, 576)) * rng.uniform(0.01, 100)).astype(np.float32)
        want = np.zeros(576)
        for j, e in enumerate(ids):
            want = want + np.float64(w[list(sel).index(e)]) * y[j].astype(np.float64)
        out = np.empty(576, np.float32)
        ops.expert_sum1(sel.astype(np.int64), w, ids.astype(np.int64), y, out)
        assert np.array_equal(out, want.astype(np.float32))
