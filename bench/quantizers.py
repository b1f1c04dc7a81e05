"""Quantizer throughput: million weights per second for each block type, 1 and 2 threads.

    python bench/quantizers.py [--rows 512] [--cols 4096] [--reps 5] [--types Q4_K,Q6_K]

Data: Gaussian float32 weights (std 0.02), one [rows, cols] matrix. Each figure is the median of
``reps`` runs after a warm-up (so Numba's compile time is excluded). Columns "1t", "2t": wall
clock with 1 and 2 threads; "per core": weights per CPU-second of the 1-thread runs, which a busy
shared machine disturbs less than the wall clock. When llama-cpp-python (the
`bench` extra) is installed, llama.cpp's own reference quantizer (ggml_quantize_chunk, one
thread, no importance matrix) runs on the same matrix, for comparison. The RMSE column is ours,
relative to llama.cpp's where known.
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]


def _ggml_quantize_chunk():
    """llama.cpp's ggml_quantize_chunk from llama-cpp-python's bundled ggml, or None."""
    try:
        import llama_cpp
    except ImportError:
        return None
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml.so", "libggml-base.dylib", "libggml.dylib"):
        path = lib_dir / name
        if not path.exists():
            continue
        lib = ctypes.CDLL(str(path))
        fn = getattr(lib, "ggml_quantize_chunk", None)
        if fn is None:
            continue
        fn.restype = ctypes.c_size_t
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        return fn
    return None


def _median_seconds(fn, reps: int) -> tuple[float, float]:
    """Median wall and CPU (all threads of this process) seconds of ``fn()``."""
    fn()  # warm-up (compiles on first use)
    wall, cpu = [], []
    for _ in range(reps):
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--types", default=",".join(TYPES))
    args = ap.parse_args(argv)

    import gguf
    import numba

    from flashmoe_gguf import quants

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    n = x.size
    chunk = _ggml_quantize_chunk()
    max_threads = numba.config.NUMBA_NUM_THREADS
    thread_counts = [t for t in (1, 2) if t <= max_threads]

    print(f"quantizers: {args.rows} x {args.cols} float32, median of {args.reps} "
          f"(M weights/s)")
    header = "".join(f"{f'{t}t':>8s}" for t in thread_counts)
    print(f"{'type':8s}{header}{'per core':>10s}{'llama.cpp 1t':>14s}{'rmse vs llama':>15s}")
    for name in args.types.split(","):
        qtype = gguf.GGMLQuantizationType[name.strip().upper()]
        figures = []
        per_core = 0.0
        for t in thread_counts:
            numba.set_num_threads(t)
            sec, cpu = _median_seconds(lambda: quants.quantize(x, qtype), args.reps)
            figures.append(n / sec / 1e6)
            if t == 1:
                per_core = n / cpu / 1e6
        numba.set_num_threads(max_threads)
        ours = quants.quantize(x, qtype)
        y = gguf.quants.dequantize(ours, qtype).reshape(x.shape)
        rmse = float(np.sqrt(np.mean((y.astype(np.float64) - x) ** 2)))
        ref_speed = ref_ratio = ""
        if chunk is not None:
            dst = np.empty_like(ours)

            def run_ref():
                chunk(int(qtype), x.ctypes.data, dst.ctypes.data, 0, x.shape[0], x.shape[1], None)

            sec, _ = _median_seconds(run_ref, args.reps)
            ref_speed = f"{n / sec / 1e6:.1f}"
            yr = gguf.quants.dequantize(dst, qtype).reshape(x.shape)
            ref_rmse = float(np.sqrt(np.mean((yr.astype(np.float64) - x) ** 2)))
            ref_ratio = f"{rmse / ref_rmse:.3f}"
        cells = "".join(f"{f:8.1f}" for f in figures)
        print(f"{name:8s}{cells}{per_core:10.1f}{ref_speed:>14s}{ref_ratio:>15s}", flush=True)


if __name__ == "__main__":
    main()
