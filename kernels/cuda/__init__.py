"""CUDA kernels (numba.cuda) for the block formats, with the CPU modules' function names.

``get_format(qtype)`` returns the module for a type: ``matvec(w, x, out)``, ``matmul(w, x, out)``
and ``dequantize_rows(w, ids, out)`` take device arrays (weights: the raw tensor bytes uploaded
as uint8 ``[rows, row_bytes]``). Set ``NUMBA_ENABLE_CUDASIM=1`` before importing numba.cuda to
run them without a GPU (slow: for small shapes only).
"""
from __future__ import annotations

from ... import cuda_compat  # noqa: F401  (before numba.cuda)
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


# the formats whose CPU prompt product (matmul) takes float activations
_FLOAT_PROMPTS = frozenset((GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_0,
                            GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q8_0))


class Product:
    """``out[n] = W[ids[n]] @ x[n // div]`` on the GPU for one weight format: the int8-activation
    kernel (``q8``) where the format has one, like the CPU's default path, else the exact float
    kernel. ``FLASHMOE_FLOAT_KERNELS=1`` takes the float kernels everywhere (on both devices).

    Weights are device arrays of raw block bytes [E, R, row_bytes] (E = 1 for a plain matrix);
    ``view`` gives what the kernel reads.
    """

    def __init__(self, qtype, tensor: str | None = None):
        import os

        from . import q8
        qt = self.qtype = as_qtype(qtype)
        self.fmt = get_format(qt, tensor)
        self.int8 = q8.supported(qt) and os.environ.get("FLASHMOE_FLOAT_KERNELS") != "1"
        self.qb = 0
        self.float_prompts = qt in _FLOAT_PROMPTS
        if self.int8:
            self.qb = q8.spec(qt)[1]
            self.kernel = q8.launcher(qt)

    def int8_for(self, many: bool) -> bool:
        """Whether a product with several tokens (``many``) or one takes the int8 kernel: the CPU
        path's choice (int8 for one token; for prompts, float for the formats whose CPU prompt
        kernel is the float one), so that both devices round alike."""
        return self.int8 and not (many and self.float_prompts)

    def view(self, w):
        from . import q8
        return q8.view(self.qtype, w) if self.int8 else w

    def __call__(self, w, ids, div, x, act, out, stream=0):
        """x [T, C] f32 device; act: x quantized (``q8.Act`` with this product's qb) or None."""
        if self.int8:
            self.kernel(w, ids, div, act, out, stream)
        else:
            self.fmt.matvec.ids(w, ids, div, x, out, stream)
