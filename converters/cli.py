"""``flashmoe convert``: argument parsing only; the work is ``convert.convert``."""
from __future__ import annotations

import argparse
import sys
import time

from .errors import ConvertError


def _int(lo: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {s!r}")
        return v

    return parse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "convert", help="convert a Hugging Face model folder or a GGUF into a GGUF (quantize, upcycle)",
        description="Convert a Hugging Face model folder (config.json, safetensors, tokenizer) or a GGUF "
                    "file into one GGUF, streaming tensors in bounded memory.")
    p.add_argument("src", help="Hugging Face model folder, or a GGUF file to re-quantize")
    p.add_argument("-o", "--out", default=None, help="output GGUF file (written atomically)")
    p.add_argument("--experts", default="q4_k", metavar="TYPE", help="type of routed-expert tensors (default q4_k)")
    p.add_argument("--rest", default=None, metavar="TYPE",
                   help="type of the other weights (default q8_0; 'keep' for a GGUF source); "
                        "norms and routers stay F32")
    p.add_argument("--type", dest="overrides", action="append", default=[], metavar="REGEX=TYPE",
                   help="type of the tensors whose GGUF name matches REGEX (first match wins; repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (tensor, type, bytes, total) and stop")
    g = p.add_argument_group("upcycling (dense llama/qwen -> Mixtral-style MoE)")
    g.add_argument("--upcycle", type=_int(1), default=None, metavar="E", help="number of experts")
    g.add_argument("--top-k", type=_int(1), default=None, metavar="K", help="experts per token")
    g.add_argument("--seed", type=_int(0), default=0, help="seed of the permutations and the router (default 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)
    return p


def cmd_convert(a: argparse.Namespace) -> int:
    from .convert import convert

    if a.top_k is not None and a.upcycle is None:
        raise ConvertError("--top-k needs --upcycle E")
    upcycle = None
    if a.upcycle is not None:
        upcycle = (a.upcycle, a.top_k if a.top_k is not None else min(2, a.upcycle), a.seed)
    t0 = time.perf_counter()
    r = convert(a.src, a.out, experts=a.experts, rest=a.rest, overrides=a.overrides, dry_run=a.dry_run,
                upcycle=upcycle, progress=not a.quiet)
    if not a.dry_run:
        dt = time.perf_counter() - t0
        print(f"wrote {r.out}: {len(r.plan)} tensors, {r.file_bytes / 2**20:.1f} MiB in {dt:.1f} s "
              f"({r.src_bytes / 2**20 / max(dt, 1e-9):.0f} MB/s of source)", file=sys.stderr)
    return 0
