"""A GGUF file (any split of a multi-file model) as a conversion source: re-quantize its tensors,
keep its metadata (every key but the split bookkeeping; file type and quantization version are
rewritten). Tensors whose type does not change are copied byte for byte."""
from __future__ import annotations

import mmap
from pathlib import Path

from gguf import GGUFValueType
from gguf.gguf_writer import GGUFValue

from flashmoe_gguf.errors import GGUFError
from flashmoe_gguf.gguf_file import GGUFFile

from .errors import ConvertError
from .parts import QuantPart
from .plan import TensorPlan
from .source import Source

_PAGE = mmap.PAGESIZE


def _releaser(reader, offset: int, nbytes: int):
    mm = getattr(reader.data, "_mmap", None)

    def release() -> None:
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = offset // _PAGE * _PAGE
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, offset + nbytes - start)
        except (OSError, ValueError):
            pass

    return release


def open_gguf(path: str | Path) -> Source:
    try:
        gf = GGUFFile(path)
    except GGUFError as e:
        raise ConvertError(str(e)) from None
    arch = gf.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ConvertError(f"{path}: general.architecture is missing")
    meta: dict[str, GGUFValue] = {}
    for key, field in gf.readers[0].fields.items():
        if key.startswith(("GGUF.", "split.")):
            continue
        types = list(field.types)
        if not types:
            continue
        if types[0] == GGUFValueType.ARRAY:
            if len(types) > 2:
                continue  # arrays of arrays: no model key we know uses them
            meta[key] = GGUFValue(field.contents(), GGUFValueType.ARRAY, types[1] if len(types) > 1 else None)
        else:
            meta[key] = GGUFValue(field.contents(), types[0])
    plan = []
    for t in gf:
        reader = gf.readers[t.file_index]
        raw = gf.raw(t.name)
        part = QuantPart(raw.reshape(-1, raw.shape[-1]), t.qtype, t.cols, _releaser(reader, t.offset, t.n_bytes))
        plan.append(TensorPlan(t.name, tuple(reversed(t.shape)), [part], source_qtype=t.qtype))

    def num(key: str, default: int = 0) -> int:
        v = gf.metadata.get(f"{arch}.{key}", default)
        try:
            return int(v)
        except (TypeError, ValueError):
            return default

    n_head = num("attention.head_count")
    return Source(str(path), arch, meta, plan, n_layer=num("block_count"), n_head=n_head,
                  n_head_kv=num("attention.head_count_kv", n_head), n_embd=num("embedding_length"),
                  n_ff=num("feed_forward_length"), kind="gguf", info={"file": gf})
