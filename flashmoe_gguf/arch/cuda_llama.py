"""The llama family (dense and MoE) on a CUDA GPU (numba.cuda).

Where the routed experts live decides the mode (``device.py`` picks it):

* ``cuda``: every weight uploaded once, in its block format; the router, top-k and the expert
  products run on the GPU (expert kernels read the chosen experts' ids from device memory, so
  nothing waits for the host).
* ``unified``: as ``cuda``, but the expert tensors are not copied: the mmapped file is
  registered as mapped, read-only host memory and the expert kernels read the routed experts in
  place (over PCIe on a discrete GPU; at memory speed on an integrated one).
* ``hybrid``: dense part, shared experts, router input and KV cache on the GPU; the routed
  experts from host memory: with a GPU expert cache (``gpu_expert_cache_gb``, LRU), a token's
  misses are copied into it (on a copy stream: straight from the file's pages, registered with
  the driver, when the file fits in half the free RAM; else page cache -> pinned staging buffer
  -> device) and all its experts then computed on the GPU in one launch; with no cache, they are
  computed on the CPU from the page cache as the CPU path does. The host routes (it must see the
  router's input to decide what to copy), so a decode step meets the host once per MoE block.

A decode step (one token) of ``cuda`` and ``unified`` is recorded once as a CUDA graph and
replayed: one launch per token instead of one per kernel (the token and position live in a
device array the graph reads). A ``hybrid`` decode step is recorded as one graph per stretch
between two host parts (``_HybridStep``). Prompts run kernel by kernel.
"""
from __future__ import annotations

import collections
import os
import weakref
from typing import Iterator

import numpy as np
from gguf import GGMLQuantizationType

from ..errors import FlashMoEError, ModelError
from ..expert_store import pread_into
from .llama import DenseMLP, LlamaModel
from .moe import MoEMLP


def _cuda():
    from .. import cuda_compat  # noqa: F401
    from numba import cuda

    return cuda


def _k():
    from ..kernels import cuda as kc
    from ..kernels.cuda import ops, q8
    return kc, ops, q8


class _Input:
    """A device activation [T, C] and its int8 forms (one per activation block size), made on
    first use after each ``set``."""

    def __init__(self, G, C: int):
        self.G, self.C = G, C
        self.x = None
        self.acts: dict = {}
        self.done: set = set()

    def set(self, x):
        self.x = x
        self.done.clear()
        return self

    def set_silu(self, g, u, lin: "_GLinear", many: bool):
        """g = silu(g) * u, the input of ``lin``: with its int8 form in the same launch where
        ``lin`` takes int8 activations."""
        p = lin.prod
        if p.int8_for(many):
            self.set(g)
            a = self._get(p.qb)
            a.quantize_silu(g, u, self.G.stream)
            self.done.add(p.qb)
        else:
            _, ops, _ = _k()
            ops.silu_mul(g, u, self.G.stream)
            self.set(g)
        return self

    def fused_act(self, lin, many: bool, qbs: tuple):
        """The int8 form of self.x that ``lin`` reads (marked made: the launch that writes self.x
        makes it too), or None where ``lin`` takes float activations or reads blocks of a size not
        in ``qbs`` (those the launch can make)."""
        if not lin.prod.int8_for(many) or lin.prod.qb not in qbs:
            return None
        self.done.add(lin.prod.qb)
        return self._get(lin.prod.qb)

    def _get(self, qb: int):
        _, _, q8 = _k()
        T = self.x.shape[0]
        a = self.acts.get((qb, T))
        if a is None:
            a = self.acts[(qb, T)] = q8.Act(T, self.C, qb)
        return a

    def act(self, qb: int):
        if qb == 0:
            return None
        a = self._get(qb)
        if qb not in self.done:
            a.quantize(self.x, self.G.stream)
            self.done.add(qb)
        return a


class _GLinear:
    """A Linear (or an E-matrix expert tensor) whose raw block bytes live on the GPU."""

    def __init__(self, G, qtype, name, w, bias=None, dev=None):
        kc, _, _ = _k()
        cuda = _cuda()
        self.G = G
        self.prod = kc.Product(qtype, name)
        if dev is None:
            key = id(w)
            dev = G.uploaded.get(key)
            if dev is None:  # tied embeddings: one copy
                dev = G.uploaded[key] = cuda.to_device(np.ascontiguousarray(w))
        if dev.ndim == 2:
            dev = dev.reshape(1, *dev.shape)
        self.raw = dev
        self.w = self.prod.view(dev)
        self.rows = dev.shape[1]
        self.bias = None if bias is None else cuda.to_device(np.ascontiguousarray(bias, np.float32))
        self._out: dict = {}

    @classmethod
    def of(cls, G, lin):
        return cls(G, lin.qtype, lin.name, lin.w, lin.bias)

    def __call__(self, inp: _Input, out=None, ids=None, div=1, n=None, many=None, accumulate=False,
                 wts=None, kk=0):
        """[N, rows] = self[ids[n]] @ x[n // div]; a plain product (ids all 0, N = T) by default.

        ``accumulate``: out += the product instead. ``kk`` > 0 (with ``wts``): out [T, rows] +=
        sum over m < kk of wts[t kk + m] * self[ids[t kk + m]] @ x[t kk + m] (the routed experts'
        weighted sum, in the same launch where the kernel allows).
        ``many``: the forward pass has several tokens. The kernel follows the CPU path's choice
        (int8 activations for one token; for several, int8 for the K-quants and float for the
        32-weight formats), so both devices round alike.
        """
        _, ops, _ = _k()
        cuda = _cuda()
        x = inp.x
        N = x.shape[0] * div if n is None else n
        if many is None:
            many = x.shape[0] > 1
        if ids is None:
            ids = self.G.zeros(N)
        p = self.prod
        fused = p.int8_for(many) and self.bias is None
        if (accumulate or kk) and not fused:  # the product first, then the sum
            tmp = self(inp, ids=ids, div=div, n=N, many=many)
            if kk:
                ops.moe_combine(out, tmp, wts, kk, self.G.stream)
            else:
                ops.add_inplace(out, tmp, self.G.stream)
            return out
        if out is None:
            out = self._out.get(N)
            if out is None:
                out = self._out[N] = cuda.device_array((N, self.rows), np.float32)
        if p.int8_for(many):
            p.kernel(self.w, ids, div, inp.act(p.qb), out, self.G.stream, wts, int(kk), bool(accumulate or kk))
        else:
            p.fmt.matvec.ids(self.raw, ids, div, x, out, self.G.stream)
        if self.bias is not None:
            ops.add_bias(out, self.bias, self.G.stream)
        return out


