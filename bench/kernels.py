"""Kernel throughput against the machine's memory bandwidth, measured in the same run.

    python bench/kernels.py [--threads 2] [--formats q4_1,q8_0] [--shapes 4096x4096,576x1536]
                            [--tokens 64] [--seconds 0.3] [--no-matmul] [--default-only]
                            [--threads 1 --cpu-time]

1. Memory read bandwidth: a Numba ``prange`` sum (all threads) and a numpy sum (one thread) over
   a 1 GiB float32 array; the larger is the reference.
2. Decode: ``matvec`` of every supported format (``kernels.registry.supported_types()``) on each
   shape R x C, as GB/s of weight bytes (tensor bytes / time per call, wrapper overhead included)
   and as a fraction of the reference bandwidth.
3. Prefill: ``matmul`` with T tokens, in GFLOP/s (2 * T * R * C / time).
4. A decode sweep shaped like SmolLM2-135M Q4_1 (30 layers of q, k, v, o, gate, up, down in
   Q4_1, the 49152 x 576 output matrix in Q8_0: ~96 MB, more than the caches hold): every
   ``matvec`` of one token in sequence, as ms per token and GB/s. Kernels only: the ceiling of
   a runtime's decode speed on this machine (llama.cpp decodes this model at ~168 tok/s on 2
   threads).

Test weights: ``gguf.quants.quantize`` where gguf implements the format, else the format's own
quantizer (``kernels/cpu/<name>_quant.py``), else random bytes with the f16 scale fields that
``SCALE_FIELDS`` lists set to small finite values. A format with none of these is skipped. A new
format needs nothing here unless it falls in the last case: then add its scale offsets below.

Numbers are noisy when other programs share the machine: each figure is the best of several
repetitions, and comparisons belong to one run. Weights of a few MB may be served from the
last-level cache rather than memory; the 49152 x 576 shape (SmolLM2's output matrix) is the most
memory-like of the defaults.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Byte offsets (within one block) of the f16 fields to overwrite with sane values when a format's
# test weights must be random bytes (no quantizer available). Add entries for new formats here.
SCALE_FIELDS: dict[str, tuple[int, ...]] = {
    "Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ4_NL": (0,), "IQ4_XS": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,),
    "IQ2_XXS": (0,), "IQ2_XS": (0,), "IQ2_S": (0,),
}

# Decode shapes: a square reference, then SmolLM2-135M's (ffn_down, ffn_up/gate, output).
DEFAULT_SHAPES = "4096x4096,576x1536,1536x576,576x576,49152x576"


def memory_bandwidth(threads: int) -> tuple[float, float]:
    """(Numba prange sum GB/s, numpy sum GB/s) over 1 GiB."""
    from numba import njit, prange

    @njit(parallel=True, fastmath=True)
    def psum(a, parts):
        n = a.size // parts
        acc = np.zeros(parts, np.float32)
        for p in prange(parts):
            s = np.float32(0.0)
            for i in range(p * n, (p + 1) * n):
                s += a[i]
            acc[p] = s
        return acc.sum()

    a = np.ones(1 << 28, np.float32)  # 1 GiB, far beyond any cache
    parts = 4 * threads
    psum(a, parts)
    t_numba = min(_time(lambda: psum(a, parts), 1) for _ in range(5))
    t_numpy = min(_time(lambda: a.sum(), 1) for _ in range(3))
    return a.nbytes / t_numba / 1e9, a.nbytes / t_numpy / 1e9


_clock = time.perf_counter


def _time(fn, n: int) -> float:
    t = _clock()
    for _ in range(n):
        fn()
    return (_clock() - t) / n


def best_time(fn, seconds: float) -> float:
    """Best mean time per call over 5 repetitions of ~seconds/5 each."""
    fn()
    once = max(_time(fn, 1), 1e-7)
    n = max(1, int(seconds / 5 / once))
    return min(_time(fn, n) for _ in range(5))


def make_weights(fmt, rows: int, cols: int, rng) -> np.ndarray | None:
    """Test weights [rows, row_bytes] uint8 in ``fmt``'s layout, or None if it cannot make any."""
    from gguf import quants

    values = rng.standard_normal((rows, cols)).astype(np.float32)
    try:
        return np.ascontiguousarray(quants.quantize(values, fmt.qtype)).view(np.uint8).reshape(rows, -1)
    except NotImplementedError:
        pass
    quantize = fmt.quantize
    if quantize is not None:
        return np.ascontiguousarray(quantize(values)).view(np.uint8).reshape(rows, -1)
    fields = SCALE_FIELDS.get(fmt.qtype.name)
    if fields is None:
        return None
    nb = rows * cols // fmt.block_size
    w = rng.integers(0, 256, (nb, fmt.type_size), dtype=np.uint8)
    scale = (rng.uniform(0.001, 0.02, nb) * rng.choice([-1.0, 1.0], nb)).astype(np.float16)
    for off in fields:
        w[:, off:off + 2] = scale.view(np.uint8).reshape(nb, 2)
    return w.reshape(rows, -1)


