"""Prompt and decode speed of a GGUF model, side by side with llama.cpp on the same file.

    python bench/decode.py MODEL [--prompt-tokens 64] [--gen-tokens 64] [--threads 2] [--reps 3]

Like llama-bench's pp/tg tests: a prompt of P tokens evaluated as one batch, then G single-token
decode steps (greedy), from a fresh context. Prints tok/s for this runtime and, when
llama-cpp-python is installed (the `bench` extra), for llama.cpp on the same file with the same
threads, then the ratio. Runs alternate (ours, llama.cpp, ours, ...) and medians are reported, so
that a noisy machine affects both sides alike. Also prints the achieved GB/s of weight bytes.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def bench_ours(model, prompt: np.ndarray, n_gen: int) -> tuple[float, float]:
    net = model.net
    t0 = time.perf_counter()
    logits = net.forward(prompt, 0)
    t1 = time.perf_counter()
    tok = int(np.argmax(logits[0]))
    pos = len(prompt)
    for _ in range(n_gen):
        logits = net.forward(np.array([tok], dtype=np.int64), pos)
        tok = int(np.argmax(logits[0]))
        pos += 1
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n_gen / (t2 - t1)


def llama_cpp_last_logits(llm) -> np.ndarray:
    """The last evaluated token's logits, straight from llama.cpp's context."""
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def bench_llama_cpp(llm, prompt: np.ndarray, n_gen: int) -> tuple[float, float]:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt.tolist())
    t1 = time.perf_counter()
    tok = int(np.argmax(llama_cpp_last_logits(llm)))
    for _ in range(n_gen):
        llm.eval([tok])
        tok = int(np.argmax(llama_cpp_last_logits(llm)))
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n_gen / (t2 - t1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-llama-cpp", action="store_true")
    a = ap.parse_args()

    from flashmoe_gguf import Model
    from flashmoe_gguf.info import facts

    n_ctx = a.prompt_tokens + a.gen_tokens + 8
    model = Model.load(a.model, n_ctx=n_ctx, threads=a.threads, n_batch=max(a.prompt_tokens, 1))
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, model.net.n_vocab - 100, size=a.prompt_tokens).astype(np.int64)
    f = facts(model.file)
    # bytes read per decoded token: every weight once (routed experts only, for MoE), output included
    per_token = f.file_bytes - f.expert_bytes + (f.expert_bytes * f.config.n_expert_used // max(f.config.n_expert, 1))
    if "output.weight" not in model.file:
        per_token += model.file.info("token_embd.weight").n_bytes  # tied: read again as the output

    llm = None
    if not a.no_llama_cpp:
        try:
            from llama_cpp import Llama

            llm = Llama(model_path=str(a.model), n_ctx=n_ctx, n_batch=max(a.prompt_tokens, 1),
                        n_threads=a.threads, n_threads_batch=a.threads, verbose=False, logits_all=False)
        except ImportError:
            print("llama-cpp-python is not installed (pip install -e '.[bench]'): ours only")

    bench_ours(model, prompt[:8], 4)  # warm-up: Numba compile / cache load, page cache
    if llm is not None:
        bench_llama_cpp(llm, prompt[:8], 4)
    ours_pp, ours_tg, ref_pp, ref_tg = [], [], [], []
    for _ in range(a.reps):
        pp, tg = bench_ours(model, prompt, a.gen_tokens)
        ours_pp.append(pp)
        ours_tg.append(tg)
        if llm is not None:
            pp, tg = bench_llama_cpp(llm, prompt, a.gen_tokens)
            ref_pp.append(pp)
            ref_tg.append(tg)
    med = statistics.median
    print(f"model: {a.model} ({f.arch}, {f.file_bytes / 1e6:.0f} MB); threads {a.threads}; "
          f"pp{a.prompt_tokens} tg{a.gen_tokens}; median of {a.reps}")
    print(f"flashmoe   prompt {med(ours_pp):8.1f} tok/s   decode {med(ours_tg):7.1f} tok/s"
          f"   ({med(ours_tg) * per_token / 1e9:.1f} GB/s of weights)")
    if llm is not None:
        print(f"llama.cpp  prompt {med(ref_pp):8.1f} tok/s   decode {med(ref_tg):7.1f} tok/s"
              f"   ({med(ref_tg) * per_token / 1e9:.1f} GB/s of weights)")
        print(f"ratio flashmoe/llama.cpp: prompt {med(ours_pp) / med(ref_pp):.2f}x   decode {med(ours_tg) / med(ref_tg):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