def _register_mapped(gf):
    """Device pointers of the GGUF's files, registered as mapped read-only host memory."""
    from cuda.bindings import driver as drv
    _cuda().current_context()
    flags = drv.CU_MEMHOSTREGISTER_READ_ONLY | drv.CU_MEMHOSTREGISTER_DEVICEMAP
    ptrs = []
    for r in gf.readers:
        data = r.data
        ptr, n = data.ctypes.data, data.nbytes
        (err,) = drv.cuMemHostRegister(ptr, n, flags)
        if err != drv.CUresult.CUDA_SUCCESS:
            raise FlashMoEError(f"{gf.path}: cannot map the file into GPU address space ({err.name}, "
                                f"{n / 1e9:.1f} GB must be pinned in host memory)")
        # unregistered when the mapping's array goes (else a later mapping at the same address,
        # e.g. the next model loaded in this process, is refused as already registered)
        weakref.finalize(data, _unregister, ptr).atexit = False
        err, dptr = drv.cuMemHostGetDevicePointer(ptr, 0)
        if err != drv.CUresult.CUDA_SUCCESS:
            raise FlashMoEError(f"{gf.path}: no device pointer for the mapped file ({err.name})")
        ptrs.append((int(dptr), data))
    return ptrs


def _register_for_copies(gf):
    """Register the GGUF's files with the driver (pinned, read-only) if they fit in half the free
    RAM, so that copies from their pages are single DMAs: the registered mappings (keep them),
    or None where they do not fit or the driver refuses (FLASHMOE_EXPERT_STAGING=1: always None,
    the staging path)."""
    import psutil
    from numba import config
    if os.environ.get("FLASHMOE_EXPERT_STAGING") == "1" or config.ENABLE_CUDASIM:
        return None
    if sum(r.data.nbytes for r in gf.readers) > psutil.virtual_memory().available / 2:
        return None
    try:
        return _register_mapped(gf)
    except Exception:  # (the driver refused, or no driver bindings: the staging path)
        return None


def _upload_rows(ws):
    """Weights ws (each [R_i, row bytes], or [E, R_i, row bytes]) as one device tensor of their
    rows one after the other (per matrix: expert e's rows of each in turn), copied matrix by
    matrix (no host copy of the whole)."""
    cuda = _cuda()
    ws = [np.asarray(w) for w in ws]
    ws3 = [w if w.ndim == 3 else w.reshape(1, *w.shape) for w in ws]
    E = ws3[0].shape[0]
    dev = cuda.device_array((E, sum(w.shape[1] for w in ws3), ws3[0].shape[2]), ws3[0].dtype)
    for e in range(E):
        r = 0
        for w in ws3:
            dev[e, r:r + w.shape[1]].copy_to_device(np.ascontiguousarray(w[e]))
            r += w.shape[1]
    return dev if ws[0].ndim == 3 else dev[0]


def _unregister(ptr: int) -> None:
    try:
        from cuda.bindings import driver as drv
        drv.cuMemHostUnregister(ptr)
    except Exception:  # (the context is gone already: nothing left registered)
        pass


def _mapped_array(base, offset: int, shape, owner):
    cuda = _cuda()
    desc = {"shape": tuple(int(s) for s in shape), "typestr": "|u1", "data": (base + offset, True),
            "version": 3, "strides": None}

    class _Holder:  # keeps the memmap alive while the device array exists
        __cuda_array_interface__ = desc
        keep = owner
    return cuda.as_cuda_array(_Holder())


_CHUNK = 4 << 20  # bytes per read of a staged expert copy (one thread each)


