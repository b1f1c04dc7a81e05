"""CUDA kernels (numba.cuda) for the block formats, with the CPU modules' function names.

``get_format(qtype)`` returns the module for a type: ``matvec(w, x, out)``, ``matmul(w, x, out)``
and ``dequantize_rows(w, ids, out)`` take device arrays (weights: the raw tensor bytes uploaded
as uint8 ``[rows, row_bytes]``). Set ``NUMBA_ENABLE_CUDASIM=1`` before importing numba.cuda to
run them without a GPU (slow: for small shapes only).
"""
from __future__ import annotations

import importlib
from types import ModuleType

from gguf import GGMLQuantizationType

from ..registry import KernelError, as_qtype

_CUDA_MODULES: dict[GGMLQuantizationType, str] = {
    GGMLQuantizationType.F32: "f32",
    GGMLQuantizationType.F16: "f16",
    GGMLQuantizationType.Q8_0: "q8_0",
    GGMLQuantizationType.Q4_0: "q4_0",
    GGMLQuantizationType.Q4_1: "q4_1",
    GGMLQuantizationType.Q5_0: "q5_0",
    GGMLQuantizationType.Q5_1: "q5_1",
    GGMLQuantizationType.Q2_K: "q2_k",
    GGMLQuantizationType.Q3_K: "q3_k",
    GGMLQuantizationType.Q4_K: "q4_k",
    GGMLQuantizationType.Q5_K: "q5_k",
    GGMLQuantizationType.Q6_K: "q6_k",
    GGMLQuantizationType.BF16: "bf16",
    GGMLQuantizationType.IQ4_NL: "iq4_nl",
    GGMLQuantizationType.IQ4_XS: "iq4_xs",
    GGMLQuantizationType.MXFP4: "mxfp4",
    GGMLQuantizationType.IQ3_XXS: "iq3_xxs",
    GGMLQuantizationType.IQ3_S: "iq3_s",
    GGMLQuantizationType.IQ2_XXS: "iq2_xxs",
    GGMLQuantizationType.IQ2_XS: "iq2_xs",
    GGMLQuantizationType.IQ2_S: "iq2_s",
}


def supported_types() -> list[GGMLQuantizationType]:
    return list(_CUDA_MODULES)


def get_format(qtype, tensor: str | None = None) -> ModuleType:
    """The CUDA kernel module for ``qtype``; KernelError (naming ``tensor``) if there is none."""
    qt = as_qtype(qtype)
    name = _CUDA_MODULES.get(qt)
    if name is None:
        where = f" (tensor {tensor})" if tensor else ""
        raise KernelError(f"no CUDA kernel for quantization type {qt.name}{where}")
    return importlib.import_module(f"{__name__}.{name}")
