"""Encoding float32 rows into GGML tensor bytes, and decoding them back.

``encode(x, qtype)``: float32 [R, C] -> uint8 [R, row_bytes] in ggml's layout. Float types are
converted here; block formats go to the fastest quantizer present, in this order:
``flashmoe_gguf.quants.quantize`` (the project's dispatcher), the project's Numba quantizer module
``flashmoe_gguf.kernels.cpu.<type>_quant``, then gguf-py's numpy reference ``gguf.quants``.
Every quantizer is asked once with a zero block whether it handles the type.
"""
from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from .errors import ConvertError

FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)


def row_bytes(qtype: Q, cols: int) -> int:
    bs, ts = GGML_QUANT_SIZES[qtype]
    return cols // bs * ts


def tensor_bytes(qtype: Q, shape: tuple[int, ...]) -> int:
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return rows * row_bytes(qtype, shape[-1])


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even; NaN stays NaN) -> uint16 bits."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u.astype(np.uint64) + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _probe(fn: Callable[[np.ndarray], np.ndarray], qtype: Q) -> bool:
    bs, ts = GGML_QUANT_SIZES[qtype]
    try:
        out = fn(np.zeros((1, 256 if 256 % bs == 0 else bs), dtype=np.float32))
    except Exception:  # noqa: BLE001 - any failure means "not this one"
        return False
    return isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.size == (256 if 256 % bs == 0 else bs) // bs * ts


@lru_cache(maxsize=None)
def quantizer(qtype: Q) -> tuple[Callable[[np.ndarray], np.ndarray], str] | None:
    """The fastest available quantizer of a block format and its name, or None."""
    try:
        from flashmoe_gguf.quants import quantize as project_quantize  # type: ignore[import-not-found]

        fn = lambda x, q=qtype: project_quantize(x, q)  # noqa: E731
        if _probe(fn, qtype):
            return fn, "flashmoe_gguf.quants"
    except ImportError:
        pass
    try:
        mod = importlib.import_module(f"flashmoe_gguf.kernels.cpu.{qtype.name.lower()}_quant")
        fn = mod.quantize
        if _probe(fn, qtype):
            return fn, mod.__name__
    except ImportError:
        pass
    import gguf.quants

    fn = lambda x, q=qtype: gguf.quants.quantize(x, q)  # noqa: E731
    if _probe(fn, qtype):
        return fn, "gguf.quants"
    return None


def can_encode(qtype: Q) -> bool:
    return qtype in FLOAT_TYPES or quantizer(qtype) is not None


def encode(x: np.ndarray, qtype: Q) -> np.ndarray:
    """float32 [R, C] -> uint8 [R, row_bytes(qtype, C)]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == Q.F32:
        return x.view(np.uint8)
    if qtype == Q.F16:
        return x.astype(np.float16).view(np.uint8)
    if qtype == Q.BF16:
        return f32_to_bf16_bits(x).view(np.uint8)
    q = quantizer(qtype)
    if q is None:
        raise ConvertError(f"no quantizer for {qtype.name}")
    out = q[0](x)
    return out.reshape(x.shape[0], row_bytes(qtype, x.shape[1]))


@lru_cache(maxsize=None)
def _runtime_dequant(qtype: Q):
    try:
        from flashmoe_gguf.kernels import get_format

        return get_format(qtype).dequantize_rows
    except Exception:  # noqa: BLE001 - no kernel for this type (yet): use gguf's numpy reference
        return None


def decode(raw: np.ndarray, qtype: Q, cols: int) -> np.ndarray:
    """uint8 [R, row_bytes] of a GGML type -> float32 [R, cols]."""
    raw = np.ascontiguousarray(raw)
    if qtype == Q.F32:
        return raw.view(np.float32).reshape(-1, cols)
    if qtype == Q.F16:
        return raw.view(np.float16).astype(np.float32).reshape(-1, cols)
    if qtype == Q.BF16:
        return bf16_bits_to_f32(raw.view(np.uint16)).reshape(-1, cols)
    fn = _runtime_dequant(qtype)
    if fn is not None:
        out = np.empty((raw.shape[0], cols), dtype=np.float32)
        fn(raw.reshape(raw.shape[0], -1), np.arange(raw.shape[0], dtype=np.int64), out)
        return out
    import gguf.quants

    return gguf.quants.dequantize(raw.reshape(raw.shape[0], -1), qtype).reshape(-1, cols).astype(np.float32, copy=False)
