"""MoE decode speed with the page cache as the expert store, side by side with llama.cpp.

    python bench/moe.py [--case a|b|both] [--tokens 32] [--threads 2] [--methods populate,willneed,pread,none]

Builds its models with the converter (SmolLM2-135M-Instruct upcycled; written under
models/bench/, not committed):
  (a) in-RAM MoE: 64 experts, top-8, Q4_K experts where rows allow (~3.3 GB): warm decode tok/s.
  (b) larger than RAM: 640 experts x 30 layers, top-8 (~33 GB): cold then steady decode tok/s.
For each run it prints decode tok/s, routed bytes and bytes read from disk per token, I/O wait,
and the bound  missed_bytes / disk_bw + resident_bytes / mem_bw  with the fraction reached;
disk and memory bandwidth are measured in the same run. Cold runs evict the file from the page
cache first (no mapping left, then posix_fadvise DONTNEED). llama.cpp (llama-cpp-python, the
`bench` extra) runs on the same file with the same threads when installed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
BENCH_DIR = ROOT / "models" / "bench"
CASES = {"a": (64, 8), "b": (640, 8)}
PROMPT = "The history of the printing press begins"


def build(case: str) -> Path:
    n_expert, top_k = CASES[case]
    out = BENCH_DIR / f"smollm2-up{n_expert}-top{top_k}-q4k.gguf"
    if out.exists():
        return out
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "flashmoe_gguf.cli", "convert", str(SMOLLM2), "-o", str(out),
           "--upcycle", str(n_expert), "--top-k", str(top_k), "--experts", "q4_k", "--rest", "keep"]
    print("building:", " ".join(cmd[2:]), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"built {out.name}: {out.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s", flush=True)
    return out


def evict(path: Path) -> None:
    from flashmoe_gguf.expert_store import evict_file

    evict_file(path)


def warm_file(path: Path) -> None:
    """Read the whole file once so that it sits in the page cache."""
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        buf = bytearray(16 << 20)
        while f.readinto(buf):
            pass


def disk_bandwidth(path: Path, n_bytes: int = 2 << 30, threads: int = 8) -> float:
    """Cold read of scattered 2 MB ranges with parallel preads, GB/s (what expert reads look like)."""
    from concurrent.futures import ThreadPoolExecutor

    size = path.stat().st_size
    chunk = 2 << 20
    n = min(n_bytes, size) // chunk
    rng = np.random.default_rng(0)
    offsets = np.sort(rng.choice(size // chunk, size=n, replace=False)) * chunk
    evict(path)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)

    def read(off: int) -> int:
        return len(os.pread(fd, chunk, int(off)))

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(read, offsets))
    dt = time.perf_counter() - t
    os.close(fd)
    evict(path)
    return total / dt / 1e9


def memory_bandwidth(threads: int) -> float:
    """Read bandwidth of a parallel sum over 1 GiB with the decode's thread count, GB/s."""
    import numba
    from numba import njit, prange

    @njit(parallel=True, cache=False)
    def psum(v):
        s = 0
        for i in prange(v.shape[0]):
            s += v[i]
        return s

    numba.set_num_threads(threads)
    a = np.ones(1 << 27, dtype=np.uint64)  # 1 GiB
    psum(a)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        psum(a)
        best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def run_ours(path: Path, method: str, n_tokens: int, threads: int, cold: bool) -> dict:
    from flashmoe_gguf import Model

    if cold:
        evict(path)
    model = Model.load(path, n_ctx=256, threads=threads, expert_read=method)
    ids = model.tokenize(PROMPT)
    t0 = time.perf_counter()
    chunks = list(model.generate(ids, max_tokens=n_tokens + 1, temperature=0))
    st = chunks[-1].stats
    totals = model.store.stats.totals()
    steps = max(len(model.store.stats.steps), 1)
    res = dict(tok_s=st.decode_tps, routed=totals.expert_bytes / steps, missed=totals.miss_bytes / steps,
               io_wait=totals.io_wait / steps, step_s=totals.seconds / steps, wall=time.perf_counter() - t0,
               hit=model.store.stats.hit_rate)
    model.store.close()
    model.file.close()
    del model
    return res


