"""Lazy safetensors reading: each shard memory-mapped, tensors as zero-copy numpy views.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, offsets
relative to the end of the header), then the tensor bytes. Every entry is checked against the file
size before use, so a truncated shard is reported by name instead of failing inside numpy.

Pages of a mapping stay resident (and count in RSS) once touched: ``release`` drops a tensor's
pages from this process (``MADV_DONTNEED``; the page cache keeps them) after it was converted, so
the converter's memory does not grow with the model.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q

from .errors import ConvertError

# safetensors dtype -> (numpy storage dtype, GGML type holding the same bytes or None)
DTYPES: dict[str, tuple[np.dtype, Q | None]] = {
    "F32": (np.dtype("<f4"), Q.F32),
    "F16": (np.dtype("<f2"), Q.F16),
    "BF16": (np.dtype("<u2"), Q.BF16),
    "F64": (np.dtype("<f8"), None),
    "I64": (np.dtype("<i8"), None),
    "I32": (np.dtype("<i4"), None),
    "I16": (np.dtype("<i2"), None),
    "I8": (np.dtype("i1"), None),
    "U8": (np.dtype("u1"), None),
    "BOOL": (np.dtype("u1"), None),
    "F8_E4M3": (np.dtype("u1"), None),  # decoded by f8_e4m3_to_f32
}
FLOAT_DTYPES = ("F32", "F16", "BF16")
_MAX_HEADER = 100 << 20
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class STensor:
    """One tensor of a shard: where its bytes are and how to read them."""

    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    file: "SafetensorsFile"
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def native(self) -> Q | None:
        return DTYPES[self.dtype][1]

    def array(self) -> np.ndarray:
        """The tensor as a read-only view of the mapping (BF16 as its uint16 bits)."""
        if self.dtype not in FLOAT_DTYPES:
            raise ConvertError(f"{self.file.path}: tensor {self.name} has dtype {self.dtype}; "
                               f"only {', '.join(FLOAT_DTYPES)} weights can be converted")
        dt = DTYPES[self.dtype][0]
        n = self.nbytes // dt.itemsize
        return np.frombuffer(self.file.buffer, dtype=dt, count=n, offset=self.offset).reshape(self.shape)

    def storage(self) -> np.ndarray:
        """The tensor's stored values of any dtype as a read-only view (F8_E4M3 and BF16 as their
        bits: uint8, uint16), for the architectures that decode them (FP8 weights, MXFP4 blocks)."""
        dt = DTYPES[self.dtype][0]
        n = self.nbytes // dt.itemsize
        return np.frombuffer(self.file.buffer, dtype=dt, count=n, offset=self.offset).reshape(self.shape)

    def release(self) -> None:
        self.file.release(self.offset, self.nbytes)


def _f8_e4m3_table() -> np.ndarray:
    """float32 value of each float8 e4m3fn byte: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa
    bits; subnormals at exponent 0; no infinities; S.1111.111 (0x7F, 0xFF) is NaN."""
    out = np.empty(256, dtype=np.float32)
    for b in range(256):
        sign = -1.0 if b & 0x80 else 1.0
        e, m = (b >> 3) & 0xF, b & 0x7
        if e == 0xF and m == 0x7:
            out[b] = np.nan
        elif e == 0:
            out[b] = sign * m / 8.0 * 2.0 ** -6
        else:
            out[b] = sign * (1.0 + m / 8.0) * 2.0 ** (e - 7)
    return out


F8_E4M3_TABLE = _f8_e4m3_table()


def f8_e4m3_to_f32(bits: np.ndarray) -> np.ndarray:
    """float8 e4m3fn bytes (uint8) -> float32."""
    return F8_E4M3_TABLE[np.asarray(bits, dtype=np.uint8)]


class SafetensorsFile:
    """One shard: header parsed and validated, data memory-mapped read-only."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise ConvertError(f"{self.path}: cannot open ({e.strerror})") from None
        try:
            size = os.fstat(fd).st_size
            if size < 8:
                raise ConvertError(f"{self.path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            if n > min(size - 8, _MAX_HEADER):
                raise ConvertError(f"{self.path}: corrupt or truncated safetensors file (header of {n} bytes, "
                                   f"file of {size})")
            try:
                header = json.loads(os.pread(fd, n, 8).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConvertError(f"{self.path}: corrupt safetensors header ({e})") from None
            if not isinstance(header, dict):
                raise ConvertError(f"{self.path}: corrupt safetensors header (not a JSON object)")
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size > 0 else None
        finally:
            os.close(fd)
        self.size = size
        self.buffer = memoryview(self._mm) if self._mm is not None else memoryview(b"")
        data_start = 8 + n
        self.tensors: dict[str, STensor] = {}
        for name, e in header.items():
            if name == "__metadata__":
                continue
            self.tensors[name] = self._entry(name, e, data_start)

    def _entry(self, name: str, e: object, data_start: int) -> STensor:
        bad = f"{self.path}: corrupt safetensors header entry for {name}"
        if not isinstance(e, dict):
            raise ConvertError(bad)
        dtype, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if dtype not in DTYPES:
            raise ConvertError(f"{self.path}: tensor {name} has unsupported dtype {dtype!r}")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)):
            raise ConvertError(bad)
        begin, end = offs
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype][0].itemsize
        if end - begin != nbytes or begin < 0:
            raise ConvertError(f"{bad}: {end - begin} bytes for shape {shape} of {dtype}")
        if data_start + end > self.size:
            raise ConvertError(f"{self.path}: tensor {name} lies past the end of the file "
                               f"(needs {data_start + end} bytes, file has {self.size}); the shard is truncated")
        return STensor(name, dtype, tuple(shape), self, data_start + begin, nbytes)

    def release(self, offset: int, nbytes: int) -> None:
        """Drop this process's resident pages of a byte range (the data stays in the page cache)."""
        if self._mm is None or nbytes <= 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = offset // _PAGE * _PAGE
        end = min(self.size, offset + nbytes)
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass


class SafetensorsIndex:
    """All tensors of a Hugging Face folder's shards, by name (via ``model.safetensors.index.json``
    when present, else the ``model*.safetensors`` files)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.files: dict[str, SafetensorsFile] = {}
        self.tensors: dict[str, STensor] = {}
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
                raise ConvertError(f"{index}: cannot read the shard index ({e})") from None
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConvertError(f"{index}: no weight_map in the shard index")
            for fname in dict.fromkeys(weight_map.values()):
                p = self.folder / str(fname)
                if not p.is_file():
                    raise ConvertError(f"{p}: shard named in {index.name} is missing")
                self.files[str(fname)] = SafetensorsFile(p)
            for name, fname in weight_map.items():
                t = self.files[str(fname)].tensors.get(name)
                if t is None:
                    raise ConvertError(f"{self.folder / str(fname)}: tensor {name} (listed in {index.name}) "
                                       "is missing; the shard is incomplete")
                self.tensors[name] = t
            return
        paths = sorted(self.folder.glob("model*.safetensors")) or sorted(self.folder.glob("*.safetensors"))
        if not paths:
            bins = sorted(self.folder.glob("pytorch_model*.bin"))
            hint = " (PyTorch .bin checkpoints are not supported: re-save with safe_serialization=True)" if bins else ""
            raise ConvertError(f"{self.folder}: no .safetensors files{hint}")
        for p in paths:
            f = SafetensorsFile(p)
            self.files[p.name] = f
            for name, t in f.tensors.items():
                if name in self.tensors:
                    raise ConvertError(f"{self.folder}: tensor {name} appears in two shards")
                self.tensors[name] = t

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())
