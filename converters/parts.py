"""Sources of tensor rows: what the writer streams from.

An output tensor is a list of parts stacked along its rows (an expert tensor [E, F, D] is E parts
of [F, D]; a 1-D tensor [N] is one part of one row). A part reads any selection of its rows
(a slice, or an index array for permutations) as float32, or directly in a GGML type:
``encode(sel, qtype)`` copies bytes when the part is stored in that type already (a bf16
checkpoint written as BF16, a GGUF tensor kept as it is) and quantizes otherwise.

R = rows of the part, C = columns (row length).
"""
from __future__ import annotations

from typing import Callable, Union

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from . import codec

Sel = Union[slice, np.ndarray]


class Part:
    rows: int
    cols: int
    native: Q | None = None  # GGML type whose bytes ``raw`` returns, if any
    src_nbytes: int = 0  # source bytes read for this part (progress and speed)

    def floats(self, sel: Sel) -> np.ndarray:  # [n, C] f32
        raise NotImplementedError

    def raw(self, sel: Sel) -> np.ndarray:  # [n, row_bytes(native)] u8
        raise NotImplementedError

    def encode(self, sel: Sel, qtype: Q) -> np.ndarray:
        if qtype == self.native:
            return self.raw(sel)
        return codec.encode(self.floats(sel), qtype)

    def release(self) -> None:
        """Called when the writer is done with the part (drop mapped pages, caches)."""


class ArrayPart(Part):
    """A 2-D float array (a view of a mapped safetensors tensor, or an array in memory).
    ``bf16``: the array holds bfloat16 bits as uint16."""

    def __init__(self, arr: np.ndarray, native: Q | None, release: Callable[[], None] | None = None):
        if arr.ndim == 1:
            arr = arr.reshape(1, -1)
        assert arr.ndim == 2
        self.arr = arr
        self.rows, self.cols = arr.shape
        self.native = native
        self.src_nbytes = arr.nbytes
        self._release = release

    def floats(self, sel: Sel) -> np.ndarray:
        a = self.arr[sel]
        if self.native == Q.BF16:
            return codec.bf16_bits_to_f32(a)
        return a.astype(np.float32)

    def raw(self, sel: Sel) -> np.ndarray:
        return np.ascontiguousarray(self.arr[sel]).view(np.uint8)

    def release(self) -> None:
        if self._release is not None:
            self._release()


class QuantPart(Part):
    """Rows of a tensor stored in a GGML block format (a GGUF source): uint8 [R, row_bytes]."""

    def __init__(self, raw: np.ndarray, qtype: Q, cols: int, release: Callable[[], None] | None = None):
        self._raw = raw.reshape(-1, codec.row_bytes(qtype, cols))
        self.rows, self.cols = self._raw.shape[0], cols
        self.native = qtype
        self.src_nbytes = self._raw.nbytes
        self._release = release

    def floats(self, sel: Sel) -> np.ndarray:
        return codec.decode(self._raw[sel], self.native, self.cols)

    def raw(self, sel: Sel) -> np.ndarray:
        return np.ascontiguousarray(self._raw[sel])

    def release(self) -> None:
        if self._release is not None:
            self._release()


class RowPermuted(Part):
    """Rows ``index`` of another part, in that order (llama's Q/K reordering, upcycled experts)."""

    def __init__(self, base: Part, index: np.ndarray):
        self.base, self.index = base, np.asarray(index, dtype=np.int64)
        self.rows, self.cols = len(self.index), base.cols
        self.native = base.native
        self.src_nbytes = base.src_nbytes

    def floats(self, sel: Sel) -> np.ndarray:
        return self.base.floats(self.index[sel])

    def raw(self, sel: Sel) -> np.ndarray:
        return self.base.raw(self.index[sel])

    def encode(self, sel: Sel, qtype: Q) -> np.ndarray:
        return self.base.encode(self.index[sel], qtype)

    def release(self) -> None:
        self.base.release()


class ColPermuted(Part):
    """Columns ``index`` of another part. When the permutation moves whole ``unit``-wide groups
    and the block size divides ``unit``, encoded rows are permuted block by block (the bytes of
    each block are those of the base part's), so quantizing before or after permuting is the same."""

    def __init__(self, base: Part, index: np.ndarray, unit: int = 1):
        self.base, self.index, self.unit = base, np.asarray(index, dtype=np.int64), unit
        self.rows, self.cols = base.rows, base.cols
        assert len(self.index) == self.cols
        self.native = base.native if self._block_permutable(base.native) else None
        self.src_nbytes = base.src_nbytes

    def _block_permutable(self, qtype: Q | None) -> bool:
        return qtype is not None and self.unit % GGML_QUANT_SIZES[qtype][0] == 0

    def _block_index(self, qtype: Q) -> np.ndarray:
        bs = GGML_QUANT_SIZES[qtype][0]
        return self.index[::bs] // bs

    def floats(self, sel: Sel) -> np.ndarray:
        return np.ascontiguousarray(self.base.floats(sel)[:, self.index])

    def _permute_blocks(self, enc: np.ndarray, qtype: Q) -> np.ndarray:
        ts = GGML_QUANT_SIZES[qtype][1]
        n = enc.shape[0]
        return np.ascontiguousarray(enc.reshape(n, -1, ts)[:, self._block_index(qtype)]).reshape(n, -1)

    def raw(self, sel: Sel) -> np.ndarray:
        return self._permute_blocks(self.base.raw(sel), self.native)

    def encode(self, sel: Sel, qtype: Q) -> np.ndarray:
        if self._block_permutable(qtype):
            return self._permute_blocks(self.base.encode(sel, qtype), qtype)
        return codec.encode(self.floats(sel), qtype)

    def release(self) -> None:
        self.base.release()


class CachedPart(Part):
    """Encodes the whole base part once per type and serves selections from that: several
    permuted copies (upcycled experts) of one tensor cost one quantization. ``users``: how many
    parts read through this one; the cache and the base are released after the last."""

    def __init__(self, base: Part, users: int = 1):
        self.base = base
        self.rows, self.cols, self.native = base.rows, base.cols, base.native
        self.src_nbytes = base.src_nbytes
        self._users = users
        self._cache: tuple[Q, np.ndarray] | None = None

    def floats(self, sel: Sel) -> np.ndarray:
        return self.base.floats(sel)

    def raw(self, sel: Sel) -> np.ndarray:
        return self.base.raw(sel)

    def encode(self, sel: Sel, qtype: Q) -> np.ndarray:
        if self._cache is None or self._cache[0] != qtype:
            self._cache = (qtype, self.base.encode(slice(None), qtype))
        return self._cache[1][sel]

    def release(self) -> None:
        self._users -= 1
        if self._users <= 0:
            self._cache = None
            self.base.release()
