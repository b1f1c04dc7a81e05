"""Qwen3.5-MoE at the real model's depth and routing, from disk: decode speed, side by side with llama.cpp.

    python bench/qwen35_scale.py [--small] [--tokens 16] [--threads 2] [--no-llama-cpp] [--remove]

Writes (under models/bench/, not committed) a random-weight ``qwen35moe`` GGUF with Qwen3.5-397B-A17B's
depth and routing: 60 layers, 3 Gated DeltaNet layers to 1 gated full-attention layer, 512 experts,
top-10 + a shared expert; at a reduced width (hidden 2048, expert width 512; Q2_K experts, Q8_0
elsewhere): 99 B parameters, 34.5 GB, more than a 24 GB machine's RAM. ``--small`` writes a 1.6 GB
model with 16 layers and 64 experts (a quick end-to-end check).

The file is written streamed (converters.writer: every tensor info first, then data chunk by
chunk): expert rows are drawn from a pool of a few thousand rows quantized once, so writing costs
disk time, not quantization time, and little memory.

Then, for K = 10 and K = 4 routed experts per token: decode tok/s cold (file evicted from the page
cache first) and warm (the run right after), steady-state (the first decode steps left out),
with expert I/O per token (store stats) and the bound
    missed bytes per token / disk bandwidth + resident bytes per token / memory bandwidth
(both bandwidths measured in the same run) and the fraction of it reached; then llama.cpp
(llama-cpp-python) on the same file with the same threads and K, when it is installed.

On a machine that other processes keep busy, use --threads 1: with every core taken, each
parallel region of either engine waits for a descheduled thread (measured: 2.2 s per step with 2
threads against 0.2 s with 1, on 2 busy cores).
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
BENCH_DIR = ROOT / "models" / "bench"
ARCH = "qwen35moe"


def shape_config(small: bool) -> dict:
    c = dict(n_layer=60, n_expert=512, top_k=10, n_embd=2048, n_ff_exp=512, n_ff_shexp=512, n_vocab=248320,
             n_head=16, n_head_kv=2, head_dim=256, n_k=8, n_v=16, dk=128, dv=128, conv=4, interval=4)
    if small:
        c.update(n_layer=16, n_expert=64, n_vocab=32000)
    return c


# ------------------------------------------------------------------ writing
def _parts():
    from flashmoe_gguf.converters import codec
    from flashmoe_gguf.converters.parts import Part

    class PoolPart(Part):
        """``rows`` rows drawn at random from a pool of pre-encoded rows of one type."""

        def __init__(self, pool: np.ndarray, qtype, rows: int, cols: int, seed: int):
            self.pool, self.native, self.rows, self.cols = pool, qtype, rows, cols
            self.seed = seed
            self.src_nbytes = rows * pool.shape[1]

        def encode(self, sel, qtype):
            assert qtype == self.native
            idx = np.random.default_rng(self.seed).integers(0, len(self.pool), self.rows)
            return self.pool[idx[sel]]

    class RandomF32(Part):
        """float32 rows from a function of (rng, rows, cols), generated when written."""

        def __init__(self, fn, rows: int, cols: int, seed: int):
            self.fn, self.rows, self.cols, self.seed = fn, rows, cols, seed
            self.src_nbytes = 4 * rows * cols

        def encode(self, sel, qtype):
            a = np.asarray(self.fn(np.random.default_rng(self.seed), self.rows, self.cols), dtype=np.float32)
            return codec.encode(a[sel], qtype)

    return PoolPart, RandomF32


def write_model(path: Path, c: dict, progress: bool = True, dry_run: bool = False) -> list:
    """Write the model to ``path`` (``dry_run``: only build the plan); returns the tensor plan."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    from flashmoe_gguf.converters import codec
    from flashmoe_gguf.converters.plan import TensorPlan
    from flashmoe_gguf.converters.writer import write_gguf
    from flashmoe_gguf.converters.source import recorder

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_gguf import add_byte_level_vocab

    PoolPart, RandomF32 = _parts()
    D, E, L = c["n_embd"], c["n_expert"], c["n_layer"]
    rng = np.random.default_rng(0)
    pools: dict[tuple, np.ndarray] = {}

    def pool(qtype, cols: int, n: int = 4096) -> np.ndarray:
        if (qtype, cols) not in pools:
            x = rng.standard_normal((n, cols), dtype=np.float32) / np.sqrt(cols)
            pools[(qtype, cols)] = codec.encode(x, qtype)
        return pools[(qtype, cols)]

    plan: list[TensorPlan] = []
    seed = iter(range(1, 1 << 30))

    def mat(name: str, rows: int, cols: int, qtype=Q.Q8_0) -> None:
        t = TensorPlan(name, (rows, cols), [PoolPart(pool(qtype, cols), qtype, rows, cols, next(seed))], qtype=qtype)
        plan.append(t)

    def f32(name: str, shape: tuple, fn) -> None:
        rows, cols = (1, shape[0]) if len(shape) == 1 else shape
        plan.append(TensorPlan(name, shape, [RandomF32(fn, rows, cols, next(seed))], qtype=Q.F32))

    def experts(name: str, rows: int, cols: int) -> None:
        parts = [PoolPart(pool(Q.Q2_K, cols), Q.Q2_K, rows, cols, next(seed)) for _ in range(E)]
        plan.append(TensorPlan(name, (E, rows, cols), parts, qtype=Q.Q2_K))

    ones = lambda g, r, k: 1.0 + 0.1 * g.standard_normal((r, k))  # noqa: E731
    normal = lambda s: (lambda g, r, k: s * g.standard_normal((r, k)))  # noqa: E731
    H, Hkv, K, Hk, Hv, dk, dv = (c[k] for k in ("n_head", "n_head_kv", "head_dim", "n_k", "n_v", "dk", "dv"))
    qkv = 2 * Hk * dk + Hv * dv
    mat("token_embd.weight", c["n_vocab"], D)
    recurrent = [(i + 1) % c["interval"] != 0 for i in range(L)]
    for i in range(L):
        b = f"blk.{i}"
        f32(f"{b}.attn_norm.weight", (D,), ones)
        f32(f"{b}.post_attention_norm.weight", (D,), ones)
        if recurrent[i]:
            mat(f"{b}.attn_qkv.weight", qkv, D)
            mat(f"{b}.attn_gate.weight", Hv * dv, D)
            mat(f"{b}.ssm_beta.weight", Hv, D)
            mat(f"{b}.ssm_alpha.weight", Hv, D)
            f32(f"{b}.ssm_a", (Hv,), lambda g, r, k: -np.exp(g.uniform(-2, 1, (r, k))))
            f32(f"{b}.ssm_dt.bias", (Hv,), normal(0.5))
            f32(f"{b}.ssm_conv1d.weight", (qkv, c["conv"]), normal(0.5))
            f32(f"{b}.ssm_norm.weight", (dv,), ones)
            mat(f"{b}.ssm_out.weight", D, Hv * dv)
        else:
            mat(f"{b}.attn_q.weight", 2 * H * K, D)
            mat(f"{b}.attn_k.weight", Hkv * K, D)
            mat(f"{b}.attn_v.weight", Hkv * K, D)
            mat(f"{b}.attn_output.weight", D, H * K)
            f32(f"{b}.attn_q_norm.weight", (K,), ones)
            f32(f"{b}.attn_k_norm.weight", (K,), ones)
        f32(f"{b}.ffn_gate_inp.weight", (E, D), normal(3.0 / np.sqrt(D)))
        experts(f"{b}.ffn_gate_exps.weight", c["n_ff_exp"], D)
        experts(f"{b}.ffn_up_exps.weight", c["n_ff_exp"], D)
        experts(f"{b}.ffn_down_exps.weight", D, c["n_ff_exp"])
        mat(f"{b}.ffn_gate_shexp.weight", c["n_ff_shexp"], D)
        mat(f"{b}.ffn_up_shexp.weight", c["n_ff_shexp"], D)
        mat(f"{b}.ffn_down_shexp.weight", D, c["n_ff_shexp"])
        f32(f"{b}.ffn_gate_inp_shexp.weight", (1, D), normal(1.0 / np.sqrt(D)))
    f32("output_norm.weight", (D,), ones)
    mat("output.weight", c["n_vocab"], D)

    w = recorder(ARCH)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name("qwen35moe scale test (random weights)")
    w.add_block_count(L)
    w.add_context_length(4096)
    w.add_embedding_length(D)
    w.add_head_count(H)
    w.add_head_count_kv(Hkv)
    w.add_key_length(K)
    w.add_value_length(K)
    w.add_rope_freq_base(1e7)
    w.add_rope_dimension_count(K // 4)
    w.add_rope_dimension_sections([11, 11, 10, 0])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(E)
    w.add_expert_used_count(c["top_k"])
    w.add_expert_feed_forward_length(c["n_ff_exp"])
    w.add_expert_shared_feed_forward_length(c["n_ff_shexp"])
    w.add_ssm_conv_kernel(c["conv"])
    w.add_ssm_state_size(dk)
    w.add_ssm_group_count(Hk)
    w.add_ssm_time_step_rank(Hv)
    w.add_ssm_inner_size(dv * Hv)
    w.add_array(f"{ARCH}.attention.recurrent_layers", recurrent)
    w.add_full_attention_interval(c["interval"])
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q2_K))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_byte_level_vocab(w, c["n_vocab"])
    meta = dict(w.kv_data[0])

    def add_metadata(writer) -> None:
        writer.kv_data[0] = meta

    if not dry_run:
        write_gguf(path, ARCH, add_metadata, plan, progress=progress)
    return plan


