"""Reading a cold expert into a staging buffer: memcpy from the mapping vs chunked preadv.

The hybrid GPU path stages expert copies through pinned host buffers when the model file does not
fit in RAM, i.e. when the experts are mostly not in the page cache. The expert tensors are mapped
with MADV_RANDOM (no readahead), so a memcpy from the mapping faults one 4 KB page at a time from
the disk; ``pread_into`` in 4 MB chunks on a thread pool reads at the disk's rate.

    python bench/staging.py [--mb 256] [--path FILE]

Prints GB/s for each way, the file evicted from the page cache before each (CPU only).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flashmoe_gguf.expert_store import MADV_DONTNEED, MADV_RANDOM, evict_file, madvise, pread_into  # noqa: E402

MATRIX = 18874368  # one 8192 x 4096 Q4_K expert matrix
CHUNK = 4 << 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--path", default=None, help="scratch file (default: in the temp dir)")
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    n = a.mb << 20
    path = Path(a.path or Path(tempfile.gettempdir()) / "flashmoe_staging.bin")
    if not path.exists() or path.stat().st_size != n:
        np.random.default_rng(0).integers(0, 255, n, dtype=np.uint8).tofile(path)
    mm = np.memmap(path, np.uint8, "r")
    madvise(mm, MADV_RANDOM)
    dst = np.empty(n, np.uint8)
    pool = ThreadPoolExecutor(min(16, os.cpu_count() or 1))
    res: dict = {"mapping_memcpy_GB_s": [], "chunked_pread_GB_s": []}
    m = n - n % MATRIX
    for _ in range(a.reps):
        madvise(mm, MADV_DONTNEED)
        evict_file(path)
        t = time.perf_counter()
        for f in [pool.submit(np.copyto, dst[o:o + MATRIX], mm[o:o + MATRIX]) for o in range(0, m, MATRIX)]:
            f.result()
        res["mapping_memcpy_GB_s"].append(round(m / (time.perf_counter() - t) / 1e9, 2))
        madvise(mm, MADV_DONTNEED)
        evict_file(path)
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        t = time.perf_counter()
        for f in [pool.submit(pread_into, fd, dst[o:o + CHUNK], o) for o in range(0, n, CHUNK)]:
            f.result()
        res["chunked_pread_GB_s"].append(round(n / (time.perf_counter() - t) / 1e9, 2))
        os.close(fd)
    del mm
    path.unlink()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