def decode_sweep(get_format, seconds: float) -> tuple[float, int]:
    """(seconds per token, bytes per token) of SmolLM2-135M-shaped matvecs (see module doc)."""
    from gguf import GGMLQuantizationType as Q

    rng = np.random.default_rng(1)
    q41, q80 = get_format(Q.Q4_1), get_format(Q.Q8_0)
    D, KV, F, V, L = 576, 192, 1536, 49152, 30
    shapes = [(D, D), (KV, D), (KV, D), (D, D), (F, D), (F, D), (D, F)]  # q k v o gate up down
    templates = {s: make_weights(q41, *s, rng) for s in set(shapes)}
    layers = [[templates[s].copy() for s in shapes] for _ in range(L)]  # distinct memory per layer
    output = make_weights(q80, V, D, rng)
    xs = {D: rng.standard_normal(D).astype(np.float32), F: rng.standard_normal(F).astype(np.float32)}
    outs = {n: np.empty(n, np.float32) for n in (D, KV, F, V)}
    calls = [(w, xs[c], outs[r]) for layer in layers for w, (r, c) in zip(layer, shapes)]
    mv41, mv80 = q41.matvec, q80.matvec

    def token():
        for w, x, out in calls:
            mv41(w, x, out)
        mv80(output, xs[D], outs[V])

    nbytes = sum(w.nbytes for w, _, _ in calls) + output.nbytes
    return best_time(token, seconds), nbytes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", default="", help="comma-separated names (default: every supported one)")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated RxC")
    ap.add_argument("--matmul-shape", default="4096x4096")
    ap.add_argument("--tokens", type=int, default=64, help="T of the matmul (prefill) test")
    ap.add_argument("--seconds", type=float, default=0.3, help="measuring time per figure")
    ap.add_argument("--no-matmul", action="store_true")
    ap.add_argument("--default-only", action="store_true", help="skip the float variant of int8 kernels")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by the CPU time of this thread (with --threads 1): per-core throughput that "
                         "other programs on a busy machine disturb much less than wall-clock time")
    a = ap.parse_args()

    if a.cpu_time:
        if a.threads != 1:
            ap.error("--cpu-time measures one thread: use it with --threads 1")
        global _clock
        _clock = time.thread_time
    os.environ.setdefault("NUMBA_NUM_THREADS", str(a.threads))
    import numba

    numba.set_num_threads(a.threads)
    from flashmoe_gguf.kernels import get_format, supported_types

    bw_numba, bw_numpy = memory_bandwidth(a.threads)
    bw = max(bw_numba, bw_numpy)
    print(f"memory read bandwidth: {bw_numba:.1f} GB/s (Numba prange sum, {a.threads} threads), "
          f"{bw_numpy:.1f} GB/s (numpy sum, 1 thread)")

    wanted = {n.strip().upper() for n in a.formats.split(",") if n.strip()}
    formats = [get_format(t) for t in supported_types() if not wanted or t.name in wanted]
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    rng = np.random.default_rng(0)

    print(f"\nmatvec (decode), {a.threads} threads: GB/s of weight bytes, fraction of {bw:.1f} GB/s")
    print("(path: the module's default `matvec`; `f32` = its float path `matvec_f32` where that differs)")
    print(f"{'format':8} {'path':>5} {'shape':>11} {'MB':>7} {'us/call':>9} {'GB/s':>7} {'of bw':>6}")
    for fmt in formats:
        paths = [("", fmt.matvec)]
        alt = getattr(fmt.module, "matvec_f32", None)
        if alt is not None and alt is not fmt.matvec and not a.default_only:
            paths.append(("f32", alt))
        for rows, cols in shapes:
            if cols % fmt.block_size:
                continue
            w = make_weights(fmt, rows, cols, rng)
            if w is None:
                print(f"{fmt.qtype.name:8} no way to make test weights (add it to SCALE_FIELDS)")
                break
            x = rng.standard_normal(cols).astype(np.float32)
            out = np.empty(rows, np.float32)
            for label, fn in paths:
                t = best_time(lambda: fn(w, x, out), a.seconds)
                gbs = w.nbytes / t / 1e9
                print(f"{fmt.qtype.name:8} {label:>5} {rows:>5}x{cols:<5} {w.nbytes / 1e6:7.2f} {t * 1e6:9.1f} "
                      f"{gbs:7.2f} {gbs / bw:6.0%}", flush=True)

    if not a.no_matmul:
        matmul_table(a, formats, rng)

    if not wanted or {"Q4_1", "Q8_0"} <= wanted:
        t, nbytes = decode_sweep(get_format, max(1.0, 3 * a.seconds))
        print(f"\ndecode sweep, SmolLM2-135M shapes ({nbytes / 1e6:.0f} MB of Q4_1 + Q8_0 per token), "
              f"{a.threads} threads: {t * 1e3:.2f} ms/token, {nbytes / t / 1e9:.1f} GB/s "
              f"({nbytes / t / 1e9 / bw:.0%} of bw), {1 / t:.0f} tok/s of kernel time")
    return 0


def matmul_table(a, formats, rng) -> None:
    rows, cols = (int(v) for v in a.matmul_shape.split("x"))
    T = a.tokens
    print(f"\nmatmul (prefill), {rows}x{cols}, T={T}, {a.threads} threads")
    print(f"{'format':8} {'ms/call':>9} {'GFLOP/s':>8}")
    x = rng.standard_normal((T, cols)).astype(np.float32)
    out = np.empty((T, rows), np.float32)
    for fmt in formats:
        if cols % fmt.block_size:
            continue
        w = make_weights(fmt, rows, cols, rng)
        if w is None:
            continue
        t = best_time(lambda: fmt.matmul(w, x, out), a.seconds * 3)
        print(f"{fmt.qtype.name:8} {t * 1e3:9.2f} {2 * T * rows * cols / t / 1e9:8.1f}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
