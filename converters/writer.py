"""Streaming GGUF writer: header, metadata and every tensor info first, then each tensor's data
converted chunk by chunk, into a temporary file in the output folder that is renamed over the
output at the end. An error or Ctrl-C removes the temporary file: no partial output, ever.

Memory: one chunk of rows at a time (``chunk_bytes`` of float32, 64 MiB by default) plus what a
part caches (an upcycled MLP tensor, encoded once).
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGUFWriter

from .errors import ConvertError
from .plan import TensorPlan
from .progress import make_progress

CHUNK_BYTES = 64 << 20


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def temp_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.{os.getpid()}.partial")


def check_output(out: Path) -> None:
    if out.is_dir():
        raise ConvertError(f"{out}: is a directory; give the output file name")


def write_gguf(out: str | os.PathLike, arch: str, add_metadata: Callable[[GGUFWriter], None],
               plan: list[TensorPlan], progress: bool = True, chunk_bytes: int = CHUNK_BYTES) -> Path:
    out = Path(out)
    check_output(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConvertError(f"{out.parent}: cannot create the output folder ({e.strerror})") from None
    tmp = temp_path(out)
    w = None
    try:
        w = GGUFWriter(tmp, arch)
        add_metadata(w)
        for t in plan:
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        align = w.data_alignment
        start = _pad(fout.tell(), align)
        data_bytes = sum(_pad(t.nbytes, align) for t in plan)
        free = shutil.disk_usage(out.parent).free
        if free < data_bytes:
            raise ConvertError(f"{out.parent}: not enough disk space ({free / 2**30:.2f} GiB free, "
                               f"the output needs {(start + data_bytes) / 2**30:.2f} GiB)")
        fout.write(bytes(start - fout.tell()))
        total_src = sum(t.src_nbytes for t in plan)
        with make_progress(progress, len(plan), total_src) as bar:
            for t in plan:
                bar.tensor(t.name)
                written = _write_tensor(fout, t, chunk_bytes, bar.advance)
                if written != t.nbytes:
                    raise ConvertError(f"tensor {t.name}: wrote {written} bytes, expected {t.nbytes}")
                fout.write(bytes(_pad(written, align) - written))
                bar.tensor_done()
        fout.flush()
        os.fsync(fout.fileno())
        w.close()
        w = None
        os.replace(tmp, out)
        return out
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ConvertError(f"{out.parent}: disk full while writing {out.name}") from None
        raise ConvertError(f"{out}: cannot write ({e.strerror or e})") from None
    finally:
        if w is not None:
            try:
                w.close()
            except OSError:
                pass
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:
                pass


def _write_tensor(fout, t: TensorPlan, chunk_bytes: int, advance: Callable[[int], None]) -> int:
    written = 0
    for part in t.parts:
        step = max(1, chunk_bytes // (4 * part.cols))
        for r0 in range(0, part.rows, step):
            r1 = min(part.rows, r0 + step)
            data = part.encode(slice(r0, r1), t.qtype)
            fout.write(memoryview(np.ascontiguousarray(data)).cast("B"))
            written += data.nbytes
            advance(part.src_nbytes * (r1 - r0) // max(part.rows, 1))
        part.release()
    return written
