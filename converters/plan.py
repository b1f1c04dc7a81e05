"""The conversion plan: every output tensor with its parts, role and chosen type.

Quantization policy (as llama.cpp's converter and quantizer decide):
* 1-D tensors, norms, biases, routers (``ffn_gate_inp*``) and ``ssm_conv1d`` stay F32;
* expert tensors (``*_exps``) take ``--experts``, every other weight ``--rest`` ("keep" keeps a
  GGUF source's type), then the first ``--type REGEX=TYPE`` whose regex matches the name;
* a row length that is not a multiple of the type's block size falls back as llama.cpp's
  ``tensor_type_fallback`` does (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0,
  IQ 256-block types -> IQ4_NL), and to F16 when even that does not divide the row.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from gguf import GGML_QUANT_SIZES, LlamaFileType
from gguf import GGMLQuantizationType as Q

from . import codec
from .errors import ConvertError
from .parts import Part

KEEP = "keep"

_FALLBACK = {
    Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.TQ1_0: Q.Q4_0, Q.TQ2_0: Q.Q4_0,
    Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0,
    Q.IQ1_S: Q.IQ4_NL, Q.IQ1_M: Q.IQ4_NL, Q.IQ2_XXS: Q.IQ4_NL, Q.IQ2_XS: Q.IQ4_NL, Q.IQ2_S: Q.IQ4_NL,
    Q.IQ3_XXS: Q.IQ4_NL, Q.IQ3_S: Q.IQ4_NL, Q.IQ4_XS: Q.IQ4_NL,
}

# general.file_type for the type that holds most of the weights (llama.cpp's "mostly" types;
# K-quants are written as their _M mix, which is what llama-quantize calls e.g. Q4_K)
_FILE_TYPE = {
    Q.F32: LlamaFileType.ALL_F32, Q.F16: LlamaFileType.MOSTLY_F16, Q.BF16: LlamaFileType.MOSTLY_BF16,
    Q.Q4_0: LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: LlamaFileType.MOSTLY_Q4_1, Q.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    Q.Q5_0: LlamaFileType.MOSTLY_Q5_0, Q.Q5_1: LlamaFileType.MOSTLY_Q5_1, Q.Q2_K: LlamaFileType.MOSTLY_Q2_K,
    Q.Q3_K: LlamaFileType.MOSTLY_Q3_K_M, Q.Q4_K: LlamaFileType.MOSTLY_Q4_K_M, Q.Q5_K: LlamaFileType.MOSTLY_Q5_K_M,
    Q.Q6_K: LlamaFileType.MOSTLY_Q6_K, Q.IQ2_XXS: LlamaFileType.MOSTLY_IQ2_XXS, Q.IQ2_XS: LlamaFileType.MOSTLY_IQ2_XS,
    Q.IQ2_S: LlamaFileType.MOSTLY_IQ2_S, Q.IQ3_XXS: LlamaFileType.MOSTLY_IQ3_XXS, Q.IQ3_S: LlamaFileType.MOSTLY_IQ3_S,
    Q.IQ1_S: LlamaFileType.MOSTLY_IQ1_S, Q.IQ1_M: LlamaFileType.MOSTLY_IQ1_M, Q.IQ4_NL: LlamaFileType.MOSTLY_IQ4_NL,
    Q.IQ4_XS: LlamaFileType.MOSTLY_IQ4_XS, Q.TQ1_0: LlamaFileType.MOSTLY_TQ1_0, Q.TQ2_0: LlamaFileType.MOSTLY_TQ2_0,
    Q.MXFP4: LlamaFileType.MOSTLY_MXFP4_MOE,
}


def parse_type(s: str, allow_keep: bool = False) -> Q | str:
    name = s.strip().upper()
    if allow_keep and name == KEEP.upper():
        return KEEP
    try:
        qt = Q[name]
    except KeyError:
        raise ConvertError(f"unknown tensor type {s!r} (e.g. f32, f16, bf16, q8_0, q6_k, q4_k, q3_k, q2_k"
                           f"{', keep' if allow_keep else ''})") from None
    if qt not in GGML_QUANT_SIZES:
        raise ConvertError(f"unknown tensor type {s!r}")
    return qt


def parse_override(s: str) -> tuple[re.Pattern, Q]:
    if "=" not in s:
        raise ConvertError(f"--type expects REGEX=TYPE, got {s!r}")
    pattern, _, typ = s.rpartition("=")
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ConvertError(f"--type {s!r}: bad regular expression ({e})") from None
    qt = parse_type(typ)
    assert isinstance(qt, Q)
    return rx, qt


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]  # numpy order: shape[-1] is the row length (ggml's ne[0])
    parts: list[Part]
    qtype: Q | None = None
    source_qtype: Q | None = None  # type in a GGUF source ("keep")
    note: str = ""  # why the type differs from the policy's first choice
    extra: dict = field(default_factory=dict)

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1

    @property
    def n_elements(self) -> int:
        return self.rows * self.cols

    @property
    def nbytes(self) -> int:
        assert self.qtype is not None
        return codec.tensor_bytes(self.qtype, self.shape)

    @property
    def src_nbytes(self) -> int:
        return sum(p.src_nbytes for p in self.parts)

    @property
    def is_expert(self) -> bool:
        return "_exps." in self.name

    @property
    def forced_f32(self) -> bool:
        n = self.name
        return (len(self.shape) <= 1 or n.endswith("_norm.weight") or not n.endswith(".weight")
                or ".ffn_gate_inp." in n or ".ffn_gate_inp_shexp." in n or ".ssm_conv1d." in n
                or n.startswith("rope_freqs"))

    def check(self) -> None:
        rows = sum(p.rows for p in self.parts)
        if rows != self.rows or any(p.cols != self.cols for p in self.parts):
            raise ConvertError(f"tensor {self.name}: parts do not add up to shape {list(self.shape)}")


def fallback(qtype: Q, cols: int) -> Q:
    bs = GGML_QUANT_SIZES[qtype][0]
    if cols % bs == 0:
        return qtype
    fb = _FALLBACK.get(qtype, qtype if bs <= 32 else Q.F16)
    if cols % GGML_QUANT_SIZES[fb][0]:
        fb = Q.F16
    return fb


def assign_types(plan: list[TensorPlan], experts: Q | str, rest: Q | str,
                 overrides: list[tuple[re.Pattern, Q]] = ()) -> None:
    for t in plan:
        if t.forced_f32:
            want = Q.F32
            for rx, qt in overrides:
                if rx.search(t.name) and qt in codec.FLOAT_TYPES:
                    want = qt
                    break
            t.qtype = want
            continue
        want = experts if t.is_expert else rest
        for rx, qt in overrides:
            if rx.search(t.name):
                want = qt
                break
        if want == KEEP:
            want = t.source_qtype or Q.Q8_0
        got = fallback(want, t.cols)
        if got != want:
            t.note = f"{want.name} needs rows of {GGML_QUANT_SIZES[want][0]}"
        t.qtype = got
    missing = sorted({t.qtype.name for t in plan
                      if t.qtype not in codec.FLOAT_TYPES
                      and not all(p.native == t.qtype for p in t.parts)
                      and not codec.can_encode(t.qtype)})
    if missing:
        raise ConvertError(f"no quantizer is available for {', '.join(missing)} "
                           "(gguf-py has Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; this project adds others)")


def file_type(plan: list[TensorPlan]) -> LlamaFileType:
    """llama.cpp's general.file_type: the type holding most parameters of the 2-D+ weights."""
    count: dict[Q, int] = {}
    for t in plan:
        if not t.forced_f32:
            count[t.qtype] = count.get(t.qtype, 0) + t.n_elements
    if not count:
        return LlamaFileType.ALL_F32
    main = max(count, key=count.get)
    return _FILE_TYPE.get(main, LlamaFileType.GUESSED)
