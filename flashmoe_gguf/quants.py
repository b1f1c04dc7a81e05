"""Block formats from Python: quantize, dequantize and multiply, in ggml's byte layout.

    quantize(x, qtype, importance=None)  # float [..., C] -> uint8 [..., C // block * type_size]
    dequantize(data, qtype, shape)       # raw bytes -> float32 of the logical shape [..., C]
    matvec(data, qtype, x)               # rows of raw bytes [R, RB] times x [C] (or [T, C])

``qtype`` is a ``gguf.GGMLQuantizationType``, its name ("Q4_K", "q4_k") or its number.
Quantizers are the Numba modules ``kernels/cpu/<name>_quant.py``; dequantize and matvec go
through the kernel registry. An unknown or unsupported type raises ValueError naming it.
"""
from __future__ import annotations

import importlib
from math import prod

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .kernels import get_format
from .kernels.registry import as_qtype

__all__ = ["quantize", "dequantize", "matvec", "quantizable_types"]

# Quantizer module (inside flashmoe_gguf.kernels.cpu) of each block type.
_QUANTIZERS: dict[GGMLQuantizationType, str] = {
    GGMLQuantizationType.Q8_0: "q8_0_quant",
    GGMLQuantizationType.Q4_0: "q4_0_quant",
    GGMLQuantizationType.Q4_1: "q4_1_quant",
    GGMLQuantizationType.Q2_K: "q2_k_quant",
    GGMLQuantizationType.Q3_K: "q3_k_quant",
    GGMLQuantizationType.Q4_K: "q4_k_quant",
    GGMLQuantizationType.Q5_K: "q5_k_quant",
    GGMLQuantizationType.Q6_K: "q6_k_quant",
    GGMLQuantizationType.IQ4_NL: "iq4_nl_quant",
    GGMLQuantizationType.IQ4_XS: "iq4_xs_quant",
}

# Float types need no search: their "quantizer" is a cast.
_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


def quantizable_types() -> list[GGMLQuantizationType]:
    """The types ``quantize`` can write."""
    return [*_FLOAT_TYPES, *_QUANTIZERS]


def _float_bytes(x: np.ndarray, qt: GGMLQuantizationType) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qt == GGMLQuantizationType.F32:
        y = x
    elif qt == GGMLQuantizationType.F16:
        y = x.astype(np.float16)
    else:  # BF16: round to nearest even on the upper 16 bits (NaN kept quiet)
        u = x.view(np.uint32).astype(np.uint64)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        y = np.where(np.isnan(x), np.uint16(0x7FC0), r)
    return y.view(np.uint8).reshape(*x.shape[:-1], -1)


def quantize(x, qtype, importance=None) -> np.ndarray:
    """Quantize ``x`` (float [..., C], C a multiple of the block size) to ``qtype``.

    Returns uint8 [..., C // block_size * type_size], the rows in ggml's block layout.
    ``importance`` (float [C], e.g. an imatrix's mean squared activation per column) weights the
    squared error that the scale search minimises; it is ignored by the float types.
    """
    qt = as_qtype(qtype)
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("quantize: expected an array with at least one dimension")
    if qt in _FLOAT_TYPES:
        return _float_bytes(x, qt)
    name = _QUANTIZERS.get(qt)
    if name is None:
        supported = ", ".join(t.name for t in quantizable_types())
        raise ValueError(f"no quantizer for type {qt.name} (supported: {supported})")
    block_size, _ = GGML_QUANT_SIZES[qt]
    cols = x.shape[-1]
    if cols % block_size != 0:
        raise ValueError(
            f"{qt.name}: row length {cols} is not a multiple of the block size {block_size}")
    module = importlib.import_module(f"{__package__}.kernels.cpu.{name}")
    out = module.quantize(x.reshape(-1, cols), importance)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _as_rows(data, qt: GGMLQuantizationType, cols: int) -> np.ndarray:
    """Raw bytes as a C-contiguous uint8 [R, RB] array for rows of ``cols`` values."""
    block_size, type_size = GGML_QUANT_SIZES[qt]
    if cols % block_size != 0:
        raise ValueError(
            f"{qt.name}: row length {cols} is not a multiple of the block size {block_size}")
    row_bytes = cols // block_size * type_size
    raw = np.ascontiguousarray(data)
    if raw.dtype != np.uint8:
        raw = raw.reshape(-1).view(np.uint8)
    if raw.size % row_bytes != 0:
        raise ValueError(
            f"{qt.name}: {raw.size} bytes are not a whole number of {row_bytes}-byte rows "
            f"of {cols} values")
    return raw.reshape(-1, row_bytes)


def dequantize(data, qtype, shape) -> np.ndarray:
    """Decode raw ``qtype`` bytes to float32 of the logical ``shape`` (numpy order, [..., C])."""
    qt = as_qtype(qtype)
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ValueError("dequantize: shape must have at least one dimension")
    w = _as_rows(data, qt, shape[-1])
    rows = prod(shape[:-1])
    if w.shape[0] != rows:
        raise ValueError(
            f"{qt.name}: data holds {w.shape[0]} rows of {shape[-1]} values, shape {shape} "
            f"needs {rows}")
    fmt = get_format(qt)
    out = np.empty((rows, shape[-1]), np.float32)
    fmt.dequantize_rows(w, np.arange(rows, dtype=np.int64), out)
    return out.reshape(shape)


def matvec(data, qtype, x) -> np.ndarray:
    """Rows of ``qtype`` bytes times ``x``: data [R, RB] (or flat), x [C] -> [R]; x [T, C] -> [T, R]."""
    qt = as_qtype(qtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim not in (1, 2):
        raise ValueError(f"matvec: x must be [C] or [T, C], got shape {x.shape}")
    w = _as_rows(data, qt, x.shape[-1])
    fmt = get_format(qt)
    if x.ndim == 1:
        out = np.empty(w.shape[0], np.float32)
        fmt.matvec(w, x, out)
    else:
        out = np.empty((x.shape[0], w.shape[0]), np.float32)
        fmt.matmul(w, x, out)
    return out
