"""The exact results the products must give (docs/architecture.md, Numerics): an independent
oracle built on gguf.quants.

Every product rounds its float64 result to float32 once: for the int8 path the weights are exact
in float64 (``exact_dequantize``) and x is its int8 form times its scales, so the oracle is
``float32(W64 @ x64)``; numpy's float64 sum is ~1e-16 off the exact one, which rounds to the same
float32 but at a rounding boundary (about one value in 10^8).
"""
from __future__ import annotations

import types

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gq

# gguf.quants computes its dequantization in float32 (d * sc * q - dmin * m rounds); the same
# formulas evaluated with float32 standing for float64 give the exact weights
_NP64 = types.ModuleType("numpy_float64")
_NP64.__dict__.update(np.__dict__)
_NP64.float32 = np.float64


def exact_dequantize(raw: np.ndarray, qtype) -> np.ndarray:
    """gguf.quants.dequantize of ``raw`` (block bytes) evaluated in float64: the exact weights."""
    if GGMLQuantizationType(qtype) == GGMLQuantizationType.MXFP4:  # (powers of two times e2m1
        # values: exact in float32 already, and its decoder reinterprets bits as float32)
        return np.asarray(gq.dequantize(np.ascontiguousarray(raw).reshape(-1), qtype), np.float64)
    saved = gq.np
    gq.np = _NP64
    try:
        return np.asarray(gq.dequantize(np.ascontiguousarray(raw).reshape(-1), qtype), np.float64)
    finally:
        gq.np = saved


def int8_x(xq: np.ndarray, xd: np.ndarray) -> np.ndarray:
    """x as the int8 path sees it: xq [T, C] int8 times its block scales xd [T, C / qb], float64."""
    qb = xq.shape[1] // xd.shape[1]
    return xq.astype(np.float64) * np.repeat(xd.astype(np.float64), qb, axis=1)
