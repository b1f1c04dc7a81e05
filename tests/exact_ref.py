"""The exact results the products must give (docs/architecture.md, Numerics): an independent
oracle built on gguf.quants.

Every product rounds its float64 result to float32 once: for the int8 path the weights are exact
in float64 (``exact_dequantize``) and x is its int8 form times its scales (``q8_round``, numpy's
version of the kernels' rounding), so the oracle is
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


def q8_round(x, qb):
    """x [T, C] as the int8 kernels see it: per qb-block d = max|x| / 127, q = rint(x * 127 / max)."""
    T, C = x.shape
    xb = x.reshape(T, C // qb, qb).astype(np.float32)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        iscale = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    q = np.rint(xb * iscale)
    d = (amax / np.float32(127.0)).astype(np.float32)
    return (d.astype(np.float64) * q).reshape(T, C)
