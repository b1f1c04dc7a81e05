"""Checks of the CUDA kernels against independent oracles, run as a program (so that
NUMBA_ENABLE_CUDASIM can be set before numba.cuda is imported): gguf.quants.dequantize and a
float64 dot for the block formats, numpy formulas for the layer operations.

    python tests/cuda_checks.py [--big]      prints one JSON object: check name -> relative error
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

sys.path.insert(0, str(Path(__file__).parent))  # exact_ref


def _weights(qt, rows, cols, rng):
    """Raw block bytes of random weights in format qt (from gguf's quantizer or the project's).

    Formats that neither can quantize (the IQ2/IQ3 lattice formats) get random blocks: every byte
    pattern is a valid block once its leading f16 scale d is a finite half (set small here).
    """
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    if qt == GGMLQuantizationType.F32:
        return x.view(np.uint8).reshape(rows, -1)
    try:
        return np.ascontiguousarray(gq.quantize(x, qt)).view(np.uint8).reshape(rows, -1)
    except (NotImplementedError, ValueError, TypeError, KeyError):
        from flashmoe_gguf.kernels.registry import get_format
        quantize = get_format(qt).quantize
        if quantize is not None:
            return np.ascontiguousarray(quantize(x)).reshape(rows, -1)
    bs, ts = GGML_QUANT_SIZES[qt]
    nb = rows * cols // bs
    blocks = rng.integers(0, 256, (nb, ts), dtype=np.uint8)
    blocks[:, :2] = rng.uniform(-0.05, 0.05, nb).astype(np.float16).view(np.uint8).reshape(nb, 2)
    return blocks.reshape(rows, -1)


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / (np.max(np.abs(b)) + 1e-30))


def check_formats(rows, cols, tokens, rng):
    from numba import cuda

    from flashmoe_gguf.kernels.cuda import get_format, supported_types
    res = {}
    for qt in supported_types():
        bs, _ = GGML_QUANT_SIZES[qt]
        c = max(cols, bs)
        w = _weights(qt, rows, c, rng)
        ref = gq.dequantize(w.reshape(-1) if qt != GGMLQuantizationType.F32 else w, qt)
        ref = np.asarray(ref, np.float64).reshape(rows, c)
        x = rng.standard_normal((tokens, c)).astype(np.float32)
        mod = get_format(qt)
        dw = cuda.to_device(w)
        out = cuda.device_array(rows, np.float32)
        mod.matvec(dw, cuda.to_device(x[0]), out)
        res[f"{qt.name}.matvec"] = _rel(out.copy_to_host(), ref @ x[0].astype(np.float64))
        out2 = cuda.device_array((tokens, rows), np.float32)
        mod.matmul(dw, cuda.to_device(x), out2)
        res[f"{qt.name}.matmul"] = _rel(out2.copy_to_host(), x.astype(np.float64) @ ref.T)
        ids = np.array([rows - 1, 0], np.int32)
        out3 = cuda.device_array((2, c), np.float32)
        mod.dequantize_rows(dw, cuda.to_device(ids), out3)
        res[f"{qt.name}.dequantize_rows"] = _rel(out3.copy_to_host(), ref[ids])
    return res


def _rope_ref(z, pos, inv, neox):
    """numpy's rope (float64) of z [T, heads, K] at positions pos over its first 2 len(inv) dims:
    neox halves or interleaved pairs; the other dims as they are."""
    half = len(inv)
    ang = pos[:, None].astype(np.float64) * inv[None, :].astype(np.float64)
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    z = z.astype(np.float64)
    if neox:
        a, b = z[..., :half], z[..., half:2 * half]
        return np.concatenate([a * c - b * s, a * s + b * c, z[..., 2 * half:]], -1)
    a, b = z[..., 0:2 * half:2], z[..., 1:2 * half:2]
    return np.concatenate([np.stack([a * c - b * s, a * s + b * c], -1).reshape(*z.shape[:2], 2 * half),
                           z[..., 2 * half:]], -1)


def check_ops(rng, T=2, H=4, Hkv=2, K=8, N=6, E=8, k=2):
    from numba import cuda

    from flashmoe_gguf.kernels.cuda import ops
    res = {}
    D = H * K
    x = rng.standard_normal((T, D)).astype(np.float32)
    w = rng.standard_normal(D).astype(np.float32)
    out = cuda.device_array((T, D), np.float32)
    ops.rmsnorm(cuda.to_device(x), cuda.to_device(w), 1e-5, out)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 ** 2).mean(1, keepdims=True) + 1e-5) * w
    res["rmsnorm"] = _rel(out.copy_to_host(), ref)

    # rope on q and k and the cache store in one launch, against numpy's rope and cache: every
    # key dim rotated ("rope"), and a partial rotation (the last two key dims stay as they are)
    pos = (np.arange(T) * 4 + 3).astype(np.int32)
    p0 = N - T
    for neox in (False, True):
        for name, half in (("rope", K // 2), ("rope_store", K // 2 - 1)):
            inv = (10000.0 ** (-np.arange(0, 2 * half, 2) / K)).astype(np.float32)
            q = rng.standard_normal((T, H, K)).astype(np.float32)
            kk = rng.standard_normal((T, Hkv, K)).astype(np.float32)
            vv = rng.standard_normal((T, Hkv, K)).astype(np.float32)
            dq, dk = cuda.to_device(q), cuda.to_device(kk)
            zc = np.zeros((N, Hkv, K), np.float32)
            dkc, dvc = cuda.to_device(zc), cuda.to_device(zc)
            ops.rope_store(dq, dk, cuda.to_device(vv), dkc, dvc, cuda.to_device(pos),
                           cuda.to_device(np.array([p0], np.int32)), cuda.to_device(inv), 1.0, neox)
            want_kc = np.zeros((N, Hkv, K))
            want_kc[p0:] = _rope_ref(kk, pos, inv, neox)
            want_vc = np.zeros((N, Hkv, K))
            want_vc[p0:] = vv
            res[f"{name}.neox={neox}"] = max(_rel(dq.copy_to_host(), _rope_ref(q, pos, inv, neox)),
                                             _rel(dkc.copy_to_host(), want_kc), _rel(dvc.copy_to_host(), want_vc))

    q = rng.standard_normal((T, H, K)).astype(np.float32)
    kc = rng.standard_normal((N, Hkv, K)).astype(np.float32)
    vc = rng.standard_normal((N, Hkv, K)).astype(np.float32)
    pos0 = N - T
    out = cuda.device_array((T, H, K), np.float32)
    dkc, dvc = cuda.to_device(kc), cuda.to_device(vc)  # (the cache store: rope_store's check above)
    dpos = cuda.to_device(np.array([pos0], np.int32))
    ops.attention(cuda.to_device(q), dkc, dvc, dpos, 0.5, out)
    res["attention"] = _rel(out.copy_to_host(), _attention_ref(q, kc, vc, pos0, 0.5))
    # a longer context (each warp over many keys)
    NL = 16 * N + 37
    kc = rng.standard_normal((NL, Hkv, K)).astype(np.float32)
    vc = rng.standard_normal((NL, Hkv, K)).astype(np.float32)
    out = cuda.device_array((T, H, K), np.float32)
    ops.attention(cuda.to_device(q), cuda.to_device(kc), cuda.to_device(vc), cuda.to_device(np.array([NL - T], np.int32)),
                  0.5, out)
    res["attention.long"] = _rel(out.copy_to_host(), _attention_ref(q, kc, vc, NL - T, 0.5))
    res.update(check_attention_int8(rng, T, H=H, Hkv=Hkv, K=K if K % 32 == 0 else 64, N=N))

    g = rng.standard_normal((T, D)).astype(np.float32)
    u = rng.standard_normal((T, D)).astype(np.float32)
    dg = cuda.to_device(g)
    ops.silu_mul(dg, cuda.to_device(u))
    g64 = g.astype(np.float64)
    res["silu_mul"] = _rel(dg.copy_to_host(), g64 / (1 + np.exp(-g64)) * u)

    y = rng.standard_normal((T, D)).astype(np.float32)
    dx = cuda.to_device(x)
    ops.add_inplace(dx, cuda.to_device(y))
    res["add_inplace"] = _rel(dx.copy_to_host(), x64 + y)

    lg = rng.standard_normal((T, E)).astype(np.float32)
    ids = cuda.device_array(T * k, np.int32)
    wts = cuda.device_array(T * k, np.float32)
    ops.route(cuda.to_device(lg), k, "softmax", None, False, 1.0, ids, wts)
    p = np.exp(lg - lg.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top = np.argsort(-p, 1)[:, :k]
    res["softmax_topk.ids"] = float(np.any(ids.copy_to_host().reshape(T, k) != top))
    res["softmax_topk.weights"] = _rel(wts.copy_to_host().reshape(T, k), np.take_along_axis(p, top, 1))
    res.update(check_moe_ops(rng, T, D, E, k))
    return res


def _attention_ref(q, kc, vc, pos0, scale):
    """numpy's causal GQA attention (float64) of q [T, H, K] at positions pos0 + t over the cache
    kc [N, Hkv, K], vc [N, Hkv, V]."""
    T, H, _ = q.shape
    Hkv = kc.shape[1]
    ref = np.zeros((T, H, vc.shape[2]))
    for t in range(T):
        for h in range(H):
            g = h // (H // Hkv)
            n = pos0 + t + 1
            s = kc[:n, g].astype(np.float64) @ q[t, h].astype(np.float64) * scale
            p = np.exp(s - s.max())
            ref[t, h] = p / p.sum() @ vc[:n, g]
    return ref


def _int8_differs(act, x):
    """1.0 where the int8 form in ``act`` (a q8.Act) of x [n, C] differs anywhere from what the
    CPU's quantizer makes of x (values, scales, 16-sums), else 0.0."""
    from flashmoe_gguf.kernels.cpu.kq_common import q8_buffers, quantize_q8
    n, C = x.shape
    cq, cd, cs = q8_buffers(n, C, act.qb)
    quantize_q8(x, act.qb, cq, cd, cs)
    return float(np.any(act.q8.copy_to_host()[:n] != cq) or np.any(act.d.copy_to_host()[:n] != cd)
                 or np.any(act.s.copy_to_host()[:n] != cs))