def run_llama_cpp(path: Path, n_tokens: int, threads: int, cold: bool) -> dict | None:
    sys.path.insert(0, str(Path(__file__).parent))
    from decode import llama_cpp_last_logits

    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    if cold:
        evict(path)
    t = time.perf_counter()
    llm = Llama(model_path=str(path), n_ctx=256, n_batch=64, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    load_s = time.perf_counter() - t
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    llm.eval(ids)
    tok = int(np.argmax(llama_cpp_last_logits(llm)))
    t = time.perf_counter()
    for _ in range(n_tokens):
        llm.eval([tok])
        tok = int(np.argmax(llama_cpp_last_logits(llm)))
    dt = time.perf_counter() - t
    del llm
    return dict(tok_s=n_tokens / dt, load_s=load_s)


def resident_bytes_per_token(path: Path, routed: float) -> float:
    """Bytes a decode step reads from memory: the dense weights (all of them) + routed experts."""
    from flashmoe_gguf.gguf_file import GGUFFile
    from flashmoe_gguf.info import facts

    gf = GGUFFile(path)
    f = facts(gf)
    dense = f.file_bytes - f.expert_bytes
    if "output.weight" not in gf:
        dense += gf.info("token_embd.weight").n_bytes  # tied: read again as the output
    return dense + routed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=("a", "b", "both"), default="a")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="populate,willneed,pread,none")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--reps", type=int, default=3, help="alternating runs of both engines for the ratio")
    a = ap.parse_args()
    if not SMOLLM2.exists():
        print(f"missing {SMOLLM2}: run `make models`", file=sys.stderr)
        return 1
    mem_bw = memory_bandwidth(a.threads)
    print(f"memory read bandwidth: {mem_bw:.1f} GB/s", flush=True)
    for case in ("a", "b") if a.case == "both" else (a.case,):
        path = build(case)
        size = path.stat().st_size
        disk_bw = disk_bandwidth(path)
        print(f"\n== case ({case}): {path.name}, {size / 1e9:.2f} GB; RAM {_ram() / 1e9:.1f} GB; "
              f"cold disk read (parallel 2 MB preads): {disk_bw:.2f} GB/s", flush=True)
        cold = case == "b"
        for method in a.methods.split(","):
            if not cold:  # (a) in RAM: the whole file in the page cache, then a warm-up run
                warm_file(path)
                run_ours(path, method, 4, a.threads, cold=False)
            r = run_ours(path, method, a.tokens, a.threads, cold=cold)
            resident = resident_bytes_per_token(path, r["routed"]) - r["missed"]
            bound = r["missed"] / (disk_bw * 1e9) + resident / (mem_bw * 1e9)
            print(f"flashmoe[{method:8s}] {'cold' if cold else 'warm'}: {r['tok_s']:6.2f} tok/s | routed "
                  f"{r['routed'] / 1e6:6.1f} MB/tok, read from disk {r['missed'] / 1e6:6.1f} MB/tok "
                  f"(hits {100 * r['hit']:.0f}%), I/O wait {1000 * r['io_wait']:.0f} ms/tok | bound "
                  f"{1 / bound:6.2f} tok/s -> {100 * r['tok_s'] * bound:.0f}% of the bound", flush=True)
        if not a.no_llama_cpp:
            if not cold:
                warm_file(path)
                run_llama_cpp(path, 4, a.threads, cold=False)
            r = run_llama_cpp(path, a.tokens, a.threads, cold=cold)
            if r is None:
                print("llama.cpp: llama-cpp-python not installed (pip install -e '.[bench]')")
            else:
                print(f"llama.cpp            {'cold' if cold else 'warm'}: {r['tok_s']:6.2f} tok/s "
                      f"(load {r['load_s']:.1f} s)", flush=True)
                # side by side, alternating, for the ratio (the machine's speed drifts)
                ours, ref = [], []
                for _ in range(a.reps):
                    ours.append(run_ours(path, a.methods.split(",")[0], a.tokens, a.threads, cold=cold)["tok_s"])
                    ref.append(run_llama_cpp(path, a.tokens, a.threads, cold=cold)["tok_s"])
                med = statistics.median
                print(f"alternating x{a.reps}: flashmoe[{a.methods.split(',')[0]}] {med(ours):.2f} tok/s, "
                      f"llama.cpp {med(ref):.2f} tok/s (medians) -> ratio {med(ours) / med(ref):.2f}x", flush=True)
    return 0


def _ram() -> int:
    import psutil

    return psutil.virtual_memory().total


if __name__ == "__main__":
    sys.exit(main())
