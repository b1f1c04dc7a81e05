"""Open GGUF files (one or several splits) and expose validated, zero-copy tensor views.

The header is parsed by ``gguf.GGUFReader`` (an ``np.memmap`` of the file, read-only). Tensor
data is never copied: each tensor is a read-only ``uint8`` view of the mapping shaped
``[*outer, rows, row_bytes]`` (the kernel contract), after its type, shape, offset and size were
checked against the file, so no kernel can ever index past the end of a mapping.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from .errors import GGUFError

_SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length (columns), innermost first
    offset: int  # absolute byte offset in its file
    n_bytes: int
    file_index: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def rows(self) -> int:
        return self.n_elements // self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[0]


class _Reader(GGUFReader):
    """GGUFReader that records tensor infos without building views, so that a bad tensor entry
    (unknown type, data past the end) is reported by name instead of failing in numpy."""

    def _build_tensors(self, start_offs: int, fields: list) -> None:  # noqa: D401 (gguf hook)
        self.raw_tensors = []
        for field in fields:
            _name_len, name_data, _n_dims, dims, raw_dtype, offset_tensor = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            self.raw_tensors.append(
                (name, int(raw_dtype[0]), tuple(int(d) for d in dims), int(start_offs + int(offset_tensor[0])))
            )
        self.tensors = []


def _metadata(reader: _Reader) -> dict[str, Any]:
    md: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        md[key] = field.contents()
        if field.types and field.types[0] == GGUFValueType.ARRAY and field.types[-1] != GGUFValueType.STRING:
            # numeric arrays: keep them as numpy (scores of 250k tokens, rope factors, ...)
            if field.data and all(len(field.parts[i]) == 1 for i in field.data[:1]):
                md[key] = np.array(md[key])
    return md


def split_paths(path: str | os.PathLike) -> list[Path]:
    """All files of a split model, given any one of them (``*-00001-of-00003.gguf``)."""
    p = Path(path)
    m = _SPLIT_RE.match(p.name)
    if not m:
        return [p]
    count = int(m["count"])
    return [p.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


class GGUFFile:
    """One model: metadata of the first file, tensors of all its splits, all memory-mapped."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.paths = split_paths(self.path)
        self.readers: list[_Reader] = []
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, Any] = {}
        for i, p in enumerate(self.paths):
            reader = self._open(p)
            self.readers.append(reader)
            if i == 0:
                self.metadata = _metadata(reader)
            for name, raw_type, dims, offset in reader.raw_tensors:
                if name in self.tensors:
                    raise GGUFError(f"{p}: tensor {name} appears twice")
                self.tensors[name] = self._check_tensor(p, i, reader, name, raw_type, dims, offset)
        n_split = int(self.metadata.get("split.count", 1))
        if n_split != len(self.paths):
            raise GGUFError(f"{self.path}: split.count is {n_split} but {len(self.paths)} file(s) were found")

    @staticmethod
    def _open(p: Path) -> _Reader:
        if not p.exists():
            raise GGUFError(f"{p}: no such file")
        if p.is_dir():
            raise GGUFError(f"{p}: is a directory, not a GGUF file")
        size = p.stat().st_size
        if size < 24:
            raise GGUFError(f"{p}: not a GGUF file (only {size} bytes)")
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise GGUFError(f"{p}: not a GGUF file (bad magic {magic!r})")
        try:
            return _Reader(p, "r")
        except (ValueError, IndexError, KeyError, UnicodeDecodeError, OverflowError, TypeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise GGUFError(f"{p}: corrupt or truncated GGUF header ({msg})") from None

    @staticmethod
    def _check_tensor(p: Path, i: int, reader: _Reader, name: str, raw_type: int, dims: tuple[int, ...], offset: int) -> TensorInfo:
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise GGUFError(f"{p}: tensor {name} has unknown type id {raw_type}") from None
        if qtype not in GGML_QUANT_SIZES:
            raise GGUFError(f"{p}: tensor {name} has unsupported type {qtype.name}")
        if not dims or any(d <= 0 for d in dims):
            raise GGUFError(f"{p}: tensor {name} has invalid shape {list(dims)}")
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        if dims[0] % block_size:
            raise GGUFError(
                f"{p}: tensor {name} row length {dims[0]} is not a multiple of {qtype.name}'s block size {block_size}"
            )
        n_elements = int(np.prod(dims, dtype=np.int64))
        n_bytes = n_elements // block_size * type_size
        if offset % reader.alignment:
            raise GGUFError(f"{p}: tensor {name} data offset {offset} is not aligned to {reader.alignment}")
        file_size = reader.data.shape[0]
        if offset < reader.data_offset or offset + n_bytes > file_size:
            raise GGUFError(
                f"{p}: tensor {name} data [{offset}, {offset + n_bytes}) lies outside the file "
                f"(data section {reader.data_offset}..{file_size}); the file is truncated or corrupt"
            )
        return TensorInfo(name, qtype, dims, offset, n_bytes, i)

    # -- access ---------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: tensor {name} is missing") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view shaped ``[*outer, rows, row_bytes]``."""
        t = self.info(name)
        block_size, type_size = GGML_QUANT_SIZES[t.qtype]
        row_bytes = t.cols // block_size * type_size
        outer = tuple(reversed(t.shape[1:]))
        data = self.readers[t.file_index].data[t.offset : t.offset + t.n_bytes]
        view = data.reshape(*outer, row_bytes) if outer else data.reshape(1, row_bytes)
        return np.asarray(view)  # a plain ndarray view: cheaper to pass to Numba than a memmap

    def float_view(self, name: str) -> np.ndarray:
        """An F32 tensor as a float32 view in numpy order (norm weights, biases, rope factors)."""
        t = self.info(name)
        if t.qtype != GGMLQuantizationType.F32:
            raise GGUFError(f"{self.path}: tensor {name} is {t.qtype.name}; F32 was expected")
        data = self.readers[t.file_index].data[t.offset : t.offset + t.n_bytes]
        return np.asarray(data.view(np.float32).reshape(tuple(reversed(t.shape))))

    @property
    def file_size(self) -> int:
        return sum(r.data.shape[0] for r in self.readers)

    def close(self) -> None:
        for r in self.readers:
            mm = getattr(r.data, "_mmap", None)
            if mm is not None:
                try:
                    mm.close()
                except (BufferError, ValueError):
                    pass  # views still alive: the mapping goes when they do
        self.readers = []