def check_attention_int8(rng, T, H=2, Hkv=1, K=64, N=6):
    """Attention with its output rounded to int8 in the same launch (32-value blocks): the
    float output against numpy, its int8 form against the CPU's quantizer of that output."""
    from numba import cuda

    from flashmoe_gguf.kernels.cuda import ops, q8
    q = rng.standard_normal((T, H, K)).astype(np.float32)
    kc = rng.standard_normal((N, Hkv, K)).astype(np.float32)
    vc = rng.standard_normal((N, Hkv, K)).astype(np.float32)
    out = cuda.device_array((T, H, K), np.float32)
    act = q8.Act(T, H * K, 32)
    ops.attention(cuda.to_device(q), cuda.to_device(kc), cuda.to_device(vc), cuda.to_device(np.array([N - T], np.int32)),
                  0.125, out, act=act)
    o = out.copy_to_host()
    return {"attention_int8.value": _rel(o, _attention_ref(q, kc, vc, N - T, 0.125)),
            "attention_int8.int8": _int8_differs(act, o.reshape(T, H * K))}


def check_moe_ops(rng, T, D, E, k):
    """The GPU router against the CPU's MoEMLP.select (every gating, bias and renormalization),
    the weighted expert sum and the shared expert's sigmoid gate against numpy."""
    from types import SimpleNamespace

    from numba import cuda

    from flashmoe_gguf.arch.moe import MoEMLP
    from flashmoe_gguf.kernels.cuda import ops
    res = {}
    bias = (rng.standard_normal(E) * 0.3).astype(np.float32)

    def check(launch, logits, k, gating, sel_bias, norm):
        # (ids wrong: 0 or 1, weights' relative error) of one routing against the CPU's
        m = SimpleNamespace(n_used=k, gating=gating, sel_bias=sel_bias, n_group=0, norm_topk=norm, scale=1.5)
        want_ids, want_w = MoEMLP.select(m, logits.copy())
        ids = cuda.device_array(T * k, np.int32)
        wts = cuda.device_array(T * k, np.float32)
        launch(k, gating, None if sel_bias is None else cuda.to_device(sel_bias), norm, 1.5, ids, wts)
        return (float(np.any(ids.copy_to_host().reshape(T, k) != want_ids)),
                _rel(wts.copy_to_host().reshape(T, k), want_w))

    lg = (rng.standard_normal((T, E)) * 2).astype(np.float32)
    dlg = cuda.to_device(lg)
    cases = [(k, g, sb, norm) for g in ("softmax", "sigmoid", "softmax_weight") for sb in (None, bias)
             for norm in (False, True)]
    if E >= 40:  # more picks than a warp has lanes
        cases += [(40, "softmax", None, True), (40, "softmax_weight", bias, False)]
    errs = [check(lambda *a: ops.route(dlg, *a), lg, *c) for c in cases]
    res["route.ids"] = max(e[0] for e in errs)
    res["route.weights"] = max(e[1] for e in errs)
    # the router product and routing in one launch (rows in two chunks and a remainder), twice
    # (its last thread block resets the count the next launch uses)
    C = ops.RC * ops.RU + 37
    rw = (rng.standard_normal((E, C)) / np.sqrt(C)).astype(np.float32)
    rr = ops.RouterRoute(cuda.to_device(rw), T)
    errs = []
    for c in ((k, "softmax", None, False), (k, "sigmoid", bias, True)):
        xr = (rng.standard_normal((T, C)) * 2).astype(np.float32)
        dx = cuda.to_device(xr)
        logits = (xr.astype(np.float64) @ rw.T.astype(np.float64)).astype(np.float32)
        errs.append(check(lambda *a: rr(dx, *a), logits, *c))
    res["router_route.ids"] = max(e[0] for e in errs)
    res["router_route.weights"] = max(e[1] for e in errs)
    x = rng.standard_normal((T, D)).astype(np.float32)
    y = rng.standard_normal((T * k, D)).astype(np.float32)
    w = rng.random(T * k).astype(np.float32)
    dx = cuda.to_device(x)
    ops.moe_combine(dx, cuda.to_device(y), cuda.to_device(w), k)
    want = x.astype(np.float64) + (w[:, None].astype(np.float64) * y).reshape(T, k, D).sum(1)
    res["moe_combine"] = _rel(dx.copy_to_host(), want)
    g = rng.standard_normal(D).astype(np.float32) * 0.1
    dy = cuda.to_device(y[:T].copy())
    ops.sigmoid_gate(dy, cuda.to_device(x), cuda.to_device(g))
    want = y[:T].astype(np.float64) / (1 + np.exp(-(x.astype(np.float64) @ g)))[:, None]
    res["sigmoid_gate"] = _rel(dy.copy_to_host(), want)
    res.update(check_greedy_step(rng))
    return res