class _ExpertCache:
    """GPU expert cache: slots holding one expert's three matrices; LRU over (layer, expert).

    One pool per distinct (gate, up, down) format and shape; ``budget`` bytes split between the
    pools by the number of layers that use each.
    """

    def __init__(self, G, moes, budget: float, gf=None):
        cuda = _cuda()
        self.G = G
        # misses copied straight from the file's pages (registered with the driver, so each copy
        # is one DMA) when the file fits in RAM; else through pinned staging buffers
        self.registered = _register_for_copies(gf) if gf is not None else None
        groups: dict = collections.defaultdict(list)
        for m in moes:
            key = tuple((t.qtype, t.w.shape) for t in (m.gate, m.up, m.down))
            groups[key].append(m)
        self.pools = {}
        n_layers = len(moes)
        for key, ms in groups.items():
            slot_bytes = sum(t.w[0].nbytes for t in (ms[0].gate, ms[0].up, ms[0].down))
            S = int(budget * len(ms) / n_layers // slot_bytes)
            S = min(S, sum(m.n_expert for m in ms))
            if S < max(m.n_used for m in ms):
                # fewer slots than a token's experts: a miss would evict another expert of the same
                # token (its data overwritten before use); those layers' experts stay on the CPU
                continue
            bufs = [cuda.device_array((S, *t.w.shape[1:]), np.uint8) for t in (ms[0].gate, ms[0].up, ms[0].down)]
            m = ms[0]
            pool = dict(bufs=bufs, lru=collections.OrderedDict(), free=list(range(S)), S=S,
                        glin=[_GLinear(G, t.qtype, t.name, None, dev=buf)  # the slots as expert tensors
                              for t, buf in zip((m.gate, m.up, m.down), bufs)])
            for m in ms:
                self.pools[id(m)] = pool
        self.stage = {}  # pinned staging buffers per shape, a ring per pool
        self.copy_stream = cuda.stream()
        from concurrent.futures import ThreadPoolExecutor
        self.pool_exec = ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1)))
        self.hits = self.misses = 0
        self.bytes_copied = 0

    @property
    def direct(self) -> bool:
        return self.registered is not None

    def pool(self, mlp):
        return self.pools.get(id(mlp))

    def lookup(self, mlp, e: int):
        p = self.pools.get(id(mlp))
        if p is None:
            return None
        s = p["lru"].get((mlp.layer, e))
        if s is not None:
            p["lru"].move_to_end((mlp.layer, e))
        return s

    def load(self, mlp, experts: list[int]) -> list[int]:
        """Copy experts of mlp into slots (evicting the least recently used); returns the slots.

        With the file registered (``direct``), each matrix is one DMA from its pages on the
        copy stream. Else each matrix is read from the file into a pinned staging buffer with
        preadv, in 4 MB chunks spread over a thread pool (from the page cache, or the disk for
        pages that are not resident; a memcpy from the mapping would take a page fault per 4 KB
        instead), and its DMA to the device is queued on the copy stream once its chunks are in.
        """
        cuda = _cuda()
        p = self.pools[id(mlp)]
        slots, jobs = [], []
        for e in experts:  # a free slot, else the least recently used one
            s = p["free"].pop() if p["free"] else p["lru"].popitem(last=False)[1]
            p["lru"][(mlp.layer, e)] = s
            slots.append(s)
        if self.direct:
            for e, s in zip(experts, slots):
                for i, t in enumerate((mlp.gate, mlp.up, mlp.down)):
                    self._h2d(p["bufs"][i], s, t.w[e])
            return slots
        store = self.G.store
        for ring, (e, s) in enumerate(zip(experts, slots)):
            for i, t in enumerate((mlp.gate, mlp.up, mlp.down)):
                key = (t.w.shape[1:], ring, i)
                st = self.stage.get(key)
                if st is None:
                    st = self.stage[key] = cuda.pinned_array(t.w.shape[1:], np.uint8)
                src = t.w[e]
                where = store.locate(src) if store is not None else None
                if where is None:
                    futs = [self.pool_exec.submit(np.copyto, st, src)]
                else:  # read into the staging buffer in chunks, in parallel (no page faults)
                    fd, off = where
                    flat = st.reshape(-1)
                    futs = [self.pool_exec.submit(pread_into, fd, flat[a:a + _CHUNK], off + a)
                            for a in range(0, flat.nbytes, _CHUNK)]
                jobs.append((futs, (st, p["bufs"][i], s)))
        for futs, (st, buf, s) in jobs:
            for f in futs:
                f.result()
            self._h2d(buf, s, st)
        return slots

    def _h2d(self, buf, s, src):
        """Slot s of the device tensor buf (its experts' slots [S, ...]) <- host bytes src, queued
        on the copy stream (straight through the driver: numba's copy costs ~0.1 ms of Python
        per call, a few times the DMA of a small expert)."""
        if _k()[1].SIM:
            buf[s].copy_to_device(src, stream=self.copy_stream)
        else:
            from cuda.bindings import driver as drv
            n = src.nbytes
            (err,) = drv.cuMemcpyHtoDAsync(buf.device_ctypes_pointer.value + s * n, src.ctypes.data, n,
                                           self.copy_stream.handle)
            if err != drv.CUresult.CUDA_SUCCESS:
                raise FlashMoEError(f"copying an expert to the GPU failed ({err.name})")
        self.bytes_copied += src.nbytes


