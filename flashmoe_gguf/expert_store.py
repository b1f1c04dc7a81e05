"""The OS page cache as the expert store.

Routed experts are byte ranges of the mmapped file (``ExpertTensor.w[e]``). After a layer's
routing the store issues the reads of all selected experts at once, so the disk works on them
in parallel while the CPU computes on the first ones that are resident; it counts page-cache
hits and misses (mincore) and bytes brought in, and can cap the resident expert bytes by
evicting the least recently used experts from the page cache.

Expert tensors are marked ``MADV_RANDOM``: a page fault in them reads that page only, never a
speculative readahead window of neighbouring (unrouted) experts, which is how a plain mmap
runtime ends up reading several times the bytes it needs once the model exceeds RAM.

Read methods (``method``):
- ``populate`` (default): ``madvise(MADV_WILLNEED)`` on every selected range at once (the kernel
  queues large reads of exactly those ranges), then ``madvise(MADV_POPULATE_READ)`` per expert
  from a thread pool, which returns when that expert is resident and mapped, so compute waits
  exactly for its own expert and starts on the first one that has arrived.
- ``willneed``: ``madvise(MADV_WILLNEED)`` on every range (asynchronous readahead), then compute
  faults in whatever has not arrived yet.
- ``pread``: a thread pool of ``pread`` into a scratch buffer (fills the page cache through the
  read path, then the mapping faults on cached pages).
- ``none``: plain page faults, one at a time, as a naive mmap runtime does.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

PAGE = mmap.PAGESIZE
MADV_RANDOM = 1
MADV_DONTNEED = 4
MADV_WILLNEED = 3
MADV_POPULATE_READ = 22
METHODS = ("populate", "willneed", "pread", "none")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def _page_span(addr: int, length: int) -> tuple[int, int]:
    start = addr - addr % PAGE
    end = addr + length
    end += (-end) % PAGE
    return start, end - start


def madvise(arr: np.ndarray, advice: int) -> int:
    start, length = _page_span(arr.ctypes.data, arr.nbytes)
    return _libc.madvise(start, length, advice)  # ctypes releases the GIL during the call


_mincore_buf = threading.local()


def resident_pages(arr: np.ndarray) -> tuple[int, int]:
    """(resident, total) pages of the range ``arr`` covers, by mincore()."""
    return _resident_span(*_page_span(arr.ctypes.data, arr.nbytes))


def _resident_span(start: int, length: int) -> tuple[int, int]:
    """(resident, total) pages of a page-aligned span, by mincore() into this thread's vector
    (its address kept: ``.ctypes`` costs microseconds, and a decode token checks every routed
    expert's three matrices)."""
    n = length // PAGE
    vec = getattr(_mincore_buf, "vec", None)
    if vec is None or vec[0].shape[0] < n:
        a = np.empty(max(n, 1 << 12), dtype=np.uint8)
        vec = _mincore_buf.vec = (a, a.ctypes.data)
    if _libc.mincore(start, length, vec[1]) != 0:
        return 0, n
    return int(np.count_nonzero(vec[0][:n] & 1)), n


def mlock(arr: np.ndarray) -> bool:
    start, length = _page_span(arr.ctypes.data, arr.nbytes)
    return _libc.mlock(start, length) == 0


@dataclass
class TokenStats:
    experts: int = 0  # expert activations (layer, expert) this step
    expert_bytes: int = 0  # bytes of the routed experts
    hit_bytes: int = 0  # of those, already in the page cache before the step
    miss_bytes: int = 0  # brought in from disk
    io_wait: float = 0.0  # seconds compute waited for expert reads
    seconds: float = 0.0


@dataclass
class StoreStats:
    steps: list[TokenStats] = field(default_factory=list)

    def totals(self) -> TokenStats:
        t = TokenStats()
        for s in self.steps:
            t.experts += s.experts
            t.expert_bytes += s.expert_bytes
            t.hit_bytes += s.hit_bytes
            t.miss_bytes += s.miss_bytes
            t.io_wait += s.io_wait
            t.seconds += s.seconds
        return t

    @property
    def hit_rate(self) -> float:
        t = self.totals()
        return t.hit_bytes / t.expert_bytes if t.expert_bytes else 1.0


class ExpertStore:
    def __init__(self, method: str = "populate", threads: int = 8, max_resident: float | None = None):
        if method not in METHODS:
            raise ValueError(f"unknown expert read method {method!r} (one of {', '.join(METHODS)})")
        self.method = method
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="expert-read") if method in ("populate", "pread") else None
        self.max_resident = int(max_resident) if max_resident else None  # bytes
        self._lru: OrderedDict[tuple[int, int], list[np.ndarray]] = OrderedDict()
        self._lru_bytes = 0
        self._lock = threading.Lock()  # the LRU
        self._fd_lock = threading.Lock()  # the file descriptors of the pread path
        self._scratch = threading.local()
        self.stats = StoreStats()
        self.current = TokenStats()
        self._fds: dict[str, int] = {}
        self._t0 = time.perf_counter()
        self.routed: set[tuple[int, int]] = set()  # every (layer, expert) pair read so far
        self._expert_tensors: list[tuple[int, np.ndarray]] = []
        self._experts: dict = {}  # (id of a MoE block, expert) -> (arrays, page spans, bytes)

    def register(self, arr: np.ndarray) -> None:
        """An expert tensor of the model: no speculative readahead inside it."""
        if self.method != "none":
            madvise(arr, MADV_RANDOM)

    def prepare(self, gf) -> None:
        """Whole-file advice for a MoE model: no speculative readahead anywhere in the data
        (a page fault in a dense tensor would otherwise pull in megabytes of the neighbouring
        experts), and an exact asynchronous read of every dense (non-expert) tensor, which
        every token needs anyway."""
        if self.method == "none":
            return
        for reader in gf.readers:
            madvise(reader.data[reader.data_offset :], MADV_RANDOM)
        for t in gf:
            if "_exps." not in t.name:
                madvise(gf.raw(t.name), MADV_WILLNEED)
            elif self.max_resident is not None:
                evict(gf.raw(t.name), self)  # under a budget, start from no resident experts
        self._expert_tensors = [(int(t.name.split(".")[1]), gf.raw(t.name)) for t in gf
                                if "_exps." in t.name and t.name.startswith("blk.")]

    def trim(self) -> None:
        """Under a budget: evict every expert the LRU does not hold. Parsing the header faults
        its first pages in with the kernel's readahead window, which can land in expert data
        after ``prepare`` ran; a trim once the readahead has finished removes those pages."""
        if self.max_resident is None:
            return
        with self._lock:
            for layer, w in self._expert_tensors:
                for e in range(w.shape[0]):
                    if (layer, e) not in self._lru:
                        evict(w[e], self)

    # -- per token bookkeeping ------------------------------------------------------------------
    def begin_step(self) -> None:
        self.current = TokenStats()
        self._t0 = time.perf_counter()

    def end_step(self) -> TokenStats:
        self.current.seconds = time.perf_counter() - self._t0
        self.stats.steps.append(self.current)
        return self.current

    def reset_stats(self) -> None:
        self.stats = StoreStats()

    # -- reads ----------------------------------------------------------------------------------
    def _pread(self, arr: np.ndarray) -> None:
        buf = getattr(self._scratch, "buf", None)
        if buf is None:
            buf = self._scratch.buf = np.empty(1 << 20, np.uint8)
        where = self.locate(arr)
        if where is None:
            madvise(arr, MADV_POPULATE_READ)
            return
        fd, off = where
        for a in range(0, arr.nbytes, buf.nbytes):  # into the page cache (the bytes are dropped)
            pread_into(fd, buf[: min(buf.nbytes, arr.nbytes - a)], off + a)
        madvise(arr, MADV_POPULATE_READ)  # map the now-cached pages without faults

    def locate(self, arr: np.ndarray) -> tuple[int, int] | None:
        """(fd, file offset) of a view of a mapped file, or None if ``arr`` maps no file.

        Computed from ``arr`` alone (no state shared between calls): the read pool's threads
        locate ranges of several files at once."""
        mm = arr  # the root of the view chain is the whole-file np.memmap (its base: the mmap)
        while isinstance(getattr(mm, "base", None), np.ndarray):
            mm = mm.base
        name = getattr(mm, "filename", None) if isinstance(mm, np.memmap) else None
        if name is None:
            return None
        with self._fd_lock:
            fd = self._fds.get(name)
            if fd is None:
                fd = self._fds[name] = os.open(name, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # read exactly the expert, no readahead
        return fd, arr.ctypes.data - mm.ctypes.data + getattr(mm, "offset", 0)

    def prefetch(self, mlp, experts: np.ndarray) -> dict[int, Future | None]:
        """Start reading the selected experts of one MoE layer that are not fully in the page
        cache; returns a future per expert (None where nothing needs waiting for). Experts
        already resident cost one mincore() per tensor and no read: a warm model runs as if
        plainly mapped."""
        cur = self.current
        ranges = {}
        missing: dict[int, list[np.ndarray]] = {}
        for e in experts.tolist():
            arrs, spans, nbytes = self._expert(mlp, e)
            ranges[e] = arrs
            cur.experts += 1
            cur.expert_bytes += nbytes
            res = tot = 0
            for start, length in spans:
                r, n = _resident_span(start, length)
                res += r
                tot += n
            hit = nbytes * res // max(tot, 1)
            cur.hit_bytes += hit
            cur.miss_bytes += nbytes - hit
            if res < tot:
                missing[e] = arrs
        futures: dict[int, Future | None] = {}
        if self.method in ("willneed", "populate"):
            for arrs in missing.values():  # all reads queued at once, before any compute
                for a in arrs:
                    madvise(a, MADV_WILLNEED)
            if self.method == "populate":
                futures = {e: self.pool.submit(_populate_all, arrs) for e, arrs in missing.items()}
        elif self.method == "pread":
            futures = {e: self.pool.submit(self._pread_all, arrs) for e, arrs in missing.items()}
        self.routed.update((mlp.layer, e) for e in ranges)
        if self.max_resident is not None:
            self._touch(mlp.layer, ranges)
        return futures

    def _expert(self, mlp, e: int) -> tuple[list[np.ndarray], list[tuple[int, int]], int]:
        """Expert e of a MoE block: its three matrices, their page spans, their bytes (made once:
        a decode token asks for every routed expert of every layer, and numpy's views and
        ``.ctypes`` cost microseconds each)."""
        key = (id(mlp), e)
        r = self._experts.get(key)
        if r is None:
            arrs = [t.w[e] for t in (mlp.gate, mlp.up, mlp.down)]
            r = self._experts[key] = (arrs, [_page_span(a.ctypes.data, a.nbytes) for a in arrs],
                                      sum(a.nbytes for a in arrs))
        return r

    def _pread_all(self, arrs: list[np.ndarray]) -> None:
        for a in arrs:
            self._pread(a)

    def wait(self, fut: Future | None) -> None:
        if fut is None:
            return
        if fut.done():
            fut.result()
            return
        t = time.perf_counter()
        fut.result()
        self.current.io_wait += time.perf_counter() - t

    # -- resident budget -----------------------------------------------------------------------
    def _touch(self, layer: int, ranges: dict[int, list[np.ndarray]]) -> None:
        with self._lock:
            for e, arrs in ranges.items():
                key = (layer, e)
                if key in self._lru:
                    self._lru.move_to_end(key)
                    continue
                self._lru[key] = arrs
                self._lru_bytes += sum(a.nbytes for a in arrs)
            protected = {(layer, e) for e in ranges}
            while self._lru_bytes > self.max_resident and len(self._lru) > len(protected):
                key, arrs = next(iter(self._lru.items()))
                if key in protected:
                    self._lru.move_to_end(key)
                    continue
                self._lru.pop(key)
                self._lru_bytes -= sum(a.nbytes for a in arrs)
                for a in arrs:
                    evict(a, self)

    @property
    def tracked_bytes(self) -> int:
        return self._lru_bytes

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def pread_into(fd: int, dst: np.ndarray, off: int) -> None:
    """Fill the bytes of ``dst`` (contiguous) from file ``fd`` at offset ``off`` (the kernel copies
    from the page cache, or reads the disk: no page faults in this process's mapping)."""
    mv = memoryview(dst).cast("B")
    done = 0
    while done < len(mv):
        n = os.preadv(fd, [mv[done:]], off + done)
        if n <= 0:
            raise OSError(f"short read at offset {off + done} of the model file")
        done += n


def _populate_all(arrs: list[np.ndarray]) -> None:
    for a in arrs:
        if madvise(a, MADV_POPULATE_READ) != 0:  # older kernels: fall back to readahead
            madvise(a, MADV_WILLNEED)


def evict(arr: np.ndarray, store: ExpertStore | None = None) -> None:
    """Drop a range from this process's mapping and from the page cache (both are needed: the
    kernel keeps pages that are still mapped)."""
    madvise(arr, MADV_DONTNEED)
    if store is not None:
        where = store.locate(arr)
        if where is not None:
            fd, off = where
            start = off - off % PAGE
            os.posix_fadvise(fd, start, off + arr.nbytes - start, os.POSIX_FADV_DONTNEED)


def evict_file(path: str | os.PathLike) -> None:
    """Drop a whole file from the page cache (its mappings must be gone or DONTNEED'd first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages (a file just written) cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
