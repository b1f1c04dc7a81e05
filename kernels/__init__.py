"""Block-format kernels: one module per GGML block format per target.

Installed as ``flashmoe_gguf.kernels`` (the source folder is the top-level ``kernels/``).
"""
from .registry import KernelError, get_format, supported_types

__all__ = ["KernelError", "get_format", "supported_types"]