# ------------------------------------------------------------------ measuring
def run_ours(path: Path, k: int, ids: list[int], n_tokens: int, threads: int, cold: bool, skip: int) -> dict:
    from moe import evict

    from flashmoe_gguf import Model

    if cold:
        evict(path)
    t = time.perf_counter()
    model = Model.load(path, n_ctx=256, threads=threads, experts_per_token=k)
    load_s = time.perf_counter() - t
    chunks = list(model.generate(ids, max_tokens=n_tokens + 1, temperature=0))
    st = chunks[-1].stats
    steps = model.store.stats.steps
    steady = steps[skip:] if len(steps) > skip + 1 else steps
    n = max(len(steady), 1)
    res = dict(tok_s=st.decode_tps, load_s=load_s, prompt_tps=st.prompt_tps,
               steady_tok_s=n / max(sum(s.seconds for s in steady), 1e-9),
               routed=sum(s.expert_bytes for s in steady) / n, missed=sum(s.miss_bytes for s in steady) / n,
               io_wait=sum(s.io_wait for s in steady) / n, hit=model.store.stats.hit_rate)
    model.store.close()
    model.file.close()
    del model
    gc.collect()
    return res


def run_llama_cpp(path: Path, k: int, ids: list[int], n_tokens: int, threads: int, cold: bool) -> dict | None:
    from moe import evict

    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from decode import llama_cpp_last_logits

    if cold:
        evict(path)
    t = time.perf_counter()
    try:
        llm = Llama(model_path=str(path), n_ctx=256, n_batch=64, n_threads=threads, n_threads_batch=threads,
                    verbose=False, kv_overrides={f"{ARCH}.expert_used_count": k})
    except Exception as e:  # noqa: BLE001 - report and carry on
        return dict(error=str(e))
    load_s = time.perf_counter() - t
    llm.eval(ids)
    tok = int(np.argmax(llama_cpp_last_logits(llm)))
    times = []
    for _ in range(n_tokens):
        t = time.perf_counter()
        llm.eval([tok])
        tok = int(np.argmax(llama_cpp_last_logits(llm)))
        times.append(time.perf_counter() - t)
    del llm
    gc.collect()
    return dict(tok_s=len(times) / sum(times), load_s=load_s)


