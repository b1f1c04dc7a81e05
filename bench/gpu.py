"""GPU figures, each against a ceiling measured in the same run.

    python bench/gpu.py [--kernels] [--tune] [--moe PATH] [--layers 8 --experts 16 --top-k 4 ...]
                        [--modes cuda,unified,hybrid,hybrid-cache] [--model PATH]

* ``--kernels``: each format's matvec (the int8 ``dp4a`` kernels, and the exact float kernels
  of the formats without one) in GB/s of weight bytes, 16384 x 16384 (events, 20 repeats).
* ``--tune``: each int8 kernel variant (rows per warp, blocks per step, register cap, L2
  prefetch, lanes per block, warps per row) on a model's shapes: the figures behind
  ``kernels/cuda/q8.py``'s TUNE.
* ``--moe PATH``: writes a synthetic llama-MoE GGUF there (random valid blocks: Q4_K experts,
  Q8_0 attention and output, f32 router; the sizes are options) and decodes it in each mode:
  - ``cuda``: decode tok/s and GB/s of the weight bytes each token reads, against the HBM
    bandwidth (a device-to-device copy measured here; the datasheet's 4.8 TB/s); also the
    recorded decode step replayed alone (the GPU's share, without the host's); and greedy
    generation's rate, its steps chained on the device (``decode_greedy``: no logits to the
    host, the host launching steps ahead of the one it reads);
  - ``unified``: the experts read in place from mapped host memory, against the mapped-read
    bandwidth of a kernel over registered host memory;
  - ``hybrid``: routed experts computed on the CPU from the page cache;
  - ``hybrid-cache``: routed experts through the GPU expert cache (``--cache-gb``), misses
    copied straight from the registered file when it fits in RAM (``hybrid-cache-staged``:
    through pinned staging buffers), against the pinned host-to-device copy bandwidth.
* ``--model PATH``: a real model on device cuda against the CPU path (tests/cuda_model_checks.py).

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from flashmoe_gguf import cuda_compat  # noqa: E402,F401  (before numba.cuda)


def _events_time(fn, reps):
    from numba import cuda
    fn()
    cuda.synchronize()
    e0, e1 = cuda.event(), cuda.event()
    e0.record()
    for _ in range(reps):
        fn()
    e1.record()
    e1.synchronize()
    return cuda.event_elapsed_time(e0, e1) / 1e3 / reps


def ceilings(n_bytes=1 << 30):
    """HBM copy, pinned host-to-device copy and mapped host reads, in GB/s."""
    from numba import cuda

    from flashmoe_gguf.kernels.cuda import q8  # noqa: F401
    res = {}
    a = cuda.device_array(n_bytes, np.uint8)
    b = cuda.device_array(n_bytes, np.uint8)
    dt = _events_time(lambda: b.copy_to_device(a), 10)
    res["hbm_copy_GB_s(read+write)"] = round(2 * n_bytes / dt / 1e9)
    host = cuda.pinned_array(n_bytes, np.uint8)
    host[:] = 1
    dt = _events_time(lambda: a.copy_to_device(host), 5)
    res["h2d_pinned_GB_s"] = round(n_bytes / dt / 1e9, 1)
    mapped = cuda.mapped_array(n_bytes // 4, np.uint32)
    mapped[:] = 1
    out = cuda.device_array(1, np.uint32)
    dt = _events_time(lambda: _sum_u32()[264, 256](mapped, out), 3)
    res["mapped_read_GB_s"] = round(n_bytes / dt / 1e9, 1)
    return res


@functools.lru_cache(maxsize=None)
def _sum_u32():
    """A kernel that reads every u32 of an array (a read-bandwidth probe)."""
    from numba import cuda

    @cuda.jit
    def k(a, out):
        i = cuda.grid(1)
        s = 0
        while i < a.shape[0]:
            s += a[i]
            i += cuda.gridsize(1)
        if s == 12345:
            out[0] = s
    return k


def kernels(rows=16384, cols=16384, reps=20):
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as QT
    from numba import cuda

    from flashmoe_gguf.kernels.cuda import Product, supported_types
    from flashmoe_gguf.kernels.cuda.q8 import Act
    res = {}
    rng = np.random.default_rng(0)
    x = cuda.to_device(rng.standard_normal((1, cols)).astype(np.float32))
    ids = cuda.to_device(np.zeros(1, np.int32))
    out = cuda.device_array((1, rows), np.float32)
    for qt in supported_types():
        bs, ts = GGML_QUANT_SIZES[qt]
        w = _blocks(qt, rows, cols, rng)
        p = Product(qt)
        dw = p.view(cuda.to_device(w).reshape(1, rows, -1))
        act = None
        if p.int8:
            act = Act(1, cols, p.qb)
            act.quantize(x)
        r = reps if p.int8 or qt in (QT.F32, QT.F16, QT.BF16) else 3
        dt = _events_time(lambda: p(dw, ids, 1, x, act, out), r)
        res[qt.name] = dict(kernel="int8" if p.int8 else "float", us=round(dt * 1e6, 1),
                            GB_s=round(w.nbytes / dt / 1e9))
        del dw
    return res


def tune(formats=("Q4_K", "Q8_0", "Q5_K", "Q6_K", "Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL",
                  "IQ4_XS", "MXFP4"),
         variants=((), (1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (2, 1, 0, 2), (4, 1, 0, 2),
                   (1, 1, 0, 0, 4), (1, 2, 0, 0, 4), (2, 1, 0, 0, 4), (2, 2, 0, 0, 4), (4, 1, 0, 0, 4),
                   (1, 1, 0, 0, 2), (4, 1, 0, 0, 4, 4), (4, 1, 0, 0, 4, 2), (2, 1, 0, 0, 4, 4), (2, 2, 0, 0, 4, 2),
                   (4, 1, 0, 0, 0, 4), (2, 1, 0, 0, 0, 4), (2, 2, 0, 0, 0, 2), (1, 1, 0, 0, 0, 4)),
         reps=10, shapes=None):
    """GB/s of each int8 kernel variant (rows per warp, blocks per lane-step[, register cap[,
    prefetch distance[, lanes per block[, warps per row]]]]; () is the default kernel, with its
    choice for small launches) on a model's shapes: 16 experts' gate/up (every expert reads the
    token's x) and down (each reads its own), one square matrix, and 16 tokens' down products
    each summing 4 experts in the launch. (Kernels far shorter than a launch would measure the
    launch, not the kernel: one token's launches measured from Python run at about 1.2 TB/s
    whatever the variant.)"""
    from gguf import GGMLQuantizationType as QT
    from numba import cuda

    from flashmoe_gguf.kernels.cuda import q8
    from flashmoe_gguf.kernels.cuda.q8 import Act
    rng = np.random.default_rng(0)
    # name: (E, R, C, N, div, kk): N outputs, expert n reads x[n // div]; kk > 0: out [N/kk, R],
    # each the weighted sum of kk experts (each on its own x)
    shapes = shapes or {"sq16384": (1, 16384, 16384, 1, 1, 0), "gate16_8192x4096": (16, 8192, 4096, 16, 16, 0),
                        "down16_4096x8192": (16, 4096, 8192, 16, 1, 0),
                        "downsum16x4_4096x8192": (16, 4096, 8192, 64, 1, 4)}
    res = {}
    for name in formats:
        qt = QT[name]
        dt, qb = q8.spec(qt)
        for sname, (E, R, C, N, div, kk) in shapes.items():
            w = _blocks(qt, R, C, rng)
            dw = q8.view(qt, cuda.to_device(np.broadcast_to(w, (E, *w.shape)).copy()))
            T = N // div
            act = Act(T, C, qb)
            act.quantize(cuda.to_device(rng.standard_normal((T, C)).astype(np.float32)))
            ids = cuda.to_device(np.arange(N, dtype=np.int32) * 3 % E)
            out = cuda.device_array((N // kk if kk else N, R), np.float32)
            wts = cuda.to_device(np.full(N, 0.25, np.float32)) if kk else None
            for v in variants:
                rpw, unroll, maxreg, pf, npart, ks = (tuple(v) + (0,) * 6)[:6] if v else (None,) * 6
                if npart and npart not in q8._SPECS[qt][0] and npart not in q8._PAIRED.get(qt, ({},))[0]:
                    continue
                try:
                    f = q8.launcher(qt, rpw, unroll, maxreg, pf, npart or None, ks or None)
                    # (a variant: its own kernel, whatever the launch's size)
                    with q8.variants_alone() if v else contextlib.nullcontext():
                        dt_s = _events_time(lambda: f(dw, ids, div, act, out, wts=wts, kk=kk), reps)
                except Exception as e:  # (a variant that does not build or run here: say so, go on)
                    print(f"{name} {v}: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr, flush=True)
                    continue
                tag = "default" if not v else (
                    f"r{rpw}u{unroll}" + (f"m{maxreg}" if maxreg else "") + (f"p{pf}" if pf else "")
                    + (f"n{npart}" if npart else "") + (f"k{ks}" if ks else ""))
                res[f"{name}.{sname}.{tag}"] = round(N * w.nbytes / dt_s / 1e9)
                if sname == "sq16384":
                    try:
                        regs = f.kernel.get_regs_per_thread()  # (per signature, when not given one)
                        res[f"{name}.regs.{tag}"] = max(regs.values()) if isinstance(regs, dict) else regs
                    except Exception:  # (the kernel's signature is not unique, or the API moved)
                        pass
            del dw
        print(json.dumps({k: v for k, v in res.items() if k.startswith(name + ".")}), file=sys.stderr, flush=True)
    return res


# per format: byte offset of the f16 scale d, of the f16 minimum (or None), and the minimum as a
# multiple of d that makes the mean weight zero for uniformly random quants
_SCALE_FIELDS = {
    "Q4_K": (0, 2, 7.5), "Q5_K": (0, 2, 15.5), "Q2_K": (80, 82, 1.5), "Q3_K": (108, None, 0),
    "Q6_K": (208, None, 0), "Q8_0": (0, None, 0), "Q4_0": (0, None, 0), "Q5_0": (0, None, 0),
    "Q4_1": (0, 2, -7.5), "Q5_1": (0, 2, -15.5), "IQ4_NL": (0, None, 0), "IQ4_XS": (0, None, 0),
    "IQ2_XXS": (0, None, 0), "IQ2_XS": (0, None, 0), "IQ2_S": (0, None, 0), "IQ3_XXS": (0, None, 0),
    "IQ3_S": (0, None, 0),
}


def _blocks(qt, rows, cols, rng):
    """Random valid blocks whose weights have mean ~0 and standard deviation ~1/sqrt(cols)
    (random quants; the f16 scale fields set so), so that a synthetic model stays finite."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as QT
    from gguf import quants as gq
    bs, ts = GGML_QUANT_SIZES[qt]
    nb = cols // bs
    if qt in (QT.F32, QT.F16, QT.BF16):
        f = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        if qt == QT.F16:
            f = f.astype(np.float16)
        elif qt == QT.BF16:
            f = (f.view(np.uint32) >> 16).astype(np.uint16)
        return f.view(np.uint8).reshape(rows, -1)
    pool = rng.integers(0, 256, (min(rows * nb, 1 << 16), ts), dtype=np.uint8)

    def set_scales(d):
        d_off, m_off, m_fac = _SCALE_FIELDS.get(qt.name, (None, None, 0))
        if d_off is not None:
            pool[:, d_off:d_off + 2] = np.frombuffer(np.float16(d).tobytes(), np.uint8)
        if m_off is not None:
            pool[:, m_off:m_off + 2] = np.frombuffer(np.float16(m_fac * d).tobytes(), np.uint8)

    if qt == QT.MXFP4:
        pool[:, 0] = 120  # exponent byte 2**-7
    else:
        set_scales(1.0 / 64)
        sample = np.asarray(gq.dequantize(pool[:256].reshape(-1), qt), np.float64)
        set_scales(1.0 / 64 / (sample.std() * np.sqrt(cols)))
    idx = np.arange(rows * nb) % pool.shape[0]
    return pool[idx].reshape(rows, nb * ts)


def write_synthetic_moe(path, hidden, heads, kv_heads, ff, n_expert, top_k, layers, vocab, expert_type, rest_type):
    """A llama-architecture MoE GGUF of random valid blocks (bandwidth, not quality)."""
    import gguf
    from gguf import GGMLQuantizationType as QT
    from tiny_gguf import add_byte_level_vocab
    rng = np.random.default_rng(0)
    et, rt = QT[expert_type.upper()], QT[rest_type.upper()]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_expert_count(n_expert)
    w.add_expert_used_count(top_k)
    w.add_expert_feed_forward_length(ff)
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    hd = hidden // heads
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    add_byte_level_vocab(w, vocab)

    def mat(name, qt, rows, cols, E=0):
        m = _blocks(qt, rows, cols, rng)
        if E:
            m = np.broadcast_to(m, (E, *m.shape)).copy()
        shape = (E, rows, cols) if E else (rows, cols)
        w.add_tensor(name, m, raw_shape=m.shape, raw_dtype=qt)
        return shape

    ones = np.ones(hidden, np.float32)
    mat("token_embd.weight", rt, vocab, hidden)
    w.add_tensor("output_norm.weight", ones)
    mat("output.weight", rt, vocab, hidden)
    for i in range(layers):
        p = f"blk.{i}"
        w.add_tensor(f"{p}.attn_norm.weight", ones)
        w.add_tensor(f"{p}.ffn_norm.weight", ones)
        mat(f"{p}.attn_q.weight", rt, hidden, hidden)
        mat(f"{p}.attn_k.weight", rt, kv_heads * hd, hidden)
        mat(f"{p}.attn_v.weight", rt, kv_heads * hd, hidden)
        mat(f"{p}.attn_output.weight", rt, hidden, hidden)
        w.add_tensor(f"{p}.ffn_gate_inp.weight", rng.standard_normal((n_expert, hidden)).astype(np.float32))
        mat(f"{p}.ffn_gate_exps.weight", et, ff, hidden, n_expert)
        mat(f"{p}.ffn_up_exps.weight", et, ff, hidden, n_expert)
        mat(f"{p}.ffn_down_exps.weight", et, hidden, ff, n_expert)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def token_bytes(gf, top_k):
    """Weight bytes one decode token reads: every non-expert matrix (one embedding row) and
    top_k experts' three matrices per layer; and the expert part alone."""
    dense = expert = 0
    for t in gf:
        if t.name == "token_embd.weight":
            dense += t.n_bytes // t.shape[1]
        elif "_exps." in t.name:
            expert += t.n_bytes // t.shape[2] * top_k
        else:
            dense += t.n_bytes
    return dense + expert, expert


def decode(path, mode, n_tok, cache_gb=0.0, graphs=None):
    from numba import cuda

    from flashmoe_gguf import Model
    from flashmoe_gguf.arch.cuda_llama import CudaLlama
    kw = {}
    if mode == "unified":
        kw = dict(device="cuda", unified_memory=True)
    elif mode in ("hybrid-cache", "hybrid-cache-staged"):
        kw = dict(device="hybrid", gpu_expert_cache_gb=cache_gb)
    elif mode != "cpu":
        kw = dict(device=mode)
    t0 = time.perf_counter()
    with mock.patch.dict(os.environ, {"FLASHMOE_EXPERT_STAGING": "1"} if mode == "hybrid-cache-staged" else {}):
        m = Model.load(path, n_ctx=n_tok + 16, **kw)
    load_s = time.perf_counter() - t0
    net = m.net
    if graphs is False and isinstance(net, CudaLlama):
        net.graphs = False
    rng = np.random.default_rng(1)
    toks = rng.integers(0, 256, n_tok + 8)
    for i in range(4):  # compile, warm up, record the graph
        net.forward(toks[i:i + 1], i)
    if mode != "cpu":
        cuda.synchronize()
    if getattr(net, "expert_cache", None) is not None:
        c = net.expert_cache
        c.hits = c.misses = c.bytes_copied = 0
    t0 = time.perf_counter()
    for i in range(n_tok):
        net.forward(toks[4 + i:5 + i], 4 + i)
    dt = (time.perf_counter() - t0) / n_tok
    r = dict(tok_s=round(1 / dt, 2), load_s=round(load_s, 1))
    if isinstance(net, CudaLlama) and net.step_graph.ready():  # the GPU's share: the recorded step replayed alone
        cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n_tok):
            net.step_graph()
        net.stream.synchronize()
        r["replay_alone_tok_s"] = round(n_tok / (time.perf_counter() - t0), 2)
    if getattr(net, "greedy_on_device", False):  # greedy generation: steps chained on the device
        for _ in net.decode_greedy(int(toks[4]), 4, 4):  # compile, record its graph
            pass
        t0 = time.perf_counter()
        n = sum(1 for _ in net.decode_greedy(int(toks[4]), 4, n_tok))
        r["greedy_tok_s"] = round(n / (time.perf_counter() - t0), 2)
    st = getattr(net, "expert_stats", None)
    if st:
        r.update(cache_hit_rate=round(st["hits"] / max(1, st["hits"] + st["misses"]), 3),
                 copied_MB_per_token=round(st["bytes_copied"] / n_tok / 1e6, 1),
                 copies="from the registered file" if st["direct"] else "through pinned staging")
    del m, net
    return r