def check_greedy_step(rng):
    """The greedy pick on the device against np.argmax (ties: the first; NaN; all -inf; the
    last index), one case twice (its last thread block resets the count the next launch uses);
    the pick is the next step's token and the position moves on."""
    from numba import cuda

    from flashmoe_gguf.kernels.cuda import ops
    V = ops.AT * ops.AU + 5  # two thread blocks, the second short
    g = ops.GreedyStep(V)
    wrong = 0
    for case in ("random", "ties", "nan", "-inf", "last"):
        x = rng.standard_normal(V).astype(np.float32)
        if case == "ties":
            x[[17, V // 2, V - 3]] = 9.0
        elif case == "nan":
            x[[V // 3, V - 2]] = np.nan
        elif case == "-inf":
            x[:] = -np.inf
        elif case == "last":
            x[-1] = 50.0
        step = cuda.to_device(np.array([-1, 7], np.int32))
        for rep in range(2 if case == "random" else 1):
            g(cuda.to_device(x[None]), step)
            wrong += int(list(step.copy_to_host()) != [int(np.argmax(x)), 8 + rep])
    return {"greedy_step.wrong": float(wrong)}


def check_int8(rows, cols, rng, E=3, variants=True, formats=None, accumulate=True, both_views=True):
    """The int8-activation (dp4a) kernels, expert-indexed, against gguf.quants.dequantize and a
    float64 dot with x rounded as the CPU rounds it; the activation quantizer against the CPU's.
    ``.inexact``: how many outputs differ from that float64 result rounded once to float32 (the
    exact results: see exact_ref.py); the CPU's kernels give them too (test_exact.py)."""
    from exact_ref import exact_dequantize
    from numba import cuda

    from flashmoe_gguf.kernels.cpu.kq_common import q8_buffers, quantize_q8
    from flashmoe_gguf.kernels.cuda import q8
    res = {}
    for qt in formats or q8._SPECS:
        ws = [_weights(qt, rows, cols, rng) for _ in range(E)]
        ref = np.stack([exact_dequantize(w, qt).reshape(rows, cols) for w in ws])
        dt, qb = q8.spec(qt)
        K = 2
        x = rng.standard_normal((K, cols)).astype(np.float32)
        act = q8.Act(K, cols, qb)
        act.quantize(cuda.to_device(x))
        cq, cd, cs = q8_buffers(K, cols, qb)
        quantize_q8(x, qb, cq, cd, cs)  # the CPU path's own quantizer
        res[f"int8.{qt.name}.quantize"] = float(np.any(act.q8.copy_to_host() != cq) or np.any(act.d.copy_to_host() != cd))
        xr = cq.astype(np.float64) * np.repeat(cd.astype(np.float64), qb, axis=1)  # x as rounded
        ids = np.array([E - 1, 0], np.int32)
        raw = cuda.to_device(np.stack(ws))
        views = [q8.view(qt, raw)]  # (a format read as block pairs: its blocks kernel too)
        if views[0].dtype != dt and both_views:
            views.append(raw.view(dt))
        res[f"int8.{qt.name}.views"] = len(views)
        out = cuda.device_array((K, rows), np.float32)
        err = 0.0
        inexact = 0
        with q8.variants_alone():  # every variant's kernel itself, however small the shape
            # the default, and the several-rows-per-warp and unrolled variants (rows not a
            # multiple of the rows per thread block; blocks per row past one unrolled step)
            # (and each of the format's other part functions: lanes per block)
            # (and the warps of a thread block splitting each row: 4, and 2 with two blocks per step)
            kinds = [(None, None, None, None, None)]
            if variants:
                kinds += [(2, 2, 0, None, 1), (4, 1, 2, None, 1), (4, 1, 0, None, 4), (1, 2, 0, None, 2)]
                kinds += [(1 + (n == 2), 2, 0, n, 1) for n in list(q8._SPECS[qt][0])[1:]]
            for dw in views:
                for rpw, unroll, pf, npart, ks in kinds:
                    f = q8.launcher(qt, rpw, unroll, pf=pf, npart=npart, ks=ks)
                    f(dw, cuda.to_device(ids), 1, act, out)  # expert k reads x[k] (down)
                    want = np.stack([ref[ids[i]] @ xr[i] for i in range(K)])
                    got = out.copy_to_host()
                    err = max(err, _rel(got, want))
                    inexact += int(np.sum(got != want.astype(np.float32)))
                    f(dw, cuda.to_device(ids), K, act, out)  # every expert reads x[0] (gate / up)
                    want = np.stack([ref[ids[i]] @ xr[0] for i in range(K)])
                    got = out.copy_to_host()
                    err = max(err, _rel(got, want))
                    inexact += int(np.sum(got != want.astype(np.float32)))
        res[f"int8.{qt.name}.matvec"] = err
        res[f"int8.{qt.name}.inexact"] = inexact
        if not accumulate:
            continue
        # accumulate: out += W[ids[n]] @ x[n]; kk: out[0] += sum over m of wts[m] W[ids[m]] @ x[m]
        err = 0.0
        inexact = 0
        f32 = np.float32
        for dw in views:
            for npart in q8._SPECS[qt][0]:  # (each part function)
                f = q8.launcher(qt, npart=npart)
                y0 = rng.standard_normal((K, rows)).astype(np.float32)
                out = cuda.to_device(y0)
                f(dw, cuda.to_device(ids), 1, act, out, accumulate=True)
                want = y0 + np.stack([ref[ids[i]] @ xr[i] for i in range(K)])
                got = out.copy_to_host()
                err = max(err, _rel(got, want))
                # exact: y0 + (the product rounded), as the CPU adds a product to the residual
                inexact += int(np.sum(got != y0 + np.stack([ref[ids[i]] @ xr[i] for i in range(K)]).astype(f32)))
                wts = rng.random(K).astype(np.float32)
                out = cuda.to_device(y0[:1])
                f(dw, cuda.to_device(ids), 1, act, out, wts=cuda.to_device(wts), kk=K)
                want = y0[:1] + sum(wts[i] * (ref[ids[i]] @ xr[i]) for i in range(K))
                got = out.copy_to_host()
                err = max(err, _rel(got, want))
                # exact: each expert's product rounded, their weighted sum in float64 rounded (the
                # CPU MoE's _expert_sum), added to the residual
                ys = [(ref[ids[i]] @ xr[i]).astype(f32).astype(np.float64) for i in range(K)]
                wsum = sum(np.float64(wts[i]) * ys[i] for i in range(K)).astype(f32)
                inexact += int(np.sum(got != y0[:1] + wsum))
        res[f"int8.{qt.name}.accumulate"] = err
        res[f"int8.{qt.name}.accumulate_inexact"] = inexact
    # silu(g) * u and its int8 form in one launch, against the CPU's silu_mul and quantizer
    from flashmoe_gguf.kernels.cpu import ops as cpu_ops
    for qb in (32, 256) if formats is None else ():
        g = rng.standard_normal((2, 512)).astype(np.float32)
        u = rng.standard_normal((2, 512)).astype(np.float32)
        act = q8.Act(2, 512, qb)
        dg = cuda.to_device(g)
        act.quantize_silu(dg, cuda.to_device(u))
        v = g.copy()
        cpu_ops.silu_mul(v, u)
        cq, cd, cs = q8_buffers(2, 512, qb)
        quantize_q8(v, qb, cq, cd, cs)
        res[f"int8.quantize_silu.{qb}.value"] = _rel(dg.copy_to_host(), v.astype(np.float64))
        # the int8 values may differ where silu's last bit differs (exp on two devices): count them
        res[f"int8.quantize_silu.{qb}.int8_diff"] = float(np.abs(act.q8.copy_to_host().astype(np.int32) - cq).max())
        # RMSNorm and its int8 form in one launch (rows of 3 thread blocks): the value against
        # numpy, its int8 form against the CPU's quantizer of that value, bit for bit
        C = 3 * q8.NR
        x = rng.standard_normal((2, C)).astype(np.float32)
        w = rng.standard_normal(C).astype(np.float32)
        act = q8.Act(2, C, qb)
        dh = cuda.device_array((2, C), np.float32)
        act.rmsnorm(cuda.to_device(x), cuda.to_device(w), 1e-5, dh)
        h = dh.copy_to_host()
        x64 = x.astype(np.float64)
        res[f"int8.rmsnorm.{qb}.value"] = _rel(h, x64 / np.sqrt((x64 ** 2).mean(1, keepdims=True) + 1e-5) * w)
        res[f"int8.rmsnorm.{qb}.int8"] = _int8_differs(act, h)
    return res


def check_wide(rng, rows=3, cols=1024):
    """The few-rows float product (a router's shape: a thread block per row) against float64."""
    from numba import cuda

    from flashmoe_gguf.kernels.cuda import get_format
    w = rng.standard_normal((2, rows, cols)).astype(np.float32)
    x = rng.standard_normal((1, cols)).astype(np.float32)
    out = cuda.device_array((2, rows), np.float32)
    ids = cuda.to_device(np.array([1, 0], np.int32))
    get_format(GGMLQuantizationType.F32).matvec.ids(cuda.to_device(w.view(np.uint8)), ids, 2, cuda.to_device(x), out)
    want = np.stack([w[1] @ x[0].astype(np.float64), w[0] @ x[0].astype(np.float64)])
    return {"F32.matvec_few_rows": _rel(out.copy_to_host(), want)}


def main(argv):
    rng = np.random.default_rng(0)
    big = "--big" in argv
    res = check_formats(rows=256 if big else 4, cols=4096 if big else 256, tokens=5 if big else 2, rng=rng)
    res.update(check_ops(rng) if not big else check_ops(rng, T=3, H=16, Hkv=4, K=64, N=300, E=64, k=8))
    # (in the simulator: the default kernels on short rows, every variant of two formats on
    # rows long enough for an unrolled step and a remainder)
    res.update(check_int8(rows=256 if big else 4, cols=4096 if big else 512, rng=rng, variants=big))
    if not big:  # rows past one unrolled step (Q4_K: 9 blocks, Q8_0: 34, read as 17 pairs, and
        # 33, read as blocks: the default kernel) and not a multiple of 4
        from gguf import GGMLQuantizationType as QT
        for qt, cols, variants in ((QT.Q4_K, 2304, True), (QT.Q8_0, 1088, True), (QT.Q8_0, 1056, False)):
            v = check_int8(rows=5, cols=cols, rng=rng, E=2, formats=(qt,), accumulate=False, variants=variants,
                           both_views=False)
            for k, x in v.items():
                k = k.replace("int8.", "int8.long.")
                res[k] = max(res.get(k, 0.0), x)
    res.update(check_wide(rng))
    print(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1:])
