"""BF16 weights: rows of bfloat16 (2 bytes each: the high half of a float32), widened exactly.

The kernels are the float formats' shared ones (``float_weights.py``).
"""
from __future__ import annotations

from gguf import GGMLQuantizationType

from .float_weights import bind

QTYPE = GGMLQuantizationType.BF16

matvec, matmul, dequantize_rows = bind(2)

# Float weights have only the float path; the names every format module offers:
matvec_f32 = matvec
matmul_f32 = matmul
