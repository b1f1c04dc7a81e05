"""End-to-end checks of the GPU forward pass against the CPU path, run as a program (so that
NUMBA_ENABLE_CUDASIM can be set first): tiny random llama GGUFs (dense: device cuda; MoE: device
hybrid) and, with --model PATH, a real model.

    python tests/cuda_model_checks.py [--model PATH]   prints one JSON object of figures
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def _norm_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def _float_cpu(net):
    """Switch the CPU net's products to their float32-activation kernels where a format has one
    (the default decode kernels round activations to int8, as llama.cpp does; the GPU does not)."""
    from flashmoe_gguf.kernels import get_format
    lins = [net.output]
    for b in net.blocks:
        lins += [b.wq, b.wk, b.wv, b.wo] + [getattr(b.mlp, n) for n in ("gate", "up", "down") if hasattr(b.mlp, n)]
    for lin in lins:
        f32 = getattr(get_format(lin.qtype).module, "matvec_f32", None)
        if f32 is not None:
            lin._matvec = f32


def compare(path, device, prompt, n_decode, float_cpu=True, **kw):
    """Normalized max logit difference (prompt, then each decode step) and greedy agreement.

    The decode steps run long enough for the GPU model to record its decode graph and replay it.
    """
    from flashmoe_gguf import Model

    cpu = Model.load(path, n_ctx=64)
    if float_cpu:
        _float_cpu(cpu.net)
    dev = Model.load(path, n_ctx=64, device=device, **kw)
    ids = np.asarray(prompt, np.int64)
    ld, lc = dev.net.forward(ids, 0, all_logits=True), cpu.net.forward(ids, 0, all_logits=True)
    errs = [_norm_err(ld, lc)]
    differ = int(np.sum(ld != lc))  # logits not bit for bit the CPU's
    tok_c = tok_d = int(prompt[-1])
    same = True
    toks_d = []
    for i in range(n_decode):
        lc = cpu.net.forward(np.array([tok_c], np.int64), len(prompt) + i)[0]
        ld = dev.net.forward(np.array([tok_d], np.int64), len(prompt) + i)[0]
        errs.append(_norm_err(ld, lc))
        differ += int(np.sum(ld != lc))
        tok_c, tok_d = int(np.argmax(lc)), int(np.argmax(ld))
        same &= tok_c == tok_d
        toks_d.append(tok_d)
    extra = {"logits_differ": differ}
    st = getattr(dev.net, "expert_stats", None)
    if st:
        extra["cache_hits"] = st["hits"]
        extra["cache_misses"] = st["misses"]
        extra["cache_direct"] = st["direct"]
    extra["graph"] = dev.net.step_graph.rec is not None
    extra["hybrid_graphs"] = dev.net.hybrid_step.ready()  # hybrid: the step's segments were replayed
    # the same steps again, each step's argmax fed to the next on the device (twice: the
    # second run replays its recorded graph from the first step)
    for run in range(2):
        extra[f"device_greedy_same{run}"] = list(dev.net.decode_greedy(int(prompt[-1]), len(prompt), n_decode)) == toks_d
    extra["device_greedy_graph"] = dev.net.greedy_graph.rec is not None
    return max(errs), same, extra


MODES = {  # name -> Model.load arguments
    "cuda": dict(device="cuda"),
    "hybrid": dict(device="hybrid"),
    "hybrid_cache": dict(device="hybrid", gpu_expert_cache_gb=None),  # sized per model: half the experts
    # the same, its misses through pinned staging buffers (not straight from the registered file)
    "hybrid_cache_staged": dict(device="hybrid", gpu_expert_cache_gb=None, env={"FLASHMOE_EXPERT_STAGING": "1"}),
    "unified": dict(device="cuda", unified_memory=True),
    "auto": dict(device="auto"),
}


def _half_experts_gb(path):
    from flashmoe_gguf.gguf_file import GGUFFile
    gf = GGUFFile(path)
    n = sum(t.n_bytes for t in gf if "_exps." in t.name)
    gf.close()
    return n / 2 / 1e9


def tiny(tmp, modes=("cuda", "hybrid", "hybrid_cache", "hybrid_cache_staged", "unified")):
    import gguf
    from tiny_gguf import random_llama_state, write_state_gguf

    from flashmoe_gguf.converters.convert import convert
    res = {}
    for name, qt in (("dense_f32", gguf.GGMLQuantizationType.F32), ("dense_q8_0", gguf.GGMLQuantizationType.Q8_0)):
        cfg, sd = random_llama_state(seed=1, layers=2)
        path = write_state_gguf(cfg, sd, Path(tmp) / f"{name}.gguf", "llama", qt)
        err, same, extra = compare(path, "cuda", [5, 17, 42], 6, float_cpu=qt == gguf.GGMLQuantizationType.F32)
        res[f"{name}.cuda.logits"] = err
        res[f"{name}.cuda.greedy_same"] = same
        for k, v in extra.items():
            res[f"{name}.cuda.{k}"] = v
    # a MoE with float weights (float kernels on both devices) and one converted to Q4_K experts
    # and Q8_0 for the rest (int8 activations on both devices)
    cfg, sd = random_llama_state(seed=1, n_expert=8, n_expert_used=2, layers=2, hidden=256, ff=256, heads=4, kv_heads=2)
    f32 = write_state_gguf(cfg, sd, Path(tmp) / "moe_f32.gguf", "llama", gguf.GGMLQuantizationType.F32)
    q4k = Path(tmp) / "moe_q4_k.gguf"
    convert(f32, q4k, experts="q4_k", rest="q8_0", progress=False, echo=lambda s: None)
    # a MoE with a gated shared expert wider than the routed ones (qwen2-moe style), Q4_K and Q8_0
    cfg, sd = random_llama_state(seed=2, n_expert=8, n_expert_used=2, layers=2, hidden=256, ff=256, heads=4,
                                 kv_heads=2, shared_ff=512)
    shf32 = write_state_gguf(cfg, sd, Path(tmp) / "moe_shexp_f32.gguf", "llama", gguf.GGMLQuantizationType.F32)
    shq = Path(tmp) / "moe_shexp_q4_k.gguf"
    convert(shf32, shq, experts="q4_k", rest="q8_0", progress=False, echo=lambda s: None)
    # rows of 96 (not a multiple of 256): gate and up fall back to Q5_0, whose prompt kernel is
    # the float one, down stays Q4_K (int8), as in the upcycled SmolLM2; the prompt sends single
    # tokens to some experts (the prompt kernel must still be the float one on both devices)
    cfg, sd = random_llama_state(seed=4, n_expert=8, n_expert_used=2, layers=2, hidden=96, ff=256, heads=4,
                                 kv_heads=2)
    mxf32 = write_state_gguf(cfg, sd, Path(tmp) / "moe_mixed_f32.gguf", "llama", gguf.GGMLQuantizationType.F32)
    mixed = Path(tmp) / "moe_mixed.gguf"
    convert(mxf32, mixed, experts="q4_k", rest="q8_0", progress=False, echo=lambda s: None)
    for name, path, float_cpu, mmodes in (("moe_f32", f32, True, modes), ("moe_q4_k", q4k, False, modes),
                                          ("moe_shexp_q4_k", shq, False, modes),
                                          ("moe_mixed", mixed, False, ("cuda", "hybrid"))):
        for mode in mmodes:
            kw = dict(MODES[mode])
            if kw.get("gpu_expert_cache_gb", 0) is None:
                kw["gpu_expert_cache_gb"] = _half_experts_gb(path)
            with mock.patch.dict(os.environ, kw.pop("env", {})):
                err, same, extra = compare(path, prompt=[5, 17, 42, 99], n_decode=8, float_cpu=float_cpu, **kw)
            res[f"{name}.{mode}.logits"] = err
            res[f"{name}.{mode}.greedy_same"] = same
            for k, v in extra.items():
                res[f"{name}.{mode}.{k}"] = v
    return res


def linear_check(path):
    """Each weight of block 0 and the output: GPU and CPU matvec against gguf.quants."""
    from gguf import quants as gq
    from numba import cuda

    from flashmoe_gguf import Model
    from flashmoe_gguf.kernels.cuda import get_format
    net = Model.load(path, n_ctx=16).net
    b = net.blocks[0]
    res = {}
    rng = np.random.default_rng(0)
    for lin in (b.wq, b.wk, b.wo, b.mlp.gate, b.mlp.down, net.output):
        ref = np.asarray(gq.dequantize(np.asarray(lin.w).reshape(-1), lin.qtype), np.float64).reshape(lin.rows, -1)
        x = rng.standard_normal((1, lin.cols)).astype(np.float32)
        want = ref @ x[0].astype(np.float64)
        out = cuda.device_array(lin.rows, np.float32)
        get_format(lin.qtype).matvec(cuda.to_device(np.ascontiguousarray(lin.w)), cuda.to_device(x[0]), out)
        res[f"linear.{lin.name}.gpu"] = _norm_err(out.copy_to_host(), want)
        res[f"linear.{lin.name}.cpu"] = _norm_err(lin(x)[0], want)
    err, same, _ = compare(path, "cuda", [7], 2)
    res["model.cuda.logits_from_1_token"] = err
    return res


def real(path, n_tok=64):
    from numba import cuda

    from flashmoe_gguf import Model
    res = linear_check(path)
    for fc in (True, False):
        err, same, _ = compare(path, "cuda", [1, 504, 3250, 282, 260, 3241, 30], 8, float_cpu=fc)
        tag = "vs_cpu_f32_activations" if fc else "vs_cpu_int8_activations"
        res[f"model.cuda.logits.{tag}"] = err
        res[f"model.cuda.greedy_same.{tag}"] = same
    m = Model.load(path, n_ctx=256, device="cuda")
    net = m.net
    tok = np.array([1], np.int64)
    for i in range(3):  # compile and warm up
        net.forward(tok, i)
    cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(n_tok):
        net.forward(tok, 3 + i)
    cuda.synchronize()
    dt = (time.perf_counter() - t0) / n_tok
    res["model.decode_tok_s"] = 1.0 / dt
    res["model.weight_bytes"] = net.weight_bytes
    res["model.weight_GB_s"] = net.weight_bytes / dt / 1e9
    cpu = Model.load(path, n_ctx=256)
    for i in range(3):
        cpu.net.forward(tok, i)
    t0 = time.perf_counter()
    for i in range(16):
        cpu.net.forward(tok, 3 + i)
    res["model.cpu_decode_tok_s"] = 16 / (time.perf_counter() - t0)
    return res


SMOLLM2_PROMPT = "Write a short story about a robot who learns to paint. Once upon a time,"


def greedy(m, prompt, n_tok, forced=None):
    """n_tok greedy tokens of model m after prompt (end-of-text ignored) and the logits each was
    chosen from; with ``forced``, those tokens are fed instead (teacher forcing)."""
    ids = np.asarray(m.tokenize(prompt), np.int64)
    logits = m.net.forward(ids, 0)[-1]
    toks, steps = [], []
    for i in range(n_tok):
        steps.append(logits)
        tok = int(np.argmax(logits)) if forced is None else forced[i]
        toks.append(tok)
        logits = m.net.forward(np.array([tok], np.int64), len(ids) + i)[-1]
    return toks, steps


def perturb_moe_input(m, noise, seed=0):
    """Multiply every MoE block's input by (1 + noise N(0, 1)) from now on (float32-rounding-
    sized noise: the reference for judging differences that come from summation order)."""
    rng = np.random.default_rng(seed)
    for blk in m.net.blocks:
        mlp = blk.mlp
        if not hasattr(mlp, "n_used"):
            continue
        cls = type(mlp)

        class Noisy(cls):  # same object, its input perturbed
            def __call__(self, x, out=None, _base=cls.__call__):
                return _base(self, (x * (1 + noise * rng.standard_normal(x.shape))).astype(np.float32), out)
        mlp.__class__ = Noisy


def smollm2_moe(path, n_tok=48, tag="smollm2_moe"):
    """Greedy decoding on the upcycled SmolLM2 MoE, every device mode against the CPU path
    (the same kernels on both: the default int8-activation ones, or the float ones when
    FLASHMOE_FLOAT_KERNELS=1 is set; end-of-text ignored so that every run is n_tok long).

    Besides the free-running greedy tokens, each mode is also fed the CPU's tokens (teacher
    forcing), which gives the logit difference at every step and, where the free runs part, how
    the CPU's margin between its token and the GPU's compares with that difference.
    """
    from flashmoe_gguf import Model
    res = {}

    def run(m, forced=None):
        return greedy(m, SMOLLM2_PROMPT, n_tok, forced)

    ref, ref_logits = run(Model.load(path, n_ctx=256))
    res[f"{tag}.cpu_tokens"] = len(ref)
    # the noise floor: the CPU path itself, its MoE input perturbed by 1e-7 relative, fed its
    # own tokens (each step's absolute max logit difference)
    noisy = Model.load(path, n_ctx=256)
    perturb_moe_input(noisy, 1e-7)
    _, nl = run(noisy, forced=ref)
    noise = [float(np.max(np.abs(np.asarray(a, np.float64) - b))) for a, b in zip(nl, ref_logits)]
    res[f"{tag}.noise_forced_max_logit_err"] = max(_norm_err(a, b) for a, b in zip(nl, ref_logits))
    del noisy
    for mode in ("cuda", "hybrid", "hybrid_cache", "unified"):
        kw = dict(MODES[mode])
        if kw.get("gpu_expert_cache_gb", 0) is None:
            kw["gpu_expert_cache_gb"] = _half_experts_gb(path)
        m = Model.load(path, n_ctx=256, **kw)
        got, _ = run(m)
        _, forced = run(m, forced=ref)  # (each run starts again at position 0)
        errs = [_norm_err(a, b) for a, b in zip(forced, ref_logits)]
        agree = [int(np.argmax(a)) == t for a, t in zip(forced, ref)]
        same = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), len(ref))
        r = {"same_prefix": same, "greedy_same": got == ref, "forced_max_logit_err": max(errs),
             "forced_argmax_agree": sum(agree) / len(agree),
             # logits not bit for bit the CPU's (fed the CPU's tokens), of n_tok * vocabulary
             "forced_logits_differ": int(sum(np.sum(a != b) for a, b in zip(forced, ref_logits)))}
        if same < len(ref):  # the first step where the runs part: both had the same context there
            lc, lg = ref_logits[same], forced[same]
            a, b = ref[same], got[same]
            r["split_cpu_margin"] = float(lc[a] - lc[b])
            r["split_gpu_margin"] = float(lg[a] - lg[b])
            r["split_noise"] = noise[same]  # the CPU's own noise floor at that step
        for k, v in r.items():
            res[f"{tag}.{mode}.{k}"] = v
    return res


def main(argv):
    res = {}
    if "--no-tiny" not in argv:
        with tempfile.TemporaryDirectory() as tmp:
            res.update(tiny(tmp))
    if "--model" in argv:
        res.update(real(argv[argv.index("--model") + 1]))
    if "--smollm2-moe" in argv:
        float_k = os.environ.get("FLASHMOE_FLOAT_KERNELS") == "1"
        res.update(smollm2_moe(argv[argv.index("--smollm2-moe") + 1],
                               tag="smollm2_moe_float" if float_k else "smollm2_moe"))
    print(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1:])
