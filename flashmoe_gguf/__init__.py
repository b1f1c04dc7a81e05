"""flashmoe-gguf: run Mixture-of-Experts GGUF models larger than RAM, from Python.

    from flashmoe_gguf import Model
    model = Model.load("models/SmolLM2-135M-Instruct.Q4_1.gguf")
    for chunk in model.generate("The capital of France is", max_tokens=32, temperature=0):
        print(chunk.text, end="")
"""
from __future__ import annotations

from typing import Any

from . import cuda_compat  # noqa: F401  (numpy 2.5 and numba-cuda; see the module)

__version__ = "0.1.0"

__all__ = ["Model", "quantize", "dequantize", "matvec", "__version__"]


def __getattr__(name: str) -> Any:  # lazy: `import flashmoe_gguf` stays cheap
    if name == "Model":
        from .model import Model

        return Model
    if name in ("quantize", "dequantize", "matvec"):
        from . import quants

        return getattr(quants, name)
    raise AttributeError(f"module 'flashmoe_gguf' has no attribute {name!r}")
