"""F32 weights: rows of plain float32 (4 bytes each), read straight from the tensor's bytes.

The kernels are the float formats' shared ones (``float_weights.py``).
"""
from __future__ import annotations

from gguf import GGMLQuantizationType

from .float_weights import bind

QTYPE = GGMLQuantizationType.F32

matvec, matmul, dequantize_rows = bind(0)

# Float weights have only the float path; the names every format module offers:
matvec_f32 = matvec
matmul_f32 = matmul
