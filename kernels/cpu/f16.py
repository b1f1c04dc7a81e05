"""F16 weights: rows of IEEE half-precision numbers (2 bytes each), widened to float32 as read.

The kernels are the float formats' shared ones (``float_weights.py``).
"""
from __future__ import annotations

from gguf import GGMLQuantizationType

from .float_weights import bind

QTYPE = GGMLQuantizationType.F16

matvec, matmul, dequantize_rows = bind(1)

# Float weights have only the float path; the names every format module offers:
matvec_f32 = matvec
matmul_f32 = matmul