def main() -> int:
    from moe import disk_bandwidth, memory_bandwidth, resident_bytes_per_token

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="16 layers, 64 experts, vocabulary 32000 (~2 GB)")
    ap.add_argument("--tokens", type=int, default=16, help="decode steps per run")
    ap.add_argument("--skip", type=int, default=3, help="first decode steps left out of the steady figures")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", default="10,4", help="routed experts per token to measure")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="print the sizes of the model, write nothing")
    ap.add_argument("--remove", action="store_true", help="delete the file at the end")
    a = ap.parse_args()
    c = shape_config(a.small)
    path = BENCH_DIR / (f"qwen35moe-scale-{c['n_layer']}L-{c['n_expert']}x{c['n_ff_exp']}-d{c['n_embd']}-q2k.gguf")
    if a.dry_run:
        plan = write_model(path, c, dry_run=True)
        exp = sum(t.nbytes for t in plan if t.is_expert)
        total = sum(t.nbytes for t in plan)
        per_expert = exp / (c["n_layer"] * c["n_expert"])
        print(f"{path.name}: {total / 1e9:.2f} GB of tensors ({exp / 1e9:.2f} GB experts, "
              f"{(total - exp) / 1e9:.2f} GB the rest), {sum(t.n_elements for t in plan) / 1e9:.1f} B parameters; "
              f"routed per token: {per_expert * c['n_layer'] * c['top_k'] / 1e6:.0f} MB at K={c['top_k']}, "
              f"{per_expert * c['n_layer'] * 4 / 1e6:.0f} MB at K=4")
        return 0
    if not path.exists():
        print(f"writing {path.name} ...", flush=True)
        t = time.perf_counter()
        write_model(path, c)
        print(f"wrote {path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s", flush=True)

    from flashmoe_gguf.gguf_file import GGUFFile
    from flashmoe_gguf.info import facts

    import psutil

    f = facts(GGUFFile(path))
    size = path.stat().st_size
    mem_bw = memory_bandwidth(a.threads)
    disk_bw = disk_bandwidth(path)
    print(f"{path.name}: {size / 1e9:.2f} GB, {f.n_params / 1e9:.1f} B parameters "
          f"({f.n_params_active / 1e9:.2f} B active at top-{c['top_k']}), experts {f.expert_bytes / 1e9:.2f} GB; "
          f"RAM {psutil.virtual_memory().total / 1e9:.1f} GB; "
          f"{c['n_layer']} layers ({c['n_layer'] // c['interval']} full attention), {c['n_expert']} experts",
          flush=True)
    print(f"memory read bandwidth {mem_bw:.1f} GB/s; cold disk read (parallel 2 MB preads) {disk_bw:.2f} GB/s",
          flush=True)
    ids = list(np.random.default_rng(0).integers(256, 1000, size=8))
    for k in (int(x) for x in a.k.split(",")):
        for cold in (True, False):
            r = run_ours(path, k, ids, a.tokens, a.threads, cold, a.skip)
            resident = resident_bytes_per_token(path, r["routed"]) - r["missed"]
            bound = r["missed"] / (disk_bw * 1e9) + resident / (mem_bw * 1e9)
            print(f"flashmoe  K={k:2d} {'cold' if cold else 'warm'}: steady {r['steady_tok_s']:6.2f} tok/s "
                  f"(all {a.tokens} steps {r['tok_s']:.2f}; load {r['load_s']:.1f} s) | routed "
                  f"{r['routed'] / 1e6:6.1f} MB/tok, from disk {r['missed'] / 1e6:6.1f} MB/tok "
                  f"(hits {100 * r['hit']:.0f}%), I/O wait {1000 * r['io_wait']:.0f} ms/tok | bound "
                  f"{1 / bound:6.2f} tok/s -> {100 * r['steady_tok_s'] * bound:.0f}% of it", flush=True)
        if not a.no_llama_cpp:
            for cold in (True, False):
                r = run_llama_cpp(path, k, ids, a.tokens, a.threads, cold)
                if r is None:
                    print("llama.cpp: llama-cpp-python not installed")
                    break
                if "error" in r:
                    print(f"llama.cpp K={k:2d}: does not load this file ({r['error']})")
                    break
                print(f"llama.cpp K={k:2d} {'cold' if cold else 'warm'}: {r['tok_s']:6.2f} tok/s "
                      f"(load {r['load_s']:.1f} s)", flush=True)
    if a.remove:
        path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
