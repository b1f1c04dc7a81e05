"""``convert()``: a Hugging Face folder or a GGUF file -> one GGUF, streamed, in bounded memory.

    src = open_source(path)            # metadata and the tensor plan; no weights read yet
    upcycle(src, E, K, seed)           # optional: dense -> MoE
    assign_types(plan, experts, rest)  # the quantization policy (plan.py)
    write_gguf(out, ...)               # header + infos, then tensors chunk by chunk, atomic rename
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import gguf
from gguf import GGUFValueType

from .errors import ConvertError
from .plan import KEEP, TensorPlan, assign_types, file_type, parse_override, parse_type
from .source import Source
from .writer import check_output, write_gguf

DEFAULT_EXPERTS = "q4_k"
DEFAULT_REST_HF = "q8_0"


def open_source(path: str | os.PathLike) -> Source:
    p = Path(path)
    if p.is_dir():
        from .hf import open_hf

        return open_hf(p)
    if not p.exists():
        raise ConvertError(f"{p}: no such file or folder")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from .gguf_source import open_gguf

        return open_gguf(p)
    if p.name == "config.json":
        from .hf import open_hf

        return open_hf(p.parent)
    raise ConvertError(f"{p}: neither a Hugging Face model folder nor a GGUF file")


def _size_label(plan: list[TensorPlan]) -> str:
    total = shared = expert = 0
    counts = []
    for t in plan:
        n = t.n_elements
        total += n
        if t.is_expert and len(t.shape) >= 3:
            counts.append(t.shape[0])
            expert += n // t.shape[0]
        else:
            shared += n
    n_expert = sum(counts) // len(counts) if counts else 0
    return gguf.size_label(total, shared, expert, n_expert)


@dataclass
class Result:
    out: Path | None
    source: Source
    plan: list[TensorPlan]
    file_bytes: int  # tensor data bytes (the header adds a little)

    @property
    def src_bytes(self) -> int:
        return sum(t.src_nbytes for t in self.plan)


def convert(src: str | os.PathLike, out: str | os.PathLike | None, experts: str = DEFAULT_EXPERTS,
            rest: str | None = None, overrides: Sequence[str] = (), dry_run: bool = False,
            upcycle: tuple[int, int, int] | None = None, progress: bool = True,
            echo: Callable[[str], None] = print) -> Result:
    """Convert ``src`` into ``out``. ``experts``/``rest``: tensor types (names such as "q4_k",
    "q8_0", "f16"; ``rest`` may be "keep" for a GGUF source, its default); ``overrides``:
    "REGEX=TYPE" rules, first match wins; ``upcycle``: (experts, top_k, seed)."""
    if not dry_run:
        if out is None:
            raise ConvertError("give the output file with -o OUT.gguf")
        check_output(Path(out))
    exp_t = parse_type(experts, allow_keep=True)
    rules = [parse_override(s) for s in overrides]
    source = open_source(src)
    rest_t = parse_type(rest if rest is not None else (KEEP if source.kind == "gguf" else DEFAULT_REST_HF),
                        allow_keep=True)
    if upcycle is not None:
        from .upcycle import upcycle as do_upcycle

        do_upcycle(source, *upcycle)
    plan = source.plan
    assign_types(plan, exp_t, rest_t, rules)
    source.set("general.file_type", int(file_type(plan)), GGUFValueType.UINT32)
    source.set("general.quantization_version", gguf.GGML_QUANT_VERSION, GGUFValueType.UINT32)
    if source.kind == "hf" or upcycle is not None or "general.size_label" not in source.meta:
        source.set("general.size_label", _size_label(plan), GGUFValueType.STRING)
    data_bytes = sum(t.nbytes for t in plan)
    result = Result(None, source, plan, data_bytes)
    if dry_run:
        echo(format_plan(result))
        return result

    def add_metadata(w: gguf.GGUFWriter) -> None:
        w.kv_data[0] = dict(source.meta)

    result.out = write_gguf(out, source.arch, add_metadata, plan, progress=progress)
    return result


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return ""


def format_plan(r: Result) -> str:
    lines = []
    w = max((len(t.name) for t in r.plan), default=10)
    for t in r.plan:
        shape = "{" + ", ".join(str(d) for d in reversed(t.shape)) + "}"
        note = f"  ({t.note})" if t.note else ""
        lines.append(f"{t.name:<{w}}  {shape:<22} {t.qtype.name:<7} {_fmt_bytes(t.nbytes):>11}{note}")
    by_type: dict[str, int] = {}
    for t in r.plan:
        by_type[t.qtype.name] = by_type.get(t.qtype.name, 0) + t.nbytes
    mix = ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in sorted(by_type.items(), key=lambda kv: -kv[1]))
    lines.append(f"architecture {r.source.arch}; {len(r.plan)} tensors; {mix}")
    lines.append(f"total: {_fmt_bytes(r.file_bytes)} of tensor data (source {_fmt_bytes(r.src_bytes)})")
    return "\n".join(lines)
