"""The ``flashmoe`` command: thin argument parsing over the library.

User errors (bad files, bad values) print one line ``flashmoe: error: ...`` and exit 1 (2 for
usage errors, as argparse does); they never print a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import FlashMoEError


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}")
    return v


def _float_in(lo: float, hi: float, lo_open: bool = False) -> Callable[[str], float]:
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if v != v or v > hi or v < lo or (lo_open and v == lo):
            bracket = "(" if lo_open else "["
            raise argparse.ArgumentTypeError(f"expected a number in {bracket}{lo}, {hi}], got {s!r}")
        return v

    return parse


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, help="GGUF file (any split of a multi-file model)")
    p.add_argument("-c", "--ctx-size", type=_positive_int, default=None, help="context window (default: min(train, 4096))")
    p.add_argument("-t", "--threads", type=_positive_int, default=None, help="compute threads (default: all cores)")
    p.add_argument("-b", "--batch-size", type=_positive_int, default=256, help="prompt tokens per forward pass")
    p.add_argument("--device", choices=("cpu", "cuda", "hybrid", "auto"), default="cpu",
                   help="cuda: the model in GPU memory; hybrid: routed experts from host memory, the "
                        "rest on the GPU; auto: the best that fits")
    p.add_argument("--gpu-expert-cache", type=_float_in(0.0, 1e6), default=0.0, metavar="GB",
                   help="hybrid: keep up to GB of routed experts in GPU memory (LRU); 0 = compute "
                        "experts outside it on the CPU")
    p.add_argument("--unified-memory", action="store_true",
                   help="GPU kernels read the experts in place from the mapped file (no copy)")
    g = p.add_argument_group("mixture of experts")
    g.add_argument("--experts-per-token", type=_positive_int, default=None, metavar="K",
                   help="override the model's top-k experts per token")
    g.add_argument("--expert-read", choices=("populate", "willneed", "pread", "none"), default="populate",
                   help="how routed experts are read from disk (default: populate)")
    g.add_argument("--max-resident", type=_float_in(0.0, 1e6, lo_open=True), default=None, metavar="GB",
                   help="keep at most GB of expert bytes resident (LRU eviction from the page cache)")
    g.add_argument("--mlock-dense", action="store_true", help="lock the non-expert weights in memory")


def add_sampling_args(p: argparse.ArgumentParser, temp: float = 0.8) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temp", type=_float_in(0.0, 100.0), default=temp, help="temperature; 0 = greedy")
    g.add_argument("--top-k", type=_nonneg_int, default=40, help="0 = off")
    g.add_argument("--top-p", type=_float_in(0.0, 1.0, lo_open=True), default=0.95)
    g.add_argument("--min-p", type=_float_in(0.0, 1.0), default=0.05)
    g.add_argument("--repeat-penalty", type=_float_in(0.0, 100.0, lo_open=True), default=1.0)
    g.add_argument("--repeat-last-n", type=_nonneg_int, default=64)
    g.add_argument("--seed", type=_nonneg_int, default=None)


def sampling_kwargs(a: argparse.Namespace) -> dict:
    return dict(temperature=a.temp, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                repeat_penalty=a.repeat_penalty, repeat_last_n=a.repeat_last_n, seed=a.seed)


def load_model(a: argparse.Namespace):
    from .model import Model

    return Model.load(a.model, n_ctx=a.ctx_size, threads=a.threads, n_batch=a.batch_size,
                      experts_per_token=a.experts_per_token, expert_read=a.expert_read,
                      max_resident_gb=a.max_resident, mlock_dense=a.mlock_dense, device=a.device,
                      gpu_expert_cache_gb=a.gpu_expert_cache, unified_memory=a.unified_memory)


# -- info ---------------------------------------------------------------------------------------
def cmd_info(a: argparse.Namespace) -> int:
    from .info import describe

    print(describe(a.model))
    return 0


# -- run ----------------------------------------------------------------------------------------
def cmd_run(a: argparse.Namespace) -> int:
    model = load_model(a)
    prompt = a.prompt
    if prompt is None:
        if a.file is None:
            raise FlashMoEError("give a prompt with -p TEXT or -f FILE")
        try:
            with open(a.file, encoding="utf-8") as f:
                prompt = f.read()
        except OSError as e:
            raise FlashMoEError(f"{a.file}: cannot read the prompt file ({e.strerror})") from None
    out = sys.stdout
    stats = None
    for chunk in model.generate(prompt, max_tokens=a.n_predict, **sampling_kwargs(a)):
        if chunk.text:
            out.write(chunk.text)
            out.flush()
        if chunk.stats is not None:
            stats = chunk.stats
    out.write("\n")
    out.flush()
    if stats is not None:
        print(stats.summary(), file=sys.stderr)
    if a.stats:
        print(io_summary(model), file=sys.stderr)
    return 0


def io_summary(model) -> str:
    """Expert I/O over the decode steps of the last generation (MoE models)."""
    store = model.store
    if store is None:
        return "experts: none (dense model)"
    from .info import human_bytes

    mode = getattr(model.net, "mode", None)  # a GPU model
    if mode == "cuda":
        return "experts: in GPU memory, routed and computed there (no page-cache I/O)"
    if mode == "unified":
        return "experts: read in place by the GPU from the mapped file (no copies, no page-cache I/O accounting)"
    cache = getattr(model.net, "expert_stats", None) if mode == "hybrid" else None
    if cache is not None:
        n = cache["hits"] + cache["misses"]
        return (f"experts: GPU expert cache hits {100 * cache['hits'] / max(n, 1):.1f}% of {n} routed "
                f"experts, {human_bytes(cache['bytes_copied'])} copied to the GPU")

    t = store.stats.totals()
    n = max(len(store.stats.steps), 1)
    gbps = t.miss_bytes / t.io_wait / 1e9 if t.io_wait > 0 else 0.0
    layers = sum(1 for b in getattr(model.net, "blocks", []) if hasattr(getattr(b, "mlp", None), "n_used"))
    return (f"experts: {t.experts / n:.1f} per token ({t.experts / n / max(layers, 1):.1f} per layer), "
            f"{human_bytes(t.expert_bytes / n)} routed per token, "
            f"page-cache hits {100 * store.stats.hit_rate:.1f}%, read from disk {human_bytes(t.miss_bytes / n)} per token, "
            f"I/O wait {1000 * t.io_wait / n:.1f} ms per token ({gbps:.2f} GB/s while waiting), "
            f"compute {1000 * (t.seconds - t.io_wait) / n:.1f} ms per token")


# -- chat ---------------------------------------------------------------------------------------
def cmd_chat(a: argparse.Namespace) -> int:
    from .repl import run_chat

    return run_chat(a)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashmoe", description="Run GGUF language models (MoE first) from Python.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    pi = sub.add_parser("info", help="describe a GGUF model: architecture, parameters, tensor types")
    pi.add_argument("model", help="GGUF file")
    pi.set_defaults(func=cmd_info)

    pr = sub.add_parser("run", help="generate a continuation of a prompt (text to stdout, stats to stderr)")
    add_model_args(pr)
    pr.add_argument("-p", "--prompt", default=None, help="prompt text (special tokens are parsed)")
    pr.add_argument("-f", "--file", default=None, help="read the prompt from a file")
    pr.add_argument("-n", "--n-predict", type=_nonneg_int, default=128, help="tokens to generate")
    pr.add_argument("--stats", action="store_true", help="print expert I/O statistics to stderr")
    add_sampling_args(pr)
    pr.set_defaults(func=cmd_run)

    pc = sub.add_parser("chat", help="chat with a model in the terminal")
    add_model_args(pc)
    pc.add_argument("--system", default=None, help="system prompt")
    pc.add_argument("-n", "--n-predict", type=_nonneg_int, default=1024, help="max tokens per reply")
    pc.add_argument("--plain", action="store_true", help="stream raw text (no Markdown rendering)")
    pc.add_argument("--history", default=None, metavar="FILE",
                    help="input history file (default: ~/.flashmoe_history; '' keeps none)")
    pc.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="skip the warm-up pass over the system prompt at start")
    add_sampling_args(pc)
    pc.set_defaults(func=cmd_chat)

    import importlib.util

    if importlib.util.find_spec("flashmoe_gguf.converters.cli") is not None:
        from .converters.cli import add_parser as add_convert_parser  # `flashmoe convert`

        add_convert_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    from .kernels import KernelError
    from .tokenizer import TokenizerError

    try:
        return a.func(a)
    except (FlashMoEError, KernelError, TokenizerError) as e:
        print(f"flashmoe: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except MemoryError:
        print("flashmoe: error: out of memory", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