def moe(path, a, ceil):
    from flashmoe_gguf.gguf_file import GGUFFile
    if not Path(path).exists() or a.rewrite:
        t0 = time.perf_counter()
        write_synthetic_moe(path, a.hidden, a.heads, a.kv_heads, a.ff, a.experts, a.top_k, a.layers, a.vocab,
                            a.expert_type, a.rest_type)
        print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    gf = GGUFFile(path)
    per_tok, expert_tok = token_bytes(gf, a.top_k)
    size = sum(t.n_bytes for t in gf)
    gf.close()
    res = dict(file_GB=round(size / 1e9, 2), bytes_per_token_MB=round(per_tok / 1e6, 1),
               expert_bytes_per_token_MB=round(expert_tok / 1e6, 1))
    for mode in a.modes.split(","):
        n = a.tokens if mode in ("cuda", "cuda-nograph") else a.tokens_host
        try:
            r = decode(path, "cuda" if mode == "cuda-nograph" else mode, n, a.cache_gb,
                       graphs=False if mode == "cuda-nograph" else None)
        except Exception as ex:  # one mode's failure: reported, the others still measured
            import traceback
            traceback.print_exc()
            res[mode] = {"error": f"{type(ex).__name__}: {ex}"}
            continue
        if mode in ("cuda", "cuda-nograph"):
            gbs = per_tok * r["tok_s"] / 1e9
            r.update(GB_s=round(gbs), of_4800_GB_s=round(gbs / 4800, 3),
                     of_measured_copy=round(gbs / ceil["hbm_copy_GB_s(read+write)"], 3))
            if "replay_alone_tok_s" in r:  # without the host's share of a token
                r["replay_alone_of_4800_GB_s"] = round(per_tok * r["replay_alone_tok_s"] / 1e9 / 4800, 3)
            if "greedy_tok_s" in r:  # generate's greedy steps, chained on the device
                r["greedy_of_4800_GB_s"] = round(per_tok * r["greedy_tok_s"] / 1e9 / 4800, 3)
        elif mode == "unified":
            bound = ceil["mapped_read_GB_s"] * 1e9 / expert_tok
            r.update(bound_tok_s=round(bound, 2), of_bound=round(r["tok_s"] / bound, 3))
        elif mode in ("hybrid-cache", "hybrid-cache-staged"):
            copied = r.get("copied_MB_per_token", 0) * 1e6
            if copied:
                bound = ceil["h2d_pinned_GB_s"] * 1e9 / copied
                r.update(bound_tok_s=round(bound, 2), of_bound=round(r["tok_s"] / bound, 3))
        res[mode] = r
        print(json.dumps({mode: r}), file=sys.stderr, flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--tune", action="store_true", help="each int8 kernel variant on a model's shapes")
    ap.add_argument("--moe", default=None, metavar="PATH")
    ap.add_argument("--rewrite", action="store_true")
    ap.add_argument("--modes", default="cuda,cuda-nograph,unified,hybrid-cache,hybrid")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--ff", type=int, default=8192)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--expert-type", default="q4_k")
    ap.add_argument("--rest-type", default="q8_0")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--tokens-host", type=int, default=8)
    ap.add_argument("--cache-gb", type=float, default=2.0)
    ap.add_argument("--model", default=None)
    a = ap.parse_args()
    from numba import cuda
    res = {"device": cuda.get_current_device().name.decode() if isinstance(cuda.get_current_device().name, bytes)
           else str(cuda.get_current_device().name)}
    res["ceilings"] = ceil = ceilings()
    print(json.dumps(res), file=sys.stderr, flush=True)
    if a.kernels:
        res["matvec_16384x16384"] = kernels()
        print(json.dumps(res["matvec_16384x16384"]), file=sys.stderr, flush=True)
    if a.tune:
        res["tune"] = tune()
    if a.moe:
        res["moe"] = moe(a.moe, a, ceil)
    if a.model:
        from cuda_model_checks import real
        res["model"] = real(a.model)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