class _GMoE:
    """A MoE block (routed experts + optional gated shared expert) computed with GPU kernels."""

    def __init__(self, G, mlp: MoEMLP, mode: str, mapped=None):
        cuda = _cuda()
        if mlp.n_group > 1 or mlp.act != "silu" or mlp.gate_b is not None or mlp.up_b is not None \
                or mlp.down_b is not None:
            raise ModelError("this MoE's routing or expert activation runs on the CPU only")
        self.G, self.cpu, self.mode = G, mlp, mode
        self.router = _GLinear.of(G, mlp.router)
        # a float32 router without a bias: its product and the routing in one launch
        self.router_w = None
        if mlp.router.qtype == GGMLQuantizationType.F32 and mlp.router.bias is None:
            self.router_w = self.router.raw[0].view(np.float32)
        self.sel_bias = None if mlp.sel_bias is None else cuda.to_device(np.ascontiguousarray(mlp.sel_bias, np.float32))
        self.tensors = []
        self.gate_up = None  # cuda: the gate and up experts as one tensor [E, 2F, row bytes], one launch
        if mode == "cuda" and mlp.gate.qtype == mlp.up.qtype and mlp.gate.w.shape == mlp.up.w.shape:
            self.gate_up = _GLinear(G, mlp.gate.qtype, f"{mlp.gate.name}+{mlp.up.name}", None,
                                    dev=_upload_rows([mlp.gate.w, mlp.up.w]))
        for t in (mlp.gate, mlp.up, mlp.down):
            if self.gate_up is not None and t is not mlp.down:
                dev = None
            elif mode == "cuda":
                dev = cuda.to_device(np.ascontiguousarray(t.w))
            elif mode == "unified":
                base, data = mapped[t.file_index]
                if (base + t.offset) % 16:  # the kernels read blocks in 16-byte loads
                    raise FlashMoEError(f"tensor {t.name} is not 16-byte aligned in the file: unified memory "
                                        "cannot read it in place (use --device cuda or hybrid)")
                dev = _mapped_array(base, t.offset, t.w.shape, data)
            else:  # hybrid: the cache's slots
                dev = None
            self.tensors.append(None if dev is None else _GLinear(G, t.qtype, t.name, None, dev=dev))
        self.shared = None
        if mlp.shared is not None:
            self.shared = tuple(_GLinear.of(G, lin) for lin in mlp.shared)
        self.shared_gate = None if mlp.shared_gate is None else cuda.to_device(np.ascontiguousarray(mlp.shared_gate, np.float32))
        self.F = mlp.gate.rows
        self.D = mlp.down.rows
        self.bufs: dict = {}
        self.inp_g = _Input(G, self.F)
        # (the shared expert's hidden size may differ from the routed experts')
        self.inp_s = None if self.shared is None else _Input(G, self.shared[0].rows)

    @property
    def k(self) -> int:  # (Model.set_experts_per_token changes the CPU block's n_used)
        return self.cpu.n_used

    def _buffers(self, N):
        cuda = _cuda()
        b = self.bufs.get(N)
        if b is None:
            b = self.bufs[N] = dict(ids=cuda.device_array(N, np.int32), w=cuda.device_array(N, np.float32))
            if self.gate_up is not None:
                b["gu"] = cuda.device_array((N, 2 * self.F), np.float32)
            else:
                b["g"] = cuda.device_array((N, self.F), np.float32)
                b["u"] = cuda.device_array((N, self.F), np.float32)
        return b

    def _experts(self, inp: _Input, x, ws, ids, w, n, div, b):
        """x += sum over the n (token, expert) pairs of w * expert(x); weights ``ws`` [3] of _GLinear
        (on device cuda, self.gate_up stands for ws[0] and ws[1])."""
        many = x.shape[0] > 1
        if self.gate_up is not None:  # one launch; g and u: views of its output rows
            gu = self.gate_up(inp, out=b["gu"][:n], ids=ids, div=div, n=n, many=many)
            g, u = gu[:, :self.F], gu[:, self.F:]
        else:
            g = ws[0](inp, out=b["g"][:n], ids=ids, div=div, n=n, many=many)
            u = ws[1](inp, out=b["u"][:n], ids=ids, div=div, n=n, many=many)
        ws[2](self.inp_g.set_silu(g, u, ws[2], many), out=x, ids=ids, n=n, many=many, wts=w,
              kk=n // x.shape[0])

    def __call__(self, inp: _Input, x):
        """x [T, D] += this block's output for the normalized input inp.x."""
        _, ops, _ = _k()
        s = self.G.stream
        T = x.shape[0]
        k = self.k
        if self.mode != "hybrid":
            if k > ops.KMAX:
                raise FlashMoEError(f"{k} experts per token: the GPU's top-k takes at most {ops.KMAX} "
                                    "(use --device hybrid or cpu)")
            b = self._buffers(T * k)
            m = self.cpu
            if self.router_w is not None:
                rr = self.bufs.get(("rr", T))
                if rr is None:  # (per T: a recorded graph keeps reading its buffers)
                    rr = self.bufs[("rr", T)] = ops.RouterRoute(self.router_w, T)
                rr(inp.x, k, m.gating, self.sel_bias, m.norm_topk, m.scale, b["ids"], b["w"], s)
            else:
                logits = self.router(inp)
                ops.route(logits, k, m.gating, self.sel_bias, m.norm_topk, m.scale, b["ids"], b["w"], s)
            self._experts(inp, x, self.tensors, b["ids"], b["w"], T * k, k, b)
        else:
            self._hybrid(inp, x)
        self.shared_expert(inp, x)

    def shared_expert(self, inp: _Input, x):
        """x += the (gated) shared expert's output, where the block has one."""
        if self.shared is None:
            return
        _, ops, _ = _k()
        s = self.G.stream
        g = self.shared[0](inp)
        u = self.shared[1](inp)
        self.inp_s.set_silu(g, u, self.shared[2], x.shape[0] > 1)
        if self.shared_gate is not None:
            y = self.shared[2](self.inp_s)
            ops.sigmoid_gate(y, inp.x, self.shared_gate, s)
            ops.add_inplace(x, y, s)
        else:
            self.shared[2](self.inp_s, out=x, accumulate=True)

    # A hybrid decode step meets the host once per MoE block, in three parts: ``hybrid_pre``
    # (stream: the block's input to pinned host memory), ``hybrid_host`` (host, once the stream
    # has got there: routing, the cache's copies or the CPU's experts, their results into pinned
    # memory; returns the copies' event for the stream to wait on) and ``hybrid_post`` (stream:
    # those results to the device, the experts' products). The stream parts read and write only
    # buffers that persist, so the launches between two host parts can be recorded as one CUDA
    # graph and replayed (_HybridStep).

    def _host_bufs(self):
        cuda = _cuda()
        k = self.k
        hb = self.bufs.get(("host", k))
        if hb is None:
            hb = self.bufs[("host", k)] = dict(
                h=cuda.pinned_array((1, self.cpu.router.cols), np.float32),
                y=cuda.pinned_array((1, self.D), np.float32), yd=cuda.device_array((1, self.D), np.float32),
                ids=cuda.pinned_array(k, np.int32), w=cuda.pinned_array(k, np.float32))
        return hb

    def _pool(self):
        """The expert cache's pool this block's experts use, or None (computed on the CPU)."""
        cache = self.G.expert_cache
        return None if cache is None else cache.pool(self.cpu)

    def hybrid_pre(self, inp: _Input):
        inp.x.copy_to_host(self._host_bufs()["h"], stream=self.G.stream)

    def hybrid_host(self):
        m = self.cpu
        hb = self._host_bufs()
        sel, w = m.route(hb["h"])
        if self._pool() is None:  # the routed experts on the CPU
            hb["y"][:] = m.routed(hb["h"], sel, w)
            return None
        # every routed expert from the cache's slots, in one launch after the misses' copies
        # (the hits' products are short beside a copy; one launch sums the experts in the
        # router's order, as device cuda does, whatever was cached before)
        cache = self.G.expert_cache
        slots, misses = [], []
        for j, e in enumerate(sel[0].tolist()):
            slot = cache.lookup(m, e)
            if slot is None:
                misses.append((j, e))
            slots.append(slot)
        cache.hits += len(slots) - len(misses)
        cache.misses += len(misses)
        ev = None
        if misses:
            cache.copy_stream.synchronize()  # the staging buffers are free again
            for (j, _), slot in zip(misses, cache.load(m, [e for _, e in misses])):
                slots[j] = slot
            ev = _event()
            ev.record(cache.copy_stream)
        hb["ids"][:] = slots
        hb["w"][:] = w[0]
        return ev

    def hybrid_post(self, inp: _Input, x):
        _, ops, _ = _k()
        s = self.G.stream
        hb = self._host_bufs()
        pool = self._pool()
        if pool is None:
            hb["yd"].copy_to_device(hb["y"], stream=s)
            ops.add_inplace(x, hb["yd"], s)
            return
        k = self.k
        b = self._buffers(k)  # (ids and w of exactly k)
        b["ids"].copy_to_device(hb["ids"], stream=s)
        b["w"].copy_to_device(hb["w"], stream=s)
        self._experts(inp, x, pool["glin"], b["ids"], b["w"], k, k, b)

    def first_product(self):
        """The product that reads this block's input first (after the router's float product)."""
        if self.mode != "hybrid":
            return self.gate_up if self.gate_up is not None else self.tensors[0]
        return None if self.shared is None else self.shared[0]

    def _hybrid(self, inp: _Input, x):
        """The routed experts of a hybrid forward pass outside the decode step's parts: a
        prompt's tokens, their experts on the CPU."""
        cuda = _cuda()
        _, ops, _ = _k()
        m, s = self.cpu, self.G.stream
        h = inp.x.copy_to_host(stream=s)
        s.synchronize()
        T = h.shape[0]
        y = m.routed(h, *m.route(h))
        yd = self.bufs.get(("host_y", T))
        if yd is None:  # (a persistent buffer: a temporary one could be freed and reused
            yd = self.bufs[("host_y", T)] = cuda.device_array((T, self.D), np.float32)  # before the add runs)
        yd.copy_to_device(y, stream=s)
        ops.add_inplace(x, yd, s)


def _event():
    """An event for the host to wait on (no timing; the simulator's events take no arguments)."""
    cuda = _cuda()
    _, ops, _ = _k()
    return cuda.event() if ops.SIM else cuda.event(timing=False)


def _advance(gen, first: bool):
    """The next MoE block a forward pass's launches stop at (its host part is due), and None;
    or None and the pass's result once it has finished."""
    try:
        return (next(gen) if first else gen.send(None)), None
    except StopIteration as stop:
        return None, stop.value


class _StepGraph:
    """A decode step's launches (``launches()``, all on G's stream): run as plain launches for
    its first two steps (kernels compiled, buffers allocated), then recorded and replayed;
    recorded again after a top-k change (new buffers: two plain steps first). ``flag``: G's
    attribute that allows recording; the driver refusing a recording clears it (plain launches
    from then on). Here the recording is one CUDA graph (``rec``: its executable)."""

    def __init__(self, G: "CudaLlama", launches, flag: str = "graphs"):
        self.G, self.launches, self.flag = G, launches, flag
        self.rec = None  # the recording
        self.key = None  # the top-k it was made for
        self.steps = 0  # plain steps since then

    def ready(self) -> bool:
        return self.rec is not None and self.key == self.G._key()

    def __call__(self):
        G = self.G
        if self.key != G._key():
            self.rec, self.key, self.steps = None, G._key(), 0
        if self.rec is None and getattr(G, self.flag) and self.steps >= 2:
            self.rec = self._record()
            if self.rec is not None:
                return
            setattr(G, self.flag, False)  # the driver refused
        if self.rec is None:
            self.launches()
            self.steps += 1
        else:
            self._replay()

    def _record(self):
        """Record the step and run it (this step's work); None where the driver refuses."""
        ex = self.G._capture(self.launches)
        if ex is not None:
            self.G._launch(ex)
        return ex

    def _replay(self):
        self.G._launch(self.rec)


class _HybridStep(_StepGraph):
    """A hybrid decode step: the launches between two host parts (``_GMoE.hybrid_host``) as one
    CUDA graph each (``rec``: [(executable, the MoE block whose host part follows, or None)]),
    recorded while the step runs. Per MoE block one graph launch, a wait for its input on the
    host, the routing and copies, instead of a few dozen launches from Python."""

    def __init__(self, G: "CudaLlama"):
        super().__init__(G, lambda: G._run(1, *self._args()), "seg_graphs")

    def _args(self):
        tok, pos = self.G.step[0:1], self.G.step[1:2]
        return tok, pos, pos, False

    def _record(self):
        """None (nothing kept) where the driver refuses a segment: the step then runs again as
        plain launches (it rewrites the same cache entries)."""
        G = self.G
        gen = G._run_gen(1, *self._args())
        segs, first = [], True
        while True:
            box = []
            ex = G._capture(lambda: box.append(_advance(gen, first)))
            if ex is None:
                gen.close()
                return None
            first = False
            moe = box[0][0]
            segs.append((ex, moe))
            G._launch(ex)
            if moe is None:
                return segs
            G._host_part(moe)

    def _replay(self):
        for ex, moe in self.rec:
            self.G._launch(ex)
            if moe is not None:
                self.G._host_part(moe)


class CudaLlama:
    """Same interface as LlamaModel (``forward(ids, pos0, all_logits)``), computing on the GPU."""

    def __init__(self, net: LlamaModel, mode: str = "cuda", gpu_expert_cache_gb: float = 0.0,
                 gf=None, graphs: bool | None = None):
        cuda = _cuda()
        kc, ops, _ = _k()
        if mode not in ("cuda", "hybrid", "unified"):
            raise FlashMoEError(f"unknown GPU mode {mode!r}")
        self.cpu = net
        self.mode = mode
        self.cfg = cfg = net.cfg
        self.n_ctx, self.n_vocab, self.store = net.n_ctx, net.n_vocab, net.store
        self.cache = net.cache  # (the Model's prefix bookkeeping reads net.cache)
        self.blocks = net.blocks  # (Model.set_experts_per_token sets the MoE blocks' n_used)
        self.expert_cache = None
        self.stream = cuda.stream()
        self.uploaded: dict = {}
        self._zeros: dict = {}
        emb = net.tok_embd
        self.emb_fmt = kc.get_format(emb.fmt.qtype, "token_embd.weight")
        self.emb = self.uploaded[id(emb.w)] = cuda.to_device(np.ascontiguousarray(emb.w))
        self.output_norm = cuda.to_device(net.output_norm)
        self.output = _GLinear.of(self, net.output)
        self.inv_freq = cuda.to_device(net.inv_freq)
        self.attn_factor, self.scale = net.attn_factor, net.scale
        if mode == "unified" and gf is None:
            raise FlashMoEError("unified memory needs the model's GGUF file")
        mapped = _register_mapped(gf) if mode == "unified" else None
        self.layers = []
        moes = []
        for blk in net.blocks:
            L = dict(attn_norm=cuda.to_device(blk.attn_norm), ffn_norm=cuda.to_device(blk.ffn_norm),
                     wo=_GLinear.of(self, blk.wo),
                     q_norm=None if blk.q_norm is None else cuda.to_device(blk.q_norm),
                     k_norm=None if blk.k_norm is None else cuda.to_device(blk.k_norm))
            L["qkv"], (L["wq"], L["wk"], L["wv"]) = self._rows_of(blk.wq, blk.wk, blk.wv)
            if isinstance(blk.mlp, DenseMLP):
                L["mlp"] = (_GLinear.of(self, blk.mlp.gate), _GLinear.of(self, blk.mlp.up),
                            _GLinear.of(self, blk.mlp.down))
            elif isinstance(blk.mlp, MoEMLP):
                L["mlp"] = _GMoE(self, blk.mlp, mode, mapped)
                moes.append(blk.mlp)
            else:
                raise ModelError(f"device {mode}: no GPU path for {type(blk.mlp).__name__}")
            self.layers.append(L)
        if mode == "hybrid" and gpu_expert_cache_gb > 0 and moes:
            self.expert_cache = _ExpertCache(self, moes, gpu_expert_cache_gb * 1e9, gf)
        Hkv, K, V, D = cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v, cfg.n_embd
        self.kc = [cuda.device_array((self.n_ctx, Hkv, K), np.float32) for _ in self.layers]
        self.vc = [cuda.device_array((self.n_ctx, Hkv, V), np.float32) for _ in self.layers]
        self.weight_bytes = sum(a.nbytes for a in self.uploaded.values())
        self.inp = _Input(self, D)
        self.inp_attn = _Input(self, cfg.n_head * V)
        self.step = cuda.device_array(2, np.int32)  # token, position of a decode step
        self.host_step = cuda.pinned_array(2, np.int32)
        self._host_logits = None
        self._fast = True
        self.bufs: dict = {}
        if graphs is None:
            graphs = os.environ.get("FLASHMOE_CUDA_GRAPHS", "1") != "0"
        from numba import config
        self.graphs = graphs and mode != "hybrid" and not config.ENABLE_CUDASIM
        self.seg_graphs = graphs and mode == "hybrid" and not config.ENABLE_CUDASIM
        self._graphs_kept: list = []  # (the recorded graphs outlive their executables)
        tok, pos = self.step[0:1], self.step[1:2]
        # a decode step: logits out; and greedy generation's step: its argmax is the next token
        self.step_graph = _StepGraph(self, lambda: self._run(1, tok, pos, pos, False))
        self.greedy_graph = _StepGraph(self, lambda: self._greedy(self._run(1, tok, pos, pos, False), self.step,
                                                                  self.stream))
        self.hybrid_step = _HybridStep(self)
        self._greedy = self._ring = None

    def _rows_of(self, *lins):
        """Linears that read one input: where they share a format (and have no bias) their rows
        are uploaded as one tensor, read by one launch for a decode token (the K and V products
        alone are too short to fill the GPU); returns (that _GLinear or None, one per Linear
        over its rows)."""
        qt, C = lins[0].qtype, lins[0].w.shape[1]
        if any(lin.qtype != qt or lin.w.shape[1] != C or lin.bias is not None for lin in lins):
            return None, tuple(_GLinear.of(self, lin) for lin in lins)
        dev = _upload_rows([lin.w for lin in lins])
        self.uploaded[id(dev)] = dev
        parts, r = [], 0
        for lin in lins:
            n = lin.w.shape[0]
            parts.append(_GLinear(self, qt, lin.name, None, dev=dev[r:r + n]))
            r += n
        return _GLinear(self, qt, "+".join(lin.name for lin in lins), None, dev=dev), tuple(parts)

    @property
    def expert_stats(self):
        c = self.expert_cache
        return None if c is None else dict(hits=c.hits, misses=c.misses, bytes_copied=c.bytes_copied,
                                           direct=c.direct)

    def zeros(self, n: int):
        z = self._zeros.get(n)
        if z is None:
            z = self._zeros[n] = _cuda().to_device(np.zeros(n, np.int32))
        return z

    def _buffers(self, T):
        cuda = _cuda()
        b = self.bufs.get(T)
        if b is None:
            cfg = self.cfg
            b = self.bufs[T] = dict(
                x=cuda.device_array((T, cfg.n_embd), np.float32), h=cuda.device_array((T, cfg.n_embd), np.float32),
                attn=cuda.device_array((T, cfg.n_head, cfg.head_dim_v), np.float32),
                logits=cuda.device_array((T, self.n_vocab), np.float32),
                ids=cuda.device_array(T, np.int32), pos=cuda.device_array(T, np.int32))
        return b

    def _run(self, T, ids_dev, positions, pos, all_logits):
        """The forward pass's launches (all on self.stream), with the host parts of a hybrid
        decode step in between; returns the device logits."""
        gen = self._run_gen(T, ids_dev, positions, pos, all_logits)
        moe, out = _advance(gen, True)
        while moe is not None:
            self._host_part(moe)
            moe, out = _advance(gen, False)
        return out

    def _host_part(self, moe):
        """A hybrid MoE block's host part, once the stream has reached it; the stream then waits
        for the block's copies."""
        self.stream.synchronize()
        ev = moe.hybrid_host()
        if ev is not None:
            ev.wait(stream=self.stream)

    def _run_gen(self, T, ids_dev, positions, pos, all_logits):
        """The forward pass's launches as a generator: it stops at each MoE block of a hybrid
        decode step, where that block's host part is due (it yields the block); its value (the
        StopIteration's) is the device logits."""
        _, ops, _ = _k()
        cfg = self.cfg
        s = self.stream
        H, Hkv, K, V = cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v
        eps = cfg.norm_eps
        b = self._buffers(T)
        x, h, attn = b["x"], b["h"], b["attn"]
        self.emb_fmt.dequantize_rows(self.emb, ids_dev, x, s)
        for il, L in enumerate(self.layers):
            inp = self._norm(x, L["attn_norm"], h, L["qkv"] if T == 1 and L["qkv"] is not None else L["wq"])
            if T == 1 and L["qkv"] is not None:  # one launch; q, k, v: views of its output row
                o = L["qkv"](inp)[0]
                nq, nk = H * K, Hkv * K
                q = o[:nq].reshape(T, H, K)
                k = o[nq:nq + nk].reshape(T, Hkv, K)
                v = o[nq + nk:].reshape(T, Hkv, V)
            else:
                q = L["wq"](inp).reshape(T, H, K)
                k = L["wk"](inp).reshape(T, Hkv, K)
                v = L["wv"](inp).reshape(T, Hkv, V)
            for t, w, nh in ((q, L["q_norm"], H), (k, L["k_norm"], Hkv)):
                if w is not None:
                    flat = t.reshape(T * nh, K) if w.shape[0] == K else t.reshape(T, nh * K)
                    ops.rmsnorm(flat, w, eps, flat, s)
            ops.rope_store(q, k, v, self.kc[il], self.vc[il], positions, pos, self.inv_freq, self.attn_factor,
                           cfg.rope_neox, s)
            inp = self.inp_attn.set(attn.reshape(T, H * V))
            a = inp.fused_act(L["wo"], T > 1, ops.attention_rounds(V))
            ops.attention(q, self.kc[il], self.vc[il], pos, self.scale, attn, s, act=a)
            L["wo"](inp, out=x, accumulate=True)
            mlp = L["mlp"]
            inp = self._norm(x, L["ffn_norm"], h, mlp[0] if isinstance(mlp, tuple) else mlp.first_product())
            if isinstance(mlp, tuple):
                g = mlp[0](inp)
                mlp[2](self._inp_ff(g).set_silu(g, mlp[1](inp), mlp[2], T > 1), out=x, accumulate=True)
            elif mlp.mode == "hybrid" and T == 1:
                mlp.hybrid_pre(inp)
                yield mlp
                mlp.hybrid_post(inp, x)
                mlp.shared_expert(inp, x)
            else:
                mlp(inp, x)
        if not all_logits:
            x = x[T - 1:]
        n = x.shape[0]
        return self.output(self._norm(x, self.output_norm, h[:n], self.output), out=b["logits"][:n])

    def _norm(self, x, w, h, lin=None):
        """h = rmsnorm(x) * w: the input of the next products; with the int8 form that ``lin``
        reads made in the same launch (its other forms on first use)."""
        _, ops, q8 = _k()
        inp = self.inp.set(h)
        a = None if lin is None else inp.fused_act(lin, x.shape[0] > 1, q8.rmsnorm_rounds(x.shape[1]))
        if a is not None:
            a.rmsnorm(x, w, self.cfg.norm_eps, h, self.stream)
        else:
            ops.rmsnorm(x, w, self.cfg.norm_eps, h, self.stream)
        return inp

    def _inp_ff(self, g):
        inp = self.bufs.get(("ff", g.shape[1]))
        if inp is None:
            inp = self.bufs[("ff", g.shape[1])] = _Input(self, g.shape[1])
        return inp.set(g)

    def forward(self, ids: np.ndarray, pos0: int, all_logits: bool = False) -> np.ndarray:
        cuda = _cuda()
        T = len(ids)
        s = self.stream
        if pos0 + T > self.n_ctx:
            raise FlashMoEError(f"context overflow: {pos0 + T} > n_ctx {self.n_ctx}")
        if T == 1 and not all_logits:
            self.host_step[0] = int(ids[0])
            self.host_step[1] = int(pos0)
            if self._fast and self.step_graph.ready():
                try:
                    return self._replay()
                except TypeError:  # a driver binding that takes its arguments otherwise
                    self._fast = False
            self.step.copy_to_device(self.host_step, stream=s)
            (self.hybrid_step if self.mode == "hybrid" else self.step_graph)()
            out = self._buffers(1)["logits"]
            if self._host_logits is None:  # pinned: an asynchronous copy, no staging through the driver
                self._host_logits = cuda.pinned_array(out.shape, np.float32)
            out.copy_to_host(self._host_logits, stream=s)
            s.synchronize()
            return self._host_logits.copy()
        b = self._buffers(T)
        b["ids"].copy_to_device(np.ascontiguousarray(ids, np.int32), stream=s)
        b["pos"].copy_to_device(np.arange(pos0, pos0 + T, dtype=np.int32), stream=s)
        pos = b["pos"][0:1]  # (device memory that outlives the launches)
        out = self._run(T, b["ids"], b["pos"], pos, all_logits)
        res = out.copy_to_host(stream=s)
        s.synchronize()
        return res

    @property
    def greedy_on_device(self) -> bool:
        """Whether ``decode_greedy`` runs ahead of the host (not in hybrid: its experts wait for it)."""
        return self.mode != "hybrid"

    def decode_greedy(self, tok: int, pos: int, n: int, ahead: int = 3) -> Iterator[int]:
        """The n greedy tokens that follow ``tok`` fed at ``pos`` (each fed at the next position
        in turn), computed without the host between the steps: each step's argmax (numpy's:
        the first of equals) is the next step's token on the device, so the host launches up
        to ``ahead`` steps before it reads a token back. Where the caller stops early, the
        steps already launched still run: their K/V lie past the tokens it keeps, to be
        overwritten. Same tokens as ``forward`` and an argmax of its logits."""
        if n <= 0:
            return
        if pos + n > self.n_ctx:
            raise FlashMoEError(f"context overflow: {pos + n} > n_ctx {self.n_ctx}")
        cuda = _cuda()
        _, ops, _ = _k()
        s = self.stream
        if self._greedy is None:
            self._greedy = ops.GreedyStep(self.n_vocab)
            self._ring = cuda.pinned_array(max(ahead, 1), np.int32)
        ahead = min(max(ahead, 1), len(self._ring))
        ring = self._ring
        s.synchronize()  # (the ring's slots and host_step are free)
        self.host_step[0] = int(tok)
        self.host_step[1] = int(pos)
        self.step.copy_to_device(self.host_step, stream=s)
        events = [_event() for _ in range(ahead)]
        tok_dev = self.step[0:1]
        launched = done = 0
        while done < n:
            while launched < n and launched - done < ahead:
                self.greedy_graph()
                slot = launched % ahead
                tok_dev.copy_to_host(ring[slot:slot + 1], stream=s)
                events[slot].record(s)
                launched += 1
            slot = done % ahead
            events[slot].synchronize()
            done += 1
            yield int(ring[slot])

    def _replay(self) -> np.ndarray:
        """A recorded decode step: token in, graph, logits out, straight through the driver (the
        host's share of a token is then a few driver calls)."""
        from cuda.bindings import driver as drv
        h = self.stream.handle
        logits = self._buffers(1)["logits"]
        out = self._host_logits
        for err in (drv.cuMemcpyHtoDAsync(self.step.device_ctypes_pointer.value, self.host_step.ctypes.data, 8, h)[0],
                    drv.cuGraphLaunch(self.step_graph.rec, h)[0],
                    drv.cuMemcpyDtoHAsync(out.ctypes.data, logits.device_ctypes_pointer.value, out.nbytes, h)[0],
                    drv.cuStreamSynchronize(h)[0]):
            if err != drv.CUresult.CUDA_SUCCESS:
                raise FlashMoEError(f"CUDA decode step failed ({err.name})")
        return out.copy()

    def _capture(self, launches):
        """The launches ``launches()`` makes on the stream, recorded as a CUDA graph: its
        executable (None where the driver refuses)."""
        from cuda.bindings import driver as drv
        s = self.stream
        s.synchronize()
        h = s.handle
        (err,) = drv.cuStreamBeginCapture(h, drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED)
        if err != drv.CUresult.CUDA_SUCCESS:
            return None
        try:
            launches()
        finally:
            err, graph = drv.cuStreamEndCapture(h)
        if err != drv.CUresult.CUDA_SUCCESS:
            return None
        err, ex = drv.cuGraphInstantiate(graph, 0)
        if err != drv.CUresult.CUDA_SUCCESS:
            return None
        self._graphs_kept.append(graph)
        return ex

    def _key(self):
        return tuple(getattr(b.mlp, "n_used", 0) for b in self.blocks)

    def _launch(self, ex):
        from cuda.bindings import driver as drv
        (err,) = drv.cuGraphLaunch(ex, self.stream.handle)
        if err != drv.CUresult.CUDA_SUCCESS:
            raise FlashMoEError(f"CUDA graph launch failed ({err.name})")
