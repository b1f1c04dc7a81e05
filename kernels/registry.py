"""Formats as data: GGMLQuantizationType -> the module that computes with it.

Every CPU module ``kernels/cpu/<name>.py`` exports the same functions (weights are always the raw
bytes of the tensor, a C-contiguous ``uint8`` array shaped ``[rows, row_bytes]``):

    QTYPE                                   # gguf.GGMLQuantizationType handled by the module
    matvec(w, x, out)                       # w [R, RB] u8, x [C] f32, out [R] f32   (decode)
    matmul(w, x, out)                       # w [R, RB] u8, x [T, C] f32, out [T, R] f32 (prefill)
    dequantize_rows(w, ids, out)            # rows `ids` of w as f32 into out [len(ids), C]

The K-quants also have a grouped product of a MoE layer's routed experts (``kq_grouped.py``,
``Format.matvec_ids``).

Quantizers live beside them in ``kernels/cpu/<name>_quant.py`` (``quantize(x, importance=None)``:
f32 [R, C] -> u8 [R, RB] in ggml's byte layout), so that running a model never compiles them.

R = output rows, C = columns (inputs), RB = C // block_size * type_size, T = tokens.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


class KernelError(ValueError):
    """A tensor whose block format has no kernel here."""


# Module name inside ``kernels/cpu`` for each supported type; the module is imported lazily so
# that a program pays Numba's compile time only for the formats its model uses.
_CPU_MODULES: dict[GGMLQuantizationType, str] = {
    GGMLQuantizationType.F32: "f32",
    GGMLQuantizationType.F16: "f16",
    GGMLQuantizationType.BF16: "bf16",
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
    GGMLQuantizationType.IQ4_NL: "iq4_nl",
    GGMLQuantizationType.IQ4_XS: "iq4_xs",
    GGMLQuantizationType.IQ3_XXS: "iq3_xxs",
    GGMLQuantizationType.IQ3_S: "iq3_s",
    GGMLQuantizationType.IQ2_XXS: "iq2_xxs",
    GGMLQuantizationType.IQ2_XS: "iq2_xs",
    GGMLQuantizationType.IQ2_S: "iq2_s",
    GGMLQuantizationType.MXFP4: "mxfp4",
}


@dataclass(frozen=True)
class Format:
    qtype: GGMLQuantizationType
    block_size: int  # weights per block
    type_size: int  # bytes per block
    module: ModuleType

    @property
    def matvec(self) -> Callable:
        return self.module.matvec

    @property
    def matmul(self) -> Callable:
        return self.module.matmul

    @property
    def matvec_ids(self) -> Callable | None:
        """The grouped product of a MoE layer's routed experts, where the format has one:
        ``matvec_ids(w [E, R, RB], ids [n], x [1 or n, C], out [n, R])``, each row of out equal
        to ``matvec(w[ids[j]], x[j or 0])`` bit for bit."""
        from .cpu import kq_grouped, legacy_grouped
        return kq_grouped.matvec_ids(self.qtype) or legacy_grouped.matvec_ids(self.qtype)

    @property
    def dequantize_rows(self) -> Callable:
        return self.module.dequantize_rows

    @property
    def quantize(self) -> Callable | None:
        name = f"{self.module.__name__}_quant"
        if importlib.util.find_spec(name) is None:
            return None
        return importlib.import_module(name).quantize

    def row_bytes(self, cols: int) -> int:
        return cols // self.block_size * self.type_size


def as_qtype(qtype: GGMLQuantizationType | str | int) -> GGMLQuantizationType:
    """Accept a GGMLQuantizationType, its name ("Q4_K", "q4_k") or its number."""
    if isinstance(qtype, GGMLQuantizationType):
        return qtype
    if isinstance(qtype, str):
        try:
            return GGMLQuantizationType[qtype.upper()]
        except KeyError:
            raise KernelError(f"unknown quantization type {qtype!r}") from None
    try:
        return GGMLQuantizationType(int(qtype))
    except ValueError:
        raise KernelError(f"unknown quantization type {qtype!r}") from None


_loaded: dict[GGMLQuantizationType, Format] = {}


def _module_exists(name: str) -> bool:
    return importlib.util.find_spec(f"{__package__}.cpu.{name}") is not None


def supported_types() -> list[GGMLQuantizationType]:
    return [t for t, name in _CPU_MODULES.items() if _module_exists(name)]


def get_format(qtype: GGMLQuantizationType | str | int, tensor: str | None = None) -> Format:
    """The kernels for ``qtype``; a clear KernelError (naming ``tensor``) if there are none."""
    qt = as_qtype(qtype)
    fmt = _loaded.get(qt)
    if fmt is not None:
        return fmt
    name = _CPU_MODULES.get(qt)
    if name is None or not _module_exists(name):
        where = f" (tensor {tensor})" if tensor else ""
        raise KernelError(f"no CPU kernel for quantization type {qt.name}{where}")
    module = importlib.import_module(f"{__package__}.cpu.{name}")
    block_size, type_size = GGML_QUANT_SIZES[qt]
    fmt = Format(qt, block_size, type_size, module)
    _loaded[qt] = fmt
    return fmt
